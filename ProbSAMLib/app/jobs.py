"""One sample request, served: the schema shared by the Slicer worker and the HTTP server.

A client (the Slicer module, or the worker relaying to a server) never sends a whole CT. It sends where
the box lies (``ijk_to_ras``, ``size_ijk``, ``lo``, ``hi``), the model and the settings; the job answers
which block of voxels the model reads (``region``); the client sends just that block; the job returns
the result message. Both sides of ProbSAMLib.app.worker and ProbSAMLib.app.server use these functions, so
a request means the same thing locally and remotely.

sample request {model: {name, checkpoint, sam_checkpoint, device}, ijk_to_ras (4x4), size_ijk (3,),
                lo (3,), hi (3,) (voxel box i, j, k; hi exclusive), n_samples, seed,
                roi (optional): {center_ras (3,), axes_ras (3x3, columns), size_mm (3,)}}
result         {masks (N, Kb, Jb, Ib) bool, entropy, variance, mutual_information, mean_probability
                (Kb, Jb, Ib) float32, consensus, informative (Kb, Jb, Ib) bool, agreement {level: bool map},
                marking_share (float or None), lo, summary, colors, segment_colors, roi_cut, model}
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

import numpy as np

from ProbSAMLib.errors import InputError

MAX_SAMPLES = 256
MAX_BOX_VOXELS = 64 * 2 ** 20  # a box this large is not a nodule; refusing it bounds the result's size


class RequestError(InputError):
    """A sample request that does not follow the schema (a client bug or a version mismatch)."""


def check_sample_request(request: dict) -> None:
    """Raise RequestError, one line naming the field, for a request that breaks the schema."""
    if not isinstance(request, dict):
        raise RequestError("a sample request must be an object")
    model = request.get("model")
    if not isinstance(model, dict) or not isinstance(model.get("name"), str):
        raise RequestError("field 'model' must be an object with a 'name'")
    for key in ("checkpoint", "sam_checkpoint", "device"):
        if model.get(key) is not None and not isinstance(model[key], str):
            raise RequestError(f"field 'model.{key}' must be a string or null")
    matrix = _numbers(request, "ijk_to_ras", (4, 4), float)
    if not np.isfinite(matrix).all() or abs(np.linalg.det(matrix[:3, :3])) < 1e-12:
        raise RequestError("field 'ijk_to_ras' must be a finite, invertible 4x4 matrix")
    size = _numbers(request, "size_ijk", (3,), int)
    lo, hi = _numbers(request, "lo", (3,), int), _numbers(request, "hi", (3,), int)
    if (size < 1).any() or (lo < 0).any() or (hi > size).any() or (hi <= lo).any():
        raise RequestError(f"the box lo={lo.tolist()}, hi={hi.tolist()} does not lie inside a volume of size_ijk="
                           f"{size.tolist()} (need 0 <= lo < hi <= size)")
    if int(np.prod(hi - lo)) > MAX_BOX_VOXELS:
        raise RequestError(f"the box has {int(np.prod(hi - lo))} voxels; at most {MAX_BOX_VOXELS} are sampled")
    n = request.get("n_samples")
    if not _is_int(n) or not 1 <= n <= MAX_SAMPLES:
        raise RequestError(f"field 'n_samples' must be an integer 1..{MAX_SAMPLES}, got {n!r}")
    seed = request.get("seed")
    if seed is not None and (not _is_int(seed) or not 0 <= seed < 2 ** 63):
        raise RequestError(f"field 'seed' must be an integer 0..2**63-1 or null, got {seed!r}")
    roi = request.get("roi")
    if roi is not None:
        if not isinstance(roi, dict):
            raise RequestError("field 'roi' must be an object or null")
        _numbers(roi, "center_ras", (3,), float, "roi.")
        _numbers(roi, "axes_ras", (3, 3), float, "roi.")
        if (_numbers(roi, "size_mm", (3,), float, "roi.") <= 0).any():
            raise RequestError("field 'roi.size_mm' must be positive")


def check_region(values, region: tuple) -> np.ndarray:
    """The block a client sent for ``region`` (k0, k1, r0, r1, c0, c1), as float32; RequestError if its
    shape or values do not fit."""
    k0, k1, r0, r1, c0, c1 = region
    if not isinstance(values, np.ndarray) or values.ndim != 3:
        raise RequestError("the region must be a 3-D array of CT values")
    if values.shape != (k1 - k0, r1 - r0, c1 - c0):
        raise RequestError(f"the region has shape {values.shape}; the job asked for {(k1 - k0, r1 - r0, c1 - c0)}")
    values = values.astype(np.float32, copy=False)
    if not np.isfinite(values).all():
        raise RequestError("the region holds NaN or infinite values")
    return values


class ModelCache:
    """The last loaded model, reused while name, files and device stay the same."""

    def __init__(self):
        self.key, self.model, self.sha256, self.loads = None, None, None, 0

    def get(self, spec: dict):
        from ProbSAMLib.weights.build import load_model
        from ProbSAMLib.weights.checkpoints import weights_sha256

        key = tuple(spec.get(k) or None for k in ("name", "checkpoint", "sam_checkpoint", "device"))
        reused = key == self.key
        if not reused:
            self.key, self.model = None, None  # free the old model before loading the next
            self.model = load_model(key[0], checkpoint=Path(key[1]) if key[1] else None,
                                    sam_checkpoint=Path(key[2]) if key[2] else None, device=key[3] or "auto")
            self.sha256 = weights_sha256(key[0], Path(key[1]) if key[1] else None)
            self.key, self.loads = key, self.loads + 1
        return self.model, {"name": key[0], "sha256": self.sha256, "loads": self.loads, "reused": reused}


class SampleJob:
    """A checked request with its model loaded: ``region`` says which voxels to send, ``run`` samples them.

    ``warning``: a line for the user when the device is a poor fit for the model, else None.
    """

    def __init__(self, request: dict, models: ModelCache):
        from ProbSAMLib.geometry import VolumeGeometry, VoxelBox
        from ProbSAMLib.inference.volume import input_region

        check_sample_request(request)
        self.request = request
        self.model, self.model_info = models.get(request["model"])
        self.warning = device_warning(request["model"]["name"], request["model"].get("device") or "auto",
                                      self.model.device.type, _gpu_gib(self.model.device))
        self.geometry = VolumeGeometry.from_ijk_to_ras(np.asarray(request["ijk_to_ras"], dtype=float),
                                                       [int(n) for n in request["size_ijk"]])
        self.voxel_box = VoxelBox([int(n) for n in request["lo"]], [int(n) for n in request["hi"]])
        self.region = tuple(int(n) for n in input_region(self.model, self.voxel_box, self.geometry.shape,
                                                           self.geometry.spacing[:2]))

    def abandon(self) -> None:
        """The client will not send the block: nothing to free here (RemoteJob drops its server job)."""

    def run(self, values: np.ndarray, progress: Optional[Callable] = None,
            cancel: Optional[Callable] = None) -> dict:
        """The result message's fields (see the module docstring) for the block ``values`` of ``region``."""
        from ProbSAMLib.inference.uncertainty import MAP_NAMES
        from ProbSAMLib.inference.volume import sample_volume
        from ProbSAMLib.io.segfile import distinct_colors, segment_colors

        values = check_region(values, self.region)
        k0, k1, r0, r1, c0, c1 = self.region
        # Zero pages are not committed by the OS: only the block the model reads costs memory.
        volume = np.zeros(self.geometry.shape, dtype=np.float32)
        volume[k0:k1, r0:r1, c0:c1] = values
        result = sample_volume(self.model, volume, self.geometry, self.voxel_box,
                               n_samples=int(self.request["n_samples"]), seed=self.request.get("seed"),
                               cancel=cancel, progress=progress)
        roi_cut = cut_to_roi(result, self.request.get("roi"))
        return dict(masks=result.masks, lo=tuple(self.voxel_box.lo), summary=result.summary,
                    consensus=result.consensus, agreement=result.agreement, marking_share=result.marking_share,
                    informative=result.informative, colors=distinct_colors(len(result.masks)),
                    segment_colors=segment_colors(), roi_cut=roi_cut, model=self.model_info,
                    **{name: getattr(result, name) for name in MAP_NAMES})


