"""``probsam batch CASES.csv --out DIR``: sample every case of a cohort, resumably, on one process or many.

    probsam batch cases.csv --out cohort --samples 16 --seed 0
    torchrun --nproc_per_node 4 -m ProbSAMLib.app.cli batch cases.csv --out cohort     # 4 GPUs

The whole CSV is checked before anything is written (docs/BATCH.md has the format). DIR holds:

    batch.json            what the run is: the CSV's SHA-256 and the settings that change results
    cases/<id>/           each case's files, the ones `probsam sample` writes (OutputFolder: whole or absent)
    records/<id>.json     each finished case's line of the table, written (atomically) after its folder
    results.csv           the table, rebuilt from the records at the end of every run, rows in CSV order

A rerun of the same CSV and settings into the same DIR skips every case with a record, so a killed run
continues where it stopped and no case runs twice; a case killed half-way has no record and runs again
(its half-written folder is a temporary one, removed). A failed case is recorded with its one-line error
and the run goes on; the exit status is then 1. Each case's seed comes from the run's seed and the case's
id (``case_seed``), so the table does not depend on the order, the number of processes or resuming.

Under torchrun (WORLD_SIZE > 1) each rank loads the model once on its device, takes every WORLD_SIZE-th
case still to do, and rank 0 writes the table after all are done (ProbSAMLib.inference.distributed).
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
import shutil
import sys
import time
import warnings
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

from ProbSAMLib import __version__, errors
from ProbSAMLib.app import options
from ProbSAMLib.errors import InputError, OutputRefusedError, ProbSAMError
from ProbSAMLib.weights.registry import DEFAULT_MODEL

CSV_COLUMNS = ("id", "volume", "series_uid", "box", "box_space", "roi", "roi_index")
ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")  # a folder name on every file system
MANIFEST, CASES, RECORDS, TABLE = "batch.json", "cases", "records", "results.csv"
TOOL = "probsam batch"  # the output marker's writer: --force replaces only folders this command wrote
# The table's columns, in order; each record holds them (and a few more: pid, rank, timestamps).
RESULT_COLUMNS = (
    "id", "row", "status", "error", "volume", "box_ijk_first", "box_ijk_last", "box_clamped", "n_samples",
    "seed", "volume_mean_mm3", "volume_sd_mm3", "consensus_volume_mm3", "diameter_mean_mm", "diameter_sd_mm",
    "pairwise_dice_mean", "pairwise_dice_sd", "sample_diversity", "empty_samples", "marking_share", "warnings",
    "model", "device", "read_s", "sample_s", "write_s", "total_s")


class CasesFailed(ProbSAMError, RuntimeError):
    """Some cases failed (each is in the table with its error); the others are done. Exit status 1."""


@dataclass(frozen=True)
class Case:
    id: str
    row: int                    # the CSV row, counted as a spreadsheet does (the header is row 1)
    volume: Path                # relative paths are resolved against the CSV's folder
    volume_text: str            # as written in the CSV, for the table
    series_uid: Optional[str] = None
    box: Optional[str] = None
    box_space: Optional[str] = None
    roi: Optional[Path] = None
    roi_index: Optional[int] = None

    @property
    def inputs(self) -> list:
        return [p for p in (self.volume, self.roi) if p is not None]


def case_seed(run_seed: int, case_id: str) -> int:
    """A case's seed: the first 8 bytes of SHA-256("<run seed>/<case id>") as a big-endian integer, shifted
    right by one bit to 63 bits. It depends on nothing but the two, so order and process count do not matter."""
    digest = hashlib.sha256(f"{run_seed}/{case_id}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") >> 1


# --- the CSV --------------------------------------------------------------------------------------------
def read_cases(path) -> list:
    """Every case of the CSV, or the first problem as an InputError naming its row and column."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"cases file {path} not found")
    try:
        with open(path, encoding="utf-8-sig", newline="") as file:  # -sig: spreadsheets write a BOM
            reader = csv.reader(file)
            header = [name.strip() for name in next(reader, [])]
            rows = [(reader.line_num, cells) for cells in reader if any(cell.strip() for cell in cells)]
    except UnicodeDecodeError:
        raise InputError(f"{path} is not UTF-8 text; save the CSV as UTF-8") from None
    except csv.Error as error:
        raise InputError(f"{path} row {reader.line_num}: not a readable CSV row ({error})") from None
    _check_header(path, header)
    if not rows:
        raise InputError(f"{path} has a header but no cases")
    cases = [_case(path, header, number, cells) for number, cells in rows]
    _check_unique_ids(path, cases)
    return cases


