"""Image and box preprocessing: HU -> window -> SAM's input frame, and logits back to the crop.

SAM expects an RGB image in 0..255, resized so its longest side equals the encoder's input size,
normalised with SAM's pixel mean/std and padded bottom-right to a square (Sam.preprocess does the last
two steps). Boxes go through the same resize; logits come back through the inverse.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F


def window_ct(hu: np.ndarray | torch.Tensor, window: Optional[Tuple[float, float]]):
    """Map CT intensities in HU to [0, 1] with a (centre, width) window; None = already in [0, 1]."""
    if window is None:
        return hu.clip(0.0, 1.0) if isinstance(hu, np.ndarray) else hu.clamp(0.0, 1.0)
    centre, width = window
    scaled = (hu - (centre - width / 2.0)) / width
    return scaled.clip(0.0, 1.0) if isinstance(hu, np.ndarray) else scaled.clamp(0.0, 1.0)


def resized_shape(height: int, width: int, target: int) -> Tuple[int, int]:
    """Shape after resizing so that the longest side equals `target` (SAM's ResizeLongestSide)."""
    scale = target / max(height, width)
    return int(round(height * scale)), int(round(width * scale))


def centre_slice(images01: torch.Tensor) -> torch.Tensor:
    """(B, H, W) slices, or (B, 3, H, W) slices k - 1, k, k + 1 (see ProbSAMConfig.neighbour_slices) ->
    (B, H, W) the slices k themselves."""
    if images01.ndim == 4 and images01.shape[1] == 3:
        return images01[:, 1]
    if images01.ndim != 3:
        raise ValueError(f"expected images shaped (B, H, W), or (B, 3, H, W) with the slices below and above, "
                         f"got {tuple(images01.shape)}")
    return images01


def neighbour_stack(images01: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) slices k - 1, k, k + 1 (checked), or (B, H, W) lone slices -> (B, 3, H, W), each lone
    slice copied, as at the ends of a scan: what a part of the model that reads neighbours is shown."""
    if images01.ndim == 3:
        return images01.unsqueeze(1).expand(-1, 3, -1, -1)
    if images01.ndim != 4 or images01.shape[1] != 3:
        raise ValueError(f"expected the slices below, at and above: (B, 3, H, W), got {tuple(images01.shape)}")
    return images01


def _resized_to_longest_side(images01: torch.Tensor, img_size: int) -> torch.Tensor:
    """(B, H, W) -> (B, 1, h, w), or (B, C, H, W) -> (B, C, h, w), with max(h, w) = img_size (antialiased
    bilinear; unchanged if already so)."""
    if images01.ndim not in (3, 4):
        raise ValueError(f"expected images shaped (B, H, W) or (B, C, H, W), got {tuple(images01.shape)}")
    new_hw = resized_shape(images01.shape[-2], images01.shape[-1], img_size)
    x = (images01.unsqueeze(1) if images01.ndim == 3 else images01).float()
    if new_hw != tuple(images01.shape[-2:]):
        x = F.interpolate(x, new_hw, mode="bilinear", align_corners=False, antialias=True)
    return x


def _pad_to_square(x: torch.Tensor, img_size: int) -> torch.Tensor:
    return F.pad(x, (0, img_size - x.shape[-1], 0, img_size - x.shape[-2]))


def images_to_model_input(
    images01: torch.Tensor, img_size: int, pixel_mean: torch.Tensor, pixel_std: torch.Tensor
) -> torch.Tensor:
    """Grey images in [0, 1] -> SAM's normalised, padded encoder input.

    Arguments:
      images01: (B, H, W) float in [0, 1], each grey slice copied to SAM's three colour channels, or
        (B, 3, H, W) three slices (k - 1, k, k + 1) as the three channels.
      pixel_mean, pixel_std: SAM's (3, 1, 1) buffers in 0..255 units.

    Returns:
      (B, 3, img_size, img_size) float tensor (padding after normalisation, as Sam.preprocess).
    """
    x = _resized_to_longest_side(images01.float() * 255.0, img_size)
    x = (x.expand(-1, 3, -1, -1) - pixel_mean) / pixel_std
    return _pad_to_square(x, img_size)


def images_to_model_frame(images01: torch.Tensor, img_size: int) -> torch.Tensor:
    """(B, H, W) grey images in [0, 1] -> (B, 1, img_size, img_size), or (B, C, H, W) -> (B, C, img_size,
    img_size), in [0, 1], resized and padded with 0 as the encoder's input is: the image(s) the mask
    refiner (refine.py) reads beside the logits."""
    return _pad_to_square(_resized_to_longest_side(images01, img_size), img_size)


def boxes_to_model_frame(boxes: torch.Tensor, image_hw: Sequence[int], img_size: int) -> torch.Tensor:
    """(..., 4) boxes (x1, y1, x2, y2) in image pixels -> the encoder's input frame."""
    h, w = image_hw
    new_h, new_w = resized_shape(h, w, img_size)
    scale = torch.tensor([new_w / w, new_h / h, new_w / w, new_h / h], dtype=boxes.dtype,
                         device=boxes.device)
    return boxes * scale


def logits_to_image(logits: torch.Tensor, image_hw: Sequence[int], img_size: int) -> torch.Tensor:
    """Decoder logits (..., h, w) on the padded square -> logits on the original (H, W) image.

    Upsample to the padded input, crop the padding away, resize to the image (Sam.postprocess_masks).
    """
    lead = logits.shape[:-2]
    x = logits.reshape(-1, 1, *logits.shape[-2:]).float()
    x = F.interpolate(x, (img_size, img_size), mode="bilinear", align_corners=False)
    new_h, new_w = resized_shape(image_hw[0], image_hw[1], img_size)
    x = x[..., :new_h, :new_w]
    if (new_h, new_w) != tuple(image_hw):
        x = F.interpolate(x, tuple(image_hw), mode="bilinear", align_corners=False)
    return x.reshape(*lead, *image_hw)


def masks_to_low_res(masks: torch.Tensor, image_hw: Sequence[int], img_size: int, low_res: int) -> torch.Tensor:
    """Binary masks (..., H, W) on the image -> soft targets (..., low_res, low_res) on the decoder grid.

    The inverse path of logits_to_image: resize to the model frame, pad, area-downsample. Used for the
    posterior's input and as the training target at the decoder's native resolution.
    """
    lead = masks.shape[:-2]
    x = masks.reshape(-1, 1, *masks.shape[-2:]).float()
    new_h, new_w = resized_shape(image_hw[0], image_hw[1], img_size)
    if (new_h, new_w) != tuple(image_hw):
        x = F.interpolate(x, (new_h, new_w), mode="bilinear", align_corners=False)
    x = F.pad(x, (0, img_size - new_w, 0, img_size - new_h))
    x = F.adaptive_avg_pool2d(x, (low_res, low_res))
    return x.reshape(*lead, low_res, low_res)
