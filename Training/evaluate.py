"""Evaluate trained models on a split: GED@16/@100, HM-IoU@16, NCC, Dmax, mean-prediction Dice/IoU,
sample diversity — all from ProbSAMLib.metrics — written as a Markdown table and CSV files.

    python Training/evaluate.py --data data/phantom --split test \
        --model runs/probsam_tiny/best.safetensors --model runs/prob_unet/best.safetensors --out results/phantom

Protocol (printed with every table): the prompt is the union box of all readers of the slice plus a
margin, no jitter (never one reader's own box); annotations are the readers present on the scan (a
present reader who did not mark this slice contributes an empty mask, as in the LIDC literature); the
first N of one seeded draw of max(N) samples give the @N metrics.
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

if __package__ in (None, ""):  # `python Training/evaluate.py` from the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch
from tqdm import tqdm

from ProbSAMLib import metrics
from ProbSAMLib.device import autocast, choose_device
from ProbSAMLib.errors import SettingsError, WeightsError
from Training import guards
from Training.batches import SliceBatches, validation_positions

THRESHOLD = 0.5
COLUMNS = ["ged@16", "ged@100", "hm_iou@16", "ncc@16", "dmax@16", "dice_mean_annotator", "iou_mean_annotator",
           "dice_majority", "iou_majority", "diversity@16"]


def slice_metrics(probs: np.ndarray, annotations: np.ndarray, sizes: Sequence[int]) -> Dict[str, float]:
    """probs (N, H, W) sample probabilities, annotations (M, H, W) -> the metric row of one slice."""
    samples = probs > THRESHOLD
    row = {f"ged@{n}": metrics.ged(samples[:n], annotations) for n in sizes}
    small = samples[:min(sizes)]
    n = len(small)
    row[f"hm_iou@{n}"] = metrics.hm_iou(small, annotations)
    row[f"ncc@{n}"] = metrics.ncc(probs[:n], annotations)
    row[f"dmax@{n}"] = metrics.dmax(small, annotations)
    row[f"diversity@{n}"] = metrics.sample_diversity(small)
    scores = metrics.mean_prediction_scores(small, annotations)
    row.update({key: scores[key] for key in ("dice_mean_annotator", "iou_mean_annotator", "dice_majority",
                                             "iou_majority")})
    return row


@torch.no_grad()
def evaluate_slices(learner, batches: SliceBatches, positions: np.ndarray, sizes: Sequence[int] = (16, 100),
                    seed: int = 0, batch_size: int = 16, device: Optional[torch.device] = None,
                    embeddings_of=None, progress: bool = True) -> List[dict]:
    """One metric row per slice. ``embeddings_of(positions)`` supplies cached embeddings (ProbSAM)."""
    device = device or next(learner.parameters()).device
    learner.eval()
    rows = []
    for start in tqdm(range(0, len(positions), batch_size), desc="evaluating", disable=not progress, leave=False):
        chunk = positions[start:start + batch_size]
        batch = batches.read(chunk)
        generator = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(chunk[0]))
        embeddings = embeddings_of(chunk) if embeddings_of is not None else None
        with autocast(device):
            probs = learner.sample_probabilities(batch.images.to(device), batch.boxes, max(sizes), generator,
                                                 embeddings=embeddings)
        probs = probs.float().cpu().numpy()
        for i, position in enumerate(chunk):
            annotations = batch.masks[i][batch.present[i]].numpy()
            row = {"position": int(position), "slice": int(batches.dataset.indices[position]),
                   "n_readers": int(len(annotations))}
            row.update(slice_metrics(probs[i], annotations, sizes))
            rows.append(row)
    return rows


def summarise(rows: List[dict]) -> Dict[str, float]:
    """Mean of every metric over slices (NaN-aware for NCC, whose NaN count is reported)."""
    keys = [k for k in rows[0] if k not in ("position", "slice", "n_readers")]
    summary = {key: float(np.nanmean([r[key] for r in rows])) for key in keys}
    ncc_keys = [k for k in keys if k.startswith("ncc")]
    for key in ncc_keys:
        summary[f"{key}_nan_slices"] = int(np.isnan([r[key] for r in rows]).sum())
    summary["slices"] = len(rows)
    return summary


def markdown_table(results: Dict[str, Dict[str, float]], protocol: str) -> str:
    names = list(results)
    columns = [c for c in COLUMNS if all(c in results[n] for n in names)]
    lines = [f"| model | {' | '.join(columns)} |", "|---|" + "---|" * len(columns)]
    for name in names:
        lines.append(f"| {name} | " + " | ".join(f"{results[name][c]:.3f}" for c in columns) + " |")
    return protocol + "\n\n" + "\n".join(lines) + "\n"


def protocol_text(data: str, split: str, n_slices: int, sizes, margin: float, seed: int) -> str:
    return (f"Data `{data}`, split **{split}** ({n_slices} slices). N = {', '.join(map(str, sizes))} samples "
            f"(the @16 metrics use the first 16 of the seeded draw, seed {seed}). Box prompt: union box of all "
            f"readers + {margin:g} px, no jitter. Annotations: the readers present on the scan (empty masks "
            f"included). d = 1 - IoU, IoU(empty, empty) = 1; GED with self-pairs; HM-IoU after MoSE; NCC after "
            f"PHiSeg (NaN slices excluded and counted); Dice/IoU of the thresholded mean prediction.")


def write_results(out: Path, results: Dict[str, Dict[str, float]], per_slice: Dict[str, List[dict]],
                  protocol: str) -> None:
    """Every file into ``out``, which must be a folder being filled (the OutputFolder in main)."""
    (out / "results.md").write_text(markdown_table(results, protocol))
    keys = sorted({k for r in results.values() for k in r})
    with open(out / "results.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["model", *keys])
        for name, summary in results.items():
            writer.writerow([name, *[summary.get(k, "") for k in keys]])
    for name, rows in per_slice.items():
        with open(out / f"per_slice_{name}.csv", "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    (out / "results.json").write_text(json.dumps({"protocol": protocol, "results": results}, indent=1))


def main(argv: Optional[Sequence[str]] = None) -> int:
    from Training.guards import run_main

    return run_main("evaluate.py", lambda: _main(argv))


def _main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--split", default="test", choices=["train", "val", "test"])
    parser.add_argument("--model", action="append", required=True, help="weights file; repeat to compare")
    parser.add_argument("--name", action="append", help="column name per --model (default: file's folder)")
    parser.add_argument("--samples", type=int, nargs="+", default=[16, 100])
    parser.add_argument("--max-slices", type=int, default=0, help="seeded subset of the split (0 = all)")
    parser.add_argument("--box-margin", type=float, default=2.0)
    parser.add_argument("--sam-checkpoint", default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", required=True)
    parser.add_argument("--force", action="store_true", help="replace an existing --out folder")
    args = parser.parse_args(argv)
    names = args.name or [Path(m).resolve().parent.name for m in args.model]
    check_arguments(args, names)
    output = guards.output_folder(args.out, args.force, inputs=[args.data, args.sam_checkpoint, *args.model])
    device = choose_device(args.device)
    batches = SliceBatches(guards.load_split(args.data, args.split), box_margin=args.box_margin)
    positions = validation_positions(len(batches), args.max_slices, args.seed)
    sizes = sorted(set(args.samples))
    results, per_slice = {}, {}
    for name, path in zip(names, args.model):
        learner = guards.load_weights(path, args.sam_checkpoint).to(device)
        per_slice[name] = evaluate_slices(learner, batches, positions, sizes, args.seed, args.batch_size, device)
        results[name] = summarise(per_slice[name])
        print(name, json.dumps({k: round(v, 4) for k, v in results[name].items()}))
    protocol = protocol_text(args.data, args.split, len(positions), sizes, args.box_margin, args.seed)
    with output as tmp:  # nothing under --out until complete
        write_results(tmp, results, per_slice, protocol)
    print(markdown_table(results, protocol))
    return 0


def check_arguments(args, names: Sequence[str]) -> None:
    """Every option's range and every input file, before anything is loaded or created."""
    if len(names) != len(args.model):
        raise SettingsError("give one --name per --model")
    if len(set(names)) != len(names):
        raise SettingsError(f"model names must differ, got {names}; pass --name for each --model")
    for value in args.samples:
        guards.at_least("--samples", value, 1)
    guards.at_least("--max-slices", args.max_slices, 0)
    guards.at_least("--batch-size", args.batch_size, 1)
    guards.at_least("--seed", args.seed, 0)
    if not np.isfinite(args.box_margin) or args.box_margin < 0:
        raise SettingsError(f"--box-margin must be a finite number >= 0, got {args.box_margin}")
    for path in args.model:
        if not Path(path).is_file():
            raise WeightsError(f"no weights file at {path}")
    if args.sam_checkpoint is not None:
        guards.existing_file("--sam-checkpoint", args.sam_checkpoint)


if __name__ == "__main__":
    raise SystemExit(main())
