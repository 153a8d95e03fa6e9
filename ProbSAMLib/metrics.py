"""Metrics for sets of segmentations: N samples S against M annotator masks Y (LIDC evaluation protocol).

Conventions (state them with every number):
- Stacks are ``(N, *spatial)``: samples ``(N, H, W)`` or ``(N, K, J, I)``, annotations ``(M, ...)`` with
  the same spatial shape. Masks are boolean (0/1 integer or float arrays are accepted and checked).
- Foreground only: d(a, b) = 1 − IoU(a, b) with IoU(∅, ∅) = 1 (distance 0) and IoU = 0 when exactly one
  mask is empty; Dice(∅, ∅) = 1 likewise.
- GED includes self-pairs (the usual estimator), sample diversity does not; see each function.
- NCC (PHiSeg's S_NCC) uses natural logs and PHiSeg's eps = 1e-8 inside the log.

Everything runs on flattened ``(N, P)`` arrays: pairwise intersections are one matrix product.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.optimize import linear_sum_assignment

# A sample's mask is its foreground probability > MASK_THRESHOLD, everywhere ProbSAMLib cuts probabilities
# (sample_masks, sample_volume, the mean prediction scored here).
MASK_THRESHOLD = 0.5

# Float32 sums of 0/1 products are exact integers up to 2**24; beyond that count in float64.
_FLOAT32_EXACT = 2 ** 24

# PHiSeg's eps inside log(p + eps): keeps log finite for binary samples (log(eps) ≈ −18.4).
NCC_EPS = 1e-8

# A cross-entropy map whose range is below this fraction of its magnitude (or of 1) counts as constant.
_CONSTANT_RTOL = 1e-9


# --- input checks ----------------------------------------------------------------------------------------

def _as_mask(x, name: str) -> np.ndarray:
    """Any array of 0/1 values → bool array; ValueError for other values."""
    x = np.asarray(x)
    if x.dtype == bool:
        return x
    if not ((x == 0) | (x == 1)).all():
        raise ValueError(f"{name} must be a boolean mask (or 0/1 values); got values outside {{0, 1}}")
    return x.astype(bool)


def _as_stack(x, name: str, probabilities: bool = False) -> np.ndarray:
    """(N, *spatial) stack, N ≥ 1, at least 2 spatial axes, no empty axis.

    probabilities=True: float values in [0, 1] are allowed (returned as float64), bool stays bool.
    """
    x = np.asarray(x)
    if x.ndim < 3:
        raise ValueError(f"{name} must be a stack (N, H, W) or (N, K, J, I); got shape {x.shape}")
    if x.shape[0] == 0:
        raise ValueError(f"{name} is an empty stack (N = 0); shape {x.shape}")
    if x.size == 0:
        raise ValueError(f"{name} has an empty spatial axis; shape {x.shape}")
    if not probabilities or x.dtype == bool:
        return _as_mask(x, name)
    x = x.astype(np.float64)
    if not np.isfinite(x).all() or x.min() < 0 or x.max() > 1:
        raise ValueError(f"{name} must hold probabilities in [0, 1] (or boolean masks)")
    return x


def _check_same_spatial(x: np.ndarray, y: np.ndarray, names=("samples", "annotations")):
    if x.shape[1:] != y.shape[1:]:
        raise ValueError(f"{names[0]} and {names[1]} have different spatial shapes: "
                         f"{x.shape[1:]} vs {y.shape[1:]}")


def _pair(a, b):
    a, b = _as_mask(a, "a"), _as_mask(b, "b")
    if a.shape != b.shape:
        raise ValueError(f"masks have different shapes: {a.shape} vs {b.shape}")
    if a.size == 0:
        raise ValueError("masks are empty arrays (no pixels)")
    return a, b


# --- two masks -------------------------------------------------------------------------------------------

def iou(a, b) -> float:
    """IoU of two masks of the same shape; 1 when both are empty."""
    a, b = _pair(a, b)
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


def dice(a, b) -> float:
    """Dice of two masks of the same shape; 1 when both are empty."""
    a, b = _pair(a, b)
    total = a.sum() + b.sum()
    return 1.0 if total == 0 else float(2 * np.logical_and(a, b).sum() / total)


# --- pairwise matrices -----------------------------------------------------------------------------------

def _pairwise_counts(x: np.ndarray, y: np.ndarray):
    """Checked stacks (N, ...), (M, ...) → intersections (N, M), areas (N,), areas (M,) as float."""
    _check_same_spatial(x, y, ("x", "y"))
    dtype = np.float32 if x[0].size <= _FLOAT32_EXACT else np.float64
    xf = x.reshape(len(x), -1).astype(dtype)
    yf = xf if y is x else y.reshape(len(y), -1).astype(dtype)   # one copy for x vs itself
    inter = (xf @ yf.T).astype(np.float64)
    return inter, xf.sum(1, dtype=np.float64), yf.sum(1, dtype=np.float64)


def pairwise_iou(x, y) -> np.ndarray:
    """x (N, ...), y (M, ...) masks → (N, M) float64 IoU matrix; empty vs empty = 1."""
    inter, ax, ay = _pairwise_counts(_as_stack(x, "x"), _as_stack(y, "y"))
    union = ax[:, None] + ay[None, :] - inter
    return np.divide(inter, union, out=np.ones_like(inter), where=union > 0)


def pairwise_dice(x, y) -> np.ndarray:
    """x (N, ...), y (M, ...) masks → (N, M) float64 Dice matrix; empty vs empty = 1."""
    inter, ax, ay = _pairwise_counts(_as_stack(x, "x"), _as_stack(y, "y"))
    total = ax[:, None] + ay[None, :]
    return np.divide(2 * inter, total, out=np.ones_like(inter), where=total > 0)


# --- set metrics -----------------------------------------------------------------------------------------

def _samples_annotations(samples, annotations):
    s, y = _as_stack(samples, "samples"), _as_stack(annotations, "annotations")
    _check_same_spatial(s, y)
    return s, y


def ged(samples, annotations) -> float:
    """Squared generalised energy distance D²_GED = 2·E[d(S,Y)] − E[d(S,S')] − E[d(Y,Y')], d = 1 − IoU.

    samples (N, ...), annotations (M, ...) masks. Each expectation is the plain mean over ALL ordered
    pairs, self-pairs included (d(S_i, S_i) = 0): the estimator of the Probabilistic U-Net, PHiSeg and
    MoSE code. It is biased low in N, which is one reason GED falls as N grows: report N.
    """
    s, y = _samples_annotations(samples, annotations)
    both = np.concatenate([s, y])                              # one (N+M)² product instead of three
    d = 1.0 - pairwise_iou(both, both)
    n = len(s)
    d_sy, d_ss, d_yy = d[:n, n:].mean(), d[:n, :n].mean(), d[n:, n:].mean()
    return float(2 * d_sy - d_ss - d_yy)


def hm_iou(samples, annotations) -> float:
    """Hungarian-matched IoU (MoSE): mean IoU of the optimal matching of N samples to M annotations.

    samples (N, ...), annotations (M, ...), uniform weight on each side. Both stacks are replicated to
    L = lcm(N, M) (each sample L/N times, each annotation L/M times), the L × L cost 1 − IoU is matched
    with the Hungarian algorithm and the L matched IoUs are averaged. This equals MoSE's optimal transport
    between the two uniform distributions and, unlike repeating the shorter stack cyclically, does not
    depend on the order of the readers when M does not divide N (e.g. N = 16, M = 3: L = 48).
    """
    s, y = _samples_annotations(samples, annotations)
    pair = pairwise_iou(s, y)                                  # (N, M), computed once
    n, m = pair.shape
    length = math.lcm(n, m)
    tiled = np.repeat(np.repeat(pair, length // n, axis=0), length // m, axis=1)   # (L, L)
    rows, cols = linear_sum_assignment(1.0 - tiled)
    return float(tiled[rows, cols].mean())


def dmax(samples, annotations) -> float:
    """Max Dice over all sample × annotator pairs."""
    s, y = _samples_annotations(samples, annotations)
    return float(pairwise_dice(s, y).max())


def sample_diversity(samples) -> float:
    """E[d(S, S')] = mean of 1 − IoU over DISTINCT ordered pairs i ≠ j (N(N−1) of them).

    Unlike GED's E[d(S,S')] (self-pairs included, = this × (N−1)/N). NaN when N = 1 (no pair).
    """
    s = _as_stack(samples, "samples")
    n = len(s)
    if n < 2:
        return float("nan")
    d = 1.0 - pairwise_iou(s, s)
    return float((d.sum() - np.trace(d)) / (n * (n - 1)))


def _is_constant(a: np.ndarray) -> bool:
    # Relative test: a map that is constant in exact arithmetic (identical binary samples) carries
    # ~1e-24 of round-off, which a plain `std > 0` would turn into a meaningless correlation.
    return np.ptp(a) <= _CONSTANT_RTOL * max(1.0, float(np.abs(a).max()))


def _correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Normalised cross-correlation (Pearson) of two flat maps; NaN when either map is constant."""
    if _is_constant(a) or _is_constant(b):
        return float("nan")
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum()))


