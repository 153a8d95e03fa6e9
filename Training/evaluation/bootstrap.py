"""95 % confidence intervals by a bootstrap over patients (the unit that was sampled, not the slice).

Slices of one patient are correlated (neighbouring slices of one nodule look alike), so resampling
slices would make the intervals too narrow. Each replicate draws as many patients as there are, with
replacement, and takes the slice-weighted mean over the drawn patients' slices (a patient drawn twice
counts twice). Data without patient ids use the series UID as the cluster (Training/data/import_pickle.py).

A method difference uses the same replicates for both methods (a paired bootstrap of the difference),
so it is far tighter than comparing two separate intervals. Intervals are percentile intervals.

    boot = PatientBootstrap(patient_ids, n_boot=1000, seed=0)
    boot.mean(per_slice_ged)                 -> Interval(estimate, low, high)
    boot.difference(ged_a, ged_b)            -> Interval of mean(a) - mean(b)
    boot.ratio(ged_a, ged_b)                 -> Interval of mean(a) / mean(b)
    boot.ece(bins) / boot.ece_difference(bins_a, bins_b)   (bins: metrics.calibration_bins per slice)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ProbSAMLib.metrics import ece_from_bins


@dataclass
class Interval:
    estimate: float
    low: float
    high: float
    n: int  # slices that entered the estimate (NaN values excluded)

    def format(self, digits: int = 3) -> str:
        if not np.isfinite(self.estimate):
            return "–"
        return f"{self.estimate:.{digits}f} [{self.low:.{digits}f}, {self.high:.{digits}f}]"


class PatientBootstrap:
    """Replicate weights (n_boot, C): how often each of the C clusters (patients) was drawn."""

    def __init__(self, clusters: Sequence, n_boot: int = 1000, seed: int = 0, level: float = 0.95):
        labels, self.inverse = np.unique(np.asarray(clusters, dtype=str), return_inverse=True)
        self.n_clusters, self.n_boot, self.level = len(labels), int(n_boot), float(level)
        if self.n_clusters == 0:
            raise ValueError("no slices to bootstrap")
        draws = np.random.default_rng([seed, 2024]).integers(0, self.n_clusters, (self.n_boot, self.n_clusters))
        self.weights = np.zeros((self.n_boot, self.n_clusters))
        np.add.at(self.weights, (np.arange(self.n_boot)[:, None], draws), 1.0)

    def _per_cluster(self, values: np.ndarray) -> np.ndarray:
        """(R, ...) per-slice values -> (C, ...) per-cluster sums."""
        out = np.zeros((self.n_clusters,) + values.shape[1:])
        np.add.at(out, self.inverse, values)
        return out

    def _interval(self, estimate: float, replicates: np.ndarray, n: int) -> Interval:
        replicates = replicates[np.isfinite(replicates)]
        if not np.isfinite(estimate) or replicates.size == 0:
            return Interval(float("nan"), float("nan"), float("nan"), n)
        tail = 100 * (1 - self.level) / 2
        low, high = np.percentile(replicates, [tail, 100 - tail])
        return Interval(float(estimate), float(low), float(high), n)

    def _ratio(self, values: np.ndarray):
        """Estimate and replicates of the NaN-excluding mean of per-slice values (R,)."""
        values = np.asarray(values, dtype=np.float64)
        finite = np.isfinite(values)
        sums = self._per_cluster(np.where(finite, values, 0.0))
        counts = self._per_cluster(finite.astype(np.float64))
        with np.errstate(invalid="ignore", divide="ignore"):
            estimate = sums.sum() / counts.sum() if counts.sum() else float("nan")
            replicates = (self.weights @ sums) / (self.weights @ counts)
        return estimate, replicates, int(finite.sum())

    def mean(self, values) -> Interval:
        """Mean of per-slice values (NaN slices excluded, counted in n) with its interval."""
        return self._interval(*self._ratio(values))

    def difference(self, a, b) -> Interval:
        """Paired: mean(a) - mean(b) over the slices where both are finite, same replicates for both."""
        a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
        return self._interval(*self._ratio(a - b))  # NaN in either -> NaN difference -> excluded

    def ratio(self, a, b) -> Interval:
        """Paired: mean(a) / mean(b) over the slices where both are finite, same replicates for both."""
        a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
        both = np.isfinite(a) & np.isfinite(b)
        (ea, ra, n), (eb, rb, _) = self._ratio(np.where(both, a, np.nan)), self._ratio(np.where(both, b, np.nan))
        with np.errstate(invalid="ignore", divide="ignore"):
            return self._interval(ea / eb if eb else float("nan"), ra / rb, n)

    def _ece(self, bins: np.ndarray):
        """bins (R, 3, n_bins) per-slice calibration sums -> ECE estimate and replicates."""
        per_cluster = self._per_cluster(np.asarray(bins, dtype=np.float64))          # (C, 3, B)
        pooled = np.tensordot(self.weights, per_cluster, axes=(1, 0))              # (n_boot, 3, B)
        return ece_from_bins(per_cluster.sum(0)), np.array([ece_from_bins(p) for p in pooled])

    def ece(self, bins) -> Interval:
        estimate, replicates = self._ece(bins)
        return self._interval(estimate, replicates, len(bins))

    def ece_difference(self, bins_a, bins_b) -> Interval:
        (ea, ra), (eb, rb) = self._ece(bins_a), self._ece(bins_b)
        return self._interval(ea - eb, ra - rb, len(bins_a))
