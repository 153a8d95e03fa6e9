"""Hard cases of the LIDC contour phantom (generator v2): the places where a -400 HU threshold fails.

Real nodules touch vessels, the chest wall, the mediastinum and fissures; some are ground glass with
vessels running through them, some are calcified, and the slices at a nodule's top and bottom are
partial-volume averages. In each, a threshold at -400 HU inside the box either leaks into the
neighbour (it is above -400 HU too) or misses faint nodule tissue. A :class:`NoduleCase` adds its
structure to a phantom volume (``render_nodule_volume(..., case=...)``) after the nodule and before
the noise, from its own random stream; the readers' masks (the real LIDC outlines) never change.

Case (share of nodules): base variant (every split) / held-out variant (test split only, other
parameters, so a model is also scored on a variant it never saw):

- plain (30 %): the v1 rendering, unchanged.
- juxta_vascular (15 %): 1-2 oblique vessels of soft-tissue density, radius 1.2-2.4 mm, touching
  or crossing the nodule / three thinner vessels (0.9-1.5 mm) meeting at a point of its surface.
- juxta_pleural (15 %): the chest wall (soft tissue with an extrapleural fat stripe, gently concave)
  against the nodule / the mediastinum: a strongly convex soft-tissue structure wrapped in fat.
- fissure (10 %): a thin dense plane through or beside the nodule / a curved fissure.
- ggo_vessels (10 %): the nodule rendered as ground glass (texture 1.0-1.6, about -600..-510 HU) with
  1-2 vessels through it / fainter glass (1.0-1.3) with three thinner vessels.
- calcified (10 %): dense central calcification (+800..+1400 HU) with blooming / popcorn: 3-5 small
  calcified foci.
- partial_volume (10 %): a thick-slab reconstruction: averaging along z with a box profile 3-5 mm
  (at least 1.5 slices) wide / a Gaussian profile of 5-7 mm (at least 2.5 slices) FWHM. It bites
  hardest on the nodule's edge slices (:func:`edge_slices`), where the cap fades below -400 HU, but
  a wide slab blurs the inner slices too, so every slice of such a nodule is labelled partial_volume.

Generator v2 is frozen: whatever changes what these functions draw is a new generator version.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Mapping, Sequence, Tuple

import numpy as np
from scipy import ndimage
from scipy.special import expit

from ProbSAMLib.demo.phantom import VESSEL_HU, _grid_mm, _smooth_noise, stable_seed, tube

GENERATOR_VERSION = 2
CASES = ("plain", "juxta_vascular", "juxta_pleural", "fissure", "ggo_vessels", "calcified",
         "partial_volume")
CASE_SHARES = {"plain": 0.30, "juxta_vascular": 0.15, "juxta_pleural": 0.15, "fissure": 0.10,
               "ggo_vessels": 0.10, "calcified": 0.10, "partial_volume": 0.10}
VARIANTS = ("base", "heldout")
HELDOUT_SHARE = 0.5  # of the hard-case nodules of test patients


@dataclass
class _Nodule:
    """The nodule's geometry in mm, (z, y, x): what the case renderers place things against."""

    grid: list  # open grid of voxel centres (phantom._grid_mm)
    spacing: Tuple[float, float, float]
    points: np.ndarray  # (N, 3) union voxel centres
    slice_of_point: np.ndarray  # (N,) slice index of each point
    core: np.ndarray  # (K, J, I) bool, at least half the readers
    centre: np.ndarray  # (3,)

    @property
    def softness(self) -> float:
        return 0.5 * float(min(self.spacing[1:]))


def _geometry(masks: np.ndarray, spacing_zyx) -> _Nodule:
    union = masks.any(axis=0)
    index = np.argwhere(union)
    points = index.astype(np.float32) * np.asarray(spacing_zyx, dtype=np.float32)
    core = masks.mean(axis=0) >= 0.5
    return _Nodule(_grid_mm(union.shape, spacing_zyx), tuple(spacing_zyx), points, index[:, 0],
                   core if core.any() else union, points.mean(axis=0))


def _blend(image: np.ndarray, weight: np.ndarray, hu) -> np.ndarray:
    return image + weight * (hu - image)


