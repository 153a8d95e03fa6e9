"""Training batches straight from the memory-mapped data set, deterministic in (seed, step, rank).

No DataLoader: the arrays are memory-mapped and the only augmentation is box jitter (and flips without
the embedding cache), so a batch is one fancy-indexing read. The order is a seeded permutation per
epoch, which makes a resumed run see exactly the batches the uninterrupted run would have seen.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from ProbSAMLib.boxes import jitter_boxes, union_boxes
from ProbSAMLib.config import LUNG_WINDOW
from ProbSAMLib.preprocess import window_ct
from Training.dataset_format import SliceDataset


@dataclass
class Batch:
    """images (B, H, W) float32 in [0, 1]; masks (B, M, H, W) bool; present (B, M) bool;
    boxes (B, 4) prompt boxes in image pixels; positions (B,) rows of the split (for the cache)."""

    images: torch.Tensor
    masks: torch.Tensor
    present: torch.Tensor
    boxes: torch.Tensor
    positions: np.ndarray


def step_rng(seed: int, step: int, rank: int = 0, stream: int = 0) -> np.random.Generator:
    """The random stream of one training step (independent of how the run was split into resumes)."""
    return np.random.default_rng([seed, step, rank, stream])


def batch_positions(n_items: int, batch_size: int, step: int, seed: int, rank: int = 0,
                    world_size: int = 1) -> np.ndarray:
    """Positions (into the split) of this process's share of global batch ``step``.

    Global batches of batch_size × world_size walk a fresh seeded permutation every epoch (the tail
    that does not fill a batch is dropped); rank r takes every world_size-th item of the global batch.
    """
    global_batch = batch_size * world_size
    per_epoch = n_items // global_batch
    if per_epoch == 0:
        raise ValueError(f"the split has {n_items} slices, fewer than one global batch of {global_batch}")
    epoch, within = divmod(step, per_epoch)
    order = np.random.default_rng([seed, epoch]).permutation(n_items)
    chosen = order[within * global_batch:(within + 1) * global_batch]
    return np.sort(chosen[rank::world_size])


class SliceBatches:
    """Reads batches of one split: HU -> [0, 1] with the model's window, union-box prompts."""

    def __init__(self, dataset: SliceDataset, window=LUNG_WINDOW, box_margin: float = 2.0):
        self.dataset = dataset
        self.window = window if dataset.intensity == "hu" else None
        self.box_margin = box_margin

    def __len__(self) -> int:
        return len(self.dataset)

    @property
    def image_hw(self) -> tuple:
        return tuple(self.dataset.images.shape[-2:])

    def read(self, positions: np.ndarray, rng: Optional[np.random.Generator] = None,
             jitter: float = 0.0, jitter_max_px: float = 5.0, flip: bool = False) -> Batch:
        """The slices at ``positions``; ``rng`` drives box jitter and flips (training only)."""
        rows = self.dataset.indices[np.asarray(positions)]
        images = window_ct(np.asarray(self.dataset.images[rows], dtype=np.float32), self.window)
        masks = np.asarray(self.dataset.masks[rows], dtype=bool)
        present = np.asarray(self.dataset.present[rows], dtype=bool)
        if flip and rng is not None:
            images, masks = _random_flips(images, masks, rng)
        boxes = union_boxes(masks, present, self.box_margin)
        if jitter > 0 and rng is not None:
            boxes = jitter_boxes(boxes, self.image_hw, rng, jitter, jitter_max_px)
        return Batch(torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32)),
                     torch.from_numpy(np.ascontiguousarray(masks)), torch.from_numpy(present),
                     torch.from_numpy(boxes), np.asarray(positions))


def _random_flips(images: np.ndarray, masks: np.ndarray, rng: np.random.Generator):
    images, masks = images.copy(), masks.copy()
    for i in range(len(images)):
        if rng.random() < 0.5:
            images[i], masks[i] = images[i][:, ::-1], masks[i][..., ::-1]
        if rng.random() < 0.5:
            images[i], masks[i] = images[i][::-1], masks[i][..., ::-1, :]
    return images, masks


def choose_readers(present: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """(B,) index of one present reader per slice, uniformly: the target of this step."""
    present = present.numpy()
    picks = [rng.choice(np.flatnonzero(row)) if row.any() else 0 for row in present]
    return torch.as_tensor(picks, dtype=torch.long)


def validation_positions(n_items: int, count: int, seed: int = 0) -> np.ndarray:
    """A fixed, seeded subset of a split (all of it when count <= 0 or count >= n_items)."""
    if count <= 0 or count >= n_items:
        return np.arange(n_items)
    return np.sort(np.random.default_rng([seed, 12345]).choice(n_items, count, replace=False))
