"""Per-pixel uncertainty from N sampled foreground probability maps, and per-sample areas / volumes.

Conventions:
- Input stacks are ``(N, *spatial)``: ``(N, H, W)`` slices or ``(N, K, J, I)`` volumes, float
  probabilities in [0, 1]; boolean masks are accepted too (probabilities of exactly 0 or 1).
- Entropies are in NATS (natural log), with 0·ln 0 = 0: a pixel on in half of the samples has
  predictive entropy ln 2 ≈ 0.693, the maximum for two classes.
- Variance is the population variance over the N samples (ddof = 0), at most 0.25.
- Outputs are float32 maps with the spatial shape; sums are taken in float64 first.

Decomposition (Bernoulli foreground per pixel, p_n the n-th sample's probability):
    predictive entropy  H[E p]   = h(mean_n p_n)          total uncertainty
    expected entropy    E[H p]   = mean_n h(p_n)          what each sample is unsure of (aleatoric)
    mutual information  H[E p] − E[H p] ≥ 0               disagreement between samples (epistemic-like)
with h(p) = −p ln p − (1 − p) ln(1 − p). For binary samples E[H p] = 0 and MI = H[E p].
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.special import entr

# Where every sample is confidently off (< 0.1) or on (> 0.9), the maps carry no information: an overlay
# shows them only elsewhere (informative_mask), so the lesion's uncertain edge shows and the box does not.
CONFIDENT_LOW, CONFIDENT_HIGH = 0.1, 0.9


def informative_mask(probs) -> np.ndarray:
    """probs (N, ...) -> (...) bool: voxels where NOT every sample's probability is below CONFIDENT_LOW, and
    NOT every sample's above CONFIDENT_HIGH."""
    probs = np.asarray(probs)
    return ~((probs < CONFIDENT_LOW).all(axis=0) | (probs > CONFIDENT_HIGH).all(axis=0))


# The per-voxel maps a volume run keeps (VolumeSamplingResult), writes (<name>.nrrd) and the worker sends.
MAP_NAMES = ("mean_probability", "entropy", "variance", "mutual_information")


@dataclass
class UncertaintyMaps:
    """All maps float32 with the input's spatial shape; entropies in nats."""

    mean_probability: np.ndarray
    variance: np.ndarray
    entropy: np.ndarray             # predictive entropy H[E p]
    expected_entropy: np.ndarray    # E[H p]
    mutual_information: np.ndarray  # entropy − expected_entropy, clipped at 0

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def _check_stack(x, name: str) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim < 2:
        raise ValueError(f"{name} must be a stack (N, ...) with at least one spatial axis; "
                         f"got shape {x.shape}")
    if x.shape[0] == 0:
        raise ValueError(f"{name} is an empty stack (N = 0); shape {x.shape}")
    if x.size == 0:
        raise ValueError(f"{name} has an empty spatial axis; shape {x.shape}")
    return x


def _bernoulli_entropy(p: np.ndarray) -> np.ndarray:
    """h(p) in nats, exactly 0 at p = 0 and p = 1 (scipy's entr(x) = −x ln x, entr(0) = 0)."""
    return entr(p) + entr(1.0 - p)


def uncertainty_maps(probs, eps: float = 1e-10) -> UncertaintyMaps:
    """probs (N, ...) float in [0, 1] (or bool masks) → UncertaintyMaps of shape (...), float32, nats.

    eps: mutual information below eps is set to 0. H[E p] − E[H p] is a difference of nearly equal
    float64 numbers where the samples agree, and round-off (~1e-16) should not show as disagreement.
    Samples are processed one at a time, so memory stays at a few spatial-size float64 buffers.
    """
    probs = _check_stack(probs, "probs")
    if probs.dtype != bool:
        if not np.issubdtype(probs.dtype, np.number):
            raise ValueError(f"probs must be numeric or boolean, got dtype {probs.dtype}")
        if not np.isfinite(probs).all() or probs.min() < 0 or probs.max() > 1:
            raise ValueError("probs must hold probabilities in [0, 1] (no NaN)")
    n = probs.shape[0]

    total = np.zeros(probs.shape[1:], np.float64)
    expected_entropy = np.zeros(probs.shape[1:], np.float64)
    for p in probs:
        p = p.astype(np.float64)
        total += p
        expected_entropy += _bernoulli_entropy(p)
    mean = total / n
    expected_entropy /= n

    # Two passes for the variance: E[p²] − E[p]² cancels badly where all samples agree.
    variance = np.zeros_like(mean)
    for p in probs:
        variance += (p.astype(np.float64) - mean) ** 2
    variance /= n

    entropy = _bernoulli_entropy(mean)
    mutual_information = entropy - expected_entropy
    mutual_information[mutual_information < eps] = 0.0       # clip at 0 and drop round-off
    return UncertaintyMaps(
        mean_probability=mean.astype(np.float32),
        variance=variance.astype(np.float32),
        entropy=entropy.astype(np.float32),
        expected_entropy=expected_entropy.astype(np.float32),
        mutual_information=mutual_information.astype(np.float32),
    )


def sample_areas(masks, pixel_area: float = 1.0) -> np.ndarray:
    """masks (N, ...) → (N,) float64 foreground area (2D) or volume (3D) of each sample, in physical units.

    pixel_area: the area of one pixel (mm², spacing_x · spacing_y) or volume of one voxel (mm³,
    the product of the three spacings). 1.0 gives pixel / voxel counts.
    """
    masks = _check_stack(masks, "masks")
    if masks.dtype != bool:
        if not ((masks == 0) | (masks == 1)).all():
            raise ValueError("masks must be boolean (or 0/1 values)")
        masks = masks.astype(bool)
    pixel_area = float(pixel_area)
    if not np.isfinite(pixel_area) or pixel_area <= 0:
        raise ValueError(f"pixel_area must be a positive number, got {pixel_area}")
    counts = masks.reshape(len(masks), -1).sum(1, dtype=np.int64)
    return counts.astype(np.float64) * pixel_area
