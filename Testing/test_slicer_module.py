"""ProbSAMSlicer's Logic end to end, through the Slicer STAND-IN (Testing/slicer_standin: a mock of the
Slicer/MRML calls the module uses, because 3D Slicer cannot run in CI; vtk matrices and numpy are real).

The model is a tiny random ProbSAM saved to a temporary file (model "file"), so the tests do not need the
bundled demo weights; its masks are meaningless, so the tests check geometry and bookkeeping, not quality.
"""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import vtk

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
import slicer_standin  # noqa: E402
from Testing.helpers import rotation as rotation3  # noqa: E402

N_SAMPLES = 3
SHAPE_KJI = (6, 48, 48)


@pytest.fixture
def slicer():
    """The stand-in ``slicer`` module with an empty scene; removed again after the test."""
    module = slicer_standin.install()
    yield module
    slicer_standin.uninstall()


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory):
    from ProbSAMLib import ProbSAMConfig
    from ProbSAMLib.build import build_probsam
    from ProbSAMLib.checkpoints import save_probsam

    path = tmp_path_factory.mktemp("weights") / "tiny.safetensors"
    save_probsam(build_probsam(ProbSAMConfig.preset("tiny"), seed=0), path)
    return path


@pytest.fixture
def module(slicer):
    import ProbSAMSlicer

    return ProbSAMSlicer


def model_args(weights):
    return {"model": "file", "checkpointPath": str(weights), "device": "cpu"}


# --- scene builders -----------------------------------------------------------------------------------
def rotation(axis: int, degrees: float) -> np.ndarray:
    """4x4 homogeneous form of Testing.helpers.rotation (MRML matrices are 4x4)."""
    m = np.eye(4)
    m[:3, :3] = rotation3(axis, degrees)
    return m


def translation(x, y, z) -> np.ndarray:
    m = np.eye(4)
    m[:3, 3] = (x, y, z)
    return m


def oblique_ijk_to_ras() -> np.ndarray:
    """Rotated index axes (20 degrees about S, 8 about R), anisotropic spacing, an offset origin."""
    spacing = np.diag([0.8, 0.9, 2.5, 1.0])
    return translation(-30.0, 12.0, -40.0) @ rotation(2, 20) @ rotation(0, 8) @ spacing


def add_transform(slicer, matrix, parent=None):
    node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    node.SetMatrixTransformToParent(vtk_matrix(matrix))
    if parent is not None:
        node.SetAndObserveTransformNodeID(parent.GetID())
    return node


def vtk_matrix(values) -> "vtk.vtkMatrix4x4":
    matrix = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            matrix.SetElement(r, c, float(values[r][c]))
    return matrix


def add_oblique_volume(slicer, volume_transform=None):
    """A CT-like (K, J, I) volume: a bright blob in lung-like background, oblique IJKToRAS."""
    k, j, i = np.mgrid[:SHAPE_KJI[0], :SHAPE_KJI[1], :SHAPE_KJI[2]]
    blob = ((i - 24) / 7.0) ** 2 + ((j - 22) / 6.0) ** 2 + ((k - 3) / 2.0) ** 2 < 1
    array = np.where(blob, 40.0, -800.0).astype(np.float32)
    node = slicer.util.addVolumeFromArray(array, oblique_ijk_to_ras(), "CT")
    if volume_transform is not None:
        node.SetAndObserveTransformNodeID(volume_transform.GetID())
    return node


def volume_to_world(volume) -> np.ndarray:
    matrix = vtk.vtkMatrix4x4()
    volume.GetIJKToRASMatrix(matrix)
    ijk_to_ras = slicer_standin_matrix(matrix)
    parent = volume.GetParentTransformNode()
    parent_to_world = np.eye(4)
    if parent is not None:
        m = vtk.vtkMatrix4x4()
        parent.GetMatrixTransformToWorld(m)
        parent_to_world = slicer_standin_matrix(m)
    return parent_to_world @ ijk_to_ras


def slicer_standin_matrix(matrix) -> np.ndarray:
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])


