"""The annotator-agnostic box prompt: the union box of all readers, with jitter only in training.

Using the target reader's own tight box as the prompt (as the reference code does) leaks that reader's
outline into the input. Every reader of a slice gets the same prompt here, in training and at test time;
training adds random jitter so the model does not learn to trust the box edges to the pixel.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np


def union_box(masks, margin: float = 0.0) -> np.ndarray:
    """(4,) float box (x1, y1, x2, y2), continuous edges, around every reader's foreground.

    masks: (M, H, W) or (H, W) bool; margin: pixels added on every side, clipped to the image.
    Raises ValueError when no reader marked anything (there is no object to prompt for).
    """
    masks = np.asarray(masks, dtype=bool)
    if masks.ndim == 2:
        masks = masks[None]
    if masks.ndim != 3:
        raise ValueError(f"masks must be (M, H, W) or (H, W), got shape {masks.shape}")
    rows, cols = np.nonzero(masks.any(axis=0))
    if rows.size == 0:
        raise ValueError("no reader marked this slice: there is no object to draw a box around")
    height, width = masks.shape[-2:]
    box = np.array([cols.min() - margin, rows.min() - margin, cols.max() + 1 + margin, rows.max() + 1 + margin],
                   dtype=np.float32)
    return clip_box(box, (height, width))


def clip_box(box: np.ndarray, image_hw: Sequence[int]) -> np.ndarray:
    """Box (..., 4) clipped to the image, keeping at least one pixel of width and height."""
    height, width = image_hw
    box = np.asarray(box, dtype=np.float32).copy()
    box[..., 0] = np.clip(box[..., 0], 0, width - 1)
    box[..., 1] = np.clip(box[..., 1], 0, height - 1)
    box[..., 2] = np.clip(box[..., 2], box[..., 0] + 1, width)
    box[..., 3] = np.clip(box[..., 3], box[..., 1] + 1, height)
    return box


def jitter_boxes(boxes: np.ndarray, image_hw: Sequence[int], rng: np.random.Generator,
                 fraction: float = 0.1, max_pixels: float = 5.0) -> np.ndarray:
    """Move every edge of (B, 4) boxes independently by up to ``fraction`` of the box side (at most
    ``max_pixels``), uniformly, then clip to the image. fraction 0 returns the boxes unchanged."""
    boxes = np.asarray(boxes, dtype=np.float32)
    if fraction <= 0:
        return boxes.copy()
    sides = np.concatenate([boxes[:, 2:] - boxes[:, :2]] * 2, axis=1)  # (B, 4): w, h, w, h
    reach = np.minimum(fraction * sides, max_pixels)
    shift = rng.uniform(-1.0, 1.0, size=boxes.shape).astype(np.float32) * reach
    return clip_box(boxes + shift, image_hw)


def union_boxes(reader_masks, present: Optional[np.ndarray] = None, margin: float = 0.0) -> np.ndarray:
    """(B, 4) union boxes of a batch of reader stacks (B, M, H, W); ``present`` (B, M) masks out absent
    reader slots (their masks are empty anyway, so it only guards against bad data)."""
    reader_masks = np.asarray(reader_masks, dtype=bool)
    if present is not None:
        reader_masks = reader_masks & np.asarray(present, dtype=bool)[:, :, None, None]
    return np.stack([union_box(m, margin) for m in reader_masks])
