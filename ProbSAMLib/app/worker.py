"""A sampling server: ProbSAMLib in a child process, spoken to over its stdin and stdout.

The 3D Slicer module runs this as ``PythonSlicer -m ProbSAMLib.app.worker`` (Slicer's main thread holds
Python's GIL while Qt waits for events, so sampling on a thread would crawl). It keeps the last model
loaded between requests. Only plain values and box-sized numpy arrays cross; nothing of MRML.

Frames, both ways: an 8-byte little-endian length, then one message of ProbSAMLib.app.wire (a JSON header
and raw numpy buffers; never pickle, so bytes from the pipe can never run code). A frame announcing more
than MAX_TO_WORKER_BYTES (client -> worker) or MAX_FROM_WORKER_BYTES (worker -> client) is refused before
anything is allocated, as is one cut short or not in that format (WireError): a damaged request ends the
worker (status 2, one line on stderr), since the stream has lost its framing. Tuples arrive as lists.
Stdout carries frames only: at start the real stdout is kept for them and fd 1 is pointed at stderr, so a
library that prints (from Python or from C) cannot corrupt the protocol.

While it serves a request (loading the model included) the worker sends a ``heartbeat`` every HEARTBEAT_S
seconds, so a client can tell a slow worker from a hung one: a worker that sends nothing at all for a
while (stopped, deadlocked holding the interpreter, not speaking this protocol) is hung.

The worker ends by itself after ``--idle-timeout`` seconds without a request (0: never), so an idle
Slicer session gives its memory (and GPU memory) back; the client starts a new one for the next run.

client -> worker
  sample  {id, model: {name, checkpoint, sam_checkpoint, device}, ijk_to_ras (4x4), size_ijk, lo, hi,
           n_samples, seed, roi (optional): {center_ras (3,), axes_ras (3x3, columns), size_mm (3,)}}
          roi is the drawn box in the ijk_to_ras space; a rotated one is sampled as its axis-aligned voxel
          hull (lo, hi) and every mask is then cut to the box itself (voxel centres inside it)
  region  {id, values: float32 (k1-k0, r1-r0, c1-c0)}   the block the worker asked for
          server (optional): {url, token, cafile, verify}: the job runs on that probsam server
          (ProbSAMLib.app.remote), with the same messages back
  cancel  {id}   stops that request at its next slice chunk (or before it starts)
          ids are ints or strings (anything else is matched by its repr)
  test_connection {id, server: {url, token, cafile, verify}}   answered by "connection" or "error"
  quit    {}
worker -> client
  connection {id, message}   the server that answered test_connection, in one line
  window   {id, region: (k0, k1, r0, r1, c0, c1)}   after loading the model: send me this block
  progress {id, fraction, message}
  heartbeat {id}   every HEARTBEAT_S seconds while the request is served (model loading included)
  warning  {id, message}   e.g. a GPU small for the model (checked here: Slicer's process never touches CUDA)
  result   {id, masks (N, Kb, Jb, Ib), entropy, variance, mutual_information, mean_probability (Kb, Jb, Ib),
            consensus (Kb, Jb, Ib) bool, informative (Kb, Jb, Ib) bool (where an overlay shows), agreement {"any", "majority", "all"} (Kb, Jb, Ib) bool,
            marking_share (float 0..1, or None for a model without a marking head), lo, summary,
            colors (N RGB, the CLI's sample colours), segment_colors {"consensus": RGB, "agreement": {level: RGB}},
            roi_cut {"voxels_outside_roi": box voxels outside the drawn ROI, "mask_voxels_removed": n},
            model: {name, sha256, loads, reused}}
           With a roi, masks, consensus, agreement and summary are those cut to the ROI, and the four maps
           are 0 outside it.
  error    {id, kind: "cancelled" | "out_of_memory" | "bad_request" | "error", message, traceback}
  idle     {after_s}   sent once, just before the worker ends itself for want of requests
"""

from __future__ import annotations

import contextlib
import os
import queue
import struct
import sys
import threading
import traceback
from typing import BinaryIO, Optional

import numpy as np

from ProbSAMLib.app import wire
from ProbSAMLib.app.wire import WireError
# The job itself (schema, checks, model cache, sampling) is shared with the HTTP server.
from ProbSAMLib.app.jobs import ModelCache, SampleJob, error_kind
from ProbSAMLib.app.remote import RemoteJob, test_connection  # the same job on a probsam server (stdlib only)

_HEADER = struct.Struct("<Q")
# What one frame may weigh. Worker -> client: a result is about (N + 21) bytes per box voxel (N bool
# masks, four float32 maps, five bool maps), so 16 samples of the largest box a request may ask for
# (jobs.MAX_BOX_VOXELS, 64 Mi voxels) weigh 2.3 GiB; 64 samples of a box above 48 Mi voxels are refused.
# Client -> worker: the float32 block the model reads, e.g. 1000 whole 512 x 512 slices = 1 GiB.
MAX_FROM_WORKER_BYTES = 4 * 2 ** 30
MAX_TO_WORKER_BYTES = 2 * 2 ** 30
HEARTBEAT_S = 5.0  # far below the client's silence timeout (sampling_process, 60 s by default)


