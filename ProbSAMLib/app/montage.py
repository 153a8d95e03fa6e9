"""The PNG montage a person looks at after `probsam demo` / `probsam sample`: the CT around the box with each
sample's outline, and the entropy map on the same slices."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from scipy import ndimage

from ProbSAMLib.geometry import VoxelBox
from ProbSAMLib.inference.summary import DISCLAIMER
from ProbSAMLib.io import segfile
from ProbSAMLib.modeling.config import LUNG_WINDOW

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
                  ct_window=LUNG_WINDOW) -> Path:
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
