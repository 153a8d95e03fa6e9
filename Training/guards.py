"""Checks every Training script runs before it creates anything, and the one-line error handling of main().

Errors are ProbSAMLib.errors classes (settings, input, weights, device), so each script's main() maps
them to one ``<script>: error: ...`` line and an exit status by type (2 bad input, 1 run-time failure,
130 Ctrl-C, 143 SIGTERM) in one place: :func:`run_main`.
"""
from __future__ import annotations

import shutil
import sys
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

from ProbSAMLib import errors
from ProbSAMLib.errors import InputError, OutputRefusedError, SettingsError, WeightsError
from ProbSAMLib.io.outputdir import OutputFolder


def run_main(prog: str, main: Callable[[], int], nothing_written: bool = True) -> int:
    """Run ``main()``; any error becomes one line and its exit status (PROBSAM_DEBUG=1: the traceback).
    ``nothing_written``: whether an interrupted run may say so (the builders keep resumable work)."""
    errors.tolerant_console()
    try:
        with errors.terminate_as_exception():
            errors.pause_point("startup")
            return main()
    except (Exception, KeyboardInterrupt, errors.Terminated) as error:
        if errors.debugging():
            raise
        return errors.report(prog, error, nothing_written)


def at_least(option: str, value, low) -> None:
    if value is not None and value < low:
        raise SettingsError(f"{option} must be at least {low}, got {value}")


def existing_file(option: str, path) -> Path:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{option} {path}: no such file")
    return path


def existing_folder(option: str, path) -> Path:
    path = Path(path)
    if not path.is_dir():
        raise InputError(f"{option} {path}: no such folder")
    return path


def output_folder(out, force: bool, inputs: Iterable = ()) -> OutputFolder:
    """The writer for an output folder, already checked (refusals happen before any work)."""
    folder = OutputFolder(out, force, inputs=inputs)
    folder.check()
    return folder


def check_run_folder(out, resume: bool, inputs: Sequence = ()) -> bool:
    """train.py's ``out``: new, empty, or (with --resume) a run. Returns whether it exists already."""
    out = Path(out)
    OutputFolder(out, force=True, inputs=inputs, option="out=").check_location()
    if resume:
        if not (out / "ckpt.pt").is_file():
            raise InputError(f"--resume: no checkpoint at {out / 'ckpt.pt'}")
        return True
    if (out / "ckpt.pt").exists():
        raise OutputRefusedError(f"{out} already holds a run (ckpt.pt); pass --resume to continue it or choose "
                                 f"another out=")
    if out.exists() and not _unfinished_run(out):
        raise OutputRefusedError(f"out={out} exists and is neither empty nor a train.py run; choose a new folder "
                                 f"for the run")
    return out.exists()


_RUN_FILES = {"config.yaml", "log.jsonl", "tensorboard", "embedding_cache"}


def _unfinished_run(out: Path) -> bool:
    """Empty, or only what train.py writes before its first checkpoint (a run killed outright): reusable."""
    names = {p.name for p in out.iterdir()}
    return not names or ("config.yaml" in names and names <= _RUN_FILES)


def remove_unfinished_run(out: Path) -> None:
    """A run folder this process created and that holds no checkpoint yet is removed on failure."""
    if out.is_dir() and not (out / "ckpt.pt").exists():
        shutil.rmtree(out, ignore_errors=True)


def load_resume_state(path: Path, device) -> dict:
    """ckpt.pt for --resume, loaded with weights_only=True (a checkpoint never runs code)."""
    import torch

    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except Exception as error:  # UnpicklingError, EOFError, RuntimeError ... for garbage or foreign files
        raise InputError(f"{path} is not a readable training checkpoint (truncated, corrupt or not written by "
                         f"train.py): {errors.message(error)}") from None
    needed = ("learner", "optimiser", "step", "best_ged")
    if not isinstance(state, dict) or any(key not in state for key in needed):
        raise InputError(f"{path} is not a train.py checkpoint (it needs {', '.join(needed)})")
    if not isinstance(state["step"], int) or state["step"] < 0:
        raise InputError(f"{path}: step {state['step']!r} is not a step count")
    return state


def load_weights(path, sam_checkpoint: Optional[str] = None):
    """A trained model file as a learner (Training.learning.learners.load_learner) or WeightsError naming the file."""
    from Training.learning.learners import load_learner

    existing_file("--model", path)
    try:
        return load_learner(Path(path), sam_checkpoint)
    except WeightsError:
        raise
    except Exception as error:  # SafetensorError, KeyError, shape mismatches ... from a foreign file
        raise WeightsError(f"{path} is not a usable ProbSAM or Prob U-Net weights file: "
                           f"{errors.message(error)}") from None


def is_probsam_file(path) -> bool:
    """Whether ``path`` is a ProbSAM weights file (not a Prob U-Net one), or WeightsError naming the file."""
    from ProbSAMLib.weights.checkpoints import FORMAT
    from Training.learning.learners import weights_format

    existing_file("--model", path)
    try:
        return weights_format(path) == FORMAT
    except Exception as error:  # SafetensorError and the like from a foreign or truncated file
        raise WeightsError(f"{path} is not a usable ProbSAM or Prob U-Net weights file: "
                           f"{errors.message(error)}") from None


def load_split(data, split: str):
    """A data set split, with InputError for a missing, foreign or incomplete data set."""
    from Training.data.dataset_format import load_dataset

    if not Path(data, "meta.json").is_file():
        raise InputError(f"{data} is not a data set (no meta.json); build one with Training/data/make_phantom.py "
                         f"or Training/data/prepare_lidc.py")
    dataset = load_dataset(data, split)
    if len(dataset) == 0:
        raise InputError(f"the {split} split of {data} holds no slices")
    return dataset


def say(text: str) -> None:
    print(text, file=sys.stderr)
