"""MRML nodes from finished sampling results: all built on the main thread, all or nothing.

Per ROI: a subject-hierarchy folder named after the ROI holding N segmentation nodes (one segment each,
distinct colours, the input volume's geometry), one uncertainty volume and a summary table. If building
fails half-way, every node made so far (for every ROI) is removed again: no half-built scene.
"""

import contextlib
from dataclasses import dataclass, field

import numpy as np
import vtk

import slicer

UNCERTAINTY_COLOR_NODE = "Viridis"
UNCERTAINTY_OPACITY = 0.5
UNCERTAINTY_TITLES = {"entropy": "entropy", "variance": "variance", "mutual_information": "mutual information"}


@dataclass
class RoiOutputs:
    """The nodes made for one ROI (``folderItemId`` is a subject-hierarchy item id)."""

    roiName: str
    folderItemId: int = 0
    segmentationNodes: list = field(default_factory=list)
    uncertaintyVolumeNode: object = None
    tableNode: object = None
    summary: dict = field(default_factory=dict)

    def nodes(self) -> list:
        return [n for n in self.segmentationNodes + [self.uncertaintyVolumeNode, self.tableNode] if n is not None]


def _subject_hierarchy():
    return slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(slicer.mrmlScene)


def _sample_name(n: int, count: int) -> str:
    from ProbSAMLib.report import segment_names

    return segment_names(count)[n]


@contextlib.contextmanager
def _new_node(class_name: str, name: str):
    """A new scene node that is removed again if filling it fails (the caller never sees it then)."""
    node = slicer.mrmlScene.AddNewNodeByClass(class_name, name)
    try:
        yield node
    except Exception:
        slicer.mrmlScene.RemoveNode(node)
        raise


def add_segmentation(input_volume, mask: np.ndarray, name: str, color) -> object:
    """One segmentation node with one segment, on the input volume's geometry."""
    with _new_node("vtkMRMLSegmentationNode", name) as node:
        _fill_segmentation(node, input_volume, mask, name, color)
    return node


def _fill_segmentation(node, input_volume, mask: np.ndarray, name: str, color) -> None:
    node.CreateDefaultDisplayNodes()
    node.SetReferenceImageGeometryParameterFromVolumeNode(input_volume)
    segment_id = node.GetSegmentation().AddEmptySegment("", name, list(color))
    slicer.util.updateSegmentBinaryLabelmapFromArray(mask.astype(np.uint8), node, segment_id, input_volume)


def add_uncertainty_volume(input_volume, values: np.ndarray, name: str) -> object:
    """A float32 scalar volume on the input's grid, Viridis-coloured."""
    with _new_node("vtkMRMLScalarVolumeNode", name) as node:
        node.CopyOrientation(input_volume)
        slicer.util.updateVolumeFromArray(node, values.astype(np.float32))
        node.CreateDefaultDisplayNodes()
        color = slicer.mrmlScene.GetFirstNodeByName(UNCERTAINTY_COLOR_NODE)
        display = node.GetDisplayNode()
        if color is not None and display is not None:
            display.SetAndObserveColorNodeID(color.GetID())
    return node


def _column(array_class, name: str, values) -> object:
    column = array_class()
    column.SetName(name)
    for value in values:
        column.InsertNextValue(value)
    return column


def add_summary_table(summary: dict, name: str) -> object:
    """Per-sample volume (mm³) and longest axial diameter (mm), then mean and sd rows."""
    samples = summary["samples"]
    volume, diameter = summary["spread"]["volume_mm3"], summary["spread"]["longest_axial_diameter_mm"]
    labels = [s["name"] for s in samples] + ["mean", "sd"]
    volumes = [s["volume_mm3"] for s in samples] + [volume["mean"], volume["sd"]]
    diameters = [s["longest_axial_diameter_mm"] for s in samples] + [diameter["mean"], diameter["sd"]]
    with _new_node("vtkMRMLTableNode", name) as node:
        node.AddColumn(_column(vtk.vtkStringArray, "Sample", labels))
        node.AddColumn(_column(vtk.vtkDoubleArray, "Volume (mm3)", [float(v or 0.0) for v in volumes]))
        node.AddColumn(_column(vtk.vtkDoubleArray, "Diameter (mm)", [float(v or 0.0) for v in diameters]))
    return node


def _build_one(input_volume, roi_name: str, result: dict, uncertainty_kind: str, outputs: RoiOutputs) -> None:
    """Fills ``outputs`` as it goes, so that a failure leaves a record of what to remove."""
    from ProbSAMLib.imageio import distinct_colors

    sh = _subject_hierarchy()
    outputs.folderItemId = sh.CreateFolderItem(sh.GetSceneItemID(), f"ProbSAM {roi_name}")
    masks = result["masks"]
    for n, color in enumerate(distinct_colors(len(masks))):
        name = f"{roi_name} {_sample_name(n, len(masks))}"
        outputs.segmentationNodes.append(add_segmentation(input_volume, masks[n], name, color))
    title = UNCERTAINTY_TITLES[uncertainty_kind]
    outputs.uncertaintyVolumeNode = add_uncertainty_volume(input_volume, result[uncertainty_kind],
                                                           f"{roi_name} {title}")
    outputs.tableNode = add_summary_table(result["summary"], f"{roi_name} sizes")
    for node in outputs.nodes():
        sh.SetItemParent(sh.GetItemByDataNode(node), outputs.folderItemId)


def remove_outputs(all_outputs: list) -> None:
    """Remove every node and folder listed (the rollback of a failed build)."""
    sh = _subject_hierarchy()
    for outputs in all_outputs:
        for node in outputs.nodes():
            if node.GetScene() is not None:
                slicer.mrmlScene.RemoveNode(node)
        if outputs.folderItemId:
            sh.RemoveItem(outputs.folderItemId)


def build_outputs(input_volume, roi_names: list, results: list, uncertainty_kind: str = "entropy") -> list:
    """RoiOutputs per ROI from finished results (dicts of numpy arrays and the summary); all or nothing."""
    if uncertainty_kind not in UNCERTAINTY_TITLES:
        raise ValueError(f"uncertainty kind must be one of {list(UNCERTAINTY_TITLES)}, got {uncertainty_kind!r}")
    built = []
    try:
        for roi_name, result in zip(roi_names, results):
            built.append(RoiOutputs(roi_name, summary=result["summary"]))
            _build_one(input_volume, roi_name, result, uncertainty_kind, built[-1])
    except Exception:
        remove_outputs(built)
        raise
    return built


def show_sample(outputs: RoiOutputs, index: int) -> None:
    """Show only sample ``index`` of one ROI's outputs (-1: all of them)."""
    for n, node in enumerate(outputs.segmentationNodes):
        display = node.GetDisplayNode()
        if display is not None:
            display.SetVisibility(index < 0 or n == index)


def show_uncertainty(input_volume, outputs: RoiOutputs) -> None:
    """The uncertainty volume as a partly transparent foreground over the input in the slice views."""
    if outputs.uncertaintyVolumeNode is not None:
        slicer.util.setSliceViewerLayers(background=input_volume, foreground=outputs.uncertaintyVolumeNode,
                                         foregroundOpacity=UNCERTAINTY_OPACITY)
