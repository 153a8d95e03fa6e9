"""A sampling server: ProbSAMLib in a child process, spoken to over its stdin and stdout.

The 3D Slicer module runs this as ``PythonSlicer -m ProbSAMLib.app.worker`` (Slicer's main thread holds
Python's GIL while Qt waits for events, so sampling on a thread would crawl). It keeps the last model
loaded between requests. Only plain values and box-sized numpy arrays cross; nothing of MRML.

Frames, both ways: an 8-byte little-endian length, then a pickle of a dict with a "type". Stdout carries
frames only: at start the real stdout is kept for them and fd 1 is pointed at stderr, so a library that
prints cannot corrupt the protocol.

client -> worker
  sample  {id, model: {name, checkpoint, sam_checkpoint, device}, ijk_to_ras (4x4), size_ijk, lo, hi,
           n_samples, seed}
  region  {id, values: float32 (k1-k0, r1-r0, c1-c0)}   the block the worker asked for
  cancel  {id}   stops that request at its next slice chunk (or before it starts)
  quit    {}
worker -> client
  window   {id, region: (k0, k1, r0, r1, c0, c1)}   after loading the model: send me this block
  progress {id, fraction, message}
  warning  {id, message}   e.g. a GPU small for the model (checked here: Slicer's process never touches CUDA)
  result   {id, masks (N, Kb, Jb, Ib), entropy, variance, mutual_information, mean_probability (Kb, Jb, Ib),
            consensus (Kb, Jb, Ib) bool, agreement {"any", "majority", "all"} (Kb, Jb, Ib) bool,
            marking_share (float 0..1, or None for a model without a marking head), lo, summary, colors (N RGB, the CLI's segment colours), model: {name, sha256, loads, reused}}
  error    {id, kind: "cancelled" | "out_of_memory" | "error", message}
"""

from __future__ import annotations

import os
import pickle
import queue
import struct
import sys
import threading
import traceback
from pathlib import Path
from typing import BinaryIO, Optional

import numpy as np

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
class _Models:
    """The last loaded model, reused while name, files and device stay the same."""

    def __init__(self):
        self.key, self.model, self.sha256, self.loads = None, None, None, 0

    def get(self, spec: dict):
        from ProbSAMLib.weights.build import load_model
        from ProbSAMLib.weights.checkpoints import weights_sha256

        key = tuple(spec.get(k) or None for k in ("name", "checkpoint", "sam_checkpoint", "device"))
        reused = key == self.key
        if not reused:
            self.key, self.model = None, None  # free the old model before loading the next
            checkpoint = Path(key[1]) if key[1] else None
            sam_checkpoint = Path(key[2]) if key[2] else None
            self.model = load_model(key[0], checkpoint=checkpoint, sam_checkpoint=sam_checkpoint,
                                    device=key[3] or "auto")
            self.sha256 = weights_sha256(key[0], checkpoint)
            self.key, self.loads = key, self.loads + 1
        return self.model, {"name": key[0], "sha256": self.sha256, "loads": self.loads, "reused": reused}


