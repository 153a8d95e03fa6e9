"""Sampling a CT volume: one 3D box -> N coherent 3D segmentations and their uncertainty volumes.

The model is 2D: it works on axial slices ``volume[k]`` ((J, I) = rows y, columns x) with the box's
per-slice 2D box (``geometry.slice_boxes_2d``); a model that reads neighbouring slices
(``config.neighbour_slices``) also sees ``volume[k - 1]`` and ``volume[k + 1]``. For every slice of the
voxel box:

1. Context window. A model with ``config.field_of_view == "physical"`` (LiteMedSAM) sees a square window
   of ``max(min_field_mm, FIELD_PER_BOX x the box's longest side)`` millimetres centred on the box (shifted
   to stay inside the slice), as its training data were cropped; "slice" sees the whole slice. Either is
   padded with air on both sides to ``config.min_field_mm`` where the slice is narrower.
   A "crop" model sees a square window centred on the box, of side
   ``max(min_context, longest box side + 2 * CONTEXT_MARGIN_PX)`` pixels, shifted to stay inside the
   slice and cut to the slice where the slice is smaller. ``min_context`` is the crop size the model was
   trained on (``config.context_size``), else its input size ``config.img_size``.
   The window is the same on every slice, since the voxel box is a block of the grid.
2. Encoding in chunks of ``slice_batch`` slices (the encoder runs once per slice). ``None`` chooses the
   chunk from free memory; a CUDA out-of-memory error halves it and retries the chunk.
3. Coherent latents. The prior P(z | slice, box) depends on the slice, so "one z per sample" means one
   standard-normal draw eps_n (N, L) per sample, taken once from the seeded CPU generator and used on
   every slice k as z_kn = mu_k + sigma_k * eps_n: sample n sits at the same place in every slice's
   prior (the same "reader"), and is a coherent 3D segmentation. ``z_mode="per_slice"`` draws a fresh
   eps for every slice instead (slices independent; for comparison). All eps are drawn before any slice
   is processed, and each slice runs through the model on its own, so the result does not depend on
   ``slice_batch`` (nor on free memory): same seed, byte-identical files on one machine.
4. Decoding the N samples of a chunk in one pass; probabilities of the box's pixels are kept, the rest
   of the window is discarded (the box is the prompt: the object is inside it). Masks are
   probability > metrics.MASK_THRESHOLD (0.5). Outputs cover the voxel box only (zeros around it when
   placed on the full grid).

The result holds box-sized arrays, ``(Kb, Jb, Ib)`` / ``(N, Kb, Jb, Ib)``, cut to the voxel box on the
input's grid; ``voxel_box.lo`` is their offset. Nothing outside the box is computed, so nothing outside it
is stored: a 512 x 512 x 300 CT costs what its box costs. ``result.on_full_grid(name)`` (or
``place_on_grid``) puts one of them on the full grid, zeros outside the box, where a file must hold the
whole volume (the CLI's outputs).
"""

from __future__ import annotations

import secrets
import time
from functools import partial
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np
import torch

from ProbSAMLib.errors import Cancelled, SettingsError, is_gpu_out_of_memory, shown  # noqa: F401 (Cancelled: re-exported)
from ProbSAMLib.geometry import VolumeGeometry, VoxelBox, slice_boxes_2d, slices_with_neighbours
from ProbSAMLib.inference.agreement import agreement_masks
from ProbSAMLib.inference.device import autocast, synchronize
from ProbSAMLib.inference.memory import (available_bytes, bytes_per_slice, choose_batch, host_available_bytes,
                                         release_cached_memory)
from ProbSAMLib.inference.sampling import (images_to_unit, make_generator, marking_shares, sample_from_embeddings,
                                           sample_with_boxes)
from ProbSAMLib.inference.summary import volume_summary
from ProbSAMLib.inference.uncertainty import MAP_NAMES, informative_mask, uncertainty_maps
from ProbSAMLib.metrics import MASK_THRESHOLD
from ProbSAMLib.modeling.probsam import ProbSAM

