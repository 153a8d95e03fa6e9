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
slice), as MoSE does: either the energy distance 2 E[d(S, Y)] - E[d(S, S')] - E[d(Y, Y')] (the
training-time twin of the GED metric) or the mean cost of an optimal transport of the K samples onto
the readers (MoSE's matching, both sides tiled to lcm(K, M)), with d = 1 - soft IoU. It is zero when
the samples reproduce the readers' set, and grows when the samples collapse onto one reader or never
come out empty where some readers drew nothing.

The consensus term (off by default, `consensus_weight`): the same K prior samples' mean prediction (the
average of their probabilities, > 0.5, what the Slicer module and evaluation show as the consensus)
against the readers' majority (pylidc's vote: at least half of the reader slots). A calibrated set alone
leaves the mean on the knife-edge where exactly half the readers drew (mean probability 0.5 against a
majority that counts 2 of 4 as "in"), and a few empty samples pull a whole nodule below 0.5. The term is a
hinge: a pixel on the right side of 0.5 by `consensus_margin` costs nothing, so it does not fight the set
term where the two agree (e.g. a one-reader slice, whose calibrated mean of about 0.25 is already "out").
Whose majority (`consensus_voters`): "slots" votes over all M slots, an absent reader counting as an empty
mask, as evaluation does; "readers" votes over the readers who annotated the nodule (`voters`). The second
is what the image can show: a nodule one radiologist marked looks like one all four marked, so the slot
majority (empty for it) asks for two different answers to the same picture, and the model learns to shrink
every nodule; the readers' majority asks for what the readers of the picture agree on. "multi" is the slot
majority scored only on nodules at least two readers annotated (one-reader nodules left to the set term).
"two" asks for the pixels at least two of the nodule's readers drew, and a one-reader nodule's reader: the
slot majority wherever two or more radiologists annotated the nodule (for two readers their overlap, where
"readers" asks for their union), the readers' majority where one did.

