"""ProbSAMSlicer: many plausible segmentations per box (Probabilistic SAM) in 3D Slicer.

Place one or more Markups ROIs around an object in a CT volume, click "Sample masks": each ROI gets one
segmentation node "<ROI> ProbSAM" (the consensus to edit, the N samples, the agreement levels), the four
uncertainty volumes (one shown over the CT) and a table of sizes. The sampling is
ProbSAMLib.inference.volume.sample_volume, the same path as the ``probsam`` CLI, run in a worker process.

torch never enters Slicer's process: nothing here (at import or at run time) imports torch or a
ProbSAMLib module that does; torch lives in the worker process only (Testing/test_slicer_torch_free.py).
Nothing is installed at import time either: Slicer imports every module at start-up.
"""

import logging
import os
import sys
from typing import Annotated, Optional

import qt
import vtk

import slicer
from slicer.i18n import tr as _
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (ScriptedLoadableModule, ScriptedLoadableModuleLogic,
                                           ScriptedLoadableModuleTest, ScriptedLoadableModuleWidget)
from slicer.util import VTKObservationMixin
from slicer import vtkMRMLMarkupsROINode, vtkMRMLScalarVolumeNode


def _addRepositoryRootToPath() -> None:
    """Run from a source checkout (module path added by hand), ProbSAMLib is one level up; installed, it
    sits next to this file, which Slicer already has on sys.path."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if os.path.isfile(os.path.join(root, "ProbSAMLib", "__init__.py")) and root not in sys.path:
        sys.path.append(root)


_addRepositoryRootToPath()

from ProbSAMLib import __version__ as PROBSAM_VERSION  # noqa: E402  (cheap: no torch)
from ProbSAMLib.weights.registry import DEFAULT_MODEL, MODEL_NAMES, MODELS as MODEL_ENTRIES  # noqa: E402
from ProbSAMLib.errors import Cancelled  # noqa: E402  (torch-free)
from ProbSAMSlicerLib import dependencies, outputs, results, sampling_process  # noqa: E402  (needs the path above)
from ProbSAMSlicerLib import remote_mode  # noqa: E402  (the server's settings; no HTTP in this process)
from ProbSAMSlicerLib.roi_geometry import matrix_to_numpy, roi_request_parts  # noqa: E402
from ProbSAMSlicerLib.sampling_process import SamplingRequest, SamplingRun, SamplingSettings  # noqa: E402

MODELS = list(MODEL_NAMES)
DEVICES = ["auto", "cuda", "cpu"]
UNCERTAINTY_KINDS = list(outputs.MAP_KINDS)  # entropy first: the default overlay
OUTPUT_MODES = ["replace", "new node"]  # replace the ROI's previous result (default) or add a new one
# ROIs that other modules own; "every ROI" leaves them out.
FOREIGN_ROI_USERS = ("vtkMRMLVolumeRenderingDisplayNode", "vtkMRMLCropVolumeParametersNode")


# --- module -------------------------------------------------------------------------------------------
class ProbSAMSlicer(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("ProbSAM Sampler")
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = []
        self.parent.contributors = ["ProbSAMSlicer contributors"]
        self.parent.helpText = _(
            "Probabilistic Segment Anything: place a Markups ROI around an object, click <b>Sample masks</b> "
            "and get one segmentation per ROI holding a consensus segment to edit, N plausible samples and "
            "where they agree; an uncertainty overlay (entropy, mean probability, variance or mutual "
            "information) and a table of per-sample volume and diameter.<br><br>"
            "<b>What the model is:</b> LiteMedSAM (a SAM pretrained on medical images, kept frozen) plus a "
            "latent prior; each sample is one draw of the latent, so the spread of the masks shows how "
            "uncertain the outline is, and a marking head estimates the share of readers who would mark it.<br>"
            "<b>What it is not:</b> a research model whose latent heads were trained on <i>rendered phantom "
            "data</i> (LIDC reader outlines drawn into synthetic CT); not validated on real scans, and <b>not "
            "for clinical use</b>: no diagnosis, no treatment decisions.<br><br>"
            "See docs/SLICER_GUIDE.md in the repository for installation and a walkthrough.")
        self.parent.acknowledgementText = _(
            "Built on Segment Anything (Meta AI, Apache-2.0) and 3D Slicer. The demo data derives from "
            "LIDC-IDRI reader outlines (The Cancer Imaging Archive). PyTorch is installed through the "
            "SlicerPyTorch extension.")


# --- parameters ---------------------------------------------------------------------------------------
@parameterNodeWrapper
class ProbSAMSlicerParameterNode:
    """Everything the user sets; saved with the scene."""

    inputVolume: vtkMRMLScalarVolumeNode
    roi: vtkMRMLMarkupsROINode
    allROIs: bool = False  # sample every Markups ROI in the scene, each with its own outputs
    numberOfSamples: Annotated[int, WithinRange(1, 64)] = 16
    seed: Annotated[int, WithinRange(0, 2 ** 31 - 1)] = 0  # a plain int would get a +-2^31 spin box
    model: Annotated[str, Choice(MODELS)] = DEFAULT_MODEL
    checkpointPath: str = ""  # ProbSAM weights file ("file"; heads for vit_*)
    samCheckpointPath: str = ""  # official SAM .pth for offline sites (vit_*)
    device: Annotated[str, Choice(DEVICES)] = "auto"
    uncertaintyKind: Annotated[str, Choice(UNCERTAINTY_KINDS)] = "entropy"
    outputMode: Annotated[str, Choice(OUTPUT_MODES)] = "replace"
    closedSurface: bool = False  # closed surfaces for the 3D view


# --- widget -------------------------------------------------------------------------------------------
class ProbSAMSlicerWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    POLL_MS = 100
    SCENE_EVENTS = ("NodeAddedEvent", "NodeRemovedEvent")  # inputs may appear or go while the module is open

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._run = None
        self._runVolume = None
        self._outputs = []
        self._shownKind = None
        self._timer = None
        self._connectionTest = None  # a "Test connection" in flight (remote_mode.ConnectionTest)
        self._connectionTimer = None

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/ProbSAMSlicer.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = ProbSAMSlicerLogic()
        for combo, items in ((self.ui.modelComboBox, MODELS), (self.ui.deviceComboBox, DEVICES),
                             (self.ui.uncertaintyKindComboBox, UNCERTAINTY_KINDS),
                             (self.ui.outputModeComboBox, OUTPUT_MODES)):
            if combo.count == 0:
                combo.addItems(items)
        self._timer = qt.QTimer()
        self._timer.setInterval(self.POLL_MS)
        self._timer.connect("timeout()", self.onPollJob)
        self._setupServerSection()
        self.ui.sampleButton.connect("clicked(bool)", self.onSampleButton)
        self.ui.cancelButton.connect("clicked(bool)", self.onCancelButton)
        self.ui.browseCheckpointButton.connect("clicked(bool)", lambda: self.onBrowse("checkpointPath"))
        self.ui.browseSamCheckpointButton.connect("clicked(bool)", lambda: self.onBrowse("samCheckpointPath"))
        self.ui.sampleSpinBox.connect("valueChanged(int)", self.onShowSamples)
        self.ui.showSamplesCheckBox.connect("toggled(bool)", self.onShowSamples)
        scene = slicer.mrmlScene
        self.addObserver(scene, scene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(scene, scene.EndCloseEvent, self.onSceneEndClose)
        self.addObserver(scene, scene.EndImportEvent, self.onSceneEndImport)
        for event in self.SCENE_EVENTS:
            self.addObserver(scene, getattr(scene, event), self.onNodeAddedOrRemoved)
        self.initializeParameterNode()
        self.refreshResults()

    def cleanup(self) -> None:
        """Slicer exits or reloads the module: stop the run, the timer, the observers and the worker."""
        self.onCancelButton()
        if self._timer is not None:
            self._timer.stop()
        if self._connectionTimer is not None:
            self._connectionTimer.stop()
        if self._connectionTest is not None:
            self.logic.worker.release(self._connectionTest)
            self._connectionTest = None
        self._run = None
        self.removeObservers()
        self.logic.stopWorker()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterChanged)

    def onSceneStartClose(self, caller, event) -> None:
        """A run in progress is cancelled and its results dropped: they belong to the closing scene."""
        if self._run is not None:
            self._run.cancel()
            self._timer.stop()
            self._run = None
            self.ui.statusLabel.text = _("Cancelled: the scene was closed.")
        self._outputs = []
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()
        self.refreshResults()

    def onSceneEndImport(self, caller, event) -> None:
        """A loaded scene may hold results: show them (table, samples, overlay choice)."""
        self.initializeParameterNode()
        self.refreshResults()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        self._fillEmptyInputs()

    def _fillEmptyInputs(self) -> None:
        """An empty input selector takes the first volume / ROI of the scene."""
        p = self._parameterNode
        if p is None:
            return
        if not p.inputVolume:
            volume = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if volume is not None and volume.GetAttribute(outputs.PROVENANCE_PREFIX + "Map") is None:
                p.inputVolume = volume
        if not p.roi:
            p.roi = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLMarkupsROINode")

    def onNodeAddedOrRemoved(self, caller=None, event=None) -> None:
        """A volume or ROI added or removed while the module is open: fill empty inputs, re-check the button
        (not while a scene is being loaded: EndImportEvent does it once)."""
        if slicer.mrmlScene.IsImporting() or self._parameterNode is None:
            return
        self._fillEmptyInputs()
        self._updateButtons()

    def setParameterNode(self, inputParameterNode: Optional[ProbSAMSlicerParameterNode]) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterChanged)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterChanged)
            self._updateButtons()

    def _onParameterChanged(self, caller=None, event=None) -> None:
        self._updateButtons()
        kind = self._parameterNode.uncertaintyKind if self._parameterNode else None
        if self._outputs and kind != self._shownKind:
            self._showMap()

    def _updateButtons(self, caller=None, event=None) -> None:
        problem = self.logic.inputProblem(self._parameterNode) if self._parameterNode else _("no parameters")
        running = self._run is not None
        testing = self._connectionTest is not None  # it holds the worker until the server answers
        self.ui.sampleButton.enabled = problem is None and not running and not testing
        self.ui.testConnectionButton.enabled = not running and not testing
        self.ui.sampleButton.toolTip = problem or _("Sample masks in every selected ROI")
        self.ui.cancelButton.enabled = running
        model = self._parameterNode.model if self._parameterNode else ""
        self.ui.modelWarningLabel.text = self.logic.modelWarning(model)

    def onBrowse(self, parameterName: str) -> None:
        """Load weights from a file: the offline path when downloads are blocked."""
        path = qt.QFileDialog.getOpenFileName(
            slicer.util.mainWindow(), _("Weights file"), "", "Weights (*.safetensors *.pth);;All files (*)")
        if path:
            setattr(self._parameterNode, parameterName, path)

    def onSampleButton(self) -> None:
        p = self._parameterNode
        try:
            # tryWithErrorDisplay shows the error and re-raises it: the status must not stay stale.
            with slicer.util.tryWithErrorDisplay(_("Sampling could not start."), waitCursor=True):
                self.ui.statusLabel.text = _("Checking Python packages...")
                slicer.app.processEvents()
                settings = self.logic.settingsFromParameters(p)
                # remote mode samples on the server: this computer needs no PyTorch
                self.logic.ensureDependencies(ask=True, remote=settings.server is not None)
                self.ui.deviceWarningLabel.text = ""
                self._runVolume = p.inputVolume
                self._run = self.logic.startProcessing(p.inputVolume, self.logic.roiNodesFromParameters(p), settings)
                self.ui.progressBar.value = 0
                self._timer.start()
        except Exception:
            self.ui.statusLabel.text = _("Sampling could not start: nothing was added to the scene.")
        self._updateButtons()

    def onCancelButton(self) -> None:
        if self._run is not None:
            self._run.cancel()
            self.ui.statusLabel.text = _("Cancelling...")

    def onPollJob(self) -> None:
        run = self._run
        if run is None:  # a tick queued before the run was dropped
            self._timer.stop()
            return
        run.poll()
        self.ui.deviceWarningLabel.text = "\n".join(run.warnings)  # the worker checks the device
        fraction, message = run.progress()
        self.ui.progressBar.value = int(round(100 * fraction))
        self.ui.statusLabel.text = message
        if not run.done:
            return
        self._timer.stop()
        self._run = None
        self._finish(run)
        self._updateButtons()

    def _finish(self, run) -> None:
        p = self._parameterNode
        try:
            built = self.logic.finishProcessing(run, self._runVolume, outputMode=p.outputMode,
                                                closedSurface=p.closedSurface)
        except Cancelled:
            self.ui.statusLabel.text = _("Cancelled: nothing was added to the scene.")
            return
        except Exception as error:
            logging.exception("ProbSAM sampling failed")
            self.ui.statusLabel.text = _("Failed: nothing was added to the scene.")
            slicer.util.errorDisplay(_("Sampling failed: {error}").format(error=error))
            return
        self.refreshResults()
        self._showMap(self._runVolume, built[-1] if built else None)
        self.ui.statusLabel.text = self.logic.statusMessage(built)

    # remote mode: URL, token and CA file live in Slicer's settings, never in the parameter node or scene
    def _setupServerSection(self) -> None:
        stored = remote_mode.stored_settings()
        self.ui.serverUrlLineEdit.text = stored["url"]
        self.ui.serverTokenLineEdit.text = stored["token"]
        self.ui.serverCaFileLineEdit.text = stored["cafile"]
        for edit in (self.ui.serverUrlLineEdit, self.ui.serverTokenLineEdit, self.ui.serverCaFileLineEdit):
            edit.connect("editingFinished()", self.onServerSettingsEdited)
        self.ui.testConnectionButton.connect("clicked(bool)", self.onTestConnection)
        self._connectionTimer = qt.QTimer()
        self._connectionTimer.setInterval(self.POLL_MS)
        self._connectionTimer.connect("timeout()", self.onPollConnection)
        self._showServerMode()

    def onServerSettingsEdited(self) -> None:
        remote_mode.save_server_settings(self.ui.serverUrlLineEdit.text, self.ui.serverTokenLineEdit.text,
                                         self.ui.serverCaFileLineEdit.text)
        self._showServerMode()
        self._updateButtons()

    def _showServerMode(self) -> None:
        server = remote_mode.server_settings()
        self.ui.serverStatusLabel.text = (
            _("Local mode: sampling runs on this computer.") if server is None else
            _("Remote mode: sampling runs on {url}.").format(url=server["url"]))

    def onTestConnection(self) -> None:
        """Asked of the worker process (HTTP never runs in Slicer's process); onPollConnection shows the answer."""
        self.onServerSettingsEdited()
        server = remote_mode.server_settings()
        if server is None:
            self.ui.serverStatusLabel.text = _("Enter the server's URL first (empty: sampling runs on this computer).")
            return
        try:
            self._connectionTest = remote_mode.ConnectionTest(self.logic.worker, server).start()
        except Exception as error:  # a run holds the worker, or it cannot start
            self.ui.serverStatusLabel.text = _("Cannot test the connection now: {error}").format(error=error)
            return
        self.ui.serverStatusLabel.text = _("Testing the connection to {url}...").format(url=server["url"])
        self._connectionTimer.start()
        self._updateButtons()

    def onPollConnection(self) -> None:
        test = self._connectionTest
        if test is None or test.poll():
            self._connectionTimer.stop()
            self._connectionTest = None
        if test is None or not test.done:
            return
        self.ui.serverStatusLabel.text = test.message if test.ok else _("Connection failed: {message}").format(
            message=test.message)
        self._updateButtons()

    # results
    def refreshResults(self) -> None:
        """Every result in the scene (after a run, a reload or an import): the table and the sample control."""
        self._outputs = results.scene_results()
        self._fillResultsTable(self._outputs)
        self.ui.sampleSpinBox.maximum = max((len(o.sampleSegmentIds()) for o in self._outputs), default=0)
        self.ui.sampleSpinBox.value = 0
        self.ui.showSamplesCheckBox.checked = False

    def _showMap(self, volume=None, roiOutputs=None) -> None:
        roiOutputs = roiOutputs or (self._outputs[-1] if self._outputs else None)
        if roiOutputs is None or self._parameterNode is None:
            return
        volume = volume or (roiOutputs.segmentationNode.GetNodeReference(outputs.VOLUME_REFERENCE)
                            if roiOutputs.segmentationNode is not None else None)
        self._shownKind = self._parameterNode.uncertaintyKind
        if volume is not None:
            results.show_map(volume, roiOutputs, self._shownKind)

    def _fillResultsTable(self, roiOutputs: list) -> None:
        """Rows: every result's table node (samples, mean, sd, marking share, warnings), labelled by ROI."""
        rows = [(out.roiName,) + row for out in roiOutputs if out.tableNode is not None
                for row in outputs.table_rows(out.tableNode)]
        table = self.ui.resultsTable
        table.setRowCount(len(rows))
        for r, row in enumerate(rows):
            for c, value in enumerate(row):
                table.setItem(r, c, qt.QTableWidgetItem(self._cellText(value)))

    @staticmethod
    def _cellText(value) -> str:
        if isinstance(value, str):
            return value
        return "" if value != value else f"{value:.2f}"  # NaN: no number in this row

    def onShowSamples(self, *args) -> None:
        """The checkbox shows the samples; the spin box picks one (0: all of them)."""
        for out in self._outputs:
            results.show_samples(out, self.ui.showSamplesCheckBox.checked, self.ui.sampleSpinBox.value - 1)


# --- logic --------------------------------------------------------------------------------------------
class ProbSAMSlicerLogic(ScriptedLoadableModuleLogic):
    """Usable without the GUI: ``process`` runs synchronously and returns the created nodes.

    Sampling runs in the session's one worker process (ProbSAMSlicerLib.sampling_process.shared_worker),
    shared by every logic and the widget; it keeps the model loaded between runs and ends itself when
    idle. ``stopWorker`` ends it now.
    """

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self.worker = sampling_process.shared_worker()

    def getParameterNode(self):
        return ProbSAMSlicerParameterNode(super().getParameterNode())

    def stopWorker(self) -> None:
        self.worker.stop()

    # dependencies
    @staticmethod
    def missingDependencies(remote: bool = False) -> list:
        return dependencies.missing_dependencies(remote)

    @staticmethod
    def ensureDependencies(ask: bool = True, remote: bool = False) -> list:
        """Install what is missing (asking when ``ask``; ``remote``: only what remote mode needs, no
        PyTorch); DependencyError with a message otherwise."""
        return dependencies.ensure_dependencies(ask, remote)

    # parameters -> arguments
    @staticmethod
    def sampleableROIs() -> list:
        """The scene's Markups ROIs, without those of Volume Rendering and Crop Volume."""
        taken = set()
        for className in FOREIGN_ROI_USERS:
            for user in slicer.util.getNodesByClass(className):
                for r in range(user.GetNumberOfNodeReferenceRoles()):
                    role = user.GetNthNodeReferenceRole(r)
                    taken.update(user.GetNthNodeReferenceID(role, n) for n in range(user.GetNumberOfNodeReferences(role)))
        return [roi for roi in slicer.util.getNodesByClass("vtkMRMLMarkupsROINode") if roi.GetID() not in taken]

    @classmethod
    def roiNodesFromParameters(cls, p) -> list:
        if p.allROIs:
            return cls.sampleableROIs()
        return [p.roi] if p.roi else []

    @staticmethod
    def settingsFromParameters(p) -> SamplingSettings:
        return SamplingSettings(int(p.numberOfSamples), int(p.seed), p.model, p.checkpointPath,
                                p.samCheckpointPath, p.device, p.uncertaintyKind,
                                server=remote_mode.server_settings())

    @staticmethod
    def modelWarning(model: str) -> str:
        """What to know before trusting this model's masks, shown under the model selector
        (the research model's "Not validated for clinical use"); "" for models without one."""
        entry = MODEL_ENTRIES.get(model)
        return _(entry.warning) if entry is not None and entry.warning else ""

    def inputProblem(self, p) -> Optional[str]:
        """Why "Sample masks" cannot run with these parameters, or None."""
        if not p.inputVolume:
            return _("Select an input volume.")
        if not self.roiNodesFromParameters(p):
            return _("Place a Markups ROI around the object.")
        if MODEL_ENTRIES[p.model].needs_checkpoint and not p.checkpointPath and remote_mode.server_settings() is None:
            return _("Choose a weights file for model '{model}'.").format(model=p.model)
        return None

    # the work
    @staticmethod
    def prepareRequests(inputVolume, roiNodes: list) -> list:
        """Main thread: one voxel box per ROI, in the volume's own (parent-transform) space, with the drawn
        box (the worker cuts the masks to it) and the geometry warnings for the user."""
        if inputVolume is None:
            raise ValueError(_("no input volume"))
        if not roiNodes:
            raise ValueError(_("no ROI: place a Markups ROI around the object"))
        requests = []
        for roi in roiNodes:
            voxelBox, drawn, warnings = roi_request_parts(roi, inputVolume)
            for warning in warnings:
                logging.warning(f"ProbSAM: {warning}")
            requests.append(SamplingRequest(roi.GetName(), voxelBox, drawn, tuple(warnings)))
        return requests

    def process(self, inputVolume, roiNodes, numberOfSamples: int = 16, seed: Optional[int] = 0,
                model: str = DEFAULT_MODEL, checkpointPath: str = "", samCheckpointPath: str = "", device: str = "auto",
                uncertaintyKind: str = "entropy", outputMode: str = "replace", closedSurface: bool = False,
                progress=None, cancel=None, server: Optional[dict] = None) -> list:
        """Sample every ROI in the worker process, wait for it, then build the nodes; a list of RoiOutputs.

        ``roiNodes``: one ROI node or a list. Each RoiOutputs has ``segmentationNode`` (consensus, samples,
        agreement), ``mapNodes`` (the four uncertainty volumes) and ``tableNode``. ``outputMode``:
        "replace" (the ROI's previous result) or "new node". A failure raises and adds nothing to the scene.
        ``progress(fraction, message)``; ``cancel() -> bool``: True stops the run (ProbSAMLib.errors.Cancelled).
        ``server``: {url, token, cafile} to sample on a ``probsam serve`` server (remote mode; the worker
        process sends the CT block around each ROI there); None: on this computer.
        """
        roiNodes = list(roiNodes) if isinstance(roiNodes, (list, tuple)) else [roiNodes]
        settings = SamplingSettings(int(numberOfSamples), seed, model, checkpointPath or "", samCheckpointPath or "",
                                    device, uncertaintyKind, server=server)
        self._checkOutputMode(outputMode)
        run = self.startProcessing(inputVolume, roiNodes, settings)
        run.wait(progress, cancel)
        return self.finishProcessing(run, inputVolume, outputMode=outputMode, closedSurface=closedSurface)

    def startProcessing(self, inputVolume, roiNodes: list, settings: SamplingSettings) -> SamplingRun:
        """Send the work to the worker; poll the run (``run.poll()``), then ``finishProcessing``. A run already
        going on the session's worker (another logic's, the widget's) refuses this one: WorkerBusy, nothing
        sent, nothing added."""
        self._checkSettings(settings)
        requests = self.prepareRequests(inputVolume, roiNodes)
        ijkToRAS = vtk.vtkMatrix4x4()
        inputVolume.GetIJKToRASMatrix(ijkToRAS)

        def readRegion(index, region):
            k0, k1, r0, r1, c0, c1 = region
            return slicer.util.arrayFromVolume(inputVolume)[k0:k1, r0:r1, c0:c1].astype("float32")

        run = SamplingRun(self.worker, requests, settings, matrix_to_numpy(ijkToRAS),
                          inputVolume.GetImageData().GetDimensions(), readRegion)
        run.roiNodes = list(roiNodes)  # for finishProcessing: the outputs refer to their ROI
        return run.start()

    def finishProcessing(self, run: SamplingRun, inputVolume, outputMode: str = "replace",
                         closedSurface: bool = False) -> list:
        """Main thread, after ``run.done``: re-raise its error (Cancelled included) or build the nodes, then
        remove the ROIs' previous results ("replace"), keeping an edited consensus."""
        if run.error is not None:
            raise run.error
        self._checkOutputMode(outputMode)
        replace = outputMode == "replace"
        roiNodes = getattr(run, "roiNodes", [None] * len(run.requests))
        previous = [results.previous_result(roi) if replace else None for roi in roiNodes]
        warnings = [list(request.warnings) + self._cutWarnings(request, result)
                    for request, result in zip(run.requests, run.results)]
        options = outputs.BuildOptions(run.settings.uncertaintyKind, PROBSAM_VERSION, replace, closedSurface)
        built = outputs.build_outputs(inputVolume, roiNodes, [r.roiName for r in run.requests], run.results,
                                      options, warnings)
        try:
            for old, new in zip(previous, built):
                results.replace_previous(old, new)
        except Exception:
            outputs.remove_outputs(built)
            raise
        return built

    @staticmethod
    def _cutWarnings(request, result: dict) -> list:
        """The rotated-ROI warning: the model saw the axis-aligned hull; what was cut back to the ROI."""
        cut = result.get("roi_cut") or {}
        if not cut.get("voxels_outside_roi"):
            return []
        return [_("ROI '{roi}' is rotated against the CT's voxel grid: the model sampled its axis-aligned hull "
                  "and {voxels} mask voxels outside the ROI were removed ({outside} hull voxels lie outside it)"
                  ).format(roi=request.roiName, voxels=cut.get("mask_voxels_removed", 0),
                           outside=cut["voxels_outside_roi"])]

    @staticmethod
    def statusMessage(built: list) -> str:
        """The status line after a run: done, every warning and note (not only in the log), the disclaimer."""
        lines = [_("Done: {count} result(s).").format(count=len(built))]
        lines += [_("Warning: {text}").format(text=w) for out in built for w in out.warnings]
        lines += [_("Note: {text}").format(text=n) for out in built for n in out.notes]
        lines.append(_("Research software, not for clinical use."))
        return "\n".join(lines)

    @staticmethod
    def _checkOutputMode(outputMode: str) -> None:
        if outputMode not in OUTPUT_MODES:
            raise ValueError(_("output mode must be one of {modes}").format(modes=", ".join(OUTPUT_MODES)))

    @staticmethod
    def _checkSettings(settings: SamplingSettings) -> None:
        if not 1 <= settings.numberOfSamples <= 64:
            raise ValueError(_("number of samples must be 1..64"))
        if settings.uncertaintyKind not in UNCERTAINTY_KINDS:
            raise ValueError(_("uncertainty must be one of {kinds}").format(kinds=", ".join(UNCERTAINTY_KINDS)))
        if settings.model not in MODELS:
            raise ValueError(_("model must be one of {models}").format(models=", ".join(MODELS)))
        if MODEL_ENTRIES[settings.model].needs_checkpoint and not settings.checkpointPath and not settings.server:
            raise ValueError(_("model '{model}' needs a weights file (checkpointPath)").format(model=settings.model))

    # display
    @staticmethod
    def showOutputs(inputVolume, roiOutputs: list, uncertaintyKind: str = "entropy") -> None:
        """The chosen map of the last ROI over the CT (one foreground layer per slice view)."""
        if roiOutputs:
            results.show_map(inputVolume, roiOutputs[-1], uncertaintyKind)

    @staticmethod
    def showSamples(roiOutput, visible: bool = True, index: int = -1) -> None:
        results.show_samples(roiOutput, visible, index)


# --- test (runs inside Slicer: Reload and Test, the generic tests, and CI on slicer-core) --------------
class ProbSAMSlicerTest(ScriptedLoadableModuleTest):
    """A phantom CT and an ROI built in code, the default model on the CPU, assertions on the nodes."""

    # The model users get by default: the self-test checks what Slicer users run. minimumDice was measured
    # with lite_medsam on the chest-field demo nodule; whoever changes DEFAULT_MODEL re-measures it.
    modelArguments = {"model": DEFAULT_MODEL, "device": "cpu"}
    minimumDice = 0.8
    numberOfSamples = 8

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_ProbSAMSlicer_phantom()

    def _phantomScene(self):
        import numpy as np
        import SimpleITK as sitk

        from ProbSAMLib.geometry import VolumeGeometry
        from ProbSAMLib.demo.phantom import demo_box, demo_volume

        phantom = demo_volume(0, seed=0, field="chest")  # whole chest slices: what the default model expects
        geometry = VolumeGeometry.from_sitk(phantom.image)
        array = sitk.GetArrayFromImage(phantom.image).astype(np.float32)
        volumeNode = slicer.util.addVolumeFromArray(array, geometry.ijk_to_ras_matrix(), "ProbSAM phantom")
        box = demo_box(phantom.reader_masks, geometry)
        lo, hi = np.array(box.lo) - 0.5, np.array(box.hi) - 0.5  # outer voxel edges
        corners = geometry.index_to_physical(np.array([lo, hi])) * np.array([-1.0, -1.0, 1.0])  # LPS -> RAS
        roiNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "Nodule")
        roiNode.SetCenter(*((corners[0] + corners[1]) / 2))
        roiNode.SetSize(*np.abs(corners[1] - corners[0]))
        reference = phantom.reader_masks.mean(axis=0) >= 0.5
        return volumeNode, roiNode, reference

    def test_ProbSAMSlicer_phantom(self):
        import numpy as np

        from ProbSAMLib.metrics import dice

        self.delayDisplay("Building a phantom CT and an ROI")
        volumeNode, roiNode, reference = self._phantomScene()
        logic = ProbSAMSlicerLogic()
        try:
            result = logic.process(volumeNode, [roiNode], numberOfSamples=self.numberOfSamples, seed=0,
                                   **self.modelArguments)
        finally:
            logic.stopWorker()
        self.assertEqual(len(result), 1)
        out = result[0]
        # One segmentation node: the consensus, the N samples and the three agreement levels.
        self.assertEqual(len(slicer.util.getNodesByClass("vtkMRMLSegmentationNode")), 1)
        segmentation = out.segmentationNode.GetSegmentation()
        self.assertEqual(segmentation.GetNumberOfSegments(), self.numberOfSamples + 4)
        self.assertEqual(len(out.sampleSegmentIds()), self.numberOfSamples)
        self.assertEqual(segmentation.GetSegment(outputs.CONSENSUS_ID).GetName(), "Consensus")
        # The uncertainty volumes: the CT's axes and spacing, cut to the box, first voxel on a CT voxel.
        self.assertEqual(sorted(out.mapNodes), sorted(UNCERTAINTY_KINDS))
        uncertainty = out.mapNodes["entropy"]
        ctMatrix, uMatrix = vtk.vtkMatrix4x4(), vtk.vtkMatrix4x4()
        volumeNode.GetIJKToRASMatrix(ctMatrix)
        uncertainty.GetIJKToRASMatrix(uMatrix)
        ct, u = matrix_to_numpy(ctMatrix), matrix_to_numpy(uMatrix)
        np.testing.assert_allclose(u[:3, :3], ct[:3, :3], atol=1e-9)
        firstVoxel = np.linalg.solve(ct, u[:, 3])[:3]
        np.testing.assert_allclose(firstVoxel, np.round(firstVoxel), atol=1e-6)
        ctDims, uDims = volumeNode.GetImageData().GetDimensions(), uncertainty.GetImageData().GetDimensions()
        self.assertLess(np.prod(uDims), np.prod(ctDims))
        self.assertEqual(uncertainty.GetTransformNodeID(), volumeNode.GetTransformNodeID())
        self.assertEqual(out.segmentationNode.GetAttribute("ProbSAM.Model"), self.modelArguments["model"])
        self.assertEqual(out.segmentationNode.GetNodeReference(outputs.ROI_REFERENCE), roiNode)
        node = out.segmentationNode
        masks = [slicer.util.arrayFromSegmentBinaryLabelmap(node, segmentId, volumeNode) > 0
                 for segmentId in out.sampleSegmentIds()]
        # Placement first: a misplaced output would make every sample miss the nodule.
        score = max(dice(mask, reference) for mask in masks)
        self.delayDisplay(f"Best sample's Dice with the readers' majority: {score:.3f}")
        self.assertGreaterEqual(score, self.minimumDice)
        # The consensus is the voxels in more than half of the samples.
        consensus = slicer.util.arrayFromSegmentBinaryLabelmap(node, outputs.CONSENSUS_ID, volumeNode) > 0
        np.testing.assert_array_equal(consensus, 2 * np.sum(masks, axis=0) > len(masks))
        # samples, mean, sd, marking share (+ a row per geometry warning: none for this ROI)
        self.assertEqual(out.tableNode.GetNumberOfRows(), self.numberOfSamples + 3)
        self.delayDisplay("Test passed")
