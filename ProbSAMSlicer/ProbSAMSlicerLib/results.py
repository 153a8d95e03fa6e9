"""Results already in the scene: finding them (after a scene reload too), replacing an ROI's previous
result, and what is shown (the chosen uncertainty map, the samples).

A result is found from its segmentation node: the attribute outputs.RESULT_ATTRIBUTE and node references
to its ROI, input volume, maps and table. Both are saved with the scene, so a reloaded scene gives the
widget the same results (table rows come back from the table node).

Replacing keeps the user's work: if the previous consensus was edited in the Segment Editor (its voxels
no longer match the digest taken when it was made), it is copied into the new result's node as
"Consensus (edited)" before the previous result is removed, and the user is told.
"""

import json
import logging
from typing import Optional

import slicer

from ProbSAMSlicerLib import outputs
from ProbSAMSlicerLib.outputs import RoiOutputs


# --- finding ------------------------------------------------------------------------------------------
def result_nodes(scene=None) -> list:
    """Every result's segmentation node in the scene, in scene order (the last is the newest)."""
    nodes = slicer.util.getNodesByClass("vtkMRMLSegmentationNode") if scene is None else [
        scene.GetNthNodeByClass(n, "vtkMRMLSegmentationNode")
        for n in range(scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode"))]
    return [node for node in nodes if node.GetAttribute(outputs.RESULT_ATTRIBUTE) == "1"]


def outputs_of(segmentation_node) -> RoiOutputs:
    """The RoiOutputs of a result, from its segmentation node's references and attributes."""
    roi = segmentation_node.GetNodeReference(outputs.ROI_REFERENCE)
    attribute = lambda key: segmentation_node.GetAttribute(outputs.PROVENANCE_PREFIX + key)  # noqa: E731
    name = roi.GetName() if roi is not None else (attribute("ROI") or segmentation_node.GetName())
    maps = {kind: segmentation_node.GetNodeReference(outputs.MAP_REFERENCE + kind) for kind in outputs.MAP_KINDS}
    share = attribute("MarkingShare")
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(segmentation_node.GetScene())
    item = sh.GetItemByDataNode(segmentation_node)
    folder = sh.GetItemParent(item) if item else 0
    return RoiOutputs(name, roi, folderItemId=folder if folder and folder != sh.GetSceneItemID() else 0,
                      segmentationNode=segmentation_node,
                      mapNodes={kind: node for kind, node in maps.items() if node is not None},
                      tableNode=segmentation_node.GetNodeReference(outputs.TABLE_REFERENCE),
                      warnings=_json_list(attribute("Warnings")),
                      markingShare=None if share in (None, "", "n/a") else float(share))


def _json_list(text: Optional[str]) -> list:
    try:
        value = json.loads(text) if text else []
    except ValueError:
        return []
    return value if isinstance(value, list) else []


def scene_results() -> list:
    """RoiOutputs of every result in the scene (the widget's list after a reload)."""
    return [outputs_of(node) for node in result_nodes()]


def previous_result(roi_node) -> Optional[RoiOutputs]:
    """The newest earlier result of this ROI, or None."""
    if roi_node is None:
        return None
    mine = [node for node in result_nodes() if node.GetNodeReferenceID(outputs.ROI_REFERENCE) == roi_node.GetID()]
    return outputs_of(mine[-1]) if mine else None


# --- replacing ----------------------------------------------------------------------------------------
def consensus_edited(segmentation_node) -> bool:
    """Whether the consensus segment's voxels differ from when the module made it."""
    made = segmentation_node.GetAttribute(outputs.PROVENANCE_PREFIX + "ConsensusDigest")
    segmentation = segmentation_node.GetSegmentation()
    if not made or segmentation.GetSegment(outputs.CONSENSUS_ID) is None:
        return False  # not ours, or deleted: nothing to keep
    return outputs.voxels_digest(outputs.segment_voxels(segmentation_node, outputs.CONSENSUS_ID)) != made


def keep_edited_consensus(previous: RoiOutputs, new: RoiOutputs) -> str:
    """Copy the edited consensus into the new node as "Consensus (edited)"; the note for the user."""
    source, target = previous.segmentationNode, new.segmentationNode
    name = outputs.CONSENSUS_ID + outputs.EDITED_SUFFIX
    if source.GetTransformNodeID() != target.GetTransformNodeID():
        # Labelmaps are stored in their node's frame: copying across frames would move the edit. Keep the
        # whole previous node instead, renamed.
        source.SetName(source.GetName() + outputs.EDITED_SUFFIX)
        source.RemoveAttribute(outputs.RESULT_ATTRIBUTE)
        previous.segmentationNode = None  # not removed with the rest of the previous result
        return f"your edited consensus was kept in '{source.GetName()}'"
    segmentation = target.GetSegmentation()
    if not segmentation.CopySegmentFromSegmentation(source.GetSegmentation(), outputs.CONSENSUS_ID):
        raise RuntimeError("could not copy the edited consensus into the new result")
    copied = segmentation.GetSegment(outputs.CONSENSUS_ID + "_1") or _last_segment(segmentation)
    copied.SetName(name)
    return f"your edited consensus was kept as segment '{name}' of '{target.GetName()}'"


def _last_segment(segmentation):
    return segmentation.GetNthSegment(segmentation.GetNumberOfSegments() - 1)


def replace_previous(previous: Optional[RoiOutputs], new: RoiOutputs) -> None:
    """Remove the ROI's previous result once the new one is built, keeping an edited consensus."""
    if previous is None or previous.segmentationNode is None:
        return
    if consensus_edited(previous.segmentationNode):
        new.notes.append(keep_edited_consensus(previous, new))
        logging.info(f"ProbSAM: {new.notes[-1]}")
    outputs.remove_outputs([previous])


# --- showing ------------------------------------------------------------------------------------------
def show_map(input_volume, roi_outputs: RoiOutputs, kind: str) -> None:
    """The chosen map as a partly transparent foreground over the input, with its colour legend."""
    chosen = roi_outputs.mapNodes.get(kind)
    if chosen is None:
        return
    for map_kind, node in roi_outputs.mapNodes.items():
        legend = slicer.vtkSlicerColorLogic.GetColorLegendDisplayNode(node)
        if legend is not None:
            legend.SetVisibility(map_kind == kind)
    slicer.util.setSliceViewerLayers(background=input_volume, foreground=chosen,
                                     foregroundOpacity=outputs.UNCERTAINTY_OPACITY)


def show_samples(roi_outputs: RoiOutputs, visible: bool, index: int = -1) -> None:
    """Sample segments on or off; with ``index`` >= 0 only that sample. The consensus stays as it is."""
    node = roi_outputs.segmentationNode
    display = node.GetDisplayNode() if node is not None else None
    if display is None:
        return
    for n, segment_id in enumerate(roi_outputs.sampleSegmentIds()):
        display.SetSegmentVisibility(segment_id, visible and (index < 0 or n == index))
