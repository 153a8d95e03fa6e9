"""Error classes by kind, their exit statuses, and the one place each entry point turns them into a line.

Every entry point (``probsam``, the Training scripts) ends a failed run with ONE line
``<prog>: error: <what is wrong>`` on stderr, no traceback, and an exit status chosen by the error's
TYPE, never by its message text:

    2    bad input or settings: SettingsError, InputError, WeightsError, DeviceError, and the standard
         ValueError / FileNotFoundError / FileExistsError / NotADirectoryError / IsADirectoryError
    1    a failure at run time: any other OSError (full disk, permissions), RuntimeError, MemoryError
    130  Ctrl-C (SIGINT); 143 for SIGTERM

:func:`run_main` is where an entry point's ``main()`` is run and its errors become that line. Set
PROBSAM_DEBUG=1 to get the traceback instead. ``pause_point(name)`` is a test hook: with
PROBSAM_TEST_PAUSE=name the process says so on stderr and waits for a line on stdin, so a test can
send a signal at exactly that point without sleeping.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import sys
from typing import Callable, Optional

EXIT_RUNTIME, EXIT_INPUT, EXIT_INTERRUPTED, EXIT_TERMINATED = 1, 2, 130, 143


class ProbSAMError(Exception):
    """Base of ProbSAMLib's own errors (mixed into ValueError / RuntimeError for older callers)."""


class SettingsError(ProbSAMError, ValueError):
    """A setting (command-line option, config value) has the wrong type, range or combination."""


class InputError(ProbSAMError, ValueError):
    """An input file or folder is missing, unreadable, incomplete or not what it must be."""


class WeightsError(InputError):
    """A weights file is missing, corrupt, of another model, or cannot be fetched."""


class CheckpointError(WeightsError):
    """A weights file's content is wrong: corrupt or truncated, a SHA-256 that does not match, a stored
    config this library cannot build, tensors of another model; or a model name that does not exist."""


class DeviceError(ProbSAMError, RuntimeError):
    """The requested device (cuda, mps) is not available here."""


class OutputRefusedError(SettingsError):
    """The output folder may not be written or replaced (it exists, holds an input, is a home...)."""


class Cancelled(Exception):
    """A run stopped because its ``cancel()`` returned True; no partial result is returned. Torch-free, so
    the Slicer module can catch it without importing the sampler."""


class Terminated(BaseException):
    """SIGTERM, turned into an exception so that ``finally`` blocks clean up (like KeyboardInterrupt)."""


_INPUT_OS_ERRORS = (FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError)


def exit_status(error: BaseException) -> int:
    """The exit status for an exception that ended a run (see the module docstring)."""
    if isinstance(error, KeyboardInterrupt):
        return EXIT_INTERRUPTED
    if isinstance(error, Terminated):
        return EXIT_TERMINATED
    if isinstance(error, (SettingsError, InputError, DeviceError)):
        return EXIT_INPUT
    if isinstance(error, _INPUT_OS_ERRORS):
        return EXIT_INPUT
    if isinstance(error, ValueError):  # the library's own checks (shapes, ranges) raise ValueError
        return EXIT_INPUT
    return EXIT_RUNTIME


def message(error: BaseException) -> str:
    """One line describing ``error`` (the first line of its text; a full disk says so plainly)."""
    if isinstance(error, KeyboardInterrupt):
        return "interrupted"
    if isinstance(error, Terminated):
        return "terminated"
    if isinstance(error, OSError) and error.errno == errno.ENOSPC:
        where = f" while writing {error.filename}" if error.filename else ""
        return f"no space left on device{where}; free some space or choose another output folder"
    if isinstance(error, MemoryError):
        return "out of memory; use fewer samples, a smaller box or a smaller --slice-batch"
    if is_gpu_out_of_memory(error):
        # torch's text runs on for lines about allocator settings; its first two sentences say what failed.
        what = ". ".join(" ".join(str(error).split()).split(". ")[:2]).rstrip(".")
        return (f"{what}. The GPU cannot hold this much at once: use fewer slices or samples at a time "
                f"(train.py: batch_size, or cache=true with a frozen encoder; evaluate.py: --batch-size; "
                f"probsam: --slice-batch, --samples), or --device cpu")
    if isinstance(error, OSError) and error.strerror and error.filename:
        return printable(f"{error.strerror}: {error.filename}")
    text = printable(" ".join(str(error).split()) or type(error).__name__)
    return text if len(text) <= 2000 else text[:2000] + " ..."


