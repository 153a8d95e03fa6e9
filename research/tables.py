"""Markdown tables for the README and docs/results, made from what the tools wrote (nothing typed by hand).

    # every run of a folder: steps, early stop, validation GED@16 curve, training seconds, mean ± sd of seeds
    python research/tables.py runs runs/fair_v2
    # one evaluate.py output: rows = all slices, case types, reader counts; columns = each method's value
    # of the metric with its 95 % interval, then the paired difference of the first method to the others
    python research/tables.py compare results/v2_full_n16 --metric dice_majority [--methods A B ...]
    python research/tables.py compare results/v2_full_n16 --metric ged@16 --difference ged_ratio@16
    # which patients decide a paired interval: the difference again without each one (leave one patient out)
    python research/tables.py influence results/test_demo_v7 --group "case partial_volume" --methods A B
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Optional, Sequence

if __package__ in (None, ""):  # `python research/tables.py` from the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import yaml

from ProbSAMLib import errors
from ProbSAMLib.errors import SettingsError
from Training.evaluation.bootstrap import PatientBootstrap
from Training.evaluation.report import read_results_folder, reader_groups


def cell(interval: Optional[dict]) -> str:
    if not interval or interval.get("estimate") is None:
        return "–"
    return f"{interval['estimate']:.3f} [{interval['low']:.3f}, {interval['high']:.3f}]"


def runs_table(root: Path) -> str:
    """One row per training run under ``root`` (folders with log.jsonl and config.yaml), finished or not."""
    lines = ["| run | steps | stopped early | best val GED@16 | validation GED@16 (step) | train_seconds |",
             "|---|---|---|---|---|---|"]
    best_by_model = {}
    for folder in sorted(p.parent for p in root.glob("*/log.jsonl")):
        records = [json.loads(line) for line in (folder / "log.jsonl").read_text(encoding="utf-8").splitlines()
                   if line.strip()]
        curve = [(r["step"], r["val/ged@16"]) for r in records if "val/ged@16" in r]
        done = next((r for r in records if r.get("done")), None)
        max_steps = yaml.safe_load((folder / "config.yaml").read_text(encoding="utf-8"))["max_steps"]
        if done is None:
            step = max((r["step"] for r in records if "step" in r), default=0)
            lines.append(f"| {folder.name} | {step} (running or stopped) | – | – | "
                         + ", ".join(f"{g:.3f} ({s})" for s, g in curve) + " | – |")
            continue
        early = f"yes (of {max_steps})" if done["step"] < max_steps else "no"
        lines.append(f"| {folder.name} | {done['step']} | {early} | {done['best_val_ged']:.3f} | "
                     + ", ".join(f"{g:.3f} ({s})" for s, g in curve) + f" | {done['train_seconds']:.0f} |")
        best_by_model.setdefault(folder.name.rsplit("_seed", 1)[0], []).append(done["best_val_ged"])
    lines.append("")
    for model, values in best_by_model.items():
        sd = statistics.stdev(values) if len(values) > 1 else 0.0
        lines.append(f"{model}: best val GED@16 {statistics.mean(values):.3f} ± {sd:.3f} "
                     f"(mean ± sd over {len(values)} run{'s' if len(values) != 1 else ''})  ")
    return "\n".join(lines)


def compare_table(results: dict, metric: str, methods: Optional[Sequence[str]] = None,
                  difference: Optional[str] = None) -> str:
    """Rows = slice groups; columns = each method's ``metric`` [95 % CI], then first − other (paired) of
    the same metric, or of ``difference`` (e.g. "ged_ratio@16", the paired ratio first / other)."""
    intervals, differences = results["intervals"], results["differences"]
    available = list(intervals["all"])
    methods = list(methods or available)
    unknown = [m for m in methods if m not in available]
    if unknown:
        raise SettingsError(f"no method {unknown} in these results; they have {available}")
    if metric not in intervals["all"][methods[0]]:
        keys = sorted(k for k in intervals["all"][methods[0]] if k not in ("slices", "patients"))
        raise SettingsError(f"no metric {metric!r} in these results; they have {keys}")
    reference, others = methods[0], methods[1:]
    difference = difference or metric
    label = ("{} / {}" if difference.startswith("ged_ratio") else "Δ {} − {}")
    header = ["slices", "n"] + methods + [label.format(reference, o) for o in others]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for group, by_method in intervals.items():
        first = by_method[reference]
        row = [group, f"{first['slices']} ({first['patients']} patients)"]
        row += [cell(by_method[m].get(metric)) for m in methods]
        pairs = differences.get(group, {})
        row += [cell(pairs.get(f"{reference} − {o}", {}).get(difference)) for o in others]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def influence_table(per_slice: dict, group: str, metric: str = "dice_majority", methods: Sequence[str] = (),
                    n_boot: int = 1000, seed: int = 0, top: int = 5) -> str:
    """The paired difference first − second method of ``metric`` on one slice group (evaluation_report's
    groups: "all", "case plain", "2 readers", ...), then again without each single patient, the ``top``
    patients whose removal moves the lower bound most (either way) listed with their slices and own mean
    difference. What it is for: reading an interval, not changing the protocol; the protocol's interval
    is the first row."""
    names = list(methods or per_slice)[:2]
    if len(names) != 2 or any(n not in per_slice for n in names):
        raise SettingsError(f"influence needs two methods of {sorted(per_slice)}, got {list(methods)}")
    first, second = (per_slice[n] for n in names)
    if [(r["patient_id"], r.get("slice")) for r in first] != [(r["patient_id"], r.get("slice")) for r in second]:
        raise SettingsError(f"{names[0]} and {names[1]} were not scored on the same slices in the same order; "
                            "pair only the tables of one evaluate.py output")
    groups = reader_groups(first)
    if group not in groups:
        raise SettingsError(f"no slice group {group!r}; the groups are {sorted(groups)}")
    if metric not in first[0]:
        raise SettingsError(f"no per-slice metric {metric!r}")
    index = groups[group]
    patients = np.array([first[i]["patient_id"] for i in index])
    a = np.array([first[i][metric] for i in index], dtype=np.float64)
    b = np.array([second[i][metric] for i in index], dtype=np.float64)

    def interval(keep: np.ndarray):
        return PatientBootstrap(patients[keep], n_boot, seed).difference(a[keep], b[keep])

    everyone = interval(np.ones(len(index), dtype=bool))
    rows = []
    for patient in sorted(set(patients.tolist())):
        own = patients == patient
        rows.append((interval(~own), patient, int(own.sum()), float(np.mean(a[own] - b[own]))))
    rows.sort(key=lambda r: abs(r[0].low - everyone.low), reverse=True)
    lines = [f"{group}: {names[0]} − {names[1]}, {metric}, {len(index)} slices of {len(rows)} patients",
             "", "| left out | slices | its own mean difference | difference without it |", "|---|---|---|---|",
             f"| nobody | {len(index)} | – | {everyone.format()} |"]
    lines += [f"| {patient} | {n} | {own:+.3f} | {iv.format()} |" for iv, patient, n, own in rows[:top]]
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    return errors.run_main("tables.py", lambda: _main(argv))


def _main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    runs = sub.add_parser("runs", help="training runs' steps and validation curves")
    runs.add_argument("root")
    compare = sub.add_parser("compare", help="one metric of an evaluate.py output, by slice group")
    compare.add_argument("results", help="an evaluate.py --out folder")
    compare.add_argument("--metric", default="dice_majority")
    compare.add_argument("--methods", nargs="+", help="columns in order; the first is the reference")
    compare.add_argument("--difference", help="the paired column's metric (default --metric), e.g. ged_ratio@16")
    influence = sub.add_parser("influence", help="a paired interval without each single patient")
    influence.add_argument("results", help="an evaluate.py --out folder (its per_slice_*.csv)")
    influence.add_argument("--group", default="all", help='a slice group, e.g. "case partial_volume"')
    influence.add_argument("--metric", default="dice_majority")
    influence.add_argument("--methods", nargs=2, help="the two methods (default: the first two tables)")
    influence.add_argument("--top", type=int, default=5)
    args = parser.parse_args(argv)
    if args.command == "influence":
        per_slice = read_results_folder(args.results)
        if not args.methods:  # the order evaluate.py ran them in is the one in results.json
            summary = Path(args.results) / "results.json"
            if not summary.is_file():
                raise SettingsError(f"no results.json in {args.results} to take the methods' order from; "
                                    f"name them with --methods A B (the tables: {sorted(per_slice)})")
            order = json.loads(summary.read_text(encoding="utf-8"))["intervals"]["all"]
            per_slice = {name: per_slice[name] for name in order if name in per_slice}
        print(influence_table(per_slice, args.group, args.metric, args.methods or (), top=args.top))
    elif args.command == "runs":
        root = Path(args.root)
        if not any(root.glob("*/log.jsonl")):
            raise SettingsError(f"no training runs (*/log.jsonl) under {root}")
        print(runs_table(root))
    else:
        path = Path(args.results) / "results.json"
        if not path.is_file():
            raise SettingsError(f"no results.json in {args.results}: give an evaluate.py --out folder")
        print(compare_table(json.loads(path.read_text(encoding="utf-8")), args.metric, args.methods,
                            args.difference))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
