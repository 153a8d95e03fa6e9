"""ProbSAMLib.app.worker, the sampling server the Slicer module runs in a child process: its protocol on
stdout only, even when libraries print, cancel by request id, its frames (wire messages, never pickle;
size limits checked before anything is allocated) and its heartbeat. Waits on the worker's pipes."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ProbSAMLib.app.worker import read_frame, write_frame

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    from ProbSAMLib import ProbSAMConfig
    from ProbSAMLib.weights.build import build_probsam
    from ProbSAMLib.weights.checkpoints import save_probsam

    path = tmp_path_factory.mktemp("w") / "tiny.safetensors"
    save_probsam(build_probsam(ProbSAMConfig.preset("tiny"), seed=0), path)
    return path


@pytest.fixture
def noisy_worker(tmp_path):
    """The worker with load_model wrapped to print on stdout from Python and write to fd 1 directly."""
    script = tmp_path / "noisy_worker.py"
    script.write_text(
        "import os, sys\n"
        f"sys.path.insert(0, {str(ROOT)!r})\n"
        "import ProbSAMLib.weights.build as build\n"
        "real = build.load_model\n"
        "def noisy(*args, **kwargs):\n"
        "    print('a library printing on stdout')\n"
        "    os.write(1, b'a C library writing to fd 1\\n')\n"
        "    return real(*args, **kwargs)\n"
        "build.load_model = noisy\n"
        "from ProbSAMLib.app import worker\n"
        "sys.exit(worker.main())\n")
    process = subprocess.Popen([sys.executable, str(script)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE)
    yield process
    if process.poll() is None:
        process.kill()
    process.wait()


def next_frame(stream):
    """The next frame that is not a heartbeat (the worker sends one every HEARTBEAT_S while it works)."""
    message = read_frame(stream)
    while message is not None and message["type"] == "heartbeat":
        message = read_frame(stream)
    return message


def request(rid, weights):
    return {"type": "sample", "id": rid, "model": {"name": "file", "checkpoint": str(weights), "device": "cpu"},
            "ijk_to_ras": np.eye(4), "size_ijk": (16, 16, 3), "lo": (4, 4, 0), "hi": (12, 12, 3), "n_samples": 2,
            "seed": 0}


def test_frames_only_on_stdout_and_cancel_by_request_id(noisy_worker, weights):
    """A cancelled request id fails as "cancelled"; the next id runs, and everything the libraries print
    goes to stderr while stdout carries intact frames only."""
    write_frame(noisy_worker.stdin, {"type": "cancel", "id": 7})
    write_frame(noisy_worker.stdin, request(7, weights))
    message = next_frame(noisy_worker.stdout)
    assert (message["type"], message["id"], message["kind"]) == ("error", 7, "cancelled")

    write_frame(noisy_worker.stdin, request(8, weights))
    window = next_frame(noisy_worker.stdout)
    assert window["type"] == "window" and window["id"] == 8
    k0, k1, r0, r1, c0, c1 = window["region"]
    assert (k0, k1) == (0, 3) and r0 <= 4 and r1 >= 12 and c0 <= 4 and c1 >= 12  # the box's block, at least
    values = np.full((k1 - k0, r1 - r0, c1 - c0), -800.0, np.float32)
    write_frame(noisy_worker.stdin, {"type": "region", "id": 8, "values": values})
    kinds = []
    while True:
        message = next_frame(noisy_worker.stdout)
        kinds.append(message["type"])
        if message["type"] != "progress":
            break
    assert message["type"] == "result", message
    assert message["masks"].shape == (2, 3, 8, 8) and message["entropy"].shape == (3, 8, 8)
    assert message["lo"] == [4, 4, 0] and len(message["colors"]) == 2 and message["model"]["loads"] == 1
    assert "progress" in kinds
    write_frame(noisy_worker.stdin, {"type": "quit"})
    out, err = noisy_worker.communicate(timeout=60)
    assert out == b"" and noisy_worker.returncode == 0
    assert b"a library printing on stdout" in err and b"a C library writing to fd 1" in err


def test_device_warnings_come_from_the_worker():
    """The worker checks the device (Slicer's own process never initialises CUDA)."""
    from ProbSAMLib.weights.registry import MODELS
    from ProbSAMLib.app.jobs import device_warning

    need = MODELS["vit_h"].min_gpu_gib
    assert "wants about" in device_warning("vit_h", "cuda", "cuda", need - 1) and "'cpu'" in \
        device_warning("vit_h", "auto", "cuda", need - 1)
    assert device_warning("vit_h", "cuda", "cuda", need + 1) is None
    assert "minutes per ROI" in device_warning("vit_b", "auto", "cpu", None)
    assert device_warning("vit_b", "cpu", "cpu", None) is None  # asked for the CPU: no surprise
    assert device_warning("demo", "auto", "cpu", None) is None


# --- the same server in this process (its code is measured by coverage; no process start-up) -------------
@pytest.fixture
def server():
    """A worker.Server on two pipes, serving on a thread of this process; yields (send, receive, close,
    thread). receive() waits at most 60 s for a frame, so a hang fails instead of blocking the suite."""
    import os
    import select
    import threading

    from ProbSAMLib.app import worker

    in_read, in_write = os.pipe()
    out_read, out_write = os.pipe()
    inbox, to_server = os.fdopen(in_read, "rb"), os.fdopen(in_write, "wb")
    outbox, from_server = os.fdopen(out_write, "wb"), os.fdopen(out_read, "rb", buffering=0)
    srv = worker.Server(inbox, outbox)
    thread = threading.Thread(target=srv.serve, name="test-worker-serve", daemon=True)
    thread.start()

    def receive(heartbeats=False):
        while True:
            assert select.select([from_server], [], [], 60)[0], "no frame from the server within 60 s"
            message = read_frame(from_server)
            if heartbeats or message is None or message["type"] != "heartbeat":
                return message

    def close():
        if not to_server.closed:
            to_server.close()

    yield (lambda message: write_frame(to_server, message)), receive, close, thread
    close()
    thread.join(60)
    for stream in (inbox, outbox, from_server):
        stream.close()


def _run_to_result(send, receive, rid):
    """Answer the window of request ``rid`` with a -800 HU block; the frames up to its result or error."""
    window = receive()
    assert (window["type"], window["id"]) == ("window", rid), window
    k0, k1, r0, r1, c0, c1 = window["region"]
    send({"type": "region", "id": 999, "values": None})  # another request's block: not taken for this one
    send({"type": "region", "id": rid, "values": np.full((k1 - k0, r1 - r0, c1 - c0), -800.0, np.float32)})
    frames = [receive()]
    while frames[-1]["type"] == "progress":
        frames.append(receive())
    return frames


def test_server_in_process_samples_reuses_the_model_and_reports_errors(server, weights, monkeypatch):
    """The worker's Server driven over pipes in this process: a request cancelled before it starts fails as
    "cancelled"; a request runs window -> region -> progress -> result; the next one with the same model
    reuses it (same masks for the same seed); a device warning is sent as a frame before the window; an
    unknown model is an "error" frame and the server lives on; a cancel while the worker waits for the block
    ends that request; a client that closes its end mid-request ends the request and the server."""
    import hashlib

    from ProbSAMLib.app import jobs, worker

    send, receive, close, thread = server
    send({"type": "cancel", "id": 7})
    send(request(7, weights))
    message = receive()
    assert (message["type"], message["id"], message["kind"]) == ("error", 7, "cancelled")

    send(request(8, weights))
    frames = _run_to_result(send, receive, 8)
    result = frames[-1]
    assert result["type"] == "result", result
    assert len(frames) > 1 and all(0 <= f["fraction"] <= 1 for f in frames[:-1])
    assert result["masks"].shape == (2, 3, 8, 8) and result["mean_probability"].shape == (3, 8, 8)
    assert result["model"]["loads"] == 1 and not result["model"]["reused"] and result["lo"] == [4, 4, 0]
    assert result["model"]["sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()

    # the device check's answer goes to the client as a warning frame (replaced here: the real check
    # warns only on a GPU or for SAM models on the CPU)
    monkeypatch.setattr(jobs, "device_warning", lambda name, requested, device, gib: f"check of {name} on {device}")
    send(request(9, weights))
    warning = receive()
    assert warning == {"type": "warning", "id": 9, "message": "check of file on cpu"}
    again = _run_to_result(send, receive, 9)[-1]
    monkeypatch.undo()
    assert again["model"]["loads"] == 1 and again["model"]["reused"]
    assert np.array_equal(again["masks"], result["masks"]) and np.array_equal(again["entropy"], result["entropy"])

    send(dict(request(10, weights), model={"name": "vit_q"}))
    error = receive()
    assert (error["type"], error["id"], error["kind"]) == ("error", 10, "error")
    assert "unknown model 'vit_q'" in error["message"] and "Traceback" in error["traceback"]

    send(request(11, weights))
    assert receive()["type"] == "window"
    send({"type": "cancel", "id": 11})
    error = receive()
    assert (error["type"], error["id"], error["kind"]) == ("error", 11, "cancelled")

    send(request(12, weights))
    assert receive()["type"] == "window"
    close()
    error = receive()
    assert (error["type"], error["id"], error["kind"]) == ("error", 12, "cancelled")
    assert "closed the connection" in error["message"]
    thread.join(60)
    assert not thread.is_alive()


def test_error_kinds_sent_to_the_client():
    """How a failed request is labelled: cancelled, out of (GPU or host) memory, or any other error."""
    from ProbSAMLib.app.jobs import error_kind
    from ProbSAMLib.errors import Cancelled

    assert error_kind(Cancelled("stop")) == "cancelled"
    assert error_kind(MemoryError()) == "out_of_memory"
    assert error_kind(RuntimeError("CUDA out of memory. Tried to allocate 2 GiB")) == "out_of_memory"
    assert error_kind(ValueError("the sampler ran out of GPU memory at 16 samples")) == "out_of_memory"
    assert error_kind(ValueError("box outside the image")) == "error"


def test_main_in_process_keeps_the_real_stdout_for_frames(tmp_path, monkeypatch):
    """worker.main() on stand-in stdin/stdout/stderr: it serves until "quit" (a stale "region" before it is
    skipped), returns 0, and afterwards what is written to the stdout descriptor or printed goes to stderr,
    while stdout itself received nothing but frames (none here)."""
    import io
    import os
    import types

    from ProbSAMLib.app import worker

    frames = io.BytesIO()
    write_frame(frames, {"type": "region", "id": 3, "values": np.zeros(2)})
    write_frame(frames, {"type": "quit"})
    frames.seek(0)
    with open(tmp_path / "out", "w") as fake_out, open(tmp_path / "err", "w") as fake_err:
        monkeypatch.setattr(sys, "stdin", types.SimpleNamespace(buffer=frames))
        monkeypatch.setattr(sys, "stdout", fake_out)
        monkeypatch.setattr(sys, "stderr", fake_err)
        assert worker.main([]) == 0
        os.write(fake_out.fileno(), b"a C library writing to fd 1\n")
        print("a library printing on stdout", flush=True)
        monkeypatch.undo()
    assert (tmp_path / "out").read_bytes() == b""
    err = (tmp_path / "err").read_text()
    assert "a C library writing to fd 1" in err and "a library printing on stdout" in err


def test_idle_server_ends_with_an_idle_frame(tmp_path):
    """No request for ``idle_timeout`` seconds: the server sends "idle" and returns (the process then ends
    with status 0, so an idle Slicer session gives its memory back)."""
    import os

    from ProbSAMLib.app import worker

    in_read, in_write = os.pipe()
    out_read, out_write = os.pipe()
    with os.fdopen(in_read, "rb") as inbox, os.fdopen(in_write, "wb"), os.fdopen(out_write, "wb") as outbox, \
            os.fdopen(out_read, "rb") as replies:
        assert worker.Server(inbox, outbox, idle_timeout=0.2).serve() == "idle"
        assert read_frame(replies) == {"type": "idle", "after_s": 0.2}
    assert worker.parse_idle_timeout([]) is None and worker.parse_idle_timeout(["--idle-timeout", "90"]) == 90.0
    with pytest.raises(SystemExit):
        worker.parse_idle_timeout(["--idle-timeout", "-1"])


def test_masks_are_cut_to_a_rotated_roi_and_the_summary_follows():
    """cut_to_roi: a box rotated 45 degrees in its voxel hull keeps only voxels whose centre is inside it;
    the consensus, agreement and summary are made again from the cut masks; the maps are 0 outside."""
    from ProbSAMLib.app.jobs import cut_to_roi
    from ProbSAMLib.geometry import VolumeGeometry, VoxelBox
    from ProbSAMLib.inference.agreement import agreement_masks
    from ProbSAMLib.inference.summary import volume_summary
    from ProbSAMLib.inference.volume import VolumeSamplingResult

    geometry = VolumeGeometry.from_ijk_to_ras(np.eye(4), (20, 20, 3))
    box = VoxelBox((3, 3, 0), (17, 17, 3))
    masks = np.ones((2, 3, 14, 14), bool)
    ones = np.ones((3, 14, 14), np.float32)
    agreement = agreement_masks(masks)
    result = VolumeSamplingResult(masks, ones * 0.9, ones, ones * 0.1, ones * 0.2, box, geometry, {},
                                  consensus=agreement["majority"], agreement=agreement)
    settings = {"seed": 0, "n_samples": 2, "device": "cpu"}
    result.summary = volume_summary(result, settings, {})
    c, s = np.cos(np.pi / 4), np.sin(np.pi / 4)
    roi = {"center_ras": [10.0, 10.0, 1.0], "axes_ras": [[c, -s, 0], [s, c, 0], [0, 0, 1]], "size_mm": [9.0, 9.0, 3.0]}
    cut = cut_to_roi(result, roi)
    ijk = np.argwhere(result.masks[0])[:, ::-1].astype(float)  # (i, j, k) in the box
    ras = ijk + [3, 3, 0]  # identity IJK -> RAS here
    local = (ras - [10.0, 10.0, 1.0]) @ np.array(roi["axes_ras"])
    assert np.all(np.abs(local) <= np.array(roi["size_mm"]) / 2 + 1e-4) and result.masks.any()
    assert cut["voxels_outside_roi"] == int((~result.masks[0]).sum()) > 0
    assert cut["mask_voxels_removed"] == 2 * cut["voxels_outside_roi"] == masks.size - 2 * result.masks[0].sum()
    np.testing.assert_array_equal(result.consensus, result.masks[0])
    assert not result.entropy[~result.masks[0]].any() and result.entropy[result.masks[0]].all()
    assert result.summary["samples"][0]["voxels"] == int(result.masks[0].sum())
    assert result.summary["roi_cut"] == cut
    assert cut_to_roi(result, None) == {"voxels_outside_roi": 0, "mask_voxels_removed": 0}


# --- frames under faults ----------------------------------------------------------------------------------
class Reads:
    """A stream that records how many bytes were asked of it (readinto), to prove a refusal came first."""

    def __init__(self, data: bytes):
        import io

        self.stream, self.asked, self.resident = io.BytesIO(data), [], []

    def readinto(self, buffer):
        self.asked.append(len(buffer))
        self.resident.append(resident_bytes())
        return self.stream.readinto(buffer)


def resident_bytes() -> int:
    """This process's resident memory now (Linux), 0 elsewhere."""
    if not os.path.exists("/proc/self/statm"):
        return 0
    with open("/proc/self/statm", encoding="utf-8") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_frames_cut_short_or_oversized_are_wire_errors_and_a_clean_end_is_none():
    import io
    import struct

    from ProbSAMLib.app import worker
    from ProbSAMLib.app.wire import WireError

    frame = io.BytesIO()
    write_frame(frame, {"type": "region", "id": 1, "values": np.ones((2, 3, 4), np.float32)})
    data = frame.getvalue()
    assert read_frame(io.BytesIO(data))["values"].shape == (2, 3, 4)
    assert read_frame(io.BytesIO(b"")) is None  # the end of the stream, between frames
    with pytest.raises(WireError, match="frame's length was cut short: 3 of 8 bytes"):
        read_frame(io.BytesIO(data[:3]))
    with pytest.raises(WireError, match=f"message was cut short: 10 of {len(data) - 8} bytes"):
        read_frame(io.BytesIO(data[:18]))
    # A forged length far above the limit: refused after reading the 8-byte prefix, nothing allocated.
    stream = Reads(struct.pack("<Q", 2 ** 62) + b"x" * 100)
    with pytest.raises(WireError, match=f"the limit is {worker.MAX_FROM_WORKER_BYTES} bytes"):
        read_frame(stream)
    assert stream.asked == [8]
    with pytest.raises(WireError, match="limit is 100 bytes"):
        read_frame(io.BytesIO(data), max_bytes=100)
    # A forged length under the limit costs only the bytes that really arrive (the buffer is not zero-filled).
    if os.path.exists("/proc/self/statm"):
        stream = Reads(struct.pack("<Q", 2 ** 30) + b"PSW1" + b"x" * 96)
        before = resident_bytes()
        with pytest.raises(WireError, match=f"message was cut short: 100 of {2 ** 30} bytes"):
            read_frame(stream)
        assert max(stream.resident) - before < 2 ** 27  # far below the 1 GiB announced
    # What one 16-sample result of the largest box a request may ask for weighs fits the limit.
    from ProbSAMLib.app.jobs import MAX_BOX_VOXELS

    assert (16 + 21) * MAX_BOX_VOXELS < worker.MAX_FROM_WORKER_BYTES


def test_a_pickled_request_ends_the_worker_and_runs_nothing(tmp_path):
    """A frame holding a pickle (whose unpickling would create a folder) is refused as not a wire message:
    the worker ends with status 2 and one line on stderr, and the folder does not exist."""
    import pickle
    import struct

    class Evil:
        def __reduce__(self):
            return os.mkdir, (str(tmp_path / "pwned"),)

    payload = pickle.dumps({"type": "sample", "id": 1, "model": Evil()})
    process = subprocess.Popen([sys.executable, "-m", "ProbSAMLib.app.worker"], cwd=ROOT, stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = process.communicate(struct.pack("<Q", len(payload)) + payload, timeout=60)
    assert process.returncode == 2 and out == b"", (process.returncode, err)
    lines = err.decode("utf-8").strip().splitlines()
    assert len(lines) == 1 and "damaged message from the client" in lines[0] and "wrong magic" in lines[0]
    assert not (tmp_path / "pwned").exists()


def test_heartbeats_while_the_model_loads(server, weights, monkeypatch):
    """The worker says it is alive while it works without other frames (a slow model load here), so a
    client can tell slow from hung."""
    import time

    from ProbSAMLib.app import jobs, worker

    monkeypatch.setattr(worker, "HEARTBEAT_S", 0.05)
    real_get = jobs.ModelCache.get
    monkeypatch.setattr(jobs.ModelCache, "get", lambda self, spec: time.sleep(0.5) or real_get(self, spec))
    send, receive, close, thread = server
    send(request(5, weights))
    beats = []
    message = receive(heartbeats=True)
    while message["type"] == "heartbeat":
        beats.append(message)
        message = receive(heartbeats=True)
    assert message["type"] == "window" and len(beats) >= 3 and all(b == {"type": "heartbeat", "id": 5} for b in beats)
    send({"type": "cancel", "id": 5})
    assert receive()["kind"] == "cancelled"


def test_a_result_too_large_to_send_is_refused_before_sampling(server, weights, monkeypatch):
    """A request whose result would exceed what a frame may weigh is answered with a clear error before any
    sampling (not sent, then refused by the client as a damaged message)."""
    from ProbSAMLib.app import worker

    monkeypatch.setattr(worker, "MAX_FROM_WORKER_BYTES", 2 ** 10)  # the box below: 192 voxels x 23 bytes
    send, receive, close, thread = server
    send(request(6, weights))
    error = receive()
    assert (error["type"], error["id"], error["kind"]) == ("error", 6, "bad_request")
    assert "would weigh" in error["message"] and "smaller ROI or fewer samples" in error["message"]


NOISY_JOB = """
import os, sys
sys.path.insert(0, {root!r})
from ProbSAMLib.app import worker
if {unredirected!r}:
    worker.os.dup2 = lambda fd, fd2: None  # the control: fd 1 left on the protocol pipe
class NoisyJob:
    def __init__(self, request, models):
        os.write(1, b"a C library writing to fd 1\\n")
        raise ValueError("the noisy job failed on purpose")
worker.SampleJob = NoisyJob
sys.exit(worker.main())
"""


@pytest.mark.parametrize("unredirected", [False, True])
def test_a_c_level_write_to_fd_1_in_a_request_cannot_corrupt_the_frames(tmp_path, unredirected):
    """os.write(1, ...) inside a request: the client reads a clean error frame and the text is on stderr.
    The control run, with the worker's redirection of fd 1 switched off, shows the write would otherwise
    land in the frames (the client gets a WireError): the first case's check can fail."""
    from ProbSAMLib.app.wire import WireError

    script = tmp_path / "noisy_job.py"
    script.write_text(NOISY_JOB.format(root=str(ROOT), unredirected=unredirected), encoding="utf-8")
    process = subprocess.Popen([sys.executable, str(script)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE)
    try:
        write_frame(process.stdin, {"type": "sample", "id": 1})
        if unredirected:
            with pytest.raises(WireError):
                read_frame(process.stdout)
            return
        message = next_frame(process.stdout)
        assert (message["type"], message["id"], message["message"]) == ("error", 1, "the noisy job failed on purpose")
        write_frame(process.stdin, {"type": "quit"})
        out, err = process.communicate(timeout=60)
        assert out == b"" and b"a C library writing to fd 1" in err and process.returncode == 0
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()


def test_a_sheared_grid_is_warned_about_in_slicer_too(server, weights):
    """The summary's geometry warning (volumes from the determinant on a sheared grid) reaches the client as
    a warning frame, so Slicer shows it as the CLI does; an orthogonal grid gets none (the test above)."""
    send, receive, close, thread = server
    sheared = np.eye(4)
    sheared[:3, 1] = [0.5, np.sqrt(0.75), 0.0]  # the j axis 30 degrees off perpendicular to i
    send(dict(request(21, weights), ijk_to_ras=sheared))
    frames = _run_to_result(send, receive, 21)
    assert frames[-1]["type"] == "warning" and "sheared" in frames[-1]["message"], frames[-1]
    result = receive()
    assert result["type"] == "result" and result["summary"]["geometry"]["warning"] == frames[-1]["message"]
    assert abs(result["summary"]["geometry"]["voxel_volume_mm3"] - np.sqrt(0.75)) < 1e-9
