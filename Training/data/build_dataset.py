"""Resumable, scan-by-scan data set building shared by make_phantom.py and prepare_lidc.py.

Each scan's slices are saved as one chunk in a work directory as soon as they are made; a rerun
with the same parameters skips the scans already done. When every scan has been tried, the chunks
are written as one data set (Training/data/dataset_format.py) and the work directory is removed.
Scans that fail are reported (and retried on the next run) instead of stopping the build.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional, Sequence

import numpy as np

from ProbSAMLib.errors import InputError, SettingsError
from ProbSAMLib.io.outputdir import OutputFolder, parser_inputs
from Training import guards
from Training.data.dataset_format import Chunk, check_output, warn_small_splits, write_dataset


@dataclass
class StoredChunk:
    """A chunk saved in the work directory: `n` slices, loaded on demand."""

    path: Path
    n: int
    has_neighbours: bool = False

    def load(self) -> Chunk:
        with np.load(ChunkStore._file(self.path, ".npz")) as data:
            images, masks, present = data["images"], data["masks"], data["present"]
            neighbours = data["neighbours"] if "neighbours" in data.files else None
        rows = json.loads(ChunkStore._file(self.path, ".json").read_text(encoding="utf-8"))["rows"]
        return Chunk(images, masks, present, rows, neighbours)


class ChunkStore:
    """Per-scan chunks in `root`; a chunk is complete once its .json marker exists."""

    def __init__(self, root: Path, params: dict, force: bool):
        self.root = Path(root)
        stamp = self.root / "params.json"
        if stamp.exists() and json.loads(stamp.read_text(encoding="utf-8")) != params:
            if not force:
                raise SettingsError(f"work directory {self.root} was made with other parameters "
                                   f"({stamp.read_text(encoding='utf-8').strip()}); pass --force to start over")
            shutil.rmtree(self.root)
        self.root.mkdir(parents=True, exist_ok=True)
        stamp.write_text(json.dumps(params, sort_keys=True), encoding="utf-8")

    def _base(self, key: str) -> Path:
        return self.root / key.replace(os.sep, "_")

    @staticmethod
    def _file(base: Path, suffix: str) -> Path:
        return base.with_name(base.name + suffix)  # not with_suffix: series UIDs contain dots

    def done(self, key: str) -> bool:
        return self._file(self._base(key), ".json").exists()

    def put(self, key: str, chunk: Chunk, info: dict) -> None:
        base = self._base(key)
        tmp = base.with_name(base.name + ".tmp.npz")
        arrays = dict(images=chunk.images, masks=chunk.masks, present=chunk.present)
        if chunk.neighbours is not None:
            arrays["neighbours"] = chunk.neighbours
        np.savez(tmp, **arrays)
        os.replace(tmp, self._file(base, ".npz"))
        marker = base.with_name(base.name + ".tmp.json")
        marker.write_text(json.dumps({"n": chunk.n, "info": info, "rows": chunk.rows}), encoding="utf-8")
        os.replace(marker, self._file(base, ".json"))  # last: marks the scan as done

    def get(self, key: str) -> StoredChunk:
        record = json.loads(self._file(self._base(key), ".json").read_text(encoding="utf-8"))
        with np.load(self._file(self._base(key), ".npz")) as data:  # reads the archive's index only
            has_neighbours = "neighbours" in data.files
        return StoredChunk(self._base(key), int(record["n"]), has_neighbours)

    def info(self, key: str) -> dict:
        return json.loads(self._file(self._base(key), ".json").read_text(encoding="utf-8"))["info"]


@dataclass
class BuildReport:
    meta: dict
    failed: List[dict]
    seconds: float


def build(out, scans: Sequence, make_chunk: Callable, meta: dict, params: dict,
          work_dir=None, seed: int = 0, force: bool = False, progress: bool = True,
          desc: str = "scans", splits: Optional[dict] = None, tool: str = "ProbSAMLib",
          inputs: Sequence = ()) -> BuildReport:
    """Run `make_chunk(scan) -> (Chunk, info dict of counts)` on every scan and write the data set.

    Failed scans are left out of the data set and listed in the report and in meta["failed"]; the
    work directory is then kept, so a rerun with --force retries only them. `splits`: a patient
    split decided before the build (see write_dataset); None splits the written patients. `tool`: the
    builder's name for the data set's marker; `inputs`: what it reads (the output may not overlap them).
    The work directory may not overlap the output (it would be written into it before the output exists).
    """
    from tqdm import tqdm

    started = time.time()
    out = check_output(out, force, inputs, tool)
    work = Path(work_dir) if work_dir else out.parent / f"{out.name}.work"
    guards.separate_folders(out, work)
    store = ChunkStore(work, params, force)
    failed, done, n_slices = [], [], 0
    bar = tqdm(scans, desc=desc, unit="scan", disable=not progress)
    for scan in bar:
        key = str(scan.series_instance_uid)
        if not store.done(key):
            try:
                chunk, info = make_chunk(scan)
            except Exception as exc:  # one unreadable series must not end a long build
                failed.append({"patient_id": scan.patient_id, "series_uid": key,
                               "error": f"{type(exc).__name__}: {exc}"})
                bar.set_postfix(slices=n_slices, failed=len(failed))
                continue
            store.put(key, chunk, info)
        done.append(key)
        n_slices += store.get(key).n
        bar.set_postfix(slices=n_slices, failed=len(failed))
    if not any(store.get(key).n for key in done):
        reasons = "; ".join(f"{f['patient_id']}: {f['error']}" for f in failed[:3])
        raise InputError(f"no slices to write ({len(failed)} of {len(scans)} series failed"
                           + (f": {reasons}" if reasons else "") + ")")
    infos = [store.info(key) for key in done]
    totals = {name: int(sum(i.get(name, 0) for i in infos)) for name in infos[0]} if infos else {}
    meta = dict(meta, params=params, scans=len(done), failed=failed, **totals)
    meta = write_dataset(out, [store.get(key) for key in done], meta, seed, force, splits, tool=tool, inputs=inputs)
    if not failed:
        shutil.rmtree(work, ignore_errors=True)
    return BuildReport(meta, failed, time.time() - started)


def print_report(report: BuildReport, out) -> None:
    """Human-readable summary for the command-line tools."""
    meta = report.meta
    print(f"wrote {out}: {meta['n_slices']} slices, {meta['n_nodules']} nodules, "
          f"{meta['n_patients']} patients in {report.seconds:.0f} s")
    print(f"  nodules by reader count: {meta['nodules_by_readers']}")
    print(f"  slices by reader count:  {meta['slices_by_readers']}")
    if report.failed:
        print(f"{len(report.failed)} series could not be read and were skipped "
              "(rerun with --force to retry just these):")
        for f in report.failed:
            print(f"  {f['patient_id']}  {f['series_uid']}  {f['error']}")
    warn_small_splits(out)


def check_build_arguments(parser, args, max_crop: int, tool: str) -> None:
    """The shared options' ranges, the output and the work folder, before anything is read or created. The
    inputs the two folders may not overlap are the parser's ``type=Path`` options but --out and --work-dir."""
    guards.at_least("--scans", args.scans, 1)
    guards.at_least("--pad-slices", args.pad_slices, 0)
    guards.at_least("--seed", args.seed, 0)
    if not 16 <= args.crop <= max_crop:
        raise SettingsError(f"--crop must be between 16 and {max_crop}, got {args.crop}")
    inputs = parser_inputs(parser, args, outputs=("out", "work_dir"))
    check_output(args.out, args.force, inputs, tool)
    if args.work_dir is not None:
        guards.separate_folders(args.out, args.work_dir)
        OutputFolder(args.work_dir, True, inputs=inputs, option="--work-dir").check_location()


def add_build_arguments(parser, pad_help: str, seed_help: str) -> None:
    """The options every data-set builder CLI shares (make_phantom.py, prepare_lidc.py)."""
    parser.add_argument("--out", required=True, type=Path, help="output data set directory")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--scans", type=int, help="only the first N annotated scans")
    which.add_argument("--patients", nargs="+", metavar="ID", help="only these patient IDs")
    parser.add_argument("--crop", type=int, default=128, help="in-plane crop size (default 128)")
    parser.add_argument("--pad-slices", type=int, default=2, help=pad_help)
    parser.add_argument("--seed", type=int, default=0, help=seed_help)
    parser.add_argument("--work-dir", type=Path, help="partial results (default OUT.work)")
    parser.add_argument("--force", action="store_true", help="replace an existing data set")