def add_rotated_roi(slicer, volume, center_ijk, size_mm, roi_parent, degrees=25.0, name="Nodule"):
    """A ROI rotated ``degrees`` about S in world, centred on voxel ``center_ijk``, under ``roi_parent``."""
    center_world = volume_to_world(volume) @ np.append(np.asarray(center_ijk, float), 1.0)
    object_to_world = translation(*center_world[:3]) @ rotation(2, degrees)
    parent_to_world = np.eye(4)
    if roi_parent is not None:
        m = vtk.vtkMatrix4x4()
        roi_parent.GetMatrixTransformToWorld(m)
        parent_to_world = slicer_standin_matrix(m)
    roi = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsROINode", name)
    roi.SetAndObserveObjectToNodeMatrix(vtk_matrix(np.linalg.inv(parent_to_world) @ object_to_world))
    roi.SetSize(*size_mm)
    if roi_parent is not None:
        roi.SetAndObserveTransformNodeID(roi_parent.GetID())
    return roi


def expected_voxel_box(roi, volume):
    """Computed here without ProbSAMLib: 8 world corners -> continuous IJK -> covered voxel centres."""
    half = np.array(roi.GetSize()) / 2
    signs = np.array([[x, y, z] for x in (-1, 1) for y in (-1, 1) for z in (-1, 1)], float)
    corners = np.column_stack([signs * half, np.ones(8)])
    world = corners @ slicer_standin_matrix(roi.GetObjectToWorldMatrix()).T
    ijk = (world @ np.linalg.inv(volume_to_world(volume)).T)[:, :3]
    size = np.array(SHAPE_KJI[::-1])
    lo = np.clip(np.ceil(ijk.min(0) - 1e-6).astype(int), 0, size)
    hi = np.clip(np.floor(ijk.max(0) + 1e-6).astype(int) + 1, 0, size)
    return tuple(lo), tuple(hi)


@pytest.fixture
def scene(slicer):
    """Volume under one linear transform, rotated ROI under a chain of two others."""
    volume_transform = add_transform(slicer, translation(5.0, -3.0, 2.0) @ rotation(1, 6))
    volume = add_oblique_volume(slicer, volume_transform)
    outer = add_transform(slicer, rotation(0, -12) @ translation(2.0, 1.0, 0.0))
    inner = add_transform(slicer, rotation(2, 30) @ translation(-4.0, 0.0, 3.0), parent=outer)
    roi = add_rotated_roi(slicer, volume, (24, 22, 3), (18.0, 16.0, 9.0), inner)
    return volume, roi


def node_ids(slicer):
    return sorted(n.GetID() for n in slicer.mrmlScene.nodes())


# --- geometry and outputs -----------------------------------------------------------------------------
def test_voxel_box_of_transformed_rotated_roi_on_oblique_volume(slicer, module, scene):
    volume, roi = scene
    _, _, requests = module.ProbSAMSlicerLogic.prepareRequests(volume, [roi])
    lo, hi = expected_voxel_box(roi, volume)
    assert (requests[0].voxelBox.lo, requests[0].voxelBox.hi) == (lo, hi)
    assert hi[0] - lo[0] > 10 and hi[2] - lo[2] >= 3  # a real box, not a degenerate one


