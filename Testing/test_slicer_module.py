"""ProbSAMSlicer's Logic on REAL Slicer core (slicer-core: MRML scene, nodes, transforms, segmentations,
storage nodes, module logics, slicer.util). Only Qt is a mock (Testing/slicer_standin). Sampling runs in
the module's worker process, as in Slicer.

Verified here on real MRML: placement under linear transforms, outputs on the CT's grid cut to the box,
save/load through storage nodes, the CLI's .seg.nrrd (with consensus and agreement) in Slicer's reader,
overlay display settings and colour legend, provenance attributes and references, the size table,
rollback, ROI filtering, non-linear refusal, the self-test. The result's own behaviour (one node per ROI,
replace / new node, edited consensus, rotated ROI cut, overlay transparency) is in test_slicer_results.py.
"""

import numpy as np
import pytest
import vtk

from slicer_scene import (BLOB_CENTRE_IJK, add_oblique_volume, add_rotated_roi, add_transform,  # noqa: F401
                          expected_voxel_box, logic, model_args, module, node_ids, nodes_of_class, rotation,
                          segment_labelmap, shared_worker, slicer, tiny_weights, to_numpy, to_world, translation, volume_to_world)

N_SAMPLES = 3
TRANSFORM = translation(14.0, -9.0, 22.0) @ rotation(1, 17) @ rotation(2, -35)


def sample(logic, volume, rois, weights, **kwargs):
    return logic.process(volume, rois, numberOfSamples=N_SAMPLES, seed=0, **model_args(weights), **kwargs)


def segment_ids(node) -> list:
    segmentation = node.GetSegmentation()
    return [segmentation.GetNthSegmentID(n) for n in range(segmentation.GetNumberOfSegments())]


def output_poses(out) -> list:
    """World matrices (voxel -> world) and voxel data of every segment and every map."""
    poses = []
    for segment_id in segment_ids(out.segmentationNode):
        array, extent, image_to_world = segment_labelmap(out.segmentationNode, segment_id)
        poses.append((image_to_world @ np.diag([1, 1, 1, 1.0]), extent, array))
    for node in out.mapNodes.values():
        ijk_to_ras = vtk.vtkMatrix4x4()
        node.GetIJKToRASMatrix(ijk_to_ras)
        poses.append((to_world(node) @ to_numpy(ijk_to_ras), (0,), slicer_array(node)))
    return poses


def slicer_array(node):
    import slicer

    return slicer.util.arrayFromVolume(node).copy()


def first_voxel_world(pose) -> np.ndarray:
    matrix, extent, _ = pose
    first = [extent[0], extent[2], extent[4]] if len(extent) == 6 else [0, 0, 0]
    return (matrix @ np.append(np.asarray(first, float), 1.0))[:3]


# --- placement under transforms ----------------------------------------------------------------------
def test_voxel_box_of_roi_under_other_transform_chain(slicer, module):
    volume = add_oblique_volume(slicer, add_transform(slicer, translation(5.0, -3.0, 2.0) @ rotation(1, 6)))
    outer = add_transform(slicer, rotation(0, -12) @ translation(2.0, 1.0, 0.0))
    inner = add_transform(slicer, rotation(2, 30) @ translation(-4.0, 0.0, 3.0), parent=outer)
    roi = add_rotated_roi(slicer, volume, BLOB_CENTRE_IJK, (18.0, 16.0, 9.0), inner)
    request = module.ProbSAMSlicerLogic.prepareRequests(volume, [roi])[0]
    assert (request.voxelBox.lo, request.voxelBox.hi) == expected_voxel_box(roi, volume)
    lo, hi = np.array(request.voxelBox.lo), np.array(request.voxelBox.hi)
    assert np.all(lo <= BLOB_CENTRE_IJK) and np.all(np.array(BLOB_CENTRE_IJK) < hi)  # on the nodule


