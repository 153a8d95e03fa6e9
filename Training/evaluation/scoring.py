"""Scoring a predictor on slices of a data set: one metric row per slice (evaluate_slices) and their means
(summarise), for evaluate.py, train.py's validation and the report's seed summary.

A row holds the slice's ids (ID_KEYS), every metric of ProbSAMLib.metrics at the sample sizes asked for, and
the calibration sums behind ECE ("calibration_bins"). Each slice's latent noise is drawn from (seed, slice
index) only, so rows do not depend on the batch size or on which other slices are scored.
"""
from __future__ import annotations

import sys
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
from tqdm import tqdm

from ProbSAMLib import metrics
from ProbSAMLib.inference import memory
from ProbSAMLib.inference.device import autocast
from ProbSAMLib.metrics import MASK_THRESHOLD
from ProbSAMLib.modeling.probsam import ProbSAM
from Training.data.batches import SliceBatches

# Per-slice values that identify the slice rather than measure it (summarise skips them; the report's
# per-slice CSV reads them back as whole numbers and text).
INT_KEYS = ("position", "slice", "n_marked")
TEXT_KEYS = ("patient_id", "series_uid", "case")
ID_KEYS = INT_KEYS + TEXT_KEYS



def slice_metrics(probs: np.ndarray, annotations: np.ndarray, sizes: Sequence[int],
                  region: Optional[np.ndarray] = None) -> Dict[str, float]:
    """probs (N, H, W) sample probabilities, annotations (M, H, W) -> the metric row of one slice.

    ``region`` (H, W) bool: the pixels ECE is computed on (the prompt box). The row's "calibration_bins"
    (3, bins) are the sums behind ECE, pooled over slices by the data-set ECE and its bootstrap.
    """
    samples = probs > MASK_THRESHOLD
    row = {f"ged@{n}": metrics.ged(samples[:n], annotations) for n in sizes}
    # The product's protocol: only the readers who marked this slice (absent readers are the marking head's,
    # not empty outlines); the literature's keeps all M slots, an absent reader an empty mask.
    marked = annotations[annotations.reshape(len(annotations), -1).any(1)]
    if len(marked):
        row.update({f"ged_marked@{n}": metrics.ged(samples[:n], marked) for n in sizes})
        row.update({f"hm_iou_marked@{n}": metrics.hm_iou(samples[:n], marked) for n in sizes})
    row.update({f"hm_iou@{n}": metrics.hm_iou(samples[:n], annotations) for n in sizes})
    small = samples[:min(sizes)]
    n = len(small)
    row[f"ncc@{n}"] = metrics.ncc(probs[:n], annotations)
    row[f"dmax@{n}"] = metrics.dmax(small, annotations)
    row[f"diversity@{n}"] = metrics.sample_diversity(small)
    bins = metrics.calibration_bins(probs[:n].mean(0), annotations, region=region)
    row[f"ece@{n}"] = metrics.ece_from_bins(bins)
    # The mean prediction: the average of the N sample probabilities, cut at MASK_THRESHOLD (issue 13's
    # definition; averaging the thresholded samples instead would be a vote of the N masks).
    scores = metrics.mean_prediction_scores(probs[:n], annotations)
    row.update({key: scores[key] for key in ("dice_mean_annotator", "iou_mean_annotator", "dice_majority",
                                             "iou_majority")})
    row["calibration_bins"] = bins
    return row


def slice_noise(seed: int, slice_index: int, n_samples: int, latent_dim: int) -> torch.Tensor:
    """(N, L) standard-normal latent noise of one slice, a function of (seed, slice index) only."""
    state = np.random.SeedSequence([int(seed), int(slice_index), 7]).generate_state(2, dtype=np.uint64)
    generator = torch.Generator().manual_seed(int(state[0] >> np.uint64(1)))
    return torch.randn((n_samples, latent_dim), generator=generator)


def box_region(box: np.ndarray, image_hw) -> np.ndarray:
    """(H, W) bool of the pixels whose centres lie in the box (x1, y1, x2, y2, continuous edges)."""
    ys, xs = np.arange(image_hw[0]) + 0.5, np.arange(image_hw[1]) + 0.5
    return ((ys >= box[1]) & (ys < box[3]))[:, None] & ((xs >= box[0]) & (xs < box[2]))[None, :]


