"""MRML nodes from finished sampling results: all built on the main thread, all or nothing.

Per ROI: a subject-hierarchy folder named after the ROI holding N segmentation nodes (one segment each,
distinct colours), one uncertainty volume and a summary table. If building fails half-way, every node
made so far (for every ROI) is removed again: no half-built scene.

Where they sit: under the input volume's parent transform, on the input volume's voxel grid (its
IJKToRAS), so they land where the volume lands in world coordinates whatever transform chain it has.
How big they are: each segment's labelmap (a vtkOrientedImageData) and the uncertainty volume cover the
ROI's voxel box plus MARGIN_VOXELS, not the whole CT (a 512x512x300 CT would cost ~79 MB per sample).
"""

import contextlib
from dataclasses import dataclass, field

import numpy as np
import vtk
from vtk.util import numpy_support

import slicer

UNCERTAINTY_COLOR_NODE = "Viridis"  # Slicer's default colour tables; the slicer-core wheel has none
UNCERTAINTY_OPACITY = 0.5
UNCERTAINTY_TITLES = {"entropy": "entropy", "variance": "variance", "mutual_information": "mutual information"}
MARGIN_VOXELS = 1  # a zero border so that a mask touching the box still gets a closed surface
PROVENANCE_PREFIX = "ProbSAM."


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


def remove_node(node) -> None:
    """Remove a node with the display and storage nodes made for it (RemoveNode leaves them behind)."""
    scene = node.GetScene()
    if scene is None:
        return
    dependents = []
    if node.IsA("vtkMRMLDisplayableNode"):
        dependents += [node.GetNthDisplayNode(n) for n in range(node.GetNumberOfDisplayNodes())]
    if node.IsA("vtkMRMLStorableNode"):
        dependents.append(node.GetStorageNode())
    scene.RemoveNode(node)
    for dependent in dependents:
        if dependent is not None and dependent.GetScene() is not None:
            scene.RemoveNode(dependent)


@contextlib.contextmanager
def _new_node(class_name: str, name: str):
    """A new scene node that is removed again if filling it fails (the caller never sees it then)."""
    node = slicer.mrmlScene.AddNewNodeByClass(class_name, name)
    try:
        yield node
    except Exception:
        remove_node(node)
        raise


# --- geometry -----------------------------------------------------------------------------------------
def padded_box(lo_ijk, shape_kji_box, volume_dims_ijk, margin: int = MARGIN_VOXELS) -> tuple:
    """(lo, hi) (i, j, k), hi exclusive: the results' box grown by ``margin``, inside the volume."""
    hi = [lo_ijk[a] + shape_kji_box[2 - a] for a in range(3)]
    return (tuple(max(0, lo_ijk[a] - margin) for a in range(3)),
            tuple(min(volume_dims_ijk[a], hi[a] + margin) for a in range(3)))


def _padded_values(values_box: np.ndarray, lo_ijk, lo, hi, dtype) -> np.ndarray:
    """Box-sized (Kb, Jb, Ib) values inside the (lo, hi) block, zeros in the margin."""
    out = np.zeros((hi[2] - lo[2], hi[1] - lo[1], hi[0] - lo[0]), dtype=dtype)
    k, j, i = (lo_ijk[2] - lo[2], lo_ijk[1] - lo[1], lo_ijk[0] - lo[0])
    out[k:k + values_box.shape[0], j:j + values_box.shape[1], i:i + values_box.shape[2]] = values_box
    return out


def _ijk_to_ras(volume_node) -> "vtk.vtkMatrix4x4":
    matrix = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(matrix)
    return matrix


def oriented_labelmap(mask_block: np.ndarray, lo, ijk_to_ras: "vtk.vtkMatrix4x4") -> "slicer.vtkOrientedImageData":
    """A uint8 vtkOrientedImageData on the CT's grid whose extent is the block at voxel ``lo`` (i, j, k)."""
    image = slicer.vtkOrientedImageData()
    k, j, i = mask_block.shape
    image.SetExtent(lo[0], lo[0] + i - 1, lo[1], lo[1] + j - 1, lo[2], lo[2] + k - 1)
    image.SetImageToWorldMatrix(ijk_to_ras)
    scalars = numpy_support.numpy_to_vtk(np.ascontiguousarray(mask_block, dtype=np.uint8).ravel(), deep=True,
                                         array_type=vtk.VTK_UNSIGNED_CHAR)
    image.GetPointData().SetScalars(scalars)
    return image


