"""One result per ROI on REAL Slicer core (slicer-core; only Qt is a mock): one segmentation node holding
the consensus, the samples and the agreement levels; replace / new node; an edited consensus kept when
replacing; masks cut to a rotated ROI; the overlay transparent where the samples all agree; closed
surfaces on request. Runs through the module's worker (tiny random model) where the sampling matters,
and through hand-made results (no worker) where only the node building does.
"""

import numpy as np
import pytest
import vtk

from slicer_scene import (BLOB_CENTRE_IJK, add_oblique_volume, add_rotated_roi, add_transform,  # noqa: F401
                          logic, model_args, module, node_ids, nodes_of_class, rotation, segment_array,
                          shared_worker, slicer, tiny_weights, to_numpy, translation, volume_to_world)

N = 3
ROI_SIZE = (18.0, 16.0, 9.0)


def sample(logic, volume, rois, weights, **kwargs):
    return logic.process(volume, rois, numberOfSamples=N, seed=0, **model_args(weights), **kwargs)


def segment_names(node) -> list:
    segmentation = node.GetSegmentation()
    return [segmentation.GetNthSegment(n).GetName() for n in range(segmentation.GetNumberOfSegments())]


def result_nodes(slicer) -> list:
    return [n for n in nodes_of_class(slicer, "vtkMRMLSegmentationNode") if n.GetAttribute("ProbSAM.Result") == "1"]


# --- with the worker ------------------------------------------------------------------------------------
def test_one_node_per_roi_replace_keeps_the_count_new_node_adds_one(slicer, module, logic, tiny_weights):
    transform = add_transform(slicer, translation(4.0, -2.0, 7.0) @ rotation(1, 12))
    volume = add_oblique_volume(slicer, transform)
    roi = add_rotated_roi(slicer, volume, BLOB_CENTRE_IJK, ROI_SIZE, degrees=0)
    out = sample(logic, volume, [roi], tiny_weights)[0]
    node = out.segmentationNode
    assert node.GetName() == "Nodule ProbSAM" and len(result_nodes(slicer)) == 1
    assert segment_names(node) == (["Consensus"] + [f"Sample {n:02d}" for n in range(1, N + 1)]
                                   + ["Any sample", "More than half", "All samples"])
    display = node.GetDisplayNode()
    assert display.GetSegmentVisibility("Consensus")
    assert not any(display.GetSegmentVisibility(s) for s in out.sampleSegmentIds())  # hidden by default
    colors = {tuple(np.round(node.GetSegmentation().GetSegment(s).GetColor(), 3)) for s in out.sampleSegmentIds()}
    assert len(colors) == N
    # Under the volume's transform, on its grid; the consensus is more than half of the samples.
    assert all(n.GetTransformNodeID() == transform.GetID() for n in out.nodes()[:-1])
    samples = np.array([segment_array(node, s, volume) for s in out.sampleSegmentIds()])
    np.testing.assert_array_equal(segment_array(node, "Consensus", volume), 2 * samples.sum(0) > N)
    np.testing.assert_array_equal(segment_array(node, "Agreement_any", volume), samples.any(0))
    np.testing.assert_array_equal(segment_array(node, "Agreement_all", volume), samples.all(0))

    count = len(node_ids(slicer))
    again = sample(logic, volume, [roi], tiny_weights)[0]  # replace (the default)
    assert len(node_ids(slicer)) == count and len(result_nodes(slicer)) == 1
    assert node.GetScene() is None and again.segmentationNode.GetName() == "Nodule ProbSAM"
    assert not again.notes  # nothing was edited: nothing kept

    extra = sample(logic, volume, [roi], tiny_weights, outputMode="new node")[0]
    assert len(result_nodes(slicer)) == 2 and extra.segmentationNode.GetName() != "Nodule ProbSAM"
    assert again.segmentationNode.GetScene() is slicer.mrmlScene  # the earlier result stays