def _direction(rng, z_range=(0.0, 0.0)) -> np.ndarray:
    """Unit (z, y, x) vector with |z| in z_range and a uniform in-plane angle."""
    dz = rng.uniform(*z_range) * rng.choice([-1.0, 1.0])
    phi = rng.uniform(0.0, 2.0 * np.pi)
    r = np.sqrt(1.0 - dz * dz)
    return np.array([dz, r * np.sin(phi), r * np.cos(phi)], dtype=np.float32)


def _perpendicular(rng, direction) -> np.ndarray:
    v = rng.standard_normal(3).astype(np.float32)
    v -= v.dot(direction) * direction
    return v / np.linalg.norm(v)


def _line_distance(points, point, direction) -> np.ndarray:
    rel = points - point
    along = rel @ direction
    return np.sqrt(np.maximum((rel * rel).sum(axis=1) - along * along, 0.0))


def _line_at_distance(nodule: _Nodule, direction, normal, target: float) -> np.ndarray:
    """A point of a line along `direction`, shifted from the centre along `normal`, whose closest
    nodule voxel is `target` mm away (bisection on the shift)."""
    def gap(shift):
        return _line_distance(nodule.points, nodule.centre + shift * normal, direction).min()

    lo, hi = 0.0, float(np.linalg.norm(nodule.points - nodule.centre, axis=1).max()) + target + 1.0
    if gap(lo) >= target:
        return nodule.centre
    for _ in range(30):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if gap(mid) < target else (lo, mid)
    return nodule.centre + hi * normal


def _vessel(image, nodule: _Nodule, rng, point, direction, radius) -> np.ndarray:
    weight = tube(nodule.grid, point, direction, radius, nodule.softness)
    return _blend(image, weight, VESSEL_HU + rng.uniform(-20.0, 20.0))


def _random_point(nodule: _Nodule, rng, where=None) -> np.ndarray:
    points = nodule.points if where is None else where
    return points[rng.integers(len(points))]


def _surface_points(nodule: _Nodule) -> np.ndarray:
    far = np.linalg.norm(nodule.points - nodule.centre, axis=1)
    return nodule.points[far >= np.quantile(far, 0.8)]


# ---- the renderers: (image (K, J, I) HU float32, nodule, rng, heldout) -> image ---------------------

def juxta_vascular(image, nodule: _Nodule, rng, heldout: bool) -> np.ndarray:
    if heldout:  # a bifurcation: three thinner vessels through one point of the nodule's surface
        branch = _random_point(nodule, rng, _surface_points(nodule))
        for _ in range(3):
            image = _vessel(image, nodule, rng, branch, _direction(rng, (0.1, 0.7)), rng.uniform(0.9, 1.5))
        return image
    for _ in range(int(rng.integers(1, 3))):
        direction = _direction(rng, (0.15, 0.6))  # oblique: seen as an elongated blob in many slices
        radius = rng.uniform(1.2, 2.4)
        # The axis passes at most one radius from the nodule: the vessel touches or crosses it.
        point = _line_at_distance(nodule, direction, _perpendicular(rng, direction),
                                  rng.uniform(0.0, 1.0) * radius)
        image = _vessel(image, nodule, rng, point, direction, radius)
    return image


def _slice_extent(nodule: _Nodule, normal) -> float:
    """Median over the nodule's slices of its farthest reach along `normal` from the centre (a wall
    there touches or cuts at least half of the nodule's slices)."""
    reach = (nodule.points - nodule.centre) @ normal
    return float(np.quantile([reach[nodule.slice_of_point == k].max()
                              for k in np.unique(nodule.slice_of_point)], 0.5))


