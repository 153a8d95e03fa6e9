"""The training objective: BCE + Dice + beta * KL(Q || P), with KL annealing and free bits.

Scale (why it matters): the reference implementation averages BCE over pixels and multiplies the KL by
10, so one nat of KL outweighs the whole reconstruction term by ~10^6 compared with the Probabilistic
U-Net; the optimiser then closes the KL by making Q = P and ignoring z (posterior collapse, no diversity).
Here BCE is SUMMED over the decoder-grid pixels of a sample (as in the Probabilistic U-Net), Dice is a
per-sample term in [0, 1] scaled by `dice_weight`, and the KL is the analytic per-sample KL in nats.
Reconstruction and KL are then of comparable size: a latent that explains which reader drew the target
saves many pixels of BCE and is worth a few nats. Free bits (a floor on the KL per latent dimension,
averaged over the batch) and linear annealing of beta from 0 keep the posterior informative early on.

The set term (off by default, `set_weight`): the per-reader loss above trains the prior only through
the KL, one reader at a time. The set term scores K samples decoded from the PRIOR against the whole
set of readers' masks of the slice, empty ones included (a present reader who did not mark this
slice), as MoSE does, with the energy distance 2 E[d(S, Y)] - E[d(S, S')] - E[d(Y, Y')] (the
training-time twin of the GED metric), d = 1 - soft IoU. It is zero when the samples reproduce the
readers' set, and grows when the samples collapse onto one reader or never come out empty where some
readers drew nothing. It scores all M reader slots, an absent reader counting as an empty mask, as
evaluation's GED does.

The consensus term (off by default, `consensus_weight`): the same K prior samples' mean prediction (the
average of their probabilities, > MASK_THRESHOLD, what the Slicer module and evaluation show as the
consensus) against the readers' majority (pylidc's vote: at least half of the reader slots). A calibrated
set alone leaves the mean on the knife-edge where exactly half the readers drew (mean probability 0.5
against a majority that counts 2 of 4 as "in"), and a few empty samples pull a whole nodule below 0.5. The
term is a hinge: a pixel on the right side of the cut by `consensus_margin` costs nothing, so it does not
fight the set term where the two agree (e.g. a one-reader slice, whose calibrated mean of about 0.25 is
already "out"). Whose majority (`consensus_voters`): "slots" votes over all M slots, an absent reader
counting as an empty mask, as evaluation does; "readers" votes over the readers who annotated the nodule
(`voters`). The second is what the image can show: a nodule one radiologist marked looks like one all four
marked, so the slot majority (empty for it) asks for two different answers to the same picture, and the
model learns to shrink every nodule; the readers' majority asks for what the readers of the picture agree
on. "two" asks for the pixels at least two of the nodule's readers drew, and a one-reader nodule's reader:
the slot majority wherever two or more radiologists annotated the nodule (for two readers their overlap,
where "readers" asks for their union), the readers' majority where one did.

What the set term scores of each sample (`set_above_half`): its probabilities p (default), or
relu(2p - 1), what the sample shows once cut at 0.5 as GED cuts it. The consensus term averages
probabilities, not cut samples, so with the cut a sample that GED sees as empty may still hold probability
below 0.5 where the image shows a nodule: the mean prediction can clear 0.5 on a core that half the slots
left empty (a two-reader nodule) without the set term pushing those samples' probability to 0.

Resolution (`loss_resolution`): "decoder" scores the decoder-grid logits against area-averaged targets;
"image" scores logits upsampled to the image against the full-resolution masks (the learner upsamples
and passes `logits` and a `pixel_weight` that keeps the pixel-summed BCE on the decoder grid's scale).

The anchor term (`anchor_weight`, `anchor_min_readers`) is the learner's (Training/learning/anchor.py): it
needs a reference model, which this module does not hold; its settings live here with the other terms'.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional

import torch
import torch.nn.functional as F
from torch.distributions import kl_divergence

from ProbSAMLib.metrics import MASK_THRESHOLD
from ProbSAMLib.modeling.probsam import TrainingOutput
from Training.settings import at_least, check_fields, in_range, one_of


CONSENSUS_VOTERS = ("slots", "readers", "two")
LOSS_RESOLUTIONS = ("decoder", "image")


@dataclass
class LossConfig:
    """The training objective's settings, checked here (types and ranges) and nowhere else; train.py's
    TrainConfig holds one (a ``loss:`` block in a config file, or these names at its top level)."""

    beta: float = 1.0  # weight of KL(Q||P) once annealing is over
    dice_weight: float = 10.0  # per-sample soft Dice loss in [0, 1], against the pixel-SUMMED BCE
    anneal_steps: int = 500  # beta rises linearly from 0 over this many steps (0 = no annealing)
    free_bits: float = 0.0  # nats per latent dimension below which the KL is not penalised
    set_weight: float = 0.0  # weight of the set term on K prior samples vs all reader slots (ProbSAM; 0 = off)
    set_samples: int = 4  # K prior samples a slice for the set, consensus and anchor terms
    set_above_half: bool = False  # the set term scores what a sample shows at 0.5 (relu(2p - 1)), not p itself;
    # probability below 0.5 is left to the consensus term (which averages probabilities, not cut samples)
    consensus_weight: float = 0.0  # weight of the consensus term on the same K prior samples (ProbSAM; 0 = off)
    consensus_margin: float = 0.1  # the mean probability must clear the cut (0.5) by this much to cost nothing
    consensus_voters: str = "slots"  # whose majority: "slots" (all 4, absent = empty), "readers" (the nodule's) or
    # "two" (pixels at least two of the nodule's readers drew; a one-reader nodule's reader)
    loss_resolution: str = "decoder"  # ProbSAM: score logits on the decoder grid or upsampled to the "image"
    anchor_weight: float = 0.0  # ProbSAM: keep the K prior samples on anchored slices where a reference model's
    # are (Training/learning/anchor.py; 0 = off; the reference is TrainConfig.anchor or init)
    anchor_min_readers: int = 3  # anchored slices: every reader of the nodule marked them, and at least this many

    @property
    def needs_prior_samples(self) -> bool:
        return self.set_weight > 0 or self.consensus_weight > 0

    def __post_init__(self):
        self.check()

    def check(self) -> None:
        """SettingsError (a ValueError) naming the first setting of the wrong type or out of range."""
        check_fields(self, _RANGES)


_RANGES = {
    "beta": at_least(0), "dice_weight": at_least(0), "anneal_steps": at_least(0), "free_bits": at_least(0),
    "set_weight": at_least(0), "set_samples": at_least(1), "consensus_weight": at_least(0),
    "consensus_margin": in_range(0, 0.5), "consensus_voters": one_of(CONSENSUS_VOTERS),
    "loss_resolution": one_of(LOSS_RESOLUTIONS), "anchor_weight": at_least(0), "anchor_min_readers": at_least(1),
}


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


def soft_iou_distance(a: torch.Tensor, b: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """1 - soft IoU of every pair: a (B, N, S, S), b (B, M, S, S) in [0, 1] -> (B, N, M).

    Soft IoU = (sum ab + eps) / (sum a + sum b - sum ab + eps): for binary masks it is the IoU, and
    `eps` (pixels) makes empty vs empty a distance of 0 and empty vs a mask of A pixels about 1.
    """
    a, b = a.flatten(2), b.flatten(2)
    inter = a @ b.transpose(1, 2)
    union = a.sum(-1)[:, :, None] + b.sum(-1)[:, None, :] - inter
    return 1.0 - (inter + eps) / (union + eps)


def _energy_distance(d_sy, d_ss, d_yy, weights):
    """Energy distance per slice from distance matrices (B, K, M), (B, K, K), (B, M, M) and reader
    weights (B, M) (1 = present), every expectation over all pairs, self-pairs included (as GED)."""
    m = weights.sum(-1).clamp(min=1)
    e_sy = (d_sy * weights[:, None, :]).sum((1, 2)) / (d_sy.shape[1] * m)
    e_yy = (d_yy * weights[:, :, None] * weights[:, None, :]).sum((1, 2)) / (m * m)
    return 2 * e_sy - d_ss.mean((1, 2)) - e_yy


def set_loss(logits: torch.Tensor, readers: torch.Tensor, present: torch.Tensor, eps: float = 1.0,
             above_half: bool = False) -> torch.Tensor:
    """The set term per slice, (B,): the energy distance of K samples to the slice's M reader masks (0 when
    the samples are the readers' set).

    Arguments:
      logits: (B, K, S, S) sample logits on the decoder grid (decoded from prior samples).
      readers: (B, M, S, S) the readers' targets on the decoder grid, empty masks included.
      present: (B, M) bool, the reader slots to use (absent readers are left out, as in evaluation).
      above_half: score relu(2p - 1) instead of p: a pixel counts only where the sample shows it once cut at
        0.5 (as GED sees the sample), so probability below 0.5 costs the set term nothing and gets no gradient
        from it.
    """
    probs = torch.sigmoid(logits.float())
    if above_half:
        probs = torch.relu(2.0 * probs - 1.0)
    readers, weights = readers.float(), present.float()
    return _energy_distance(soft_iou_distance(probs, readers, eps), soft_iou_distance(probs, probs, eps),
                            soft_iou_distance(readers, readers, eps), weights)


def consensus_loss(logits: torch.Tensor, readers: torch.Tensor, present: torch.Tensor, margin: float = 0.1,
                   threshold: float = MASK_THRESHOLD, vote_level: float = 0.5) -> torch.Tensor:
    """How far the K samples' mean prediction is from the readers' majority, per slice (B,).

    Arguments:
      logits: (B, K, S, S) sample logits on the decoder grid (decoded from prior samples).
      readers: (B, M, S, S) the readers' targets on the decoder grid, empty masks included.
      present: (B, M) bool, the reader slots that vote (absent ones are left out).
      margin: a pixel whose mean probability is on the right side of ``threshold`` by this much costs 0.
      threshold, vote_level: the mean prediction is ``mean > threshold`` and the majority
        ``fraction of readers >= vote_level``, as in ProbSAMLib.metrics.mean_prediction_scores; vote_level
        may be a (B,) tensor, one level per slice.
    Returns:
      (B,) the summed shortfall inside the majority and excess outside it, divided by the size of the
      majority plus the predicted region (+1 pixel): a fraction like 1 - Dice, 0 when the mean prediction
      is the majority with the margin.
    """
    mean = torch.sigmoid(logits.float()).mean(1)  # (B, S, S)
    weights = present.float()
    votes = (readers.float() * weights[:, :, None, None]).sum(1) / weights.sum(1).clamp(min=1)[:, None, None]
    if torch.is_tensor(vote_level):  # one level per slice (B,), a ratio of counts: compare with a rounding slack
        vote_level = vote_level.to(votes)[:, None, None] - 1e-6
    majority = (votes >= vote_level).float()
    shortfall = torch.relu(threshold + margin - mean) * majority
    excess = torch.relu(mean - (threshold - margin)) * (1 - majority)
    size = majority.sum((-2, -1)) + (mean.detach() > threshold).float().sum((-2, -1)) + 1
    return (shortfall + excess).sum((-2, -1)) / size


def slots_that_drew(readers: torch.Tensor) -> torch.Tensor:
    """(B, M) bool: which reader slots drew anything on the slice. readers: (B, M, H, W) masks or soft
    targets (any coverage counts, so a reader's sliver that area-averaging onto a grid makes faint still
    counts as drawn)."""
    return readers.flatten(2).amax(-1) > 0


def probsam_loss(out: TrainingOutput, target: torch.Tensor, step: int, cfg: LossConfig,
                 prior_logits: Optional[torch.Tensor] = None, readers: Optional[torch.Tensor] = None,
                 present: Optional[torch.Tensor] = None,
                 voters: Optional[torch.Tensor] = None, logits: Optional[torch.Tensor] = None,
                 pixel_weight: float = 1.0) -> Dict[str, torch.Tensor]:
    """Scalar loss and its parts.

    Arguments:
      out: the model's training output, logits (B, N, S, S) (and the prior and posterior for the KL).
      target: (B, S, S) soft/binary target on the decoder grid (preprocess.masks_to_low_res), or on the
        grid of ``logits`` when those are given.
      logits: (B, N, H, W) the logits to score instead of ``out.logits``: upsampled to the image
        (cfg.loss_resolution == "image"), so the edge is scored where evaluation scores it.
      pixel_weight: what one pixel of the BCE sum weighs; ``(S/H)^2`` for image-grid logits keeps the
        BCE on the decoder grid's scale, so the weights of the other terms mean what they meant.
      prior_logits, readers, present: the set and consensus terms' inputs (cfg.needs_prior_samples):
        (B, K, S, S) logits decoded from K prior samples, (B, M, S, S) all readers' targets, (B, M) bool; on
        the image grid (H, W) like ``logits`` when that is given.
      voters: (B, M) bool, the slots whose reader annotated the nodule: the consensus term's electorate
        when cfg.consensus_voters is "readers" or "two" (``present`` otherwise).
    """
    logits = out.logits if logits is None else logits
    target = target.unsqueeze(1).expand_as(logits).to(logits.dtype)
    bce = F.binary_cross_entropy_with_logits(logits.float(), target.float(), reduction="none").sum((-2, -1))
    bce = bce * pixel_weight
    dice = soft_dice_loss(logits.float(), target.float())
    kl = kl_term(out, cfg.free_bits)
    beta = beta_at(step, cfg)
    recon = bce.mean() + cfg.dice_weight * dice.mean()
    loss = recon + beta * kl.mean()
    parts = {"bce": bce.mean().detach(), "dice": dice.mean().detach(), "kl": kl.mean().detach(),
             "beta": torch.tensor(beta)}
    if cfg.needs_prior_samples and (prior_logits is None or readers is None or present is None):
        raise ValueError("set_weight or consensus_weight > 0 needs prior_logits, readers and present (all "
                         "readers' masks)")
    if cfg.consensus_weight > 0 and cfg.consensus_voters != "slots" and voters is None:
        raise ValueError(f"consensus_voters {cfg.consensus_voters!r} needs voters (which slots annotated the nodule)")
    if cfg.set_weight > 0:
        term = set_loss(prior_logits, readers, present, above_half=cfg.set_above_half).mean()
        loss = loss + cfg.set_weight * term
        parts["set"] = term.detach()
    if cfg.consensus_weight > 0:
        electorate = voters.bool() if cfg.consensus_voters in ("readers", "two") else present
        level = 0.5
        if cfg.consensus_voters == "two":  # at least two readers' votes (the one vote of a one-reader nodule)
            n_readers = electorate.sum(1).clamp(min=1).float()
            level = n_readers.clamp(max=2.0) / n_readers
        term = consensus_loss(prior_logits, readers, electorate, cfg.consensus_margin, vote_level=level).mean()
        loss = loss + cfg.consensus_weight * term
        parts["consensus"] = term.detach()
    return {"loss": loss, **parts}