def _check_header(path: Path, header: list) -> None:
    if not any(header):
        raise InputError(f"{path} is empty; its first row must name the columns ({', '.join(CSV_COLUMNS)})")
    for name in header:
        if name not in CSV_COLUMNS:
            raise InputError(f"{path} row 1: unknown column {name!r}; the columns are {', '.join(CSV_COLUMNS)}")
        if header.count(name) > 1:
            raise InputError(f"{path} row 1: column {name!r} appears {header.count(name)} times")
    if "volume" not in header:
        raise InputError(f"{path} row 1: the required column 'volume' is missing")
    if "box" not in header and "roi" not in header:
        raise InputError(f"{path} row 1: no 'box' or 'roi' column; each case needs one of them")


def _case(path: Path, header: list, row: int, cells: list) -> Case:
    where = f"{path} row {row}"
    if len(cells) > len(header):
        raise InputError(f"{where}: {len(cells)} cells but the header names {len(header)} columns")
    values = {name: cell.strip() for name, cell in zip(header, cells) if cell.strip()}

    def fail(column: str, what: str):
        raise InputError(f"{where}, column {column}: {what}")

    case_id = values.get("id", f"row{row}")
    if not ID_PATTERN.fullmatch(case_id):
        fail("id", f"{case_id!r} is not a usable id (letters, digits, '.', '_', '-'; at most 100; not "
                   f"starting with '.', '_' or '-'): it names the case's folder")
    if "volume" not in values:
        fail("volume", "empty; give the CT volume file or DICOM folder")
    if ("box" in values) == ("roi" in values):
        fail("box/roi", "give either a box or an roi file, not " + ("both" if "box" in values else "neither"))
    if "box" in values:
        from ProbSAMLib.geometry import parse_box_values

        try:
            parse_box_values(values["box"])
        except ValueError as error:
            fail("box", str(error))
        if values.get("box_space", "").lower() not in options.BOX_SPACES:
            fail("box_space", f"{values.get('box_space', '')!r}; name the box's space: "
                              f"{', '.join(options.BOX_SPACES)}")
    elif "box_space" in values:
        fail("box_space", "given without a box")
    roi_index = values.get("roi_index")
    if roi_index is not None:
        if "roi" not in values:
            fail("roi_index", "given without an roi file")
        if not roi_index.isdigit():
            fail("roi_index", f"{roi_index!r} is not a whole number >= 0")
    folder = path.parent
    return Case(case_id, row, _resolve(folder, values["volume"]), values["volume"], values.get("series_uid"),
                values.get("box"), values.get("box_space", "").lower() or None,
                _resolve(folder, values["roi"]) if "roi" in values else None,
                int(roi_index) if roi_index is not None else None)


def _resolve(folder: Path, text: str) -> Path:
    path = Path(text).expanduser()
    return path if path.is_absolute() else folder / path


def _check_unique_ids(path: Path, cases: list) -> None:
    seen = {}
    for case in cases:
        key = case.id.lower()  # the folders of "P01" and "p01" are one folder on macOS and Windows
        if key in seen:
            raise InputError(f"{path} rows {seen[key].row} and {case.row}, column id: both are {case.id!r} "
                             f"(ids name folders, compared ignoring case); give each case its own id")
        seen[key] = case


# --- the batch folder -----------------------------------------------------------------------------------
def _manifest(args, cases_digest: str) -> dict:
    """What makes two runs the same run: the CSV's content and the settings that change results."""
    def path_or_none(path):
        return str(Path(path).expanduser().resolve()) if path is not None else None

    settings = {"samples": args.samples, "seed": args.seed, "z_mode": args.z_mode, "box_mode": args.box_mode,
                "split": args.split, "model": args.model, "checkpoint": path_or_none(args.checkpoint),
                "sam_checkpoint": path_or_none(args.sam_checkpoint)}
    return {"tool": TOOL, "cases_csv": str(Path(args.cases).resolve()), "cases_sha256": cases_digest,
            "settings": settings, "probsam_version": __version__}


