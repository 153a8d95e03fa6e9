"""Benchmark: sampling a 32-slice box x 16 samples, next to the encoder-only floor.

For each model, on a synthetic 512 x 512 CT with a 32-slice box (40 x 40 voxels in-plane):
  - volume_s:  wall time of ``sample_volume`` (encode every slice once, draw, decode 16 samples a slice,
               uncertainty maps and summary), median over --repeats after one warm-up run;
  - encode_s:  the encoder-only floor: encoding the same 32 context windows in the same chunks;
  - ratio:     volume_s / encode_s (1.0 would mean sampling costs nothing beyond encoding);
  - peak memory: the rise of the process's resident memory during one sample_volume call (sampled
    every 2 ms from /proc, Linux), and on CUDA torch.cuda.max_memory_allocated.
Random weights: timing only.

    python Testing/benchmarks/volume.py                          # tiny on the chosen device
    python Testing/benchmarks/volume.py --models tiny vit_b --device cuda
"""

from __future__ import annotations

import argparse
import os
import threading
import time

import numpy as np
import torch

from ProbSAMLib import ProbSAMConfig, build_probsam
from ProbSAMLib.inference.device import autocast, choose_device
from ProbSAMLib.geometry import VolumeGeometry, voxel_box_from_ijk
from ProbSAMLib.inference.sampling import images_to_unit
from ProbSAMLib.inference.volume import context_window, min_context_size, sample_volume

from sampling import timed  # the shared timing helper of Testing/benchmarks/sampling.py (same folder)


class PeakRSS:
    """Highest resident set size seen while the block runs, sampled by a thread (Linux /proc)."""

    def __init__(self, interval: float = 0.002):
        self.interval, self.peak, self.start = interval, 0, 0
        self._stop = threading.Event()

    @staticmethod
    def rss() -> int:
        try:
            with open("/proc/self/statm") as handle:
                return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except OSError:  # not Linux: no figure
            return 0

    def _watch(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss())
            time.sleep(self.interval)

    def __enter__(self):
        self.start = self.peak = self.rss()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.rss())

    @property
    def rise_mib(self) -> float:
        return (self.peak - self.start) / 2 ** 20


def synthetic_ct(slices: int):
    """A 512 x 512 x (slices + 8) lung-like volume in HU with a blob, and its geometry."""
    geometry = VolumeGeometry((512, 512, slices + 8), (-180.0, -180.0, -300.0), (0.7, 0.7, 1.25), np.eye(3))
    rng = np.random.default_rng(0)
    volume = rng.normal(-820, 40, geometry.shape).astype(np.float32)
    k, j, i = np.ogrid[:geometry.shape[0], :512, :512]
    volume[((k - geometry.shape[0] // 2) * 1.25) ** 2 + ((j - 260) * 0.7) ** 2 + ((i - 250) * 0.7) ** 2 < 100] = 20
    return volume, geometry


def bench(name: str, device: torch.device, slices: int, samples: int, repeats: int) -> dict:
    model = build_probsam(ProbSAMConfig.preset(name), seed=0).to(device).eval()
    volume, geometry = synthetic_ct(slices)
    voxel_box = voxel_box_from_ijk([230, 240, 4], [269, 279, 4 + slices - 1], geometry)
    first = sample_volume(model, volume, geometry, voxel_box, n_samples=samples, seed=0)
    batch = first.summary["settings"]["slice_batch"]

    r0, r1, c0, c1 = context_window((230, 240, 270, 280), volume.shape[1:], min_context_size(model))
    windows = volume[4:4 + slices, r0:r1, c0:c1]

    @torch.no_grad()
    def encode_only():
        for start in range(0, slices, batch):
            images = images_to_unit(model, windows[start:start + batch]).to(device)
            with autocast(device):
                model.encode(images)

    def run():
        return sample_volume(model, volume, geometry, voxel_box, n_samples=samples, seed=0, slice_batch=batch)

    volume_s = timed(run, device, repeats)
    encode_s = timed(encode_only, device, repeats)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with PeakRSS() as memory:
        result = run()
    cuda_mib = torch.cuda.max_memory_allocated(device) / 2 ** 20 if device.type == "cuda" else None
    return {"model": name, "batch": batch, "window": f"{r1 - r0}x{c1 - c0}", "volume_s": volume_s,
            "encode_s": encode_s, "ratio": volume_s / encode_s, "rss_mib": memory.rise_mib, "cuda_mib": cuda_mib,
            "split": result.summary["timings_s"]}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["tiny"], help="tiny, vit_b, ... (vit_b is slow on CPU)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--slices", type=int, default=32)
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    device = choose_device(args.device)
    precision = "bf16 autocast" if device.type == "cuda" else "fp32"
    label = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()} threads"
    print(f"device {device} ({label}, {precision}), torch {torch.__version__}; "
          f"{args.slices}-slice box x {args.samples} samples, median of {args.repeats}")
    print(f"{'model':<7} {'window':>9} {'batch':>5} {'volume s':>9} {'encode-only s':>14} {'ratio':>6} "
          f"{'peak RSS rise MiB':>18} {'CUDA peak MiB':>14}   in-call split (encode / decode / total s)")
    for name in args.models:
        r = bench(name, device, args.slices, args.samples, args.repeats)
        cuda = f"{r['cuda_mib']:.0f}" if r["cuda_mib"] is not None else "-"
        split = r["split"]
        print(f"{r['model']:<7} {r['window']:>9} {r['batch']:>5} {r['volume_s']:9.3f} {r['encode_s']:14.3f} "
              f"{r['ratio']:6.2f} {r['rss_mib']:18.1f} {cuda:>14}   "
              f"{split['encode_s']:.3f} / {split['decode_s']:.3f} / {split['total_s']:.3f}")


if __name__ == "__main__":
    main()
