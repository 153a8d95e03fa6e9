"""Slicer as the module sees it in CI: REAL slicer-core for everything MRML, a MOCK for the Qt layer only.

Real (the ``slicer-core`` wheel, Kitware's build of Slicer 5.12): ``slicer`` with the MRML scene and
nodes, transforms, segmentations, storage nodes, the module logics and ``slicer.util``. ``new_scene()``
sets them up as Slicer's application does: a ``vtkSlicerApplicationLogic`` on a fresh scene, each
module logic given the application logic and the scene and registered under
``slicer.modules.<name>.logic()`` (where slicer.util looks them up).

MOCK (this folder; slicer-core has no Qt): ``qt``, ``ctk``, ``slicer.ScriptedLoadableModule``,
``slicer.parameterNodeWrapper``, ``slicer.i18n``, ``slicer.app`` (testing mode on, so that
slicer.util's dialogs log instead of showing a window) and ``slicer.util.loadUI`` /
``childWidgetVariables`` (widgets.py: the module's real .ui read into plain stand-in widgets, so the
widget's code runs on the real scene; nothing is drawn).

``install()`` returns the ``slicer`` module ready to use; ``uninstall()`` removes the mocks again.
"""

import importlib
import sys
import types
from pathlib import Path

HERE = Path(__file__).resolve().parent
MODULE_DIR = HERE.parents[1] / "ProbSAMSlicer"
QT_MOCKS = {"slicer.ScriptedLoadableModule": "ScriptedLoadableModule",
            "slicer.parameterNodeWrapper": "parameterNodeWrapper", "slicer.i18n": "i18n",
            "qt": "qt", "ctk": "ctk"}
# Module logics as Slicer's application creates them: (name under slicer.modules, class name).
LOGICS = (("colors", "vtkSlicerColorLogic"), ("volumes", "vtkSlicerVolumesLogic"),
          ("segmentations", "vtkSlicerSegmentationsModuleLogic"),
          ("subjecthierarchy", "vtkSlicerSubjectHierarchyModuleLogic"), ("markups", "vtkSlicerMarkupsLogic"),
          ("tables", "vtkSlicerTablesLogic"), ("transforms", "vtkSlicerTransformLogic"),
          ("cropvolume", "vtkSlicerCropVolumeLogic"), ("volumerendering", "vtkSlicerVolumeRenderingLogic"))
_OWN = ("ProbSAMSlicer", "ProbSAMSlicerLib", "PyTorchUtils")


class _App:
    """MOCK of ``slicer.app`` (a Qt application in Slicer): testing mode, no event loop, no cursor."""

    applicationName = "3D Slicer (slicer-core, CI)"

    def __init__(self):
        self.testing = True

    def testingEnabled(self):
        return self.testing

    def processEvents(self):
        pass

    def setOverrideCursor(self, cursor):
        pass

    def restoreOverrideCursor(self):
        pass


_SAVED_UTIL = {}


def _stop_module_worker() -> None:
    """The module's session worker ends with the test (as it would with Slicer), unless a test fixture
    shares it across tests (``keep_across_tests``)."""
    process = sys.modules.get("ProbSAMSlicerLib.sampling_process")
    worker = process._SHARED["worker"] if process is not None else None
    if worker is not None and not getattr(worker, "keep_across_tests", False):
        worker.stop()


def _purge() -> None:
    for name in list(sys.modules):
        if name.split(".")[0] in _OWN or name in QT_MOCKS:
            del sys.modules[name]


def new_scene():
    """A fresh real MRML scene with the application and module logics attached, as in Slicer."""
    import slicer

    scene = slicer.vtkMRMLScene()
    app_logic = slicer.vtkSlicerApplicationLogic()
    app_logic.SetMRMLScene(scene)
    modules = types.SimpleNamespace()
    for name, class_name in LOGICS:
        logic = getattr(slicer, class_name)()
        logic.SetMRMLApplicationLogic(app_logic)
        logic.SetMRMLScene(scene)
        app_logic.SetModuleLogic(name, logic)
        setattr(modules, name, types.SimpleNamespace(name=name, logic=lambda logic=logic: logic))
    slicer.mrmlScene, slicer.modules, slicer.applicationLogic = scene, modules, app_logic
    return scene


def install():
    """The real ``slicer`` with a fresh scene, the Qt mocks in place and the module folder on sys.path."""
    _purge()
    if str(MODULE_DIR) not in sys.path:
        sys.path.insert(0, str(MODULE_DIR))
    import slicer

    for name, file in QT_MOCKS.items():
        module = importlib.import_module(f"{__name__}.{file}")
        sys.modules[name] = module
        if name.startswith("slicer."):
            setattr(slicer, name.split(".", 1)[1], module)
    slicer.app = _App()
    from slicer_standin import widgets

    _SAVED_UTIL.update({name: getattr(slicer.util, name) for name in ("loadUI", "childWidgetVariables")})
    slicer.util.loadUI, slicer.util.childWidgetVariables = widgets.loadUI, widgets.childWidgetVariables
    new_scene()
    return slicer


def uninstall() -> None:
    import slicer

    _stop_module_worker()
    _purge()
    for name, function in _SAVED_UTIL.items():
        setattr(slicer.util, name, function)
    for attribute in ("app", "mrmlScene", "modules", "applicationLogic") + tuple(
            n.split(".", 1)[1] for n in QT_MOCKS if n.startswith("slicer.")):
        if hasattr(slicer, attribute):
            delattr(slicer, attribute)
    while str(MODULE_DIR) in sys.path:
        sys.path.remove(str(MODULE_DIR))
