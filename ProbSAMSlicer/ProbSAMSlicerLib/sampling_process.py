"""The sampling worker seen from Slicer: a child process running ``ProbSAMLib.app.worker``.

Why a process: Slicer's main thread holds Python's GIL while Qt waits for events, so a Python thread
only advances during the main thread's Python callbacks. The worker runs in Slicer's own Python
(``PythonSlicer``), stays alive between runs (the model is loaded once) and is killed when it does not
stop within CANCEL_GRACE_S of a cancel; the next run starts a new one.

One worker per Slicer session (``shared_worker()``), shared by every logic and the widget: each worker
holds a model (and on CUDA, GPU memory). It ends itself after ``idle_timeout_s()`` seconds without a
request (the "ProbSAM/WorkerIdleTimeoutSeconds" setting), when Slicer exits (atexit, and its stdin closes
with Slicer), and a dead one is started again by the next run.

Two reader threads (stdout frames, stderr lines) only block on pipes and fill queues: they need no
GIL while waiting. The main thread polls (the widget's QTimer) or waits (``process()``) on the queue.
Nothing of MRML crosses: the run asks ``read_region`` for the block the model needs and sends a copy.
"""

import atexit
import collections
import itertools
import logging
import os
import queue
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np

from ProbSAMLib.weights.registry import DEFAULT_MODEL  # cheap: no torch

CANCEL_GRACE_S = 1.0
DEFAULT_IDLE_TIMEOUT_S = 300.0  # a few minutes: long enough between two runs, short enough to free a GPU
IDLE_TIMEOUT_SETTING = "ProbSAM/WorkerIdleTimeoutSeconds"
KILL_WAIT_S = 10.0  # a killed process is gone in milliseconds; this only bounds the wait
LIBRARY_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__import__("ProbSAMLib").__file__)))


@dataclass(frozen=True)
class SamplingSettings:
    numberOfSamples: int = 16
    seed: Optional[int] = 0
    model: str = DEFAULT_MODEL
    checkpointPath: str = ""
    samCheckpointPath: str = ""
    device: str = "auto"
    uncertaintyKind: str = "entropy"


@dataclass(frozen=True)
class SamplingRequest:
    """One ROI to sample: its name (for the outputs), its voxel box (ProbSAMLib VoxelBox), the drawn box
    for the worker to cut the masks to (``roi`` of the worker's "sample" message, None: no cut) and what the
    user must be told about the geometry (clamped box, rotated ROI, frames)."""

    roiName: str
    voxelBox: object
    roi: Optional[dict] = None
    warnings: tuple = ()


class WorkerError(RuntimeError):
    """The worker failed; the message is for the user (nothing was added to the scene)."""


def python_executable() -> str:
    """Slicer's Python, found as slicer.util.executePythonModule finds it; outside Slicer, this Python."""
    if os.name == "nt":
        candidate = shutil.which("PythonSlicer")
    else:
        candidate = os.path.join(os.path.dirname(sys.executable), "PythonSlicer")
    return candidate if candidate and os.path.isfile(candidate) else sys.executable


def _cancelled(message: str) -> Exception:
    from ProbSAMLib.errors import Cancelled  # torch is installed by the time anything runs

    return Cancelled(message)


def idle_timeout_s() -> float:
    """The worker's idle time in seconds: the Slicer setting IDLE_TIMEOUT_SETTING where Qt is there, else
    the default; 0 means never."""
    try:
        import qt

        value = qt.QSettings().value(IDLE_TIMEOUT_SETTING)
    except Exception:  # no Qt (scripts, CI) or no settings object
        value = None
    try:
        return max(0.0, float(value)) if value not in (None, "") else DEFAULT_IDLE_TIMEOUT_S
    except (TypeError, ValueError):
        logging.warning(f"ProbSAM: setting {IDLE_TIMEOUT_SETTING}={value!r} is not a number of seconds; "
                        f"using {DEFAULT_IDLE_TIMEOUT_S:g}")
        return DEFAULT_IDLE_TIMEOUT_S


def hidden_console_options() -> dict:
    """Popen options that keep a console window from opening on Windows, as slicer.util.launchConsoleProcess
    does (STARTF_USESHOWWINDOW, SW_HIDE); nothing elsewhere."""
    if os.name != "nt":
        return {}
    info = subprocess.STARTUPINFO()
    info.dwFlags |= subprocess.STARTF_USESHOWWINDOW
    info.wShowWindow = subprocess.SW_HIDE
    return {"startupinfo": info}


_SHARED = {"worker": None}


def shared_worker() -> "WorkerProcess":
    """The session's one worker handle (made on first use; its process starts with the first run)."""
    if _SHARED["worker"] is None:
        _SHARED["worker"] = WorkerProcess()
    return _SHARED["worker"]


def set_shared_worker(worker: Optional["WorkerProcess"]) -> None:
    """Replace the session's worker handle (tests share one across scenes)."""
    _SHARED["worker"] = worker


