"""Benchmark: the Slicer module's ``process()`` on a 512 x 512 x 300 CT, next to the CLI on the same box.

Runs on real Slicer core (slicer-core; Qt mocked as in the tests). For N samples (default 64) of one ROI
(a 40 x 40 x 20-voxel box around a synthetic nodule) it prints:
  - scene memory: the sum of the output nodes' image memory (segments' labelmaps + uncertainty volume,
    vtkDataObject.GetActualMemorySize) and the Slicer-side process's RSS change over the run; next to what
    a full-extent labelmap per sample would cost (the old way: one CT-sized uint8 image per sample);
  - process() wall time with a cold worker (start the process, import torch, load the model) and a warm
    one (the model stays loaded), and the ``probsam sample`` CLI on the same box (a new process that
    reads the CT, samples and writes its files).

    OMP_NUM_THREADS=1 PYTHONPATH=$PWD python Testing/benchmarks/slicer_sampling.py [--samples 64] [--device cpu]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "Testing"))
import slicer_standin  # noqa: E402

SHAPE_KJI = (300, 512, 512)
BOX_LO, BOX_HI = (236, 236, 140), (276, 276, 160)  # (i, j, k), hi exclusive: 40 x 40 x 20 voxels
SPACING = (0.7, 0.7, 1.25)


def rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def synthetic_ct() -> np.ndarray:
    """int16 HU: lung-like noise and a 12 mm solid nodule in the box's centre."""
    rng = np.random.default_rng(0)
    ct = (rng.normal(-820, 40, SHAPE_KJI)).astype(np.int16)
    k, j, i = np.ogrid[:SHAPE_KJI[0], :SHAPE_KJI[1], :SHAPE_KJI[2]]
    centre = [(lo + hi) / 2 for lo, hi in zip(BOX_LO, BOX_HI)]
    nodule = (((i - centre[0]) * SPACING[0]) ** 2 + ((j - centre[1]) * SPACING[1]) ** 2
              + ((k - centre[2]) * SPACING[2]) ** 2) < 6.0 ** 2
    ct[nodule] = 30
    return ct


def add_scene(slicer, ct):
    ijk_to_ras = np.diag([-SPACING[0], -SPACING[1], SPACING[2], 1.0])  # an LPS-stored axial CT
    volume = slicer.util.addVolumeFromArray(ct, ijk_to_ras, "CT")
    lo, hi = np.array(BOX_LO, float) - 0.5, np.array(BOX_HI, float) - 0.5  # outer voxel edges
    corners = np.array([ijk_to_ras @ np.append(c, 1.0) for c in (lo, hi)])[:, :3]
    roi = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "Nodule")
    roi.SetCenter(*corners.mean(axis=0))
    roi.SetSize(*np.abs(corners[1] - corners[0]))
    return volume, roi


def node_memory_bytes(out) -> int:
    """Image data of the result: every segment's labelmap (consensus, samples, agreement) and the four maps."""
    total = 0
    segmentation = out.segmentationNode.GetSegmentation()
    for n in range(segmentation.GetNumberOfSegments()):
        total += segmentation.GetNthSegment(n).GetRepresentation("Binary labelmap").GetActualMemorySize() * 1024
    return total + sum(node.GetImageData().GetActualMemorySize() * 1024 for node in out.mapNodes.values())


def timed_process(logic, volume, roi, args):
    start, rss = time.perf_counter(), rss_bytes()
    out = logic.process(volume, [roi], numberOfSamples=args.samples, seed=0, model="demo", device=args.device)[0]
    return time.perf_counter() - start, rss_bytes() - rss, out


def timed_cli(ct, args) -> float:
    import SimpleITK as sitk

    with tempfile.TemporaryDirectory() as tmp:
        image = sitk.GetImageFromArray(ct)
        image.SetSpacing(SPACING)
        sitk.WriteImage(image, f"{tmp}/ct.nrrd")
        box = ",".join(str(v) for v in BOX_LO + tuple(h - 1 for h in BOX_HI))
        command = [sys.executable, "-m", "ProbSAMLib.app.cli", "sample", f"{tmp}/ct.nrrd", "--box", box, "--box-space",
                   "ijk", "--samples", str(args.samples), "--seed", "0", "--device", args.device, "--out",
                   f"{tmp}/out", "-q"]
        start = time.perf_counter()
        subprocess.run(command, check=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
        return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    slicer = slicer_standin.install()
    import ProbSAMSlicer

    ct = synthetic_ct()
    volume, roi = add_scene(slicer, ct)
    logic = ProbSAMSlicer.ProbSAMSlicerLogic()
    cold_s, cold_rss, out = timed_process(logic, volume, roi, args)
    nodes_bytes = node_memory_bytes(out)
    warm_s, warm_rss, _ = timed_process(logic, volume, roi, args)
    logic.stopWorker()
    cli_s = timed_cli(ct, args)

    full_extent = args.samples * int(np.prod(SHAPE_KJI))  # uint8 labelmap per sample, CT-sized
    print(f"CT {SHAPE_KJI[2]}x{SHAPE_KJI[1]}x{SHAPE_KJI[0]} (IxJxK), box 40x40x20 voxels, {args.samples} samples, "
          f"model demo, device {args.device}, torch threads {os.environ.get('OMP_NUM_THREADS', 'default')}")
    print(f"scene memory: output nodes {nodes_bytes / 2**20:.2f} MiB "
          f"(full-extent labelmaps would be {full_extent / 2**20:.0f} MiB); "
          f"Slicer-side RSS change: cold run {cold_rss / 2**20:+.1f} MiB, warm run {warm_rss / 2**20:+.1f} MiB")
    print(f"process(): cold worker {cold_s:.1f} s, warm worker {warm_s:.1f} s; CLI (new process, writes files) "
          f"{cli_s:.1f} s")
    slicer_standin.uninstall()


if __name__ == "__main__":
    main()
