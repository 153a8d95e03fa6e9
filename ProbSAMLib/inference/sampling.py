"""Sampling N masks for a box: encode once, draw N latents from the prior, decode them in one pass.

This is the 2D entry point every caller shares (the volume sampler calls `sample_from_embeddings` per
chunk of slices). Inputs are numpy or torch; outputs are numpy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch

from ProbSAMLib.inference.device import autocast
from ProbSAMLib.metrics import MASK_THRESHOLD
from ProbSAMLib.modeling import preprocess
from ProbSAMLib.modeling.probsam import ProbSAM


@dataclass
class SampleResult:
    """probabilities (B, N, H, W) float32 in [0, 1]; masks = probabilities > threshold; z (B, N, L);
    marking_share (B,) the share of readers expected to mark each box's object, None for a model without a
    marking head."""

    probabilities: np.ndarray
    masks: np.ndarray
    z: np.ndarray
    marking_share: Optional[np.ndarray] = None


def make_generator(seed: Optional[int]) -> torch.Generator:
    """A CPU generator: seeded -> the same latents on every device; None -> fresh entropy."""
    generator = torch.Generator()
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(int(seed))
    return generator


def images_to_unit(model: ProbSAM, images) -> torch.Tensor:
    """(B, H, W) or (H, W) images in HU (or [0, 1] when the model has no window) -> (B, H, W) in [0, 1];
    (B, 3, H, W), each slice with the slices below and above it, -> (B, 3, H, W) in [0, 1]."""
    x = torch.as_tensor(np.asarray(images, dtype=np.float32) if not torch.is_tensor(images) else images).float()
    if x.ndim == 2:
        x = x[None]
    if x.ndim != 3 and not (x.ndim == 4 and x.shape[1] == 3):
        raise ValueError(f"expected an image (H, W), a batch (B, H, W) or slices with their neighbours "
                         f"(B, 3, H, W), got shape {tuple(x.shape)}")
    if not torch.isfinite(x).all():
        raise ValueError("the image contains NaN or infinite values")
    return preprocess.window_ct(x, model.config.window)


def _check_boxes(boxes, batch: int, image_hw: Sequence[int]) -> torch.Tensor:
    b = torch.as_tensor(np.asarray(boxes, dtype=np.float32)).reshape(-1, 4)
    if b.shape[0] == 1 and batch > 1:
        b = b.expand(batch, 4)
    if b.shape[0] != batch:
        raise ValueError(f"{b.shape[0]} boxes for {batch} images")
    h, w = image_hw
    if ((b[:, 2] <= b[:, 0]) | (b[:, 3] <= b[:, 1])).any():
        raise ValueError(f"boxes must have x2 > x1 and y2 > y1, got {b.tolist()}")
    if ((b[:, 2] <= 0) | (b[:, 3] <= 0) | (b[:, 0] >= w) | (b[:, 1] >= h)).any():
        raise ValueError(f"a box lies entirely outside the {w}x{h} image: {b.tolist()}")
    return b


@torch.no_grad()
def sample_from_embeddings(
    model: ProbSAM,
    embeddings: torch.Tensor,
    boxes: torch.Tensor,
    image_hw: Sequence[int],
    n_samples: int,
    generator: Optional[torch.Generator] = None,
    mode: str = "sample",
    z: Optional[torch.Tensor] = None,
    images01: Optional[torch.Tensor] = None,
    noise: Optional[torch.Tensor] = None,
    crop_to_box: bool = False,
):
    """Probabilities (B, N, H, W) on the image for boxes (B, 4) in image pixels; also the z used.

    Pass `z` (B, N, L) to reuse latents (e.g. one z per sample across the slices of a volume), or `noise`
    (B, N, L) standard-normal draws to use instead of drawing from `generator` (ProbSAM.latents).
    images01 (B, H, W): the images the embeddings came from, in [0, 1]; a model with a refiner needs them.
    crop_to_box: decode only around the boxes (ProbSAM.decode): exact inside each box, probability 0 far
    outside it; for callers that keep only the box.
    """
    boxes_model = preprocess.boxes_to_model_frame(boxes.to(embeddings.device, torch.float32), image_hw,
                                                  model.config.img_size)
    if z is None:
        z = model.latents(embeddings, boxes_model, n_samples, generator, mode, noise)
    with autocast(embeddings.device):
        logits = model.decode(embeddings, boxes_model, z.to(embeddings.device), images01,
                              crop_around=boxes_model if crop_to_box else None)
    probs = torch.sigmoid(preprocess.logits_to_image(logits.float(), image_hw, model.config.img_size))
    return probs, z


@torch.no_grad()
def sample_with_boxes(model: ProbSAM, embeddings: torch.Tensor, roi_box: torch.Tensor, sample_boxes: torch.Tensor,
                      image_hw: Sequence[int], noise: torch.Tensor, images01: Optional[torch.Tensor] = None):
    """One image's N samples, each prompted with its own box (box propagation in 3D); z from the prior of
    the ROI's box, so sample n is the same "reader" whichever box it is shown.

    Arguments:
      embeddings (1, C, h, w); roi_box (1, 4) and sample_boxes (N, 4) in image pixels; a sample whose box
      row is NaN (its outline ended on the previous slice) gets probability 0 without decoding.
      noise (1, N, L) standard-normal draws.
    Returns: probabilities (1, N, H, W) and z (1, N, L).
    """
    config, device = model.config, embeddings.device
    roi_model = preprocess.boxes_to_model_frame(roi_box.to(device, torch.float32), image_hw, config.img_size)
    z = model.latents(embeddings, roi_model, noise.shape[1], noise=noise)  # (1, N, L)
    probs = torch.zeros((1, noise.shape[1]) + tuple(image_hw), device=device)
    live = torch.nonzero(~torch.isnan(sample_boxes[:, 0])).flatten()
    if len(live):
        boxes_model = preprocess.boxes_to_model_frame(sample_boxes[live].to(device, torch.float32), image_hw,
                                                      config.img_size)
        with autocast(device):  # every sample's box lies in the ROI's: decode only around that
            logits = model.decode(embeddings, boxes_model[None], z[:, live], images01, crop_around=roi_model)
        probs[:, live] = torch.sigmoid(preprocess.logits_to_image(logits.float(), image_hw, config.img_size))
    return probs, z


@torch.no_grad()
def marking_shares(model: ProbSAM, embeddings: torch.Tensor, boxes: torch.Tensor, image_hw: Sequence[int]):
    """(B,) the share of readers expected to mark the object in each box (image pixels), or None for a
    model without a marking head."""
    if model.marking is None:
        return None
    boxes_model = preprocess.boxes_to_model_frame(boxes.to(embeddings.device, torch.float32), image_hw,
                                                  model.config.img_size)
    return torch.sigmoid(model.marking_logit(embeddings.float(), boxes_model)).cpu()


@torch.no_grad()
def sample_masks(
    model: ProbSAM,
    images,
    boxes,
    n_samples: int = 16,
    seed: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
    mode: str = "sample",
    threshold: float = MASK_THRESHOLD,
) -> SampleResult:
    """N plausible masks for each (image, box).

    Arguments:
      images: (H, W) or (B, H, W) CT in HU (or [0, 1] if the model's config.window is None); or
        (B, 3, H, W), each slice with the one below and above, for a model that reads neighbouring slices
        (config.neighbour_slices; given one slice alone, such a model sees it copied).
      boxes: (4,) or (B, 4) boxes (x1, y1, x2, y2) in image pixels, continuous edges.
      n_samples: N. seed / generator: make the draw reproducible. mode: "sample" or "mean" (prior mean,
        deterministic: the model's single best guess).
    """
    if n_samples < 1:
        raise ValueError(f"n_samples must be >= 1, got {n_samples}")
    model.eval()
    images01 = images_to_unit(model, images)
    image_hw = tuple(images01.shape[-2:])
    box_tensor = _check_boxes(boxes, images01.shape[0], image_hw)
    if generator is None:
        generator = make_generator(seed)
    with autocast(model.device):
        embeddings = model.encode(images01.to(model.device))
    probs, z = sample_from_embeddings(model, embeddings.float(), box_tensor, image_hw, n_samples, generator, mode,
                                      images01=images01)
    probs = probs.cpu().numpy().astype(np.float32)
    shares = marking_shares(model, embeddings.float(), box_tensor, image_hw)
    return SampleResult(probs, probs > threshold, z.cpu().numpy(),
                        None if shares is None else shares.numpy().astype(np.float32))
