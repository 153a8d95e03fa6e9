"""The threshold baseline's mask: what a plain intensity threshold inside the box finds.

One implementation, used by evaluate.py's threshold baseline (Training/evaluation/baselines.py) and by the phantom's
hard-case checks (Testing/benchmarks/phantom_threshold.py, Testing/test_phantom_cases.py).
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage

THRESHOLD_HU = -400.0  # the lung / soft-tissue boundary


def threshold_component(image: np.ndarray, box, level: float = THRESHOLD_HU) -> np.ndarray:
    """(H, W) bool: the pixels of ``image`` above ``level`` inside ``box`` (x1, y1, x2, y2, continuous
    edges), reduced to the 4-connected component at the box centre, or to the largest component in the box
    when the centre is below the level; empty when nothing is above it. ``level`` is in the image's units
    (HU, or the [0, 1] value a window maps -400 HU to)."""
    height, width = image.shape
    x1, y1 = max(int(np.floor(box[0])), 0), max(int(np.floor(box[1])), 0)
    x2, y2 = min(int(np.ceil(box[2])), width), min(int(np.ceil(box[3])), height)
    labels, count = ndimage.label(image[y1:y2, x1:x2] > level)
    mask = np.zeros((height, width), bool)
    if count == 0:
        return mask
    cy = min(int((box[1] + box[3]) / 2) - y1, labels.shape[0] - 1)
    cx = min(int((box[0] + box[2]) / 2) - x1, labels.shape[1] - 1)
    label = labels[cy, cx]
    if label == 0:
        label = 1 + int(np.argmax(np.bincount(labels.ravel())[1:]))
    mask[y1:y2, x1:x2] = labels == label
    return mask
