"""A patient subsample of a slice data set, for short search runs that must fit a small machine.

    python research/subsample.py data/phantom_v2 --fraction 0.25 --out data/phantom_v2_sub

Each split keeps the same fraction of its patients (seeded, at least one), with all their slices, and
every kept patient stays in the split it was in: a subsample's test patients are never training patients
of the full set. meta.json notes the source and fraction. The output is written by the one writer
(dataset_format.write_dataset): nothing appears under --out until it is complete, and --force never
replaces the source.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from ProbSAMLib.errors import SettingsError, run_main  # noqa: E402
from ProbSAMLib.io.outputdir import parser_inputs  # noqa: E402
from Training.data.dataset_format import (COLUMNS, Chunk, check_output, load_dataset, warn_small_splits,  # noqa: E402
                                          write_dataset)

TOOL = "subsample.py"  # in the data set's marker: only this script's --force replaces it


def chosen_patients(splits: dict, fraction: float, seed: int) -> set:
    """The same fraction of every split's patients (at least one each), drawn with ``seed``."""
    rng = np.random.default_rng(seed)
    keep = set()
    for split in ("train", "val", "test"):
        ids = sorted(splits.get(split, []))
        if ids:
            keep |= set(rng.permutation(ids)[:max(1, int(round(fraction * len(ids))))].tolist())
    return keep


def subsample(source, out, fraction: float, seed: int = 0, force: bool = False) -> dict:
    """Write the subsample of ``source`` to ``out``; returns its meta dict."""
    if not 0 < fraction <= 1:
        raise SettingsError(f"--fraction must be in (0, 1], got {fraction}")
    check_output(out, force, inputs=[source], tool=TOOL)  # even with --force, never the source itself
    data = load_dataset(source)
    keep = chosen_patients(data.splits, fraction, seed)
    index = np.flatnonzero(np.isin(data.table["patient_id"], sorted(keep)))
    rows = [{c: _plain(data.table[c][i]) for c in COLUMNS if c in data.table} for i in index]
    chunk = Chunk(np.asarray(data.images[index]), np.asarray(data.masks[index]), np.asarray(data.present[index]),
                  rows, None if data.neighbours is None else np.asarray(data.neighbours[index]))
    # Counts, format, crop and date are recomputed by write_dataset; only the note is ours to extend.
    note = (data.meta.get("note", "") + f"; patient subsample {fraction} of {source} (seed {seed})").lstrip("; ")
    meta = dict(data.meta, note=note)
    return write_dataset(out, [chunk], meta, seed=data.splits.get("seed", 0), force=force, splits=data.splits,
                         tool=TOOL, inputs=[source])


def _plain(value):
    return value.item() if hasattr(value, "item") else value


def main(argv=None) -> int:
    return run_main("subsample.py", lambda: _main(argv))


def _main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", type=Path,  # type=Path: every path option is an input of the output guard
                        help="a data set folder (make_phantom.py, prepare_lidc.py, import_pickle.py)")
    parser.add_argument("--out", required=True, type=Path, help="folder to create")
    parser.add_argument("--fraction", type=float, required=True, help="share of each split's patients")
    parser.add_argument("--seed", type=int, default=0, help="which patients are drawn (default 0)")
    parser.add_argument("--force", action="store_true", help="replace an existing data set at --out")
    args = parser.parse_args(argv)
    check_output(args.out, args.force, parser_inputs(parser, args), TOOL)
    meta = subsample(args.source, args.out, args.fraction, args.seed, args.force)
    print(f"{args.out}: {meta['n_slices']} slices of {meta['n_patients']} patients")
    warn_small_splits(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
