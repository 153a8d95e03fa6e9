"""Which way the training data leans on slices that look like a group: the slot majority of their look-alikes.

    python research/look_alikes.py --data data/phantom_v2 --split test \\
        --patient LIDC-IDRI-0052 --case partial_volume --n-marked 1

No model. For each slice of the group (the --split's slices, filtered by patient, case type and how many of
the 4 reader slots marked it), it finds the --k slices of the --reference split (default train) that look
most alike in the box a model is prompted with (the readers' union + --box-margin px, as evaluate.py), and
reports how many of those look-alikes have an empty slot majority (fewer than 2 of 4 slots on any pixel, the
majority evaluate.py scores against), with a bootstrap interval over the reference patients.

What it tells: a model trained on the reference split learns, for slices like these, roughly the answer
their look-alikes carry. When the look-alikes are split near half and half, the mean prediction on the
group is a coin toss for any image reader with this view; when they agree with the group's own majority,
a model that gets the group wrong has something left to learn. The same score over every slice of --split
(its AUC for "the majority is empty") says how much the box statistics tell at all.

Box statistics (standardised over the reference slices; one nearest-neighbour search over all of them):
the mean, median, 90th and 99th percentile of the intensity (how dense, and how much of it), the log of
the box's area (how big), the fine texture (standard deviation of the box minus its 1-pixel Gaussian blur:
ground glass is mottled, solid tissue and partial-volume fringes are not), and, where the data set has
neighbouring slices, the mean absolute change to the slice below and to the one above (a fringe fades along
z, a nodule's body does not).

With --results (an evaluate.py --out folder of the same data set and split) it also tells whether a model
does what its training data teach: over the split's slices whose majority is empty, grouped by their
look-alikes' share, how often each method's mean prediction left the slice empty (on such a slice its Dice
against the majority is 1 when it did and 0 when it did not).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

if __package__ in (None, ""):  # `python research/look_alikes.py` from the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
from scipy import ndimage

from Training.data.boxes import union_boxes
from ProbSAMLib import errors
from ProbSAMLib.errors import InputError, SettingsError
from Training import guards
from Training.data.dataset_format import load_split
from Training.evaluation.bootstrap import PatientBootstrap
from Training.evaluation.report import read_results_folder

FEATURES = ("mean", "median", "p90", "p99", "log area", "fine texture")
NEIGHBOUR_FEATURES = ("change below", "change above")


def box_statistics(image: np.ndarray, box: np.ndarray, neighbours: Optional[np.ndarray] = None) -> np.ndarray:
    """image (H, W), box (4,) x1 y1 x2 y2 (boxes.union_box's continuous edges), neighbours (2, H, W) or
    None -> (len(FEATURES) [+ 2],) float64: the statistics of the pixels inside the box."""
    x0, y0 = np.floor(box[:2]).astype(int)
    x1, y1 = np.ceil(box[2:]).astype(int)
    crop = image[y0:y1, x0:x1].astype(np.float64)
    values = [crop.mean(), *np.percentile(crop, [50, 90, 99]), np.log(crop.size),
              (crop - ndimage.gaussian_filter(crop, 1.0)).std()]
    if neighbours is not None:
        values += [np.abs(n[y0:y1, x0:x1] - crop).mean() for n in neighbours.astype(np.float64)]
    return np.asarray(values)


def majority_is_empty(masks: np.ndarray) -> bool:
    """masks (4, H, W) bool: no pixel that at least half the slots drew (metrics.mean_prediction_scores'
    majority at its vote_level 0.5, which evaluate.py scores against: 2 of 4)."""
    return not bool((masks.mean(axis=0) >= 0.5).any())


def describe(data, box_margin: float, use_neighbours: bool):
    """Every marked slice of a split -> (positions into the split, statistics (n, F), majority empty (n,))."""
    positions, stats, empty = [], [], []
    for i in range(len(data)):
        item = data[i]
        if not item["masks"].any():  # nobody marked it: there is no box to prompt with
            continue
        box = union_boxes(item["masks"][None], item["present"][None], box_margin)[0]
        near = np.asarray(data.neighbours[item["index"]]) if use_neighbours else None
        positions.append(i)
        stats.append(box_statistics(item["image"], box, near))
        empty.append(majority_is_empty(item["masks"]))
    return np.asarray(positions, int), np.asarray(stats), np.asarray(empty, bool)


def group_filter(data, positions: np.ndarray, patients, cases, n_marked) -> np.ndarray:
    """(n,) bool: the slices at `positions` of the split that match every given filter."""
    table, rows = data.table, data.indices[positions]
    keep = np.ones(len(positions), bool)
    if patients:
        keep &= np.isin(table["patient_id"][rows].astype(str), list(patients))
    if cases:
        if "case" not in table:
            raise InputError(f"{data.path} has no case column (a phantom v2 data set has)")
        keep &= np.isin(table["case"][rows].astype(str), list(cases))
    if n_marked:
        keep &= np.isin(table["n_marked"][rows].astype(int), list(n_marked))
    return keep


def look_alikes(reference: np.ndarray, query: np.ndarray, k: int) -> np.ndarray:
    """reference (R, F), query (Q, F) -> (Q, k) indices of each query's k nearest reference rows, on
    statistics standardised by the reference's mean and spread."""
    from sklearn.neighbors import NearestNeighbors

    centre, scale = reference.mean(axis=0), reference.std(axis=0)
    scale[scale == 0] = 1.0
    search = NearestNeighbors(n_neighbors=k).fit((reference - centre) / scale)
    return search.kneighbors((query - centre) / scale, return_distance=False)


def composition(data, rows: np.ndarray, empty: np.ndarray) -> str:
    """One line: the slices at data set indices `rows` by case type, majority drawn / empty, and the median of
    their readers' mean texture rating (1 ground glass .. 5 solid) where the table has ratings."""
    table = data.table
    parts = []
    if "case" in table:
        cases = table["case"][rows].astype(str)
        for case in sorted(set(cases), key=lambda c: -(cases == c).sum()):
            parts.append(f"{case} {int(((cases == case) & ~empty).sum())} / {int(((cases == case) & empty).sum())}")
    line = "by case type, majority drawn / empty: " + (", ".join(parts) if parts else "– (no case column)")
    if "texture_0" in table:
        ratings = np.stack([table[f"texture_{slot}"][rows] for slot in range(4)]).astype(float)
        rated = ratings > 0  # 0: no reader in that slot
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = (ratings * rated).sum(axis=0) / rated.sum(axis=0)  # NaN where nobody rated
        for name, chosen in (("drawn", ~empty), ("empty", empty)):
            if np.isfinite(mean[chosen]).any():
                line += f"; median readers' texture rating of the {name} ones {np.nanmedian(mean[chosen]):.1f}"
    return line


BANDS = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)


