"""The one writer of output folders (``probsam``, Slicer-free scripts, Training/evaluation/evaluate.py, data-set builders).

    with OutputFolder(out, force=args.force, inputs=parser_inputs(parser, args), tool="probsam sample") as tmp:
        write everything into tmp
    # now `out` is complete, or untouched if anything failed

How it writes:
- Everything goes to ``.<name>.tmp-<pid>`` beside ``out`` (same file system, so renames are atomic),
  which gets a marker file ``.probsam-output`` first: JSON naming the tool that writes it, the marker's
  format, the host and the pid.
- When complete: if ``out`` does not exist, one rename ``tmp -> out``. If it exists (``force``), three
  steps: (1) rename ``out -> .<name>.old-<pid>``, (2) rename ``tmp -> out``, (3) delete the old one. If (2)
  fails, the old folder is renamed back.
- On any exception, Ctrl-C or SIGTERM (the entry points turn it into an exception) the temporary folder
  is deleted. A run killed outright (SIGKILL, power loss) leaves ``.<name>.tmp-<pid>``; the next run into
  the same place deletes it, even if that run is then refused, and puts back an ``.old-<pid>`` folder
  orphaned between steps (1) and (2). Only folders of this host whose process is gone are touched.

What it refuses, with or without ``force``, after resolving symbolic links: an ``out`` that is not a
folder, that is equal to, inside or above one of the ``inputs``, that is the working folder or one above
it, the home folder or one above it (``/`` included). ``force`` replaces only a folder whose marker names
the same tool in this marker format: never one without the marker (this writer did not make it), one
another tool wrote (``probsam sample --force`` over a training data set), or one with an older marker
that does not say which tool wrote it.

The inputs are taken from the parser itself (:func:`parser_inputs`): every option declared ``type=Path``
is a file or folder the run reads, except the outputs. An entry point declares its path options that way
and the guard follows; nothing keeps a second list by hand.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
from pathlib import Path
from typing import Iterable, List, Optional, Sequence

from ProbSAMLib.errors import OutputRefusedError

MARKER = ".probsam-output"
MARKER_FORMAT = 2  # 1: an empty file (any tool); 2: JSON {"tool", "format", "host", "pid"}


class OutputExistsError(OutputRefusedError):
    """The output folder exists and replacing it was not asked for."""


class InputPath(type(Path())):
    """A path the run reads, with the option that named it (``option``), so a refusal can say which."""

    option: Optional[str] = None


def named_input(path, option: Optional[str]) -> Path:
    named = InputPath(path)
    named.option = option
    return named


def _input_name(path: Path) -> str:
    option = getattr(path, "option", None)
    return f"{path} (given as {option})" if option else str(path)


def parser_inputs(parser: argparse.ArgumentParser, args: argparse.Namespace,
                  outputs: Sequence[str] = ("out",)) -> List[Path]:
    """Every file or folder the run reads: the values of the parser's ``type=Path`` options (in the chosen
    subcommand too, repeated or ``nargs`` ones included), except the options named in ``outputs`` (dests).
    Each carries the option that named it (InputPath.option), for the refusal's message."""
    found = []
    for action in parser._actions:  # argparse keeps no public list of a parser's options
        if isinstance(action, argparse._SubParsersAction):
            chosen = action.choices.get(getattr(args, action.dest, None))
            if chosen is not None:
                found += parser_inputs(chosen, args, outputs)
        elif action.type is Path and action.dest not in outputs:
            value = getattr(args, action.dest, None)
            values = value if isinstance(value, (list, tuple)) else [value]
            name = action.option_strings[0] if action.option_strings else action.metavar or action.dest.upper()
            found += [named_input(v, name) for v in values if v is not None]
    return found


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


def overlapping(a, b) -> bool:
    """Whether two paths, symbolic links resolved, are equal or one lies inside the other."""
    a, b = Path(a).expanduser().resolve(), Path(b).expanduser().resolve()
    return _is_within(a, b) or _is_within(b, a)


def read_marker(folder) -> Optional[dict]:
    """The marker of a folder ProbSAM wrote: {"tool": ..., "format": ...}; None where there is none. An
    empty or unreadable marker is format 1, which does not say which tool wrote the folder."""
    path = Path(folder) / MARKER
    if not path.is_file():
        return None
    try:
        marker = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, OSError):  # the empty file of format 1, or garbage
        return {"tool": None, "format": 1}
    if not isinstance(marker, dict) or not isinstance(marker.get("format"), int):
        return {"tool": None, "format": 1}
    return marker


def _write_marker(folder: Path, tool: str) -> None:
    marker = {"tool": tool, "format": MARKER_FORMAT, "host": socket.gethostname(), "pid": os.getpid(),
              "note": f"written by ProbSAM's {tool}; only {tool} --force may replace this folder"}
    (folder / MARKER).write_text(json.dumps(marker) + "\n", encoding="utf-8")


