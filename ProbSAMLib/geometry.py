"""Volume geometry, physical boxes and their voxel footprint.

Everything here is in LPS, the convention of ITK/SimpleITK and DICOM: a point is (x, y, z) in mm, x
towards the patient's Left, y Posterior, z Superior. Slicer works in RAS (x and y negated); boxes given
in RAS are converted at the door (``space="ras"``) so that nothing past the constructors ever sees RAS.

Index order is (i, j, k) = (x, y, z) of the voxel grid, as in SimpleITK's ``TransformIndexToPhysicalPoint``;
numpy arrays of a volume are ``(K, J, I)`` as returned by ``SimpleITK.GetArrayFromImage``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import numpy as np

# Flips x and y: maps RAS to LPS and back (its own inverse).
RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0])

# Tolerance in voxel units for rounding box edges: a corner computed through a rotation lands a few ulps
# off a voxel centre it was meant to sit on, and must still count as on it.
_INDEX_EPS = 1e-6

SPACES = ("lps", "ras")


def _frozen_array(values, shape: tuple, name: str) -> np.ndarray:
    """A read-only float64 copy of ``values`` reshaped to ``shape`` (frozen dataclasses hold these)."""
    array = np.array(values, dtype=np.float64)
    if array.size != int(np.prod(shape)):
        raise ValueError(f"{name} must have {int(np.prod(shape))} numbers, got {array.size}")
    array = array.reshape(shape)
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{name} contains a non-finite number: {array.tolist()}")
    array.setflags(write=False)
    return array


def _check_space(space: str) -> str:
    space = space.lower()
    if space not in SPACES:
        raise ValueError(f"space must be one of {SPACES}, got {space!r}")
    return space


def to_lps(points, space: str) -> np.ndarray:
    """Points ``(..., 3)`` given in ``space`` ("lps" or "ras") → LPS."""
    points = np.asarray(points, dtype=np.float64)
    return points @ RAS_TO_LPS if _check_space(space) == "ras" else points.copy()


@dataclass(frozen=True, eq=False)
class VolumeGeometry:
    """The grid of a 3D image: ``physical = origin + direction @ (spacing * ijk)``.

    size: (I, J, K) voxel counts. origin: (3,) LPS mm of voxel (0, 0, 0)'s centre. spacing: (3,) mm.
    direction: (3, 3), columns = the unit vectors of the index axes i, j, k in LPS.
    """

    size: tuple
    origin: np.ndarray
    spacing: np.ndarray
    direction: np.ndarray

    def __post_init__(self):
        size = tuple(int(s) for s in self.size)
        if len(size) != 3 or min(size) < 1:
            raise ValueError(f"size must be three positive voxel counts (I, J, K), got {self.size}")
        object.__setattr__(self, "size", size)
        object.__setattr__(self, "origin", _frozen_array(self.origin, (3,), "origin"))
        object.__setattr__(self, "spacing", _frozen_array(self.spacing, (3,), "spacing"))
        object.__setattr__(self, "direction", _frozen_array(self.direction, (3, 3), "direction"))
        if np.any(self.spacing <= 0):
            raise ValueError(f"spacing must be positive, got {self.spacing.tolist()}")
        if abs(np.linalg.det(self.direction)) < 1e-6:
            raise ValueError(f"direction matrix is singular: {self.direction.tolist()}")

    # --- constructors -------------------------------------------------------------------------------
    @classmethod
    def from_sitk(cls, image) -> "VolumeGeometry":
        """Geometry of a 3D ``SimpleITK.Image``."""
        if image.GetDimension() != 3:
            raise ValueError(f"expected a 3D image, got a {image.GetDimension()}D one")
        return cls(image.GetSize(), image.GetOrigin(), image.GetSpacing(), image.GetDirection())

    @classmethod
    def from_ijk_to_ras(cls, matrix, size) -> "VolumeGeometry":
        """From Slicer's 4×4 IJK→RAS matrix (``volumeNode.GetIJKToRASMatrix``) and (I, J, K) size."""
        m = np.asarray(matrix, dtype=np.float64).reshape(4, 4)
        lps = RAS_TO_LPS @ m[:3, :]
        spacing = np.linalg.norm(lps[:, :3], axis=0)
        return cls(size, lps[:, 3], spacing, lps[:, :3] / spacing)

    # --- properties ---------------------------------------------------------------------------------
    @property
    def shape(self) -> tuple:
        """numpy shape ``(K, J, I)`` of an array on this grid."""
        return self.size[::-1]

    @property
    def voxel_volume_mm3(self) -> float:
        """One voxel's volume, |det(direction · diag(spacing))|: the product of the spacings only when the
        axes are at right angles (a sheared grid, e.g. a gantry tilt, has smaller voxels)."""
        return float(abs(np.linalg.det(self.direction * self.spacing)))

    def shear_note(self, tolerance_deg: float = 0.01) -> Optional[str]:
        """None for a grid whose index axes are at right angles; else one sentence saying by how much they
        are not and what that does to the numbers ProbSAM reports."""
        axes = self.direction / np.linalg.norm(self.direction, axis=0)
        angles = {f"{_AXIS_NAMES[a]}-{_AXIS_NAMES[b]}": math.degrees(math.acos(np.clip(axes[:, a] @ axes[:, b], -1, 1)))
                  for a, b in ((0, 1), (0, 2), (1, 2))}
        off = {pair: angle for pair, angle in angles.items() if abs(angle - 90.0) > tolerance_deg}
        if not off:
            return None
        listed = ", ".join(f"{pair} {angle:.2f}°" for pair, angle in off.items())
        return (f"the voxel grid is sheared (angle between index axes {listed}, not 90°, e.g. a gantry tilt): "
                f"volumes use the true voxel volume {self.voxel_volume_mm3:.4g} mm³ (the product of the spacings "
                f"would give {float(np.prod(self.spacing)):.4g}); diameters are measured in each slice's own "
                f"plane; the model sees each slice as if its axes were at right angles, so resample to an "
                f"orthogonal grid for reliable outlines")

    def ijk_to_lps_matrix(self) -> np.ndarray:
        """4×4 homogeneous index → LPS matrix."""
        m = np.eye(4)
        m[:3, :3] = self.direction * self.spacing
        m[:3, 3] = self.origin
        return m

    def ijk_to_ras_matrix(self) -> np.ndarray:
        """4×4 homogeneous index → RAS matrix (Slicer's ``IJKToRAS``)."""
        flip = np.diag([-1.0, -1.0, 1.0, 1.0])
        return flip @ self.ijk_to_lps_matrix()

    # --- mapping ------------------------------------------------------------------------------------
    def index_to_physical(self, ijk) -> np.ndarray:
        """Continuous indices ``(..., 3)`` in (i, j, k) order → LPS points ``(..., 3)``."""
        ijk = np.asarray(ijk, dtype=np.float64)
        return self.origin + (ijk * self.spacing) @ self.direction.T

    def physical_to_index(self, xyz) -> np.ndarray:
        """LPS points ``(..., 3)`` → continuous indices ``(..., 3)`` (voxel centres are integers)."""
        xyz = np.asarray(xyz, dtype=np.float64)
        return ((xyz - self.origin) @ np.linalg.inv(self.direction).T) / self.spacing

    def subgrid(self, lo, hi) -> "VolumeGeometry":
        """Geometry of voxels ``lo`` (inclusive) .. ``hi`` (exclusive), both (i, j, k)."""
        lo, hi = np.asarray(lo, int), np.asarray(hi, int)
        return VolumeGeometry(tuple(hi - lo), self.index_to_physical(lo), self.spacing, self.direction)

    # --- SimpleITK glue -----------------------------------------------------------------------------
    def apply_to(self, image):
        """Set origin, spacing and direction of a SimpleITK image of matching size; returns it."""
        if tuple(image.GetSize()) != self.size:
            raise ValueError(f"image size {image.GetSize()} does not match geometry size {self.size}")
        image.SetOrigin(tuple(self.origin.tolist()))
        image.SetSpacing(tuple(self.spacing.tolist()))
        image.SetDirection(tuple(self.direction.ravel().tolist()))
        return image

    def to_sitk_reference(self, pixel_id: Optional[int] = None):
        """An empty (zero) SimpleITK image on this grid, e.g. as a resampling reference."""
        import SimpleITK as sitk

        image = sitk.Image(list(self.size), sitk.sitkUInt8 if pixel_id is None else pixel_id)
        return self.apply_to(image)

    # --- comparison ---------------------------------------------------------------------------------
    def isclose(self, other: "VolumeGeometry", atol: float = 1e-6) -> bool:
        return (self.size == other.size and np.allclose(self.origin, other.origin, atol=atol)
                and np.allclose(self.spacing, other.spacing, atol=atol)
                and np.allclose(self.direction, other.direction, atol=atol))

    def __eq__(self, other) -> bool:
        return isinstance(other, VolumeGeometry) and self.isclose(other, atol=0.0)

    def __hash__(self) -> int:
        return hash((self.size, self.origin.tobytes(), self.spacing.tobytes(), self.direction.tobytes()))

    def __repr__(self) -> str:
        return (f"VolumeGeometry(size={self.size}, origin={self.origin.tolist()}, "
                f"spacing={self.spacing.tolist()}, direction={self.direction.ravel().tolist()})")


