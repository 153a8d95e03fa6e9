"""The Slicer module's sampling worker under faults, on REAL Slicer core: each row of FAULTS is a worker that
speaks the protocol badly (a real Python process, started by the module's own WorkerProcess through a
stand-in interpreter), run through the Logic's ``process()``; each must end with one clear line and leave
the scene exactly as it was. Then the same Logic recovers on the real worker (a noisy, slow-loading one),
a real worker that hangs is stopped by the silence timeout, a second run while one is going is refused, and
a failure on Slicer's side (reading the CT block) ends the run and frees the worker.
POSIX only (the stand-in interpreter is a shell script; signals).
"""

import os
import signal
import sys

import numpy as np
import pytest

from slicer_scene import module, node_ids, nodes_of_class, slicer, tiny_weights  # noqa: F401

pytestmark = pytest.mark.skipif(os.name != "posix", reason="stand-in interpreter is a shell script")
SILENCE_SETTING = "ProbSAM/WorkerSilenceTimeoutSeconds"

FAKE_WORKER = r'''
import os, pickle, signal, struct, sys, time
from ProbSAMLib.app.worker import read_frame, write_frame

MODE = os.environ["FAKE_WORKER_MODE"]
out = os.fdopen(os.dup(1), "wb")
os.dup2(2, 1)


def log(text):
    with open(os.environ["FAKE_WORKER_LOG"], "a", encoding="utf-8") as fh:
        fh.write(text + "\n")


if MODE == "crash":
    sys.stderr.write("Traceback (most recent call last):\nModuleNotFoundError: No module named 'torch'\n")
    sys.exit(1)
while True:
    request = read_frame(sys.stdin.buffer)
    if request is None or request["type"] == "quit":
        sys.exit(0)
    log(request["type"])
    if request["type"] != "sample":
        continue
    rid, (i0, j0, k0), (i1, j1, k1) = request["id"], request["lo"], request["hi"]
    if MODE == "garbage":
        out.write(b"Segmentation done, 12 slices\n"); out.flush()
    elif MODE == "cut":
        out.write(struct.pack("<Q", 4000) + b"PSW1" + b"\0" * 96); out.flush()
        sys.exit(0)
    elif MODE == "pickle":
        data = pickle.dumps({"type": "window", "id": rid, "region": [0, 1, 0, 1, 0, 1]})
        out.write(struct.pack("<Q", len(data)) + data); out.flush()
    elif MODE == "oversized":
        out.write(struct.pack("<Q", 5 * 2 ** 30)); out.flush()
    elif MODE == "no_region":
        write_frame(out, {"type": "window", "id": rid})
    elif MODE == "wrong_result":
        box = (k1 - k0 + 1, j1 - j0, i1 - i0)  # one slice too many
        write_frame(out, {"type": "result", "id": rid, "masks": __import__("numpy").zeros((2,) + box, bool)})
    elif MODE == "killed_mid_send":
        out.write(struct.pack("<Q", 10 ** 7) + b"PSW1" + b"\0" * 10 ** 6); out.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    elif MODE == "busy":  # answers nothing but its heartbeat: a long, healthy run
        pass
    elif MODE == "window":  # asks for a block, then reads on (a "cancel" is logged)
        write_frame(out, {"type": "window", "id": rid, "region": [0, 1, 0, 1, 0, 1]})
    if MODE in ("silent", "busy", "garbage", "pickle", "oversized"):
        for _ in range(300):  # 30 s at most: a client that never gives up fails its test instead of hanging it
            time.sleep(0.1)
            if MODE == "busy":
                write_frame(out, {"type": "heartbeat", "id": rid})
        sys.exit(3)
'''

# The real worker, with a model load that prints (from Python and at the C level, on fd 1) and takes longer
# than the silence timeout used below: its heartbeat must keep the run alive. (Patched on the model cache,
# so that torch is imported inside the request, as in the real worker, not before it serves.)
NOISY_SLOW_WORKER = r'''
import os, sys, time
from ProbSAMLib.app import jobs, worker

real = jobs.ModelCache.get
def noisy_slow(self, spec):
    print("a library printing on stdout")
    os.write(1, b"a C library writing to fd 1\n")
    time.sleep(4)
    return real(self, spec)
jobs.ModelCache.get = noisy_slow
worker.HEARTBEAT_S = 0.2
sys.argv = [sys.argv[0]] + sys.argv[3:]  # drop "-m ProbSAMLib.app.worker"
sys.exit(worker.main())
'''