def ncc(samples, annotations, eps: float = NCC_EPS) -> float:
    """PHiSeg's S_NCC = E_y[ NCC( E_s[CE(s̄, s)], E_s[CE(y, s)] ) ].

    samples (N, ...): binary masks or foreground probabilities; annotations (M, ...) masks.
    CE(t, s) = −[t·ln(s + eps) + (1 − t)·ln(1 − s + eps)] per pixel: target t (the mean sample s̄ or an
    annotator y), prediction s (a sample), as in PHiSeg's ``pixel_wise_xent``. The first map says where
    the samples disagree with their mean, the second where they disagree with annotator y; NCC is their
    Pearson correlation over pixels, averaged over the M annotators. Higher is better, in [−1, 1].

    Zero variance: NCC is undefined when a map is constant (e.g. identical binary samples make the first
    map constant; a range below 1e-9 relative counts as constant). Such a term is NaN and NaN propagates
    to the result, as in PHiSeg's code. When averaging over a data set, use np.nanmean and report how
    many cases were NaN.
    """
    s, y = _as_stack(samples, "samples", probabilities=True), _as_stack(annotations, "annotations")
    _check_same_spatial(s, y)
    s, y = s.reshape(len(s), -1).astype(np.float64), y.reshape(len(y), -1).astype(np.float64)
    # CE is linear in the target: E_s[CE(t, s)] = −[t·E ln(s+eps) + (1−t)·E ln(1−s+eps)].
    log_fg = np.log(s + eps).mean(0)                           # (P,)
    log_bg = np.log(1.0 - s + eps).mean(0)                     # (P,)
    mean_sample = s.mean(0)
    e_ss = -(mean_sample * log_fg + (1 - mean_sample) * log_bg)
    e_sy = -(y * log_fg + (1 - y) * log_bg)                    # (M, P)
    return float(np.mean([_correlation(e_ss, e) for e in e_sy]))


