"""Fixtures and scene builders for the ProbSAMSlicer tests on REAL Slicer core (not tests themselves).

MRML (scene, volumes, ROIs, transforms, segmentations, storage nodes, logics, slicer.util) is the
slicer-core wheel; only Qt is a mock (Testing/slicer_standin). The model is a tiny random ProbSAM saved to
a file (model "file"): its masks are meaningless, so these tests check geometry and bookkeeping; the
module's own self-test checks quality with the bundled demo model.
"""

import sys
from pathlib import Path

import numpy as np
import pytest
import vtk

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))
import slicer_standin  # noqa: E402
from helpers import rotation as rotation3  # noqa: E402

SHAPE_KJI = (6, 48, 48)
BLOB_CENTRE_IJK = (24, 22, 3)

pytest.importorskip("slicer", reason="slicer-core (pip install slicer-core==5.12.*) runs these tests")


@pytest.fixture
def slicer():
    """The real ``slicer`` (slicer-core) with a fresh scene and the Qt mocks; removed after the test."""
    module = slicer_standin.install()
    yield module
    slicer_standin.uninstall()


# Each test module that imports a session fixture from here gets its own copy of the fixture; this cache
# makes them share one weights file and one worker process.
_SHARED = {}


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory):
    if "weights" not in _SHARED:
        from ProbSAMLib import ProbSAMConfig
        from ProbSAMLib.weights.build import build_probsam
        from ProbSAMLib.weights.checkpoints import save_probsam

        path = tmp_path_factory.mktemp("weights") / "tiny.safetensors"
        save_probsam(build_probsam(ProbSAMConfig.preset("tiny"), seed=0), path)
        _SHARED["weights"] = path
    return _SHARED["weights"]


@pytest.fixture
def module(slicer):
    import ProbSAMSlicer

    return ProbSAMSlicer


@pytest.fixture(scope="session")
def shared_worker():
    """One worker process for the tests that do not kill theirs (starting one imports torch: seconds)."""
    if "worker" not in _SHARED:
        slicer_standin.install()
        from ProbSAMSlicerLib.sampling_process import WorkerProcess

        _SHARED["worker"] = WorkerProcess()
        _SHARED["worker"].keep_across_tests = True  # slicer_standin.uninstall() leaves it running
        slicer_standin.uninstall()
    yield _SHARED["worker"]
    _SHARED["worker"].stop()


@pytest.fixture
def logic(module, shared_worker):
    """The module's logic, on the test session's worker process (made the module's session worker)."""
    module.sampling_process.set_shared_worker(shared_worker)
    return module.ProbSAMSlicerLogic()


def model_args(weights) -> dict:
    return {"model": "file", "checkpointPath": str(weights), "device": "cpu"}


# --- matrices -----------------------------------------------------------------------------------------
def rotation(axis: int, degrees: float) -> np.ndarray:
    m = np.eye(4)
    m[:3, :3] = rotation3(axis, degrees)
    return m


def translation(x, y, z) -> np.ndarray:
    m = np.eye(4)
    m[:3, 3] = (x, y, z)
    return m


def vtk_matrix(values) -> "vtk.vtkMatrix4x4":
    matrix = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            matrix.SetElement(r, c, float(values[r][c]))
    return matrix


def to_numpy(matrix) -> np.ndarray:
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])


def oblique_ijk_to_ras() -> np.ndarray:
    """Rotated index axes (20 degrees about S, 8 about R), anisotropic spacing, an offset origin."""
    return translation(-30.0, 12.0, -40.0) @ rotation(2, 20) @ rotation(0, 8) @ np.diag([0.8, 0.9, 2.5, 1.0])


# --- nodes --------------------------------------------------------------------------------------------
def add_transform(slicer, matrix, parent=None):
    node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    node.SetMatrixTransformToParent(vtk_matrix(matrix))
    if parent is not None:
        node.SetAndObserveTransformNodeID(parent.GetID())
    return node


def add_oblique_volume(slicer, transform=None):
    """A CT-like (K, J, I) volume: a bright blob in lung-like background, oblique IJKToRAS."""
    k, j, i = np.mgrid[:SHAPE_KJI[0], :SHAPE_KJI[1], :SHAPE_KJI[2]]
    ci, cj, ck = BLOB_CENTRE_IJK
    blob = ((i - ci) / 7.0) ** 2 + ((j - cj) / 6.0) ** 2 + ((k - ck) / 2.0) ** 2 < 1
    array = np.where(blob, 40.0, -800.0).astype(np.float32)
    node = slicer.util.addVolumeFromArray(array, vtk_matrix(oblique_ijk_to_ras()), "CT")
    if transform is not None:
        node.SetAndObserveTransformNodeID(transform.GetID())
    return node