def test_transformed_scene_gives_the_same_masks_mapped_through_the_transform(slicer, module, logic, tiny_weights):
    """CT and ROI under one linear transform == the untransformed run, moved by that transform."""
    plain = add_oblique_volume(slicer)
    plain_roi = add_rotated_roi(slicer, plain, BLOB_CENTRE_IJK, (18.0, 16.0, 9.0))
    reference = sample(logic, plain, [plain_roi], tiny_weights)[0]

    transform = add_transform(slicer, TRANSFORM)
    moved = add_oblique_volume(slicer, transform)
    moved_roi = add_rotated_roi(slicer, plain, BLOB_CENTRE_IJK, (18.0, 16.0, 9.0), name="Moved")
    moved_roi.SetAndObserveTransformNodeID(transform.GetID())  # the same ROI, carried by the transform
    result = sample(logic, moved, [moved_roi], tiny_weights)[0]

    for before, after in zip(output_poses(reference), output_poses(result)):
        np.testing.assert_array_equal(after[2], before[2])  # identical voxels
        assert after[1] == before[1]
        np.testing.assert_allclose(first_voxel_world(after), (TRANSFORM @ np.append(first_voxel_world(before), 1))[:3],
                                   atol=0.01)
        np.testing.assert_allclose(after[0][:3, :3], TRANSFORM[:3, :3] @ before[0][:3, :3], atol=1e-6)
    for node in result.nodes()[:-1]:  # all but the table
        assert node.GetTransformNodeID() == transform.GetID()


def test_roi_under_a_different_transform_still_lands_on_the_nodule(slicer, module, logic, tiny_weights):
    volume = add_oblique_volume(slicer, add_transform(slicer, TRANSFORM))
    roi_parent = add_transform(slicer, rotation(0, 40) @ translation(-20.0, 5.0, 8.0))
    roi = add_rotated_roi(slicer, volume, BLOB_CENTRE_IJK, (18.0, 16.0, 9.0), roi_parent)
    out = sample(logic, volume, [roi], tiny_weights)[0]
    nodule_world = (volume_to_world(volume) @ np.append(np.asarray(BLOB_CENTRE_IJK, float), 1))[:3]
    matrix, extent, _ = output_poses(out)[0]
    ijk = (np.linalg.inv(matrix) @ np.append(nodule_world, 1))[:3]
    assert all(extent[2 * a] <= ijk[a] <= extent[2 * a + 1] for a in range(3))


def test_nonlinear_transform_is_refused_with_the_harden_message(slicer, module, logic, tiny_weights):
    volume = add_oblique_volume(slicer)
    grid = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLGridTransformNode")
    roi = add_rotated_roi(slicer, volume, BLOB_CENTRE_IJK, (18.0, 16.0, 9.0))
    roi.SetAndObserveTransformNodeID(grid.GetID())
    before = node_ids(slicer)
    with pytest.raises(ValueError, match="non-linear.*[Hh]arden"):
        sample(logic, volume, [roi], tiny_weights)
    assert node_ids(slicer) == before


# --- light outputs on the CT grid --------------------------------------------------------------------
def test_outputs_are_cut_to_the_box_on_the_ct_grid(slicer, module, logic, tiny_weights):
    volume = add_oblique_volume(slicer)
    roi = add_rotated_roi(slicer, volume, BLOB_CENTRE_IJK, (14.0, 12.0, 6.0))
    box = module.ProbSAMSlicerLogic.prepareRequests(volume, [roi])[0].voxelBox
    out = sample(logic, volume, [roi], tiny_weights)[0]
    ct = volume_to_world(volume)
    margin = module.outputs.MARGIN_VOXELS
    lo = np.maximum(np.array(box.lo) - margin, 0)
    hi = np.minimum(np.array(box.hi) + margin, np.array(volume.GetImageData().GetDimensions()))
    poses = output_poses(out)
    for matrix, extent, array in poses:
        np.testing.assert_allclose(matrix[:3, :3], ct[:3, :3], atol=1e-9)  # same axes and spacing
        first = np.linalg.solve(ct, np.append(first_voxel_world((matrix, extent, array)), 1))[:3]
        np.testing.assert_allclose(first, np.round(first), atol=1e-6)  # on a CT voxel
        assert np.all(lo <= np.round(first)) and np.all(np.round(first) + array.shape[::-1] <= hi)  # in the box
    # The uncertainty volume is exactly the box plus the margin (Slicer may shrink a labelmap further).
    matrix, extent, array = poses[-1]
    np.testing.assert_allclose(np.linalg.solve(ct, np.append(first_voxel_world(poses[-1]), 1))[:3], lo, atol=1e-6)
    assert array.shape == tuple((hi - lo)[::-1])
    # The full-grid view (Slicer's own export) holds the masks only inside the box.
    node = out.segmentationNode
    inside = np.zeros(volume.GetImageData().GetDimensions()[::-1], bool)
    inside[box.slices()] = True
    for segment_id in segment_ids(node):
        assert not slicer.util.arrayFromSegmentBinaryLabelmap(node, segment_id, volume)[~inside].any()


