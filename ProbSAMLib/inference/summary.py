"""What a volume sampling run found: per-sample sizes, the spread across samples, and the run's summary.

Per sample: volume in mm³ (voxel count x the voxel volume |det(direction · diag(spacing))|, right on a
sheared grid too) and the longest axial diameter in mm — the longest in-plane distance between two points
of the mask on any one slice, measured edge to edge (the outer corners of the boundary voxels, mapped
through the full direction matrix, so also right in a sheared slice's own plane), the way a reader
measures a nodule on an axial image.
Across samples: mean ± sd (sd with ddof = 1), pairwise Dice over distinct pairs, and the sample
diversity E[d(S, S')] = mean 1 − IoU over distinct pairs (the sample term of GED; metrics.py).
The summary is JSON-ready; ProbSAMLib.app.report writes it (summary.json) with the volumes.
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np
from scipy import ndimage
from scipy.spatial import ConvexHull, QhullError
from scipy.spatial.distance import pdist

from ProbSAMLib import metrics
from ProbSAMLib.geometry import VolumeGeometry, VoxelBox

DISCLAIMER = ("Research software, not for clinical use. Samples show the model's uncertainty, not a "
              "diagnosis; no model here is validated for diagnosis or treatment.")


# --- sizes ----------------------------------------------------------------------------------------------
def _slice_diameter(mask2d: np.ndarray, k: int, offset_ij, geometry: VolumeGeometry) -> float:
    """Longest distance (mm) between the outer corners of a 2D mask's boundary pixels on slice k."""
    boundary = mask2d & ~ndimage.binary_erosion(mask2d)
    jj, ii = np.nonzero(boundary)
    corners = np.array([(-0.5, -0.5), (-0.5, 0.5), (0.5, -0.5), (0.5, 0.5)])
    points = np.stack([ii + offset_ij[0], jj + offset_ij[1]], axis=1)[:, None, :] + corners[None]
    points = points.reshape(-1, 2)  # shared corners repeat; harmless for the hull and the max
    if len(points) > 16:
        # The hull of the index-space points maps to the hull of the physical ones (affine map).
        try:
            points = points[ConvexHull(points).vertices]
        except QhullError:  # collinear points: keep them all
            pass
    physical = geometry.index_to_physical(np.column_stack([points, np.full(len(points), float(k))]))
    return float(pdist(physical).max())


def longest_axial_diameter_mm(mask: np.ndarray, geometry: VolumeGeometry, lo=(0, 0, 0)) -> float:
    """Max over slices of the in-plane diameter (mm) of a (K, J, I) mask whose voxel (0,0,0) is ``lo``."""
    best = 0.0
    for k in np.flatnonzero(mask.any(axis=(1, 2))):
        best = max(best, _slice_diameter(mask[k], int(k) + lo[2], lo[:2], geometry))
    return best


def _stats(values) -> dict:
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0:
        return {"mean": None, "sd": None, "min": None, "max": None}
    return {"mean": float(values.mean()), "sd": float(values.std(ddof=1)) if values.size > 1 else 0.0,
            "min": float(values.min()), "max": float(values.max())}


def _finite_or_none(value: float) -> Optional[float]:
    return float(value) if value is not None and math.isfinite(value) else None


# --- the summary ----------------------------------------------------------------------------------------
def box_description(voxel_box: VoxelBox, geometry: VolumeGeometry) -> dict:
    """The voxel box in indices (inclusive) and its physical bounds (outer voxel edges) in LPS and RAS."""
    lo, hi = np.array(voxel_box.lo), np.array(voxel_box.hi)
    edges = np.array([[x, y, z] for z in (lo[2], hi[2]) for y in (lo[1], hi[1]) for x in (lo[0], hi[0])])
    corners = geometry.index_to_physical(edges - 0.5)
    ras = corners * np.array([-1.0, -1.0, 1.0])
    return {"ijk_first": lo.tolist(), "ijk_last": (hi - 1).tolist(), "size_ijk": list(voxel_box.size),
            "lps_bounds_mm": [corners.min(0).tolist(), corners.max(0).tolist()],
            "ras_bounds_mm": [ras.min(0).tolist(), ras.max(0).tolist()],
            "clamped": bool(voxel_box.clamped), "warning": voxel_box.warning}


