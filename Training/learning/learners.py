"""What train.py and evaluate.py need from a model, for ProbSAM and the Prob U-Net baseline alike.

A learner is an nn.Module whose forward() is the whole training loss (so DistributedDataParallel wraps
one call), plus ``sample_probabilities`` for evaluation and ``save`` for the weights file users load.

Sampling takes the standard-normal latent noise ``noise`` (B, N, L) from the caller (z = mu + sigma *
noise, mu and sigma from the prior), so evaluate.py can draw it per slice: the samples of a slice then do
not depend on which other slices share its batch. ``mode="mean"`` gives the deterministic prior-mean
prediction (z = mu), one of evaluate.py's baselines. A weights file a user names is loaded as a learner by
``load_weights`` (errors name the file).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ProbSAMLib import errors
from ProbSAMLib.errors import InputError, SettingsError, WeightsError
from ProbSAMLib.inference.sampling import sample_from_embeddings
from ProbSAMLib.modeling import preprocess
from ProbSAMLib.modeling.config import LUNG_WINDOW, ProbSAMConfig
from ProbSAMLib.weights.build import build_probsam, load_probsam, registered_backbone
from ProbSAMLib.weights.checkpoints import FORMAT as PROBSAM_FORMAT
from ProbSAMLib.weights.checkpoints import save_probsam
from Training.config import TrainConfig
from Training.learning.anchor import Anchor, anchor_loss, anchored_slices
from Training.learning.loss import LossConfig, probsam_loss
from Training.learning.prob_unet import FORMAT as PROB_UNET_FORMAT
from Training.learning.prob_unet import ProbUNet, load_prob_unet, save_prob_unet

# The TrainConfig settings that are ProbSAMConfig fields of the same name (the rest of the architecture is the
# preset's): a fresh model takes them all; a model from init= keeps its own but freeze_encoder, refine_channels
# (a refiner attached) and neighbour_slices (the conversion), which build_learner applies.
MODEL_FIELDS = ("latent_dim", "latent_to_dense", "freeze_encoder", "refine_channels", "neighbour_slices")


class ProbSAMLearner(nn.Module):
    uses_embeddings = True

    def __init__(self, model, loss_config: LossConfig, anchor: Optional[Anchor] = None, marking_weight: float = 0.0,
                 marking_negatives: float = 0.0, backbone_anchor: float = 0.0):
        """anchor: the anchor term's reference model (loss_config.anchor_weight > 0), or None (no anchor term).
        marking_weight: weight of the marking head's BCE; marking_negatives: share of the batch also shown a
        box moved off the lesion, whose target share is 0 (TrainConfig)."""
        super().__init__()
        self.model = model
        self.loss_config = loss_config
        self.anchor = anchor
        self.marking_weight, self.marking_negatives = float(marking_weight), float(marking_negatives)
        self.backbone_anchor = float(backbone_anchor)

    @property
    def caches_embeddings(self) -> bool:
        return self.model.config.freeze_encoder

    @property
    def latent_dim(self) -> int:
        return self.model.config.latent_dim

    @property
    def reads_neighbours(self) -> bool:
        """Whether to show it the slices below and above (Batch.model_images): its encoder reads them."""
        return self.model.config.neighbour_slices

    @property
    def window(self):
        """The CT window its images are read with (SliceBatches.window): the model's own."""
        return self.model.config.window

    def forward(self, images, boxes, targets, step: int, embeddings: Optional[torch.Tensor] = None,
                readers: Optional[torch.Tensor] = None, present: Optional[torch.Tensor] = None,
                voters: Optional[torch.Tensor] = None) -> dict:
        """images (B, H, W) in [0, 1] (or (B, 3, H, W) with the slices below and above), boxes (B, 4) image pixels, targets (B, H, W) one reader's mask;
        readers (B, M, H, W) and present (B, M): every reader's mask, for the set and consensus terms;
        voters (B, M): the slots whose reader annotated the nodule (consensus_voters "readers" or "two", anchor)."""
        config, image_hw = self.model.config, images.shape[-2:]
        if embeddings is None:
            embeddings = self.model.encode(images)
        boxes_model = preprocess.boxes_to_model_frame(boxes, image_hw, config.img_size)
        target = preprocess.masks_to_low_res(targets.float(), image_hw, config.img_size, config.low_res_size)
        # the posterior always reads the decoder-grid target
        out = self.model(embeddings, boxes_model, target, images01=images)
        marking = self._marking_term(embeddings, boxes_model, voters) if self.marking_weight > 0 else None
        parts = self._latent_terms(out, embeddings, boxes_model, images, image_hw, targets, step, readers, present,
                                   voters)
        if marking is not None:
            parts["loss"] = parts["loss"] + self.marking_weight * marking
            parts["marking"] = marking.detach()
        if self.backbone_anchor > 0:
            term = self._backbone_anchor_term(out, embeddings, boxes_model)
            parts["loss"] = parts["loss"] + self.backbone_anchor * term
            parts["backbone_anchor"] = term.detach()
        return parts

    def _backbone_anchor_term(self, out, embeddings, boxes_model) -> torch.Tensor:
        """The drift guard as a loss (a frozen backbone only): the mean of K prior samples' probabilities, per
        pixel, against the backbone's own mask for the box (binary cross-entropy summed over the decoder grid,
        the reconstruction term's scale). The samples may spread around the backbone's outline, but their
        average stays on it, so the consensus is the pretrained model's outline wherever the heads' training
        images (rendered) differ from real CT."""
        if not self.model.config.frozen_backbone:
            raise ValueError("backbone_anchor needs a model with a frozen backbone (preset lite_medsam)")
        with torch.no_grad():
            own = (self.model.decode_backbone(embeddings, boxes_model) > 0).float()[:, 0]  # (B, S, S)
        z = out.prior.rsample((self.loss_config.set_samples,)).transpose(0, 1)  # (B, K, L), reparameterised
        mean = torch.sigmoid(self.model.decode(embeddings, boxes_model, z).float()).mean(1).clamp(1e-6, 1 - 1e-6)
        return F.binary_cross_entropy(mean, own, reduction="sum") / len(own)

    def _marking_term(self, embeddings, boxes_model, voters) -> torch.Tensor:
        """BCE of the marking head against the share of reader slots whose reader marked the nodule, plus, for
        a share of the batch, the same slice with the box moved off the lesion (target 0)."""
        if voters is None:
            raise ValueError("marking_weight > 0: the learner needs voters= (the readers who marked the nodule)")
        share = voters.to(embeddings.device).float().mean(1)
        logits = self.model.marking_logit(embeddings, boxes_model)
        loss = F.binary_cross_entropy_with_logits(logits, share)
        count = int(round(self.marking_negatives * len(boxes_model)))
        if count:
            moved = boxes_off_lesion(boxes_model[:count], self.model.config.img_size)
            negative = self.model.marking_logit(embeddings[:count], moved)
            loss = (loss * len(boxes_model) + F.binary_cross_entropy_with_logits(
                negative, torch.zeros_like(negative), reduction="sum")) / (len(boxes_model) + count)
        return loss

    def _latent_terms(self, out, embeddings, boxes_model, images, image_hw, targets, step, readers, present, voters):
        """The reconstruction, KL and (configured) set, consensus and anchor terms."""
        scored = self._scored(image_hw)
        logits = scored["logits"](out.logits)
        loss_target = targets.float() if scored["on_image"] else self._on_mask_grid(targets, image_hw)
        if not self.loss_config.needs_prior_samples and self.anchor is None:
            return probsam_loss(out, loss_target, step, self.loss_config, logits=logits,
                                pixel_weight=scored["pixel_weight"])
        if readers is None or present is None or (self.anchor is not None and voters is None):
            raise ValueError("set_weight, consensus_weight or anchor_weight > 0: the learner needs every reader's "
                             "mask (readers=, present=; and voters= for the anchor)")
        # K samples from the PRIOR, decoded from the same embeddings (reparameterised: the set and consensus
        # terms' gradients reach the prior net).
        z = out.prior.rsample((self.loss_config.set_samples,)).transpose(0, 1)  # (B, K, L)
        prior_logits = scored["logits"](self.model.decode(embeddings, boxes_model, z, images))
        reader_targets = readers.float() if scored["on_image"] else self._on_mask_grid(readers, image_hw)
        parts = probsam_loss(out, loss_target, step, self.loss_config, prior_logits, reader_targets, present.bool(),
                             None if voters is None else voters.to(present.device).bool(), logits=logits,
                             pixel_weight=scored["pixel_weight"])
        if self.anchor is None:
            return parts
        anchored = anchored_slices(readers, voters.to(readers.device), self.loss_config.anchor_min_readers)
        # the reference reads only the slices it holds (its encoder is the costly part; the term is 0 elsewhere)
        rows = anchored.nonzero().squeeze(1)
        if rows.numel() == 0:
            parts["anchor"] = torch.zeros((), device=parts["loss"].device)
            return parts
        # the noise behind z, recovered rather than drawn apart, so runs without the anchor draw exactly as before
        noise = ((z[rows] - out.prior.base_dist.loc[rows, None]) / out.prior.base_dist.scale[rows, None]).detach()
        reference = scored["logits"](self.anchor.sample_logits(images[rows], boxes_model[rows], noise))
        # mean over the whole batch (a slice that is not anchored adds 0), as if every slice had been read
        term = anchor_loss(prior_logits[rows], reference, anchored[rows], scored["pixel_weight"]).sum() / len(anchored)
        parts["loss"] = parts["loss"] + self.loss_config.anchor_weight * term
        parts["anchor"] = term.detach()
        return parts

    def _on_mask_grid(self, masks: torch.Tensor, image_hw) -> torch.Tensor:
        """(..., H, W) masks area-averaged onto the square the model's logits come on (config.mask_size)."""
        config = self.model.config
        return preprocess.masks_to_low_res(masks.float(), image_hw, config.img_size, config.mask_size)

    def _scored(self, image_hw) -> dict:
        """How the loss sees the logits: on the decoder grid as decoded, or (resolution "image") upsampled to
        the image as evaluation and the Slicer module see them, each pixel weighing its share of a grid cell.

        Why "image": the decoder grid is half the tiny model's input resolution; its area-averaged targets,
        upsampled and cut at 0.5, lose about 8 % Dice at the edge of a 15-pixel nodule, while a logit field on
        that grid fitted at full resolution loses almost nothing (research/DIARY.md, "Loss resolution")."""
        config = self.model.config
        if self.loss_config.loss_resolution == "decoder":
            return {"on_image": False, "logits": lambda x: x, "pixel_weight": 1.0}
        new_h, new_w = preprocess.resized_shape(image_hw[0], image_hw[1], config.img_size)
        grid_cells = (config.low_res_size / config.img_size) ** 2 * new_h * new_w  # cells covering the image
        return {"on_image": True, "logits": lambda x: preprocess.logits_to_image(x, image_hw, config.img_size),
                "pixel_weight": grid_cells / (image_hw[0] * image_hw[1])}

    @torch.no_grad()
    def sample_probabilities(self, images, boxes, n_samples: int, generator=None, embeddings=None,
                             noise: Optional[torch.Tensor] = None, mode: str = "sample"):
        """(B, N, H, W) foreground probabilities from the prior; ``noise`` (B, N, L) fixes the draw;
        ``mode="mean"``: every sample decodes the prior's mean (z = mu)."""
        if embeddings is None:
            embeddings = self.model.encode(images.to(self.model.device))
        probs, _ = sample_from_embeddings(self.model, embeddings, boxes, images.shape[-2:], n_samples, generator,
                                          mode, images01=images, noise=noise)
        return probs

    def save(self, path: Path, extra: Optional[dict] = None) -> None:
        # A frozen SAM encoder is the official checkpoint: ship only what training changed.
        heads_only = (self.model.config.freeze_encoder and self.model.config.encoder != "tiny") or \
            self.model.config.frozen_backbone
        save_probsam(self.model, path, heads_only=heads_only, extra=extra)


