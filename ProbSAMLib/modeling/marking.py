"""The marking head: the share of readers expected to mark the boxed object at all.

In LIDC-IDRI up to four radiologists read each scan; a nodule one of them did not mark has an empty slot for
that reader. Drawing those slots as empty samples would turn a visible lesion "uncertain" everywhere. This
head models them apart: from the image embedding and the box it predicts one number in [0, 1], the share of
readers expected to mark what is in the box (low for a box around no lesion). The samples stay outlines.
"""

from __future__ import annotations

import torch
import torch.nn as nn


class MarkingHead(nn.Module):
    """Embedding + box coverage -> one logit per image: log-odds of the share of readers marking the object.

    A 1x1 reduction, one 3x3 conv, pooled inside the box and over the whole image, then a linear layer.
    Trained with binary cross-entropy against the share (a soft label); the logit's sigmoid is the share.
    """

    def __init__(self, embed_dim: int, hidden: int = 32):
        super().__init__()
        self.trunk = nn.Sequential(nn.Conv2d(embed_dim + 1, hidden, 1), nn.GELU(),
                                   nn.Conv2d(hidden, hidden, 3, padding=1), nn.GELU())
        self.head = nn.Linear(2 * hidden, 1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)  # untrained: 0.5, "no idea"

    def forward(self, embeddings: torch.Tensor, coverage: torch.Tensor) -> torch.Tensor:
        """embeddings (B, C, h, w), coverage (B, 1, h, w) -> (B,) logits."""
        features = self.trunk(torch.cat([embeddings, coverage.to(embeddings.dtype)], dim=1))
        weights = coverage / coverage.sum(dim=(2, 3), keepdim=True).clamp(min=1e-6)
        in_box = (features * weights).sum(dim=(2, 3))
        return self.head(torch.cat([in_box, features.mean(dim=(2, 3))], dim=1)).squeeze(1).float()
