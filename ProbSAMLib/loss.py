"""The training objective: BCE + Dice + beta * KL(Q || P), with KL annealing and free bits.

Scale (why it matters): the reference implementation averages BCE over pixels and multiplies the KL by
10, so one nat of KL outweighs the whole reconstruction term by ~10^6 compared with the Probabilistic
U-Net; the optimiser then closes the KL by making Q = P and ignoring z (posterior collapse, no diversity).
Here BCE is SUMMED over the decoder-grid pixels of a sample (as in the Probabilistic U-Net), Dice is a
per-sample term in [0, 1] scaled by `dice_weight`, and the KL is the analytic per-sample KL in nats.
Reconstruction and KL are then of comparable size: a latent that explains which reader drew the target
saves many pixels of BCE and is worth a few nats. Free bits (a floor on the KL per latent dimension,
averaged over the batch) and linear annealing of beta from 0 keep the posterior informative early on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict

import torch
import torch.nn.functional as F
from torch.distributions import kl_divergence

from .model import TrainingOutput


@dataclass
class LossConfig:
    beta: float = 1.0  # weight of KL(Q||P) once annealing is over
    dice_weight: float = 10.0  # per-sample soft Dice loss in [0, 1], against the pixel-SUMMED BCE
    anneal_steps: int = 0  # beta rises linearly from 0 over this many steps (0 = no annealing)
    free_bits: float = 0.0  # nats per latent dimension below which the KL is not penalised


def beta_at(step: int, cfg: LossConfig) -> float:
    if cfg.anneal_steps <= 0:
        return cfg.beta
    return cfg.beta * min(1.0, step / cfg.anneal_steps)


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """1 - soft Dice per sample over the last two dims; (B, N, S, S) -> (B, N)."""
    probs = torch.sigmoid(logits)
    inter = (probs * target).sum(dim=(-2, -1))
    total = probs.sum(dim=(-2, -1)) + target.sum(dim=(-2, -1))
    return 1.0 - (2 * inter + eps) / (total + eps)


def kl_term(out: TrainingOutput, free_bits: float) -> torch.Tensor:
    """Per-sample analytic KL(Q||P), (B,), with free bits.

    Free bits (Kingma et al., 2016): a latent dimension whose batch-mean KL is below `free_bits` nats
    is charged the constant floor instead, so nothing pushes it further towards the prior.
    """
    kl_per_dim = kl_divergence(out.posterior.base_dist, out.prior.base_dist)  # (B, L)
    if free_bits > 0:
        below = kl_per_dim.mean(0, keepdim=True) < free_bits
        kl_per_dim = torch.where(below, torch.full_like(kl_per_dim, free_bits), kl_per_dim)
    return kl_per_dim.sum(-1)


def probsam_loss(out: TrainingOutput, target: torch.Tensor, step: int, cfg: LossConfig) -> Dict[str, torch.Tensor]:
    """Scalar loss and its parts.

    Arguments:
      out: the model's training output, logits (B, N, S, S).
      target: (B, S, S) soft/binary target on the decoder grid (preprocess.masks_to_low_res).
    """
    target = target.unsqueeze(1).expand_as(out.logits).to(out.logits.dtype)
    bce = F.binary_cross_entropy_with_logits(out.logits.float(), target.float(), reduction="none").sum((-2, -1))
    dice = soft_dice_loss(out.logits.float(), target.float())
    kl = kl_term(out, cfg.free_bits)
    beta = beta_at(step, cfg)
    recon = bce.mean() + cfg.dice_weight * dice.mean()
    loss = recon + beta * kl.mean()
    return {"loss": loss, "bce": bce.mean().detach(), "dice": dice.mean().detach(),
            "kl": kl.mean().detach(), "beta": torch.tensor(beta)}