def test_logic_end_to_end_oblique_volume(slicer, module, scene, tiny_weights):
    from ProbSAMLib.imageio import distinct_colors

    volume, roi = scene
    before = set(node_ids(slicer))
    fractions = []
    outputs = module.ProbSAMSlicerLogic().process(volume, [roi], numberOfSamples=N_SAMPLES, seed=0,
                                                  progress=lambda f, m: fractions.append(f),
                                                  **model_args(tiny_weights))
    assert len(outputs) == 1
    out = outputs[0]
    assert len(out.segmentationNodes) == N_SAMPLES
    assert len(slicer.util.getNodesByClass("vtkMRMLSegmentationNode")) == N_SAMPLES
    assert fractions[0] == 0.0 and fractions[-1] == pytest.approx(1.0)

    ijk_to_ras = vtk.vtkMatrix4x4()
    volume.GetIJKToRASMatrix(ijk_to_ras)
    input_matrix = slicer_standin_matrix(ijk_to_ras)
    (i0, j0, k0), (i1, j1, k1) = expected_voxel_box(roi, volume)
    outside = np.ones(SHAPE_KJI, bool)
    outside[k0:k1, j0:j1, i0:i1] = False
    for node, color in zip(out.segmentationNodes, distinct_colors(N_SAMPLES)):
        segmentation = node.GetSegmentation()
        assert segmentation.GetNumberOfSegments() == 1
        segment_id = segmentation.GetNthSegmentID(0)
        assert segmentation.GetSegment(segment_id).GetColor() == pytest.approx(color)
        np.testing.assert_allclose(node.reference_geometry[0], input_matrix)
        assert node.reference_geometry[1] == SHAPE_KJI[::-1]
        mask = slicer.util.arrayFromSegmentBinaryLabelmap(node, segment_id, volume)
        assert mask.shape == SHAPE_KJI and not mask[outside].any()
        assert node.GetDisplayNode() is not None

    uncertainty = out.uncertaintyVolumeNode
    matrix = vtk.vtkMatrix4x4()
    uncertainty.GetIJKToRASMatrix(matrix)
    np.testing.assert_allclose(slicer_standin_matrix(matrix), input_matrix)
    assert uncertainty.GetImageData().GetDimensions() == volume.GetImageData().GetDimensions()
    values = slicer.util.arrayFromVolume(uncertainty)
    assert values.dtype == np.float32 and not values[outside].any() and values.min() >= 0
    assert uncertainty.GetDisplayNode().GetColorNodeID() == slicer.mrmlScene.GetFirstNodeByName("Viridis").GetID()

    table = out.tableNode
    assert table.GetNumberOfRows() == N_SAMPLES + 2 and table.GetNumberOfColumns() == 3
    names = table.GetTable().GetColumn(0)
    assert [names.GetValue(r) for r in range(N_SAMPLES + 2)][-2:] == ["mean", "sd"]
    volumes = table.GetTable().GetColumn(1)
    assert volumes.GetValue(N_SAMPLES) == pytest.approx(out.summary["spread"]["volume_mm3"]["mean"])

    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(slicer.mrmlScene)
    assert sh.GetItemName(out.folderItemId) == "ProbSAM Nodule"
    grouped = {sh.GetItemDataNode(item).GetID() for item in sh.children(out.folderItemId)}
    assert grouped == {n.GetID() for n in out.nodes()}
    assert set(node_ids(slicer)) - before >= grouped


def test_two_rois_get_two_groups(slicer, module, scene, tiny_weights):
    volume, roi = scene
    second = add_rotated_roi(slicer, volume, (12, 30, 2), (10.0, 9.0, 6.0), None, degrees=-10, name="Second")
    outputs = module.ProbSAMSlicerLogic().process(volume, [roi, second], numberOfSamples=2, seed=1,
                                                  uncertaintyKind="variance", **model_args(tiny_weights))
    assert [o.roiName for o in outputs] == ["Nodule", "Second"]
    assert len(slicer.util.getNodesByClass("vtkMRMLSegmentationNode")) == 4
    assert len(slicer.util.getNodesByClass("vtkMRMLTableNode")) == 2
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(slicer.mrmlScene)
    assert sorted(sh.folders().values()) == ["ProbSAM Nodule", "ProbSAM Second"]
    assert "variance" in outputs[1].uncertaintyVolumeNode.GetName()
    (i0, j0, k0), (i1, j1, k1) = expected_voxel_box(second, volume)
    mask = slicer.util.arrayFromSegmentBinaryLabelmap(outputs[1].segmentationNodes[0], "Segment_1", volume)
    outside = np.ones(SHAPE_KJI, bool)
    outside[k0:k1, j0:j1, i0:i1] = False
    assert not mask[outside].any()