# --- nodes --------------------------------------------------------------------------------------------
def add_segmentation(input_volume, mask_block: np.ndarray, lo, name: str, color) -> object:
    """One segmentation node with one segment: the block's labelmap, where the input volume sits."""
    with _new_node("vtkMRMLSegmentationNode", name) as node:
        node.SetAndObserveTransformNodeID(input_volume.GetTransformNodeID())
        node.CreateDefaultDisplayNodes()
        node.SetReferenceImageGeometryParameterFromVolumeNode(input_volume)
        segment_id = node.GetSegmentation().AddEmptySegment("", name, list(color))
        labelmap = oriented_labelmap(mask_block, lo, _ijk_to_ras(input_volume))
        if not slicer.vtkSlicerSegmentationsModuleLogic.SetBinaryLabelmapToSegment(labelmap, node, segment_id):
            raise RuntimeError(f"could not set the labelmap of segment '{name}'")
        node.AddDefaultStorageNode()
        node.GetStorageNode().SetCropToMinimumExtent(True)  # saved .seg.nrrd files stay box-sized too
    return node


def add_uncertainty_volume(input_volume, values_block: np.ndarray, lo, name: str) -> object:
    """A float32 volume of the block on the input's grid (origin at voxel ``lo``), under its transform.

    Window 0..max (automatic window/level would use percentiles over a mostly empty volume), values <= 0
    transparent, a colour legend.
    """
    with _new_node("vtkMRMLScalarVolumeNode", name) as node:
        ijk_to_ras = _ijk_to_ras(input_volume)
        origin = [sum(ijk_to_ras.GetElement(r, c) * (lo[c] if c < 3 else 1) for c in range(4)) for r in range(3)]
        corner = vtk.vtkMatrix4x4()
        corner.DeepCopy(ijk_to_ras)
        for r in range(3):
            corner.SetElement(r, 3, origin[r])
        node.SetIJKToRASMatrix(corner)
        node.SetAndObserveTransformNodeID(input_volume.GetTransformNodeID())
        slicer.util.updateVolumeFromArray(node, values_block.astype(np.float32))
        node.CreateDefaultDisplayNodes()
        _style_uncertainty(node, float(values_block.max(initial=0.0)))
    return node


def _style_uncertainty(node, maximum: float) -> None:
    display = node.GetDisplayNode()
    color = slicer.mrmlScene.GetFirstNodeByName(UNCERTAINTY_COLOR_NODE)
    if color is not None:
        display.SetAndObserveColorNodeID(color.GetID())
    top = maximum if maximum > 0 else 1.0
    display.AutoWindowLevelOff()
    display.SetWindowLevelMinMax(0.0, top)
    display.SetApplyThreshold(True)
    display.SetLowerThreshold(np.nextafter(np.float32(0), np.float32(1)))  # zeros (and below) transparent
    display.SetUpperThreshold(max(top, 1e30))
    slicer.vtkSlicerColorLogic.AddDefaultColorLegendDisplayNode(node)


def summary_rows(summary: dict) -> list:
    """(label, volume mm³, diameter mm) per sample, then mean and sd: the table node's and the widget's."""
    rows = [(s["name"], s["volume_mm3"], s["longest_axial_diameter_mm"]) for s in summary["samples"]]
    spread = summary["spread"]
    for stat in ("mean", "sd"):
        rows.append((stat, spread["volume_mm3"][stat], spread["longest_axial_diameter_mm"][stat]))
    return [(label, float(volume or 0.0), float(diameter or 0.0)) for label, volume, diameter in rows]


def _column(array_class, name: str, values) -> object:
    column = array_class()
    column.SetName(name)
    for value in values:
        column.InsertNextValue(value)
    return column


