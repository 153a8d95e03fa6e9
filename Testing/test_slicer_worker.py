"""The module's sampling worker process (ProbSAMLib.app.worker driven by ProbSAMSlicerLib.sampling_process),
with the scene on REAL Slicer core: one per session, shared by every logic, ended when idle (the setting
is read through the Qt stand-in's QSettings), its console hidden on Windows, restarted after a crash. Tests wait on the worker's messages and on its exit, never on sleeps;
they pause the worker with SIGSTOP to make "mid-run" deterministic (POSIX only).
"""

import os
import signal
import sys

import numpy as np
import pytest

from slicer_scene import logic, module, nodes_of_class, shared_worker, slicer, tiny_weights  # noqa: F401

pytestmark = pytest.mark.skipif(os.name != "posix", reason="pauses the worker with SIGSTOP")
N_SLICES = 24  # three chunks of eight slices on the CPU: room to act between two of them


@pytest.fixture
def own_logic(module):
    """A logic with a worker of its own (these tests stop or kill it)."""
    module.sampling_process.set_shared_worker(None)
    logic = module.ProbSAMSlicerLogic()
    yield logic
    if logic.worker.process is not None:
        os.kill(logic.worker.process.pid, signal.SIGCONT) if logic.worker.alive else None
    logic.stopWorker()


def tall_scene(slicer):
    k, j, i = np.mgrid[:N_SLICES, :48, :48]
    array = np.where((i - 24) ** 2 + (j - 24) ** 2 < 36, 40.0, -800.0).astype(np.float32)
    volume = slicer.util.addVolumeFromArray(array, np.eye(4), "tall CT")
    roi = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "tall")
    roi.SetCenter(24.0, 24.0, N_SLICES / 2 - 0.5)  # IJKToRAS is the identity
    roi.SetSize(20.0, 20.0, float(N_SLICES))
    return volume, roi


def start(module, logic, volume, roi, weights, samples=8):
    settings = module.SamplingSettings(samples, 0, "file", str(weights), "", "cpu", "entropy")
    return logic.startProcessing(volume, [roi], settings)


def wait_for_sampling(run):
    """Until the worker reports its first finished chunk (fraction > 0)."""
    while run.progress()[0] == 0.0 and not run.done:
        run.poll(timeout=30)
    assert not run.done, "the run ended before the test could act"


def test_second_run_reuses_the_loaded_model(slicer, module, logic, tiny_weights):
    volume, roi = tall_scene(slicer)
    first = start(module, logic, volume, roi, tiny_weights, samples=1)
    first.wait()
    pid = logic.worker.process.pid
    second = start(module, logic, volume, roi, tiny_weights, samples=1)
    second.wait()
    assert logic.worker.process.pid == pid
    assert first.results[0]["model"]["loads"] == second.results[0]["model"]["loads"]
    assert second.results[0]["model"]["reused"]
    np.testing.assert_array_equal(first.results[0]["masks"], second.results[0]["masks"])  # seeded


def test_cancel_mid_run_stops_it_and_keeps_the_worker(slicer, module, logic, tiny_weights, monkeypatch):
    from ProbSAMLib.errors import Cancelled

    # This test is about the worker stopping when asked; the kill after the grace time has its own test
    # below. A long grace keeps a heavily loaded machine from turning "asked" into "killed".
    monkeypatch.setattr(module.sampling_process, "CANCEL_GRACE_S", 30.0)
    volume, roi = tall_scene(slicer)
    run = start(module, logic, volume, roi, tiny_weights)
    wait_for_sampling(run)
    pid = logic.worker.process.pid
    os.kill(pid, signal.SIGSTOP)  # hold it between chunks, so the cancel lands mid-run
    run.cancel()
    os.kill(pid, signal.SIGCONT)
    with pytest.raises(Cancelled) as stopped:
        run.wait()
    # It stopped by itself (at its next slice), nobody killed it. How soon is not asserted: a loaded machine
    # (or pytest-xdist's other worker) may slow it; the grace time above is what a user would wait at most.
    assert "process was stopped" not in str(stopped.value)
    assert not run.results  # stopped mid-run: no ROI finished
    assert logic.worker.alive and logic.worker.process.pid == pid
    assert not nodes_of_class(slicer, "vtkMRMLSegmentationNode")
    again = start(module, logic, volume, roi, tiny_weights, samples=2)
    again.wait()
    assert again.results[0]["model"]["reused"]


def test_unresponsive_worker_is_killed_then_a_crash_is_a_clear_error(slicer, module, own_logic, tiny_weights):
    """A worker that does not answer Cancel is killed after the grace time; the next run starts a new one,
    and when that one dies mid-run (as under the OOM killer) the run fails clearly and adds no nodes."""
    from ProbSAMLib.errors import Cancelled

    volume, roi = tall_scene(slicer)
    run = start(module, own_logic, volume, roi, tiny_weights)
    wait_for_sampling(run)
    process = own_logic.worker.process
    os.kill(process.pid, signal.SIGSTOP)  # it cannot answer the cancel
    run.cancel()
    with pytest.raises(Cancelled, match="stopped"):
        run.wait()
    # Already reaped when the run ends: a run started right now must get a new worker, not the dying one.
    assert not own_logic.worker.alive and process.returncode == -signal.SIGKILL

    run = start(module, own_logic, volume, roi, tiny_weights)  # a new worker
    wait_for_sampling(run)
    assert own_logic.worker.process.pid != process.pid
    os.kill(own_logic.worker.process.pid, signal.SIGKILL)
    while not run.poll(timeout=30):
        pass
    with pytest.raises(module.sampling_process.WorkerError, match="killed by signal 9.*'cpu' or fewer samples"):
        own_logic.finishProcessing(run, volume)
    assert not nodes_of_class(slicer, "vtkMRMLSegmentationNode")
    assert not nodes_of_class(slicer, "vtkMRMLTableNode")