def test_step_through_samples_and_overlay(slicer, module, scene, tiny_weights):
    volume, roi = scene
    logic = module.ProbSAMSlicerLogic()
    outputs = logic.process(volume, roi, numberOfSamples=N_SAMPLES, **model_args(tiny_weights))
    logic.showSample(outputs[0], 1)
    assert [n.GetDisplayNode().GetVisibility() for n in outputs[0].segmentationNodes] == [0, 1, 0]
    logic.showSample(outputs[0], -1)
    assert all(n.GetDisplayNode().GetVisibility() for n in outputs[0].segmentationNodes)
    logic.showOutputs(volume, outputs)
    name, _, kwargs = slicer.util.calls[-1]
    assert name == "setSliceViewerLayers" and kwargs["foreground"] is outputs[0].uncertaintyVolumeNode
    assert 0 < kwargs["foregroundOpacity"] < 1 and kwargs["background"] is volume


# --- cancel and failure leave nothing -----------------------------------------------------------------
def test_cancel_raises_and_leaves_scene_unchanged(slicer, module, scene, tiny_weights):
    from ProbSAMLib.volume import Cancelled

    volume, roi = scene
    before = node_ids(slicer)
    calls = []

    def cancel_on_second_check():
        calls.append(1)
        return len(calls) >= 2

    with pytest.raises(Cancelled):
        module.ProbSAMSlicerLogic().process(volume, [roi], numberOfSamples=2, cancel=cancel_on_second_check,
                                            **model_args(tiny_weights))
    assert node_ids(slicer) == before
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(slicer.mrmlScene)
    assert sh.folders() == {}


def test_async_job_cancel_and_result(slicer, module, scene, tiny_weights):
    from ProbSAMLib.volume import Cancelled
    from ProbSAMSlicerLib import jobs

    volume, roi = scene
    logic = module.ProbSAMSlicerLogic()
    settings = jobs.SamplingSettings(2, 0, "file", str(tiny_weights), "", "cpu", "entropy")
    before = node_ids(slicer)
    array, geometry, requests = logic.prepareRequests(volume, [roi])
    cancelled = jobs.SamplingJob(array, geometry, requests, settings, logic._models)
    cancelled.requests, cancelled.settings = requests, settings
    cancelled.cancel()
    assert cancelled.start().wait(60)
    with pytest.raises(Cancelled):
        logic.finishProcessing(cancelled, volume)
    assert node_ids(slicer) == before

    job = logic.startProcessing(volume, [roi], settings)
    assert job.wait(60) and job.progress()[0] == pytest.approx(1.0)
    async_outputs = logic.finishProcessing(job, volume)
    sync_outputs = logic.process(volume, [roi], numberOfSamples=2, seed=0, **model_args(tiny_weights))
    for a, b in zip(async_outputs[0].segmentationNodes, sync_outputs[0].segmentationNodes):
        np.testing.assert_array_equal(a.labelmaps["Segment_1"][0], b.labelmaps["Segment_1"][0])


def test_failure_while_building_nodes_removes_everything(slicer, module, scene, tiny_weights, monkeypatch):
    from ProbSAMSlicerLib import outputs

    volume, roi = scene
    second = add_rotated_roi(slicer, volume, (12, 30, 2), (10.0, 9.0, 6.0), None, name="Second")
    before = node_ids(slicer)
    real = outputs.add_summary_table
    made = []

    def fail_on_second_table(summary, name):
        if made:
            raise RuntimeError("disk full")
        made.append(real(summary, name))
        return made[-1]

    monkeypatch.setattr(outputs, "add_summary_table", fail_on_second_table)
    with pytest.raises(RuntimeError, match="disk full"):
        module.ProbSAMSlicerLogic().process(volume, [roi, second], numberOfSamples=2, **model_args(tiny_weights))
    assert made, "the first ROI's outputs were built before the failure"
    assert node_ids(slicer) == before
    assert slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(slicer.mrmlScene).folders() == {}


