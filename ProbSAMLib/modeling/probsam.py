"""Probabilistic SAM: SAM's encoder, prompt encoder and mask decoder plus a latent space over masks.

    image -> encoder -> embedding ─┬─> prior net P(z|x,box) ───────────┐ (inference)
                                   ├─> posterior net Q(z|x,box,y) ─────┤ (training)
    box -> prompt encoder -> box tokens + proj(z) ──> mask decoder <───┘ -> one mask per z
                                                          └─> [refiner + image] (config.refine_channels)

`encode` runs the encoder once; `decode` turns N latents per image into N masks in one decoder pass.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
from segment_anything.modeling import Sam
from torch.distributions import Independent

from ProbSAMLib.modeling import preprocess
from ProbSAMLib.modeling.config import ProbSAMConfig
from ProbSAMLib.modeling.decoding import box_crop, decode_masks
from ProbSAMLib.modeling.latent import GaussianLatentNet, LatentProjection, box_coverage, fold_mask, latents_from_noise
from ProbSAMLib.modeling.marking import MarkingHead
from ProbSAMLib.modeling.refine import MaskRefiner


@dataclass
class TrainingOutput:
    """logits (B, N, S, S) (S = config.mask_size), and the two distributions over z (batch shape B)."""

    logits: torch.Tensor
    prior: Independent
    posterior: Independent


class ProbSAM(nn.Module):
    def __init__(self, sam: Sam, config: ProbSAMConfig):
        super().__init__()
        self.config = config
        self.sam = sam
        dim, grid = config.prompt_dim, config.embedding_size
        mask_channels = (config.low_res_size // grid) ** 2
        self.prior = GaussianLatentNet(dim, config.latent_hidden, config.latent_dim)
        self.posterior = GaussianLatentNet(dim, config.latent_hidden, config.latent_dim, mask_channels)
        self.latent_projection = LatentProjection(config.latent_dim, dim, config.latent_to_dense,
                                                  bound=config.shift_bound)
        self.refiner = MaskRefiner(config.refine_channels) if config.refine_channels else None
        self.marking = MarkingHead(dim) if config.marking_head else None
        if config.freeze_encoder:
            self.sam.image_encoder.requires_grad_(False)
        if config.frozen_backbone:
            self.sam.requires_grad_(False)

    def train(self, mode: bool = True) -> "ProbSAM":
        """As nn.Module.train, but a frozen backbone stays in eval mode: its batch norms (TinyViT) and
        dropouts must compute what the pretrained model computes, in training too."""
        super().train(mode)
        if self.config.frozen_backbone:
            self.sam.eval()
        return self
    def attach_refiner(self, channels: int) -> None:
        """Give a model without one a fresh refiner (a zero residual: the masks do not change until trained)."""
        if self.refiner is not None:
            raise ValueError(f"this model already has a refiner ({self.config.refine_channels} channels)")
        self.refiner = MaskRefiner(channels).to(self.device)
        self.config.refine_channels = int(channels)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @torch.no_grad()
    def read_neighbour_slices(self) -> None:
        """Let the encoder read the slices below and above (config.neighbour_slices) without changing what
        it computes: the patch embedding's weights for the three copies of the slice move onto the middle
        channel (rescaled for SAM's per-channel normalisation, the bias absorbing the mean), and the weights
        of the neighbours start at zero, to be learnt. Exact wherever the input is not padding."""
        if self.config.neighbour_slices:
            return
        conv = self.sam.image_encoder.patch_embed.proj
        mean, std = self.sam.pixel_mean.view(3).float(), self.sam.pixel_std.view(3).float()
        weight = conv.weight.float()  # (D, 3, p, p), read on (x - mean_c) / std_c
        centre = (weight / std.view(1, 3, 1, 1)).sum(1) * std[1]  # (D, p, p), read on (x - mean_1) / std_1
        shift = (mean[1] / std[1]) * centre.sum((1, 2)) - (weight.sum((2, 3)) * (mean / std)).sum(1)
        conv.weight.zero_()
        conv.weight[:, 1] = centre.to(conv.weight.dtype)
        conv.bias += shift.to(conv.bias.dtype)
        self.config.neighbour_slices = True

    # ---- image side -------------------------------------------------------------------------------
    def model_input(self, images01: torch.Tensor) -> torch.Tensor:
        """(B, H, W) grey slices or (B, 3, H, W) slices k - 1, k, k + 1 in [0, 1] -> (B, 3, S, S) normalised,
        padded encoder input: the three slices as channels when the model reads neighbours
        (config.neighbour_slices), else slice k in all three (a lone slice is copied either way)."""
        read = preprocess.neighbour_stack if self.config.neighbour_slices else preprocess.centre_slice
        return preprocess.images_to_model_input(
            read(images01), self.config.img_size, self.sam.pixel_mean, self.sam.pixel_std
        )

    def encode(self, images01: torch.Tensor) -> torch.Tensor:
        """(B, H, W) grey slices, or (B, 3, H, W) with the slices below and above, in [0, 1] ->
        (B, C, h, w) image embeddings (runs the ViT once)."""
        pixels = self.model_input(images01.to(self.device))
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.config.freeze_encoder):
            return self.sam.image_encoder(pixels)

    # ---- prompt side ------------------------------------------------------------------------------
    def _box_tokens(self, boxes: torch.Tensor):
        """(B, 4) boxes with continuous edges in the model frame -> SAM sparse (B, 2, C), dense (B, C, h, w).

        SAM's prompt encoder reads box corners as pixel indices and adds 0.5; our boxes are continuous
        edges, so the far corner's last pixel index is x2 - 1.
        """
        sam_boxes = boxes - boxes.new_tensor([0.0, 0.0, 1.0, 1.0])
        return self.sam.prompt_encoder(points=None, boxes=sam_boxes, masks=None)

    def marking_logit(self, embeddings: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        """(B,) log-odds of the share of readers marking the object in each box (model frame); the model
        must have a marking head (config.marking_head)."""
        if self.marking is None:
            raise ValueError("this model has no marking head (config.marking_head is false)")
        return self.marking(embeddings, box_coverage(boxes, self.config.embedding_size, self.config.img_size))

    def prior_distribution(self, embeddings: torch.Tensor, boxes: torch.Tensor) -> Independent:
        coverage = box_coverage(boxes, self.config.embedding_size, self.config.img_size)
        return self.prior(embeddings, coverage)

    def posterior_distribution(
        self, embeddings: torch.Tensor, boxes: torch.Tensor, masks_low_res: torch.Tensor
    ) -> Independent:
        """masks_low_res: (B, S, S) target on the decoder grid (see preprocess.masks_to_low_res)."""
        coverage = box_coverage(boxes, self.config.embedding_size, self.config.img_size)
        folded = fold_mask(masks_low_res, self.config.embedding_size)
        return self.posterior(embeddings, coverage, folded)

    def _prompts(self, boxes: torch.Tensor, z: Optional[torch.Tensor] = None):
        """The decoder's prompts: sparse (B, N, 2, C) and dense (B, 1 or N, C, h, w).

        boxes: (B, 4), one box per image, or (B, N, 4), one box per sample (box propagation, box jitter), in the
        model frame. z: (B, N, L) latents, projected onto the box tokens (and the dense embedding with
        config.latent_to_dense); None: the prompts as SAM makes them, N = 1 (or one per box).
        """
        sparse, dense = self._box_tokens(boxes.reshape(-1, 4))
        if boxes.ndim == 3:
            sparse = sparse.unflatten(0, boxes.shape[:2])
            dense = dense.unflatten(0, boxes.shape[:2])[:, :1]  # the "no mask" embedding: the same for every box
        else:
            sparse, dense = sparse.unsqueeze(1), dense.unsqueeze(1)
        if z is None:
            return sparse, dense
        token_shift, dense_shift = self.latent_projection(z.to(sparse.dtype))
        return sparse + token_shift, dense if dense_shift is None else dense + dense_shift

    def decode(self, embeddings: torch.Tensor, boxes: torch.Tensor, z: torch.Tensor,
               images01: Optional[torch.Tensor] = None, crop_around: Optional[torch.Tensor] = None,
               fast: Optional[bool] = None) -> torch.Tensor:
        """N masks per image in one decoder pass.

        Arguments:
          embeddings: (B, C, h, w); boxes: (B, 4), or (B, N, 4) one per sample, in the model frame; z: (B, N, L).
          images01: (B, H, W) or (B, 3, H, W) the encoded images in [0, 1]; needed only by a model with a
            refiner, which reads the segmented slice itself.
          crop_around: (..., 4) boxes in the model frame: compute only the logits around them
            (decoding.box_crop: their union plus 2 embedding cells); elsewhere the logits are -1e4
            (probability 0). For callers that keep only a box (the volume sampler); ignored for a model
            with a refiner, which reads every logit. None: every logit.
          fast: decoding.decode_masks's switch (None: the fast path unless gradients are on).
        Returns:
          (B, N, S, S) logits on the padded square, S = config.mask_size (4h, or img_size with a refiner).
        """
        logits = self._decode_prompts(embeddings, *self._prompts(boxes, z), crop_around, fast)
        if self.refiner is None:
            return logits
        if images01 is None:
            raise ValueError("this model refines its masks with the image (config.refine_channels > 0): "
                             "pass the encoded images to decode(..., images01=)")
        frame = preprocess.images_to_model_frame(preprocess.centre_slice(images01).to(logits.device),
                                                 self.config.img_size)  # the refiner reads slice k alone
        return self.refiner(logits, frame)

    def decode_backbone(self, embeddings: torch.Tensor, boxes: torch.Tensor,
                        crop_around: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(B, 1, S, S), or (B, N, S, S) for boxes (B, N, 4): the backbone's own logits for each box, the prompt
        tokens as SAM makes them, no latent shift (what an untrained model decodes for every z), no refiner.
        crop_around: as in decode."""
        return self._decode_prompts(embeddings, *self._prompts(boxes), crop_around)

    def _decode_prompts(self, embeddings, sparse, dense, crop_around=None, fast=None) -> torch.Tensor:
        """SAM's mask decoder on the prompts, computed only around `crop_around` (model frame) if given."""
        crop = None
        if crop_around is not None and self.refiner is None:
            grid = self.config.embedding_size
            crop = box_crop(crop_around, (grid, grid), self.config.img_size, margin=2)
        return decode_masks(self.sam.mask_decoder, embeddings, self.sam.prompt_encoder.get_dense_pe(), sparse, dense,
                            crop=crop, outside=None if crop is None else -1e4, fast=fast)

    def forward(
        self, embeddings: torch.Tensor, boxes: torch.Tensor, masks_low_res: torch.Tensor, n_samples: int = 1,
        images01: Optional[torch.Tensor] = None,
    ) -> TrainingOutput:
        """Training pass: z from the posterior (reparameterised), decoded; both distributions returned.
        images01 (B, H, W): the encoded images, for a model with a refiner."""
        prior = self.prior_distribution(embeddings, boxes)
        posterior = self.posterior_distribution(embeddings, boxes, masks_low_res)
        z = posterior.rsample((n_samples,)).transpose(0, 1)  # (B, N, L)
        return TrainingOutput(self.decode(embeddings, boxes, z, images01), prior, posterior)

    def latents(
        self,
        embeddings: torch.Tensor,
        boxes: torch.Tensor,
        n_samples: int,
        generator: Optional[torch.Generator] = None,
        mode: str = "sample",
        noise: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """z from the prior, (B, N, L). mode="sample" draws; mode="mean" repeats the prior mean.

        The standard-normal noise is drawn on the CPU from `generator`, so a seed gives the same z on
        every device; or it is given as `noise` (B, N, L), e.g. drawn per slice by an evaluation.
        """
        prior = self.prior_distribution(embeddings, boxes)
        mu, sigma = prior.base_dist.loc, prior.base_dist.scale  # (B, L)
        if mode == "mean":
            return mu.unsqueeze(1).expand(-1, n_samples, -1)
        if mode != "sample":
            raise ValueError(f"mode must be 'sample' or 'mean', got {mode!r}")
        shape = (mu.shape[0], n_samples, mu.shape[1])
        if noise is None:
            noise = torch.randn(shape, generator=generator)
        elif tuple(noise.shape) != shape:
            raise ValueError(f"noise must have shape {shape}, got {tuple(noise.shape)}")
        return latents_from_noise(mu, sigma, noise)
