"""Benchmark: the cost of 16 ProbSAM samples relative to one deterministic SAM box prediction.

Prints, measured side by side in one run for each model:
  - sam_1:        one deterministic box prediction (encode + decode 1 mask), what SAM costs;
  - probsam_16:   16 samples as ProbSAMLib does it (encode ONCE, decode 16 latents in one batched pass);
  - reference_16: 16 samples as the reference implementation does it (a full forward, encoder
                  included, for every sample);
and the ratios probsam_16 / sam_1 and reference_16 / probsam_16. Random weights: timing only.

    python Testing/benchmarks/sampling.py                       # tiny and vit_b on the chosen device
    python Testing/benchmarks/sampling.py --models tiny --device cuda
    python Testing/benchmarks/sampling.py --models tiny --refine-channels 0 8   # the mask refiner's cost
    python Testing/benchmarks/sampling.py --models tiny --refine-channels 8 --neighbours 0 1   # reading k +- 1
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time

import torch

from ProbSAMLib import ProbSAMConfig, build_probsam
from ProbSAMLib.inference.device import autocast, choose_device, synchronize


def timed(fn, device, repeats):
    """Median wall time of fn() over `repeats` runs after one warm-up, synchronising CUDA and MPS."""
    fn()
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_model(name: str, device: torch.device, repeats: int, n: int = 16, refine_channels: int = 0,
                neighbours: bool = False):
    config = ProbSAMConfig.preset(name, refine_channels=refine_channels, neighbour_slices=neighbours)
    model = build_probsam(config, seed=0).to(device).eval()
    size = model.config.img_size
    image = torch.rand(1, 3, size, size, device=device) if neighbours else torch.rand(1, size, size, device=device)
    box = torch.tensor([[size * 0.3, size * 0.3, size * 0.6, size * 0.6]], device=device)
    gen = torch.Generator().manual_seed(0)

    @torch.no_grad()
    def predict(n_samples: int, mode: str = "sample"):
        with autocast(device):
            emb = model.encode(image)
            z = model.latents(emb, box, n_samples, gen, mode)
            return model.decode(emb, box, z, image)

    sam_1 = timed(lambda: predict(1, "mean"), device, repeats)
    probsam_n = timed(lambda: predict(n), device, repeats)
    reference_n = timed(lambda: [predict(1) for _ in range(n)], device, max(1, repeats // 3))
    return sam_1, probsam_n, reference_n


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["tiny", "vit_b"])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--refine-channels", type=int, nargs="+", default=[0],
                        help="mask refiner widths to time (0 = none, as SAM decodes)")
    parser.add_argument("--neighbours", type=int, nargs="+", default=[0], choices=(0, 1),
                        help="1 = the encoder reads slices k - 1, k, k + 1 (neighbour_slices), 0 = slice k alone")
    args = parser.parse_args()
    device = choose_device(args.device)
    precision = "bf16 autocast" if device.type == "cuda" else "fp32"
    print(f"device {device} ({precision}), torch {torch.__version__}, threads {torch.get_num_threads()}")
    print(f"{'model':<7} {'refine':>6} {'k+-1':>4} {'sam_1 s':>9} {'probsam_16 s':>13} {'reference_16 s':>15} "
          f"{'probsam/sam':>12} {'reference/probsam':>18}")
    for name, channels, neighbours in itertools.product(args.models, args.refine_channels, args.neighbours):
        sam_1, probsam_n, reference_n = bench_model(name, device, args.repeats, refine_channels=channels,
                                                    neighbours=bool(neighbours))
        print(f"{name:<7} {channels:>6} {neighbours:>4} {sam_1:9.4f} {probsam_n:13.4f} {reference_n:15.4f} "
              f"{probsam_n / sam_1:12.2f} {reference_n / probsam_n:18.2f}")


if __name__ == "__main__":
    main()
