"""What a volume sampling run reports: per-sample sizes, the spread across samples, and the output folder.

Per sample: volume in mm³ (voxel count x voxel volume) and the longest axial diameter in mm — the
longest in-plane distance between two points of the mask on any one slice, measured edge to edge (the
outer corners of the boundary voxels), the way a reader measures a nodule on an axial image.
Across samples: mean ± sd (sd with ddof = 1), pairwise Dice over distinct pairs, and the sample
diversity E[d(S, S')] = mean 1 − IoU over distinct pairs (the sample term of GED; metrics.py).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
from scipy import ndimage
from scipy.spatial import ConvexHull, QhullError
from scipy.spatial.distance import pdist

from ProbSAMLib.io import imageio, segfile
from ProbSAMLib import metrics
from ProbSAMLib.geometry import VolumeGeometry, VoxelBox

DISCLAIMER = ("Research software, not for clinical use. Samples show the model's uncertainty, not a "
              "diagnosis; no model here is validated for diagnosis or treatment.")
MAP_NAMES = ("mean_probability", "entropy", "variance", "mutual_information")


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
    return {"size_ijk": list(geometry.size), "origin_lps": geometry.origin.tolist(),
            "spacing": geometry.spacing.tolist(), "direction": geometry.direction.ravel().tolist()}


def _per_sample(masks: np.ndarray, geometry: VolumeGeometry, box: VoxelBox, noise) -> list:
    """One dict per sample of box-cropped masks (N, Kb, Jb, Ib): voxels, volume, diameter, draw."""
    voxel_mm3 = float(np.prod(geometry.spacing))
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
    return {"disclaimer": DISCLAIMER, "settings": settings, "box": box_description(box, geometry),
            "geometry": geometry_description(geometry), "samples": samples,
            "spread": _spread(masks, samples, float(np.prod(geometry.spacing))),
            "uncertainty": uncertainty, "timings_s": dict(timings),
            "notes": {"diameter": "longest in-plane distance on one slice, outer voxel edges, mm",
                      "sample_diversity": "mean 1 - IoU over distinct sample pairs (GED's sample term)",
                      "sd": "sample standard deviation (ddof = 1)",
                      "latent_noise": "the standard-normal draw of each sample, used on every slice"}}


# --- the output folder ----------------------------------------------------------------------------------
def segment_names(count: int) -> list:
    width = max(2, len(str(count)))
    return [f"Sample {n + 1:0{width}d}" for n in range(count)]


def write_outputs(result, directory, split: bool = False, extra_summary: Optional[dict] = None,
                  tags: Optional[Sequence[dict]] = None, other_files: Sequence[str] = ()) -> list:
    """Write a VolumeSamplingResult into ``directory`` (use imageio.AtomicOutputDir); returns the paths.

    samples.seg.nrrd (N overlapping segments), the four uncertainty volumes, summary.json, and with
    ``split`` also sample_00.nrrd, sample_01.nrrd, ... All on the input's full grid (the result's
    box-sized arrays are placed there). ``other_files``: names the caller writes into the folder too,
    listed in the summary's "files".
    """
    directory = Path(directory)
    count = len(result.masks)
    masks = result.on_full_grid("masks")
    paths = [segfile.write_segmentation(masks, result.geometry, directory / "samples.seg.nrrd",
                                        names=segment_names(count), tags=tags)]
    if split:
        paths += imageio.write_sample_files(masks, result.geometry, directory)
    del masks
    for name in MAP_NAMES:
        paths.append(imageio.write_image(result.on_full_grid(name), result.geometry, directory / f"{name}.nrrd",
                                         np.float32))
    summary = dict(result.summary, **(extra_summary or {}))
    summary["files"] = sorted([p.name for p in paths] + list(other_files) + ["summary.json"])
    paths.append(write_json(summary, directory / "summary.json"))
    return paths


def write_json(data: dict, path) -> Path:
    path = Path(path)
    path.write_text(json.dumps(data, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    return path


# --- the PNG montage ------------------------------------------------------------------------------------
# A perceptually ordered dark-to-bright map (anchors of matplotlib's "inferno"), for entropy.
_INFERNO = np.array([[0, 0, 4], [40, 11, 84], [101, 21, 110], [159, 42, 99], [212, 72, 66],
                     [245, 125, 21], [250, 193, 39], [252, 255, 164]], dtype=np.float64)


def colormap(values01: np.ndarray) -> np.ndarray:
    """(H, W) values in [0, 1] -> (H, W, 3) uint8 RGB on the inferno-like map."""
    x = np.clip(values01, 0.0, 1.0) * (len(_INFERNO) - 1)
    lo = np.floor(x).astype(int).clip(0, len(_INFERNO) - 2)
    t = (x - lo)[..., None]
    return ((1 - t) * _INFERNO[lo] + t * _INFERNO[lo + 1]).round().astype(np.uint8)


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: one fixed-size bitmap font
        return ImageFont.load_default()


def _montage_slices(masks_box: np.ndarray, k0: int, count: int) -> list:
    """Up to ``count`` slice indices spread over the box's slices that hold any sample (else all)."""
    hit = np.flatnonzero(masks_box.any(axis=(0, 2, 3)))
    candidates = hit if hit.size else np.arange(masks_box.shape[1])
    picks = np.unique(np.round(np.linspace(0, len(candidates) - 1, min(count, len(candidates)))).astype(int))
    return [int(candidates[p]) + k0 for p in picks]


