"""Baselines for evaluate.py, with the learners' sampling interface and the same box prompt.

- ``ThresholdBaseline``: HU threshold at -400 (the lung / soft-tissue boundary) inside the box, then the
  connected component at the box centre, or the largest component in the box when the centre pixel is
  below the threshold. Images arrive windowed to [0, 1], so the threshold is the value the window maps
  -400 HU to: (-400 - (c - w/2)) / w = 0.633 for the lung window (c, w) = (-600, 1500). For data stored
  in [0, 1] (the LIDC pickle) the window that produced it must be stated (evaluate.py --unit-window).
  Deterministic: its N "samples" are N copies of one mask.
- ``PriorMeanBaseline``: a trained model's deterministic prediction z = prior mean (no sampling), N
  copies. What a user gets from the model without its uncertainty.
The third baseline, the Prob U-Net, is a trained learner (Training/learning/prob_unet.py) loaded like ProbSAM.
"""
from __future__ import annotations

from typing import Optional, Tuple

import numpy as np
import torch

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

    @torch.no_grad()
    def sample_probabilities(self, images, boxes, n_samples: int, generator=None, embeddings=None,
                             noise: Optional[torch.Tensor] = None, mode: str = "sample") -> torch.Tensor:
        one = self.learner.sample_probabilities(images, boxes, 1, embeddings=embeddings, mode="mean")
        return one.expand(-1, n_samples, -1, -1)