def test_saved_scene_reads_back_the_same_segments(slicer, module, logic, tiny_weights, tmp_path):
    volume = add_oblique_volume(slicer)
    roi = add_rotated_roi(slicer, volume, BLOB_CENTRE_IJK, (18.0, 16.0, 9.0))
    out = sample(logic, volume, [roi], tiny_weights)[0]
    node = out.segmentationNode
    writer = node.GetStorageNode()  # the module's: crops to the minimum extent
    assert writer.GetCropToMinimumExtent()
    writer.SetFileName(str(tmp_path / "s.seg.nrrd"))
    assert writer.WriteData(node)
    copy = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "copy")
    reader = slicer.vtkMRMLSegmentationStorageNode()
    reader.SetFileName(str(tmp_path / "s.seg.nrrd"))
    assert reader.ReadData(copy)
    assert segment_ids(copy) == segment_ids(node)
    for segment_id in segment_ids(node):
        names = [s.GetSegmentation().GetSegment(segment_id).GetName() for s in (node, copy)]
        assert names[0] == names[1]
        exported = [slicer.util.arrayFromSegmentBinaryLabelmap(s, segment_id, volume) for s in (node, copy)]
        np.testing.assert_array_equal(exported[0], exported[1])
    stored = segment_labelmap(copy)[0]
    assert stored.size < np.prod(volume.GetImageData().GetDimensions()) / 4  # the file holds the box
    for kind, map_node in out.mapNodes.items():
        writer = slicer.vtkMRMLVolumeArchetypeStorageNode()
        writer.SetFileName(str(tmp_path / f"{kind}.nrrd"))
        assert writer.WriteData(map_node)
        copy = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "u copy")
        reader = slicer.vtkMRMLVolumeArchetypeStorageNode()
        reader.SetFileName(str(tmp_path / f"{kind}.nrrd"))
        assert reader.ReadData(copy)
        np.testing.assert_allclose(slicer.util.arrayFromVolume(copy), slicer.util.arrayFromVolume(map_node))


def test_cli_segmentation_file_loads_as_named_coloured_segments(slicer, tmp_path, tiny_weights):
    """The CLI's samples.seg.nrrd in Slicer's reader: the samples, then the consensus and the agreement
    levels under the names the module's node uses, each where the CLI put it."""
    from ProbSAMLib.app import cli
    from ProbSAMLib.io.segfile import read_segmentation

    assert cli.main(["demo", "--out", str(tmp_path / "d"), "--samples", "3", "--seed", "0", "-q", "--model", "file",
                     "--checkpoint", str(tiny_weights), "--device", "cpu"]) == 0
    ct = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "ct")
    reader = slicer.vtkMRMLVolumeArchetypeStorageNode()
    reader.SetFileName(str(tmp_path / "d" / "ct.nrrd"))
    assert reader.ReadData(ct)
    node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "samples")
    reader = slicer.vtkMRMLSegmentationStorageNode()
    reader.SetFileName(str(tmp_path / "d" / "samples.seg.nrrd"))
    assert reader.ReadData(node)
    from ProbSAMLib.inference.agreement import AGREEMENT_NAMES, CONSENSUS_NAME

    segmentation = node.GetSegmentation()
    names = ["Sample 01", "Sample 02", "Sample 03", CONSENSUS_NAME] + list(AGREEMENT_NAMES.values())
    assert [segmentation.GetNthSegment(n).GetName() for n in range(segmentation.GetNumberOfSegments())] == names
    assert names[3:] == ["Consensus", "Any sample", "More than half", "All samples"]  # as in the module's node
    colors = {tuple(np.round(segmentation.GetNthSegment(n).GetColor(), 3)) for n in range(len(names))}
    assert len(colors) == len(names)
    masks, _, _ = read_segmentation(tmp_path / "d" / "samples.seg.nrrd")
    for n in range(len(names)):
        placed = slicer.util.arrayFromSegmentBinaryLabelmap(node, segmentation.GetNthSegmentID(n), ct) > 0
        np.testing.assert_array_equal(placed, masks[n])  # Slicer puts every voxel where the CT has it
    votes = masks[:3].sum(0)
    np.testing.assert_array_equal(masks[3], votes >= 2)  # consensus: more than half of 3
    np.testing.assert_array_equal(masks[4], votes >= 1)
    np.testing.assert_array_equal(masks[6], votes == 3)


