"""Mask refinement at the encoder's input resolution: the decoder's logits, upsampled, corrected by a few
convolutions that also see the image.

Why: SAM's mask decoder paints its masks from the image embedding alone, on a grid 4 x the embedding (a
quarter of the input: 64 x 64 for the tiny model's 128-pixel input, 256 x 256 for SAM's 1024). Where a
nodule is 10-20 pixels across, the edge it draws is only as sharp as what a 8-16 pixel patch token could
encode. HQ-SAM (Ke et al., NeurIPS 2023) fixes this by fusing early high-resolution features into the
mask output; here the high-resolution feature is the image itself, and the correction is a residual on
the logits, so a refiner whose last layer is zero (as it is built) leaves the decoder's masks unchanged:
a trained model gains one and trains on from where it was.

Each sample's logits are refined on their own (the same image for every sample of a slice), so the
refiner sharpens the edges a sample draws; it cannot invent a nodule where the sample has none, because
its receptive field is a few pixels wide.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class MaskRefiner(nn.Module):
    """Residual logit correction from (sample probability, image) at the input resolution.

    Arguments:
      channels: width of the hidden convolutions. The receptive field is 11 pixels (3 x 3, 3 x 3, a 3 x 3
        with dilation 2, 3 x 3). The image it reads is the segmented slice alone, also in a model whose
        encoder reads the slices below and above.
    """

    def __init__(self, channels: int):
        super().__init__()
        if channels < 1:
            raise ValueError(f"refiner channels must be >= 1, got {channels}")
        self.net = nn.Sequential(
            nn.Conv2d(2, channels, 3, padding=1), nn.GELU(),  # inputs: the sample's probability, the slice
            nn.Conv2d(channels, channels, 3, padding=1), nn.GELU(),
            nn.Conv2d(channels, channels, 3, padding=2, dilation=2), nn.GELU(),
            nn.Conv2d(channels, 1, 3, padding=1),
        )
        # Zero residual at the start: a refiner attached to a trained model changes nothing until trained.
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def forward(self, logits: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        """logits (B, N, s, s) on the decoder grid, image (B, 1, S, S) in [0, 1] in the model frame
        (resized and padded as the encoder sees it) -> refined logits (B, N, S, S)."""
        b, n = logits.shape[:2]
        size = image.shape[-1]
        if image.shape[1] != 1:
            raise ValueError(f"the refiner reads one slice, (B, 1, S, S); got shape {tuple(image.shape)}")
        up = F.interpolate(logits.reshape(b * n, 1, *logits.shape[-2:]), (size, size), mode="bilinear",
                           align_corners=False)
        pixels = image.to(up.dtype).repeat_interleave(n, dim=0)  # (B*N, 1, S, S): each sample's own slice
        # The convolutions read the probability, not the logit: logits run to +-30 and would swamp the image.
        residual = self.net(torch.cat([torch.sigmoid(up), (pixels - 0.5) * 4.0], dim=1))
        return (up + residual).reshape(b, n, size, size)