Whose masks the set term scores (`set_voters`): "slots" (all M, an absent reader counting as an empty mask,
as evaluation's GED does) or "readers" (only the slots whose reader annotated the nodule).
What it scores of each sample (`set_above_half`): its probabilities p (default), or relu(2p - 1), what the
sample shows once cut at 0.5 as GED cuts it. The consensus term averages probabilities, not cut samples, so
with the cut a sample that GED sees as empty may still hold probability below 0.5 where the image shows a
nodule: the mean prediction can clear 0.5 on a core that half the slots left empty (a two-reader nodule)
without the set term pushing those samples' probability to 0.

Resolution (`resolution`): "decoder" scores the decoder-grid logits against area-averaged targets;
"image" scores logits upsampled to the image against the full-resolution masks (the learner upsamples
and passes `logits` and a `pixel_weight` that keeps the pixel-summed BCE on the decoder grid's scale).

The empty-share term (off by default, `empty_weight`): of the same K prior samples, round(f K) should be
drawn (some logit above 0) where a fraction f of the reader slots drew something, the rest empty. It acts
on the samples' peak logits, not on probabilities: an empty sample's probabilities sit near 0, where the
sigmoid is flat, so the set term (on probabilities) barely moves it, while a hinge on the logit pulls with
a constant slope. That is how the prior learns to give no empty samples where all four readers drew.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Optional

import torch
import torch.nn.functional as F
from torch.distributions import kl_divergence

from ProbSAMLib.modeling.probsam import TrainingOutput


CONSENSUS_VOTERS = ("slots", "readers", "multi", "two")
SET_VOTERS = ("slots", "readers")
LOSS_RESOLUTIONS = ("decoder", "image")


@dataclass
class LossConfig:
    beta: float = 1.0  # weight of KL(Q||P) once annealing is over
    dice_weight: float = 10.0  # per-sample soft Dice loss in [0, 1], against the pixel-SUMMED BCE
    anneal_steps: int = 0  # beta rises linearly from 0 over this many steps (0 = no annealing)
    free_bits: float = 0.0  # nats per latent dimension below which the KL is not penalised
    set_weight: float = 0.0  # weight of the set term on K prior samples (0 = off)
    set_samples: int = 4  # K
    set_kind: str = "energy"  # "energy" (energy distance) or "ot" (optimal transport, IoU cost)
    consensus_weight: float = 0.0  # weight of the consensus term on the same K prior samples (0 = off)
    consensus_margin: float = 0.1  # the mean probability must clear 0.5 by this much to cost nothing
    consensus_voters: str = "slots"  # whose majority: "slots" (all M, absent = empty), "readers" (the nodule's),
    # "multi" (all M, scored only on nodules at least two readers annotated) or "two" (pixels at least two of the
    # nodule's readers drew; a one-reader nodule's reader)
    set_voters: str = "slots"  # whose masks the set term scores: "slots" (all M) or "readers" (the nodule's)
    set_above_half: bool = False  # the set term scores what a sample shows at 0.5 (relu(2p - 1)), not p itself
    empty_weight: float = 0.0  # weight of the empty-share term on the same K prior samples (0 = off)
    empty_margin: float = 1.0  # logits: a drawn sample's peak must exceed +margin, an empty one's stay below -margin
    resolution: str = "decoder"  # score logits on the decoder grid ("decoder") or upsampled to the image ("image")

    @property
    def needs_prior_samples(self) -> bool:
        return self.set_weight > 0 or self.consensus_weight > 0 or self.empty_weight > 0

    def __post_init__(self):
        if self.set_kind not in ("energy", "ot"):
            raise ValueError(f"set_kind must be 'energy' or 'ot', got {self.set_kind!r}")
        if self.set_weight < 0 or int(self.set_samples) < 1:
            raise ValueError(f"set_weight must be >= 0 and set_samples >= 1, got {self.set_weight}, "
                             f"{self.set_samples}")
        if self.consensus_weight < 0 or not 0 <= self.consensus_margin < 0.5:
            raise ValueError(f"consensus_weight must be >= 0 and consensus_margin in [0, 0.5), got "
                             f"{self.consensus_weight}, {self.consensus_margin}")
        for name, allowed in (("consensus_voters", CONSENSUS_VOTERS), ("set_voters", SET_VOTERS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.resolution not in LOSS_RESOLUTIONS:
            raise ValueError(f"resolution must be one of {LOSS_RESOLUTIONS}, got {self.resolution!r}")
        if self.empty_weight < 0 or self.empty_margin < 0:
            raise ValueError(f"empty_weight and empty_margin must be >= 0, got {self.empty_weight}, "
                             f"{self.empty_margin}")


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


def _transport_cost(d_sy, weights):
    """Mean cost of the optimal one-to-one transport of K samples onto the M present readers, both
    tiled to lcm(K, M) copies (MoSE), per slice (B,). The matching is found on the detached costs
    (scipy's Hungarian algorithm); the gradient flows through the matched soft IoUs."""
    from scipy.optimize import linear_sum_assignment

    costs = []
    for cost, present in zip(d_sy, weights.bool()):
        cost = cost[:, present]  # (K, M_b)
        k, m = cost.shape
        if m == 0:
            costs.append(cost.sum() * 0.0)
            continue
        length = math.lcm(k, m)
        tiled = cost.repeat_interleave(length // k, 0).repeat_interleave(length // m, 1)
        rows, cols = linear_sum_assignment(tiled.detach().cpu().numpy())
        costs.append(tiled[torch.as_tensor(rows), torch.as_tensor(cols)].mean())
    return torch.stack(costs)


def set_loss(logits: torch.Tensor, readers: torch.Tensor, present: torch.Tensor, kind: str = "energy",
             eps: float = 1.0, above_half: bool = False) -> torch.Tensor:
    """The set term per slice, (B,): K samples against the slice's M reader masks.

    Arguments:
      logits: (B, K, S, S) sample logits on the decoder grid (decoded from prior samples).
      readers: (B, M, S, S) the readers' targets on the decoder grid, empty masks included.
      present: (B, M) bool, the reader slots to use (absent readers are left out, as in evaluation).
      kind: "energy" (energy distance, 0 when the samples are the readers' set) or "ot".
      above_half: score relu(2p - 1) instead of p: a pixel counts only where the sample shows it once cut at
        0.5 (as GED sees the sample), so probability below 0.5 costs the set term nothing and gets no gradient
        from it.
    """
    if kind not in ("energy", "ot"):
        raise ValueError(f"set_kind must be 'energy' or 'ot', got {kind!r}")
    probs = torch.sigmoid(logits.float())
    if above_half:
        probs = torch.relu(2.0 * probs - 1.0)
    readers, weights = readers.float(), present.float()
    d_sy = soft_iou_distance(probs, readers, eps)
    if kind == "ot":
        return _transport_cost(d_sy, weights)
    return _energy_distance(d_sy, soft_iou_distance(probs, probs, eps), soft_iou_distance(readers, readers, eps),
                            weights)


def consensus_loss(logits: torch.Tensor, readers: torch.Tensor, present: torch.Tensor, margin: float = 0.1,
                   threshold: float = 0.5, vote_level: float = 0.5) -> torch.Tensor:
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


def empty_share_loss(logits: torch.Tensor, readers: torch.Tensor, present: torch.Tensor,
                     margin: float = 1.0) -> torch.Tensor:
    """Whether the right number of the K samples come out empty, per slice (B,).

    Arguments:
      logits: (B, K, S, S) sample logits on the decoder grid (decoded from prior samples).
      readers: (B, M, S, S) the readers' targets on the decoder grid, empty masks included.
      present: (B, M) bool, the reader slots that count.
      margin: in logits. A sample counts as drawn when its peak logit is above 0 (probability 0.5).
    Returns:
      (B,) mean over the K samples of the hinge on their peak logits: where a fraction f of the present
      readers drew something, the round(f K) samples with the highest peaks (ranked on detached values,
      so the samples closest to being drawn are the ones asked to be) should peak above +margin, the
      others stay below -margin. 0 when the share of drawn samples is the readers' share, with the margin.
    """
    peak = logits.float().flatten(2).amax(-1)  # (B, K)
    weights = present.float()
    drew = slots_that_drew(readers).float()  # (B, M)
    share = (drew * weights).sum(1) / weights.sum(1).clamp(min=1)
    n_drawn = torch.round(share * peak.shape[1])  # (B,)
    rank = peak.detach().argsort(dim=1, descending=True).argsort(dim=1)  # 0 = highest peak
    should_draw = rank < n_drawn[:, None]
    cost = torch.where(should_draw, torch.relu(margin - peak), torch.relu(peak + margin))
    return cost.mean(1)


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
        (cfg.resolution == "image"), so the edge is scored where evaluation scores it.
      pixel_weight: what one pixel of the BCE sum weighs; ``(S/H)^2`` for image-grid logits keeps the
        BCE on the decoder grid's scale, so the weights of the other terms mean what they meant.
      prior_logits, readers, present: the set, consensus and empty-share terms' inputs
        (cfg.needs_prior_samples): (B, K, S, S) logits decoded from K prior samples, (B, M, S, S) all
        readers' targets, (B, M) bool; on the image grid (H, W) like ``logits`` when that is given.
      voters: (B, M) bool, the slots whose reader annotated the nodule: the consensus term's electorate
        when cfg.consensus_voters is "readers" or "two" (and which nodules "multi" scores), and the set
        term's readers when cfg.set_voters == "readers" (``present`` otherwise).
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
        raise ValueError("set_weight, consensus_weight or empty_weight > 0 needs prior_logits, readers and "
                         "present (all readers' masks)")
    if (cfg.consensus_weight > 0 and cfg.consensus_voters != "slots") or (
            cfg.set_weight > 0 and cfg.set_voters == "readers"):
        if voters is None:
            raise ValueError(f"consensus_voters {cfg.consensus_voters!r} or set_voters 'readers' needs voters (which "
                             "slots annotated the nodule)")
    if cfg.set_weight > 0:
        scored = voters.bool() if cfg.set_voters == "readers" else present
        term = set_loss(prior_logits, readers, scored, cfg.set_kind, above_half=cfg.set_above_half).mean()
        loss = loss + cfg.set_weight * term
        parts["set"] = term.detach()
    if cfg.consensus_weight > 0:
        electorate = voters.bool() if cfg.consensus_voters in ("readers", "two") else present
        level = 0.5
        if cfg.consensus_voters == "two":  # at least two readers' votes (the one vote of a one-reader nodule)
            n_readers = electorate.sum(1).clamp(min=1).float()
            level = n_readers.clamp(max=2.0) / n_readers
        per_slice = consensus_loss(prior_logits, readers, electorate, cfg.consensus_margin, vote_level=level)
        if cfg.consensus_voters == "multi":  # one-reader nodules: no majority vote the picture can show
            per_slice = per_slice * (voters.sum(1) >= 2).to(per_slice.dtype)
        term = per_slice.mean()
        loss = loss + cfg.consensus_weight * term
        parts["consensus"] = term.detach()
    if cfg.empty_weight > 0:
        term = empty_share_loss(prior_logits, readers, present, cfg.empty_margin).mean()
        loss = loss + cfg.empty_weight * term
        parts["empty"] = term.detach()
    return {"loss": loss, **parts}
