"""The anchor term (ProbSAM training, off by default: ``anchor_weight``): where a reference model already
draws what the readers agree on, the model being trained should keep drawing it.

Why (issue 13, research/DIARY.md "Neighbouring slices"): a model that learns something new everywhere
(the encoder reading the slices below and above) fixed the faint edge slices in z, but the whole model
drifted as it learnt, and the full-density cores of nodules every reader marked, which the reference
(demo_v5) drew better than the threshold, fell back. Freezing what reads the slice kept the cores and lost
the edges. The anchor leaves every weight free and asks only for the reference's samples on the slices it
was right about: those every reader who annotated the nodule marked (``anchored_slices``), with at least
``min_readers`` of them, so a two-reader nodule's disputed overlap and every edge slice stay free to move.

Each of the K prior samples the set and consensus terms decode is paired with the reference's sample for
the same standard-normal noise (z = mu + sigma * noise, ProbSAM.latents, with
each model's own prior), and scored with the binary cross-entropy against the reference's probabilities,
summed over pixels like the reconstruction term. At the reference's own weights the term's gradient is zero
(its minimum); it grows as the model's samples on those slices leave the reference's. Its settings
(``anchor_weight``, ``anchor_min_readers``) are LossConfig's.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from ProbSAMLib.errors import SettingsError
from ProbSAMLib.weights.build import load_probsam
from Training.learning.loss import slots_that_drew


def anchored_slices(readers: torch.Tensor, voters: torch.Tensor, min_readers: int) -> torch.Tensor:
    """(B,) bool: every reader who annotated the nodule marked the slice, and at least ``min_readers`` did.

    readers: (B, M, H, W) every slot's mask (a reader who did not mark the slice: empty);
    voters: (B, M) bool, the slots whose reader annotated the nodule."""
    voters = voters.bool()
    marked = slots_that_drew(readers)  # (B, M)
    n_voters = voters.sum(1)
    return ((marked & voters).sum(1) == n_voters) & (n_voters >= min_readers)


def anchor_loss(logits: torch.Tensor, reference_logits: torch.Tensor, anchored: torch.Tensor,
                pixel_weight: float = 1.0) -> torch.Tensor:
    """(B,): the soft-target BCE of the K samples' logits (B, K, H, W) against the reference's samples'
    probabilities (the same shape, the same noise), summed over pixels (each weighing ``pixel_weight``, as in
    the reconstruction term), averaged over the K samples; 0 on slices that are not ``anchored`` (B,)."""
    target = torch.sigmoid(reference_logits.float()).detach()
    bce = F.binary_cross_entropy_with_logits(logits.float(), target, reduction="none").sum((-2, -1))
    # the reference's own entropy is the floor: subtracting it makes a perfect match cost 0 (same gradient)
    floor = F.binary_cross_entropy_with_logits(reference_logits.float(), target, reduction="none").sum((-2, -1))
    per_slice = ((bce - floor) * pixel_weight).mean(1)
    return per_slice * anchored.to(per_slice.dtype)


class Anchor:
    """The frozen reference model. Not an nn.Module attribute of the learner on purpose: its weights must
    not reach the optimiser, the checkpoint (ckpt.pt) or the weights file users load."""

    def __init__(self, path: Path, model_config, sam_checkpoint=None):
        self.path = Path(path)
        self.model = load_probsam(self.path, sam_checkpoint=sam_checkpoint).eval().requires_grad_(False)
        theirs = self.model.config
        for name in ("img_size", "mask_size", "latent_dim"):
            if getattr(theirs, name) != getattr(model_config, name):
                raise SettingsError(f"setting anchor: {self.path} has {name} {getattr(theirs, name)}, the model being "
                                    f"trained {getattr(model_config, name)}; the anchor must decode on the same "
                                    f"grid from a latent of the same size")

    @torch.no_grad()
    def sample_logits(self, images: torch.Tensor, boxes_model: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """The reference's (B, K, S, S) logits for the standard-normal ``noise`` (B, K, L), read from the same
        images (a one-slice reference reads slice k of a (B, 3, H, W) stack) and boxes (model frame)."""
        if self.model.device != images.device:
            self.model.to(images.device)
        embeddings = self.model.encode(images)
        z = self.model.latents(embeddings, boxes_model, noise.shape[1], noise=noise)
        return self.model.decode(embeddings, boxes_model, z, images)