# --- framing (shared with the client) -------------------------------------------------------------------
def write_frame(stream: BinaryIO, message: dict) -> None:
    """One message, its arrays written from their own memory (no second copy of a large result)."""
    write_parts(stream, encode_frame(message))


def encode_frame(message: dict) -> list:
    """The buffers of one frame (TypeError for a value that cannot be sent), to write with ``write_parts``."""
    parts = wire.encode_parts(message)
    return [_HEADER.pack(sum(len(part) for part in parts))] + parts


def write_parts(stream: BinaryIO, parts: list) -> None:
    for part in parts:
        stream.write(part)
    stream.flush()


def read_frame(stream: BinaryIO, max_bytes: int = MAX_FROM_WORKER_BYTES) -> Optional[dict]:
    """The next message, or None where the stream ends between two frames. WireError, one line: a frame
    longer than ``max_bytes`` (refused before it is allocated), cut short, or not a wire message."""
    prefix = _read_exactly(stream, _HEADER.size, "the frame's length", end_ok=True)
    if prefix is None:
        return None
    (length,) = _HEADER.unpack(prefix)
    if length > max_bytes:
        raise WireError(f"a message of {length} bytes was announced; the limit is {max_bytes} bytes")
    return wire.decode(_read_exactly(stream, length, "the message"), max_bytes)


def _read_exactly(stream: BinaryIO, count: int, what: str, end_ok: bool = False) -> Optional[np.ndarray]:
    """``count`` bytes (uint8), read straight into one buffer; None if ``end_ok`` and the stream ends before
    the first byte, WireError if it ends later. The buffer is not zero-filled (bytearray would be): memory
    is committed only as bytes arrive, so a forged length costs what was really sent."""
    buffer = np.empty(count, dtype=np.uint8)
    view, got = memoryview(buffer), 0
    while got < count:
        n = stream.readinto(view[got:])
        if not n:
            if got == 0 and end_ok:
                return None
            raise WireError(f"{what} was cut short: {got} of {count} bytes arrived")
        got += n
    return buffer