@dataclass(frozen=True, eq=False)
class Box3D:
    """A box in physical space (LPS), possibly rotated.

    center: (3,) mm. size: (3,) mm, full edge lengths along the box axes.
    axes: (3, 3), columns = the box's unit axes in LPS, orthonormal.
    """

    center: np.ndarray
    size: np.ndarray
    axes: Optional[np.ndarray] = None  # None: identity (axis-aligned in LPS)

    def __post_init__(self):
        axes = np.eye(3) if self.axes is None else self.axes
        object.__setattr__(self, "center", _frozen_array(self.center, (3,), "box center"))
        object.__setattr__(self, "size", _frozen_array(self.size, (3,), "box size"))
        object.__setattr__(self, "axes", _frozen_array(axes, (3, 3), "box axes"))
        if np.any(self.size < 0):
            raise ValueError(f"box size must not be negative, got {self.size.tolist()}")
        if not np.allclose(self.axes.T @ self.axes, np.eye(3), atol=1e-6):
            raise ValueError(f"box axes must be orthonormal columns, got {self.axes.tolist()}")

    @classmethod
    def from_corners(cls, p1, p2, space: str = "lps") -> "Box3D":
        """The box with opposite corners ``p1`` and ``p2``, axis-aligned in ``space``."""
        p1, p2 = to_lps(p1, space), to_lps(p2, space)
        return cls.from_center_size((p1 + p2) / 2, np.abs(p2 - p1), space="lps",
                                    axes=_space_axes(np.eye(3), space))

    @classmethod
    def from_center_size(cls, center, size, axes=None, space: str = "lps") -> "Box3D":
        """``center`` and ``axes`` (columns, default identity) are given in ``space``; size in mm."""
        axes = np.eye(3) if axes is None else np.asarray(axes, dtype=np.float64).reshape(3, 3)
        return cls(to_lps(center, space), size, _space_axes(axes, space))

    def center_in(self, space: str) -> np.ndarray:
        """Centre in ``space`` ("lps" or "ras")."""
        return to_lps(self.center, space)  # the flip is its own inverse

    def axes_in(self, space: str) -> np.ndarray:
        """Axes (columns) in ``space``."""
        return _space_axes(self.axes, space)

    def corners(self) -> np.ndarray:
        """The 8 corners ``(8, 3)`` in LPS."""
        signs = np.array([[sx, sy, sz] for sz in (-1, 1) for sy in (-1, 1) for sx in (-1, 1)], float)
        return self.center + (signs * (self.size / 2)) @ self.axes.T

    def bounds(self) -> tuple:
        """Axis-aligned LPS bounding box of the corners: (lo (3,), hi (3,))."""
        corners = self.corners()
        return corners.min(axis=0), corners.max(axis=0)

    def contains(self, points, tol: float = 1e-9) -> np.ndarray:
        """Boolean ``(...)``: whether LPS points ``(..., 3)`` lie inside the box (faces included)."""
        local = (np.asarray(points, dtype=np.float64) - self.center) @ self.axes
        return np.all(np.abs(local) <= self.size / 2 + tol, axis=-1)

    def __repr__(self) -> str:
        return (f"Box3D(center={self.center.tolist()}, size={self.size.tolist()}, "
                f"axes={self.axes.ravel().tolist()})")


