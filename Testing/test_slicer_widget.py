"""The module's WIDGET on REAL Slicer core: its code runs on the real scene, logic and worker; only the Qt
widgets are stand-ins (Testing/slicer_standin/widgets.py reads the module's real .ui into plain objects;
the tests click them and tick the timer the way Qt would).

- the Sample button follows volumes and ROIs added or removed while the module is open;
- a full run through the button: status, results table, the samples' visibility, the overlay choice;
- the results come back in the table after the scene is saved and loaded again;
- cleanup() stops the timer, the run and the worker;
- torch never enters Slicer's process: the whole widget path (finish, cancel, error) in a fresh Python
  process, then ``"torch" not in sys.modules`` (a subprocess, because this test process imports torch).
"""

import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from slicer_scene import (BLOB_CENTRE_IJK, add_oblique_volume, add_rotated_roi, module, save_and_reload_scene,  # noqa: F401
                          shared_worker, slicer, tiny_weights)

ROOT = Path(__file__).resolve().parents[1]


def make_widget(module, weights=None, samples=2):
    widget = module.ProbSAMSlicerWidget()
    widget.setup()
    if weights is not None:
        p = widget._parameterNode
        p.model, p.checkpointPath, p.device, p.numberOfSamples = "file", str(weights), "cpu", samples
    return widget


def run_to_end(widget, limit_s=120.0) -> str:
    """Tick the widget's timer (as Qt would every POLL_MS) until the run ends; the status line."""
    end = time.monotonic() + limit_s
    while widget._timer.active:
        assert time.monotonic() < end, "the run did not end"
        widget._run.poll(timeout=0.2) if widget._run is not None else None
        widget.onPollJob()
    return widget.ui.statusLabel.text


def test_sample_button_follows_nodes_added_and_removed(slicer, module):
    widget = make_widget(module)
    button = widget.ui.sampleButton
    assert not button.enabled and "volume" in button.toolTip
    volume = add_oblique_volume(slicer)  # the scene's NodeAddedEvent: the empty selector takes it
    assert widget._parameterNode.inputVolume is volume and not button.enabled and "ROI" in button.toolTip
    roi = add_rotated_roi(slicer, volume, BLOB_CENTRE_IJK, (18.0, 16.0, 9.0))
    assert widget._parameterNode.roi is roi and button.enabled
    slicer.mrmlScene.RemoveNode(roi)
    assert not button.enabled
    widget.cleanup()


def test_widget_run_table_samples_overlay_reload_and_cleanup(slicer, module, shared_worker, tiny_weights, tmp_path):
    module.sampling_process.set_shared_worker(shared_worker)
    volume = add_oblique_volume(slicer)
    add_rotated_roi(slicer, volume, BLOB_CENTRE_IJK, (18.0, 16.0, 9.0), degrees=0)
    views = [slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSliceCompositeNode") for _ in range(3)]
    widget = make_widget(module, tiny_weights, samples=2)
    widget.ui.sampleButton.click()
    assert widget._timer.active and widget.ui.cancelButton.enabled and not widget.ui.sampleButton.enabled
    status = run_to_end(widget)
    assert status.startswith("Done") and "not for clinical use" in status
    assert "Warning:" in status and "rotated" in status  # the oblique CT: the ROI's hull, said aloud
    rows = widget.ui.resultsTable.rowTexts()
    assert [r[1] for r in rows[:4]] == ["Sample 01", "Sample 02", "mean", "sd"]
    assert rows[4][1:] == ["marking share", "", "", "n/a"] and rows[5][1] == "warning"
    out = widget._outputs[-1]
    display = out.segmentationNode.GetDisplayNode()
    assert widget.ui.sampleSpinBox.maximum == 2
    widget.ui.showSamplesCheckBox.checked = True  # one click shows them
    assert all(display.GetSegmentVisibility(s) for s in out.sampleSegmentIds())
    widget.ui.sampleSpinBox.value = 2  # only sample 2
    assert [display.GetSegmentVisibility(s) for s in out.sampleSegmentIds()] == [False, True]
    assert display.GetSegmentVisibility("Consensus")
    assert {v.GetForegroundVolumeID() for v in views} == {out.mapNodes["entropy"].GetID()}
    widget._parameterNode.uncertaintyKind = "mutual_information"  # the overlay follows the selector
    assert {v.GetForegroundVolumeID() for v in views} == {out.mapNodes["mutual_information"].GetID()}

    save_and_reload_scene(slicer, tmp_path / "scene")  # File -> Save, Close, Load
    assert widget.ui.resultsTable.rowTexts() == rows
    assert widget.ui.sampleSpinBox.maximum == 2 and len(widget._outputs) == 1
    reloaded = widget._outputs[0]
    assert reloaded.segmentationNode.GetNodeReference("ProbSAMROI") is not None
    assert sorted(reloaded.mapNodes) == sorted(module.UNCERTAINTY_KINDS)

    widget._parameterNode.inputVolume = slicer.util.getNode("CT")
    widget.ui.sampleButton.click()  # cleanup mid-run: the timer stops and the worker ends
    assert widget._timer.active
    widget.cleanup()
    assert not widget._timer.active and widget._run is None and not shared_worker.alive


# --- torch stays out of Slicer's process --------------------------------------------------------------------
def drive_widget_paths(weights: str) -> None:
    """Run in a fresh process (see the test below): finish, cancel and error through the widget."""
    import slicer_standin

    slicer = slicer_standin.install()
    import ProbSAMSlicer

    volume = add_oblique_volume(slicer)
    add_rotated_roi(slicer, volume, BLOB_CENTRE_IJK, (18.0, 16.0, 9.0))
    widget = make_widget(ProbSAMSlicer, weights, samples=2)
    widget.ui.sampleButton.click()
    assert run_to_end(widget).startswith("Done"), widget.ui.statusLabel.text
    widget.ui.sampleButton.click()
    widget.ui.cancelButton.click()
    assert run_to_end(widget).startswith("Cancelled"), widget.ui.statusLabel.text
    widget._parameterNode.checkpointPath = str(Path(weights).with_name("missing.safetensors"))
    widget.ui.sampleButton.click()
    assert run_to_end(widget).startswith("Failed"), widget.ui.statusLabel.text
    loaded = sorted(name for name in sys.modules if name.split(".")[0] in ("torch", "ProbSAMLib"))
    widget.cleanup()
    slicer_standin.uninstall()
    assert "torch" not in sys.modules, loaded
    print("torch-free:", " ".join(loaded))


def test_torch_never_enters_slicers_process(tiny_weights):
    code = ("import sys; sys.path.insert(0, 'Testing'); import test_slicer_widget as t; "
            "t.drive_widget_paths(sys.argv[1])")
    done = subprocess.run([sys.executable, "-c", code, str(tiny_weights)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    loaded = done.stdout.split("torch-free:", 1)[1].split()
    assert "ProbSAMLib.inference.agreement" in loaded  # the module did run its result path
    assert not [name for name in loaded if name.startswith("torch")]
    assert "ProbSAMLib.inference.volume" not in loaded and "ProbSAMLib.weights.build" not in loaded
