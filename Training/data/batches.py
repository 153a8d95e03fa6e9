"""Training batches straight from the memory-mapped data set, deterministic in (seed, step, rank).

No DataLoader: the arrays are memory-mapped and the only augmentations are box jitter and random flips,
so a batch is one fancy-indexing read. Each slice's flips are one code (FLIP_CODES): with the embedding
cache, the cache holds every flipped variant and the code picks the one to read. The order is a seeded permutation per
epoch, which makes a resumed run see exactly the batches the uninterrupted run would have seen.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from Training.data.boxes import jitter_boxes, union_boxes
from ProbSAMLib.modeling.config import LUNG_WINDOW
from ProbSAMLib.modeling.preprocess import window_ct
from Training.data.dataset_format import SliceDataset


@dataclass
class Batch:
    """images (B, H, W) float32 in [0, 1]; masks (B, M, H, W) bool; present (B, M) bool;
    boxes (B, 4) prompt boxes in image pixels; positions (B,) rows of the split (for the cache);
    flips (B,) int flip codes applied to image and masks (0 = none, see flip_images);
    neighbours (B, 2, H, W) like images: the slices below and above (None when the data set has none)."""

    images: torch.Tensor
    masks: torch.Tensor
    present: torch.Tensor
    boxes: torch.Tensor
    positions: np.ndarray
    flips: Optional[np.ndarray] = None
    neighbours: Optional[torch.Tensor] = None

    def model_images(self, reads_neighbours: bool) -> torch.Tensor:
        """What a model is shown: (B, 3, H, W) slices k - 1, k, k + 1 for one that reads neighbours
        (config.neighbour_slices) when the data set has them, else the slices (B, H, W)."""
        if not reads_neighbours or self.neighbours is None:
            return self.images
        return torch.stack([self.neighbours[:, 0], self.images, self.neighbours[:, 1]], dim=1)


# A flip code's bit 0 flips left-right (columns), bit 1 up-down (rows): 0 none, 1 lr, 2 ud, 3 both.
FLIP_CODES = (0, 1, 2, 3)


def flip_images(array, code: int):
    """Flip the last two axes of a numpy array or tensor by one flip code (a view for numpy)."""
    axes = [axis for bit, axis in ((1, -1), (2, -2)) if code & bit]
    if not axes:
        return array
    return torch.flip(array, axes) if torch.is_tensor(array) else np.flip(array, axes)


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
    """Reads batches of one split: HU -> [0, 1] with the model's window, union-box prompts.

    Slices no reader marked (kept by the LIDC pickle's literature split) have no box to prompt with:
    they are left out of the batches and counted in ``n_unmarked`` (evaluate.py reports the count).
    """

    def __init__(self, dataset: SliceDataset, window=LUNG_WINDOW, box_margin: float = 2.0):
        self.dataset = dataset
        self.window = window if dataset.intensity == "hu" else None
        self.box_margin = box_margin
        marked = np.asarray(dataset.table["n_marked"], dtype=np.int64)[dataset.indices] > 0
        self.n_unmarked = int((~marked).sum())
        dataset.indices = dataset.indices[marked]

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
        neighbours = None
        if self.dataset.neighbours is not None:
            neighbours = window_ct(np.asarray(self.dataset.neighbours[rows], dtype=np.float32), self.window)
        flips = np.zeros(len(rows), dtype=np.int64)
        if flip and rng is not None:
            images, masks, neighbours, flips = _random_flips(images, masks, neighbours, rng)
        boxes = union_boxes(masks, present, self.box_margin)
        if jitter > 0 and rng is not None:
            boxes = jitter_boxes(boxes, self.image_hw, rng, jitter, jitter_max_px)
        return Batch(torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32)),
                     torch.from_numpy(np.ascontiguousarray(masks)), torch.from_numpy(present),
                     torch.from_numpy(boxes), np.asarray(positions), flips,
                     None if neighbours is None else torch.from_numpy(np.ascontiguousarray(neighbours)))


def _random_flips(images: np.ndarray, masks: np.ndarray, neighbours: Optional[np.ndarray],
                  rng: np.random.Generator):
    """Each slice (with its neighbours) flipped left-right and/or up-down with probability 1/2 each
    -> (images, masks, neighbours, codes)."""
    images, masks = images.copy(), masks.copy()
    neighbours = None if neighbours is None else neighbours.copy()
    codes = np.zeros(len(images), dtype=np.int64)
    for i in range(len(images)):
        codes[i] = int(rng.random() < 0.5) | (int(rng.random() < 0.5) << 1)
        images[i], masks[i] = flip_images(images[i], codes[i]), flip_images(masks[i], codes[i])
        if neighbours is not None:
            neighbours[i] = flip_images(neighbours[i], codes[i])
    return images, masks, neighbours, codes


def choose_readers(present: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """(B,) one reader slot per slice, uniformly over ALL M slots: the target of this step.

    A reader who did not mark the slice (or the nodule) is an empty mask, as in the LIDC pickle, for
    every data source: the model learns the same M = 4 reader distribution that GED evaluates against.
    ``present`` (B, M) only gives the shape here.
    """
    batch, slots = present.shape
    return torch.as_tensor(rng.integers(0, slots, size=batch), dtype=torch.long)


def choose_marked_readers(masks: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """(B,) one reader slot per slice, uniformly over the readers who MARKED this slice (a non-empty mask):
    the product model's target (TrainConfig.targets "marked"), whose samples are outlines, never the empty
    mask of an absent reader. A slice nobody marked (none in the data sets built here) takes any slot.

    masks: (B, M, H, W) every slot's mask on the slice. One uniform draw per slice, as choose_readers.
    """
    marked = masks.flatten(2).any(2)  # (B, M)
    draws = rng.random(size=len(masks))
    chosen = []
    for row, draw in zip(marked, draws):
        slots = torch.nonzero(row).flatten() if row.any() else torch.arange(len(row))
        chosen.append(int(slots[int(draw * len(slots))]))
    return torch.as_tensor(chosen, dtype=torch.long)


def validation_positions(n_items: int, count: int, seed: int = 0) -> np.ndarray:
    """A fixed, seeded subset of a split (all of it when count <= 0 or count >= n_items)."""
    if count <= 0 or count >= n_items:
        return np.arange(n_items)
    return np.sort(np.random.default_rng([seed, 12345]).choice(n_items, count, replace=False))
