"""How many samples agree, voxel by voxel: the consensus and the agreement levels.

One home for these masks: the volume sampler computes them once (VolumeSamplingResult.consensus /
.agreement), the CLI writes them into samples.seg.nrrd and the Slicer module shows them as segments.

    any       voxels in at least one sample      (the union: where any plausible outline reaches)
    majority  voxels in more than half of them   (the consensus: the one outline to edit)
    all       voxels in every sample             (the core all samples agree on)

"More than half" is strict: with an even N, a voxel in exactly N / 2 samples is not in the consensus, so
the consensus of two disjoint halves is empty rather than their union.
"""

from __future__ import annotations

from typing import Dict

import numpy as np

AGREEMENT_LEVELS = ("any", "majority", "all")
# Segment names (CLI file and Slicer node) of the agreement levels and the consensus.
CONSENSUS_NAME = "Consensus"
AGREEMENT_NAMES = {"any": "Any sample", "majority": "More than half", "all": "All samples"}


def sample_counts(masks: np.ndarray) -> np.ndarray:
    """(N, ...) bool masks -> (...) int16: in how many samples each voxel is."""
    masks = np.asarray(masks, dtype=bool)
    if masks.ndim < 2 or len(masks) == 0:
        raise ValueError(f"expected a stack of N >= 1 masks (N, ...), got shape {masks.shape}")
    return masks.sum(axis=0, dtype=np.int16)


def consensus_mask(masks: np.ndarray) -> np.ndarray:
    """(N, ...) bool -> (...) bool: voxels in more than half of the samples."""
    return 2 * sample_counts(masks) > len(masks)


def agreement_masks(masks: np.ndarray) -> Dict[str, np.ndarray]:
    """(N, ...) bool -> {"any", "majority", "all"} (...) bool masks (see the module docstring)."""
    counts = sample_counts(masks)
    n = len(masks)
    return {"any": counts > 0, "majority": 2 * counts > n, "all": counts == n}
