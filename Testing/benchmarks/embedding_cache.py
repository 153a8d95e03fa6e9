"""Epoch time of frozen-encoder training with the fp16 embedding cache vs encoding every step.

    python Testing/benchmarks/embedding_cache.py --data data/phantom --preset tiny --steps 20

Times ``--steps`` training steps each way on the same batches (the same code path as train.py), and the
cache build on ``--cache-slices`` slices, then extrapolates to one epoch of the train split. Figures are
printed, not asserted: they depend on the machine.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import numpy as np
import torch

from Training import embedding_cache
from Training.batches import SliceBatches, batch_positions, choose_readers, step_rng
from Training.config import TrainConfig
from Training.dataset_format import load_dataset
from Training.learners import build_learner


class Subset(SliceBatches):
    """The first n slices of a split (enough to time the cache build and the steps)."""

    def __init__(self, batches: SliceBatches, n: int):
        super().__init__(batches.dataset, box_margin=batches.box_margin)
        self.n = min(n, len(batches))

    def __len__(self) -> int:
        return self.n


def time_steps(learner, data, cache, steps: int, batch_size: int) -> float:
    optimiser = torch.optim.AdamW([p for p in learner.parameters() if p.requires_grad], lr=1e-4)
    started = time.perf_counter()
    for step in range(steps):
        positions = batch_positions(len(data), batch_size, step, 0)
        rng = step_rng(0, step)
        batch = data.read(positions, rng, 0.1)
        targets = batch.masks[torch.arange(len(positions)), choose_readers(batch.present, rng)]
        embeddings = embedding_cache.cached_embeddings(cache, positions, learner.model.device) if cache is not None else None
        loss = learner(batch.images, batch.boxes, targets, step, embeddings=embeddings)["loss"]
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    return (time.perf_counter() - started) / steps


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", default="data/phantom")
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--sam-checkpoint", default=None)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--cache-slices", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    full = SliceBatches(load_dataset(args.data, "train"))
    data = Subset(full, max(args.cache_slices, args.batch_size * args.steps))
    learner = build_learner(TrainConfig(preset=args.preset, sam_checkpoint=args.sam_checkpoint, freeze_encoder=True))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "cache.npy"
        started = time.perf_counter()
        embedding_cache.build_cache(learner.model, data, path, progress=False)
        build_per_slice = (time.perf_counter() - started) / len(data)
        cache = embedding_cache.open_cache(path)
        learner.train()
        with_cache = time_steps(learner, data, cache, args.steps, args.batch_size)
        on_the_fly = time_steps(learner, data, None, args.steps, args.batch_size)
        size_mib = path.stat().st_size / len(data) * len(full) / 2**20
    steps_per_epoch = len(full) // args.batch_size
    print(f"{args.preset}, batch {args.batch_size}, {args.threads} threads, train split {len(full)} slices "
          f"({steps_per_epoch} steps/epoch)")
    print(f"  step with cache   {with_cache:.3f} s -> epoch {with_cache * steps_per_epoch / 60:.1f} min")
    print(f"  step on the fly   {on_the_fly:.3f} s -> epoch {on_the_fly * steps_per_epoch / 60:.1f} min")
    print(f"  speed-up per epoch {on_the_fly / with_cache:.2f}x; building the cache once: "
          f"{build_per_slice * len(full) / 60:.1f} min, {size_mib:.0f} MiB fp16 for the split")


if __name__ == "__main__":
    main()
