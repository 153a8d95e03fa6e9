"""How badly a -400 HU threshold does on each phantom case type: the baseline the hard cases must beat.

    python Testing/benchmarks/phantom_threshold.py data/phantom_v2              # the test split
    python Testing/benchmarks/phantom_threshold.py data/phantom --split all     # v1 (no case column)

For every slice: threshold the image at LEVEL inside the prompt box (the readers' union box + 2 px, as
in training and evaluation), keep the 8-connected component at the box centre
(Training.evaluation.threshold.threshold_component, evaluate.py's baseline) and score its Dice against the readers' majority
(present readers, >= half of them: metrics.mean_prediction_scores' rule). Prints, per case type and
variant, the number of slices and nodules, the mean Dice and a 95 % interval from a bootstrap over
nodules (slices of one nodule are not independent). Slices whose majority is empty are counted
apart (Dice there is 1 only when the threshold finds nothing).
"""
from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from Training.data.boxes import union_box  # noqa: E402
from ProbSAMLib.metrics import dice  # noqa: E402
from Training.data.phantom_cases import edge_slices  # noqa: E402
from Training.evaluation.threshold import threshold_component  # noqa: E402
from Training.data.dataset_format import load_dataset  # noqa: E402


def nodule_bootstrap(scores: np.ndarray, nodules: np.ndarray, rounds: int = 1000, seed: int = 0):
    """95 % percentile interval of the slice mean, resampling whole nodules."""
    names, inverse = np.unique(nodules, return_inverse=True)
    sums = np.bincount(inverse, weights=scores, minlength=len(names))
    counts = np.bincount(inverse, minlength=len(names))
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(names), size=(rounds, len(names)))
    means = sums[picks].sum(1) / counts[picks].sum(1)
    return np.percentile(means, [2.5, 97.5])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("data", type=Path)
    parser.add_argument("--split", default="test", choices=("train", "val", "test", "all"))
    parser.add_argument("--level", type=float, default=-400.0, help="HU threshold (default -400)")
    parser.add_argument("--margin", type=float, default=2.0, help="box margin in pixels (default 2)")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    ds = load_dataset(args.data, None if args.split == "all" else args.split)
    table = ds.table
    cases = table["case"] if "case" in table else np.full(len(table["index"]), "")
    variants = table["case_variant"] if "case_variant" in table else np.full(len(table["index"]), "")
    groups = defaultdict(lambda: {"scores": [], "nodules": [], "empty_majority": 0})
    edges = set()  # rows on a partial-volume nodule's edge slices (where the cap fades)
    for nodule in np.unique(table["nodule_id"][ds.indices][cases[ds.indices] == "partial_volume"]):
        rows = np.flatnonzero(table["nodule_id"] == nodule)
        rows = rows[np.argsort(table["k"][rows])]
        edges |= set(rows[edge_slices(np.asarray(ds.masks[rows]).transpose(1, 0, 2, 3))].tolist())
    for position in range(len(ds)):
        index = int(ds.indices[position])
        readers = np.asarray(ds.masks[index])[np.asarray(ds.present[index])]
        majority = readers.mean(axis=0) >= 0.5
        label = str(cases[index]) or "(none: v1)"
        keys = [f"{label} / {variants[index] or '-'}", f"{label} / all", "ALL"]
        if label == "partial_volume":
            keys.append(f"partial_volume / {'edge' if index in edges else 'inner'} slices")
        for key in keys:
            if not majority.any():
                groups[key]["empty_majority"] += 1
                continue
            found = threshold_component(np.asarray(ds.images[index], dtype=np.float32),
                                        union_box(readers, args.margin), args.level)
            groups[key]["scores"].append(dice(found, majority))
            groups[key]["nodules"].append(table["nodule_id"][index])
    generator = ds.meta.get("generator_version", 1)
    print(f"{args.data} (generator v{generator}), split {args.split}: {len(ds)} slices; threshold "
          f"{args.level:g} HU inside the union box + {args.margin:g} px, centre component, Dice vs the "
          f"readers' majority; 95 % interval: bootstrap over nodules")
    print("| case / variant | slices | nodules | Dice | 95 % interval | empty-majority slices |")
    print("|---|---|---|---|---|---|")
    for key in sorted(groups, key=lambda k: (k == "ALL", k)):
        group = groups[key]
        scores, nodules = np.array(group["scores"]), np.array(group["nodules"])
        if len(scores) == 0:
            print(f"| {key} | 0 | 0 | - | - | {group['empty_majority']} |")
            continue
        low, high = nodule_bootstrap(scores, nodules)
        print(f"| {key} | {len(scores)} | {len(set(nodules))} | {scores.mean():.3f} | "
              f"{low:.3f}-{high:.3f} | {group['empty_majority']} |")
    print(f"({time.perf_counter() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
