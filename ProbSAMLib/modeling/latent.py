"""The latent space: prior net P(z | x, box), posterior net Q(z | x, box, y) and z -> prompt projection.

Both nets read SAM's image embedding (not the raw image), so they see what the decoder sees. The box is
given as a coverage map on the embedding grid and the posterior additionally sees the target mask at the
decoder's resolution, folded into channels with pixel_unshuffle so no detail of a small nodule is lost.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.distributions import Independent, Normal


def box_coverage(boxes: torch.Tensor, grid: int, img_size: int) -> torch.Tensor:
    """Fraction of each embedding cell covered by a box.

    Arguments:
      boxes: (B, 4) boxes (x1, y1, x2, y2) in the encoder's input frame.
    Returns:
      (B, 1, grid, grid) coverage in [0, 1].
    """
    cell = img_size / grid
    edges = torch.arange(grid, device=boxes.device, dtype=boxes.dtype) * cell

    def overlap(lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:  # (B,) -> (B, grid)
        start = torch.maximum(edges[None], lo[:, None])
        stop = torch.minimum(edges[None] + cell, hi[:, None])
        return (stop - start).clamp(min=0) / cell

    cover_x = overlap(boxes[:, 0], boxes[:, 2])
    cover_y = overlap(boxes[:, 1], boxes[:, 3])
    return (cover_y[:, :, None] * cover_x[:, None, :]).unsqueeze(1)


class GaussianLatentNet(nn.Module):
    """Embedding (+ box coverage, + optional mask) -> diagonal Gaussian over z.

    A 1x1 reduction of the embedding, two 3x3 convs, then pooling both inside the box (which object) and
    over the whole image (context); a linear layer gives mu and log sigma.
    """

    def __init__(self, embed_dim: int, hidden: int, latent_dim: int, mask_channels: int = 0):
        super().__init__()
        self.latent_dim = latent_dim
        self.mask_channels = mask_channels
        in_ch = embed_dim + 1 + mask_channels
        self.trunk = nn.Sequential(
            nn.Conv2d(in_ch, hidden, 1), nn.GELU(),
            nn.Conv2d(hidden, hidden, 3, padding=1), nn.GELU(),
            nn.Conv2d(hidden, hidden, 3, padding=1), nn.GELU(),
        )
        self.head = nn.Linear(2 * hidden, 2 * latent_dim)
        # Start near N(0, 1) so the untrained prior already gives diverse, finite samples.
        nn.init.normal_(self.head.weight, std=1e-3)
        nn.init.zeros_(self.head.bias)

    def forward(
        self, embeddings: torch.Tensor, coverage: torch.Tensor, mask_folded: Optional[torch.Tensor] = None
    ) -> Independent:
        """embeddings (B, C, h, w), coverage (B, 1, h, w), mask_folded (B, mask_channels, h, w)."""
        parts = [embeddings, coverage.to(embeddings.dtype)]
        if self.mask_channels:
            if mask_folded is None:
                raise ValueError("the posterior net needs the target mask")
            parts.append(mask_folded.to(embeddings.dtype))
        features = self.trunk(torch.cat(parts, dim=1))
        weights = coverage / coverage.sum(dim=(2, 3), keepdim=True).clamp(min=1e-6)
        in_box = (features * weights).sum(dim=(2, 3))
        context = features.mean(dim=(2, 3))
        mu, log_sigma = self.head(torch.cat([in_box, context], dim=1)).float().chunk(2, dim=1)
        # Bounded log sigma keeps the KL and the samples finite early in training.
        sigma = torch.exp(log_sigma.clamp(-8.0, 4.0))
        return Independent(Normal(mu, sigma), 1)


class LatentProjection(nn.Module):
    """z -> shifts added to the two box tokens (and optionally to the dense embedding).

    The last layer starts at zero, so an untrained projection leaves SAM's prompts exactly as SAM made
    them: a pretrained decoder starts from SAM's own prediction.
    """

    def __init__(self, latent_dim: int, embed_dim: int, to_dense: bool, tokens: int = 2, bound: float = 0.0):
        super().__init__()
        self.tokens, self.embed_dim, self.to_dense, self.bound = tokens, embed_dim, to_dense, float(bound)
        out = embed_dim * (tokens + int(to_dense))
        self.mlp = nn.Sequential(
            nn.Linear(latent_dim, embed_dim), nn.GELU(), nn.Linear(embed_dim, embed_dim), nn.GELU(),
            nn.Linear(embed_dim, out),
        )
        nn.init.zeros_(self.mlp[-1].weight)
        nn.init.zeros_(self.mlp[-1].bias)

    def forward(self, z: torch.Tensor):
        """z (B, N, L) -> token shifts (B, N, tokens, C) and dense shifts (B, N, C, 1, 1) or None."""
        out = self.mlp(z)
        if self.bound > 0:  # a soft clamp: near-identity for small shifts, never beyond +-bound
            out = self.bound * torch.tanh(out / self.bound)
        token_shift = out[..., : self.tokens * self.embed_dim].unflatten(-1, (self.tokens, self.embed_dim))
        dense_shift = None
        if self.to_dense:
            dense_shift = out[..., self.tokens * self.embed_dim:][..., None, None]
        return token_shift, dense_shift


def latents_from_noise(mu: torch.Tensor, sigma: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """z = mu + sigma * noise: N latents per image from a diagonal Gaussian and given standard-normal draws.

    The noise is an argument, not drawn here, so callers choose where it comes from: a seeded CPU generator
    (the same z on every device), one draw per sample shared by every slice of a volume, or the same draws
    for two models compared on equal terms.

    Arguments:
      mu, sigma: (B, L) the Gaussian's mean and standard deviation (e.g. the prior's loc and scale).
      noise: (B, N, L) standard-normal draws, on any device; moved to mu's device and dtype.
    Returns:
      (B, N, L) z on mu's device, in mu's dtype.
    """
    return mu.unsqueeze(1) + sigma.unsqueeze(1) * noise.to(mu.device, mu.dtype)


def fold_mask(mask_low_res: torch.Tensor, grid: int) -> torch.Tensor:
    """(B, S, S) mask on the decoder grid -> (B, (S/grid)^2, grid, grid) channels on the embedding grid."""
    factor = mask_low_res.shape[-1] // grid
    return F.pixel_unshuffle(mask_low_res.unsqueeze(1).float(), factor)