def _space_axes(axes: np.ndarray, space: str) -> np.ndarray:
    """Direction vectors (columns) between LPS and ``space``; the flip is its own inverse."""
    return RAS_TO_LPS @ axes if _check_space(space) == "ras" else np.array(axes, dtype=np.float64)


class BoxOutsideVolumeError(ValueError):
    """The box covers no voxel of the volume."""


@dataclass(frozen=True)
class VoxelBox:
    """A block of voxels: ``lo`` inclusive, ``hi`` exclusive, both (i, j, k).

    clamped: the requested box reached past the volume and was cut to it; ``warning`` says how.
    """

    lo: tuple
    hi: tuple
    clamped: bool = False
    warning: Optional[str] = None

    def __post_init__(self):
        object.__setattr__(self, "lo", tuple(int(v) for v in self.lo))
        object.__setattr__(self, "hi", tuple(int(v) for v in self.hi))
        if len(self.lo) != 3 or len(self.hi) != 3 or any(h <= l for l, h in zip(self.lo, self.hi)):
            raise ValueError(f"VoxelBox needs lo < hi on all three axes, got lo={self.lo} hi={self.hi}")

    @property
    def size(self) -> tuple:
        """(I, J, K) voxel counts."""
        return tuple(h - l for l, h in zip(self.lo, self.hi))

    def slices(self) -> tuple:
        """numpy slices for a ``(K, J, I)`` array."""
        return tuple(slice(self.lo[a], self.hi[a]) for a in (2, 1, 0))