CONTEXT_MARGIN_PX = 16
FIELD_PER_BOX = 2.5  # "physical" field: at least this many times the box's longest side (the 55 mm mass: 150 mm)
Z_MODES = ("per_sample", "per_slice")

ProgressFn = Callable[[float, str], None]
CancelFn = Callable[[], bool]


@dataclass
class VolumeSamplingResult:
    """N sampled masks and the uncertainty volumes, cut to the voxel box of the input volume's grid.

    masks (N, Kb, Jb, Ib) bool; mean_probability, entropy (nats), variance, mutual_information
    (Kb, Jb, Ib) float32; the box's first voxel is ``voxel_box.lo`` (i, j, k) of ``geometry``.
    consensus (Kb, Jb, Ib) bool: voxels in more than half of the samples (``agreement.py``);
    agreement: {"any", "majority", "all"} -> (Kb, Jb, Ib) bool ("majority" is the consensus).
    informative (Kb, Jb, Ib) bool: voxels where the samples do not all agree with confidence (not every
    probability < 0.1, not every one > 0.9; ``uncertainty.informative_mask``): where an overlay shows.
    marking_share: the share of readers expected to mark this lesion at all (0..1), from a model with a
    marking head (``ProbSAM.marking_share``); None for a model without one. It is a separate number, not
    empty samples: every sample is an outline of the boxed object.
    summary: JSON-ready dict (see ``summary.volume_summary``).
    eps (Kb, N, L) and z (Kb, N, L): the standard-normal draws and the latents used on each of the
    box's Kb slices (eps is the same on every slice with z_mode "per_sample").
    """

    masks: np.ndarray
    mean_probability: np.ndarray
    entropy: np.ndarray
    variance: np.ndarray
    mutual_information: np.ndarray
    voxel_box: VoxelBox
    geometry: VolumeGeometry
    summary: dict
    consensus: Optional[np.ndarray] = None
    agreement: dict = field(default_factory=dict)
    informative: Optional[np.ndarray] = None
    marking_share: Optional[float] = None
    eps: Optional[np.ndarray] = field(default=None, repr=False)
    z: Optional[np.ndarray] = field(default=None, repr=False)

    def restrict_to(self, inside: np.ndarray) -> None:
        """Cut the result, in place, to ``inside`` (Kb, Jb, Ib) bool, e.g. a rotated ROI's own box within its
        axis-aligned voxel box: masks off and the four maps 0 outside it; the consensus, the agreement levels,
        the informative mask and the summary follow the cut masks."""
        self.masks = self.masks & inside
        for name in MAP_NAMES:
            setattr(self, name, np.where(inside, getattr(self, name), 0).astype(np.float32))
        self.agreement = agreement_masks(self.masks)
        self.consensus = self.agreement["majority"]
        if self.informative is not None:
            self.informative = self.informative & inside
        timings = self.summary.get("timings_s", {})
        self.summary = dict(volume_summary(self, self.summary["settings"], timings), timings_s=timings)

    def on_full_grid(self, name: str) -> np.ndarray:
        """``masks`` or one of the maps placed on the input's full grid, zeros outside the box."""
        return place_on_grid(getattr(self, name), self.voxel_box, self.geometry.shape)


def place_on_grid(values: np.ndarray, voxel_box: VoxelBox, shape_kji: tuple) -> np.ndarray:
    """Box-sized ``(..., Kb, Jb, Ib)`` values on a ``(..., K, J, I)`` grid of zeros (same dtype)."""
    lead = tuple(values.shape[:-3])
    out = np.zeros(lead + tuple(shape_kji), dtype=values.dtype)
    out[(slice(None),) * len(lead) + voxel_box.slices()] = values
    return out


# --- the context window -------------------------------------------------------------------------------
def min_context_size(model: ProbSAM) -> int:
    """Side in pixels of the smallest window the model should see: the crop size it was trained on
    (``config.context_size``), else its input size ``config.img_size``."""
    return int(model.config.context_size or model.config.img_size)


