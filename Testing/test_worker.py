"""ProbSAMLib.app.worker, the sampling server the Slicer module runs in a child process: its protocol on
stdout only, even when libraries print, and cancel by request id. Waits on the worker's pipes."""

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


def request(rid, weights):
    return {"type": "sample", "id": rid, "model": {"name": "file", "checkpoint": str(weights), "device": "cpu"},
            "ijk_to_ras": np.eye(4), "size_ijk": (16, 16, 3), "lo": (4, 4, 0), "hi": (12, 12, 3), "n_samples": 2,
            "seed": 0}


def test_frames_only_on_stdout_and_cancel_by_request_id(noisy_worker, weights):
    """A cancelled request id fails as "cancelled"; the next id runs, and everything the libraries print
    goes to stderr while stdout carries intact frames only."""
    write_frame(noisy_worker.stdin, {"type": "cancel", "id": 7})
    write_frame(noisy_worker.stdin, request(7, weights))
    message = read_frame(noisy_worker.stdout)
    assert (message["type"], message["id"], message["kind"]) == ("error", 7, "cancelled")

    write_frame(noisy_worker.stdin, request(8, weights))
    window = read_frame(noisy_worker.stdout)
    assert window["type"] == "window" and window["id"] == 8
    k0, k1, r0, r1, c0, c1 = window["region"]
    assert (k0, k1) == (0, 3) and r0 <= 4 and r1 >= 12 and c0 <= 4 and c1 >= 12  # the box's block, at least
    values = np.full((k1 - k0, r1 - r0, c1 - c0), -800.0, np.float32)
    write_frame(noisy_worker.stdin, {"type": "region", "id": 8, "values": values})
    kinds = []
    while True:
        message = read_frame(noisy_worker.stdout)
        kinds.append(message["type"])
        if message["type"] != "progress":
            break
    assert message["type"] == "result", message
    assert message["masks"].shape == (2, 3, 8, 8) and message["entropy"].shape == (3, 8, 8)
    assert message["lo"] == (4, 4, 0) and len(message["colors"]) == 2 and message["model"]["loads"] == 1
    assert "progress" in kinds
    write_frame(noisy_worker.stdin, {"type": "quit"})
    out, err = noisy_worker.communicate(timeout=60)
    assert out == b"" and noisy_worker.returncode == 0
    assert b"a library printing on stdout" in err and b"a C library writing to fd 1" in err


def test_device_warnings_come_from_the_worker():
    """The worker checks the device (Slicer's own process never initialises CUDA)."""
    from ProbSAMLib.weights.registry import MODELS
    from ProbSAMLib.app.worker import device_warning

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

    def receive():
        assert select.select([from_server], [], [], 60)[0], "no frame from the server within 60 s"
        return read_frame(from_server)

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
    assert result["model"]["loads"] == 1 and not result["model"]["reused"] and result["lo"] == (4, 4, 0)
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
    from ProbSAMLib.app.worker import _error_kind
    from ProbSAMLib.errors import Cancelled

    assert _error_kind(Cancelled("stop")) == "cancelled"
    assert _error_kind(MemoryError()) == "out_of_memory"
    assert _error_kind(RuntimeError("CUDA out of memory. Tried to allocate 2 GiB")) == "out_of_memory"
    assert _error_kind(ValueError("the sampler ran out of GPU memory at 16 samples")) == "out_of_memory"
    assert _error_kind(ValueError("box outside the image")) == "error"


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
    from ProbSAMLib.app.worker import cut_to_roi
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