def shown(value, limit: int = 100) -> str:
    """A value for a one-line message, its repr cut short: a 400-digit number must not flood the line."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]} ... ({len(text)} characters)"


def printable(text: str) -> str:
    """``text`` safe to print on any console: a path byte that is not UTF-8 (kept by os.fsdecode as a lone
    surrogate, which a stream cannot encode) is shown as ``\\xff``, the byte itself."""
    try:
        raw = text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a surrogate that stands for no byte: show its code point
        return text.encode("utf-8", "backslashreplace").decode("utf-8")
    return raw.decode("utf-8", "backslashreplace")


def is_gpu_out_of_memory(error: BaseException) -> bool:
    """torch.cuda.OutOfMemoryError, or the RuntimeError MPS and older torch raise: an error a smaller batch
    can avoid (the host's MemoryError is not one). Read by name and text, so this module needs no torch."""
    if type(error).__name__ == "OutOfMemoryError":
        return True
    return isinstance(error, RuntimeError) and "out of memory" in str(error)


def report(prog: str, error: BaseException, nothing_written: bool = True) -> int:
    """Print the one ``prog: error: ...`` line for ``error`` and return its exit status."""
    status = exit_status(error)
    if status in (EXIT_INTERRUPTED, EXIT_TERMINATED):
        tail = "; nothing was written" if nothing_written else ""
        print(f"{prog}: {message(error)}{tail}", file=sys.stderr)
    else:
        print(f"{prog}: error: {message(error)}", file=sys.stderr)
    return status


def debugging() -> bool:
    return os.environ.get("PROBSAM_DEBUG", "") not in ("", "0")


def _raise_terminated(signum, frame):
    raise Terminated()


def tolerant_console() -> None:
    """A console that cannot show a character (an ASCII locale, a pipe) prints an escape for it instead of
    failing the run: tables use arrows and ±, paths and patient ids may be anything. A stdout whose reader
    has gone (``probsam info | head -1``) is pointed at /dev/null instead of failing the run."""
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):  # a real text stream, not a test's capture object
            stream.reconfigure(errors="backslashreplace")
    if not isinstance(sys.stdout, _StdoutReaderMayLeave) and _has_fd(sys.stdout):
        sys.stdout = _StdoutReaderMayLeave(sys.stdout)


def _has_fd(stream) -> bool:
    try:
        stream.fileno()
    except (AttributeError, OSError, ValueError):
        return False
    return True


class _StdoutReaderMayLeave:
    """sys.stdout, but a reader that closed the pipe (``| head -1``, ``| true``) is not an error: the rest
    of the output goes to /dev/null and the run goes on to its own end and exit status (Python's recipe
    for BrokenPipeError, applied where the write happens, so a run whose files are still being written
    is not cut short by its printout)."""

    def __init__(self, stream):
        self._stream = stream

    def __getattr__(self, name):
        return getattr(self._stream, name)

    def write(self, text):
        return self._guarded(self._stream.write, text)

    def flush(self):
        return self._guarded(self._stream.flush)

    def _guarded(self, operation, *args):
        try:
            return operation(*args)
        except BrokenPipeError:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, self._stream.fileno())
            os.close(devnull)
            return operation(*args)


