"""The one list of model names and how each is loaded: used by the CLI, the Slicer module and load_model.

Importing this is cheap (no torch): the Slicer module reads the names at start-up. The loaders import
``build`` only when called.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional


@dataclass(frozen=True)
class ModelEntry:
    """name; description (one line, for menus); needs_checkpoint: the user must give a ProbSAM file;
    min_gpu_gib: GPU memory below which sampling is likely to run out of memory or crawl;
    loader(checkpoint, sam_checkpoint, download) -> ProbSAM on the CPU; warning: what a user must know
    before trusting its masks (empty when nothing beyond "research software"); weights: manifest key."""

    name: str
    description: str
    needs_checkpoint: bool
    min_gpu_gib: float
    loader: Callable
    warning: str = ""  # shown wherever the model is chosen (the Slicer module, `probsam sample`)
    weights: str = ""  # its checkpoints.MANIFEST entry (the file whose SHA-256 provenance records)


DEMO_WARNING = ("DEMO model: a tiny network trained only on rendered phantom CT (real LIDC-IDRI reader "
                "outlines, synthetic images). Not validated on real scans; not for clinical use.")


def _demo_loader(weights: str) -> Callable:
    """Loader of a bundled demo model: its file is checked against the manifest's SHA-256."""
    def load(checkpoint: Optional[Path], sam_checkpoint: Optional[Path], download: bool):
        from ProbSAMLib.weights import checkpoints
        from ProbSAMLib.weights.build import load_probsam

        return load_probsam(checkpoints.resolve_weights(weights, checkpoint))
    return load


def _sam_loader(variant: str) -> Callable:
    def load(checkpoint: Optional[Path], sam_checkpoint: Optional[Path], download: bool):
        import warnings

        from ProbSAMLib.weights import checkpoints
        from ProbSAMLib.weights.build import build_probsam, load_probsam
        from ProbSAMLib.modeling.config import ProbSAMConfig

        sam_path = checkpoints.resolve_weights(f"sam_{variant}", sam_checkpoint, download=download)
        if checkpoint is not None:
            return load_probsam(Path(checkpoint), sam_checkpoint=sam_path)
        warnings.warn(f"no ProbSAM heads given for {variant}: the prior is untrained, so every sample "
                      f"equals SAM's own box prediction (no uncertainty). Pass --checkpoint HEADS.safetensors.")
        return build_probsam(ProbSAMConfig.preset(variant), sam_checkpoint=sam_path)
    return load


def _load_file(checkpoint: Optional[Path], sam_checkpoint: Optional[Path], download: bool):
    from ProbSAMLib.weights.build import load_probsam
    from ProbSAMLib.weights.checkpoints import CheckpointError

    if checkpoint is None:
        raise CheckpointError("model 'file' needs --checkpoint PATH to a ProbSAM .safetensors file")
    return load_probsam(Path(checkpoint), sam_checkpoint=sam_checkpoint)


DEFAULT_MODEL = "demo_v7"  # what `probsam demo`/`sample`, load_model and the Slicer module use unless told


def _demo_model(name: str, version: str) -> ModelEntry:
    """A bundled demo model: the current one (DEFAULT_MODEL) or an earlier one kept so earlier runs reproduce."""
    if name == DEFAULT_MODEL:
        description = (f"bundled tiny DEMO model {version} (rendered phantom with hard cases; reads the slices "
                       "below and above; not for clinical use)")
    else:
        description = (f"bundled tiny DEMO model {version}, superseded by {DEFAULT_MODEL} (kept so earlier runs "
                       "reproduce)")
    return ModelEntry(name, description, False, 1, _demo_loader(name), DEMO_WARNING, name)


MODELS = {entry.name: entry for entry in (
    _demo_model("demo_v7", "v7"),
    _demo_model("demo_v6", "v6"),
    _demo_model("demo_v5", "v5"),
    _demo_model("demo_v4", "v4"),
    _demo_model("demo_v3", "v3"),
    _demo_model("demo_v2", "v2"),
    _demo_model("demo", "v1"),
    ModelEntry("vit_b", "SAM ViT-B + ProbSAM heads (--checkpoint)", False, 4, _sam_loader("vit_b"), weights="sam_vit_b"),
    ModelEntry("vit_l", "SAM ViT-L + ProbSAM heads (--checkpoint)", False, 6, _sam_loader("vit_l"), weights="sam_vit_l"),
    ModelEntry("vit_h", "SAM ViT-H + ProbSAM heads (--checkpoint)", False, 8, _sam_loader("vit_h"), weights="sam_vit_h"),
    ModelEntry("file", "a full ProbSAM .safetensors file (--checkpoint)", True, 2, _load_file),
)}
MODEL_NAMES = tuple(MODELS)


def model_entry(name: str) -> ModelEntry:
    """The entry of a model name; CheckpointError naming the choices for an unknown one."""
    try:
        return MODELS[name]
    except KeyError:
        from ProbSAMLib.weights.checkpoints import CheckpointError

        raise CheckpointError(f"unknown model {name!r}; choose one of {', '.join(MODEL_NAMES)}") from None


def weights_sha256(name: str, checkpoint: Optional[Path] = None) -> str:
    """SHA-256 of the weights a model is loaded from (the ProbSAM file; else the manifest's entry)."""
    from ProbSAMLib.weights import checkpoints

    if checkpoint is not None:
        return checkpoints.sha256_file(Path(checkpoint))
    entry = checkpoints.MANIFEST[model_entry(name).weights]
    return entry.sha256 or checkpoints.sha256_file(checkpoints.entry_path(entry))