def mean_prediction_scores(samples_or_probs, annotations, threshold: float = MASK_THRESHOLD,
                           vote_level: float = 0.5) -> dict:
    """Dice / IoU of the thresholded mean prediction against each annotator and the majority vote.

    samples_or_probs (N, ...): binary samples or per-sample probabilities; their mean over N is
    thresholded with ``mean > threshold`` (as sample masks are ``probability > threshold``).
    The majority vote is ``fraction of annotators ≥ vote_level`` (pylidc's consensus rule: 2 of 4 readers
    at 0.5). Returns JSON-ready floats: ``dice_per_annotator`` / ``iou_per_annotator`` (lists of M),
    their means ``dice_mean_annotator`` / ``iou_mean_annotator``, ``dice_majority`` / ``iou_majority``.
    """
    s = _as_stack(samples_or_probs, "samples_or_probs", probabilities=True)
    y = _as_stack(annotations, "annotations")
    _check_same_spatial(s, y)
    prediction = s.mean(0) > threshold                         # (...)
    majority = y.mean(0) >= vote_level
    dices = pairwise_dice(prediction[None], y)[0]
    ious = pairwise_iou(prediction[None], y)[0]
    return {
        "dice_per_annotator": [float(v) for v in dices],
        "iou_per_annotator": [float(v) for v in ious],
        "dice_mean_annotator": float(dices.mean()),
        "iou_mean_annotator": float(ious.mean()),
        "dice_majority": dice(prediction, majority),
        "iou_majority": iou(prediction, majority),
        "threshold": float(threshold),
        "vote_level": float(vote_level),
    }


# --- calibration -----------------------------------------------------------------------------------------

ECE_BINS = 10


def calibration_bins(probabilities, annotations, n_bins: int = ECE_BINS, region=None) -> np.ndarray:
    """Reliability-diagram sums of one case: (3, n_bins) rows = pixel-reader pairs, sum of p, sum of y.

    probabilities (...) the predicted foreground probability per pixel (e.g. the mean of N samples);
    annotations (M, ...) masks: every (pixel, annotator) pair is one binary outcome, so a pixel that 3 of
    4 readers marked counts as 3 hits and 1 miss at its probability. region (...) bool restricts the
    pixels (evaluate.py: the prompt box, where all the ambiguity is). Equal-width bins on [0, 1], the
    last one closed. Sums add over cases, so a data set's ECE (and its bootstrap) pools cases exactly.
    """
    p = np.asarray(probabilities, dtype=np.float64)
    y = _as_stack(annotations, "annotations")
    if y.shape[1:] != p.shape:
        raise ValueError(f"probabilities {p.shape} and annotations {y.shape[1:]} differ in shape")
    if not np.isfinite(p).all() or p.min() < 0 or p.max() > 1:
        raise ValueError("probabilities must lie in [0, 1]")
    keep = np.ones(p.shape, bool) if region is None else np.asarray(region, dtype=bool)
    p, hits = p[keep], y[:, keep].sum(0).astype(np.float64)     # (P,), (P,) annotators marking each pixel
    bins = np.minimum((p * n_bins).astype(np.int64), n_bins - 1)
    m = len(y)
    return np.stack([np.bincount(bins, minlength=n_bins) * float(m),
                     np.bincount(bins, weights=p * m, minlength=n_bins),
                     np.bincount(bins, weights=hits, minlength=n_bins)])


def ece_from_bins(bins: np.ndarray) -> float:
    """Expected calibration error Σ_b (n_b / n) · |mean p_b − mean y_b| from calibration_bins sums."""
    count, sum_p, sum_y = np.asarray(bins, dtype=np.float64)
    total = count.sum()
    if total == 0:
        return float("nan")
    return float(np.abs(sum_p - sum_y).sum() / total)


def ece(probabilities, annotations, n_bins: int = ECE_BINS, region=None) -> float:
    """Expected calibration error of per-pixel foreground probabilities against M annotators (in [0, 1],
    lower is better); see calibration_bins for the outcomes and bins."""
    return ece_from_bins(calibration_bins(probabilities, annotations, n_bins, region))
