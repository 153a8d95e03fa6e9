"""The architecture: a ProbSAMConfig -> segment_anything's Sam, wired as segment_anything/build_sam.py does.

No weights here: every module is freshly initialised. Weights come from files in ProbSAMLib.weights.build.
"""

from __future__ import annotations

from functools import partial

import torch
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

from ProbSAMLib.modeling.config import ENCODER_VARIANTS, ProbSAMConfig

# SAM's per-channel normalisation of 0..255 RGB (ImageNet's mean and std), as in build_sam.py.
SAM_PIXEL_MEAN = [123.675, 116.28, 103.53]
SAM_PIXEL_STD = [58.395, 57.12, 57.375]


def build_sam(config: ProbSAMConfig) -> Sam:
    """segment_anything's Sam, wired as build_sam.py does, for any ProbSAMConfig (SAM's sizes or "tiny")."""
    variant = ENCODER_VARIANTS[config.encoder]
    grid = config.embedding_size
    return Sam(
        image_encoder=ImageEncoderViT(
            depth=variant["depth"], embed_dim=variant["embed_dim"], img_size=config.img_size,
            mlp_ratio=4, norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), num_heads=variant["num_heads"],
            patch_size=config.patch_size, qkv_bias=True, use_rel_pos=True,
            global_attn_indexes=variant["global_attn_indexes"], window_size=config.window_size,
            out_chans=config.prompt_dim,
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=config.prompt_dim, image_embedding_size=(grid, grid),
            input_image_size=(config.img_size, config.img_size), mask_in_chans=16,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(depth=2, embedding_dim=config.prompt_dim,
                                          mlp_dim=config.decoder_mlp_dim, num_heads=8),
            transformer_dim=config.prompt_dim, iou_head_depth=3, iou_head_hidden_dim=256,
        ),
        pixel_mean=SAM_PIXEL_MEAN, pixel_std=SAM_PIXEL_STD,
    )