def add_summary_table(summary: dict, name: str) -> object:
    """Per-sample volume (mm³) and longest axial diameter (mm), then mean and sd rows."""
    labels, volumes, diameters = zip(*summary_rows(summary))
    with _new_node("vtkMRMLTableNode", name) as node:
        node.AddColumn(_column(vtk.vtkStringArray, "Sample", labels))
        node.AddColumn(_column(vtk.vtkDoubleArray, "Volume (mm3)", volumes))
        node.AddColumn(_column(vtk.vtkDoubleArray, "Diameter (mm)", diameters))
    return node


def provenance(result: dict, version: str) -> dict:
    """The attributes every output node carries: how it was made, enough to make it again."""
    settings, box = result["summary"]["settings"], result["summary"]["box"]
    model = result.get("model", {})
    return {"Model": model.get("name", ""), "ModelSHA256": model.get("sha256", ""), "Seed": str(settings["seed"]),
            "NumberOfSamples": str(settings["n_samples"]),
            "BoxIJK": " ".join(str(v) for v in box["ijk_first"] + box["ijk_last"]),
            "Version": version}


def _build_one(input_volume, roi_name: str, result: dict, uncertainty_kind: str, version: str,
               outputs: RoiOutputs) -> None:
    """Fills ``outputs`` as it goes, so that a failure leaves a record of what to remove.

    Names and colours come from the worker (the CLI's: ProbSAMLib.app.report / imageio), so that Slicer's
    process does not import SimpleITK and scipy for them.
    """
    sh = _subject_hierarchy()
    outputs.folderItemId = sh.CreateFolderItem(sh.GetSceneItemID(), f"ProbSAM {roi_name}")
    masks, lo_box = result["masks"], tuple(result["lo"])
    lo, hi = padded_box(lo_box, masks.shape[1:], input_volume.GetImageData().GetDimensions())
    names = [sample["name"] for sample in result["summary"]["samples"]]
    for n, color in enumerate(result["colors"]):
        block = _padded_values(masks[n], lo_box, lo, hi, np.uint8)
        outputs.segmentationNodes.append(add_segmentation(input_volume, block, lo, f"{roi_name} {names[n]}", color))
    values = _padded_values(result[uncertainty_kind], lo_box, lo, hi, np.float32)
    outputs.uncertaintyVolumeNode = add_uncertainty_volume(input_volume, values, lo,
                                                           f"{roi_name} {UNCERTAINTY_TITLES[uncertainty_kind]}")
    outputs.tableNode = add_summary_table(result["summary"], f"{roi_name} sizes")
    attributes = provenance(result, version)
    for node in outputs.nodes():
        for key, value in attributes.items():
            node.SetAttribute(PROVENANCE_PREFIX + key, value)
        item = sh.GetItemByDataNode(node)  # made by Slicer's (Qt) subject-hierarchy plugins, if present
        if item:
            sh.SetItemParent(item, outputs.folderItemId)
        else:
            sh.CreateItem(outputs.folderItemId, node)


def remove_outputs(all_outputs: list) -> None:
    """Remove every node and folder listed (the rollback of a failed build)."""
    sh = _subject_hierarchy()
    for outputs in all_outputs:
        for node in outputs.nodes():
            remove_node(node)
        if outputs.folderItemId:
            sh.RemoveItem(outputs.folderItemId)


def build_outputs(input_volume, roi_names: list, results: list, uncertainty_kind: str = "entropy",
                  version: str = "") -> list:
    """RoiOutputs per ROI from the worker's results (box-sized arrays, offset, summary); all or nothing."""
    if uncertainty_kind not in UNCERTAINTY_TITLES:
        raise ValueError(f"uncertainty kind must be one of {list(UNCERTAINTY_TITLES)}, got {uncertainty_kind!r}")
    if input_volume.GetScene() is not slicer.mrmlScene:
        raise RuntimeError("the input volume left the scene while sampling (scene closed?): nothing was added")
    built = []
    try:
        for roi_name, result in zip(roi_names, results):
            built.append(RoiOutputs(roi_name, summary=result["summary"]))
            _build_one(input_volume, roi_name, result, uncertainty_kind, version, built[-1])
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