class OutputFolder:
    """``with OutputFolder(out, force, inputs, tool=...) as tmp:`` — see the module docstring. ``tool``
    names the program writing (``probsam sample``, ``evaluate.py``): it goes into the marker, and
    ``force`` replaces only that tool's earlier output."""

    def __init__(self, out_dir, force: bool = False, inputs: Iterable = (), option: str = "--out",
                 tool: str = "ProbSAMLib"):
        self.out_dir = Path(out_dir).expanduser().absolute()
        self.force = force
        self.inputs = [named_input(Path(p).expanduser(), getattr(p, "option", None)) for p in inputs if p is not None]
        self.option = option
        self.tool = tool
        self.tmp: Optional[Path] = None

    # --- checks ---------------------------------------------------------------------------------------
    def _named(self, path: Path) -> str:
        """The option and the path as the user wrote them: ``--out DIR``, or train.py's ``out=DIR``."""
        return f"{self.option}{path}" if self.option.endswith("=") else f"{self.option} {path}"

    def check(self) -> None:
        """Raise OutputRefusedError if ``out`` may not be written; call it before any long work. Leftovers
        of killed runs into the same place are removed first, so a refused run leaves none behind either."""
        self.remove_stale()
        self._check()

    def _check(self) -> None:
        self.check_location()
        out, real = self.out_dir, self.out_dir.resolve()
        if not (out.exists() or out.is_symlink()):
            return
        if not out.exists():
            raise OutputRefusedError(f"{self._named(out)} is a broken symbolic link; remove it or choose "
                                     f"another folder")
        if not real.is_dir():
            raise OutputRefusedError(f"{self._named(out)} exists and is not a folder")
        unreplaceable = self._why_not_replaceable(real)
        if not self.force:
            if unreplaceable:
                raise OutputExistsError(f"output folder {out} already exists and {unreplaceable}; choose "
                                        f"another {self.option}")
            raise OutputExistsError(f"output folder {out} already exists; choose another {self.option} or add "
                                    f"--force to replace it")
        if unreplaceable:
            raise OutputRefusedError(f"{self._named(out)} exists and {unreplaceable}; remove it yourself or "
                                     f"choose another folder")

    def _why_not_replaceable(self, folder: Path) -> Optional[str]:
        """Why --force may not replace this existing folder, or None if it may (this tool wrote it)."""
        marker = read_marker(folder)
        if marker is None:
            return f"was not written by ProbSAM (no {MARKER} marker), so --force will not replace it"
        if marker["format"] < MARKER_FORMAT:
            return (f"was written by an older ProbSAM whose {MARKER} marker does not say which tool wrote it, so "
                    f"--force will not replace it")
        if marker["format"] > MARKER_FORMAT:
            return (f"was written by a newer ProbSAM ({MARKER} marker format {marker['format']}), so --force "
                    f"will not replace it")
        if marker.get("tool") != self.tool:
            return f"was written by {marker.get('tool')}, not {self.tool}, so --force will not replace it"
        return None

    def check_location(self) -> None:
        """The refusals that hold whether or not ``out`` exists: /, home, the working folder or one above
        it, a folder equal to, inside or above an input, an existing file."""
        out = self.out_dir
        real = out.resolve()
        if real == Path("/").resolve():
            raise OutputRefusedError(f"{self._named(out)} is /; choose a new folder for the results")
        cwd = Path.cwd().resolve()
        if _is_within(cwd, real):
            raise OutputRefusedError(f"{self._named(out)} is the working folder or a folder above it; "
                                     f"choose a new folder for the results")
        if _is_within(Path.home().resolve(), real):
            raise OutputRefusedError(f"{self._named(out)} is the home folder or one above it; choose a new "
                                     f"folder for the results")
        if real.exists() and not real.is_dir():
            raise OutputRefusedError(f"{self._named(out)} exists and is not a folder")
        for path in self.inputs:
            if _is_within(path.resolve(), real):
                raise OutputRefusedError(f"{self._named(out)} holds the input {_input_name(path)}; choose a folder that "
                                         f"holds none of the inputs")
            if _is_within(real, path.resolve()):
                raise OutputRefusedError(f"{self._named(out)} is inside the input {_input_name(path)}; choose a folder "
                                         f"outside every input")

    # --- temporary and stale folders ------------------------------------------------------------------
    def _sibling(self, kind: str, pid: int) -> Path:
        return self.out_dir.parent / f".{self.out_dir.name}.{kind}-{pid}"

    def remove_stale(self) -> None:
        """Delete temporary folders of killed runs into the same place; restore an orphaned old folder.
        Touches only folders with the marker whose process is gone, and never another host's (a pid is
        only meaningful on the host that wrote it, e.g. on a shared network folder)."""
        parent = self.out_dir.parent
        if not parent.is_dir():
            return
        host = socket.gethostname()
        for kind in ("old", "tmp"):  # "old" first: it may have to become out again
            prefix = f".{self.out_dir.name}.{kind}-"
            for path in parent.glob(prefix + "*"):
                pid = path.name[len(prefix):]
                marker = read_marker(path)
                if not pid.isdigit() or marker is None or marker.get("host", host) != host or _pid_alive(int(pid)):
                    continue
                if kind == "old" and not (self.out_dir.exists() or self.out_dir.is_symlink()):
                    os.rename(path, self.out_dir)  # killed between the two renames: put it back
                else:
                    shutil.rmtree(path, ignore_errors=True)

    # --- context manager ------------------------------------------------------------------------------
    def __enter__(self) -> Path:
        self.check()  # also puts back an old folder orphaned by a killed run, then judges `out` with it
        self.out_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = self._sibling("tmp", os.getpid())
        if tmp.exists():  # this process used it before and failed to remove it
            shutil.rmtree(tmp)
        tmp.mkdir()
        self.tmp = tmp
        _write_marker(tmp, self.tool)
        return tmp

    def __exit__(self, exc_type, exc, tb) -> bool:
        try:
            if exc_type is None:
                self._check()  # it may have appeared while we were writing
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
