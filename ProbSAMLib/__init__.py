"""ProbSAMLib: Probabilistic Segment Anything — many plausible masks per box, and their uncertainty.

Research software. Models trained on rendered phantom data are DEMO models; nothing here is validated
for clinical use.

Typical use::

    from ProbSAMLib import load_model, sample_masks
    model = load_model("demo_v7")                  # bundled tiny demo model, CPU/CUDA/MPS chosen for you
    result = sample_masks(model, ct_slice_hu, box_xyxy, n_samples=16, seed=0)
    result.masks.shape                             # (1, 16, H, W)
"""

__version__ = "0.1.0"

from ProbSAMLib.modeling.config import ProbSAMConfig  # noqa: E402,F401


def __getattr__(name):
    # Lazy: `import ProbSAMLib` stays cheap (no torch import) for the Slicer module's start-up.
    lazy = {
        "ProbSAM": ("modeling.probsam", "ProbSAM"),
        "build_probsam": ("weights.build", "build_probsam"),
        "load_probsam": ("weights.build", "load_probsam"),
        "load_model": ("weights.build", "load_model"),
        "sample_masks": ("inference.sampling", "sample_masks"),
        "sample_volume": ("inference.volume", "sample_volume"),
        "save_probsam": ("weights.checkpoints", "save_probsam"),
        "choose_device": ("inference.device", "choose_device"),
    }
    if name in lazy:
        import importlib

        module, attr = lazy[name]
        return getattr(importlib.import_module(f".{module}", __name__), attr)
    raise AttributeError(f"module 'ProbSAMLib' has no attribute {name!r}")