class ProbUNetLearner(nn.Module):
    uses_embeddings = False
    caches_embeddings = False
    reads_neighbours = False  # the baseline reads one slice

    def __init__(self, model: ProbUNet, loss_config: LossConfig):
        super().__init__()
        self.model = model
        self.loss_config = loss_config

    @property
    def latent_dim(self) -> int:
        return self.model.latent_dim

    def forward(self, images, boxes, targets, step: int, embeddings=None, readers=None, present=None,
                voters=None) -> dict:
        """As ProbSAMLearner.forward; readers/present/voters are unused (the set term is ProbSAM's only)."""
        out = self.model(images, boxes, targets.float())
        return probsam_loss(out, targets.float(), step, self.loss_config)

    @torch.no_grad()
    def sample_probabilities(self, images, boxes, n_samples: int, generator=None, embeddings=None,
                             noise: Optional[torch.Tensor] = None, mode: str = "sample"):
        return self.model.sample_probabilities(images, boxes, n_samples, generator, noise=noise, mode=mode)

    def save(self, path: Path, extra: Optional[dict] = None) -> None:
        save_prob_unet(self.model, path, extra)


def build_learner(cfg: TrainConfig, intensity: str = "hu", context_size: Optional[int] = None) -> nn.Module:
    """A fresh (or ``cfg.init``-initialised) learner for ``cfg.model``.

    context_size: side of the training crops; stored in the ProbSAM config, so the volume sampler shows
    the model windows at the scale it was trained at.
    """
    if cfg.model == "prob_unet":
        return ProbUNetLearner(ProbUNet(cfg.unet_channels, cfg.latent_dim), cfg.loss)
    if cfg.model != "probsam":
        raise ValueError(f"model must be 'probsam' or 'prob_unet', got {cfg.model!r}")
    if cfg.init:
        model = load_probsam(Path(cfg.init), sam_checkpoint=cfg.sam_checkpoint)
        model.config.freeze_encoder = cfg.freeze_encoder
        model.sam.image_encoder.requires_grad_(not cfg.freeze_encoder)
        _match_refiner(model, cfg.refine_channels, cfg.init)
        if cfg.neighbour_slices:  # exact: step 0 is `init`; the neighbours' weights start at zero
            model.read_neighbour_slices()
    else:
        window = None if intensity == "unit" else preset_window(cfg)
        config = ProbSAMConfig.preset(cfg.preset, window=window, **{name: getattr(cfg, name) for name in MODEL_FIELDS})
        model = build_probsam(config, sam_checkpoint=_backbone_file(cfg), seed=cfg.seed)
    if context_size is not None and model.config.field_of_view == "crop":
        model.config.context_size = int(context_size)
    # the anchor's reference: `anchor`, or the weights training starts from
    anchor = (Anchor(Path(cfg.anchor or cfg.init), model.config, cfg.sam_checkpoint) if cfg.loss.anchor_weight > 0
              else None)
    return ProbSAMLearner(model, cfg.loss, anchor, cfg.marking_weight, cfg.marking_negatives, cfg.backbone_anchor)