# --- display, provenance, table, rollback ------------------------------------------------------------
def test_overlay_window_threshold_legend_and_provenance(slicer, module, logic, tiny_weights):
    from ProbSAMLib import __version__

    volume = add_oblique_volume(slicer)
    roi = add_rotated_roi(slicer, volume, BLOB_CENTRE_IJK, (18.0, 16.0, 9.0))
    out = sample(logic, volume, [roi], tiny_weights)[0]
    for kind, node in out.mapNodes.items():
        display = node.GetDisplayNode()
        values = slicer.util.arrayFromVolume(node)
        assert not display.GetAutoWindowLevel()
        assert display.GetWindowLevelMin() == pytest.approx(0.0)
        top = 1.0 if kind == "mean_probability" or not values.any() else values.max()  # an empty map: 0..1
        assert display.GetWindowLevelMax() == pytest.approx(top, rel=1e-5)
        assert display.GetApplyThreshold() and 0 < display.GetLowerThreshold() <= values[values > 0].min(initial=1)
        assert slicer.vtkSlicerColorLogic.GetColorLegendDisplayNode(node) is not None
    summary = out.summary
    attributes = {"Model": "file", "Seed": "0", "NumberOfSamples": str(N_SAMPLES), "Version": __version__,
                  "Device": "cpu", "InputVolume": volume.GetName(), "InputVolumeID": volume.GetID(),
                  "ROI": roi.GetName(), "ROIID": roi.GetID(), "MarkingShare": "n/a",
                  "BoxIJK": " ".join(str(v) for v in summary["box"]["ijk_first"] + summary["box"]["ijk_last"])}
    for node in out.nodes():
        assert {key: node.GetAttribute("ProbSAM." + key) for key in attributes} == attributes, node.GetName()
        assert len(node.GetAttribute("ProbSAM.ModelSHA256")) == 64
        assert node.GetAttribute("ProbSAM.Date").startswith("20")  # ISO date, UTC
    seg = out.segmentationNode
    assert seg.GetNodeReference("ProbSAMROI") is roi and seg.GetNodeReference("ProbSAMInputVolume") is volume
    assert seg.GetNodeReference("ProbSAMTable") is out.tableNode
    rows = module.outputs.table_rows(out.tableNode)
    assert len(rows) == N_SAMPLES + 3 + len(out.warnings)  # samples, mean, sd, marking share, warnings
    for row, sample_summary in zip(rows, summary["samples"]):
        assert row[0] == sample_summary["name"]
        assert row[1] == pytest.approx(sample_summary["volume_mm3"] / 1000)  # mL
        assert row[2] == pytest.approx(sample_summary["longest_axial_diameter_mm"])
    assert rows[N_SAMPLES + 2][0] == "marking share" and rows[N_SAMPLES + 2][3] == "n/a"  # the tiny model has none
    assert [row[3] for row in rows[N_SAMPLES + 3:]] == out.warnings


def test_failure_while_building_nodes_removes_everything(slicer, module, logic, tiny_weights, monkeypatch):
    volume = add_oblique_volume(slicer)
    rois = [add_rotated_roi(slicer, volume, BLOB_CENTRE_IJK, (18.0, 16.0, 9.0), name=f"R{n}") for n in range(2)]
    before = node_ids(slicer)
    calls = []

    def failing_table(summary, name):
        calls.append(name)
        if len(calls) == 2:
            raise RuntimeError("table failed")
        return original(summary, name)

    original = module.outputs.add_summary_table
    monkeypatch.setattr(module.outputs, "add_summary_table", failing_table)
    with pytest.raises(RuntimeError, match="table failed"):
        sample(logic, volume, rois, tiny_weights)
    assert node_ids(slicer) == before


