"""ProbSAMLib: Probabilistic Segment Anything — many plausible masks per box, and their uncertainty.

Research software: the default model (ProbSAM heads on the pretrained LiteMedSAM) is a research model,
and nothing here is validated for clinical use.

Typical use::

    from ProbSAMLib import load_model, sample_masks
    model = load_model("lite_medsam")              # the default model; CUDA, MPS or CPU chosen for you
    result = sample_masks(model, ct_slice_hu, box_xyxy, n_samples=16, seed=0)
    result.masks.shape                             # (1, 16, H, W)
"""

__version__ = "0.1.0"

from ProbSAMLib.modeling.config import ProbSAMConfig  # noqa: E402,F401


# The public API by name -> the module that defines it. Read lazily (PEP 562), so `import ProbSAMLib`
# imports no torch (the Slicer module's start-up); absolute names, so the import-graph test sees them.
_LAZY = {
    "ProbSAM": "ProbSAMLib.modeling.probsam",
    "build_probsam": "ProbSAMLib.weights.build",
    "load_probsam": "ProbSAMLib.weights.build",
    "load_model": "ProbSAMLib.weights.build",
    "save_probsam": "ProbSAMLib.weights.checkpoints",
    "sample_masks": "ProbSAMLib.inference.sampling",
    "sample_volume": "ProbSAMLib.inference.volume",
    "choose_device": "ProbSAMLib.inference.device",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'ProbSAMLib' has no attribute {name!r}")