def boxes_off_lesion(boxes: torch.Tensor, img_size: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """(B, 4) boxes in the model frame moved, same size, to a random place of the frame that does not overlap
    the original: boxes around no lesion. Drawn on the CPU from `generator` (default: torch's global one,
    seeded per step by train.py)."""
    size = boxes[:, 2:] - boxes[:, :2]
    moved = []
    for box, side in zip(boxes, size):
        for _ in range(20):  # a free place exists unless the box covers most of the frame
            corner = torch.rand(2, generator=generator).to(boxes.device) * (img_size - side).clamp(min=1)
            candidate = torch.cat([corner, corner + side])
            apart = (candidate[0] >= box[2]) | (candidate[2] <= box[0]) | (candidate[1] >= box[3]) | (candidate[3] <= box[1])
            if apart:
                break
        moved.append(candidate)
    return torch.stack(moved)


def preset_window(cfg: TrainConfig):
    """The CT window a fresh model of cfg.preset reads HU with: LiteMedSAM's [-1000, 400] HU for lite_medsam,
    the lung window for the others (a model from init= keeps its own: ProbSAMLearner.window)."""
    return ProbSAMConfig.preset("lite_medsam").window if cfg.preset == "lite_medsam" else LUNG_WINDOW


def _backbone_file(cfg: TrainConfig) -> Optional[str]:
    """The backbone weights a fresh model starts from: sam_checkpoint, or the registry's file for a preset
    that has one (lite_medsam: the installed package's, verified)."""
    return cfg.sam_checkpoint or registered_backbone(cfg.preset)


def parameter_groups(learner: nn.Module, cfg: TrainConfig) -> list:
    """AdamW groups: weight decay on matrices and kernels only; a ProbSAM mask refiner learns at
    cfg.refine_lr_scale x the schedule's rate (it starts from zero beside pretrained weights). Empty groups
    are left out, so a model without a refiner has the two groups every earlier checkpoint has."""
    refiner = getattr(getattr(learner, "model", None), "refiner", None)
    fresh = {id(p) for p in refiner.parameters()} if refiner is not None else set()
    trainable = [p for p in learner.parameters() if p.requires_grad]
    groups = []
    for scale, params in ((1.0, [p for p in trainable if id(p) not in fresh]),
                          (cfg.refine_lr_scale, [p for p in trainable if id(p) in fresh])):
        for decay, members in ((cfg.weight_decay, [p for p in params if p.dim() >= 2]),
                               (0.0, [p for p in params if p.dim() < 2])):
            if members:
                groups.append({"params": members, "weight_decay": decay, "lr_scale": scale})
    return groups


def _match_refiner(model, channels: int, init: str) -> None:
    """refine_channels with init=: attach a fresh (no-op) refiner, or check the one the weights have.
    refine_channels=0 keeps whatever init has: a refiner is part of the model it was trained into."""
    have = model.config.refine_channels
    if channels and not have:
        model.attach_refiner(channels)
    elif channels and have != channels:
        raise SettingsError(f"setting refine_channels={channels}, but {init} already has a {have}-channel "
                            f"refiner; leave refine_channels at 0 to keep it")


def weights_format(path) -> Optional[str]:
    """The ``format`` a safetensors weights file declares (PROBSAM_FORMAT, PROB_UNET_FORMAT, or another)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt", device="cpu") as handle:
        return (handle.metadata() or {}).get("format")


def load_learner(path: Path, sam_checkpoint: Optional[str] = None) -> nn.Module:
    """A trained model file (ProbSAM or Prob U-Net safetensors) as a learner in eval mode."""
    kind = weights_format(path)
    if kind == PROB_UNET_FORMAT:
        return ProbUNetLearner(load_prob_unet(path), LossConfig()).eval()
    if kind == PROBSAM_FORMAT:
        return ProbSAMLearner(load_probsam(Path(path), sam_checkpoint=sam_checkpoint), LossConfig()).eval()
    raise ValueError(f"{path}: neither a ProbSAM nor a Prob U-Net weights file (format {kind!r})")


# --- loading a weights file a user names (evaluate.py --model, research tools) -----------------------------
def _existing(path, option: str) -> Path:
    if not Path(path).is_file():
        raise InputError(f"{option} {path}: no such file")
    return Path(path)


def load_weights(path, sam_checkpoint: Optional[str] = None, option: str = "--model") -> nn.Module:
    """A trained model file as a learner (load_learner), or InputError/WeightsError naming the file."""
    _existing(path, option)
    try:
        return load_learner(Path(path), sam_checkpoint)
    except WeightsError:
        raise
    except Exception as error:  # SafetensorError, KeyError, shape mismatches ... from a foreign file
        raise WeightsError(f"{path} is not a usable ProbSAM or Prob U-Net weights file: "
                           f"{errors.message(error)}") from None


def is_probsam_file(path, option: str = "--model") -> bool:
    """Whether ``path`` is a ProbSAM weights file (not a Prob U-Net one), or WeightsError naming the file."""
    _existing(path, option)
    try:
        return weights_format(path) == PROBSAM_FORMAT
    except Exception as error:  # SafetensorError and the like from a foreign or truncated file
        raise WeightsError(f"{path} is not a usable ProbSAM or Prob U-Net weights file: "
                           f"{errors.message(error)}") from None
