"""evaluate.py's outputs: tables by reader count with patient-bootstrap intervals, paired differences,
the mean ± sd over seeds, and the per-slice CSV with its provenance (seed, model SHA-256, commit)."""
from __future__ import annotations

import csv
import json
import re
import subprocess
from collections import defaultdict
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

from ProbSAMLib.errors import SettingsError
from Training.evaluation.bootstrap import PatientBootstrap
from Training.evaluation.scoring import INT_KEYS, TEXT_KEYS, summarise

# Reported columns in order (metric name -> header, arrow = better direction); @N sizes come from the rows.
# ECE is pooled over slices, the others are slice means.
# "_marked": the product's protocol (only the readers who marked the slice); plain: the literature's (all slots).
_HEADERS = [("ged_marked", "GED marked", "↓"), ("hm_iou_marked", "HM-IoU marked", "↑"),
            ("ged", "GED", "↓"), ("hm_iou", "HM-IoU", "↑"), ("ncc", "NCC", "↑"), ("ece", "ECE", "↓"),
            ("dice_majority", "Dice vs majority", "↑"), ("diversity", "diversity", "")]
_DIFFERENCE_METRICS = ("ged_marked", "hm_iou_marked", "ged", "hm_iou", "ncc", "ece", "dice_majority")
_SEED = re.compile(r"^(.*?)[_-]?seed(\d+)$")


def project_commit() -> str:
    """The repository's commit (with "-dirty" for uncommitted changes), or "unknown" outside git."""
    root = Path(__file__).resolve().parents[2]
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=40"], cwd=root,
                             capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else "unknown"


def _sorted_sizes(rows: List[dict], metric: str) -> List[str]:
    keys = [k for k in rows[0] if k == metric or k.startswith(metric + "@")]
    return sorted(keys, key=lambda k: int(k.split("@")[1]) if "@" in k else 0)


def headline(rows: List[dict], differences: bool = False) -> List[tuple]:
    """[(key, header)] of the reported metrics present in the per-slice rows."""
    out = []
    for metric, name, arrow in _HEADERS:
        if differences and metric not in _DIFFERENCE_METRICS:
            continue
        for key in _sorted_sizes(rows, metric):
            label = name + (key[len(metric):] if "@" in key else "")
            out.append((key, ("Δ" + label) if differences else f"{label} {arrow}".strip()))
            if differences and metric == "ged" and "@" in key:
                out.append((key.replace("ged", "ged_ratio"), "ratio " + label))
    return out


def reader_groups(rows: List[dict]) -> Dict[str, np.ndarray]:
    """Row indices of every slice ("all"), of the slices marked by k readers (k = 0..4) and, for data
    with a `case` column (phantom v2), of each case type ("case plain", "case juxta_vascular", ...)."""
    marked = np.array([r["n_marked"] for r in rows])
    groups = {"all": np.arange(len(rows))}
    for k in sorted(set(marked.tolist())):
        groups[f"{k} reader{'s' if k != 1 else ''}"] = np.flatnonzero(marked == k)
    cases = np.array([r.get("case", "") for r in rows])
    for case in sorted(set(cases.tolist()) - {""}):
        groups[f"case {case}"] = np.flatnonzero(cases == case)
    return groups


def _column(rows: List[dict], key: str, index: np.ndarray) -> Optional[np.ndarray]:
    if key not in rows[0]:
        return None
    if key.startswith("ece"):
        return np.stack([rows[i]["calibration_bins"] for i in index])
    return np.array([rows[i][key] for i in index], dtype=np.float64)


def interval_tables(per_slice: Dict[str, List[dict]], n_boot: int, seed: int) -> Dict[str, Dict[str, dict]]:
    """{group: {method: {metric: Interval as dict}}}; the slices (hence the groups) are the same for all."""
    first = next(iter(per_slice.values()))
    out = {}
    for group, index in reader_groups(first).items():
        boot = PatientBootstrap([first[i]["patient_id"] for i in index], n_boot, seed)
        out[group] = {}
        for method, rows in per_slice.items():
            cells = {}
            for key, _ in headline(rows):
                values = _column(rows, key, index)
                if values is not None:
                    cells[key] = (boot.ece(values) if key.startswith("ece") else boot.mean(values)).__dict__
            cells["slices"] = int(len(index))
            cells["patients"] = boot.n_clusters
            out[group][method] = cells
    return out