def juxta_pleural(image, nodule: _Nodule, rng, heldout: bool) -> np.ndarray:
    normal = _direction(rng)  # in-plane: the wall runs cranio-caudally, as the chest wall does
    touch = _slice_extent(nodule, normal) - rng.uniform(0.0, 1.0)  # mm from the centre
    z, y, x = nodule.grid
    if heldout:  # mediastinum: a convex structure (heart, great vessels), radius 15-30 mm
        radius = rng.uniform(15.0, 30.0)
        axis = nodule.centre + (touch + radius) * normal
        depth = radius - np.sqrt((y - axis[1]) ** 2 + (x - axis[2]) ** 2)
        fat_from, fat_to, fat_hu, tissue_hu = 0.0, rng.uniform(2.0, 4.0), -100.0, rng.uniform(30, 50)
    else:  # chest wall: a concave cylinder of radius 80-150 mm around the lung
        radius = rng.uniform(80.0, 150.0)
        axis = nodule.centre + (touch - radius) * normal
        depth = np.sqrt((y - axis[1]) ** 2 + (x - axis[2]) ** 2) - radius
        fat_from = rng.uniform(1.0, 2.0)
        fat_to, fat_hu, tissue_hu = fat_from + rng.uniform(1.5, 3.0), -90.0, rng.uniform(30, 60)
    depth = np.broadcast_to(depth, image.shape)
    soft = nodule.softness
    inside = expit(depth / soft)
    fat = expit((depth - fat_from) / soft) * expit((fat_to - depth) / soft)
    texture = 12.0 * _smooth_noise(rng, image.shape, [1.0 / s for s in nodule.spacing])
    wall_hu = tissue_hu + texture + fat * (fat_hu - tissue_hu)
    return _blend(image, inside, wall_hu).astype(np.float32)


def fissure(image, nodule: _Nodule, rng, heldout: bool) -> np.ndarray:
    normal = _direction(rng, (0.0, 0.4))  # mostly in-plane normal: a line in axial slices
    reach = float(((nodule.points - nodule.centre) @ normal).max())
    offset = rng.uniform(0.0, 1.15) * reach  # through the nodule, or beside it within ~1 mm
    z, y, x = nodule.grid
    if heldout:  # curved: part of a sphere of radius 25-45 mm
        radius = rng.uniform(25.0, 45.0)
        centre = nodule.centre + (offset + radius) * normal
        dist = np.sqrt((z - centre[0]) ** 2 + (y - centre[1]) ** 2 + (x - centre[2]) ** 2) - radius
    else:
        dist = ((z - nodule.centre[0]) * normal[0] + (y - nodule.centre[1]) * normal[1]
                + (x - nodule.centre[2]) * normal[2]) - offset
    half_width = rng.uniform(0.4, 0.7)
    weight = expit((half_width - np.abs(dist)) / 0.15)
    return _blend(image, weight, rng.uniform(-200.0, -80.0)).astype(np.float32)


def ggo_vessels(image, nodule: _Nodule, rng, heldout: bool) -> np.ndarray:
    count, radii = (3, (0.5, 0.9)) if heldout else (int(rng.integers(1, 3)), (0.8, 1.5))
    core = nodule.points[nodule.core[tuple((nodule.points / nodule.spacing).round().astype(int).T)]]
    for _ in range(count):  # each vessel runs through a voxel of the nodule's core
        point = _random_point(nodule, rng, core if len(core) else None)
        image = _vessel(image, nodule, rng, point, _direction(rng, (0.1, 0.7)), rng.uniform(*radii))
    return image


def calcified(image, nodule: _Nodule, rng, heldout: bool) -> np.ndarray:
    spacing = nodule.spacing
    if heldout:  # popcorn: 3-5 small foci inside the nodule
        calc = np.zeros(image.shape, dtype=bool)
        z, y, x = nodule.grid
        for _ in range(int(rng.integers(3, 6))):
            c, r = _random_point(nodule, rng), rng.uniform(1.0, 2.0)
            calc |= (z - c[0]) ** 2 + (y - c[1]) ** 2 + (x - c[2]) ** 2 <= r * r
        hu = rng.uniform(1000.0, 1500.0)
    else:  # dense central calcification
        depth = ndimage.distance_transform_edt(nodule.core, sampling=spacing)
        calc = depth >= rng.uniform(0.2, 0.5) * depth.max()
        hu = rng.uniform(800.0, 1400.0)
    # Blooming: dense calcium spreads beyond its edge on CT (and past the readers' outline).
    distance = ndimage.distance_transform_edt(~calc, sampling=spacing)
    weight = np.where(calc, 1.0, 0.6 * np.exp(-distance / rng.uniform(0.6, 1.2)))
    return _blend(image, weight.astype(np.float32), hu).astype(np.float32)