def roi_box(roi: dict):
    """A request's ROI ({center_ras, axes_ras, size_mm}, in its ijk_to_ras space) as a Box3D."""
    from ProbSAMLib.geometry import Box3D

    return Box3D.from_center_size(roi["center_ras"], roi["size_mm"], axes=roi["axes_ras"], space="ras")


def roi_inside(box, geometry, voxel_box) -> np.ndarray:
    """(Kb, Jb, Ib) bool: which voxels of ``voxel_box`` have their centre inside ``box`` (a Box3D, possibly
    rotated against the voxel grid)."""
    k, j, i = np.meshgrid(*(np.arange(voxel_box.lo[a], voxel_box.hi[a]) for a in (2, 1, 0)), indexing="ij")
    centres = geometry.index_to_physical(np.stack([i, j, k], axis=-1).astype(np.float64))
    # A face through a voxel centre covers it, as voxel_box_from_physical counts it (0.1 µm of slack).
    return box.contains(centres, tol=1e-4)


def cut_to_roi(result, roi) -> dict:
    """Cut a VolumeSamplingResult (in place, VolumeSamplingResult.restrict_to) to the drawn ROI itself, not
    just the voxel hull that was sampled: ``roi`` is a Box3D (the CLI's and batch's ROI file) or a request's
    ROI dict (Slicer's); None cuts nothing. What was cut, for the user; also in the summary as ``roi_cut``."""
    from ProbSAMLib.geometry import Box3D

    if roi is None or (isinstance(roi, dict) and not roi):
        return {"voxels_outside_roi": 0, "mask_voxels_removed": 0}
    inside = roi_inside(roi if isinstance(roi, Box3D) else roi_box(roi), result.geometry, result.voxel_box)
    outside = int((~inside).sum())
    removed = int((result.masks & ~inside).sum())
    if outside:
        result.restrict_to(inside)
    result.summary["roi_cut"] = {"voxels_outside_roi": outside, "mask_voxels_removed": removed}
    return dict(result.summary["roi_cut"])