@atexit.register
def stop_shared_worker() -> None:
    """End the session's worker (Slicer exits, the module is reloaded)."""
    worker = _SHARED["worker"]
    if worker is not None:
        worker.stop()


class WorkerProcess:
    """``python -m ProbSAMLib.app.worker`` with ProbSAMLib on its path; frames in, frames out.

    ``idle_timeout``: seconds without a request after which the worker ends itself (None: the setting).
    """

    def __init__(self, python: Optional[str] = None, idle_timeout: Optional[float] = None):
        self.python = python or python_executable()
        self.idle_timeout = idle_timeout
        self.process = None
        self._messages = queue.Queue()
        self._stderr = collections.deque(maxlen=40)
        self._ids = itertools.count(1)  # request ids, unique for as long as this handle lives

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def ensure_started(self) -> None:
        if self.alive:
            return
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [LIBRARY_ROOT, env.get("PYTHONPATH")]))
        env.setdefault("PYTHONUNBUFFERED", "1")
        self._messages, self._stderr = queue.Queue(), collections.deque(maxlen=40)
        idle = idle_timeout_s() if self.idle_timeout is None else self.idle_timeout
        self.process = subprocess.Popen([self.python, "-m", "ProbSAMLib.app.worker", "--idle-timeout", f"{idle:g}"],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                        env=env, **hidden_console_options())
        threading.Thread(target=self._read_frames, args=(self.process, self._messages), daemon=True).start()
        threading.Thread(target=self._read_stderr, args=(self.process, self._stderr), daemon=True).start()

    @staticmethod
    def _read_frames(process, messages) -> None:
        from ProbSAMLib.app.worker import read_frame

        try:
            while True:
                message = read_frame(process.stdout)
                if message is None:
                    break
                messages.put(message)
        except (OSError, ValueError, EOFError):
            pass
        messages.put({"type": "exit", "returncode": process.wait()})

    @staticmethod
    def _read_stderr(process, lines) -> None:
        for raw in iter(process.stderr.readline, b""):
            line = raw.decode("utf-8", "replace").rstrip()
            lines.append(line)
            logging.debug(f"ProbSAM worker: {line}")

    def send(self, **message) -> None:
        from ProbSAMLib.app.worker import write_frame

        try:
            write_frame(self.process.stdin, message)
        except (BrokenPipeError, OSError, ValueError):
            pass  # the worker is gone; its "exit" message says so

    def next_message(self, timeout: Optional[float]) -> Optional[dict]:
        try:
            return self._messages.get(timeout=timeout) if timeout is None or timeout > 0 \
                else self._messages.get_nowait()
        except queue.Empty:
            return None

    def next_id(self) -> int:
        return next(self._ids)

    def stderr_tail(self, lines: int = 8) -> str:
        return "\n".join(list(self._stderr)[-lines:])

    def kill(self) -> None:
        if self.alive:
            self.process.kill()
            # Reap it before returning: until then `alive` still says True, and a run started at once
            # would be sent to the dying process and fail with "killed by signal 9" instead of starting
            # a new worker.
            try:
                self.process.wait(KILL_WAIT_S)
            except subprocess.TimeoutExpired:
                logging.warning("ProbSAM: the sampling process did not exit after SIGKILL")

    def stop(self) -> None:
        """Ask the worker to quit; kill it if it does not within the grace time."""
        if self.alive:
            self.send(type="quit")
            try:
                self.process.wait(CANCEL_GRACE_S)
            except subprocess.TimeoutExpired:
                self.kill()  # reaped before returning: `alive` is False afterwards