# --- the server ---------------------------------------------------------------------------------------
class Server:
    """Serves requests read from ``inbox``; ``idle_timeout`` seconds without one end it (None: never)."""

    def __init__(self, inbox: BinaryIO, outbox: BinaryIO, idle_timeout: Optional[float] = None):
        self.outbox = outbox
        self.idle_timeout = idle_timeout if idle_timeout and idle_timeout > 0 else None
        self.cancelled = set()  # request ids; a set, not one flag, so a late cancel cannot hit the next run
        self.closing = False
        self.damaged: Optional[WireError] = None  # a client frame that could not be read: the stream is lost
        self.requests: "queue.Queue[Optional[dict]]" = queue.Queue()
        self._sending = threading.Lock()  # the heartbeat thread sends too: frames must not interleave
        self.models = ModelCache()
        threading.Thread(target=self._read, args=(inbox,), name="ProbSAMWorkerInbox", daemon=True).start()

    def _read(self, inbox: BinaryIO) -> None:
        """Cancel acts at once (the main thread is busy sampling); everything else is queued."""
        while True:
            try:
                message = read_frame(inbox, MAX_TO_WORKER_BYTES)
            except WireError as error:  # no frame boundary can be found after this: end, saying why
                self.damaged, message = WireError(f"a damaged message from the client: {error}"), None
            if message is None or message.get("type") == "quit":
                self.closing = True
                self.requests.put(None)
                return
            if message.get("type") == "cancel":
                self.cancelled.add(_key(message.get("id")))  # seen between chunks; the queued copy wakes a waiter
            self.requests.put(message)

    def send(self, **message) -> None:
        with self._sending:
            write_frame(self.outbox, message)

    @contextlib.contextmanager
    def _heartbeat(self, rid):
        """A "heartbeat" frame every HEARTBEAT_S seconds while the block runs: loading a model or sampling
        a slice chunk may take minutes without any other frame."""
        stop = threading.Event()

        def beat():
            while not stop.wait(HEARTBEAT_S):
                with contextlib.suppress(OSError, ValueError):  # the client is gone: serve() finds out
                    self.send(type="heartbeat", id=rid)

        thread = threading.Thread(target=beat, name="ProbSAMWorkerHeartbeat", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()

    def serve(self) -> str:
        """Serve until the client quits or closes the pipe ("quit"), or nothing comes for ``idle_timeout``
        seconds ("idle"); returns which."""
        while True:
            try:
                request = self.requests.get(timeout=self.idle_timeout)
            except queue.Empty:  # idle: end, so that the model's (GPU) memory goes back
                self.send(type="idle", after_s=self.idle_timeout)
                return "idle"
            if request is None:
                if self.damaged is not None:
                    raise self.damaged
                return "quit"
            if request.get("type") == "test_connection":  # Slicer's button: HTTP stays out of Slicer's process
                self._test_connection(request)
                continue
            if request.get("type") != "sample":
                continue  # a stale "region" or "cancel" of a finished request
            try:
                with self._heartbeat(request.get("id")):
                    self._sample(request)
            except Exception as error:  # reported to the client, which shows it; the server lives on
                self.send(type="error", id=request.get("id"), kind=error_kind(error), message=str(error),
                          traceback=traceback.format_exc())

    def _test_connection(self, request: dict) -> None:
        server = request.get("server") or {}
        try:
            line = test_connection(server.get("url"), server.get("token"), server.get("cafile"),
                                   server.get("verify", True))
        except Exception as error:  # one line for the user; the worker lives on
            self.send(type="error", id=request.get("id"), kind=getattr(error, "kind", error_kind(error)),
                      message=str(error))
            return
        self.send(type="connection", id=request.get("id"), message=line)

    def _sample(self, request: dict) -> None:
        from ProbSAMLib.errors import Cancelled

        rid = request.get("id")

        def cancel() -> bool:
            return self.closing or _key(rid) in self.cancelled

        if cancel():
            raise Cancelled("sampling was cancelled")
        job = (RemoteJob if request.get("server") else SampleJob)(request, self.models)
        _check_result_size(request)
        if job.warning:
            self.send(type="warning", id=rid, message=job.warning)
        self.send(type="window", id=rid, region=job.region)
        try:
            values = self._wait_for_region(rid, cancel)
            if cancel():
                raise Cancelled("sampling was cancelled")
        except Cancelled:
            job.abandon()  # a server's job would otherwise hold a backlog slot until it expires
            raise
        fields = job.run(values, cancel=cancel,
                         progress=lambda f, m: self.send(type="progress", id=rid, fraction=f, message=m))
        geometry_warning = fields["summary"].get("geometry", {}).get("warning")
        if geometry_warning:  # e.g. a sheared grid: the user should see it, not only summary.json
            self.send(type="warning", id=rid, message=geometry_warning)
        self.send(type="result", id=rid, **fields)

    def _wait_for_region(self, rid, cancel) -> np.ndarray:
        from ProbSAMLib.errors import Cancelled

        while True:
            message = self.requests.get()
            if message is None:
                self.requests.put(None)  # serve() must see the end too
                raise Cancelled("the client closed the connection")
            if message.get("type") == "region" and message.get("id") == rid:
                return message["values"]
            if cancel():
                raise Cancelled("sampling was cancelled")


def _check_result_size(request: dict) -> None:
    """RequestError, before any sampling, for a (checked) request whose result could not be sent: about
    N + 21 bytes per box voxel (N bool masks, four float32 maps, five bool maps)."""
    from ProbSAMLib.app.jobs import RequestError

    voxels = int(np.prod(np.asarray(request["hi"], dtype=np.int64) - np.asarray(request["lo"], dtype=np.int64)))
    size = voxels * (int(request["n_samples"]) + 21)
    if size > MAX_FROM_WORKER_BYTES:
        raise RequestError(f"the result of {request['n_samples']} samples of a {voxels}-voxel box would weigh "
                           f"{size / 2 ** 30:.1f} GiB, above the {MAX_FROM_WORKER_BYTES / 2 ** 30:g} GiB a result "
                           f"may: use a smaller ROI or fewer samples")


def _key(rid):
    """A request id as a set member: ints and strings as they are, anything else (a list from a confused
    client) by its repr, so that it cannot break the server."""
    return rid if isinstance(rid, (int, str)) else repr(rid)


def serve(idle_timeout: Optional[float] = None) -> int:
    """Serve requests on stdin until the client quits or closes it, or ``idle_timeout`` seconds pass without
    one; frames go out on the real stdout."""
    outbox = os.fdopen(os.dup(sys.stdout.fileno()), "wb")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # stray prints (C or Python) go to stderr
    sys.stdout = sys.stderr
    if Server(sys.stdin.buffer, outbox, idle_timeout).serve() == "idle":
        # The inbox thread is still blocked reading stdin: a normal interpreter exit would abort on its
        # buffer lock (SIGABRT). Everything is sent; end now, with status 0.
        outbox.flush()
        sys.stderr.flush()
        os._exit(0)
    return 0


def parse_idle_timeout(argv) -> Optional[float]:
    """``--idle-timeout SECONDS`` (0 or absent: never) from the command line."""
    import argparse

    parser = argparse.ArgumentParser(prog="probsam-worker")
    parser.add_argument("--idle-timeout", type=float, default=0.0,
                        help="end after this many seconds without a request (0: never)")
    value = parser.parse_args(argv).idle_timeout
    if not value >= 0:
        parser.error(f"--idle-timeout must be >= 0 seconds, got {value}")
    return value or None


def main(argv=None) -> int:
    """The process's exit status. A failure of the server itself (a damaged frame from the client: status 2;
    Ctrl-C in the terminal Slicer runs in) ends with one line on stderr, which the client shows; errors of
    a request go to the client as frames and the server lives on."""
    from ProbSAMLib.errors import run_main

    idle_timeout = parse_idle_timeout(sys.argv[1:] if argv is None else argv)
    return run_main("probsam-worker", lambda: serve(idle_timeout))


if __name__ == "__main__":
    sys.exit(main())