def _gpu_gib(device) -> Optional[float]:
    import torch

    return torch.cuda.get_device_properties(device).total_memory / 2 ** 30 if device.type == "cuda" else None


def device_warning(name: str, requested: str, device_type: str, gpu_gib: Optional[float]) -> Optional[str]:
    """A warning when the device is a poor fit: a GPU smaller than the model wants, or SAM on the CPU."""
    from ProbSAMLib.weights.registry import model_entry

    if device_type == "cuda":
        need = model_entry(name).min_gpu_gib
        if gpu_gib is not None and gpu_gib < need:
            return (f"The GPU has {gpu_gib:.1f} GiB; model {name} wants about {need} GiB. If it runs out of "
                    f"memory, choose device 'cpu' or fewer samples.")
    elif device_type == "cpu" and requested == "auto" and name.startswith("vit"):
        return "No usable GPU: SAM models on the CPU take minutes per ROI."
    return None


def error_kind(error: BaseException) -> str:
    """How a client should read a failed job: "cancelled", "out_of_memory", "bad_request" or "error"."""
    from ProbSAMLib.errors import Cancelled, is_gpu_out_of_memory

    if isinstance(error, Cancelled):
        return "cancelled"
    if is_gpu_out_of_memory(error) or "out of GPU memory" in str(error) or isinstance(error, MemoryError):
        return "out_of_memory"
    if isinstance(error, RequestError):
        return "bad_request"
    return "error"


# --- helpers --------------------------------------------------------------------------------------------
def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _numbers(container: dict, key: str, shape: tuple, kind, prefix: str = "") -> np.ndarray:
    try:
        array = np.asarray(container.get(key), dtype=float)
    except (TypeError, ValueError):
        array = None
    if array is None or array.shape != shape or not np.isfinite(array).all():
        raise RequestError(f"field '{prefix}{key}' must be {'x'.join(map(str, shape))} finite numbers")
    if kind is int:
        if (array != np.round(array)).any() or (np.abs(array) > 2 ** 31).any():
            raise RequestError(f"field '{prefix}{key}' must hold whole numbers")
        return array.astype(np.int64)
    return array