def context_window(box2d, image_hw, min_side: int, margin: int = CONTEXT_MARGIN_PX) -> tuple:
    """The (r0, r1, c0, c1) window (end exclusive) around a 2D box (x1, y1, x2, y2) on an (H, W) slice."""
    x1, y1, x2, y2 = box2d
    side = max(int(min_side), int(max(x2 - x1, y2 - y1)) + 2 * margin)
    window = []
    for lo, hi, size in ((y1, y2, image_hw[0]), (x1, x2, image_hw[1])):
        extent = min(side, size)
        start = int(round((lo + hi) / 2 - extent / 2))
        start = min(max(start, 0), size - extent)
        window += [start, start + extent]
    return tuple(window)


def input_region(model: ProbSAM, voxel_box: VoxelBox, shape_kji: tuple, spacing_ij=None) -> tuple:
    """(k0, k1, r0, r1, c0, c1), ends exclusive: the only voxels ``sample_volume`` reads for this box.

    The box's slices (and the one below and above, inside the volume, for a model that reads neighbouring
    slices) times the context window. spacing_ij: the voxel spacing (i, j) in mm, needed by a model whose
    field of view is in millimetres. A caller that holds the volume elsewhere
    (the Slicer module's worker process) sends just this block; the rest of the volume can be anything.
    """
    x1, y1, x2, y2 = slice_boxes_2d(voxel_box)[0][1]
    if model.config.field_of_view == "slice":
        r0, r1, c0, c1 = 0, int(shape_kji[1]), 0, int(shape_kji[2])
    elif model.config.field_of_view == "physical":
        if spacing_ij is None:
            raise ValueError("a model with a field of view in millimetres needs the voxel spacing (spacing_ij)")
        step = float(min(spacing_ij[0], spacing_ij[1]))
        side_mm = max(model.config.min_field_mm, FIELD_PER_BOX * max(x2 - x1, y2 - y1) * step)
        r0, r1, c0, c1 = context_window((x1, y1, x2, y2), tuple(shape_kji)[1:], int(np.ceil(side_mm / step)))
    else:
        r0, r1, c0, c1 = context_window((x1, y1, x2, y2), tuple(shape_kji)[1:], min_context_size(model))
    reach = 1 if model.config.neighbour_slices else 0
    k0, k1 = max(voxel_box.lo[2] - reach, 0), min(voxel_box.hi[2] + reach, int(shape_kji[0]))
    return k0, k1, r0, r1, c0, c1


def air_value(model: ProbSAM) -> float:
    """What the model reads as air: the bottom of its CT window in HU (0 for a model fed [0, 1] images)."""
    window = model.config.window
    return 0.0 if window is None else float(window[0] - window[1] / 2.0) - 1.0


