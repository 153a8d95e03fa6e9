"""LIDC contour phantom: synthetic CT around real reader contours.

The renderer takes plain data (no pylidc): the readers' 3D masks of one nodule on a common voxel
grid, the voxel spacing and each reader's ratings, and draws a CT volume in HU in which the image
*explains* the readers' disagreement:

- lung parenchyma (about -850 HU) with spatially correlated texture, a gravity gradient and noise;
- a few tubular vessels that keep clear of the nodule;
- a nodule whose density follows the readers' agreement: voxels every reader includes get the full
  nodule density, voxels only some readers include are proportionally fainter;
- solid vs ground-glass density from the mean texture rating (5 solid ... 1 ground glass);
- edge blur from the mean margin rating (1 poorly defined ... 5 sharp);
- a dense core when the readers rate the nodule calcified.

Everything is vectorised numpy / scipy.ndimage and deterministic for a given seed.
The bundled demo nodules (real LIDC-IDRI reader contours, see data/README.md) make a whole
phantom CT volume available offline through :func:`demo_volume`.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from typing import Mapping, Optional, Sequence, Tuple

import numpy as np

from ProbSAMLib.demo.nodule import (LUNG_HU, VESSEL_HU, PhantomVolume, _grid_mm, _nodule_box,  # noqa: F401
                                    _nodule_density, _smooth_noise, mean_rating, stable_seed, to_phantom_volume,
                                    tube)

# pylidc's Annotation.feature_names order; the demo file stores ratings in this order.
RATING_NAMES = ("subtlety", "internalStructure", "calcification", "sphericity", "margin",
                "lobulation", "spiculation", "texture", "malignancy")


def _parenchyma(rng, shape, spacing_zyx) -> np.ndarray:
    """(K, J, I) float32 lung background: base density, gravity gradient, 2 mm texture."""
    texture_sigma = [2.0 / s for s in spacing_zyx]
    hu = LUNG_HU + 28.0 * _smooth_noise(rng, shape, texture_sigma)
    # Dependent (posterior, +y in LPS) lung is a little denser.
    y = _grid_mm(shape, spacing_zyx)[1]
    hu += rng.uniform(10, 30) * (y / max(float(y.max()), 1.0) - 0.5)
    return hu


def _vessels(rng, shape, spacing_zyx, avoid_centre, avoid_radius, count) -> np.ndarray:
    """(K, J, I) float32 in [0, 1]: straight tubes with soft walls, clear of the nodule."""
    z, y, x = _grid_mm(shape, spacing_zyx)
    extent = np.array(shape, dtype=np.float32) * np.array(spacing_zyx, dtype=np.float32)
    out = np.zeros(shape, dtype=np.float32)
    softness = 0.5 * float(min(spacing_zyx[1:]))
    for _ in range(count):
        for _attempt in range(20):
            point = rng.uniform(0.0, 1.0, 3).astype(np.float32) * extent
            direction = rng.standard_normal(3).astype(np.float32)
            direction[0] *= 2.0  # vessels run mostly cranio-caudally
            direction /= np.linalg.norm(direction)
            radius = float(rng.uniform(0.6, 2.0))
            rel = avoid_centre - point
            miss = np.linalg.norm(rel - rel.dot(direction) * direction)
            if miss > avoid_radius + radius + 3.0:
                break
        else:
            continue  # the nodule fills the volume: no room for this vessel
        np.maximum(out, tube((z, y, x), point, direction, radius, softness), out=out)
    return out


def _place(reader_masks: np.ndarray, shape) -> Tuple[np.ndarray, Tuple[int, int, int]]:
    """Centre (R, k, j, i) masks in a (R,) + `shape` grid; returns the masks and the offset."""
    inner = reader_masks.shape[1:]
    if any(s < n for s, n in zip(shape, inner)):
        raise ValueError(f"shape {tuple(shape)} is smaller than the mask grid {inner}")
    offset = tuple((s - n) // 2 for s, n in zip(shape, inner))
    out = np.zeros((reader_masks.shape[0],) + tuple(shape), dtype=bool)
    out[(slice(None),) + tuple(slice(o, o + n) for o, n in zip(offset, inner))] = reader_masks
    return out, offset


def render_nodule_volume(reader_masks: np.ndarray, spacing: Sequence[float],
                         ratings: Sequence[Mapping[str, float]], seed: int,
                         shape: Optional[Sequence[int]] = None,
                         origin: Sequence[float] = (0.0, 0.0, 0.0),
                         vessels: int = 4, noise_hu: float = 18.0, case=None) -> PhantomVolume:
    """Render one nodule's neighbourhood as a phantom CT volume.

    reader_masks: (R, K, J, I) bool, R >= 1 readers on a common (z, y, x) grid.
    spacing:      (x, y, z) voxel spacing in mm (SimpleITK order).
    ratings:      R dicts with 'texture' and 'margin' (1-5), optionally 'calcification' (1-6).
    seed:         the only source of randomness; same inputs + seed -> identical volume.
    shape:        optional larger (K, J, I) output grid; the masks are centred in it.
    origin:       physical position (x, y, z) mm of voxel (0, 0, 0).
    case:         optional hard case (Training.data.phantom_cases.NoduleCase, generator v2): it may change
                  the ratings used for rendering and adds its structures after the nodule, before the
                  noise, from its own random stream. None renders generator v1 exactly.
    Returns a PhantomVolume with an int16 HU image and the masks on the image grid.
    """
    reader_masks = np.asarray(reader_masks, dtype=bool)
    if reader_masks.ndim != 4 or reader_masks.shape[0] < 1:
        raise ValueError(f"reader_masks must be (R, K, J, I) with R >= 1, got {reader_masks.shape}")
    if len(ratings) != reader_masks.shape[0]:
        raise ValueError(f"{len(ratings)} ratings for {reader_masks.shape[0]} readers")
    masks, offset = _place(reader_masks, shape if shape is not None else reader_masks.shape[1:])
    grid = masks.shape[1:]
    spacing_zyx = tuple(float(s) for s in spacing[::-1])
    rng = np.random.default_rng(seed)

    union = masks.any(axis=0)
    image = _parenchyma(rng, grid, spacing_zyx)
    if union.any():
        idx = np.argwhere(union).astype(np.float32) * np.array(spacing_zyx, dtype=np.float32)
        centre = idx.mean(axis=0)
        radius = float(np.linalg.norm(idx - centre, axis=1).max())
    else:
        centre, radius = np.zeros(3, np.float32), 0.0
    tubes = _vessels(rng, grid, spacing_zyx, centre, radius, vessels)
    image += tubes * (VESSEL_HU - image)

    if union.any():
        box = _nodule_box(union, [int(np.ceil(5.0 / s)) for s in spacing_zyx])
        looks = case.rendering_ratings(ratings) if case is not None else ratings
        opacity, nodule_hu = _nodule_density(rng, masks, spacing_zyx, looks, box)
        image[box] += opacity * (nodule_hu - image[box])
    if case is not None:
        image = case.apply(image, masks, spacing_zyx)

    in_plane = [0.0] + [0.6] * 2  # CT noise is correlated in-plane by the reconstruction kernel
    image += noise_hu * _smooth_noise(rng, grid, in_plane)
    return to_phantom_volume(image, spacing, origin, masks, ratings, offset)


# ----------------------------------------------------------------------------------------------
# Bundled demo nodules (real LIDC-IDRI reader contours; written by research/export_demo_nodules.py)

@dataclass
class DemoNodule:
    """One bundled nodule: reader_masks (R, K, J, I) bool on its tight box, spacing (x, y, z) mm."""

    reader_masks: np.ndarray
    spacing: Tuple[float, float, float]
    ratings: list
    info: dict


def _demo_file():
    return resources.files("ProbSAMLib").joinpath("data", "demo_nodules.npz")


def demo_count() -> int:
    """How many demo nodules are bundled."""
    with _demo_file().open("rb") as fh, np.load(fh) as data:
        return len(json.loads(str(data["index"]))["nodules"])


def load_demo_nodule(index: int = 0) -> DemoNodule:
    """The `index`-th bundled LIDC nodule (reader masks unpacked, ratings as dicts)."""
    with _demo_file().open("rb") as fh, np.load(fh) as data:
        entries = json.loads(str(data["index"]))["nodules"]
        if not 0 <= index < len(entries):
            raise IndexError(f"demo nodule {index} out of range (0..{len(entries) - 1})")
        entry = entries[index]
        shape = tuple(entry["mask_shape"])
        bits = data[f"masks_{index}"]
    masks = np.unpackbits(bits, count=int(np.prod(shape))).reshape(shape).astype(bool)
    ratings = [dict(zip(RATING_NAMES, map(int, r))) for r in entry["ratings"]]
    info = {k: v for k, v in entry.items() if k not in ("mask_shape", "ratings")}
    return DemoNodule(masks, tuple(entry["spacing"]), ratings, info)


def demo_volume(index: int = 0, seed: int = 0, in_plane: int = 128,
                depth_mm: float = 64.0, field: str = "local") -> PhantomVolume:
    """A whole phantom CT volume (24..40 slices) around a bundled nodule.

    field: "local" (the original demo: an in_plane^2 patch of lung, generator v1's renderer) or "chest"
    (generator v3, ProbSAMLib.demo.chest: whole 512 x 512 chest slices at the scan's spacing, the nodule
    at its real position in the slice; what LiteMedSAM-based models expect). in_plane is ignored for
    "chest".
    """
    if field not in ("local", "chest"):
        raise ValueError(f"field must be 'local' or 'chest', got {field!r}")
    nodule = load_demo_nodule(index)
    k, j, i = nodule.reader_masks.shape[1:]
    slices = int(np.clip(round(depth_mm / nodule.spacing[2]), 24, 40))
    # Place voxel (0,0,0) so the nodule sits at its approximate position in the scan.
    origin = tuple(float(o) for o in nodule.info.get("origin", (0.0, 0.0, 0.0)))
    if field == "chest":
        from ProbSAMLib.demo.chest import SCAN_SIZE, render_chest_volume

        depth = max(slices, k + 4)
        k0 = (depth - k) // 2
        row, col = (int(v) for v in nodule.info.get("grid_index", (0, (SCAN_SIZE - j) // 2,
                                                                    (SCAN_SIZE - i) // 2))[1:])
        masks = np.zeros((nodule.reader_masks.shape[0], depth, SCAN_SIZE, SCAN_SIZE), dtype=bool)
        masks[:, k0:k0 + k, row:row + j, col:col + i] = nodule.reader_masks
        volume = render_chest_volume(masks, nodule.spacing, nodule.ratings,
                                     seed=stable_seed("demo-chest", index, seed))
        volume.offset = (k0, row, col)
    else:
        shape = (max(slices, k + 4), max(in_plane, j + 8), max(in_plane, i + 8))
        volume = render_nodule_volume(nodule.reader_masks, nodule.spacing, nodule.ratings,
                                      seed=stable_seed("demo", index, seed), shape=shape)
    offset_mm = np.array(volume.offset[::-1], dtype=float) * np.array(nodule.spacing)
    volume.image.SetOrigin(tuple(np.array(origin) - offset_mm))
    volume.info = dict(nodule.info, demo_index=index, seed=seed, field=field,
                       **({"chest": volume.info} if field == "chest" else {}))
    return volume


def demo_box(reader_masks: np.ndarray, geometry, margin: int = 3):
    """The VoxelBox around the readers' union (R, K, J, I): their slices, ``margin`` voxels around in-plane.

    The box the demo (CLI and the Slicer self-test) prompts with, as a user would draw it.
    """
    from ProbSAMLib.geometry import voxel_box_from_ijk

    k, j, i = np.nonzero(reader_masks.any(axis=0))
    return voxel_box_from_ijk([i.min() - margin, j.min() - margin, k.min()],
                              [i.max() + margin, j.max() + margin, k.max()], geometry)