def test_replacing_keeps_an_edited_consensus_and_says_so(slicer, module, logic, tiny_weights):
    volume = add_oblique_volume(slicer)
    roi = add_rotated_roi(slicer, volume, BLOB_CENTRE_IJK, ROI_SIZE, degrees=0)
    first = sample(logic, volume, [roi], tiny_weights)[0]
    # The user paints one voxel into the consensus (as the Segment Editor does: a new labelmap).
    node = first.segmentationNode
    edited = segment_array(node, "Consensus", volume)
    edited[tuple(np.array(BLOB_CENTRE_IJK[::-1]) + [0, 9, 9])] = True
    labelmap = module.outputs.oriented_labelmap(edited.astype(np.uint8), (0, 0, 0), module.outputs._ijk_to_ras(volume))
    assert slicer.vtkSlicerSegmentationsModuleLogic.SetBinaryLabelmapToSegment(labelmap, node, "Consensus")
    assert module.results.consensus_edited(node)

    second = sample(logic, volume, [roi], tiny_weights)[0]
    assert len(result_nodes(slicer)) == 1 and node.GetScene() is None
    names = segment_names(second.segmentationNode)
    assert "Consensus (edited)" in names and names.count("Consensus") == 1
    kept_id = second.segmentationNode.GetSegmentation().GetSegmentIdBySegmentName("Consensus (edited)")
    np.testing.assert_array_equal(segment_array(second.segmentationNode, kept_id, volume), edited)
    assert second.notes and "Consensus (edited)" in second.notes[0]
    assert "Consensus (edited)" in module.ProbSAMSlicerLogic.statusMessage([second])
    assert not module.results.consensus_edited(second.segmentationNode)  # the new consensus is untouched


def test_rotated_roi_gives_no_mask_voxel_outside_it_and_says_so(slicer, module, logic, tiny_weights):
    volume = add_oblique_volume(slicer)
    roi = add_rotated_roi(slicer, volume, BLOB_CENTRE_IJK, ROI_SIZE, degrees=35)
    out = sample(logic, volume, [roi], tiny_weights)[0]
    assert any("rotated" in w and "hull" in w for w in out.warnings)
    assert any("rotated" in row[3] for row in module.outputs.table_rows(out.tableNode))  # in the table
    assert "rotated" in module.ProbSAMSlicerLogic.statusMessage([out])  # and in the status line
    world_to_roi = np.linalg.inv(to_numpy(roi.GetObjectToWorldMatrix()))
    half = np.array(roi.GetSize()) / 2
    node = out.segmentationNode
    segmentation = node.GetSegmentation()
    voxels_seen = 0
    for n in range(segmentation.GetNumberOfSegments()):
        kji = np.argwhere(segment_array(node, segmentation.GetNthSegmentID(n), volume))
        world = np.column_stack([kji[:, ::-1], np.ones(len(kji))]) @ volume_to_world(volume).T
        local = world @ world_to_roi.T
        assert np.all(np.abs(local[:, :3]) <= half + 1e-3), segmentation.GetNthSegment(n).GetName()
        voxels_seen += len(kji)
    assert voxels_seen  # the tiny model marks the box: there are voxels to check


# --- hand-made results (no worker) ----------------------------------------------------------------------
def made_result(masks: np.ndarray, mean: np.ndarray, lo=(16, 14, 1), informative=None) -> dict:
    """A worker "result" message for ``masks`` (N, Kb, Jb, Ib) with the given mean probability; informative:
    the worker's "not every sample confidently off or on" mask (default: where the masks differ)."""
    from ProbSAMLib.inference.agreement import agreement_masks
    from ProbSAMLib.io.segfile import segment_colors

    agreement = agreement_masks(masks)
    n = len(masks)
    samples = [{"name": f"Sample {i + 1:02d}", "volume_mm3": float(masks[i].sum()), "longest_axial_diameter_mm": 1.0}
               for i in range(n)]
    stats = {"mean": 1.0, "sd": 0.0}
    shape = masks.shape[1:]
    if informative is None:
        informative = agreement["any"] & ~agreement["all"]
    return {"masks": masks, "lo": lo, "consensus": agreement["majority"], "agreement": agreement,
            "informative": informative,
            "mean_probability": mean.astype(np.float32), "entropy": np.full(shape, 0.5, np.float32),
            "variance": np.full(shape, 0.1, np.float32), "mutual_information": np.full(shape, 0.2, np.float32),
            "marking_share": 0.75, "colors": [(0.1 * i, 0.5, 0.5) for i in range(n)],
            "segment_colors": segment_colors(),  # what the worker sends (ProbSAMLib.io.segfile's colours)
            "summary": {"samples": samples, "spread": {"volume_mm3": stats, "longest_axial_diameter_mm": stats},
                        "settings": {"seed": 0, "n_samples": n, "device": "cpu"},
                        "box": {"ijk_first": list(lo), "ijk_last": [v + s - 1 for v, s in zip(lo, shape[::-1])]}},
            "model": {"name": "file", "sha256": "0" * 64}}