def test_failure_inside_one_node_removes_it(slicer, module, scene, tiny_weights, monkeypatch):
    volume, roi = scene
    before = node_ids(slicer)

    def broken(*args, **kwargs):
        raise ValueError("cannot convert")

    monkeypatch.setattr(slicer.util, "updateVolumeFromArray", broken)
    with pytest.raises(ValueError, match="cannot convert"):
        module.ProbSAMSlicerLogic().process(volume, [roi], numberOfSamples=2, **model_args(tiny_weights))
    assert node_ids(slicer) == before


def test_nonlinear_transform_is_refused(slicer, module, scene):
    from ProbSAMSlicerLib.roi_geometry import NonLinearTransformError

    volume, roi = scene
    grid = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLGridTransformNode", "Warp")
    volume.GetParentTransformNode().SetAndObserveTransformNodeID(grid.GetID())
    with pytest.raises(NonLinearTransformError, match="Harden transform"):
        module.ProbSAMSlicerLogic.prepareRequests(volume, [roi])


def test_roi_outside_volume_gives_clear_error(slicer, module, scene):
    from ProbSAMLib.geometry import BoxOutsideVolumeError

    volume, roi = scene
    far = add_rotated_roi(slicer, volume, (500, 500, 50), (5.0, 5.0, 5.0), None, name="Far")
    with pytest.raises(BoxOutsideVolumeError):
        module.ProbSAMSlicerLogic.prepareRequests(volume, [roi, far])


# --- dependencies -------------------------------------------------------------------------------------
class FakeTorchUtils:
    """Stands in for SlicerPyTorch's PyTorchUtils module; records installTorch's arguments."""

    def __init__(self, missing, accept=True):
        self.calls, self.missing, self.accept = [], missing, accept
        owner = self

        class PyTorchUtilsLogic:
            def installTorch(self, **kwargs):
                owner.calls.append(kwargs)
                if not owner.accept:
                    return None
                owner.missing -= {"torch", "torchvision"}
                return object()

        self.PyTorchUtilsLogic = PyTorchUtilsLogic


def fake_environment(monkeypatch, slicer, missing, accept_torch=True, with_pip_ensure=True):
    from ProbSAMSlicerLib import dependencies

    monkeypatch.setattr(dependencies, "_importable", lambda name: name not in missing)
    torch_utils = FakeTorchUtils(missing, accept_torch)
    monkeypatch.setitem(sys.modules, "PyTorchUtils", torch_utils)
    ensured = []
    if with_pip_ensure:
        class Packaging:
            @staticmethod
            def pip_ensure(requirements, **kwargs):
                ensured.append((list(requirements), kwargs))
                missing.difference_update({"segment_anything", "safetensors"})

        monkeypatch.setattr(slicer, "packaging", Packaging, raising=False)
    return torch_utils, ensured


def test_missing_torch_takes_the_install_path(slicer, module, monkeypatch):
    missing = {"torch", "torchvision", "segment_anything"}
    torch_utils, ensured = fake_environment(monkeypatch, slicer, missing)
    logic = module.ProbSAMSlicerLogic
    assert logic.missingDependencies() == ["torch", "torchvision", "segment-anything>=1.0"]
    assert logic.ensureDependencies(ask=True) == ["torch", "torchvision", "segment-anything>=1.0"]
    assert torch_utils.calls == [{"askConfirmation": True, "torchVersionRequirement": ">=2.1",
                                  "torchvisionVersionRequirement": ">=0.16"}]
    assert ensured == [(["segment-anything>=1.0"], {"prompt_install": True, "requester": "ProbSAMSlicer"})]
    assert logic.missingDependencies() == []


def test_declined_torch_gives_clear_error_and_no_nodes(slicer, module, scene, monkeypatch):
    from ProbSAMSlicerLib.dependencies import DependencyError

    before = node_ids(slicer)
    fake_environment(monkeypatch, slicer, {"torch", "torchvision"}, accept_torch=False)
    with pytest.raises(DependencyError, match="PyTorch was not installed"):
        module.ProbSAMSlicerLogic.ensureDependencies(ask=True)
    assert node_ids(slicer) == before


