"""Generic checks a Training or research script runs before it creates anything: option ranges, input files
and folders, the output folder (evaluate.py's --out, train.py's out= and its --resume checkpoint).

The errors are ProbSAMLib.errors classes, so each script's main(), run by ProbSAMLib.errors.run_main (train.py:
install_script_handler), ends with one ``<script>: error: ...`` line and an exit status by type (2 bad input,
1 run-time failure, 130 Ctrl-C, 143 SIGTERM). Loading a weights file is Training.learning.learners.load_weights,
a data set split Training.data.dataset_format.load_split.
"""
from __future__ import annotations

import shutil
import sys
from pathlib import Path
from typing import Iterable, Sequence

from ProbSAMLib import errors
from ProbSAMLib.errors import InputError, OutputRefusedError, SettingsError
from ProbSAMLib.io.outputdir import OutputFolder


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


def say(text: str) -> None:
    print(text, file=sys.stderr)
