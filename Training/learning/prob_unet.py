"""The Probabilistic U-Net baseline (Kohl et al., NeurIPS 2018), prompted with the same box as ProbSAM.

    image + box ─> U-Net ──────────────── features (c0, H, W) ─┐
    image + box ─> prior encoder ─> N(μ, σ) ─> z ──tile──────────┴─> fcomb (1x1 convs) -> logits
    image + box + mask ─> posterior encoder ─> N(μ, σ)   (training)

The box enters as a second input channel (1 inside, 0 outside) so the baseline gets exactly the prompt
ProbSAM gets: comparing a prompted model with a prompt-free one would not be like with like. The
training output is a ProbSAMLib ``TrainingOutput`` so both models share ``probsam_loss``.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.distributions import Independent, Normal

from ProbSAMLib.weights.checkpoints import save_safetensors
from ProbSAMLib.modeling.probsam import TrainingOutput

FORMAT = "prob-unet-baseline-v1"


def box_channel(boxes: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(B, 4) boxes (x1, y1, x2, y2, continuous edges) -> (B, 1, H, W) 1 inside the box."""
    ys = torch.arange(height, device=boxes.device, dtype=torch.float32) + 0.5
    xs = torch.arange(width, device=boxes.device, dtype=torch.float32) + 0.5
    inside_y = (ys[None] >= boxes[:, 1:2]) & (ys[None] < boxes[:, 3:4])  # (B, H)
    inside_x = (xs[None] >= boxes[:, 0:1]) & (xs[None] < boxes[:, 2:3])  # (B, W)
    return (inside_y[:, :, None] & inside_x[:, None, :]).float().unsqueeze(1)


def _block(in_ch: int, out_ch: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_ch, out_ch, 3, padding=1), nn.ReLU(inplace=True),
                         nn.Conv2d(out_ch, out_ch, 3, padding=1), nn.ReLU(inplace=True))


class Encoder(nn.Module):
    """Conv blocks with 2x average pooling between them; returns every level's features."""

    def __init__(self, in_ch: int, channels: Sequence[int]):
        super().__init__()
        ins = [in_ch, *channels[:-1]]
        self.blocks = nn.ModuleList(_block(i, o) for i, o in zip(ins, channels))

    def forward(self, x: torch.Tensor) -> list:
        levels = []
        for i, block in enumerate(self.blocks):
            x = block(x if i == 0 else F.avg_pool2d(x, 2))
            levels.append(x)
        return levels


