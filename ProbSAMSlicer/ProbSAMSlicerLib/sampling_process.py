"""The sampling worker seen from Slicer: a child process running ``ProbSAMLib.app.worker``.

Why a process: Slicer's main thread holds Python's GIL while Qt waits for events, so a Python thread
only advances during the main thread's Python callbacks. The worker runs in Slicer's own Python
(``PythonSlicer``), stays alive between runs (the model is loaded once) and is killed when it does not
stop within CANCEL_GRACE_S of a cancel; the next run starts a new one.

One worker per Slicer session (``shared_worker()``), shared by every logic and the widget: each worker
holds a model (and on CUDA, GPU memory). It ends itself after ``idle_timeout_s()`` seconds without a
request (the "ProbSAM/WorkerIdleTimeoutSeconds" setting), when Slicer exits (atexit, and its stdin closes
with Slicer), and a dead one is started again by the next run.

Two reader threads (stdout frames, stderr lines) and a writer thread only block on pipes and fill or
drain queues: they need no GIL while waiting, and a worker that stops reading cannot block Slicer's main
thread. The main thread polls (the widget's QTimer) or waits (``process()``) on the queue. Nothing of
MRML crosses: the run asks ``read_region`` for the block the model needs and sends a copy.

Faults, each ending the run with one clear line (SamplingRun.error) and nothing added to the scene (the
Logic builds nodes only from a finished run): a damaged frame (cut short, garbage, not the wire format,
a message missing its fields, a result that does not fit its request) or one above the size limit: the
worker is killed; the worker dying (killed, out of memory) even mid-frame: its exit status; a worker
silent for ``silence_timeout_s()`` seconds (the "ProbSAM/WorkerSilenceTimeoutSeconds" setting; it sends
a heartbeat every few seconds while it works, loading the model included): it is killed; a second run
while one is going on the same worker: refused (WorkerBusy), never interleaved.
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
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np

from ProbSAMLib.weights.registry import DEFAULT_MODEL  # cheap: no torch

CANCEL_GRACE_S = 1.0
DAMAGED_EXIT_WAIT_S = 0.5  # after a frame cut short: time for a dying worker to be seen as dead, not damaged
DEFAULT_IDLE_TIMEOUT_S = 300.0  # a few minutes: long enough between two runs, short enough to free a GPU
IDLE_TIMEOUT_SETTING = "ProbSAM/WorkerIdleTimeoutSeconds"
# A working worker sends a frame at least every ProbSAMLib.app.worker.HEARTBEAT_S (5 s): a minute of
# silence means it is hung, not slow.
DEFAULT_SILENCE_TIMEOUT_S = 60.0
SILENCE_TIMEOUT_SETTING = "ProbSAM/WorkerSilenceTimeoutSeconds"
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
    # {url, token, cafile}: the worker runs the requests on that probsam server (remote mode); repr=False
    # keeps the token out of logs
    server: Optional[dict] = field(default=None, repr=False, compare=False)


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


class WorkerBusy(WorkerError):
    """A run was asked for while another one is going on the same worker."""


class DamagedMessage(Exception):
    """A message from the worker that breaks the protocol (a field missing, a result of the wrong shape)."""


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
    """The worker's idle time in seconds (IDLE_TIMEOUT_SETTING); 0 means never."""
    return _seconds_setting(IDLE_TIMEOUT_SETTING, DEFAULT_IDLE_TIMEOUT_S)


def silence_timeout_s() -> float:
    """How long a run waits for any frame from a working worker before it kills it (SILENCE_TIMEOUT_SETTING);
    0 means forever."""
    return _seconds_setting(SILENCE_TIMEOUT_SETTING, DEFAULT_SILENCE_TIMEOUT_S)


