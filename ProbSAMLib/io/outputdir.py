"""The one writer of output folders (``probsam``, Slicer-free scripts, Training/evaluation/evaluate.py, data-set builders).

    with OutputFolder(out, force=args.force, inputs=[ct_path]) as tmp:
        write everything into tmp
    # now `out` is complete, or untouched if anything failed

How it writes:
- Everything goes to ``.<name>.tmp-<pid>`` beside ``out`` (same file system, so renames are atomic),
  which gets a marker file ``.probsam-output`` first.
- When complete: if ``out`` does not exist, one rename ``tmp -> out``. If it exists (``force``), three
  steps: (1) rename ``out -> .<name>.old-<pid>``, (2) rename ``tmp -> out``, (3) delete the old one. If (2)
  fails, the old folder is renamed back.
- On any exception, Ctrl-C or SIGTERM (the entry points turn it into an exception) the temporary folder
  is deleted. A run killed outright (SIGKILL, power loss) leaves ``.<name>.tmp-<pid>``; the next run into
  the same place deletes it, and puts back an ``.old-<pid>`` folder orphaned between steps (1) and (2).

What it refuses, with or without ``force``, after resolving symbolic links: an ``out`` that is not a
folder, that holds one of the ``inputs`` at any depth, that is the working folder or one above it, the
home folder or one above it (``/`` included), and any existing folder without the marker (one this
writer did not make).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Iterable, Optional

from ProbSAMLib.errors import OutputRefusedError

MARKER = ".probsam-output"


class OutputExistsError(OutputRefusedError):
    """The output folder exists and replacing it was not asked for."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    except (OverflowError, ValueError):
        return False
    return True


def _is_within(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


class OutputFolder:
    """``with OutputFolder(out, force, inputs) as tmp:`` — see the module docstring."""

    def __init__(self, out_dir, force: bool = False, inputs: Iterable = (), option: str = "--out"):
        self.out_dir = Path(out_dir).expanduser().absolute()
        self.force = force
        self.inputs = [Path(p).expanduser() for p in inputs if p is not None]
        self.option = option
        self.tmp: Optional[Path] = None

    # --- checks ---------------------------------------------------------------------------------------
    def check(self) -> None:
        """Raise OutputRefusedError if ``out`` may not be written; call it before any long work."""
        self.check_location()
        out, real = self.out_dir, self.out_dir.resolve()
        if not (out.exists() or out.is_symlink()):
            return
        if not out.exists():
            raise OutputRefusedError(f"{self.option} {out} is a broken symbolic link; remove it or choose "
                                     f"another folder")
        if not real.is_dir():
            raise OutputRefusedError(f"{self.option} {out} exists and is not a folder")
        if not self.force:
            raise OutputExistsError(f"output folder {out} already exists; choose another {self.option} or add "
                                    f"--force to replace it")
        if not (real / MARKER).is_file():
            raise OutputRefusedError(f"{self.option} {out} exists and was not written by ProbSAM (no {MARKER} "
                                     f"marker), so --force will not replace it; remove it yourself or choose "
                                     f"another folder")

    def check_location(self) -> None:
        """The refusals that hold whether or not ``out`` exists: /, home, the working folder or one above
        it, a folder holding an input, an existing file."""
        out = self.out_dir
        real = out.resolve()
        if real == Path("/").resolve():
            raise OutputRefusedError(f"{self.option} {out} is /; choose a new folder for the results")
        cwd = Path.cwd().resolve()
        if _is_within(cwd, real):
            raise OutputRefusedError(f"{self.option} {out} is the working folder or a folder above it; "
                                     f"choose a new folder for the results")
        if _is_within(Path.home().resolve(), real):
            raise OutputRefusedError(f"{self.option} {out} is the home folder or one above it; choose a new "
                                     f"folder for the results")
        if real.exists() and not real.is_dir():
            raise OutputRefusedError(f"{self.option} {out} exists and is not a folder")
        for path in self.inputs:
            if _is_within(path.resolve(), real):
                raise OutputRefusedError(f"{self.option} {out} holds the input {path}; choose a folder that "
                                         f"holds none of the inputs")

    # --- temporary and stale folders ------------------------------------------------------------------
    def _sibling(self, kind: str, pid: int) -> Path:
        return self.out_dir.parent / f".{self.out_dir.name}.{kind}-{pid}"

    def remove_stale(self) -> None:
        """Delete temporary folders of killed runs into the same place; restore an orphaned old folder."""
        parent = self.out_dir.parent
        if not parent.is_dir():
            return
        for kind in ("old", "tmp"):  # "old" first: it may have to become out again
            prefix = f".{self.out_dir.name}.{kind}-"
            for path in parent.glob(prefix + "*"):
                pid = path.name[len(prefix):]
                if not pid.isdigit() or _pid_alive(int(pid)) or not (path / MARKER).is_file():
                    continue
                if kind == "old" and not (self.out_dir.exists() or self.out_dir.is_symlink()):
                    os.rename(path, self.out_dir)  # killed between the two renames: put it back
                else:
                    shutil.rmtree(path, ignore_errors=True)

    # --- context manager ------------------------------------------------------------------------------
    def __enter__(self) -> Path:
        self.check()
        self.remove_stale()
        self.check()  # remove_stale may have put an old folder back
        self.out_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = self._sibling("tmp", os.getpid())
        if tmp.exists():  # this process used it before and failed to remove it
            shutil.rmtree(tmp)
        tmp.mkdir()
        self.tmp = tmp
        (tmp / MARKER).write_text("written by ProbSAM; --force may replace this folder\n", encoding="utf-8")
        return tmp

    def __exit__(self, exc_type, exc, tb) -> bool:
        try:
            if exc_type is None:
                self.check()  # it may have appeared while we were writing
                self._move_into_place()
        finally:
            if self.tmp is not None and self.tmp.exists():
                shutil.rmtree(self.tmp, ignore_errors=True)
        return False

    def _move_into_place(self) -> None:
        from ProbSAMLib.errors import pause_point

        pause_point("writing")  # test hook: a signal here must leave nothing behind
        if not (self.out_dir.exists() or self.out_dir.is_symlink()):
            os.rename(self.tmp, self.out_dir)
            return
        old = self._sibling("old", os.getpid())
        os.rename(self.out_dir, old)  # (1)
        try:
            os.rename(self.tmp, self.out_dir)  # (2)
        except BaseException:
            os.rename(old, self.out_dir)  # put the previous output back
            raise
        shutil.rmtree(old, ignore_errors=True)  # (3)
