"""One experiment = one YAML file (Training/configs/*.yaml) + command-line overrides ``key=value``.

Every field has a default here, so a config file lists only what differs; the resolved config is
written next to the checkpoints and logged, so a run can always be repeated.
"""
from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import yaml

from ProbSAMLib.errors import SettingsError
from Training.learning.loss import CONSENSUS_VOTERS, LOSS_RESOLUTIONS, SET_VOTERS


@dataclass
class TrainConfig:
    # --- data
    data: str = "data/phantom"  # a data set written by Training/data/make_phantom.py or prepare_lidc.py
    out: str = "runs/probsam_tiny"
    box_margin: float = 2.0  # pixels around the readers' union box (train and eval)
    box_jitter: float = 0.1  # training only: each edge moves by up to this fraction of the side...
    box_jitter_max_px: float = 5.0  # ...and at most this many pixels
    flip: bool = False  # random left-right / up-down flips (with the cache: all 4 flip variants are cached)
    # --- model
    model: str = "probsam"  # "probsam" or "prob_unet" (the baseline)
    preset: str = "tiny"  # ProbSAM preset: tiny, vit_b, vit_l, vit_h
    sam_checkpoint: Optional[str] = None  # official SAM .pth for vit_*; None = random (tiny)
    init: Optional[str] = None  # start from these ProbSAM weights (safetensors)
    freeze_encoder: bool = True
    train_latent_only: bool = False  # train only the prior and posterior nets (needs init, freeze_encoder)
    train_refiner_only: bool = False  # train only the mask refiner (needs init; everything it refines stays fixed)
    cache: bool = True  # frozen-encoder embedding cache (fp16 memmap); --no-cache / cache=false
    latent_dim: int = 6
    latent_to_dense: bool = False
    refine_channels: int = 0  # ProbSAM: a mask refiner this wide at the input resolution (0 = none; with
    # init=, a model without one gets a fresh refiner that starts as a no-op)
    neighbour_slices: bool = False  # ProbSAM: the encoder reads slices k - 1, k, k + 1 (the data set's neighbours.npy);
    # with init=, a one-slice model is converted exactly (ProbSAM.read_neighbour_slices) and learns the neighbours
    train_neighbours_only: bool = False  # with neighbour_slices and init=: only the encoder's weights for slices
    # k - 1 and k + 1 (and a mask refiner) learn; every weight that reads slice k stays exactly as init has it
    refine_neighbours: bool = False  # ProbSAM: the mask refiner reads slices k - 1, k, k + 1 (neighbours.npy); with
    # init=, its weights for the neighbours start at zero (MaskRefiner.read_neighbour_slices); the encoder is unchanged
    refine_lr_scale: float = 1.0  # the refiner's learning rate as a multiple of lr (a fresh one beside trained weights)
    unet_channels: List[int] = field(default_factory=lambda: [32, 64, 128, 192])  # Prob U-Net only
    # --- loss
    beta: float = 1.0
    dice_weight: float = 10.0
    anneal_steps: int = 500
    free_bits: float = 0.0
    set_weight: float = 0.0  # set term on K prior samples vs all readers (ProbSAM; 0 = off)
    set_samples: int = 4  # K prior samples a slice for the set, consensus and empty-share terms
    set_kind: str = "energy"  # "energy" (energy distance) or "ot" (optimal transport), d = 1 - soft IoU
    consensus_weight: float = 0.0  # the K samples' mean prediction vs the readers' majority (ProbSAM; 0 = off)
    consensus_margin: float = 0.1  # hinge margin around 0.5 of the consensus term
    consensus_voters: str = "slots"  # majority of all 4 slots ("slots"), of the nodule's readers ("readers"), of
    # all 4 slots on nodules at least two readers annotated ("multi"), or what at least two readers drew ("two")
    set_voters: str = "slots"  # set term against all 4 slots ("slots") or the nodule's readers' masks ("readers")
    set_above_half: bool = False  # set term on relu(2p - 1): what a sample shows at 0.5, as GED sees it; the
    # probability below 0.5 is left to the consensus term (which averages probabilities, not cut samples)
    empty_weight: float = 0.0  # share of empty prior samples vs the readers' share (ProbSAM; 0 = off)
    empty_margin: float = 1.0  # hinge margin (logits) of the empty-share term
    loss_resolution: str = "decoder"  # ProbSAM: score logits on the decoder grid or upsampled to the "image"
    anchor_weight: float = 0.0  # ProbSAM: keep the K prior samples on anchored slices where a reference model's are
    # (Training/learning/anchor.py; 0 = off)
    anchor: Optional[str] = None  # the reference model's weights (safetensors); None = init
    anchor_min_readers: int = 3  # anchored slices: every reader of the nodule marked them, and at least this many
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