def _seconds_setting(name: str, default: float) -> float:
    """A Slicer setting in seconds where Qt is there, else ``default``; a value that is not a number of
    seconds is logged and replaced by ``default``."""
    try:
        import qt

        value = qt.QSettings().value(name)
    except Exception:  # no Qt (scripts, CI) or no settings object
        value = None
    try:
        return max(0.0, float(value)) if value not in (None, "") else default
    except (TypeError, ValueError):
        logging.warning(f"ProbSAM: setting {name}={value!r} is not a number of seconds; using {default:g}")
        return default


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
    ``current_run``: the one SamplingRun using it (``claim``); its messages all go to that run.
    """

    def __init__(self, python: Optional[str] = None, idle_timeout: Optional[float] = None):
        self.python = python or python_executable()
        self.idle_timeout = idle_timeout
        self.process = None
        self.current_run = None
        self._messages = queue.Queue()
        self._outbox = queue.Queue()
        self._stderr = collections.deque(maxlen=40)
        self._stderr_thread = None
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
        self._outbox.put(None)  # the previous worker's writer thread ends
        self._messages, self._outbox, self._stderr = queue.Queue(), queue.Queue(), collections.deque(maxlen=40)
        idle = idle_timeout_s() if self.idle_timeout is None else self.idle_timeout
        self.process = subprocess.Popen([self.python, "-m", "ProbSAMLib.app.worker", "--idle-timeout", f"{idle:g}"],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                        env=env, **hidden_console_options())
        threading.Thread(target=self._read_frames, args=(self.process, self._messages), daemon=True).start()
        threading.Thread(target=self._write_frames, args=(self.process, self._outbox), daemon=True).start()
        self._stderr_thread = threading.Thread(target=self._read_stderr, args=(self.process, self._stderr),
                                               daemon=True)
        self._stderr_thread.start()

    @staticmethod
    def _read_frames(process, messages) -> None:
        """Every frame into ``messages``, then ``{"type": "exit"}``; a damaged stream (cut short, garbage,
        above the size limit) kills the worker: no frame boundary can be found after it."""
        from ProbSAMLib.app.wire import WireError
        from ProbSAMLib.app.worker import MAX_FROM_WORKER_BYTES, read_frame

        try:
            while True:
                message = read_frame(process.stdout, MAX_FROM_WORKER_BYTES)
                if message is None:
                    break
                messages.put(message)
        except WireError as error:
            damaged = _stop_damaged(process, str(error))
            if damaged is not None:
                messages.put(damaged)
        except (OSError, ValueError):
            pass
        messages.put({"type": "exit", "returncode": process.wait()})

    @staticmethod
    def _write_frames(process, outbox) -> None:
        """Encoded frames from ``outbox`` to the worker, in order, until None or the pipe breaks."""
        from ProbSAMLib.app.worker import write_parts

        for parts in iter(outbox.get, None):
            try:
                write_parts(process.stdin, parts)
            except (OSError, ValueError):
                return  # the worker is gone; its "exit" message says so

    @staticmethod
    def _read_stderr(process, lines) -> None:
        for raw in iter(process.stderr.readline, b""):
            line = raw.decode("utf-8", "replace").rstrip()
            lines.append(line)
            logging.debug(f"ProbSAM worker: {line}")

    def send(self, **message) -> None:
        """Encoded here (a value that cannot be sent raises TypeError to the caller), written by the writer
        thread: a worker that does not read its stdin cannot block the caller."""
        from ProbSAMLib.app.worker import encode_frame

        self._outbox.put(encode_frame(message))

    def next_message(self, timeout: Optional[float]) -> Optional[dict]:
        try:
            return self._messages.get(timeout=timeout) if timeout is None or timeout > 0 \
                else self._messages.get_nowait()
        except queue.Empty:
            return None

    def next_id(self) -> int:
        return next(self._ids)

    def claim(self, run: "SamplingRun") -> None:
        """Make ``run`` the worker's one run: requests go one at a time and every message to one reader,
        so a second run while one is going is refused (WorkerBusy), never interleaved. A cancelled run that
        nobody polls any more (its scene was closed) is ended first, within CANCEL_GRACE_S."""
        current = self.current_run
        while current is not None and not current.done and current.cancelling:
            current.poll(timeout=0.05)
        if current is not None and not current.done:
            raise WorkerBusy("a sampling run is already in progress: wait for it to finish, or cancel it, "
                             "then sample again")
        self.current_run = run

    def release(self, run: "SamplingRun") -> None:
        if self.current_run is run:
            self.current_run = None

    def stderr_tail(self, lines: int = 8) -> str:
        if self._stderr_thread is not None and not self.alive:
            self._stderr_thread.join(1.0)  # the dead worker's last lines are still being read
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
        self._outbox.put(None)

    def stop(self) -> None:
        """Ask the worker to quit; kill it if it does not within the grace time."""
        if self.alive:
            self.send(type="quit")
            try:
                self.process.wait(CANCEL_GRACE_S)
            except subprocess.TimeoutExpired:
                self.kill()  # reaped before returning: `alive` is False afterwards
        self._outbox.put(None)


def _stop_damaged(process, detail: str) -> Optional[dict]:
    """After a damaged frame: None if the worker died by itself (its exit status tells the user why: a frame
    cut short by a SIGKILL is a death, not damage), else the worker is killed and a "damaged" message says
    what arrived."""
    try:
        if process.wait(DAMAGED_EXIT_WAIT_S) != 0:
            return None
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
    return {"type": "damaged", "message": detail}


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
        self._id, self._index = None, 0  # the request in flight: its id (an int: it survives the wire), its ROI
        self._answered = False  # whether the worker has said anything about the current request
        self._restarts = 0
        self.silence_timeout = silence_timeout_s()
        self._last_heard = time.monotonic()

    @property
    def cancelling(self) -> bool:
        return self._cancel_deadline is not None

    def start(self) -> "SamplingRun":
        self.worker.claim(self)
        try:
            self.worker.ensure_started()
            self._submit(0)
        except Exception:
            self.worker.release(self)  # nothing was sent: the worker is free for the next run
            raise
        return self

    def _submit(self, index: int) -> None:
        request, s = self.requests[index], self.settings
        self._id, self._index = self.worker.next_id(), index
        model = {"name": s.model, "checkpoint": s.checkpointPath or None,
                 "sam_checkpoint": s.samCheckpointPath or None, "device": s.device}
        self._answered = False
        self._last_heard = time.monotonic()
        self.worker.send(type="sample", id=self._id, model=model, lo=request.voxelBox.lo, hi=request.voxelBox.hi,
                         n_samples=s.numberOfSamples, seed=s.seed, roi=request.roi, **self._geometry,
                         **({"server": s.server} if s.server else {}))
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
                self._check_silence()
                break
            self._last_heard = time.monotonic()
            self._handle_safely(message)
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

    def _check_silence(self) -> None:
        """A worker that sent nothing (not even its heartbeat) for ``silence_timeout`` s is hung: kill it."""
        silent = time.monotonic() - self._last_heard
        if self.done or not self.silence_timeout or silent < self.silence_timeout:
            return
        self.worker.kill()
        self._finish(WorkerError(
            f"The sampling process sent nothing for {silent:.0f} s (not even its heartbeat) and was stopped. "
            f"Nothing was added to the scene. Sample again to start a new one; if it hangs again, try device "
            f"'cpu' or raise the setting {SILENCE_TIMEOUT_SETTING} ({self.silence_timeout:g} s)."))

    def _handle_safely(self, message: dict) -> None:
        """``_handle``, and the run's end with a one-line error whatever goes wrong in it (the widget's
        timer must never be left polling a run that cannot finish)."""
        try:
            self._handle(message)
        except DamagedMessage as error:
            self.worker.kill()  # it breaks the protocol: nothing it sends next can be trusted
            self._finish(_damaged_error(str(error)))
        except Exception as error:  # our side failed (reading the block): the worker drops the request
            logging.exception("ProbSAM: handling the sampling process's message failed")
            self.worker.send(type="cancel", id=self._id)
            self._finish(WorkerError(f"Reading the CT block for the sampling process failed: {error}. Nothing was "
                                     f"added to the scene."))

    def _handle(self, message: dict) -> None:
        kind = message.get("type")
        if kind == "exit":
            if not self._ended_idle(message.get("returncode")):
                self._finish(self._exit_error(message.get("returncode")))
            return
        if kind == "damaged":
            self._finish(_damaged_error(str(message.get("message"))))
            return
        if message.get("id") != self._id:
            return  # left over from a cancelled run, or the "idle" notice of a worker that is ending
        self._answered = True
        if self._cancel_deadline is not None and kind in ("window", "result"):
            self._finish(_cancelled("sampling was cancelled"))  # asked to stop: keep nothing
        elif kind == "window":
            region = _field(message, "region", lambda r: tuple(int(n) for n in r) if len(r) == 6 else None)
            values = self._read_region(self._index, region)
            self.worker.send(type="region", id=self._id, values=np.ascontiguousarray(values, dtype=np.float32))
        elif kind == "warning":
            text = str(_field(message, "message"))
            logging.warning(f"ProbSAM: {text}")
            self.warnings.append(text)
        elif kind == "progress":
            fraction = _field(message, "fraction", float)
            self._fraction = (self._index + min(max(fraction, 0.0), 1.0)) / len(self.requests)
            self._message = f"{self.requests[self._index].roiName}: {message.get('message', '')}"
        elif kind == "result":
            check_result(message, self.requests[self._index], self.settings.numberOfSamples)
            self.results.append(message)
            if len(self.results) == len(self.requests):
                self._fraction, self._message = 1.0, "done"
                self._finish(None)
            else:
                self._submit(len(self.results))
        elif kind == "error":
            self._finish(self._worker_error(message))
        # "heartbeat": nothing to do; poll() has noted that the worker is alive

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
        if self.worker is not None:
            self.worker.release(self)

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
        if tail:
            logging.error(f"ProbSAM: the sampling process's last output:\n{tail}")
        last = tail.strip().splitlines()[-1] if tail.strip() else ""
        return WorkerError(f"The sampling process {how} before it finished (out of memory, or a crash in "
                           f"PyTorch). Nothing was added to the scene. Try device 'cpu' or fewer samples."
                           + (f" Its last output: {last}" if last else ""))


def _damaged_error(detail: str) -> WorkerError:
    return WorkerError(f"The sampling process sent a damaged message ({detail}) and was stopped. Nothing was "
                       f"added to the scene. Sample again to start a new one; if this repeats, the module and "
                       f"its ProbSAMLib may be of different versions: reinstall the extension.")


def _field(message: dict, name: str, convert: Callable = lambda value: value):
    """``convert(message[name])``; DamagedMessage, naming the field, if it is missing or does not convert."""
    try:
        value = convert(message[name])
    except (KeyError, TypeError, ValueError):
        value = None
    if value is None:
        raise DamagedMessage(f"its {message.get('type')!r} message has no valid field {name!r}")
    return value


def check_result(result: dict, request: SamplingRequest, n_samples: int) -> None:
    """DamagedMessage unless ``result`` holds every field the Logic builds nodes from, each with the shape
    of ``request``'s box (a result of another box or version would build wrong or half-built nodes)."""
    from ProbSAMLib.inference.agreement import AGREEMENT_LEVELS
    from ProbSAMLib.inference.uncertainty import MAP_NAMES

    lo, hi = request.voxelBox.lo, request.voxelBox.hi
    box = tuple(int(hi[a]) - int(lo[a]) for a in (2, 1, 0))  # (Kb, Jb, Ib)
    _check_array(result, "masks", bool, (n_samples,) + box)
    for name in ("consensus", "informative"):
        _check_array(result, name, bool, box)
    for name in MAP_NAMES:
        _check_array(result, name, float, box)
    agreement = result.get("agreement")
    if not isinstance(agreement, dict) or set(agreement) != set(AGREEMENT_LEVELS):
        raise DamagedMessage(f"the result's field 'agreement' must hold {list(AGREEMENT_LEVELS)}")
    for level in AGREEMENT_LEVELS:
        _check_array(agreement, level, bool, box, "agreement.")
    if [int(n) for n in result.get("lo") or ()] != [int(n) for n in lo]:
        raise DamagedMessage(f"the result is for a box at {result.get('lo')}, not at {list(lo)}")
    summary = result.get("summary")
    samples = summary.get("samples") if isinstance(summary, dict) else None
    if not isinstance(samples, list) or len(samples) != n_samples or len(result.get("colors") or ()) != n_samples:
        raise DamagedMessage(f"the result's summary or colours do not describe {n_samples} samples")
    colors = result.get("segment_colors")
    levels = colors.get("agreement") if isinstance(colors, dict) else None
    if not (isinstance(levels, dict) and set(levels) == set(AGREEMENT_LEVELS) and "consensus" in colors):
        raise DamagedMessage("the result's field 'segment_colors' must give the consensus and agreement colours")


def _check_array(fields: dict, name: str, kind: type, shape: tuple, prefix: str = "") -> None:
    value = fields.get(name)
    if isinstance(value, np.ndarray) and value.shape == shape and \
            (value.dtype == bool if kind is bool else value.dtype.kind == "f"):
        return
    got = f"{value.dtype} {value.shape}" if isinstance(value, np.ndarray) else type(value).__name__
    raise DamagedMessage(f"the result's field '{prefix}{name}' is {got}; the box needs "
                         f"{'bool' if kind is bool else 'float'} {shape}")