def slab_kernel(width: float, profile: str) -> np.ndarray:
    """Normalised 1D slice-sensitivity profile: 'box' `width` slices wide, or 'gauss' with FWHM `width`."""
    half = int(np.ceil(width)) + (int(np.ceil(width)) if profile == "gauss" else 0)
    offsets = np.arange(-half, half + 1, dtype=np.float64)
    if profile == "box":  # overlap of each slice [o - 1/2, o + 1/2] with [-width/2, width/2]
        kernel = np.clip(np.minimum(offsets + 0.5, width / 2) - np.maximum(offsets - 0.5, -width / 2), 0, 1)
    else:
        kernel = np.exp(-0.5 * (offsets / (width / 2.3548)) ** 2)
    return (kernel / kernel.sum()).astype(np.float32)


def partial_volume(image, nodule: _Nodule, rng, heldout: bool) -> np.ndarray:
    """A thick-slab reconstruction sampled at the scan's own slice spacing."""
    if heldout:
        kernel = slab_kernel(max(rng.uniform(5.0, 7.0) / nodule.spacing[0], 2.5), "gauss")
    else:
        kernel = slab_kernel(max(rng.uniform(3.0, 5.0) / nodule.spacing[0], 1.5), "box")
    return ndimage.convolve1d(image, kernel, axis=0, mode="nearest")


_RENDERERS = {"juxta_vascular": juxta_vascular, "juxta_pleural": juxta_pleural, "fissure": fissure,
              "ggo_vessels": ggo_vessels, "calcified": calcified, "partial_volume": partial_volume}


def edge_slices(masks: np.ndarray) -> np.ndarray:
    """(K,) bool: slices where the readers' union is non-empty and at most half its largest area,
    plus the first and last non-empty slice (a nodule's partial-volume caps)."""
    area = masks.any(axis=0).reshape(masks.shape[1], -1).sum(axis=1)
    edge = (area > 0) & (area <= 0.5 * area.max())
    marked = np.flatnonzero(area)
    if marked.size:
        edge[[marked[0], marked[-1]]] = True
    return edge


@dataclass(frozen=True)
class NoduleCase:
    """One nodule's hard case: `name` in CASES, `variant` 'base' or 'heldout', its own `seed`."""

    name: str = "plain"
    variant: str = "base"
    seed: int = 0

    def __post_init__(self):
        if self.name not in CASES:
            raise ValueError(f"unknown phantom case {self.name!r}; expected one of {', '.join(CASES)}")
        if self.variant not in VARIANTS:
            raise ValueError(f"case variant must be 'base' or 'heldout', got {self.variant!r}")

    @property
    def heldout(self) -> bool:
        return self.variant == "heldout"

    def rendering_ratings(self, ratings: Sequence[Mapping[str, float]]) -> list:
        """The ratings the nodule is drawn with (ground glass for ggo_vessels); the stored ratings
        in slices.csv stay the readers' own."""
        if self.name != "ggo_vessels":
            return list(ratings)
        texture = np.random.default_rng([self.seed, 1]).uniform(1.0, 1.3 if self.heldout else 1.6)
        return [dict(r, texture=float(texture)) for r in ratings]

    def apply(self, image: np.ndarray, masks: np.ndarray, spacing_zyx) -> np.ndarray:
        """Add this case's structures to `image` (K, J, I) float HU; masks (R, K, J, I) bool."""
        if self.name == "plain" or not masks.any():
            return image
        rng = np.random.default_rng([self.seed, 2])
        out = _RENDERERS[self.name](image, _geometry(masks, spacing_zyx), rng, self.heldout)
        return np.asarray(out, dtype=np.float32)

    def slice_labels(self, masks: np.ndarray) -> List[str]:
        """The `case` label of each of the K slices of masks (R, K, J, I): the nodule's case."""
        return [self.name] * masks.shape[1]


def choose_case(seed: int, series_uid: str, nodule_index: int, test_split: bool) -> NoduleCase:
    """The case of one nodule: drawn with CASE_SHARES from the nodule's identity alone (so a scan
    rendered alone gets the same case as in a full build); the held-out variant only in test."""
    key = stable_seed("phantom-case", seed, series_uid, nodule_index)
    pick, variant_draw = np.random.default_rng(key).random(2)
    cumulative = np.cumsum([CASE_SHARES[name] for name in CASES])
    name = CASES[min(int(np.searchsorted(cumulative, pick, side="right")), len(CASES) - 1)]
    heldout = test_split and name != "plain" and variant_draw < HELDOUT_SHARE
    return NoduleCase(name, "heldout" if heldout else "base", seed=stable_seed("case-render", key))


# ---- the baseline the cases are built to fool --------------------------------------------------------