class SamplingRun:
    """One click of "Sample masks": every ROI's request through the worker, in turn.

    ``poll(timeout)`` handles the worker's messages (main thread only); ``done``, ``results`` (one dict
    of box-sized arrays and the summary per ROI) and ``error`` say how it ended.
    ``read_region(index, (k0, k1, r0, r1, c0, c1))`` returns that block of the input volume for ROI ``index``.
    """

    def __init__(self, worker: WorkerProcess, requests: list, settings: SamplingSettings, ijk_to_ras, size_ijk,
                 read_region: Callable):
        self.worker, self.requests, self.settings = worker, list(requests), settings
        self._geometry = {"ijk_to_ras": np.asarray(ijk_to_ras, dtype=float), "size_ijk": tuple(size_ijk)}
        self._read_region = read_region
        self.results, self.error, self.done = [], None, False
        self.warnings = []  # from the worker (e.g. a GPU small for the model), for the user
        self._fraction, self._message = 0.0, "starting the sampling process"
        self._cancel_deadline = None
        self._id = None
        self._answered = False  # whether the worker has said anything about the current request
        self._restarts = 0

    def start(self) -> "SamplingRun":
        self.worker.ensure_started()
        self._submit(0)
        return self

    def _submit(self, index: int) -> None:
        request, s = self.requests[index], self.settings
        self._id = (self.worker.next_id(), index)
        model = {"name": s.model, "checkpoint": s.checkpointPath or None,
                 "sam_checkpoint": s.samCheckpointPath or None, "device": s.device}
        self._answered = False
        self.worker.send(type="sample", id=self._id, model=model, lo=request.voxelBox.lo, hi=request.voxelBox.hi,
                         n_samples=s.numberOfSamples, seed=s.seed, roi=request.roi, **self._geometry)
        self._message = f"{request.roiName}: loading the model"

    def progress(self) -> tuple:
        return self._fraction, self._message

    def cancel(self) -> None:
        if not self.done and self._cancel_deadline is None:
            self.worker.send(type="cancel", id=self._id)
            self._cancel_deadline = time.monotonic() + CANCEL_GRACE_S

    def poll(self, timeout: float = 0.0) -> bool:
        """Handle the messages that arrived (waiting up to ``timeout`` s for one); True when done."""
        while not self.done:
            if self._cancel_deadline is not None:
                left = self._cancel_deadline - time.monotonic()
                if left <= 0:  # it did not stop: end it; the next run starts a new one
                    self.worker.kill()
                    self._finish(_cancelled("sampling was cancelled (the sampling process was stopped)"))
                    break
                timeout = min(timeout, left)
            message = self.worker.next_message(timeout)
            if message is None:
                break
            self._handle(message)
            timeout = 0.0
        return self.done

    def wait(self, progress: Optional[Callable] = None, cancel: Optional[Callable] = None) -> list:
        """Block until done (``process()``); the results, or the run's error raised.

        ``progress(fraction, message)`` is called as messages arrive; ``cancel() -> bool`` is asked between
        them and True cancels the run (Cancelled is raised).
        """
        while not self.poll(timeout=0.25):
            if progress is not None:
                progress(*self.progress())
            if cancel is not None and cancel():
                self.cancel()
        if self.error is not None:
            raise self.error
        return self.results

    def _handle(self, message: dict) -> None:
        kind = message.get("type")
        if kind == "exit":
            if not self._ended_idle(message.get("returncode")):
                self._finish(self._exit_error(message.get("returncode")))
            return
        if message.get("id") != self._id:
            return  # left over from a cancelled run, or the "idle" notice of a worker that is ending
        self._answered = True
        if self._cancel_deadline is not None and kind in ("window", "result"):
            self._finish(_cancelled("sampling was cancelled"))  # asked to stop: keep nothing
        elif kind == "window":
            values = self._read_region(self._id[1], tuple(message["region"]))
            self.worker.send(type="region", id=self._id, values=np.ascontiguousarray(values, dtype=np.float32))
        elif kind == "warning":
            logging.warning(f"ProbSAM: {message['message']}")
            self.warnings.append(message["message"])
        elif kind == "progress":
            index, count = self._id[1], len(self.requests)
            self._fraction = (index + float(message["fraction"])) / count
            self._message = f"{self.requests[index].roiName}: {message['message']}"
        elif kind == "result":
            self.results.append(message)
            if len(self.results) == len(self.requests):
                self._fraction, self._message = 1.0, "done"
                self._finish(None)
            else:
                self._submit(len(self.results))
        elif kind == "error":
            self._finish(self._worker_error(message))

    def _ended_idle(self, returncode) -> bool:
        """A worker that ended itself for idleness (status 0) just as this run's request was sent never saw
        it: start a new one and send the request again (once)."""
        if returncode != 0 or self._answered or self._cancel_deadline is not None or self._restarts:
            return False
        self._restarts += 1
        logging.info("ProbSAM: the sampling process had ended while idle; starting a new one")
        self.worker.ensure_started()
        self._submit(len(self.results))
        return True

    def _finish(self, error: Optional[Exception]) -> None:
        self.error, self.done = error, True

    def _worker_error(self, message: dict) -> Exception:
        if message.get("kind") == "cancelled":
            return _cancelled("sampling was cancelled")
        logging.error(f"ProbSAM worker: {message.get('traceback', '')}")
        if message.get("kind") == "out_of_memory":
            return WorkerError(f"The {self.settings.device} device ran out of memory while sampling "
                               f"({message.get('message')}). Choose device 'cpu' or fewer samples.")
        return WorkerError(str(message.get("message")))

    def _exit_error(self, returncode) -> Exception:
        if self._cancel_deadline is not None:
            return _cancelled("sampling was cancelled (the sampling process was stopped)")
        how = f"was killed by signal {-returncode}" if returncode is not None and returncode < 0 \
            else f"exited with status {returncode}"
        tail = self.worker.stderr_tail()
        return WorkerError(f"The sampling process {how} before it finished (out of memory, or a crash in "
                           f"PyTorch). Nothing was added to the scene. Try device 'cpu' or fewer samples."
                           + (f"\n\nLast output:\n{tail}" if tail else ""))
