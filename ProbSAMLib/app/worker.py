"""A sampling server: ProbSAMLib in a child process, spoken to over its stdin and stdout.

The 3D Slicer module runs this as ``PythonSlicer -m ProbSAMLib.app.worker`` (Slicer's main thread holds
Python's GIL while Qt waits for events, so sampling on a thread would crawl). It keeps the last model
loaded between requests. Only plain values and box-sized numpy arrays cross; nothing of MRML.

Frames, both ways: an 8-byte little-endian length, then a pickle of a dict with a "type". Stdout carries
frames only: at start the real stdout is kept for them and fd 1 is pointed at stderr, so a library that
prints cannot corrupt the protocol.

The worker ends by itself after ``--idle-timeout`` seconds without a request (0: never), so an idle
Slicer session gives its memory (and GPU memory) back; the client starts a new one for the next run.

client -> worker
  sample  {id, model: {name, checkpoint, sam_checkpoint, device}, ijk_to_ras (4x4), size_ijk, lo, hi,
           n_samples, seed, roi (optional): {center_ras (3,), axes_ras (3x3, columns), size_mm (3,)}}
          roi is the drawn box in the ijk_to_ras space; a rotated one is sampled as its axis-aligned voxel
          hull (lo, hi) and every mask is then cut to the box itself (voxel centres inside it)
  region  {id, values: float32 (k1-k0, r1-r0, c1-c0)}   the block the worker asked for
  cancel  {id}   stops that request at its next slice chunk (or before it starts)
  quit    {}
worker -> client
  window   {id, region: (k0, k1, r0, r1, c0, c1)}   after loading the model: send me this block
  progress {id, fraction, message}
  warning  {id, message}   e.g. a GPU small for the model (checked here: Slicer's process never touches CUDA)
  result   {id, masks (N, Kb, Jb, Ib), entropy, variance, mutual_information, mean_probability (Kb, Jb, Ib),
            consensus (Kb, Jb, Ib) bool, informative (Kb, Jb, Ib) bool (where an overlay shows), agreement {"any", "majority", "all"} (Kb, Jb, Ib) bool,
            marking_share (float 0..1, or None for a model without a marking head), lo, summary,
            colors (N RGB, the CLI's sample colours), segment_colors {"consensus": RGB, "agreement": {level: RGB}},
            roi_cut {"voxels_outside_roi": box voxels outside the drawn ROI, "mask_voxels_removed": n},
            model: {name, sha256, loads, reused}}
           With a roi, masks, consensus, agreement and summary are those cut to the ROI, and the four maps
           are 0 outside it.
  error    {id, kind: "cancelled" | "out_of_memory" | "error", message}
  idle     {after_s}   sent once, just before the worker ends itself for want of requests
"""

from __future__ import annotations

import os
import pickle
import queue
import struct
import sys
import threading
import traceback
from typing import BinaryIO, Optional

import numpy as np

# The job itself (schema, checks, model cache, sampling) is shared with the HTTP server.
from ProbSAMLib.app.jobs import ModelCache, SampleJob, cut_to_roi, device_warning, error_kind, roi_inside  # noqa: F401

_error_kind = error_kind  # the name older tests and callers use

_HEADER = struct.Struct("<Q")


# --- framing (shared with the client) -------------------------------------------------------------------
def write_frame(stream: BinaryIO, message: dict) -> None:
    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    stream.write(_HEADER.pack(len(data)) + data)
    stream.flush()


def read_frame(stream: BinaryIO) -> Optional[dict]:
    """The next message, or None at end of stream."""
    header = _read_exactly(stream, _HEADER.size)
    if header is None:
        return None
    data = _read_exactly(stream, _HEADER.unpack(header)[0])
    return None if data is None else pickle.loads(data)


def _read_exactly(stream: BinaryIO, count: int) -> Optional[bytes]:
    chunks, left = [], count
    while left:
        chunk = stream.read(left)
        if not chunk:
            return None
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


# --- the server ---------------------------------------------------------------------------------------
class Server:
    """Serves requests read from ``inbox``; ``idle_timeout`` seconds without one end it (None: never)."""

    def __init__(self, inbox: BinaryIO, outbox: BinaryIO, idle_timeout: Optional[float] = None):
        self.outbox = outbox
        self.idle_timeout = idle_timeout if idle_timeout and idle_timeout > 0 else None
        self.cancelled = set()  # request ids; a set, not one flag, so a late cancel cannot hit the next run
        self.closing = False
        self.requests: "queue.Queue[Optional[dict]]" = queue.Queue()
        self.models = ModelCache()
        threading.Thread(target=self._read, args=(inbox,), name="ProbSAMWorkerInbox", daemon=True).start()

    def _read(self, inbox: BinaryIO) -> None:
        """Cancel acts at once (the main thread is busy sampling); everything else is queued."""
        while True:
            message = read_frame(inbox)
            if message is None or message.get("type") == "quit":
                self.closing = True
                self.requests.put(None)
                return
            if message.get("type") == "cancel":
                self.cancelled.add(message.get("id"))  # seen between chunks; the queued copy wakes a waiter
            self.requests.put(message)

    def send(self, **message) -> None:
        write_frame(self.outbox, message)

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
                return "quit"
            if request.get("type") != "sample":
                continue  # a stale "region" or "cancel" of a finished request
            try:
                self._sample(request)
            except Exception as error:  # reported to the client, which shows it; the server lives on
                self.send(type="error", id=request.get("id"), kind=error_kind(error), message=str(error),
                          traceback=traceback.format_exc())

    def _sample(self, request: dict) -> None:
        from ProbSAMLib.errors import Cancelled

        rid = request.get("id")

        def cancel() -> bool:
            return self.closing or rid in self.cancelled

        if cancel():
            raise Cancelled("sampling was cancelled")
        job = SampleJob(request, self.models)
        if job.warning:
            self.send(type="warning", id=rid, message=job.warning)
        self.send(type="window", id=rid, region=job.region)
        values = self._wait_for_region(rid, cancel)
        if cancel():
            raise Cancelled("sampling was cancelled")
        fields = job.run(values, cancel=cancel,
                         progress=lambda f, m: self.send(type="progress", id=rid, fraction=f, message=m))
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
    """The process's exit status. A failure of the server itself (the client gone mid-frame, Ctrl-C in the
    terminal Slicer runs in) ends with one line on stderr, which the client shows; errors of a request go
    to the client as frames and the server lives on."""
    from ProbSAMLib.errors import run_main

    idle_timeout = parse_idle_timeout(sys.argv[1:] if argv is None else argv)
    return run_main("probsam-worker", lambda: serve(idle_timeout))


if __name__ == "__main__":
    sys.exit(main())
