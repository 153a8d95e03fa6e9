"""What the mean prediction could reach on a data set: two ideal predictors against the threshold baseline.

    python research/phantom_ceiling.py --data data/phantom_v2 --split test

No model: per case type (and reader count) it scores, against the readers' majority (at least 2 of the 4
slots, as evaluate.py), the Dice of
- the -400 HU threshold baseline (evaluate.py's, same box: union of the readers + --box-margin px);
- "readers' majority": the pixels at least half of the nodule's OWN readers drew (reader_present). The
  phantom renders a nodule from exactly this agreement, so a perfect image reader could recover it; it
  cannot know how many of the four radiologists annotated the nodule;
- "calibrated mean": the pixels more than half of the 4 slots drew, i.e. the mean prediction ("> 0.5") of
  a perfectly calibrated sampler that also knew the reader count. It scores 0 where exactly 2 of 4 drew;
- "majority via the grid": the readers' majority taken through the tiny model's decoder grid the way a
  loss on that grid sees it (area-averaged to 64 x 64, upsampled bilinearly, > 0.5): the best a model
  trained with loss_resolution "decoder" learns, even when it learns its targets exactly.
with paired-bootstrap intervals over patients of each one's difference to the threshold. It tells which
mean-prediction targets a model can meet on the data at all, and what to train towards.

    python research/phantom_ceiling.py --data data/phantom_v2 --split test \
        --as-scored results/test_demo_v7/per_slice_demo_v7.csv --patients LIDC-IDRI-0052

asks what if: the ideal predictors again, but on the named patients' slices each scores what that
evaluate.py per-slice table scored (a model's mistakes there). It tells whether a target could be met by a
model perfect everywhere else, or whether those patients alone decide it.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Dict, Optional, Sequence

if __package__ in (None, ""):  # `python research/phantom_ceiling.py` from the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch

from ProbSAMLib.modeling import preprocess
from Training.data.boxes import union_boxes
from ProbSAMLib.modeling.config import ProbSAMConfig
from ProbSAMLib import errors
from ProbSAMLib.errors import InputError, SettingsError
from ProbSAMLib.metrics import mean_prediction_scores
from Training.evaluation.threshold import THRESHOLD_HU, threshold_component
from Training import guards
from Training.data.dataset_format import load_split
from Training.evaluation.baselines import hu_to_unit
from Training.evaluation.bootstrap import PatientBootstrap
from Training.evaluation.report import read_per_slice, reader_groups

PREDICTORS = ("threshold", "readers' majority", "calibrated mean", "majority via the grid")
TINY = ProbSAMConfig.preset("tiny")


def through_decoder_grid(mask: np.ndarray, img_size: int = TINY.img_size, grid: int = TINY.low_res_size) -> np.ndarray:
    """(H, W) bool -> the mask a decoder-grid loss's target gives back at full resolution: the soft target of
    preprocess.masks_to_low_res, upsampled like logits by preprocess.logits_to_image, > 0.5."""
    soft = preprocess.masks_to_low_res(torch.from_numpy(mask[None]), mask.shape, img_size, grid)
    return (preprocess.logits_to_image(soft, mask.shape, img_size)[0] > 0.5).numpy()


def slice_scores(image: np.ndarray, masks: np.ndarray, present: np.ndarray, box: np.ndarray,
                 level: float) -> Dict[str, float]:
    """image (H, W), masks (4, H, W) bool, present (4,) bool -> each predictor's Dice vs the slot majority,
    scored by metrics.mean_prediction_scores (the one majority rule evaluate.py uses)."""
    own = masks[present].mean(0) >= 0.5 if present.any() else np.zeros(masks.shape[1:], bool)
    predictions = {"threshold": threshold_component(image, box, level)[None],
                   "readers' majority": own[None],
                   "calibrated mean": masks,  # its mean over the 4 slots is the calibrated mean
                   "majority via the grid": through_decoder_grid(own)[None]}
    return {name: mean_prediction_scores(p.astype(np.float32), masks)["dice_majority"]
            for name, p in predictions.items()}


def report(scores: Dict[str, np.ndarray], patients: np.ndarray, rows: list, n_boot: int, seed: int) -> str:
    head = ("| slices | n | " + " | ".join(PREDICTORS) + " | " +
            " | ".join(f"Δ {p} − threshold" for p in PREDICTORS[1:]) + " |")
    lines = [head, "|" + "---|" * (2 + 2 * len(PREDICTORS) - 1)]
    for name, group in reader_groups(rows).items():
        boot = PatientBootstrap(patients[group], n_boot=n_boot, seed=seed)
        means = [f"{scores[p][group].mean():.3f}" for p in PREDICTORS]
        deltas = [boot.difference(scores[p][group], scores["threshold"][group]).format() for p in PREDICTORS[1:]]
        lines.append(f"| {name} | {len(group)} | " + " | ".join(means + deltas) + " |")
    return "\n".join(lines)


def score_as(scores: Dict[str, np.ndarray], slice_index: np.ndarray, patients: np.ndarray, per_slice_csv,
             named: Sequence[str]) -> str:
    """Overwrite, in place, every predictor's scores on the named patients' slices (data set indices
    `slice_index`) but the threshold's with the Dice of the mean that `per_slice_csv` recorded; its method."""
    method, rows, _ = read_per_slice(Path(per_slice_csv))
    dice = {int(r["slice"]): r["dice_majority"] for r in rows}
    unknown = sorted(set(named) - set(patients))
    if unknown:
        raise SettingsError(f"--patients: {unknown[0]} has no slice in this split")
    chosen = np.isin(patients, list(named))
    missing = [int(i) for i in slice_index[chosen] if int(i) not in dice]
    if missing:
        raise InputError(f"{per_slice_csv} did not score {len(missing)} of those patients' slices (data set "
                         f"index {missing[0]}, ...): give a per-slice table of the same data set and split")
    for name in PREDICTORS[1:]:
        scores[name][chosen] = [dice[int(i)] for i in slice_index[chosen]]
    return method