class Server:
    def __init__(self, inbox: BinaryIO, outbox: BinaryIO):
        self.outbox = outbox
        self.cancelled = set()  # request ids; a set, not one flag, so a late cancel cannot hit the next run
        self.closing = False
        self.requests: "queue.Queue[Optional[dict]]" = queue.Queue()
        self.models = _Models()
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

    def serve(self) -> None:
        while True:
            request = self.requests.get()
            if request is None:
                return
            if request.get("type") != "sample":
                continue  # a stale "region" or "cancel" of a finished request
            try:
                self._sample(request)
            except Exception as error:  # reported to the client, which shows it; the server lives on
                self.send(type="error", id=request.get("id"), kind=_error_kind(error), message=str(error),
                          traceback=traceback.format_exc())

    def _sample(self, request: dict) -> None:
        from ProbSAMLib.geometry import VolumeGeometry, VoxelBox
        from ProbSAMLib.io.segfile import distinct_colors
        from ProbSAMLib.inference.uncertainty import MAP_NAMES
        from ProbSAMLib.inference.volume import Cancelled, input_region, sample_volume

        rid = request["id"]

        def cancel() -> bool:
            return self.closing or rid in self.cancelled

        if cancel():
            raise Cancelled("sampling was cancelled")
        model, model_info = self.models.get(request["model"])
        warning = device_warning(request["model"].get("name"), request["model"].get("device") or "auto",
                                 model.device.type, _gpu_gib(model.device))
        if warning:
            self.send(type="warning", id=rid, message=warning)
        geometry = VolumeGeometry.from_ijk_to_ras(np.asarray(request["ijk_to_ras"]), request["size_ijk"])
        voxel_box = VoxelBox(request["lo"], request["hi"])
        region = input_region(model, voxel_box, geometry.shape)
        self.send(type="window", id=rid, region=region)
        values = self._wait_for_region(rid, cancel)
        k0, k1, r0, r1, c0, c1 = region
        # Zero pages are not committed by the OS: only the block the model reads costs memory.
        volume = np.zeros(geometry.shape, dtype=np.float32)
        volume[k0:k1, r0:r1, c0:c1] = values
        if cancel():
            raise Cancelled("sampling was cancelled")
        result = sample_volume(model, volume, geometry, voxel_box, n_samples=int(request["n_samples"]),
                               seed=request.get("seed"), cancel=cancel,
                               progress=lambda f, m: self.send(type="progress", id=rid, fraction=f, message=m))
        self.send(type="result", id=rid, masks=result.masks, lo=voxel_box.lo, summary=result.summary,
                  consensus=result.consensus, agreement=result.agreement, marking_share=result.marking_share,
                  colors=distinct_colors(len(result.masks)), model=model_info,
                  **{name: getattr(result, name) for name in MAP_NAMES})

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


def _gpu_gib(device) -> Optional[float]:
    import torch

    return torch.cuda.get_device_properties(device).total_memory / 2 ** 30 if device.type == "cuda" else None


def device_warning(name: str, requested: str, device_type: str, gpu_gib: Optional[float]) -> Optional[str]:
    """A warning when the device is a poor fit: a GPU smaller than the model wants, or SAM on the CPU."""
    from ProbSAMLib.weights.registry import model_entry

    if device_type == "cuda":
        need = model_entry(name).min_gpu_gib
        if gpu_gib is not None and gpu_gib < need:
            return (f"The GPU has {gpu_gib:.1f} GiB; model {name} wants about {need} GiB. If it runs out of "
                    f"memory, choose device 'cpu' or fewer samples.")
    elif device_type == "cpu" and requested == "auto" and name.startswith("vit"):
        return "No usable GPU: SAM models on the CPU take minutes per ROI."
    return None


def _error_kind(error: BaseException) -> str:
    from ProbSAMLib.errors import is_gpu_out_of_memory
    from ProbSAMLib.errors import Cancelled

    if isinstance(error, Cancelled):
        return "cancelled"
    if is_gpu_out_of_memory(error) or "out of GPU memory" in str(error) or isinstance(error, MemoryError):
        return "out_of_memory"
    return "error"


def serve() -> int:
    """Serve requests on stdin until the client quits or closes it; frames go out on the real stdout."""
    outbox = os.fdopen(os.dup(sys.stdout.fileno()), "wb")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # stray prints (C or Python) go to stderr
    sys.stdout = sys.stderr
    Server(sys.stdin.buffer, outbox).serve()
    return 0


def main() -> int:
    """The process's exit status. A failure of the server itself (the client gone mid-frame, Ctrl-C in the
    terminal Slicer runs in) ends with one line on stderr, which the client shows; errors of a request go
    to the client as frames and the server lives on."""
    from ProbSAMLib.errors import run_main

    return run_main("probsam-worker", serve)


if __name__ == "__main__":
    sys.exit(main())
