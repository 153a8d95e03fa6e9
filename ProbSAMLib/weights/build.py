"""The one builder: config -> segment_anything modules -> ProbSAM, with weights from SAM or ProbSAM files.

Mirrors segment_anything/build_sam.py (same classes, same wiring) and adds the tiny variant and the
ProbSAM heads. `load_model` is what the CLI, the Slicer module and scripts call.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Optional

import torch
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

from ProbSAMLib.weights import checkpoints
from ProbSAMLib.weights.checkpoints import CheckpointError
from ProbSAMLib.modeling.config import ENCODER_VARIANTS, ProbSAMConfig
from ProbSAMLib.inference.device import choose_device
from ProbSAMLib.modeling.probsam import ProbSAM

SAM_PIXEL_MEAN = [123.675, 116.28, 103.53]
SAM_PIXEL_STD = [58.395, 57.12, 57.375]


def build_sam(config: ProbSAMConfig) -> Sam:
    """segment_anything's Sam, wired as build_sam.py does, for any ProbSAMConfig."""
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


def build_probsam(config: ProbSAMConfig, sam_checkpoint: Optional[Path] = None, seed: Optional[int] = None) -> ProbSAM:
    """A ProbSAM with SAM's official weights (if given, verified by SHA-256) and freshly initialised heads."""
    if seed is not None:
        torch.manual_seed(seed)
    model = ProbSAM(build_sam(config), config)
    if sam_checkpoint is not None:
        state = checkpoints.load_torch_checkpoint(Path(sam_checkpoint))
        _load_state(model.sam, state, sam_checkpoint, strict=True)
    return model


def load_probsam(path: Path, sam_checkpoint: Optional[Path] = None) -> ProbSAM:
    """A ProbSAM from a safetensors file; a heads-only file also needs the SAM checkpoint it was trained on."""
    config, state, metadata = checkpoints.read_probsam_file(Path(path))
    model = build_probsam(config)
    if metadata.get("contents") == "heads":
        if sam_checkpoint is None:
            raise CheckpointError(
                f"{path} holds ProbSAM heads for SAM {config.encoder}; also give the SAM checkpoint "
                f"(sam_{config.encoder}) that provides the image encoder")
        sam_state = checkpoints.load_torch_checkpoint(Path(sam_checkpoint))
        encoder = {k[len("image_encoder."):]: v for k, v in sam_state.items() if k.startswith("image_encoder.")}
        _load_state(model.sam.image_encoder, encoder, sam_checkpoint, strict=True)
        _load_state(model, state, path, strict=False, allowed_missing="sam.image_encoder.")
    else:
        _load_state(model, state, path, strict=True)
    return model


def _load_state(module: torch.nn.Module, state, source, strict: bool, allowed_missing: str = "") -> None:
    """load_state_dict with an error that names the file and the mismatching keys/shapes."""
    own = module.state_dict()
    wrong_shape = [f"{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}"
                   for k, v in state.items() if k in own and own[k].shape != v.shape]
    missing = [k for k in own if k not in state and not (allowed_missing and k.startswith(allowed_missing))]
    unexpected = [k for k in state if k not in own]
    if wrong_shape or (strict and (missing or unexpected)) or (not strict and missing):
        details = "; ".join(filter(None, [
            f"{len(wrong_shape)} tensors of the wrong shape (e.g. {wrong_shape[0]})" if wrong_shape else "",
            f"{len(missing)} missing (e.g. {missing[0]})" if missing else "",
            f"{len(unexpected)} unexpected (e.g. {unexpected[0]})" if unexpected else "",
        ]))
        raise CheckpointError(f"{source} does not fit this model: {details}")
    module.load_state_dict(state, strict=False)


def load_model(
    name: str = "demo_v7",
    checkpoint: Optional[Path] = None,
    sam_checkpoint: Optional[Path] = None,
    device: str = "auto",
    download: bool = True,
) -> ProbSAM:
    """The model a user asks for by name (``registry.MODEL_NAMES``), ready for inference on the device.

    name: "demo_v7" (bundled tiny model; DEMO, rendered data, not for clinical use; "demo_v6", "demo_v5",
    "demo_v4", "demo_v3", "demo_v2", "demo" are the earlier versions),
    "vit_b"/"vit_l"/"vit_h"
    (official SAM weights from `sam_checkpoint`, the cache or a download, plus ProbSAM heads from
    `checkpoint`), or "file" (a full ProbSAM safetensors file at `checkpoint`).
    """
    from ProbSAMLib.weights.registry import model_entry

    model = model_entry(name).loader(checkpoint, sam_checkpoint, download)
    return model.to(choose_device(device)).eval()