_AXIS_NAMES = ("i", "j", "k")
_FAR = 1_000_000  # voxels past the volume beyond which a corner's exact position no longer matters


def voxel_box_from_ijk(lo, hi, geometry: VolumeGeometry) -> VoxelBox:
    """Voxel box from two inclusive corner indices (i, j, k), in any order; clamped to the volume."""
    corners = np.array([lo, hi], dtype=np.float64).reshape(2, 3)
    if not np.all(np.isfinite(corners)) or np.any(corners != np.round(corners)):
        raise ValueError(f"voxel indices must be integers, got {corners.tolist()}")
    # Far-away corners (1e20) would overflow int64: anything past the volume clamps the same way.
    corners = np.clip(corners, -_FAR, np.array(geometry.size) + _FAR).astype(np.int64)
    first, last = corners.min(axis=0), corners.max(axis=0)
    return _clamp(first, last + 1, geometry, f"index box {first.tolist()}..{last.tolist()} (inclusive)")


def voxel_box_from_physical(box: Box3D, geometry: VolumeGeometry) -> VoxelBox:
    """The voxels whose centres lie within the box's extent along each index axis.

    All 8 corners are mapped to continuous index space (correct for oblique volumes and rotated boxes,
    unlike the two corners of an axis-aligned bounding box); per axis the box spans [min, max]. A voxel
    is covered when its centre lies in that span, edges included: an edge exactly at voxel centre c
    covers voxel c. The result is clamped to the volume.
    """
    for axis in range(3):
        if box.size[axis] == 0:
            raise ValueError(f"the box has zero thickness along its axis {axis} (size "
                             f"{box.size.tolist()} mm); give it at least one slice of thickness")
    index = geometry.physical_to_index(box.corners())
    cmin, cmax = index.min(axis=0), index.max(axis=0)
    extent = np.array(geometry.size) - 0.5
    if np.any(cmax < -0.5) or np.any(cmin > extent):
        raise BoxOutsideVolumeError(_outside_message(box, geometry, cmin, cmax))
    # A box reaching far past the volume (±1e20 mm) is clamped like any other: cut the span first, so
    # the float -> int64 conversion cannot overflow.
    cmin_c, cmax_c = (np.clip(c, -_FAR, np.array(geometry.size) + _FAR) for c in (cmin, cmax))
    first = np.ceil(cmin_c - _INDEX_EPS).astype(np.int64)
    last = np.floor(cmax_c + _INDEX_EPS).astype(np.int64)
    for axis in range(3):
        if last[axis] < first[axis]:
            raise ValueError(
                f"the box covers no voxel centre along index axis {_AXIS_NAMES[axis]} (it spans continuous "
                f"index {cmin[axis]:.2f}..{cmax[axis]:.2f}, spacing {geometry.spacing[axis]:g} mm); "
                f"make it thicker along that axis")
    try:
        return _clamp(first, last + 1, geometry, "box")
    except BoxOutsideVolumeError:
        raise BoxOutsideVolumeError(_outside_message(box, geometry, cmin, cmax)) from None