def to_world(node) -> np.ndarray:
    """4x4 from a node's local coordinates to world (its parent transforms), identity without any."""
    parent = node.GetParentTransformNode()
    if parent is None:
        return np.eye(4)
    matrix = vtk.vtkMatrix4x4()
    parent.GetMatrixTransformToWorld(matrix)
    return to_numpy(matrix)


def volume_to_world(volume) -> np.ndarray:
    matrix = vtk.vtkMatrix4x4()
    volume.GetIJKToRASMatrix(matrix)
    return to_world(volume) @ to_numpy(matrix)


def add_rotated_roi(slicer, volume, center_ijk, size_mm, roi_parent=None, degrees=25.0, name="Nodule"):
    """A ROI rotated ``degrees`` about S in world, centred on voxel ``center_ijk``, under ``roi_parent``."""
    center_world = volume_to_world(volume) @ np.append(np.asarray(center_ijk, float), 1.0)
    object_to_world = translation(*center_world[:3]) @ rotation(2, degrees)
    roi = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsROINode", name)
    if roi_parent is not None:
        roi.SetAndObserveTransformNodeID(roi_parent.GetID())
    roi.SetAndObserveObjectToNodeMatrix(vtk_matrix(np.linalg.inv(to_world(roi)) @ object_to_world))
    roi.SetSize(*size_mm)
    return roi


def expected_voxel_box(roi, volume):
    """Computed here without ProbSAMLib: 8 world corners -> continuous IJK -> covered voxel centres."""
    half = np.array(roi.GetSize()) / 2
    signs = np.array([[x, y, z] for x in (-1, 1) for y in (-1, 1) for z in (-1, 1)], float)
    corners = np.column_stack([signs * half, np.ones(8)])
    world = corners @ to_numpy(roi.GetObjectToWorldMatrix()).T
    ijk = (world @ np.linalg.inv(volume_to_world(volume)).T)[:, :3]
    size = np.array(SHAPE_KJI[::-1])
    lo = np.clip(np.ceil(ijk.min(0) - 1e-6).astype(int), 0, size)
    hi = np.clip(np.floor(ijk.max(0) + 1e-6).astype(int) + 1, 0, size)
    return tuple(int(v) for v in lo), tuple(int(v) for v in hi)


def nodes_of_class(slicer, class_name: str) -> list:
    return slicer.util.getNodesByClass(class_name)


def node_ids(slicer) -> list:
    scene = slicer.mrmlScene
    return sorted(scene.GetNthNode(n).GetID() for n in range(scene.GetNumberOfNodes()))


def segment_labelmap(node, segment_id=None):
    """(uint8 array (K, J, I) of the segment's own labelmap, its extent, its image-to-world in world);
    the first segment unless ``segment_id``."""
    segment_id = segment_id or node.GetSegmentation().GetNthSegmentID(0)
    image = node.GetSegmentation().GetSegment(segment_id).GetRepresentation("Binary labelmap")
    matrix = vtk.vtkMatrix4x4()
    image.GetImageToWorldMatrix(matrix)
    from vtk.util import numpy_support

    extent = image.GetExtent()
    dims = [extent[2 * a + 1] - extent[2 * a] + 1 for a in range(3)]
    array = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(dims[::-1])
    return array.copy(), extent, to_world(node) @ to_numpy(matrix)


def segment_array(node, segment_id, volume) -> np.ndarray:
    """A segment on the CT's full grid, read by Slicer's own export (bool (K, J, I))."""
    import slicer

    return slicer.util.arrayFromSegmentBinaryLabelmap(node, segment_id, volume) > 0


def save_and_reload_scene(slicer, folder):
    """Write every storable node and the .mrml into ``folder``, then load it into a fresh scene (as File ->
    Save and File -> Load scene do; slicer.util.saveScene needs the Qt application)."""
    scene = slicer.mrmlScene
    folder.mkdir(parents=True, exist_ok=True)
    for n in range(scene.GetNumberOfNodesByClass("vtkMRMLStorableNode")):
        node = scene.GetNthNodeByClass(n, "vtkMRMLStorableNode")
        if node.GetHideFromEditors() and not node.IsA("vtkMRMLTableNode"):
            continue
        storage = node.GetStorageNode()
        if storage is None:
            node.AddDefaultStorageNode()
            storage = node.GetStorageNode()
        if storage is None:
            continue
        extension = storage.GetDefaultWriteFileExtension()
        storage.SetFileName(str(folder / f"{node.GetID()}.{extension}"))
        assert storage.WriteData(node), node.GetName()
    scene.SetURL(str(folder / "scene.mrml"))
    assert scene.Commit()
    scene.Clear(False)  # File -> Close scene (observers see StartClose / EndClose)
    scene.SetURL(str(folder / "scene.mrml"))
    assert scene.Import()  # File -> Load scene into the same scene (EndImportEvent)
    return scene