def test_scene_closed_during_the_run_adds_nothing(slicer, module, logic, tiny_weights):
    volume = add_oblique_volume(slicer)
    roi = add_rotated_roi(slicer, volume, BLOB_CENTRE_IJK, (18.0, 16.0, 9.0))
    settings = module.SamplingSettings(N_SAMPLES, 0, "file", str(tiny_weights), "", "cpu", "entropy")
    run = logic.startProcessing(volume, [roi], settings)
    run.wait()
    slicer.mrmlScene.Clear()
    with pytest.raises(RuntimeError, match="left the scene"):
        logic.finishProcessing(run, volume)
    assert not nodes_of_class(slicer, "vtkMRMLSegmentationNode")


def test_roi_outside_the_volume_is_a_clear_error(slicer, module, logic, tiny_weights):
    volume = add_oblique_volume(slicer)
    roi = add_rotated_roi(slicer, volume, (500, 500, 90), (10.0, 10.0, 10.0))
    with pytest.raises(ValueError, match="outside"):
        sample(logic, volume, [roi], tiny_weights)


# --- parameters and ROI choice -----------------------------------------------------------------------
def test_parameter_node_ranges_and_every_roi_skips_other_modules_rois(slicer, module):
    logic = module.ProbSAMSlicerLogic()
    p = logic.getParameterNode()
    assert (p.numberOfSamples, p.seed, p.model, p.outputMode, p.uncertaintyKind) == (
        16, 0, module.DEFAULT_MODEL, "replace", "entropy")
    with pytest.raises(ValueError):
        p.seed = -1
    with pytest.raises(ValueError):
        p.numberOfSamples = 65
    volume = add_oblique_volume(slicer)
    mine = add_rotated_roi(slicer, volume, BLOB_CENTRE_IJK, (18.0, 16.0, 9.0))
    crop_roi = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "crop")
    crop = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLCropVolumeParametersNode")
    crop.SetROINodeID(crop_roi.GetID())
    render_roi = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "render")
    rendering = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLGPURayCastVolumeRenderingDisplayNode")
    rendering.SetAndObserveROINodeID(render_roi.GetID())
    p.allROIs = True
    assert [r.GetID() for r in logic.roiNodesFromParameters(p)] == [mine.GetID()]
    p.inputVolume = volume
    assert logic.inputProblem(p) is None
    p.model = "file"
    assert "weights file" in logic.inputProblem(p)


def test_self_test_runs_on_slicer_core(slicer, module):
    """The module's own ProbSAMSlicerTest (bundled demo model, Dice floor), as Slicer's CTest runs it."""
    test = module.ProbSAMSlicerTest()
    test.runTest()


def test_module_import_does_not_import_torch():
    """Slicer imports every module at start-up: the module, its logic and its worker handle stay light."""
    import subprocess
    import sys
    from pathlib import Path

    code = ("import sys; sys.path.insert(0, 'Testing'); import slicer_standin; slicer_standin.install(); "
            "import ProbSAMSlicer; m = ProbSAMSlicer.ProbSAMSlicer(None); "
            "l = ProbSAMSlicer.ProbSAMSlicerLogic(); "
            "assert 'torch' not in sys.modules, 'torch imported at start-up'; print(m.parent.title)")
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "ProbSAM" in done.stdout


def test_demo_warning_sits_under_the_model_selector(slicer, module):
    """Issue 13: the rendered-data warning is shown where the model is chosen (label text from the logic;
    the label itself is checked in the .ui file because the Qt widget cannot be built here)."""
    import xml.etree.ElementTree as ET
    from pathlib import Path

    from ProbSAMLib.weights.registry import MODELS

    logic = module.ProbSAMSlicerLogic()
    for name, entry in MODELS.items():
        warning = logic.modelWarning(name)
        assert warning == entry.warning  # the registry's words, whatever the models are
        if name.startswith("demo"):
            assert "DEMO" in warning and "rendered" in warning and "not for clinical use" in warning
    assert logic.modelWarning("no such model") == ""
    ui = ET.parse(Path(module.__file__).parent / "Resources" / "UI" / "ProbSAMSlicer.ui")
    form = next(l for l in ui.iter("layout") if l.get("name") == "modelFormLayout")
    cell = {w.get("name"): (int(i.get("row")), int(i.get("column"))) for i in form.findall("item")
            for w in i.findall("widget")}
    assert cell["modelWarningLabel"] == (cell["modelComboBox"][0] + 1, cell["modelComboBox"][1])
    rows = sorted(r for r, c in cell.values() if c == 1)
    assert len(rows) == len(set(rows))  # no two widgets share a form row