def test_overlay_is_transparent_where_every_sample_agrees_with_confidence(slicer, module):
    volume = add_oblique_volume(slicer)
    shape = (3, 6, 8)
    masks = np.zeros((2,) + shape, bool)
    masks[:, :, 2:4, 2:6] = True  # both samples: the core
    masks[0, :, 4, 2:6] = True  # one sample: the edge
    mean = np.where(masks.all(0), 0.95, np.where(masks.any(0), 0.5, 0.02))
    mean[0, 0, 0] = 0.3  # no mask, but a sample was unsure here (its probability between 0.1 and 0.9)
    probs = np.stack([np.where(m, 0.95, 0.02) for m in masks]).astype(np.float32)
    probs[0, 0, 0, 0] = 0.6
    from ProbSAMLib.inference.uncertainty import informative_mask  # the worker's rule, per-sample probabilities

    options = module.outputs.BuildOptions("entropy", "test", replace=True, closedSurface=True)
    out = module.outputs.build_outputs(volume, [None], ["Made"],
                                       [made_result(masks, mean, informative=informative_mask(probs))], options)[0]
    values = slicer.util.arrayFromVolume(out.mapNodes["entropy"])  # the box plus a 1-voxel margin
    inside = values[1:-1, 1:-1, 1:-1]
    shown = inside > 0
    expected = masks.any(0) & ~masks.all(0)
    expected[0, 0, 0] = True
    np.testing.assert_array_equal(shown, expected)  # the edge and the unsure voxel; not the core, not the box
    assert not values[0].any() and not values[:, 0].any()  # the margin
    # the 3D view: closed surfaces were made on request; the marking share is in the table
    assert out.segmentationNode.GetSegmentation().ContainsRepresentation("Closed surface")
    assert module.outputs.table_rows(out.tableNode)[4][3] == "75 %"


def test_failed_replace_leaves_the_previous_result(slicer, module, monkeypatch):
    """All or nothing: a failure while replacing removes the new result and keeps the old one."""
    volume = add_oblique_volume(slicer)
    roi = add_rotated_roi(slicer, volume, BLOB_CENTRE_IJK, ROI_SIZE, degrees=0)
    masks = np.ones((2, 2, 3, 3), bool)
    result = made_result(masks, np.full((2, 3, 3), 0.95))
    options = module.outputs.BuildOptions()
    first = module.outputs.build_outputs(volume, [roi], ["Nodule"], [result], options)[0]
    before = node_ids(slicer)
    previous = module.results.previous_result(roi)
    assert previous.segmentationNode is first.segmentationNode and previous.tableNode is first.tableNode
    monkeypatch.setattr(module.results, "consensus_edited", lambda node: (_ for _ in ()).throw(RuntimeError("x")))
    run = type("Run", (), {"error": None, "requests": [module.SamplingRequest("Nodule", None)], "results": [result],
                           "settings": module.SamplingSettings(), "roiNodes": [roi]})()
    with pytest.raises(RuntimeError):
        module.ProbSAMSlicerLogic().finishProcessing(run, volume)
    assert node_ids(slicer) == before