def _view_window(voxel_box: VoxelBox, shape_kji) -> tuple:
    """In-plane (rows, cols) slices: the box plus a margin of half its size (at least 6 voxels)."""
    out = []
    for axis, size in ((1, shape_kji[1]), (0, shape_kji[2])):
        lo, hi = voxel_box.lo[axis], voxel_box.hi[axis]
        margin = max(6, (hi - lo) // 2)
        out.append(slice(max(0, lo - margin), min(size, hi + margin)))
    return tuple(out)


def _in_view(values_box: np.ndarray, voxel_box: VoxelBox, k: int, rows: slice, cols: slice) -> np.ndarray:
    """Slice ``k`` of box-sized ``(..., Kb, Jb, Ib)`` values inside the (rows, cols) view, zeros around."""
    out = np.zeros(values_box.shape[:-3] + (rows.stop - rows.start, cols.stop - cols.start), values_box.dtype)
    r0, c0 = voxel_box.lo[1] - rows.start, voxel_box.lo[0] - cols.start
    out[..., r0:r0 + values_box.shape[-2], c0:c0 + values_box.shape[-1]] = values_box[..., k - voxel_box.lo[2], :, :]
    return out


def _tile(rgb: np.ndarray, scale_yx) -> "object":
    from PIL import Image

    image = Image.fromarray(rgb)
    return image.resize((round(rgb.shape[1] * scale_yx[1]), round(rgb.shape[0] * scale_yx[0])),
                        Image.NEAREST)


def _outlined(ct01: np.ndarray, masks: np.ndarray, colors, scale_yx, box_rc) -> "object":
    """The CT slice upscaled with the box (thin white) and every mask's outline in its colour (2 px)."""
    from PIL import Image

    grey = (ct01 * 255).round().astype(np.uint8)
    tile = np.array(_tile(np.stack([grey] * 3, axis=-1), scale_yx))
    size = (tile.shape[1], tile.shape[0])
    (r0, r1), (c0, c1) = [(round(a * s), round(b * s) - 1) for (a, b), s in zip(box_rc, scale_yx)]
    tile[[r0, r1], c0:c1 + 1] = 255
    tile[r0:r1 + 1, [c0, c1]] = 255
    for mask, color in zip(masks, colors):
        if not mask.any():
            continue
        big = np.array(Image.fromarray(mask.astype(np.uint8) * 255).resize(size, Image.NEAREST)) > 0
        edge = big & ~ndimage.binary_erosion(big, iterations=2)
        tile[edge] = np.round(np.array(color) * 255).astype(np.uint8)
    return Image.fromarray(tile)


def write_montage(path, volume_hu: np.ndarray, result, title: str, columns: int = 5, tile_px: int = 180,
                  ct_window=(-600.0, 1500.0)) -> Path:
    """A PNG a person can look at: axial slices of the CT with every sample's outline, and the entropy.

    Row 1: CT (lung window) cropped around the box, one outline colour per sample (the colours of
    samples.seg.nrrd). Row 2: predictive entropy on the same slices, 0 .. ln 2 nats. The view is the
    voxel grid as stored (rows = j, columns = i; radiological for an LPS axial scan).
    """
    from PIL import Image, ImageDraw

    geometry, box = result.geometry, result.voxel_box
    rows, cols = _view_window(box, geometry.shape)
    ks = _montage_slices(result.masks, box.lo[2], columns)
    height, width = rows.stop - rows.start, cols.stop - cols.start
    spacing_y, spacing_x = geometry.spacing[1], geometry.spacing[0]
    base = tile_px / max(width, height * spacing_y / spacing_x)
    scale = (base * spacing_y / spacing_x, base)
    colors = segfile.distinct_colors(len(result.masks))
    centre, span = ct_window
    ct_tiles, entropy_tiles = [], []
    for k in ks:
        ct01 = np.clip((volume_hu[k, rows, cols] - (centre - span / 2)) / span, 0, 1)
        box_rc = ((box.lo[1] - rows.start, box.hi[1] - rows.start), (box.lo[0] - cols.start, box.hi[0] - cols.start))
        ct_tiles.append(_outlined(ct01, _in_view(result.masks, box, k, rows, cols), colors, scale, box_rc))
        entropy_tiles.append(_tile(colormap(_in_view(result.entropy, box, k, rows, cols) / math.log(2)), scale))

    font, small = _font(16), _font(13)
    tw, th = ct_tiles[0].size
    pad, label_w, header_h, caption_h = 8, 110, 58, 22
    canvas = Image.new("RGB", (label_w + len(ks) * (tw + pad) + pad, header_h + 2 * (th + caption_h + pad) + 48),
                       (24, 24, 24))
    draw = ImageDraw.Draw(canvas)
    draw.text((pad, 8), title, fill=(255, 255, 255), font=font)
    draw.text((pad, 32), f"{len(result.masks)} samples, one outline colour each. {DISCLAIMER.split('.')[0]}.",
              fill=(200, 200, 200), font=small)
    for row, (tiles, label) in enumerate(((ct_tiles, "CT + samples"), (entropy_tiles, "entropy"))):
        y = header_h + row * (th + caption_h + pad)
        draw.text((pad, y + th // 2 - 8), label, fill=(230, 230, 230), font=small)
        for col, (tile, k) in enumerate(zip(tiles, ks)):
            x = label_w + col * (tw + pad)
            canvas.paste(tile, (x, y))
            draw.text((x, y + th + 3), f"slice k = {k}", fill=(200, 200, 200), font=small)
    _colour_bar(draw, canvas, label_w, canvas.size[1] - 40, min(300, len(ks) * (tw + pad) - pad), small)
    path = Path(path)
    canvas.save(path, format="PNG", optimize=True)
    return path


def _colour_bar(draw, canvas, x: int, y: int, width: int, font) -> None:
    from PIL import Image

    bar = colormap(np.tile(np.linspace(0, 1, width), (12, 1)))
    canvas.paste(Image.fromarray(bar), (x, y))
    draw.text((x - 100, y - 1), "entropy", fill=(230, 230, 230), font=font)
    draw.text((x, y + 14), "0", fill=(200, 200, 200), font=font)
    draw.text((x + width - 60, y + 14), "ln 2 nats", fill=(200, 200, 200), font=font)