def difference_tables(per_slice: Dict[str, List[dict]], n_boot: int, seed: int) -> Dict[str, Dict[str, dict]]:
    """{group: {"A - B": {metric: Interval}}}: the first method against every other, paired bootstrap."""
    names = list(per_slice)
    reference, first = names[0], per_slice[names[0]]
    out = {}
    for group, index in reader_groups(first).items():
        boot = PatientBootstrap([first[i]["patient_id"] for i in index], n_boot, seed)
        out[group] = {}
        for other in names[1:]:
            cells = {}
            for key, _ in headline(first, differences=True):
                a, b = _column(first, key, index), _column(per_slice[other], key, index)
                if a is None or b is None:
                    continue
                diff = boot.ece_difference(a, b) if key.startswith("ece") else boot.difference(a, b)
                cells[key] = diff.__dict__
                if key.startswith("ged@"):  # GED targets are stated as ratios ("<= 0.8 x the baseline")
                    cells[key.replace("ged", "ged_ratio")] = boot.ratio(a, b).__dict__
            out[group][f"{reference} − {other}"] = cells
    return out


def seed_summary(per_slice: Dict[str, List[dict]]) -> Dict[str, Dict[str, dict]]:
    """Methods named <method>_seed<k>: mean ± sd (ddof 1) over seeds of each whole-split metric."""
    by_method = defaultdict(list)
    for name, rows in per_slice.items():
        match = _SEED.match(name)
        if match:
            by_method[match.group(1)].append(summarise(rows))
    out = {}
    for method, summaries in by_method.items():
        if len(summaries) < 2:
            continue
        out[method] = {key: {"mean": float(np.mean([s[key] for s in summaries])),
                             "sd": float(np.std([s[key] for s in summaries], ddof=1)), "seeds": len(summaries)}
                       for key, _ in headline(next(r for n, r in per_slice.items() if _SEED.match(n)))
                       if key in summaries[0]}
    return out


def _cell(interval: Optional[dict]) -> str:
    if not interval or not np.isfinite(interval["estimate"]):
        return "–"
    return f"{interval['estimate']:.3f} [{interval['low']:.3f}, {interval['high']:.3f}]"


def markdown(protocol: str, intervals: dict, differences: dict, seeds: dict, rows: List[dict]) -> str:
    lines = [protocol, ""]
    for group, methods in intervals.items():
        any_method = next(iter(methods.values()))
        keys = [(k, h) for k, h in headline(rows) if k in any_method]
        lines += [f"### {group} ({any_method['slices']} slices, {any_method['patients']} patients)", "",
                  "| method | " + " | ".join(h for _, h in keys) + " |", "|---|" + "---|" * len(keys)]
        lines += [f"| {m} | " + " | ".join(_cell(c.get(k)) for k, _ in keys) + " |" for m, c in methods.items()]
        lines.append("")
    for group, pairs in differences.items():
        if not pairs:
            continue
        keys = [(k, h) for k, h in headline(rows, differences=True) if k in next(iter(pairs.values()))]
        lines += [f"### paired differences, {group}", "",
                  "| difference | " + " | ".join(h for _, h in keys) + " |", "|---|" + "---|" * len(keys)]
        lines += [f"| {p} | " + " | ".join(_cell(c.get(k)) for k, _ in keys) + " |" for p, c in pairs.items()]
        lines.append("")
    if seeds:
        keys = [(k, h) for k, h in headline(rows) if k in next(iter(seeds.values()))]
        lines += ["### mean ± sd over seeds (all slices)", "",
                  "| method | seeds | " + " | ".join(h for _, h in keys) + " |", "|---|---|" + "---|" * len(keys)]
        for method, cells in seeds.items():
            n = next(iter(cells.values()))["seeds"]
            lines.append(f"| {method} | {n} | " + " | ".join(
                f"{cells[k]['mean']:.3f} ± {cells[k]['sd']:.3f}" for k, _ in keys) + " |")
        lines.append("")
    return "\n".join(lines)


