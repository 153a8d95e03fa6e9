"""Baselines for evaluate.py, with the learners' sampling interface and the same box prompt.

- ``ThresholdBaseline``: HU threshold at -400 (the lung / soft-tissue boundary) inside the box, then the
  connected component at the box centre, or the largest component in the box when the centre pixel is
  below the threshold. Images arrive windowed to [0, 1], so the threshold is the value the window maps
  -400 HU to: (-400 - (c - w/2)) / w = 0.633 for the lung window (c, w) = (-600, 1500). For data stored
  in [0, 1] (the LIDC pickle) the window that produced it must be stated (evaluate.py --unit-window).
  Deterministic: its N "samples" are N copies of one mask.
- ``PriorMeanBaseline``: a trained model's deterministic prediction z = prior mean (no sampling), N
  copies. What a user gets from the model without its uncertainty.
- ``BackboneBaseline``: the frozen backbone alone (LiteMedSAM's own box prediction), N copies: what the
  ProbSAM heads start from and must not drift away from.
- ``BoxJitterBaseline``: the cheap alternative a user would try for "many plausible masks": the backbone's
  prediction for N jittered boxes. Each of the four edges moves by ``scale`` x the box side x a standard
  normal draw clipped to +-2 (the draw comes from evaluate.py's per-slice noise, 4 numbers a sample, so the
  same seed gives the same boxes).
The Prob U-Net baseline is a trained learner (Training/learning/prob_unet.py) loaded like ProbSAM.
"""
from __future__ import annotations

from typing import Optional, Tuple

import numpy as np
import torch

from ProbSAMLib.inference.sampling import sample_from_embeddings
from ProbSAMLib.modeling import preprocess
from ProbSAMLib.modeling.config import LUNG_WINDOW
from Training.evaluation.threshold import THRESHOLD_HU, threshold_component  # noqa: F401 (re-exported)


def hu_to_unit(hu: float, window: Tuple[float, float] = LUNG_WINDOW) -> float:
    """The [0, 1] value a (centre, width) window maps ``hu`` to."""
    centre, width = window
    return float(np.clip((hu - (centre - width / 2.0)) / width, 0.0, 1.0))


class ThresholdBaseline(torch.nn.Module):
    """-400 HU threshold + connected component at the box centre; see the module docstring."""

    latent_dim = 0

    def __init__(self, window: Tuple[float, float] = LUNG_WINDOW, threshold_hu: float = THRESHOLD_HU):
        super().__init__()
        self.window, self.threshold_hu = tuple(window), float(threshold_hu)
        self.threshold01 = hu_to_unit(threshold_hu, self.window)

    def describe(self) -> str:
        return (f"threshold at {self.threshold_hu:g} HU (= {self.threshold01:.4f} after the window centre "
                f"{self.window[0]:g}, width {self.window[1]:g}) + connected component at the box centre")

    @torch.no_grad()
    def sample_probabilities(self, images, boxes, n_samples: int, generator=None, embeddings=None,
                             noise: Optional[torch.Tensor] = None, mode: str = "sample") -> torch.Tensor:
        images, boxes = images.cpu().numpy(), boxes.cpu().numpy()
        masks = np.stack([threshold_component(i, b, self.threshold01) for i, b in zip(images, boxes)])
        probs = torch.from_numpy(masks.astype(np.float32))[:, None]
        return probs.expand(-1, n_samples, -1, -1)


class PriorMeanBaseline(torch.nn.Module):
    """A learner's deterministic prior-mean prediction (z = mu), repeated N times."""

    def __init__(self, learner: torch.nn.Module):
        super().__init__()
        self.learner = learner
        self.latent_dim = learner.latent_dim
        self.reads_neighbours = getattr(learner, "reads_neighbours", False)
        self.window = getattr(learner, "window", None)

    @torch.no_grad()
    def sample_probabilities(self, images, boxes, n_samples: int, generator=None, embeddings=None,
                             noise: Optional[torch.Tensor] = None, mode: str = "sample") -> torch.Tensor:
        one = self.learner.sample_probabilities(images, boxes, 1, embeddings=embeddings, mode="mean")
        return one.expand(-1, n_samples, -1, -1)


class BackboneBaseline(torch.nn.Module):
    """The backbone's own prediction (an untrained ProbSAM: its latent projection is zero), N copies."""

    latent_dim = 0

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.window = model.config.window

    @torch.no_grad()
    def sample_probabilities(self, images, boxes, n_samples: int, generator=None, embeddings=None,
                             noise: Optional[torch.Tensor] = None, mode: str = "sample") -> torch.Tensor:
        if embeddings is None:
            embeddings = self.model.encode(images.to(self.model.device))
        one, _ = sample_from_embeddings(self.model, embeddings, boxes, images.shape[-2:], 1, mode="mean")
        return one.expand(-1, n_samples, -1, -1)


class BoxJitterBaseline(torch.nn.Module):
    """The backbone's prediction for N jittered boxes (see the module docstring)."""

    latent_dim = 4  # one standard-normal draw per box edge

    def __init__(self, model, scale: float):
        super().__init__()
        self.model, self.scale = model, float(scale)
        self.window = model.config.window

    def jittered(self, box: torch.Tensor, noise: torch.Tensor, image_hw) -> torch.Tensor:
        """(4,) box, (N, 4) noise -> (N, 4) boxes inside the image, each at least 2 pixels wide."""
        side = torch.stack([box[2] - box[0], box[3] - box[1]] * 2)
        boxes = box[None] + self.scale * side[None] * noise.clamp(-2.0, 2.0)
        h, w = image_hw
        limit = torch.tensor([w, h, w, h], dtype=boxes.dtype)
        boxes = torch.minimum(boxes.clamp(min=0), limit)
        boxes[:, 2:] = torch.maximum(boxes[:, 2:], boxes[:, :2] + 2.0)
        return boxes

    @torch.no_grad()
    def sample_probabilities(self, images, boxes, n_samples: int, generator=None, embeddings=None,
                             noise: Optional[torch.Tensor] = None, mode: str = "sample") -> torch.Tensor:
        model, config = self.model, self.model.config
        if embeddings is None:
            embeddings = model.encode(images.to(model.device))
        if noise is None:
            noise = torch.randn((len(boxes), n_samples, 4), generator=generator)
        image_hw = tuple(images.shape[-2:])
        out = []
        for b in range(len(boxes)):
            jittered = self.jittered(boxes[b].float().cpu(), noise[b, :n_samples, :4].float(), image_hw)
            framed = preprocess.boxes_to_model_frame(jittered.to(embeddings.device), image_hw, config.img_size)
            # one prompt per jittered box, no latent shift (the model is the backbone alone); decoded only
            # around the jittered boxes (exact there, probability 0 far away)
            logits = model.decode_backbone(embeddings[b:b + 1].float(), framed[None], crop_around=framed)
            out.append(torch.sigmoid(preprocess.logits_to_image(logits.float(), image_hw, config.img_size)))
        return torch.cat(out)