def test_out_of_memory_is_reported_with_what_to_do(module):
    import torch

    from ProbSAMLib.app.jobs import error_kind

    assert error_kind(torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB")) == "out_of_memory"
    assert error_kind(ValueError("bad box")) == "error"
    settings = module.SamplingSettings(64, 0, "vit_h", "", "", "cuda", "entropy")
    run = module.sampling_process.SamplingRun(None, [], settings, np.eye(4), (1, 1, 1), None)
    error = run._worker_error({"kind": "out_of_memory", "message": "CUDA out of memory"})
    assert "cuda device ran out of memory" in str(error) and "'cpu' or fewer samples" in str(error)


def test_worker_runs_in_slicers_python(module, tmp_path, monkeypatch):
    """PythonSlicer next to the running interpreter (as in a Slicer install) wins; else sys.executable."""
    assert module.sampling_process.python_executable() == sys.executable
    (tmp_path / "PythonSlicer").write_text("#!/bin/sh\n")
    (tmp_path / "PythonSlicer").chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(tmp_path / "SlicerApp-real"))
    assert module.sampling_process.python_executable() == str(tmp_path / "PythonSlicer")


def test_process_cancel_callback_stops_the_run_and_adds_nothing(slicer, module, logic, tiny_weights):
    """The scripting entry point: ``process(..., cancel=)`` is asked while it waits; True cancels."""
    from ProbSAMLib.errors import Cancelled

    volume, roi = tall_scene(slicer)
    asked = []
    with pytest.raises(Cancelled):
        logic.process(volume, [roi], numberOfSamples=2, seed=0, model="file", checkpointPath=str(tiny_weights),
                      device="cpu", cancel=lambda: asked.append(1) or True)
    assert asked and not nodes_of_class(slicer, "vtkMRMLSegmentationNode")


# --- one worker per session --------------------------------------------------------------------------------
def test_two_logics_share_one_worker(slicer, module, shared_worker, tiny_weights):
    module.sampling_process.set_shared_worker(shared_worker)
    first, second = module.ProbSAMSlicerLogic(), module.ProbSAMSlicerLogic()
    assert first.worker is second.worker is module.sampling_process.shared_worker()
    volume, roi = tall_scene(slicer)
    start(module, first, volume, roi, tiny_weights, samples=1).wait()
    pid = first.worker.process.pid
    run = start(module, second, volume, roi, tiny_weights, samples=1)
    run.wait()
    assert second.worker.process.pid == pid and run.results[0]["model"]["reused"]  # one process, one model


def test_idle_worker_ends_itself_and_the_next_run_starts_a_new_one(slicer, module, tiny_weights):
    """The idle time is a setting (1 s here; a few minutes by default): the worker ends by itself (status 0),
    so its memory goes back. A request that reaches it just as it ends (sent without the start-up check
    here, to make that race certain) is sent again to a new worker instead of failing."""
    import qt

    process = module.sampling_process
    assert process.DEFAULT_IDLE_TIMEOUT_S >= 60
    qt.QSettings.values[process.IDLE_TIMEOUT_SETTING] = "1"
    logic = module.ProbSAMSlicerLogic()
    try:
        volume, roi = tall_scene(slicer)
        start(module, logic, volume, roi, tiny_weights, samples=1).wait()
        first = logic.worker.process
        assert first.args[first.args.index("--idle-timeout") + 1] == "1"
        assert first.wait(60) == 0  # ended by itself, cleanly
        messages = list(iter(lambda: logic.worker.next_message(0), None))
        assert {"type": "idle", "after_s": 1.0} in messages and messages[-1]["type"] == "exit"
        for message in messages:
            logic.worker._messages.put(message)  # as they were: the run below must read the "exit" first
        settings = module.SamplingSettings(1, 0, "file", str(tiny_weights), "", "cpu", "entropy")
        run = process.SamplingRun(logic.worker, logic.prepareRequests(volume, [roi]), settings, np.eye(4),
                                  (48, 48, N_SLICES), lambda index, r: slicer.util.arrayFromVolume(volume)[
                                      r[0]:r[1], r[2]:r[3], r[4]:r[5]])
        run._submit(0)  # to the ended worker
        assert run.wait()[0]["type"] == "result"
        assert logic.worker.process.pid != first.pid
    finally:
        qt.QSettings.values.clear()
        logic.stopWorker()


def test_worker_console_is_hidden_on_windows(module, monkeypatch):
    """As slicer.util.launchConsoleProcess: STARTF_USESHOWWINDOW with SW_HIDE (Windows constants mocked)."""
    process = module.sampling_process
    assert process.hidden_console_options() == {}  # POSIX: nothing to hide

    class StartupInfo:
        dwFlags, wShowWindow = 0, 1

    monkeypatch.setattr(process.os, "name", "nt")
    monkeypatch.setattr(process.subprocess, "STARTUPINFO", StartupInfo, raising=False)
    monkeypatch.setattr(process.subprocess, "STARTF_USESHOWWINDOW", 1, raising=False)
    monkeypatch.setattr(process.subprocess, "SW_HIDE", 0, raising=False)
    info = process.hidden_console_options()["startupinfo"]
    assert info.dwFlags & 1 and info.wShowWindow == 0
    seen = {}
    monkeypatch.setattr(process.subprocess, "Popen", lambda *a, **k: seen.update(k) or (_ for _ in ()).throw(OSError("stop")))
    with pytest.raises(OSError):
        process.WorkerProcess(python=sys.executable, idle_timeout=5).ensure_started()
    assert isinstance(seen["startupinfo"], StartupInfo)