def test_missing_pytorch_extension_is_explained(slicer, module, monkeypatch):
    from ProbSAMSlicerLib import dependencies

    monkeypatch.setattr(dependencies, "_importable", lambda name: name != "torch")
    monkeypatch.setitem(sys.modules, "PyTorchUtils", None)  # import fails: extension not installed
    with pytest.raises(dependencies.DependencyError, match="Extensions Manager"):
        dependencies.ensure_dependencies(ask=True)


@pytest.mark.parametrize("accept", [True, False])
def test_pip_install_fallback_on_older_slicer(slicer, module, monkeypatch, accept):
    from ProbSAMSlicerLib.dependencies import DependencyError

    missing = {"safetensors"}
    fake_environment(monkeypatch, slicer, missing, with_pip_ensure=False)
    slicer.util.answers["confirmOkCancelDisplay"] = accept

    def pip_install(requirements, **kwargs):
        slicer.util.calls.append(("pip_install", (requirements,), kwargs))
        missing.clear()

    monkeypatch.setattr(slicer.util, "pip_install", pip_install)
    if accept:
        assert module.ProbSAMSlicerLogic.ensureDependencies(ask=True) == ["safetensors>=0.4"]
        assert ("pip_install", ("safetensors>=0.4",), {}) in slicer.util.calls
    else:
        with pytest.raises(DependencyError, match="declined"):
            module.ProbSAMSlicerLogic.ensureDependencies(ask=True)
        assert not [c for c in slicer.util.calls if c[0] == "pip_install"]
    assert slicer.util.calls[0][0] == "confirmOkCancelDisplay"


def test_module_import_does_not_import_torch():
    code = ("import sys; sys.path.insert(0, 'Testing'); import slicer_standin; slicer_standin.install(); "
            "import ProbSAMSlicer; m = ProbSAMSlicer.ProbSAMSlicer(None); "
            "l = ProbSAMSlicer.ProbSAMSlicerLogic(); "
            "assert 'torch' not in sys.modules, 'torch imported at start-up'; print(m.parent.title)")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "ProbSAM" in done.stdout


# --- parameters ---------------------------------------------------------------------------------------
def test_parameter_node_defaults_and_validation(slicer, module, scene):
    p = module.ProbSAMSlicerLogic().getParameterNode()
    assert (p.numberOfSamples, p.seed, p.model, p.device, p.uncertaintyKind) == (16, 0, "demo", "auto", "entropy")
    with pytest.raises(ValueError):
        p.numberOfSamples = 65
    with pytest.raises(ValueError):
        p.uncertaintyKind = "std"
    logic = module.ProbSAMSlicerLogic()
    volume, roi = scene
    assert "input volume" in logic.inputProblem(p)
    p.inputVolume = volume
    assert "ROI" in logic.inputProblem(p)
    p.roi = roi
    assert logic.inputProblem(p) is None
    p.model = "file"
    assert "weights file" in logic.inputProblem(p)
    p.allROIs = True
    add_rotated_roi(slicer, volume, (12, 30, 2), (10.0, 9.0, 6.0), None, name="Second")
    assert [r.GetName() for r in logic.roiNodesFromParameters(p)] == ["Nodule", "Second"]


# --- the in-Slicer self-test, run on the stand-in ------------------------------------------------------
def test_in_slicer_test_class_runs_on_standin(slicer, module, tiny_weights, monkeypatch):
    """ProbSAMSlicerTest as Slicer runs it, with the tiny random model (so no Dice floor)."""
    from ProbSAMSlicerLib import dependencies

    monkeypatch.setattr(dependencies, "missing_dependencies", lambda: [])
    test = module.ProbSAMSlicerTest()
    test.modelArguments = model_args(tiny_weights)
    test.minimumDice = 0.0
    test.numberOfSamples = 2
    test.runTest()
    assert len(slicer.util.getNodesByClass("vtkMRMLSegmentationNode")) == 2
