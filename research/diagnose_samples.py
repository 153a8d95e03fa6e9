"""How a model's samples fall short of the readers, by how many readers marked the slice.

    python research/diagnose_samples.py MODEL.safetensors --data data/phantom_v2 --split val --max-slices 320

Per reader count (1-4) it prints the share of empty samples (a correct model gives 3/4, 1/2, 1/4 and 0 of
its samples empty where 1, 2, 3 and 4 of the 4 reader slots drew), the mean drawn area of the samples and of
the readers who drew, and the Dice of the mean prediction (the average of the sample probabilities) against
the readers' majority when that mean is thresholded at 0.3, 0.4 and 0.5 (evaluate.py scores 0.5 only; the
others show how far the mean sits below the majority). Same prompts, slices and latent noise as
evaluate.py (seeded subset, noise per (seed, slice)), so the figures match its per-slice tables.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # `python research/diagnose_samples.py` from the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch

from ProbSAMLib import errors, metrics
from ProbSAMLib.metrics import MASK_THRESHOLD
from Training import guards
from Training.data.batches import SliceBatches, validation_positions
from Training.data.dataset_format import load_split
from Training.evaluation.scoring import slice_noise
from Training.learning.learners import load_weights

MEAN_THRESHOLDS = (0.3, 0.4, MASK_THRESHOLD)


def slice_diagnosis(probs: np.ndarray, annotations: np.ndarray) -> dict:
    """probs (N, H, W) sample probabilities, annotations (M, H, W) bool -> one slice's figures."""
    drawn = (probs > MASK_THRESHOLD).reshape(len(probs), -1).sum(1)
    reader_areas = annotations.reshape(len(annotations), -1).sum(1)
    return {"n_marked": int((reader_areas > 0).sum()), "empty_share": float((drawn == 0).mean()),
            "sample_area": float(drawn.mean()),
            "reader_area": float(reader_areas[reader_areas > 0].mean()) if reader_areas.any() else 0.0,
            **{f"dice@{t}": metrics.mean_prediction_scores(probs, annotations, threshold=t)["dice_majority"]
               for t in MEAN_THRESHOLDS}}


@torch.no_grad()
def diagnose(model_path: Path, data: str, split: str, max_slices: int, seed: int = 0, n_samples: int = 16,
             box_margin: float = 2.0, batch_size: int = 16) -> dict:
    """{n_marked or "all": {figure: mean over slices, "slices": count}} for the seeded subset of a split."""
    learner = load_weights(model_path)
    batches = SliceBatches(load_split(data, split), box_margin=box_margin)
    positions = validation_positions(len(batches), max_slices or len(batches), seed)
    rows = []
    for start in range(0, len(positions), batch_size):
        chunk = positions[start:start + batch_size]
        batch = batches.read(chunk)
        noise = torch.stack([slice_noise(seed, s, n_samples, learner.latent_dim)
                             for s in batches.dataset.indices[chunk]])
        images = batch.model_images(getattr(learner, "reads_neighbours", False))
        probs = learner.sample_probabilities(images, batch.boxes, n_samples, noise=noise).float().numpy()
        rows += [slice_diagnosis(probs[i], batch.masks[i].numpy()) for i in range(len(chunk))]
    groups = {k: [row for row in rows if row["n_marked"] == k] for k in sorted({row["n_marked"] for row in rows})}
    groups["all"] = rows
    table = {}
    for k, group in groups.items():
        table[k] = {key: float(np.mean([row[key] for row in group])) for key in group[0] if key != "n_marked"}
        table[k]["slices"] = len(group)
    return table


def main(argv=None) -> int:
    return errors.run_main("diagnose_samples.py", lambda: _main(argv))


def _main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("--data", required=True)
    parser.add_argument("--split", default="val", choices=("train", "val", "test"))
    parser.add_argument("--max-slices", type=int, default=320, help="seeded subset (0 = all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-threads", type=int, default=0)
    args = parser.parse_args(argv)
    guards.at_least("--max-slices", args.max_slices, 0)
    guards.at_least("--seed", args.seed, 0)
    guards.at_least("--num-threads", args.num_threads, 0)
    guards.existing_file("--model", args.model)
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    table = diagnose(args.model, args.data, args.split, args.max_slices, args.seed)
    print("| readers marking | slices | empty samples (ideal) | sample area | readers' area | "
          + " | ".join(f"Dice of mean > {t}" for t in MEAN_THRESHOLDS) + " |")
    print("|---" * (5 + len(MEAN_THRESHOLDS)) + "|")
    for k, row in table.items():
        ideal = f"{1 - k / 4:.2f}" if k != "all" else "-"
        print(f"| {k} | {row['slices']} | {row['empty_share']:.2f} ({ideal}) | {row['sample_area']:.0f} | "
              f"{row['reader_area']:.0f} | " + " | ".join(f"{row[f'dice@{t}']:.3f}" for t in MEAN_THRESHOLDS) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
