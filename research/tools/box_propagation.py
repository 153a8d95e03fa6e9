"""Fixed 3D box or box propagation? LiteMedSAM alone on chest-field phantom volumes, scored per slice.

    python research/tools/box_propagation.py --patients LIDC-IDRI-0001 LIDC-IDRI-0003 LIDC-IDRI-0004 \
        --max-nodules 12 --out research/results/box_propagation.md

For each nodule of the given scans (real LIDC reader outlines, rendered by phantom generator 3 over whole
512² chest slices), the box a user would draw (the readers' union + 3 voxels in-plane, its slices) is sampled
with sample_volume by an untrained lite_medsam model (its samples are LiteMedSAM's own masks) twice: the ROI's
rectangle on every slice ("fixed") and box propagation from the middle slice outwards ("propagate"). Scores:
Dice of the consensus with the readers' majority (at least half of the nodule's readers), on every slice and
on the end slices (the first and last slice any reader marked) apart, where the fixed box is far larger than
the lesion. Results are printed and written as a markdown table (the phantom decides nothing about real CT:
it shows whether propagation does what it is for).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from ProbSAMLib.geometry import VolumeGeometry  # noqa: E402
from ProbSAMLib.inference.volume import sample_volume  # noqa: E402
from ProbSAMLib.metrics import dice  # noqa: E402
from ProbSAMLib.modeling.config import ProbSAMConfig  # noqa: E402
from ProbSAMLib.weights.build import build_probsam  # noqa: E402
from ProbSAMLib.weights.checkpoints import resolve_weights  # noqa: E402
from ProbSAMLib.demo.phantom import demo_box  # noqa: E402
from Training.data.chest_phantom import render_chest_nodule  # noqa: E402
from Training.data.lidc_nodules import scan_nodules, select_scans  # noqa: E402


def score(consensus: np.ndarray, majority: np.ndarray, marked: np.ndarray) -> dict:
    """Dice on every slice any reader marked, and on the end slices of that range."""
    slices = np.flatnonzero(marked)
    ends = {int(slices[0]), int(slices[-1])}
    per = {int(k): dice(consensus[k], majority[k]) for k in slices}
    return {"all": float(np.mean(list(per.values()))), "ends": float(np.mean([per[k] for k in ends])),
            "inner": float(np.mean([v for k, v in per.items() if k not in ends])) if len(per) > 2 else None}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--patients", nargs="+", required=True)
    parser.add_argument("--max-nodules", type=int, default=12)
    parser.add_argument("--samples", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = build_probsam(ProbSAMConfig.preset("lite_medsam"),
                          sam_checkpoint=resolve_weights("lite_medsam_backbone")).eval()
    rows = []
    for scan in select_scans(patients=args.patients):
        nodules, _ = scan_nodules(scan, crop=512, pad_slices=2)
        for nodule in nodules:
            if len(rows) >= args.max_nodules:
                break
            phantom = render_chest_nodule(nodule, seed=0)
            geometry = VolumeGeometry.from_sitk(phantom.image)
            readers = phantom.reader_masks
            majority = readers.sum(0) * 2 >= len(readers)
            box = demo_box(readers, geometry)
            volume = phantom.array.astype(np.float32)
            row = {"nodule": nodule.row()["nodule_id"] if hasattr(nodule, "row") else str(len(rows)),
                   "readers": len(readers), "slices": box.size[2]}
            for mode in ("fixed", "propagate"):
                started = time.perf_counter()
                result = sample_volume(model, volume, geometry, box, n_samples=args.samples, seed=0, box_mode=mode)
                inside = (slice(None),) + box.slices()
                marked = readers[inside].any(axis=(0, 2, 3))
                row[mode] = score(result.consensus, majority[box.slices()], marked)
                row[mode]["seconds"] = time.perf_counter() - started
            rows.append(row)
            print(row, flush=True)
    lines = ["| nodule | readers | box slices | fixed: all | fixed: end slices | propagate: all | propagate: end slices |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['nodule']} | {r['readers']} | {r['slices']} | {r['fixed']['all']:.3f} | "
                     f"{r['fixed']['ends']:.3f} | {r['propagate']['all']:.3f} | {r['propagate']['ends']:.3f} |")
    means = {m: {k: float(np.mean([r[m][k] for r in rows])) for k in ("all", "ends")} for m in ("fixed", "propagate")}
    diffs = {k: np.array([r["propagate"][k] - r["fixed"][k] for r in rows]) for k in ("all", "ends")}
    lines.append(f"| **mean** ({len(rows)} nodules) | | | {means['fixed']['all']:.3f} | {means['fixed']['ends']:.3f} | "
                 f"{means['propagate']['all']:.3f} | {means['propagate']['ends']:.3f} |")
    rng = np.random.default_rng(0)
    summary = []
    for k, d in diffs.items():
        boot = [rng.choice(d, len(d)).mean() for _ in range(2000)]
        summary.append(f"propagate − fixed, {k} slices: {d.mean():+.3f} [{np.percentile(boot, 2.5):+.3f}, "
                       f"{np.percentile(boot, 97.5):+.3f}] (bootstrap over nodules)")
    text = "\n".join(lines + [""] + summary) + "\n"
    print(text)
    if args.out:
        args.out.write_text(f"# Box propagation vs the fixed 3D box (LiteMedSAM alone, chest-field phantom)\n\n"
                            f"`python research/tools/box_propagation.py --patients {' '.join(args.patients)} "
                            f"--max-nodules {args.max_nodules}` ({args.threads} torch threads)\n\n" + text,
                            encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