def bands(share: np.ndarray):
    """(label, (n,) bool) for each band of BANDS the look-alikes' share falls in (the last one closed)."""
    edges = list(BANDS[:-1]) + [np.inf]
    return [(f"{low:.1f}–{min(high, 1.0):.1f}", (share >= low) & (share < high))
            for low, high in zip(edges[:-1], edges[1:])]


def calibration_table(share: np.ndarray, majority_empty: np.ndarray) -> str:
    """Markdown: by look-alikes' share, how many slices and how many of them really have an empty majority."""
    lines = ["| look-alikes' majority empty | slices | majority empty |", "|---|---|---|"]
    for label, chosen in bands(share):
        value = f"{majority_empty[chosen].mean():.2f}" if chosen.any() else "–"
        lines.append(f"| {label} | {int(chosen.sum())} | {value} |")
    return "\n".join(lines)


def left_empty_table(results: Path, slice_index: np.ndarray, majority_empty: np.ndarray, share: np.ndarray,
                     group: np.ndarray) -> str:
    """Markdown: over the majority-empty slices (data set indices `slice_index`), by look-alikes' share, the
    share of them each method of an evaluate.py folder left empty."""
    wanted = slice_index[majority_empty]  # on these a method's Dice against the majority is 1 or 0
    left_empty = {}
    for method, rows in read_results_folder(results).items():
        dice = {int(r["slice"]): r["dice_majority"] for r in rows}
        missing = [int(i) for i in wanted if int(i) not in dice]
        if missing:
            raise InputError(f"{method}'s per-slice table in {results} did not score {len(missing)} of these "
                             f"slices (data set index {missing[0]}, ...): evaluate the same data set and split "
                             f"in full")
        left_empty[method] = np.array([dice[int(i)] >= 0.5 for i in wanted], dtype=float)

    def row(label: str, chosen: np.ndarray) -> str:
        cells = [f"{v[chosen].mean():.2f}" if chosen.any() else "–" for v in left_empty.values()]
        return f"| {label} | {int(chosen.sum())} | " + " | ".join(cells) + " |"

    lines = ["| look-alikes' majority empty | slices | " + " | ".join(left_empty) + " |",
             "|---|---|" + "---|" * len(left_empty)]
    lines += [row(label, band) for label, band in bands(share[majority_empty])]
    lines.append(row("the group", group[majority_empty]))
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    return errors.run_main("look_alikes.py", lambda: _main(argv))