class UNet(nn.Module):
    def __init__(self, in_ch: int, channels: Sequence[int]):
        super().__init__()
        self.encoder = Encoder(in_ch, channels)
        self.up = nn.ModuleList(_block(hi + lo, lo) for hi, lo in zip(channels[:0:-1], channels[-2::-1]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_ch, H, W) -> (B, channels[0], H, W)."""
        levels = self.encoder(x)
        x = levels[-1]
        for block, skip in zip(self.up, levels[-2::-1]):
            x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            x = block(torch.cat([x, skip], dim=1))
        return x


class GaussianEncoder(nn.Module):
    """Input -> encoder -> global mean -> 1x1 conv -> diagonal Gaussian over z."""

    def __init__(self, in_ch: int, channels: Sequence[int], latent_dim: int):
        super().__init__()
        self.encoder = Encoder(in_ch, channels)
        self.head = nn.Conv2d(channels[-1], 2 * latent_dim, 1)
        nn.init.normal_(self.head.weight, std=1e-3)
        nn.init.zeros_(self.head.bias)

    def forward(self, x: torch.Tensor) -> Independent:
        pooled = self.encoder(x)[-1].mean(dim=(2, 3), keepdim=True)
        mu, log_sigma = self.head(pooled)[:, :, 0, 0].float().chunk(2, dim=1)
        return Independent(Normal(mu, torch.exp(log_sigma.clamp(-8.0, 4.0))), 1)


class ProbUNet(nn.Module):
    def __init__(self, channels: Sequence[int] = (32, 64, 128, 192), latent_dim: int = 6):
        super().__init__()
        self.config = {"channels": list(channels), "latent_dim": int(latent_dim)}
        self.latent_dim = latent_dim
        self.unet = UNet(2, channels)
        self.prior = GaussianEncoder(2, channels, latent_dim)
        self.posterior = GaussianEncoder(3, channels, latent_dim)
        c0 = channels[0]
        self.fcomb = nn.Sequential(nn.Conv2d(c0 + latent_dim, c0, 1), nn.ReLU(inplace=True),
                                   nn.Conv2d(c0, c0, 1), nn.ReLU(inplace=True),
                                   nn.Conv2d(c0, c0, 1), nn.ReLU(inplace=True), nn.Conv2d(c0, 1, 1))

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def _inputs(self, images01: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        height, width = images01.shape[-2:]
        return torch.cat([images01[:, None], box_channel(boxes, height, width)], dim=1)

    def combine(self, features: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """features (B, c0, H, W), z (B, N, L) -> logits (B, N, H, W).

        fcomb's first 1x1 conv on [features, tiled z] is split into its feature part, computed once per
        image, plus its z part, one vector per sample: the same numbers as convolving the concatenation,
        without N copies of the feature map (N = 100 at batch 16 needed ~15 GB the concatenated way).
        """
        b, n = z.shape[:2]
        height, width = features.shape[-2:]
        first = self.fcomb[0]
        c0 = features.shape[1]
        weight = first.weight[:, :, 0, 0]                                   # (c0, c0 + L)
        from_features = F.conv2d(features, first.weight[:, :c0], first.bias)  # (B, c0, H, W)
        from_z = z.to(features.dtype) @ weight[:, c0:].T                    # (B, N, c0)
        hidden = from_features[:, None] + from_z[..., None, None]           # (B, N, c0, H, W)
        return self.fcomb[1:](hidden.flatten(0, 1)).view(b, n, height, width)

    def forward(self, images01: torch.Tensor, boxes: torch.Tensor, masks: torch.Tensor,
                n_samples: int = 1) -> TrainingOutput:
        """images01 (B, H, W), boxes (B, 4) image pixels, masks (B, H, W) target -> logits (B, N, H, W)."""
        x = self._inputs(images01, boxes)
        prior = self.prior(x)
        posterior = self.posterior(torch.cat([x, masks[:, None].to(x.dtype)], dim=1))
        z = posterior.rsample((n_samples,)).transpose(0, 1)
        return TrainingOutput(self.combine(self.unet(x), z), prior, posterior)

    @torch.no_grad()
    def sample_probabilities(self, images01: torch.Tensor, boxes: torch.Tensor, n_samples: int,
                             generator: Optional[torch.Generator] = None, noise: Optional[torch.Tensor] = None,
                             mode: str = "sample") -> torch.Tensor:
        """(B, N, H, W) foreground probabilities. z = mu + sigma * noise, noise (B, N, L) given or drawn on
        the CPU from ``generator``; mode "mean" uses z = mu (the deterministic prior-mean prediction)."""
        x = self._inputs(images01.to(self.device), boxes.to(self.device, torch.float32))
        prior = self.prior(x)
        mu, sigma = prior.base_dist.loc, prior.base_dist.scale
        if mode == "mean":
            z = mu[:, None].expand(-1, n_samples, -1)
        else:
            if noise is None:
                noise = torch.randn((mu.shape[0], n_samples, mu.shape[1]), generator=generator)
            z = mu[:, None] + sigma[:, None] * noise.to(mu.device, mu.dtype)
        return torch.sigmoid(self.combine(self.unet(x), z).float())


def save_prob_unet(model: ProbUNet, path: Path, extra: Optional[dict] = None) -> None:
    """safetensors with the architecture in the metadata (atomic write, as for ProbSAM files)."""
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_safetensors(state, path, {"format": FORMAT, "config": json.dumps(model.config),
                                   "extra": json.dumps(extra or {})})


def load_prob_unet(path: Path) -> ProbUNet:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt", device="cpu") as handle:
        metadata = handle.metadata() or {}
        if metadata.get("format") != FORMAT:
            raise ValueError(f"{path} is not a Prob U-Net baseline file (format {metadata.get('format')!r})")
        state = {key: handle.get_tensor(key) for key in handle.keys()}
    model = ProbUNet(**json.loads(metadata["config"]))
    model.load_state_dict(state)
    return model.eval()