def _parse_value(text: str) -> Any:
    """YAML typing for overrides: 3 -> int, 1e-3 -> float, false -> bool, [1, 2] -> list."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise SettingsError(f"cannot read the value {text!r}: {' '.join(str(error).split())}") from None
    if isinstance(value, str):  # YAML reads "1e-3" as a string; accept it as the float it means
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _apply(config: TrainConfig, values: Dict[str, Any], source: str) -> None:
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    for key, value in values.items():
        if key not in fields:
            close = [name for name in fields if name.startswith(key[:3])]
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise SettingsError(f"{source}: unknown setting {key!r}{hint}")
        default = getattr(config, key)
        if isinstance(default, bool) and not isinstance(value, bool):
            raise SettingsError(f"{source}: {key} must be true or false, got {value!r}")
        if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        setattr(config, key, value)


def load_config(path: Optional[str] = None, overrides: Sequence[str] = ()) -> TrainConfig:
    """Defaults, then the YAML file, then ``key=value`` overrides (later wins); checked by ``validate``."""
    config = TrainConfig()
    if path:
        if not Path(path).is_file():
            raise SettingsError(f"config file {path} not found")
        try:
            data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        except (yaml.YAMLError, UnicodeDecodeError) as error:
            raise SettingsError(f"{path} is not valid YAML: {' '.join(str(error).split())}") from None
        if not isinstance(data, dict):
            raise SettingsError(f"{path}: expected a mapping of settings, got {type(data).__name__}")
        _apply(config, data, str(path))
    for item in overrides:
        if "=" not in item:
            raise SettingsError(f"override {item!r} is not key=value")
        key, text = item.split("=", 1)
        _apply(config, {key.strip().replace("-", "_"): _parse_value(text)}, "command line")
    validate(config)
    return config


# --- validation: every setting's type and range, before a script creates anything ---------------------
MODELS = ("probsam", "prob_unet")
PRESETS = ("tiny", "vit_b", "vit_l", "vit_h")


def _at_least(low):
    return lambda v: v >= low, f"at least {low}"


def _positive():
    return lambda v: v > 0, "greater than 0"


_RANGES = {
    "box_margin": _at_least(0), "box_jitter": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "box_jitter_max_px": _at_least(0), "latent_dim": _at_least(1), "beta": _at_least(0),
    "dice_weight": _at_least(0), "anneal_steps": _at_least(0), "free_bits": _at_least(0),
    "batch_size": _at_least(1), "max_steps": _at_least(1), "lr_decay_steps": _at_least(0), "lr": _positive(),
    "min_lr": _at_least(0), "warmup_steps": _at_least(0), "weight_decay": _at_least(0),
    "grad_clip": _at_least(0), "seed": (lambda v: 0 <= v < 2 ** 63, "in [0, 2**63)"),
    "eval_interval": _at_least(1), "eval_slices": _at_least(1), "eval_samples": _at_least(1),
    "log_interval": _at_least(1), "num_threads": _at_least(0), "refine_channels": _at_least(0),
    "refine_lr_scale": _positive(),
    "set_weight": _at_least(0), "set_samples": _at_least(1), "consensus_weight": _at_least(0),
    "consensus_margin": (lambda v: 0 <= v < 0.5, "in [0, 0.5)"), "empty_weight": _at_least(0),
    "empty_margin": _at_least(0), "anchor_weight": _at_least(0), "anchor_min_readers": _at_least(1),
    "consensus_voters": (lambda v: v in CONSENSUS_VOTERS, f"one of {', '.join(CONSENSUS_VOTERS)}"),
    "set_voters": (lambda v: v in SET_VOTERS, f"one of {', '.join(SET_VOTERS)}"),
    "loss_resolution": (lambda v: v in LOSS_RESOLUTIONS, f"one of {', '.join(LOSS_RESOLUTIONS)}"),
    "model": (lambda v: v in MODELS, f"one of {', '.join(MODELS)}"),
    "preset": (lambda v: v in PRESETS, f"one of {', '.join(PRESETS)}"),
    "data": (lambda v: v != "", "a folder"), "out": (lambda v: v != "", "a folder"),
    "unet_channels": (lambda v: len(v) >= 2 and all(c >= 1 for c in v), "a list of 2+ positive whole numbers"),
}
_TYPE_NAMES = {int: "a whole number", float: "a number", bool: "true or false", str: "text"}


def _type_ok(value, kind) -> bool:
    if kind is bool:
        return isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    return isinstance(value, kind)


def validate(config: TrainConfig) -> None:
    """Raise SettingsError for the first setting of the wrong type or out of range (names it and its value)."""
    hints = typing.get_type_hints(TrainConfig)
    for item in dataclasses.fields(TrainConfig):
        value, kind = getattr(config, item.name), hints[item.name]
        optional = type(None) in typing.get_args(kind)
        if optional and value is None:
            continue
        base = next(a for a in typing.get_args(kind) if a is not type(None)) if optional else kind
        if typing.get_origin(base) in (list, List):
            ok = isinstance(value, list) and all(_type_ok(v, int) for v in value)
            expected = "a list of whole numbers"
        else:
            ok, expected = _type_ok(value, base), _TYPE_NAMES.get(base, base.__name__)
        if not ok:
            raise SettingsError(f"setting {item.name} must be {expected}, got {value!r}")
        rule = _RANGES.get(item.name)
        if rule is not None and not rule[0](value):
            raise SettingsError(f"setting {item.name} must be {rule[1]}, got {value!r}")
    if config.train_latent_only and (config.model != "probsam" or not config.init or not config.freeze_encoder):
        raise SettingsError("setting train_latent_only needs model=probsam, init= (the weights whose decoder "
                            "stays fixed) and freeze_encoder=true")
    if config.train_refiner_only and (config.model != "probsam" or not config.init or config.train_latent_only):
        raise SettingsError("setting train_refiner_only needs model=probsam and init= (the weights whose samples the "
                            "refiner corrects), and excludes train_latent_only")
    if config.neighbour_slices and (config.model != "probsam" or (config.init and (
            config.freeze_encoder or config.train_latent_only or config.train_refiner_only))):
        raise SettingsError("setting neighbour_slices needs model=probsam, and with init= a trainable encoder "
                            "(freeze_encoder=false, not train_latent_only or train_refiner_only): the weights that "
                            "read the neighbouring slices start at zero and must learn")
    if config.train_neighbours_only and not (config.model == "probsam" and config.init and config.neighbour_slices
                                             and not config.train_latent_only and not config.train_refiner_only):
        raise SettingsError("setting train_neighbours_only needs model=probsam, init= (the one-slice weights that "
                            "stay fixed) and neighbour_slices=true (with freeze_encoder=false), and excludes "
                            "train_latent_only and train_refiner_only")
    if config.refine_neighbours and (config.model != "probsam" or config.train_latent_only or (
            not config.init and not config.refine_channels)):
        raise SettingsError("setting refine_neighbours needs model=probsam with a mask refiner (refine_channels > 0, "
                            "or init= weights that have one) that trains (not train_latent_only): the refiner's "
                            "weights for the neighbouring slices start at zero and must learn")
    if config.anchor_weight > 0 and (config.model != "probsam" or not (config.anchor or config.init)
                                     or config.train_latent_only):
        raise SettingsError("setting anchor_weight needs model=probsam and a reference model (anchor= or init= "
                            "weights), and excludes train_latent_only (the decoder must be free to drift)")
    if config.anchor and config.anchor_weight == 0:
        raise SettingsError("setting anchor= names a reference model but anchor_weight is 0, so it would be "
                            "ignored; give anchor_weight > 0 or drop anchor=")
    if config.min_lr > config.lr:
        raise SettingsError(f"setting min_lr ({config.min_lr}) must not exceed lr ({config.lr})")
    if config.device.lower() not in ("auto", "cpu", "mps") and not config.device.lower().startswith("cuda"):
        raise SettingsError(f"setting device must be auto, cpu, cuda, cuda:N or mps, got {config.device!r}")
