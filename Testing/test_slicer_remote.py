"""The module's remote mode on REAL Slicer core (Qt widgets are the stand-ins of Testing/slicer_standin):

- the server's URL and token go to Slicer's settings (qt.QSettings), never into the parameter node or a
  saved scene;
- a run with a server gives the same results as the same run on this computer (the worker relays it to
  a real ``probsam serve`` on loopback), and the widget's run in remote mode goes to the server;
- "Test connection" is answered by the worker process: one line on success, the reason on failure.
"""

import numpy as np
import pytest

pytest.importorskip("fastapi")

from slicer_scene import (BLOB_CENTRE_IJK, add_oblique_volume, add_rotated_roi, logic, module,  # noqa: F401
                          save_and_reload_scene, shared_worker, slicer, tiny_weights)
from test_slicer_widget import make_widget, run_to_end  # noqa: E402

from Testing.test_server import TOKEN, plain, running_server  # noqa: E402


@pytest.fixture
def settings(slicer, monkeypatch):
    """Slicer's application settings (the stand-in's one dict), empty for this test."""
    import qt

    monkeypatch.setattr(qt.QSettings, "values", {})
    return qt.QSettings.values


@pytest.fixture(scope="module")
def server(tiny_weights):
    from ProbSAMLib.app.server.model import ServedModel

    with running_server(ServedModel("file", tiny_weights, device="cpu")) as (url, jobs):
        yield url, jobs


def enter_server(widget, url, token):
    """Type into the server fields as a user would (each field's editingFinished fires)."""
    for edit, text in ((widget.ui.serverUrlLineEdit, url), (widget.ui.serverTokenLineEdit, token)):
        edit.text = text
        edit.emit("editingFinished")


def test_token_is_kept_in_slicers_settings_not_in_the_scene(slicer, module, settings, tmp_path):
    volume = add_oblique_volume(slicer)
    add_rotated_roi(slicer, volume, BLOB_CENTRE_IJK, (18.0, 16.0, 9.0))
    widget = make_widget(module)
    assert widget.ui.serverStatusLabel.text.startswith("Local mode")
    enter_server(widget, "https://gpu-box:8765", TOKEN)
    assert settings["ProbSAM/ServerURL"] == "https://gpu-box:8765" and settings["ProbSAM/ServerToken"] == TOKEN
    assert widget.ui.serverStatusLabel.text == "Remote mode: sampling runs on https://gpu-box:8765."
    assert module.ProbSAMSlicerLogic.settingsFromParameters(widget._parameterNode).server == {
        "url": "https://gpu-box:8765", "token": TOKEN, "cafile": None}
    assert TOKEN not in repr(module.ProbSAMSlicerLogic.settingsFromParameters(widget._parameterNode))

    node = widget._parameterNode.parameterNode  # the MRML node behind the parameters: saved with the scene
    names = node.GetParameterNames()
    assert "model" in names and all(TOKEN not in node.GetParameter(n) and "gpu-box" not in node.GetParameter(n)
                                    for n in names)
    save_and_reload_scene(slicer, tmp_path / "scene")
    saved = b"".join(path.read_bytes() for path in (tmp_path / "scene").iterdir())
    assert b"ProbSAM" in saved and TOKEN.encode() not in saved and b"gpu-box" not in saved
    widget.cleanup()


def test_remote_run_equals_the_local_run_and_the_widget_uses_the_server(slicer, module, logic, settings,
                                                                       tiny_weights, server, shared_worker,
                                                                       monkeypatch):
    import torch

    url, jobs = server
    # The server runs in this process: a worker with the same CPU thread count sums floats the same way
    # (the next run starts a new one with this setting).
    monkeypatch.setenv("OMP_NUM_THREADS", str(torch.get_num_threads()))
    shared_worker.stop()
    volume = add_oblique_volume(slicer)
    roi = add_rotated_roi(slicer, volume, BLOB_CENTRE_IJK, (18.0, 16.0, 9.0))
    settings_local = module.SamplingSettings(2, 5, "file", str(tiny_weights), "", "cpu")
    local = logic.startProcessing(volume, [roi], settings_local).wait()
    fetched = jobs.info()["counts"].get("fetched", 0)
    remote_settings = module.SamplingSettings(2, 5, "file", "", "", "cpu", server={"url": url, "token": TOKEN})
    remote = logic.startProcessing(volume, [roi], remote_settings).wait()
    assert jobs.info()["counts"]["fetched"] == fetched + 1  # it did go to the server
    for name in ("masks", "consensus", "informative", "entropy", "variance", "mutual_information",
                 "mean_probability", "agreement", "roi_cut", "colors"):
        assert plain(local[0][name]) == plain(remote[0][name]), name
    assert np.asarray(remote[0]["masks"]).shape[0] == 2

    widget = make_widget(module, tiny_weights, samples=2)
    widget._parameterNode.checkpointPath = ""  # the server has its own weights: none needed here
    assert not widget.ui.sampleButton.enabled
    enter_server(widget, url, TOKEN)
    assert widget.ui.sampleButton.enabled
    widget.ui.sampleButton.click()
    assert run_to_end(widget).startswith("Done"), widget.ui.statusLabel.text
    assert jobs.info()["counts"]["fetched"] == fetched + 2 and jobs.info()["states"] == {}
    widget.cleanup()


def test_test_connection_is_answered_by_the_worker(slicer, module, logic, settings, server):
    url, _ = server
    widget = make_widget(module)

    def test_connection() -> str:
        widget.ui.testConnectionButton.click()
        assert not widget.ui.testConnectionButton.enabled  # one at a time; sampling waits too
        while widget._connectionTimer.active:
            widget._connectionTest.poll(timeout=0.2) if widget._connectionTest is not None else None
            widget.onPollConnection()
        assert widget.ui.testConnectionButton.enabled
        return widget.ui.serverStatusLabel.text

    widget.ui.testConnectionButton.click()
    assert widget.ui.serverStatusLabel.text.startswith("Enter the server's URL first")
    enter_server(widget, url, TOKEN)
    assert test_connection().startswith(f"connected to probsam 0.1.0 at {url}: model file")
    enter_server(widget, url, "wrong-token-0123456789")
    assert test_connection() == f"Connection failed: the server at {url} refused the token: check the token in " \
                                "the server settings"
    enter_server(widget, "http://127.0.0.1:9", TOKEN)  # the discard port: nothing listens there
    assert "connection refused" in test_connection()
    widget.cleanup()