def _read_manifest(out: Path) -> Optional[dict]:
    try:
        return json.loads((out / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _same_run(found: Optional[dict], wanted: dict) -> bool:
    return (found is not None and found.get("cases_sha256") == wanted["cases_sha256"]
            and found.get("settings") == wanted["settings"])


def _why_not_continued(out: Path, found: Optional[dict], wanted: dict) -> str:
    if found is None:
        return (f"--out {out} exists and is not a probsam batch folder (no readable {MANIFEST}); choose a new "
                f"folder, or --force to replace it if it is an earlier probsam batch folder")
    if found.get("cases_sha256") != wanted["cases_sha256"]:
        what = f"another CSV ({found.get('cases_csv')}, SHA-256 {str(found.get('cases_sha256'))[:12]}...)"
    else:
        old = found.get("settings") or {}
        what = "other settings (" + ", ".join(f"{key} {old.get(key)!r} -> {value!r}"
                                              for key, value in wanted["settings"].items()
                                              if old.get(key) != value) + ")"
    return (f"--out {out} holds a batch run of {what}; rerun with the same CSV and settings to continue it, "
            f"choose another --out, or add --force to start over there")


def _prepare(args, cases: list, wanted: dict, inputs: list) -> list:
    """Create, continue or (--force) replace the batch folder; the indices of the cases still to run."""
    from ProbSAMLib.io.outputdir import OutputFolder

    out = Path(args.out)
    found = _read_manifest(out)
    if not _same_run(found, wanted):
        if out.exists() and not args.force:
            raise OutputRefusedError(_why_not_continued(out, found, wanted))
        with OutputFolder(out, force=args.force, inputs=inputs, tool=TOOL) as tmp:
            _write_json(tmp / MANIFEST, wanted)
    for name in (CASES, RECORDS):
        (out / name).mkdir(exist_ok=True)
    for stale in (out / RECORDS).glob(".*.tmp-*"):  # a record being written when a run was killed
        stale.unlink()
    return [n for n, case in enumerate(cases) if not _finished(_read_record(out, case), args.retry_failed)]


def _finished(record: Optional[dict], retry_failed: bool) -> bool:
    return record is not None and (record.get("status") == "done" or not retry_failed)


def _read_record(out: Path, case: Case) -> Optional[dict]:
    """A case's record; one that cannot be read (a disk that lost it) counts as missing: the case runs again."""
    try:
        record = json.loads((out / RECORDS / f"{case.id}.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def _write_json(path: Path, data: dict) -> None:
    _write_atomically(path, json.dumps(data, indent=2, allow_nan=False) + "\n")


def _write_atomically(path: Path, text: str) -> None:
    """Write beside ``path`` and rename: readers see the old file or the whole new one, never a part."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


# --- one case -------------------------------------------------------------------------------------------
def run_case(case: Case, args, model, out: Path) -> dict:
    """Sample one case into out/cases/<id>/ and return its record; a failure is recorded, not raised."""
    record = {"id": case.id, "row": case.row, "volume": case.volume_text, "n_samples": args.samples,
              "seed": case_seed(args.seed, case.id), "model": args.model, "device": str(model.device),
              "started": _now(), "pid": os.getpid()}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            summary = _sample_case(case, args, model, out, record)
            record.update(status="done", error="", **_measures(summary))
        except Exception as error:
            record.update(status="failed", error=errors.message(error))
    record["warnings"] = " | ".join(dict.fromkeys(str(w.message) for w in caught))
    record["total_s"] = round(sum(record.get(key, 0.0) for key in ("read_s", "sample_s", "write_s")), 4)
    record.update(finished=_now(), probsam_version=__version__)
    return record


def _sample_case(case: Case, args, model, out: Path, record: dict) -> dict:
    """Read, sample and write one case (timing each step into ``record``); its summary."""
    from ProbSAMLib.app import report
    from ProbSAMLib.app.jobs import cut_to_roi
    from ProbSAMLib.inference.volume import sample_volume
    from ProbSAMLib.io.outputdir import OutputFolder

    clock = time.perf_counter()
    volume, geometry, voxel_box, request, roi = _read_case(case)
    clock = _lap(record, "read_s", clock)
    result = sample_volume(model, volume, geometry, voxel_box, n_samples=args.samples, seed=record["seed"],
                           z_mode=args.z_mode, slice_batch=args.slice_batch, box_mode=args.box_mode)
    cut_to_roi(result, roi)  # a rotated ROI: the samples end at its own faces, as `probsam sample`'s do
    clock = _lap(record, "sample_s", clock)
    extra = {"command": "batch", "probsam_version": __version__, "model": options.model_description(args),
             "input": {"path": str(case.volume), "series_uid": case.series_uid}, "request": request,
             "batch": {"id": case.id, "row": case.row, "cases_csv": str(args.cases), "run_seed": args.seed}}
    # force: a folder of this case without a record is one a killed run finished; it is redone
    with OutputFolder(out / CASES / case.id, force=True, inputs=case.inputs + _weights(args), tool=TOOL) as tmp:
        report.write_outputs(result, tmp, split=args.split, extra_summary=extra,
                             tags=options.sample_tags(args.model, len(result.masks)))
    _lap(record, "write_s", clock)
    return result.summary


def _read_case(case: Case) -> tuple:
    """(volume in HU (K, J, I), geometry, voxel box, request, the ROI's Box3D or None) of a case; a clamped
    box is a warning."""
    import numpy as np
    import SimpleITK as sitk

    from ProbSAMLib.geometry import VolumeGeometry
    from ProbSAMLib.io.imageio import read_volume

    image = read_volume(case.volume, case.series_uid)
    geometry = VolumeGeometry.from_sitk(image)
    voxel_box, request, roi = options.voxel_box_for(geometry, case.box, case.box_space, case.roi, case.roi_index,
                                                    names=("box", "box_space"))
    if voxel_box.clamped:
        warnings.warn(voxel_box.warning)
    # a copy, not a view: the image is freed when this returns
    return sitk.GetArrayFromImage(image).astype(np.float32, copy=False), geometry, voxel_box, request, roi


def _lap(record: dict, name: str, started: float) -> float:
    now = time.perf_counter()
    record[name] = round(now - started, 4)
    return now


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _weights(args) -> list:
    return [p for p in (args.checkpoint, args.sam_checkpoint) if p is not None]


def _measures(summary: dict) -> dict:
    """A case's row of the table from its summary.json (inference.summary.volume_summary)."""
    spread, box = summary["spread"], summary["box"]
    return {"box_ijk_first": " ".join(map(str, box["ijk_first"])), "box_ijk_last": " ".join(map(str, box["ijk_last"])),
            "box_clamped": box["clamped"],
            "volume_mean_mm3": spread["volume_mm3"]["mean"], "volume_sd_mm3": spread["volume_mm3"]["sd"],
            "consensus_volume_mm3": spread.get("consensus_volume_mm3"),
            "diameter_mean_mm": spread["longest_axial_diameter_mm"]["mean"],
            "diameter_sd_mm": spread["longest_axial_diameter_mm"]["sd"],
            "pairwise_dice_mean": spread["pairwise_dice"]["mean"], "pairwise_dice_sd": spread["pairwise_dice"]["sd"],
            "sample_diversity": spread["sample_diversity"], "empty_samples": spread["empty_samples"],
            "marking_share": summary["marking_share"]}


# --- the table ------------------------------------------------------------------------------------------
def write_table(out: Path, cases: list) -> dict:
    """results.csv from the records, one row per case in CSV order; the count of each status."""
    counts = {"done": 0, "failed": 0, "not run": 0}
    lines = []
    for case in cases:
        record = _read_record(out, case) or {"id": case.id, "row": case.row, "volume": case.volume_text,
                                             "status": "not run"}
        counts[record["status"]] += 1
        lines.append(["" if record.get(column) is None else record[column] for column in RESULT_COLUMNS])
    tmp = out / f".{TABLE}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(RESULT_COLUMNS)
        writer.writerows(lines)
    os.replace(tmp, out / TABLE)
    return counts


# --- the command ----------------------------------------------------------------------------------------
def add_parser(commands) -> None:
    parser = commands.add_parser(
        "batch", help="sample every case of a CSV into one folder (resumable; torchrun for several GPUs)",
        description="Sample every case (a CT and a box or ROI) of a CSV with one model: each case's files in "
                    "DIR/cases/<id>/ and one table DIR/results.csv. Rerunning the same command continues a "
                    "killed run. Exit status 0 when every case is done, 1 when some failed. See docs/BATCH.md.")
    parser.add_argument("cases", type=Path, metavar="CASES.csv",
                        help="one row per case; columns id, volume, series_uid, box + box_space, or roi "
                             "(+ roi_index); relative paths are relative to the CSV's folder")
    parser.add_argument("--out", required=True, type=Path, metavar="DIR",
                        help="the batch folder: created, or continued when it holds a run of the same CSV and "
                             "settings")
    parser.add_argument("--force", action="store_true",
                        help="start over in --out when it holds a batch run of another CSV or other settings; "
                             "its results are deleted")
    parser.add_argument("--retry-failed", action="store_true", help="run the cases that failed before again")
    options.sampling_options(parser)
    options.model_options(parser, DEFAULT_MODEL)
    parser.set_defaults(run=cmd_batch)


def cmd_batch(args) -> None:
    from ProbSAMLib.inference.distributed import start_processes
    from ProbSAMLib.io.outputdir import OutputFolder

    options.check_settings(args)
    cases = read_cases(args.cases)
    wanted = _manifest(args, hashlib.sha256(Path(args.cases).read_bytes()).hexdigest())
    inputs = [args.cases] + _weights(args) + [path for case in cases for path in case.inputs]
    OutputFolder(args.out, force=args.force, inputs=inputs, tool=TOOL).check_location()
    processes = start_processes(args.device)
    try:
        pending = processes.from_rank0(lambda: _prepare(args, cases, wanted, inputs))
        mine = pending[processes.rank::processes.world_size]
        show_failures, args.quiet = not args.quiet, args.quiet or processes.rank != 0  # rank 0 speaks for all
        options.say(args, f"probsam: {len(cases)} cases, {len(pending)} to run, on {processes.world_size} "
                          f"process(es)")
        model = options.load_model(args, processes.device)
        _run_share(args, model, [cases[n] for n in mine], processes.rank, show_failures)
        processes.barrier()
        processes.from_rank0(lambda: _finish(args, cases, len(pending)))
    except (KeyboardInterrupt, errors.Terminated) as error:
        print(f"probsam: {errors.message(error)}; the cases finished so far are kept in {args.out}; run the same "
              f"command again to continue", file=sys.stderr)
        raise SystemExit(errors.exit_status(error)) from None
    finally:
        processes.close()


def _run_share(args, model, cases: list, rank: int, show_failures: bool) -> None:
    from tqdm.auto import tqdm

    out = Path(args.out)
    # shutil falls back to 80 columns where a terminal reports width 0 (tqdm would draw nothing there).
    with tqdm(cases, desc="cases", unit="case", file=sys.stderr, ncols=shutil.get_terminal_size().columns,
              disable=args.quiet or not sys.stderr.isatty()) as bar:
        for case in bar:
            bar.set_postfix_str(case.id, refresh=False)
            record = dict(run_case(case, args, model, out), rank=rank)
            _write_json(out / RECORDS / f"{case.id}.json", record)
            errors.pause_point("batch-record")  # test hook: a run killed here has this record and no later one
            if record["status"] == "failed" and show_failures:
                tqdm.write(f"probsam: case {case.id} (row {case.row}) failed: {record['error']}", file=sys.stderr)


def _finish(args, cases: list, ran: int) -> None:
    out = Path(args.out)
    counts = write_table(out, cases)
    if not args.quiet:
        print(f"{len(cases)} cases: {counts['done']} done, {counts['failed']} failed ({ran} run now); "
              f"table {out / TABLE}, files in {out / CASES}/")
        print("Research software, not for clinical use.")
    if counts["failed"] or counts["not run"]:
        raise CasesFailed(f"{counts['failed'] + counts['not run']} of {len(cases)} cases failed or did not run; "
                          f"their errors are in {out / TABLE} (--retry-failed runs the failed ones again)")
