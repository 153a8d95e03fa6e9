"""Slicer as the module sees it in CI: REAL slicer-core for everything MRML, a MOCK for the Qt layer only.

Real (the ``slicer-core`` wheel, Kitware's build of Slicer 5.12): ``slicer`` with the MRML scene and
nodes, transforms, segmentations, storage nodes, the module logics and ``slicer.util``. ``new_scene()``
sets them up as Slicer's application does: a ``vtkSlicerApplicationLogic`` on a fresh scene, each
module logic given the application logic and the scene and registered under
``slicer.modules.<name>.logic()`` (where slicer.util looks them up).

MOCK (this folder; slicer-core has no Qt): ``qt``, ``ctk``, ``slicer.ScriptedLoadableModule``,
``slicer.parameterNodeWrapper``, ``slicer.i18n`` and ``slicer.app`` (testing mode on, so that
slicer.util's dialogs log instead of showing a window). The widget itself is not exercised here.

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
    new_scene()
    return slicer


def uninstall() -> None:
    import slicer

    _purge()
    for attribute in ("app", "mrmlScene", "modules", "applicationLogic") + tuple(
            n.split(".", 1)[1] for n in QT_MOCKS if n.startswith("slicer.")):
        if hasattr(slicer, attribute):
            delattr(slicer, attribute)
    while str(MODULE_DIR) in sys.path:
        sys.path.remove(str(MODULE_DIR))
