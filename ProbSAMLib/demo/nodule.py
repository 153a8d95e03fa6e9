"""The pieces every phantom renderer shares: the rendered volume's type, nodule density from the readers'
agreement and ratings, smooth noise, seeds. Used by the local-patch phantom (phantom.py) and the chest-field
phantom (chest.py), so neither imports the other's module for them."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Mapping, Sequence, Tuple

import numpy as np
import SimpleITK as sitk
from scipy import ndimage
from scipy.special import expit

_DEFAULT_RATINGS = {"texture": 5.0, "margin": 4.0, "calcification": 6.0}

LUNG_HU = -850.0
VESSEL_HU = 40.0
# Peak nodule density by texture rating 1..5 (ground glass .. solid).
_TEXTURE_HU = np.array([-600.0, -450.0, -300.0, -120.0, 30.0])
# Edge blur (Gaussian sigma, mm) by margin rating 1..5 (poorly defined .. sharp).
_MARGIN_SIGMA_MM = np.array([1.6, 1.2, 0.8, 0.5, 0.25])


def to_phantom_volume(image_hu: np.ndarray, spacing, origin, reader_masks, ratings, offset, info=None):
    """A PhantomVolume from a rendered float HU array (K, J, I): rounded, clipped to CT's int16 range, on an
    identity-direction grid with the given spacing (x, y, z) and origin."""
    hu = np.clip(np.rint(image_hu), -1024, 3071).astype(np.int16)
    itk = sitk.GetImageFromArray(hu)
    itk.SetSpacing([float(s) for s in spacing])
    itk.SetOrigin([float(o) for o in origin])
    itk.SetDirection((1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))
    return PhantomVolume(image=itk, reader_masks=reader_masks, ratings=[dict(r) for r in ratings],
                         offset=tuple(offset), info=dict(info or {}))


@dataclass
class PhantomVolume:
    """A rendered phantom.

    image:        SimpleITK image, int16 HU, size (I, J, K), identity direction.
    reader_masks: (R, K, J, I) bool, the readers' masks on the image grid.
    ratings:      one dict a reader (rating name -> value).
    offset:       (k, j, i) index where the input mask grid was placed in the image.
    info:         free-form metadata (patient id, ...).
    """

    image: sitk.Image
    reader_masks: np.ndarray
    ratings: list
    offset: Tuple[int, int, int] = (0, 0, 0)
    info: dict = field(default_factory=dict)

    @property
    def array(self) -> np.ndarray:
        """(K, J, I) int16 HU."""
        return sitk.GetArrayFromImage(self.image)

    @property
    def agreement(self) -> np.ndarray:
        """(K, J, I) float32, fraction of readers including each voxel."""
        return self.reader_masks.mean(axis=0, dtype=np.float32)


def stable_seed(*parts) -> int:
    """A seed from any printable parts that does not change between runs or platforms."""
    text = ":".join(str(p) for p in parts).encode()
    return int.from_bytes(hashlib.sha256(text).digest()[:8], "little") >> 1


def mean_rating(ratings: Sequence[Mapping[str, float]], name: str) -> float:
    """Mean of one rating over the readers, with a neutral default when absent."""
    values = [float(r[name]) for r in ratings if name in r and r[name] is not None]
    return float(np.mean(values)) if values else _DEFAULT_RATINGS[name]


def _smooth_noise(rng, shape, sigma_vox, dtype=np.float32) -> np.ndarray:
    """Unit-variance Gaussian noise smoothed with `sigma_vox` (z, y, x) voxels."""
    noise = rng.standard_normal(shape, dtype=dtype)
    if max(sigma_vox) > 0:
        noise = ndimage.gaussian_filter(noise, sigma_vox, truncate=3.0)
    std = noise.std()
    return noise / std if std > 0 else noise


def _grid_mm(shape, spacing_zyx):
    """Open (broadcastable) voxel-centre coordinates in mm, ordered (z, y, x)."""
    return [np.arange(n, dtype=np.float32).reshape([-1 if a == i else 1 for a in range(3)]) * s
            for i, (n, s) in enumerate(zip(shape, spacing_zyx))]


def tube(grid_mm, point, direction, radius: float, softness: float) -> np.ndarray:
    """Soft infinite tube in [0, 1] around the line `point` + t * `direction` (unit), (z, y, x) mm.

    grid_mm: the open grid of :func:`_grid_mm`; returns a (K, J, I) float32 array.
    """
    z, y, x = grid_mm
    dz, dy, dx = z - point[0], y - point[1], x - point[2]
    along = dz * direction[0] + dy * direction[1] + dx * direction[2]
    dist2 = dz * dz + dy * dy + dx * dx - along * along
    dist = np.sqrt(np.maximum(dist2, 0.0))
    return expit((radius - dist) / softness)


def _nodule_box(union: np.ndarray, margin_vox) -> Tuple[slice, ...]:
    """Index box around the readers' union, grown by `margin_vox` (z, y, x), clipped."""
    idx = np.nonzero(union)
    return tuple(slice(max(int(a.min()) - m, 0), min(int(a.max()) + m + 1, n))
                 for a, m, n in zip(idx, margin_vox, union.shape))


def _nodule_density(rng, masks, spacing_zyx, ratings, box) -> Tuple[np.ndarray, np.ndarray]:
    """Nodule opacity in [0, 1] and nodule HU inside `box`, both (k, j, i) float32."""
    agreement = masks[(slice(None),) + box].mean(axis=0, dtype=np.float32)
    sigma_mm = float(np.interp(mean_rating(ratings, "margin"), np.arange(1, 6), _MARGIN_SIGMA_MM))
    opacity = ndimage.gaussian_filter(agreement, [sigma_mm / s for s in spacing_zyx], truncate=3.0)
    texture = mean_rating(ratings, "texture")
    peak = float(np.interp(texture, np.arange(1, 6), _TEXTURE_HU))
    # Ground glass is mottled, solid tissue nearly homogeneous.
    mottle = float(np.interp(texture, [1, 5], [55.0, 15.0]))
    hu = peak + mottle * _smooth_noise(rng, agreement.shape, [0.8 / s for s in spacing_zyx])
    if mean_rating(ratings, "calcification") < 5.5:
        core = agreement >= 1.0
        if core.any():
            depth = ndimage.distance_transform_edt(core, sampling=spacing_zyx)
            calc = (depth >= 0.6 * depth.max()).astype(np.float32)
            hu += 450.0 * ndimage.gaussian_filter(calc, [0.4 / s for s in spacing_zyx])
    return opacity, hu.astype(np.float32)
