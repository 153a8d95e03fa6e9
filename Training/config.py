"""One experiment = one YAML file (Training/configs/*.yaml) + command-line overrides ``key=value``.

Every field has a default here, so a config file lists only what differs; the resolved config is
written next to the checkpoints and logged, so a run can always be repeated.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import yaml


@dataclass
class TrainConfig:
    # --- data
    data: str = "data/phantom"  # a data set written by Training/make_phantom.py or prepare_lidc.py
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
    cache: bool = True  # frozen-encoder embedding cache (fp16 memmap); --no-cache / cache=false
    latent_dim: int = 6
    latent_to_dense: bool = False
    unet_channels: List[int] = field(default_factory=lambda: [32, 64, 128, 192])  # Prob U-Net only
    # --- loss
    beta: float = 1.0
    dice_weight: float = 10.0
    anneal_steps: int = 500
    free_bits: float = 0.0
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
        raise ValueError(f"cannot read the value {text!r}: {error}") from None
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
            raise ValueError(f"{source}: unknown setting {key!r}{hint}")
        default = getattr(config, key)
        if isinstance(default, bool) and not isinstance(value, bool):
            raise ValueError(f"{source}: {key} must be true or false, got {value!r}")
        if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        setattr(config, key, value)


def load_config(path: Optional[str] = None, overrides: Sequence[str] = ()) -> TrainConfig:
    """Defaults, then the YAML file, then ``key=value`` overrides (later wins)."""
    config = TrainConfig()
    if path:
        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
        except yaml.YAMLError as error:
            raise ValueError(f"{path} is not valid YAML: {error}") from None
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a mapping of settings, got {type(data).__name__}")
        _apply(config, data, str(path))
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not key=value")
        key, text = item.split("=", 1)
        _apply(config, {key.strip().replace("-", "_"): _parse_value(text)}, "command line")
    return config