# fault -> fake worker mode -> what Slicer shows (a fragment of the run's one-line error)
FAULTS = [
    ("garbage bytes on stdout", "garbage", "sent a damaged message (a message of"),
    ("a frame cut short, then the worker exits", "cut",
     "sent a damaged message (the message was cut short: 100 of 4000"),
    ("a pickle instead of a wire message", "pickle", "sent a damaged message (not a ProbSAM message (wrong magic"),
    ("a frame above the size limit", "oversized", "5368709120 bytes was announced; the limit is 4294967296 bytes"),
    ("a message without its fields", "no_region", "its 'window' message has no valid field 'region'"),
    ("a result that does not fit the box", "wrong_result", "the result's field 'masks' is bool (2, 7, 20, 20)"),
    ("killed (SIGKILL) while sending", "killed_mid_send", "was killed by signal 9 before it finished"),
    ("never answers", "silent", "sent nothing for 1 s (not even its heartbeat) and was stopped"),
    ("crashes at start", "crash", "exited with status 1 before it finished (out of memory, or a crash in PyTorch). "
                                  "Nothing was added to the scene. Try device 'cpu' or fewer samples. "
                                  "Its last output: ModuleNotFoundError: No module named 'torch'"),
]


def interpreter(tmp_path, script_text: str, name: str) -> str:
    """An executable the module's WorkerProcess starts as its Python: it runs ``script_text`` with the
    arguments the module passes ("-m ProbSAMLib.app.worker --idle-timeout N")."""
    script = tmp_path / f"{name}.py"
    script.write_text(script_text, encoding="utf-8")
    wrapper = tmp_path / name
    wrapper.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{script}" "$@"\n', encoding="utf-8")
    wrapper.chmod(0o755)
    return str(wrapper)


def small_scene(slicer):
    k, j, i = np.mgrid[:6, :32, :32]
    array = np.where((i - 16) ** 2 + (j - 16) ** 2 < 25, 40.0, -800.0).astype(np.float32)
    volume = slicer.util.addVolumeFromArray(array, np.eye(4), "CT")
    roi = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "Nodule")
    roi.SetCenter(15.5, 15.5, 2.5)  # IJKToRAS is the identity: voxels 6..25 x 6..25 x 0..5
    roi.SetSize(20.0, 20.0, 6.0)
    return volume, roi


@pytest.fixture
def fake_logic(module, tmp_path, monkeypatch):
    """A logic whose session worker is the fake worker."""
    import qt

    monkeypatch.setenv("FAKE_WORKER_LOG", str(tmp_path / "received.log"))
    worker = module.sampling_process.WorkerProcess(python=interpreter(tmp_path, FAKE_WORKER, "fake_python"),
                                                   idle_timeout=0)
    module.sampling_process.set_shared_worker(worker)
    yield module.ProbSAMSlicerLogic()
    qt.QSettings.values.clear()
    worker.kill()
    module.sampling_process.set_shared_worker(None)


def run_fault(slicer, logic, volume, roi, monkeypatch, mode: str) -> str:
    """The Logic's process() on a fake worker in ``mode``: the error's text, checked to be one line, with
    the scene unchanged and the worker gone (the next run starts a new one)."""
    import qt

    monkeypatch.setenv("FAKE_WORKER_MODE", mode)
    # 1 s for the worker that never answers; the others must be caught for what they are, not as silence
    # (a process start on a loaded machine can take a second)
    qt.QSettings.values[SILENCE_SETTING] = "1" if mode == "silent" else "20"
    before = node_ids(slicer)
    with pytest.raises(slicer_error(logic)) as failed:
        logic.process(volume, [roi], numberOfSamples=2, seed=0, device="cpu")
    assert node_ids(slicer) == before, mode  # not one node added, half-built or otherwise
    assert not logic.worker.alive, mode
    text = str(failed.value)
    assert "\n" not in text and "Nothing was added to the scene" in text, text
    return text


def slicer_error(logic):
    import ProbSAMSlicerLib.sampling_process as process

    return process.WorkerError