def main(argv: Optional[Sequence[str]] = None) -> int:
    return errors.run_main("phantom_ceiling.py", lambda: _main(argv))


def _main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--split", default="test", choices=["train", "val", "test"])
    parser.add_argument("--box-margin", type=float, default=2.0)
    parser.add_argument("--bootstrap", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--as-scored", metavar="PER_SLICE_CSV",
                        help="an evaluate.py per_slice_*.csv of this split: on --patients' slices, every ideal "
                             "predictor scores what it recorded")
    parser.add_argument("--patients", nargs="+", default=(), help="the patients --as-scored applies to")
    args = parser.parse_args(argv)
    if bool(args.as_scored) != bool(args.patients):
        raise SettingsError("--as-scored and --patients go together: a per-slice table and whose slices it scores")
    guards.at_least("--box-margin", args.box_margin, 0)
    guards.at_least("--bootstrap", args.bootstrap, 1)
    data = load_split(args.data, args.split)
    level = THRESHOLD_HU if data.intensity == "hu" else hu_to_unit(THRESHOLD_HU)
    scores = {p: np.empty(len(data)) for p in PREDICTORS}
    for i in range(len(data)):
        item = data[i]
        box = union_boxes(item["masks"][None], item["present"][None], args.box_margin)[0]
        for p, value in slice_scores(item["image"].astype(np.float32), item["masks"], item["present"],
                                     box, level).items():
            scores[p][i] = value
    what_if = ""
    if args.as_scored:
        method = score_as(scores, data.indices, data.patient_ids, args.as_scored, args.patients)
        what_if = (f" What if: on the slices of {', '.join(args.patients)} every ideal predictor scores what "
                   f"{method} scored ({args.as_scored}).")
    print(f"{args.data}, split {args.split}: {len(data)} slices. Dice against the readers' majority (2 of 4 "
          f"slots); Δ: paired bootstrap over patients ({args.bootstrap} replicates), 95 % interval.{what_if}\n")
    table = data.table
    rows = [{"n_marked": int(table["n_marked"][i]), "case": str(table["case"][i]) if "case" in table else ""}
            for i in data.indices]
    print(report(scores, data.patient_ids, rows, args.bootstrap, args.seed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