def pad_to_field(region: np.ndarray, spacing_rc, min_field_mm: float, fill: float):
    """The region (..., h, w) padded with ``fill`` on both sides of each axis to at least ``min_field_mm``
    (rows at spacing_rc[0] mm, columns at spacing_rc[1]), and the (rows, cols) added before it."""
    need = [int(np.ceil(min_field_mm / float(step) - 1e-6)) for step in spacing_rc]
    extra = [max(0, n - size) for n, size in zip(need, region.shape[-2:])]
    before = (extra[0] // 2, extra[1] // 2)
    if not any(extra):
        return region, before
    pad = [(0, 0)] * (region.ndim - 2) + [(before[0], extra[0] - before[0]), (before[1], extra[1] - before[1])]
    return np.pad(region, pad, constant_values=fill), before


def model_slices(region: np.ndarray, first: int, n_slices: int, reads_neighbours: bool) -> np.ndarray:
    """What the model reads for the box's slices: (Kb, h, w), or (Kb, 3, h, w) slices k - 1, k, k + 1 for
    a model that reads neighbours (the slice itself where the volume ends).

    region: (Kr, h, w) the input region's slices (``input_region``); first: the box's first slice in it.
    """
    if not reads_neighbours:
        return region[first:first + n_slices]
    return slices_with_neighbours(region, np.arange(first, first + n_slices))


# --- memory ---------------------------------------------------------------------------------------------
def estimate_bytes(model: ProbSAM, n_samples: int, voxel_box: VoxelBox) -> dict:
    """Peak memory of one run: ``device`` for one slice in the model, ``host`` for the kept results."""
    width, height, depth = voxel_box.size
    box_voxels = width * height * depth
    # probabilities (float32) + masks (bool) of every sample in the box, the four maps, the saved copies
    host = n_samples * box_voxels * (4 + 1 + 1) + 4 * 4 * box_voxels
    device = bytes_per_slice(model, n_samples, half=model.device.type == "cuda")
    return {"host": int(host), "device": int(device)}


def check_fits(model: ProbSAM, n_samples: int, voxel_box: VoxelBox) -> None:
    """Refuse, before any work, a run whose estimate exceeds the memory available (says what to change)."""
    need = estimate_bytes(model, n_samples, voxel_box)
    host_free = host_available_bytes()
    on_host = need["host"] + (need["device"] if model.device.type == "cpu" else 0)
    problems = []
    if on_host > host_free:
        problems.append(f"about {on_host / 2**30:.1f} GiB of memory, {host_free / 2**30:.1f} GiB available")
    if model.device.type == "cuda" and need["device"] > available_bytes(model.device):
        problems.append(f"about {need['device'] / 2**30:.1f} GiB of GPU memory for one slice, "
                        f"{available_bytes(model.device) / 2**30:.1f} GiB free")
    if problems:
        per_sample = max(1, on_host // max(1, n_samples))
        fitting = max(0, int(host_free // per_sample) - 1)
        raise SettingsError(f"{shown(n_samples)} samples on a box of {voxel_box.size[0]} x {voxel_box.size[1]} x "
                            f"{voxel_box.size[2]} voxels need {' and '.join(problems)}; use fewer samples "
                            f"(about {fitting} fit) or a smaller box")


# --- sampling -------------------------------------------------------------------------------------------
def _draw_noise(generator: torch.Generator, n_slices: int, n_samples: int, latent_dim: int,
                z_mode: str) -> torch.Tensor:
    """(Kb, N, L) standard-normal eps on the CPU: one draw per sample, or one per slice and sample."""
    if z_mode == "per_sample":
        eps = torch.randn((n_samples, latent_dim), generator=generator)
        return eps.unsqueeze(0).expand(n_slices, -1, -1).contiguous()
    return torch.randn((n_slices, n_samples, latent_dim), generator=generator)


def _sample_chunk(model: ProbSAM, images_hu: np.ndarray, box_in_window, eps: torch.Tensor, timings: dict,
                  cancel: Optional[CancelFn] = None):
    """Probabilities (B, N, h, w) of the window, z (B, N, L) and the marking shares (B,) (None without a
    marking head) for B slices' windows (B, h, w) in HU (or (B, 3, h, w) with the slices below and above,
    ``model_slices``).

    Every slice goes through the model on its own: batched matrix products round differently for different
    batch sizes (last-bit differences), so grouping slices would make the files depend on the slice
    batch (and so on free memory). One slice at a time, the same seed gives byte-identical files, and a
    cancel is honoured between slices, not only between chunks.
    """
    parts = []
    for b in range(len(images_hu)):
        if cancel is not None and cancel():
            raise Cancelled("sampling was cancelled")
        parts.append(_sample_slices(model, images_hu[b:b + 1], box_in_window, eps[b:b + 1], timings))
    shares = None if parts[0][2] is None else torch.cat([part[2] for part in parts])
    return torch.cat([part[0] for part in parts]), torch.cat([part[1] for part in parts]), shares


@torch.no_grad()
def _sample_slices(model: ProbSAM, images_hu: np.ndarray, box_in_window, eps: torch.Tensor, timings: dict,
                   sample_boxes: Optional[torch.Tensor] = None):
    """Probabilities (B, N, h, w) of the window and z (B, N, L) for B slices' windows (B, h, w) in HU
    (or (B, 3, h, w) with the slices below and above). sample_boxes (N, 4): one box per sample in window
    pixels (box propagation; B = 1), NaN rows for samples whose outline has ended; None: the ROI's box."""
    device = model.device
    start = time.perf_counter()
    images01 = images_to_unit(model, np.array(images_hu, dtype=np.float32))  # a writable copy for torch
    with autocast(device):
        embeddings = model.encode(images01.to(device)).float()
    synchronize(device)
    timings["encode_s"] += time.perf_counter() - start

    start = time.perf_counter()
    image_hw = tuple(images01.shape[-2:])
    boxes = torch.tensor([box_in_window], dtype=torch.float32, device=device).expand(len(images_hu), 4)
    if sample_boxes is None:
        probs, z = sample_from_embeddings(model, embeddings, boxes, image_hw, eps.shape[1], noise=eps,
                                          images01=images01, crop_to_box=True)  # only the box is kept
    else:
        probs, z = sample_with_boxes(model, embeddings, boxes, sample_boxes, image_hw, eps, images01)
    shares = marking_shares(model, embeddings, boxes, image_hw)
    synchronize(device)
    timings["decode_s"] += time.perf_counter() - start
    return probs, z, shares


def _run_outputs(model: ProbSAM, crop, eps: torch.Tensor):
    """What a run fills slice by slice: probabilities (N, Kb, Jb, Ib) of the box, z (Kb, N, L), the marking
    shares (Kb,) (None without a marking head), and the timings."""
    n_slices, n_samples = eps.shape[:2]
    rows, cols = crop
    probs_box = np.zeros((n_samples, n_slices, rows.stop - rows.start, cols.stop - cols.start), np.float32)
    shares = np.zeros(n_slices, dtype=np.float32) if model.marking is not None else None
    return probs_box, np.zeros(tuple(eps.shape), dtype=np.float32), shares, {"encode_s": 0.0, "decode_s": 0.0}


def _run_chunks(model: ProbSAM, region: np.ndarray, box_in_window, crop, eps: torch.Tensor, batch: int,
                progress: ProgressFn, cancel: Optional[CancelFn]):
    """All slices of ``region`` (Kb, h, w), ``batch`` at a time; the box part of every probability map.

    Returns probabilities (N, Kb, Jb, Ib), z (Kb, N, L), the marking shares (Kb,) or None, the final
    batch, the OOM retries and timings.
    """
    n_slices = eps.shape[0]
    rows, cols = crop
    probs_box, z_used, shares, timings = _run_outputs(model, crop, eps)
    oom_retries, done = 0, 0
    while done < n_slices:
        if cancel is not None and cancel():
            raise Cancelled("sampling was cancelled")
        stop = min(done + batch, n_slices)
        try:
            probs, z, chunk_shares = _sample_chunk(model, region[done:stop], box_in_window, eps[done:stop],
                                                   timings, cancel)
        except Exception as error:  # out of GPU memory: halve the chunk and retry it
            if not is_gpu_out_of_memory(error):
                raise
            release_cached_memory()
            if batch == 1:
                raise RuntimeError("out of GPU memory with a single slice per batch; use a smaller model or "
                                   "--device cpu") from error
            batch, oom_retries = max(1, batch // 2), oom_retries + 1
            continue
        probs_box[:, done:stop] = probs[:, :, rows, cols].transpose(0, 1).float().cpu().numpy()
        z_used[done:stop] = z.float().cpu().numpy()
        if shares is not None:
            shares[done:stop] = chunk_shares.numpy()
        done = stop
        progress(0.9 * done / n_slices, f"slices {done}/{n_slices}")
    if cancel is not None and cancel():
        raise Cancelled("sampling was cancelled")
    return probs_box, z_used, shares, batch, oom_retries, timings


# --- box propagation -------------------------------------------------------------------------------------
BOX_MODES = ("fixed", "propagate")
# For LiteMedSAM (its field in mm): propagation, LiteMedSAM's own 3D recipe. On 10 chest-field phantom nodules
# (research/results/box_propagation.md) it raised the consensus's Dice with the readers' majority by +0.032
# [-0.002, +0.078] over all slices and +0.031 [-0.004, +0.095] on the end slices, never lowering a nodule by
# more than 0.011: better on average, not significantly. The fixed box stays one option away (--box-mode).
DEFAULT_BOX_MODE = "propagate"
PROPAGATION_MARGIN_PX = 3  # in the model's 256-pixel frame: LiteMedSAM's own 3D recipe widens by 3


def default_box_mode(model: ProbSAM) -> str:
    """The box mode sample_volume uses unless told: see docs/EVALUATION.md for the measurement behind it."""
    return DEFAULT_BOX_MODE if model.config.field_of_view != "crop" else "fixed"


def propagated_boxes(masks: np.ndarray, roi_box, margin: float) -> np.ndarray:
    """(N, h, w) each sample's mask on the previous slice -> (N, 4) its box for the next slice: the mask's
    bounding box widened by ``margin`` pixels and cut to the ROI's box (x1, y1, x2, y2); NaN for an empty
    mask (that sample's outline has ended: it stays empty further out)."""
    boxes = np.full((len(masks), 4), np.nan, dtype=np.float32)
    x1, y1, x2, y2 = roi_box
    for n, mask in enumerate(masks):
        rows, cols = np.nonzero(mask.any(axis=1))[0], np.nonzero(mask.any(axis=0))[0]
        if not len(rows):
            continue
        box = (max(x1, cols[0] - margin), max(y1, rows[0] - margin),
               min(x2, cols[-1] + 1 + margin), min(y2, rows[-1] + 1 + margin))
        if box[2] - box[0] >= 1 and box[3] - box[1] >= 1:
            boxes[n] = box
    return boxes


def propagation_order(n_slices: int) -> list:
    """(slice, previous slice or None) from the middle slice outwards: up to the last, then down to the first."""
    middle = n_slices // 2
    return ([(middle, None)] + [(k, k - 1) for k in range(middle + 1, n_slices)]
            + [(k, k + 1) for k in range(middle - 1, -1, -1)])


def _run_propagated(model: ProbSAM, region: np.ndarray, box_in_window, crop, eps: torch.Tensor,
                    progress: ProgressFn, cancel: Optional[CancelFn]):
    """As _run_chunks, with each sample's box on a slice taken from its own mask on the slice before it (from
    the middle slice outwards, inside the ROI), LiteMedSAM's 3D recipe: the ROI's rectangle stays on the
    lesion where the lesion narrows at its ends. Every slice on its own, so the files do not depend on memory."""
    n_slices = eps.shape[0]
    rows, cols = crop
    probs_box, z_used, shares, timings = _run_outputs(model, crop, eps)
    margin = PROPAGATION_MARGIN_PX * max(region.shape[-2:]) / model.config.img_size
    roi_in_box = (0, 0, cols.stop - cols.start, rows.stop - rows.start)  # the ROI's box in box pixels
    to_window = np.array([cols.start, rows.start, cols.start, rows.start], dtype=np.float32)
    for done, (k, previous) in enumerate(propagation_order(n_slices), start=1):
        if cancel is not None and cancel():
            raise Cancelled("sampling was cancelled")
        boxes = None
        if previous is not None:  # the masks outside the ROI's box are not kept, and cannot widen it anyway
            boxes = torch.from_numpy(propagated_boxes(probs_box[:, previous] > MASK_THRESHOLD, roi_in_box,
                                                      margin) + to_window)
        probs, z, slice_shares = _sample_slices(model, region[k:k + 1], box_in_window, eps[k:k + 1], timings, boxes)
        probs_box[:, k] = probs[0][:, rows, cols].float().cpu().numpy()
        z_used[k] = z[0].float().cpu().numpy()
        if shares is not None:
            shares[k] = float(slice_shares[0])
        progress(0.9 * done / n_slices, f"slices {done}/{n_slices}")
    if cancel is not None and cancel():
        raise Cancelled("sampling was cancelled")
    return probs_box, z_used, shares, 1, 0, timings


def _check_inputs(volume_hu, geometry: VolumeGeometry, voxel_box: VoxelBox, n_samples: int, z_mode: str):
    volume = np.asarray(volume_hu)
    if volume.ndim != 3:
        raise ValueError(f"the volume must be a 3D array (K, J, I), got shape {volume.shape}")
    if volume.shape != geometry.shape:
        raise ValueError(f"volume shape {volume.shape} does not match the geometry (K, J, I) {geometry.shape}")
    if n_samples < 1:
        raise ValueError(f"n_samples must be >= 1, got {n_samples}")
    if z_mode not in Z_MODES:
        raise ValueError(f"z_mode must be one of {Z_MODES}, got {z_mode!r}")
    if any(h > s for h, s in zip(voxel_box.hi, geometry.size)):
        raise ValueError(f"voxel box {voxel_box.lo}..{voxel_box.hi} reaches past the volume {geometry.size}")
    width, height, _ = voxel_box.size
    if width < 2 or height < 2:
        raise ValueError(f"the box is only {width} x {height} voxels in the slice plane; draw it around the "
                         f"whole object (at least 2 x 2 voxels)")
    return volume


def sample_volume(model: ProbSAM, volume_hu, geometry: VolumeGeometry, voxel_box: VoxelBox,
                  n_samples: int = 16, seed: Optional[int] = None, z_mode: str = "per_sample",
                  slice_batch: Optional[int] = None, progress: Optional[ProgressFn] = None,
                  cancel: Optional[CancelFn] = None, box_mode: Optional[str] = None) -> VolumeSamplingResult:
    """N coherent 3D samples of the object in ``voxel_box`` and the uncertainty volumes.

    Arguments:
      model: a ProbSAM in eval mode on its device (``build.load_model``).
      volume_hu: (K, J, I) CT in HU (or [0, 1] when ``model.config.window`` is None).
      geometry: the volume's grid; voxel_box: the box (``geometry.voxel_box_from_*``).
      seed: None draws a seed, which the summary records, so every run can be repeated.
      z_mode: "per_sample" (one draw per sample, used on every slice) or "per_slice".
      slice_batch: slices per encoder chunk; None = chosen from free memory.
      progress: ``progress(fraction, message)``; cancel: ``cancel() -> bool``, checked between chunks.
      box_mode: "fixed" (the ROI's rectangle on every slice) or "propagate" (from the middle slice outwards,
        each sample's box from its own mask on the slice before, inside the ROI); None = the model's
        default (``default_box_mode``).
    """
    started = time.perf_counter()
    volume = _check_inputs(volume_hu, geometry, voxel_box, n_samples, z_mode)
    check_fits(model, n_samples, voxel_box)
    model.eval()
    report_progress = progress or (lambda fraction, message: None)
    seed_given = seed is not None
    seed = int(seed) if seed_given else secrets.randbits(63)

    slices = slice_boxes_2d(voxel_box)
    x1, y1, x2, y2 = slices[0][1]
    k0, k1, r0, r1, c0, c1 = input_region(model, voxel_box, volume.shape, geometry.spacing[:2])
    region = volume[k0:k1, r0:r1, c0:c1]
    if not np.isfinite(region).all():
        raise ValueError(f"the volume holds {int(region.size - np.isfinite(region).sum())} NaN or infinite "
                         f"values around the box; fix or mask them before segmenting")
    n_slices = len(slices)
    region = model_slices(region, voxel_box.lo[2] - k0, n_slices, model.config.neighbour_slices)
    if model.config.field_of_view in ("slice", "physical") and model.config.min_field_mm > 0:
        region, (pad_r, pad_c) = pad_to_field(region, geometry.spacing[[1, 0]], model.config.min_field_mm,
                                              air_value(model))
        r0, c0 = r0 - pad_r, c0 - pad_c  # the window's origin in slice pixels (before the slice's edge)
    box_in_window = (x1 - c0, y1 - r0, x2 - c0, y2 - r0)
    eps = _draw_noise(make_generator(seed), n_slices, n_samples, model.config.latent_dim, z_mode)
    batch = int(slice_batch) if slice_batch else choose_batch(model, n_samples, n_slices)
    if batch < 1:
        raise ValueError(f"slice_batch must be >= 1, got {slice_batch}")
    report_progress(0.0, f"sampling {n_samples} masks on {n_slices} slices")
    crop = (slice(y1 - r0, y2 - r0), slice(x1 - c0, x2 - c0))
    box_mode = box_mode or default_box_mode(model)
    if box_mode not in BOX_MODES:
        raise ValueError(f"box_mode must be one of {BOX_MODES}, got {box_mode!r}")
    run = _run_propagated if box_mode == "propagate" else partial(_run_chunks, batch=batch)
    probs_box, z_used, slice_shares, batch, oom_retries, timings = run(
        model, region, box_in_window, crop, eps, progress=report_progress, cancel=cancel)

    report_progress(0.9, "uncertainty maps and summary")
    result = _assemble(probs_box, geometry, voxel_box)
    result.marking_share = lesion_marking_share(slice_shares, result.consensus)
    result.eps, result.z = eps.numpy().astype(np.float32), z_used
    settings = {"n_samples": n_samples, "seed": seed, "seed_given": seed_given, "z_mode": z_mode,
                "threshold": MASK_THRESHOLD, "slice_batch": batch, "box_mode": box_mode, "oom_retries": oom_retries,
                "device": str(model.device), "context_window_rc": [r0, r0 + region.shape[-2], c0, c0 + region.shape[-1]],
                "encoder": model.config.encoder, "latent_dim": model.config.latent_dim,
                "neighbour_slices": model.config.neighbour_slices,
                "field_of_view": model.config.field_of_view, "min_field_mm": model.config.min_field_mm}
    result.summary = volume_summary(result, settings, timings)
    timings["total_s"] = time.perf_counter() - started
    result.summary["timings_s"] = {key: round(value, 4) for key, value in timings.items()}
    report_progress(1.0, "done")
    return result


def lesion_marking_share(slice_shares: Optional[np.ndarray], consensus: np.ndarray) -> Optional[float]:
    """One share per lesion from the per-slice predictions (Kb,): their mean over the slices the consensus
    covers (the lesion's own slices; a box's empty end slices say little about the lesion), over every
    slice of the box when the consensus is empty. None without a marking head."""
    if slice_shares is None:
        return None
    on = consensus.any(axis=(1, 2))
    return float(slice_shares[on].mean() if on.any() else slice_shares.mean())


def _assemble(probs_box: np.ndarray, geometry: VolumeGeometry, voxel_box: VoxelBox) -> VolumeSamplingResult:
    """Masks and uncertainty maps of the box (box-sized; ``voxel_box.lo`` is their offset)."""
    maps = uncertainty_maps(probs_box)
    masks = probs_box > MASK_THRESHOLD
    agreement = agreement_masks(masks)
    return VolumeSamplingResult(
        masks=masks, consensus=agreement["majority"], agreement=agreement, informative=informative_mask(probs_box),
        mean_probability=maps.mean_probability.astype(np.float32, copy=False),
        entropy=maps.entropy.astype(np.float32, copy=False),
        variance=maps.variance.astype(np.float32, copy=False),
        mutual_information=maps.mutual_information.astype(np.float32, copy=False),
        voxel_box=voxel_box, geometry=geometry, summary={})