_PROVENANCE_COLUMNS = ("method", "seed", "box_margin", "model_sha256", "commit")


def write_per_slice(path: Path, method: str, rows: List[dict], seed: int, model_sha256: str, commit: str,
                    box_margin: Optional[float] = None) -> None:
    """One row per slice: ids, every metric, the ECE bins (JSON) and the provenance columns (``commit``:
    the commit that computed the rows, an earlier one for rows reused with ``--reuse``)."""
    fields = list(rows[0]) + list(_PROVENANCE_COLUMNS)
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            bins = json.dumps(np.asarray(row["calibration_bins"]).tolist())
            writer.writerow(dict(row, calibration_bins=bins, method=method, seed=seed, box_margin=box_margin,
                                 model_sha256=model_sha256, commit=commit))


def read_per_slice(path: Path) -> tuple:
    """A per-slice CSV written by write_per_slice -> (method, rows, {"seed", "model_sha256", "commit",
    "box_margin" (None in a table written without it)}).

    The rows are typed as evaluate_slices makes them (ids int/str, metrics float, ECE bins an array), so
    an earlier run's slices can enter a new run's tables and paired differences unchanged."""
    with open(path, newline="", encoding="utf-8") as fh:
        records = list(csv.DictReader(fh))
    if not records or "calibration_bins" not in records[0] or "method" not in records[0]:
        raise ValueError(f"{path} is not a per-slice table of this version of evaluate.py (no method/ECE bins "
                         "columns); evaluate that method again instead of reusing it")
    rows = []
    for record in records:
        row = {}
        for key, value in record.items():
            if key in _PROVENANCE_COLUMNS:
                continue
            if key in INT_KEYS:
                row[key] = int(value)
            elif key in TEXT_KEYS:
                row[key] = value
            elif key == "calibration_bins":
                row[key] = np.asarray(json.loads(value), dtype=np.float64)
            else:
                row[key] = float(value)
        rows.append(row)
    first = records[0]
    margin = first.get("box_margin", "")
    return first["method"], rows, {"seed": int(first["seed"]), "model_sha256": first["model_sha256"],
                                   "commit": first["commit"], "box_margin": float(margin) if margin else None}


def read_results_folder(folder) -> Dict[str, List[dict]]:
    """Every per-slice table of an evaluate.py --out folder -> {method: rows} (read_per_slice's rows), in
    file-name order; SettingsError when the folder holds none."""
    tables = sorted(Path(folder).glob("per_slice_*.csv"))
    if not tables:
        raise SettingsError(f"no per_slice_*.csv in {folder}: give an evaluate.py --out folder")
    return dict(read_per_slice(path)[:2] for path in tables)


def write_results(out: Path, per_slice: Dict[str, List[dict]], protocol: str, provenance: dict,
                  n_boot: int = 1000, seed: int = 0) -> str:
    """Every file into ``out`` (a folder being filled, see AtomicOutputDir); returns the Markdown."""
    intervals = interval_tables(per_slice, n_boot, seed)
    differences = difference_tables(per_slice, n_boot, seed) if len(per_slice) > 1 else {}
    seeds = seed_summary(per_slice)
    text = markdown(protocol, intervals, differences, seeds, next(iter(per_slice.values())))
    (out / "results.md").write_text(text + "\n", encoding="utf-8")
    with open(out / "results.csv", "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["group", "method", "metric", "estimate", "low", "high", "n"])
        for group, methods in intervals.items():
            for method, cells in methods.items():
                for key, _ in headline(per_slice[method]):
                    if key in cells:
                        c = cells[key]
                        writer.writerow([group, method, key, c["estimate"], c["low"], c["high"], c["n"]])
    for name, rows in per_slice.items():
        safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_")
        commit = provenance.get("reused", {}).get(name, {}).get("commit", provenance["commit"])
        write_per_slice(out / f"per_slice_{safe}.csv", name, rows, seed, provenance.get(name, ""), commit,
                        provenance.get("box_margin"))
    (out / "results.json").write_text(json.dumps({"protocol": protocol, "provenance": provenance,
                                                  "intervals": intervals, "differences": differences,
                                                  "seeds": seeds}, indent=1, default=float), encoding="utf-8")
    return text