def geometry_description(geometry: VolumeGeometry) -> dict:
    description = {"size_ijk": list(geometry.size), "origin_lps": geometry.origin.tolist(),
                   "spacing": geometry.spacing.tolist(), "direction": geometry.direction.ravel().tolist(),
                   "voxel_volume_mm3": geometry.voxel_volume_mm3}
    note = geometry.shear_note()
    if note:
        description["warning"] = note
    return description


def _per_sample(masks: np.ndarray, geometry: VolumeGeometry, box: VoxelBox, noise) -> list:
    """One dict per sample of box-cropped masks (N, Kb, Jb, Ib): voxels, volume, diameter, draw."""
    voxel_mm3 = geometry.voxel_volume_mm3
    names = segment_names(len(masks))
    samples = []
    for n, mask in enumerate(masks):
        entry = {"index": n, "name": names[n], "voxels": int(mask.sum()),
                 "volume_mm3": float(mask.sum() * voxel_mm3),
                 "longest_axial_diameter_mm": longest_axial_diameter_mm(mask, geometry, box.lo),
                 "slices_with_mask": int(mask.any(axis=(1, 2)).sum())}
        if noise is not None:
            entry["latent_noise"] = [float(v) for v in noise[n]]
        samples.append(entry)
    return samples


def _spread(masks: np.ndarray, samples: list, voxel_mm3: float) -> dict:
    """Across samples: mean ± sd of the sizes, pairwise Dice, diversity, and union / core volumes."""
    on = masks.sum(0)
    n = len(masks)
    spread = {"volume_mm3": _stats([s["volume_mm3"] for s in samples]),
              "longest_axial_diameter_mm": _stats([s["longest_axial_diameter_mm"] for s in samples]),
              "empty_samples": sum(s["voxels"] == 0 for s in samples),
              "union_volume_mm3": float((on > 0).sum() * voxel_mm3),
              "intersection_volume_mm3": float((on == n).sum() * voxel_mm3),
              "disagreement_volume_mm3": float(((on > 0) & (on < n)).sum() * voxel_mm3),
              "pairwise_dice": _stats([]), "sample_diversity": None}
    if n > 1:
        spread["pairwise_dice"] = _stats(metrics.pairwise_dice(masks, masks)[~np.eye(n, dtype=bool)])
        spread["sample_diversity"] = _finite_or_none(metrics.sample_diversity(masks))
    return spread


def volume_summary(result, settings: dict, timings: dict) -> dict:
    """The JSON-ready summary of a VolumeSamplingResult (its arrays are the box's)."""
    geometry, box = result.geometry, result.voxel_box
    masks = result.masks
    noise = result.eps[0] if result.eps is not None and settings.get("z_mode") == "per_sample" else None
    samples = _per_sample(masks, geometry, box, noise)
    entropy = result.entropy
    uncertainty = {"mean_entropy_in_box_nats": float(entropy.mean()), "max_entropy_nats": float(entropy.max()),
                   "mean_mutual_information_in_box_nats": float(result.mutual_information.mean())}
    spread = _spread(masks, samples, geometry.voxel_volume_mm3)
    if result.consensus is not None:
        spread["consensus_volume_mm3"] = float(result.consensus.sum() * geometry.voxel_volume_mm3)
    share = result.marking_share
    return {"disclaimer": DISCLAIMER, "settings": settings, "box": box_description(box, geometry),
            "geometry": geometry_description(geometry), "samples": samples, "spread": spread,
            "marking_share": None if share is None else round(float(share), 4),
            "uncertainty": uncertainty, "timings_s": dict(timings),
            "notes": {"diameter": "longest in-plane distance on one slice, outer voxel edges, mm",
                      "sample_diversity": "mean 1 - IoU over distinct sample pairs (GED's sample term)",
                      "marking_share": "the share of readers expected to mark the boxed lesion at all (the "
                                       "model's marking head; null for a model without one)",
                      "consensus": "voxels in more than half of the samples",
                      "sd": "sample standard deviation (ddof = 1)",
                      "latent_noise": "the standard-normal draw of each sample, used on every slice"}}


def segment_names(count: int) -> list:
    """"Sample 01", "Sample 02", ...: each sample's name in the summary and in samples.seg.nrrd."""
    width = max(2, len(str(count)))
    return [f"Sample {n + 1:0{width}d}" for n in range(count)]