@contextlib.contextmanager
def terminate_as_exception():
    """While inside: SIGTERM raises :class:`Terminated` (main thread only), so temporary output is removed."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


_FAILURE_CALLBACKS: list = []


def on_failure(callback) -> None:
    """Run ``callback()`` if the entry point (:func:`run_main`, :func:`install_script_handler`) ends with an
    error, e.g. to remove a half-written run folder."""
    _FAILURE_CALLBACKS.append(callback)


def _run_failure_callbacks() -> None:
    """The clean-ups registered with :func:`on_failure`, most recent first, each run once."""
    while _FAILURE_CALLBACKS:
        callback = _FAILURE_CALLBACKS.pop()
        try:
            callback()
        except Exception:  # cleaning up must not hide the error already reported
            pass


def finish_script(prog: str, error: BaseException, quiet: bool = False, nothing_written: bool = False) -> int:
    """What an entry point's uncaught ``error`` ends with: the line (unless ``quiet``; see :func:`report` for
    ``nothing_written``), the registered clean-ups (:func:`on_failure`), and the exit status it returns."""
    code = exit_status(error) if quiet else report(prog, error, nothing_written=nothing_written)
    _run_failure_callbacks()
    return code


def run_main(prog: str, main: Callable[[], Optional[int]], nothing_written: bool = True) -> Optional[int]:
    """Run an entry point's ``main()`` and return its exit status: what ``main()`` returns, or for an error,
    Ctrl-C or SIGTERM the one line ``prog: error: ...`` (``prog: interrupted`` ...) and the status of its type.

    The one handler of every entry point (``probsam``, the sampling worker, the Training scripts): a tolerant
    console, SIGTERM raised as :class:`Terminated` so ``finally`` blocks clean up, the ``startup`` test
    pause, and the clean-ups of :func:`on_failure` when the run fails. ``nothing_written``: whether an
    interrupted run may say "nothing was written" (False where finished work is kept, as the data set
    builders do). PROBSAM_DEBUG=1: the traceback instead of the line.
    """
    tolerant_console()
    try:
        with terminate_as_exception():
            pause_point("startup")  # test hook: a signal before the entry point's heavy imports
            status = main()
            sys.stdout.flush()  # a closed pipe shows here, while it can still be handled
    except (Exception, KeyboardInterrupt, Terminated) as error:
        if debugging():
            _run_failure_callbacks()
            raise
        return finish_script(prog, error, nothing_written=nothing_written)
    _FAILURE_CALLBACKS.clear()  # the run succeeded: its clean-ups must not fire in a later one
    return status


def install_script_handler(prog: str) -> None:
    """For a script whose work runs at import, with no ``main()`` to hand to :func:`run_main` (train.py): the
    same ending as run_main's, from ``sys.excepthook``: SIGTERM as :class:`Terminated`, and an uncaught
    exception ends the process with the one-line message and its exit status instead of a traceback."""
    signal.signal(signal.SIGTERM, _raise_terminated)
    tolerant_console()

    def hook(kind, error, tb):
        if debugging():
            sys.__excepthook__(kind, error, tb)
        code = finish_script(prog, error, quiet=debugging())
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)  # the status must follow the error type; a normal exit would always give 1

    sys.excepthook = hook


def env_flag(name: str, default: bool = False) -> bool:
    """A yes/no environment variable: 1/true/yes/on or 0/false/no/off (any case); anything else is an error."""
    value = os.environ.get(name)
    if value is None or value.strip() == "":
        return default
    text = value.strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise SettingsError(f"environment variable {name}={value!r} is not a yes/no value (use 1 or 0)")


def pause_point(name: str, stream: Optional[object] = None) -> None:
    """Test hook: with PROBSAM_TEST_PAUSE=<name>, say ``paused at <name>`` and wait for a line on stdin."""
    if os.environ.get("PROBSAM_TEST_PAUSE") != name:
        return
    out = stream or sys.stderr
    print(f"paused at {name}", file=out, flush=True)
    sys.stdin.readline()
