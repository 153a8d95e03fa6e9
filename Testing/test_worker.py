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
