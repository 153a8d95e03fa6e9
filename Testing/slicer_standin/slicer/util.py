"""STAND-IN for ``slicer.util`` (a mock; Slicer cannot run in CI): the functions ProbSAMSlicer calls.

Array functions follow Slicer: arrays are (K, J, I); arrayFromVolume returns a view of the volume's
array (copy it before heavy work, as the module does). Dialog functions record their calls in ``calls``
and answer from ``answers`` so tests can script a user.
"""

import contextlib

import numpy as np

import slicer

calls = []  # (function name, args, kwargs) of dialogs, installs and view changes
answers = {"confirmOkCancelDisplay": True}


def _record(name, *args, **kwargs):
    calls.append((name, args, kwargs))


# --- nodes and arrays ---------------------------------------------------------------------------------
def getNodesByClass(class_name):
    return [n for n in slicer.mrmlScene.nodes() if n.IsA(class_name)]


def arrayFromVolume(volume_node):
    return volume_node.GetImageData().array


def updateVolumeFromArray(volume_node, array):
    volume_node._image = slicer._ImageData(np.array(array))


def addVolumeFromArray(array, ijkToRAS=None, name=None, nodeClassName=None):
    node = slicer.mrmlScene.AddNewNodeByClass(nodeClassName or "vtkMRMLScalarVolumeNode", name or "")
    if ijkToRAS is not None:
        node.SetIJKToRASMatrix(ijkToRAS)
    updateVolumeFromArray(node, array)
    node.CreateDefaultDisplayNodes()
    return node


def updateSegmentBinaryLabelmapFromArray(narray, segmentationNode, segmentId, referenceVolumeNode=None):
    """Slicer resamples into the reference geometry; the stand-in demands the array already be on it."""
    if referenceVolumeNode is None:
        raise ValueError("the stand-in needs the reference volume")
    dims = referenceVolumeNode.GetImageData().GetDimensions()
    if tuple(narray.shape) != tuple(dims[::-1]):
        raise ValueError(f"array shape {narray.shape} is not the reference volume's (K, J, I) {dims[::-1]}")
    if segmentationNode.GetSegmentation().GetSegment(segmentId) is None:
        raise ValueError(f"no segment {segmentId!r}")
    segmentationNode.labelmaps[segmentId] = (np.array(narray, dtype=np.uint8),
                                             referenceVolumeNode._ijk_to_ras.copy())


def arrayFromSegmentBinaryLabelmap(segmentationNode, segmentId, referenceVolumeNode=None):
    array, ijk_to_ras = segmentationNode.labelmaps[segmentId]
    if referenceVolumeNode is not None and not np.allclose(ijk_to_ras, referenceVolumeNode._ijk_to_ras):
        raise ValueError("the stand-in cannot resample a labelmap into another geometry")
    return array.copy()


def setSliceViewerLayers(background=None, foreground=None, foregroundOpacity=None, **kwargs):
    _record("setSliceViewerLayers", background=background, foreground=foreground,
            foregroundOpacity=foregroundOpacity, **kwargs)


# --- dialogs and installs -----------------------------------------------------------------------------
def confirmOkCancelDisplay(text, windowTitle=None, **kwargs):
    _record("confirmOkCancelDisplay", text, windowTitle=windowTitle)
    return answers["confirmOkCancelDisplay"]


def pip_install(requirements, **kwargs):
    _record("pip_install", requirements, **kwargs)


def errorDisplay(text, **kwargs):
    _record("errorDisplay", text)


def warningDisplay(text, **kwargs):
    _record("warningDisplay", text)


@contextlib.contextmanager
def tryWithErrorDisplay(message=None, waitCursor=False):
    try:
        yield
    except Exception as error:
        errorDisplay(f"{message}\n\n{error}")


def mainWindow():
    return None


# --- VTK observation ----------------------------------------------------------------------------------
class VTKObservationMixin:
    """Records observers; the stand-in scene sends no events."""

    def __init__(self):
        self.Observations = []

    def addObserver(self, obj, event, method, *args, **kwargs):
        self.Observations.append((obj, event, method))

    def removeObserver(self, obj, event, method):
        self.Observations = [o for o in self.Observations if o != (obj, event, method)]

    def removeObservers(self, method=None):
        self.Observations = []
