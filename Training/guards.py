"""Generic checks a Training or research script runs before it creates anything: option ranges, input files
and folders, the output folder (evaluate.py's --out, train.py's out= and its --resume checkpoint), a work
folder apart from the output.

The inputs an output may never overlap are taken from the script's own parser: declare every option that
names a file or folder the script reads with ``type=Path`` (ProbSAMLib.io.outputdir.parser_inputs).

The errors are ProbSAMLib.errors classes, so each script's main(), run by ProbSAMLib.errors.run_main (train.py:
install_script_handler), ends with one ``<script>: error: ...`` line and an exit status by type (2 bad input,
1 run-time failure, 130 Ctrl-C, 143 SIGTERM). Loading a weights file is Training.learning.learners.load_weights,
a data set split Training.data.dataset_format.load_split.
"""
from __future__ import annotations

import shutil
import sys
from pathlib import Path
from typing import Optional, Sequence

from ProbSAMLib import errors
from ProbSAMLib.errors import InputError, OutputRefusedError, SettingsError
from ProbSAMLib.io.outputdir import OutputFolder, overlapping, parser_inputs, read_marker


# Bounds beyond which a count is a typo, not a request (they also keep every size inside what torch takes):
MAX_SAMPLES = 1000       # samples per slice an evaluation draws; the literature's largest N is 100
MAX_BOOTSTRAP = 100_000  # bootstrap replicates; 1000 already gives stable 95 % intervals


def at_least(option: str, value, low, high=2 ** 63 - 1) -> None:
    """An option's number within [low, high]; the default high is int64's, which torch and numpy take."""
    if value is not None and not low <= value <= high:
        bound = f"at least {low}" if value < low else f"at most {high}"
        raise SettingsError(f"{option} must be {bound}, got {errors.shown(value)}")


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


def output_folder(parser, args, tool: str) -> OutputFolder:
    """The writer for ``args.out``, already checked (refusals happen before any work). Its inputs are every
    ``type=Path`` option of ``parser``; ``tool`` (the script's name) goes into the folder's marker, so --force
    replaces only that script's own output."""
    folder = OutputFolder(args.out, args.force, inputs=parser_inputs(parser, args), tool=tool)
    folder.check()
    return folder


def separate_folders(out, work_dir, out_option: str = "--out", work_option: str = "--work-dir") -> None:
    """A work folder equal to, inside or above the output would be written into the output before it is
    made (and then refuse it as existing): refuse the pair before any work."""
    if work_dir is not None and overlapping(out, work_dir):
        raise SettingsError(f"{work_option} {work_dir} and {out_option} {out} overlap (one is, or lies inside, "
                            f"the other); give the partial results a folder of their own")


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
    marker = read_marker(out) if out.is_dir() else None
    if marker is not None:  # another tool's output: say which, as the other tools do
        raise OutputRefusedError(f"out={out} was written by {marker.get('tool') or 'an older ProbSAM'}, not "
                                 f"train.py; choose a new folder for the run")
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


def load_resume_state(path: Path, device, max_steps: Optional[int] = None) -> dict:
    """ckpt.pt for --resume, loaded with weights_only=True (a checkpoint never runs code). ``max_steps``:
    the run's new budget, which may not lie below the step the run reached (nothing would train, and the
    run's config.yaml would be rewritten with a budget it has already passed)."""
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
    if max_steps is not None and max_steps < state["step"]:
        raise SettingsError(f"setting max_steps={max_steps} is below step {state['step']}, which the run in "
                            f"{path.parent} has already reached; give max_steps of at least {state['step']} to "
                            f"continue it")
    return state


def say(text: str) -> None:
    print(text, file=sys.stderr)


def warn(text: str) -> None:
    """One ``warning: ...`` line on stderr: something the run accepts but you should know."""
    say(f"warning: {text}")