def slices_per_batch(predictor, n_samples: int, n_slices: int, cap: int = 16) -> int:
    """``cap`` slices, or fewer where a SAM encoder would not fit: ViT-B needs about 2.4 GiB a slice, so 16
    slices and 100 samples would not fit a 24 GB GPU (ProbSAMLib.inference.memory)."""
    learner = getattr(predictor, "learner", predictor)  # the prior-mean baseline wraps a learner
    model = getattr(learner, "model", None)
    if isinstance(model, ProbSAM):
        return memory.choose_batch(model, n_samples, n_slices, cap=cap)
    return max(1, min(cap, n_slices))


@torch.no_grad()
def evaluate_slices(predictor, batches: SliceBatches, positions: np.ndarray, sizes: Sequence[int] = (16, 100),
                    seed: int = 0, batch_size: int = 0, device: Optional[torch.device] = None,
                    embeddings_of=None, progress: bool = True) -> List[dict]:
    """One metric row per slice for a learner or a baseline (Training/evaluation/baselines.py).

    ``embeddings_of(positions)`` supplies cached embeddings (ProbSAM). The annotations are all reader
    slots (absent reader = empty mask); n_marked is how many of them marked the slice. ``batch_size`` 0
    chooses the slices per batch from free memory (at most 16); the rows do not depend on it.
    """
    parameters = list(predictor.parameters())
    device = device or (parameters[0].device if parameters else torch.device("cpu"))
    predictor.eval()
    reads_neighbours = getattr(predictor, "reads_neighbours", False)  # the baselines read one slice
    if reads_neighbours and batches.dataset.neighbours is None:
        print(f"warning: the model reads the slices below and above, but {batches.dataset.path} has no "
              f"neighbours.npy: it is shown each slice alone (copied), as at the ends of a scan", file=sys.stderr)
    table = batches.dataset.table
    n_max, latent_dim = max(sizes), int(getattr(predictor, "latent_dim", 0))
    rows = []
    batch_size = batch_size or slices_per_batch(predictor, n_max, len(positions))
    for start in tqdm(range(0, len(positions), batch_size), desc="evaluating", disable=not progress, leave=False):
        chunk = positions[start:start + batch_size]
        batch = batches.read(chunk)
        slices = batches.dataset.indices[chunk]
        noise = torch.stack([slice_noise(seed, s, n_max, latent_dim) for s in slices]) if latent_dim else None
        embeddings = embeddings_of(chunk) if embeddings_of is not None else None
        with autocast(device):
            images = batch.model_images(reads_neighbours)
            probs = predictor.sample_probabilities(images.to(device), batch.boxes, n_max,
                                                   embeddings=embeddings, noise=noise)
        probs = probs.float().cpu().numpy()
        for i, (position, index) in enumerate(zip(chunk, slices)):
            annotations = batch.masks[i].numpy()  # all 4 slots
            row = {"position": int(position), "slice": int(index), "patient_id": str(table["patient_id"][index]),
                   "series_uid": str(table["series_uid"][index]),
                   "n_marked": int(annotations.reshape(len(annotations), -1).any(1).sum())}
            if "case" in table:  # phantom v2: the case type, for the per-case tables
                row["case"] = str(table["case"][index])
            region = box_region(batch.boxes[i].numpy(), annotations.shape[-2:])
            row.update(slice_metrics(probs[i], annotations, sizes, region))
            rows.append(row)
    return rows


def summarise(rows: List[dict]) -> Dict[str, float]:
    """Mean of every metric over slices (NaN-aware for NCC, whose NaN count is reported); ECE pooled."""
    keys = [k for k in rows[0] if k not in ID_KEYS and k != "calibration_bins" and not k.startswith("ece")]
    with np.errstate(invalid="ignore"):  # an all-NaN column (NCC of a deterministic method) stays NaN
        summary = {key: _nanmean([r[key] for r in rows]) for key in keys}
    for key in [k for k in keys if k.startswith("ncc")]:
        summary[f"{key}_nan_slices"] = int(np.isnan([r[key] for r in rows]).sum())
    for key in [k for k in rows[0] if k.startswith("ece")]:
        summary[key] = metrics.ece_from_bins(np.sum([r["calibration_bins"] for r in rows], axis=0))
    summary["slices"] = len(rows)
    return summary


def _nanmean(values) -> float:
    values = np.asarray(values, dtype=np.float64)
    finite = np.isfinite(values)
    return float(values[finite].mean()) if finite.any() else float("nan")