def _clamp(lo, hi, geometry: VolumeGeometry, what: str) -> VoxelBox:
    """Cut [lo, hi) to the volume; error if nothing is left, warning if something was cut."""
    lo, hi, size = np.asarray(lo), np.asarray(hi), np.array(geometry.size)
    if np.any(hi <= 0) or np.any(lo >= size):
        raise BoxOutsideVolumeError(
            f"{what} lies outside the volume: voxel range lo={lo.tolist()} hi(excl)={hi.tolist()}, "
            f"volume size (I, J, K) = {geometry.size}")
    new_lo, new_hi = np.maximum(lo, 0), np.minimum(hi, size)
    cut = [f"{_AXIS_NAMES[a]} {lo[a]}..{hi[a] - 1} -> {new_lo[a]}..{new_hi[a] - 1}"
           for a in range(3) if new_lo[a] != lo[a] or new_hi[a] != hi[a]]
    warning = None
    if cut:
        warning = (f"{what} extends past the volume (size I, J, K = {geometry.size}); clamped to it: "
                   + ", ".join(cut) + " (inclusive voxel indices)")
    return VoxelBox(new_lo, new_hi, clamped=bool(cut), warning=warning)


def _fmt(values) -> str:
    return "(" + ", ".join(f"{v:.1f}" for v in values) + ")"


def _outside_message(box: Box3D, geometry: VolumeGeometry, cmin, cmax) -> str:
    vol_corners = np.array([[x, y, z] for z in (0, 1) for y in (0, 1) for x in (0, 1)], float)
    vol_corners = geometry.index_to_physical(vol_corners * np.array(geometry.size) - 0.5)
    blo, bhi = box.bounds()
    spans = ", ".join(f"{_AXIS_NAMES[a]} {cmin[a]:.1f}..{cmax[a]:.1f} (volume 0..{geometry.size[a] - 1})"
                      for a in range(3))
    return (f"the box lies outside the volume. Box LPS bounds {_fmt(blo)}..{_fmt(bhi)} mm; volume LPS "
            f"bounds {_fmt(vol_corners.min(0))}..{_fmt(vol_corners.max(0))} mm (RAS: negate x and y). "
            f"In voxel indices the box spans {spans}")


def parse_box_values(text) -> np.ndarray:
    """``"X1,Y1,Z1,X2,Y2,Z2"`` (or 6 numbers) → (2, 3) float array of the two corners."""
    from ProbSAMLib.errors import shown as cut_short

    shown = cut_short(text)  # 400 digits: not all
    if isinstance(text, str):
        parts = [p for p in text.replace(";", ",").replace(" ", ",").split(",") if p]
        try:
            values = [float(p) for p in parts]  # a number too large for a float reads as inf: refused below
        except ValueError:
            raise ValueError(f"box must be 6 numbers X1,Y1,Z1,X2,Y2,Z2, got {shown}") from None
    else:
        values = list(np.asarray(text, dtype=np.float64).ravel())
    if len(values) != 6 or not all(math.isfinite(v) for v in values):
        raise ValueError(f"box must be 6 finite numbers X1,Y1,Z1,X2,Y2,Z2, got {shown}")
    return np.array(values).reshape(2, 3)


def voxel_box_from_cli(values, space: str, geometry: VolumeGeometry) -> VoxelBox:
    """The CLI's ``--box X1,Y1,Z1,X2,Y2,Z2 --box-space {lps,ras,ijk}``.

    "ijk": inclusive voxel-index corners. "lps"/"ras": physical corners in mm, axis-aligned in that space.
    """
    corners = parse_box_values(values)
    if space.lower() == "ijk":
        return voxel_box_from_ijk(corners[0], corners[1], geometry)
    return voxel_box_from_physical(Box3D.from_corners(corners[0], corners[1], space=space), geometry)


def slice_boxes_2d(voxel_box: VoxelBox) -> list:
    """Per-slice 2D boxes along K: ``[(k, (x1, y1, x2, y2)), ...]``.

    Coordinates are pixels of the axial slice ``array[k]`` (shape ``(J, I)``), x ↔ i and y ↔ j, with the
    CONTRACTS.md convention that covering pixels i0..i1 inclusive gives x1 = i0, x2 = i1 + 1.
    """
    (i0, j0, k0), (i1, j1, k1) = voxel_box.lo, voxel_box.hi
    return [(k, (i0, j0, i1, j1)) for k in range(k0, k1)]


def slices_with_neighbours(volume: np.ndarray, ks) -> np.ndarray:
    """(K, H, W) volume, (n,) slice indices -> (n, 3, H, W): slices k - 1, k, k + 1 of each, the slice itself
    where the volume ends (what a model reading neighbouring slices is shown at the edge of a scan)."""
    ks = np.asarray(ks, dtype=np.int64)
    below, above = np.clip(ks - 1, 0, len(volume) - 1), np.clip(ks + 1, 0, len(volume) - 1)
    return np.stack([volume[below], volume[ks], volume[above]], axis=1)