def test_worker_fault_table_then_recovery_on_the_real_worker(slicer, module, fake_logic, tiny_weights, tmp_path,
                                                              monkeypatch):
    """Every row: its one-line message, no node added, the worker gone. Then the same logic, given the real
    worker (noisy on stdout at the C level, loading for longer than a 3 s silence timeout), starts a new
    process and builds the result; and that real worker, frozen (SIGSTOP) after the first of two ROIs' results
    arrived, is stopped by the silence timeout with the scene unchanged (nodes are built only from a whole
    run)."""
    volume, roi = small_scene(slicer)
    for fault, mode, shown in FAULTS:
        text = run_fault(slicer, fake_logic, volume, roi, monkeypatch, mode)
        assert shown in text, (fault, text)

    import qt

    worker = fake_logic.worker
    worker.python = interpreter(tmp_path, NOISY_SLOW_WORKER, "noisy_python")
    qt.QSettings.values[SILENCE_SETTING] = "3"  # the model loads for 4 s
    before = len(nodes_of_class(slicer, "vtkMRMLSegmentationNode"))
    built = fake_logic.process(volume, [roi], numberOfSamples=2, seed=0, model="file",
                               checkpointPath=str(tiny_weights), device="cpu")
    assert len(built) == 1 and len(nodes_of_class(slicer, "vtkMRMLSegmentationNode")) == before + 1
    assert "a C library writing to fd 1" in worker.stderr_tail(40)

    # Two ROIs; the worker hangs (SIGSTOP) just as the second is asked for, after the first result arrived.
    second_roi = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "Second")
    second_roi.SetCenter(15.5, 15.5, 2.5)
    second_roi.SetSize(10.0, 10.0, 6.0)
    nodes = node_ids(slicer)
    qt.QSettings.values[SILENCE_SETTING] = "1"
    real_submit = module.sampling_process.SamplingRun._submit

    def submit_then_hang(run, index):
        if index == 1:
            os.kill(worker.process.pid, signal.SIGSTOP)  # hung: not even its heartbeat gets out
        real_submit(run, index)

    monkeypatch.setattr(module.sampling_process.SamplingRun, "_submit", submit_then_hang)
    settings = module.SamplingSettings(2, 0, "file", str(tiny_weights), "", "cpu", "entropy")
    run = fake_logic.startProcessing(volume, [roi, second_roi], settings)
    with pytest.raises(module.sampling_process.WorkerError, match="sent nothing for 1 s"):
        run.wait()
    assert len(run.results) == 1  # the first ROI's result had arrived...
    assert not worker.alive and node_ids(slicer) == nodes  # ...and still nothing was added: all or nothing


def test_a_second_run_while_one_is_going_is_refused(slicer, module, fake_logic, monkeypatch, tmp_path):
    """Two runs on the session's one worker (the widget's and a script's, or two logics'): the second is
    refused with a clear message before it sends anything, the first goes on; once the first is cancelled
    (and dropped unpolled, as when its scene closes) the next run starts."""
    from ProbSAMLib.errors import Cancelled

    import qt

    monkeypatch.setenv("FAKE_WORKER_MODE", "busy")  # heartbeats only: a long, healthy run
    qt.QSettings.values[SILENCE_SETTING] = "1"
    volume, roi = small_scene(slicer)
    settings = module.SamplingSettings(2, 0, "lite_medsam", "", "", "cpu", "entropy")
    first = fake_logic.startProcessing(volume, [roi], settings)
    first.poll(timeout=0.5)
    before = node_ids(slicer)
    other = module.ProbSAMSlicerLogic()  # another logic: the same session worker
    with pytest.raises(module.sampling_process.WorkerBusy, match="a sampling run is already in progress"):
        other.process(volume, [roi], numberOfSamples=2, device="cpu")
    with pytest.raises(module.sampling_process.WorkerBusy):
        fake_logic.startProcessing(volume, [roi], settings)
    assert not first.poll(timeout=1.5) and node_ids(slicer) == before  # heartbeats: still running, past 1 s
    received = (tmp_path / "received.log").read_text(encoding="utf-8").split()
    assert received == ["sample"]  # the refused runs sent nothing

    first.cancel()  # the fake ignores it: killed after the grace time, by the next run's claim
    second = fake_logic.startProcessing(volume, [roi], settings)
    assert first.done and isinstance(first.error, Cancelled)
    assert fake_logic.worker.current_run is second
    second.cancel()
    with pytest.raises(Cancelled):
        second.wait()
    assert fake_logic.worker.current_run is None and node_ids(slicer) == before


def test_a_failure_on_slicers_side_ends_the_run_and_frees_the_worker(slicer, module, fake_logic, monkeypatch,
                                                                     tmp_path):
    """Reading the CT block fails in Slicer (here: the volume lost its image data): the run ends with one
    line, the worker is told to drop the request and stays up for the next run, nothing is added."""
    import time

    monkeypatch.setenv("FAKE_WORKER_MODE", "window")
    volume, roi = small_scene(slicer)

    def no_image(node):
        raise RuntimeError("the volume has no image data")

    monkeypatch.setattr(slicer.util, "arrayFromVolume", no_image)
    before = node_ids(slicer)
    with pytest.raises(module.sampling_process.WorkerError) as failed:
        fake_logic.process(volume, [roi], numberOfSamples=2, device="cpu")
    assert str(failed.value) == ("Reading the CT block for the sampling process failed: the volume has no image "
                                 "data. Nothing was added to the scene.")
    assert node_ids(slicer) == before and fake_logic.worker.current_run is None and fake_logic.worker.alive
    log = tmp_path / "received.log"
    deadline = time.monotonic() + 30
    while log.read_text(encoding="utf-8").split() != ["sample", "cancel"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert log.read_text(encoding="utf-8").split() == ["sample", "cancel"]