def settings(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--split", default="test", choices=["train", "val", "test"])
    parser.add_argument("--reference", default="train", choices=["train", "val", "test"],
                        help="the split the look-alikes come from (another split than --split)")
    parser.add_argument("--patient", nargs="+", default=(), help="keep these patients' slices")
    parser.add_argument("--case", nargs="+", default=(), help="keep these case types' slices")
    parser.add_argument("--n-marked", nargs="+", type=int, default=(), help="keep slices this many slots marked")
    parser.add_argument("--k", type=int, default=50, help="look-alikes per slice")
    parser.add_argument("--box-margin", type=float, default=2.0)
    parser.add_argument("--bootstrap", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--per-slice", action="store_true", help="also list each slice of the group")
    parser.add_argument("--results", help="an evaluate.py --out folder of this data set and --split: how often "
                                          "each method left the majority-empty slices empty, by look-alikes' share")
    args = parser.parse_args(argv)
    if args.reference == args.split:
        raise SettingsError(f"--reference must be another split than --split ({args.split}): a slice's "
                            f"look-alikes would include itself and its own patient's slices")
    guards.at_least("--k", args.k, 1)
    guards.at_least("--box-margin", args.box_margin, 0)
    guards.at_least("--bootstrap", args.bootstrap, 1)
    for n in args.n_marked:
        guards.at_least("--n-marked", n, 1)
    return args


def _main(argv: Optional[Sequence[str]] = None) -> int:
    from sklearn.metrics import roc_auc_score

    args = settings(argv)
    query_data, reference_data = load_split(args.data, args.split), load_split(args.data, args.reference)
    use_neighbours = query_data.neighbours is not None
    features = FEATURES + (NEIGHBOUR_FEATURES if use_neighbours else ())
    reference_positions, reference, reference_empty = describe(reference_data, args.box_margin, use_neighbours)
    if len(reference) < args.k:
        raise SettingsError(f"--k {args.k} is more than the {len(reference)} marked {args.reference} slices")
    positions, query, query_empty = describe(query_data, args.box_margin, use_neighbours)
    group = group_filter(query_data, positions, args.patient, args.case, args.n_marked)
    if not group.any():
        raise InputError(f"no marked {args.split} slice matches the filters (patient {list(args.patient)}, "
                         f"case {list(args.case)}, slots marked {list(args.n_marked)})")

    nearest = look_alikes(reference, query, args.k)  # (Q, k)
    share = reference_empty[nearest].mean(axis=1)
    reference_patients = reference_data.patient_ids[reference_positions]

    def row(name: str, selected: np.ndarray) -> str:
        chosen = nearest[selected].ravel()
        interval = PatientBootstrap(reference_patients[chosen], args.bootstrap, args.seed).mean(
            reference_empty[chosen].astype(float))
        return (f"| {name} | {int(selected.sum())} | {query_empty[selected].mean():.2f} | {interval.format(2)} | "
                f"{len(np.unique(chosen))} ({len(np.unique(reference_patients[chosen]))}) |")

    print(f"{args.data}: {int(group.sum())} {args.split} slices (patient {list(args.patient) or 'any'}, case "
          f"{list(args.case) or 'any'}, slots marked {list(args.n_marked) or 'any'}); each slice's {args.k} "
          f"nearest {args.reference} slices by box statistics ({', '.join(features)}). Share of slices whose "
          f"slot majority (2 of 4) is empty; interval: bootstrap over {args.reference} patients, 95 %.\n")
    print("| slices | n | majority empty | look-alikes' majority empty | distinct look-alikes (patients) |")
    print("|---|---|---|---|---|")
    print(row("the group", group))
    print(row(f"every marked {args.split} slice", np.ones(len(group), bool)))
    chosen = nearest[group].ravel()
    print(f"\nThe group's {chosen.size} look-alikes " + composition(
        reference_data, reference_data.indices[reference_positions[chosen]], reference_empty[chosen]) + ".")
    both = len(np.unique(query_empty)) == 2
    auc = f"{roc_auc_score(query_empty, share):.3f}" if both else "– (one class only)"
    print(f"\nThe look-alikes' share as a score for \"the majority is empty\" over every marked {args.split} "
          f"slice: AUC {auc}; by its value, how many of them have an empty majority:\n")
    print(calibration_table(share, query_empty))
    if args.results:
        print(f"\nMajority-empty {args.split} slices by their look-alikes' share: the share of them each method's "
              f"mean prediction left empty ({args.results}).\n")
        print(left_empty_table(Path(args.results), query_data.indices[positions], query_empty, share, group))
    if args.per_slice:
        table, rows = query_data.table, query_data.indices[positions[group]]
        print("\n| patient | k | slots marked | majority empty | look-alikes' majority empty |\n|---|---|---|---|---|")
        for r, empty, s in zip(rows, query_empty[group], share[group]):
            print(f"| {table['patient_id'][r]} | {table['k'][r]} | {table['n_marked'][r]} | {'yes' if empty else 'no'} "
                  f"| {s:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
