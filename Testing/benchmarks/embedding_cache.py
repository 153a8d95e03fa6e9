"""Epoch time of frozen-encoder training with the fp16 embedding cache vs encoding every step.

    python Testing/benchmarks/embedding_cache.py --data data/phantom --preset tiny --steps 20
    # issue 13's GPU check: the ViT-B recipe (Training/configs/lidc_vit_b.yaml: frozen encoder, cache, batch 16)
    # on the phantom with random encoder weights, fp32 and bf16 autocast, with peak GPU memory
    python Testing/benchmarks/embedding_cache.py --data data/phantom_v2 --preset vit_b --device cuda \
        --cache-slices 512 --steps 20 --precision fp32 bf16
    # the same on a smaller GPU (this process capped at 24 GiB): the cache build must shrink its chunks
    python Testing/benchmarks/embedding_cache.py --data data/phantom_v2 --preset vit_b --device cuda \
        --gpu-memory-gib 24 --batch-size 4 --precision bf16

Times ``--steps`` training steps each way on the same batches (the same code path as train.py: its
autocast policy, inputs moved to the device), and the cache build on ``--cache-slices`` slices, then
extrapolates to one epoch of the train split. On CUDA it also prints each phase's peak allocated memory.
Figures are printed, not asserted: they depend on the machine.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch

from ProbSAMLib.inference.device import autocast, choose_device, synchronize
from Training.data import embedding_cache
from Training.data.batches import SliceBatches, batch_positions, choose_readers, step_rng
from Training.config import TrainConfig
from Training.data.dataset_format import load_dataset
from Training.learning.learners import build_learner


class Subset(SliceBatches):
    """The first n slices of a split (enough to time the cache build and the steps)."""

    def __init__(self, batches: SliceBatches, n: int):
        super().__init__(batches.dataset, box_margin=batches.box_margin)
        self.n = min(n, len(batches))

    def __len__(self) -> int:
        return self.n


def measured(device: torch.device, work) -> tuple:
    """(seconds, peak allocated MiB or None) of ``work()`` on ``device``."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    synchronize(device)
    started = time.perf_counter()
    work()
    synchronize(device)
    seconds = time.perf_counter() - started
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    return seconds, peak


def time_steps(learner, data, cache, steps: int, batch_size: int, bf16: bool) -> tuple:
    """(seconds a step, peak MiB) of ``steps`` training steps, after one untimed warm-up step."""
    device = learner.model.device
    optimiser = torch.optim.AdamW([p for p in learner.parameters() if p.requires_grad], lr=1e-4)

    def step(index: int) -> None:
        positions = batch_positions(len(data), batch_size, index, 0)
        rng = step_rng(0, index)
        batch = data.read(positions, rng, 0.1)
        targets = batch.masks[torch.arange(len(positions)), choose_readers(batch.present, rng)]
        embeddings = embedding_cache.cached_embeddings(cache, positions, device) if cache is not None else None
        with autocast(device, bf16):
            loss = learner(batch.images.to(device), batch.boxes.to(device), targets.to(device), index,
                           embeddings=embeddings)["loss"]
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()

    step(0)  # kernels chosen, buffers allocated
    seconds, peak = measured(device, lambda: [step(i) for i in range(1, steps + 1)])
    return seconds / steps, peak


def mib(peak) -> str:
    return "" if peak is None else f", peak {peak:.0f} MiB"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", default="data/phantom")
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--sam-checkpoint", default=None, help="official SAM weights; none = random (timing only)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--cache-slices", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--epoch-slices", type=int, default=None,
                        help="extrapolate to an epoch of this many slices (default: the data's train split; "
                             "give the full split's size when --data is a copied subset of it)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    parser.add_argument("--precision", nargs="+", default=["fp32"], choices=["fp32", "bf16"],
                        help="bf16: train.py's autocast (CUDA with bf16 support; elsewhere the same as fp32)")
    parser.add_argument("--gpu-memory-gib", type=float, default=0,
                        help="cap this process's CUDA memory at this many GiB, to see how a smaller GPU fares")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = choose_device(args.device)
    if args.gpu_memory_gib and device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        total = torch.cuda.get_device_properties(index).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.gpu_memory_gib * 2**30 / total), index)
        print(f"CUDA memory capped at {args.gpu_memory_gib:g} GiB of {total / 2**30:.0f}")
    full = SliceBatches(load_dataset(args.data, "train"))
    data = Subset(full, max(args.cache_slices, args.batch_size * (args.steps + 1)))
    learner = build_learner(TrainConfig(preset=args.preset, sam_checkpoint=args.sam_checkpoint,
                                        freeze_encoder=True)).to(device)
    epoch_slices = args.epoch_slices or len(full)
    steps_per_epoch = epoch_slices // args.batch_size
    print(f"{args.preset} ({'random' if not args.sam_checkpoint else 'SAM'} encoder weights), batch {args.batch_size}, "
          f"{device}{'' if device.type != 'cpu' else f' ({args.threads} threads)'}, epoch of {epoch_slices} slices "
          f"({steps_per_epoch} steps/epoch); torch {torch.__version__}")
    for precision in args.precision:
        bf16 = precision == "bf16"
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "cache.npy"
            learner.eval()
            chunks = []  # the slices of every encoder call, a failed (out-of-memory) one included
            encode = learner.model.encode
            learner.model.encode = lambda images: chunks.append(len(images)) or encode(images)
            with autocast(device, bf16):
                build, build_peak = measured(device, lambda: embedding_cache.build_cache(learner.model, data, path,
                                                                                          progress=False))
            del learner.model.encode  # the class's method again
            cache = embedding_cache.open_cache(path)
            learner.train()
            with_cache, cache_peak = time_steps(learner, data, cache, args.steps, args.batch_size, bf16)
            on_the_fly, fly_peak = time_steps(learner, data, None, args.steps, args.batch_size, bf16)
            size_mib = path.stat().st_size / len(data) * epoch_slices / 2**20
        print(f"  {precision}:")
        print(f"    building the cache {build / len(data) * 1000:.1f} ms/slice -> "
              f"{build / len(data) * epoch_slices / 60:.1f} min for the split, {size_mib:.0f} MiB fp16{mib(build_peak)}")
        print(f"    encoder chunks tried: {' '.join(map(str, chunks[:6]))}{' ...' if len(chunks) > 6 else ''} "
              f"({len(chunks)} calls for {len(data)} slices)")
        print(f"    step with cache   {with_cache:.3f} s -> epoch {with_cache * steps_per_epoch / 60:.1f} min"
              f"{mib(cache_peak)}")
        print(f"    step on the fly   {on_the_fly:.3f} s -> epoch {on_the_fly * steps_per_epoch / 60:.1f} min"
              f"{mib(fly_peak)}")
        print(f"    speed-up per epoch {on_the_fly / with_cache:.2f}x")


if __name__ == "__main__":
    main()
