"""MRML nodes from finished sampling results: all built on the main thread, all or nothing.

Per ROI, in a subject-hierarchy folder "<ROI> ProbSAM":
- ONE segmentation node "<ROI> ProbSAM": the consensus segment (voxels in more than half of the samples:
  the one to edit in the Segment Editor; shown), the N sample segments (hidden, each a distinct colour)
  and the three agreement segments (any / more than half / all samples; hidden);
- the four uncertainty volumes (entropy, mean probability, variance, mutual information), all kept; the
  chosen one is shown over the CT (``results.show_map``);
- a table: each sample's volume (mL) and longest axial diameter (mm), their mean and sd, the marking
  share ("n/a" for a model without one) and every geometry warning.
If building fails half-way, every node made so far (for every ROI) is removed again.

Where they sit: under the input volume's parent transform, on the input volume's voxel grid (its
IJKToRAS), so they land where the volume lands in world coordinates whatever transform chain it has.
How big they are: each segment's labelmap (a vtkOrientedImageData) and each map cover the ROI's voxel box
plus MARGIN_VOXELS, not the whole CT (a 512x512x300 CT would cost ~79 MB per segment).

This module imports nothing that imports torch: Slicer's process must never load it (it freezes the GUI
for seconds and costs ~800 MB). Names come from the torch-free ProbSAMLib.inference.agreement.
"""

import contextlib
import datetime
import hashlib
import json
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import vtk
from vtk.util import numpy_support

import slicer

from ProbSAMLib.inference.agreement import AGREEMENT_LEVELS, AGREEMENT_NAMES, CONSENSUS_NAME

UNCERTAINTY_COLOR_NODE = "Viridis"  # Slicer's default colour tables; the slicer-core wheel has none
UNCERTAINTY_OPACITY = 0.6
MAP_KINDS = ("entropy", "mean_probability", "variance", "mutual_information")
MAP_TITLES = {"entropy": "entropy", "mean_probability": "mean probability", "variance": "variance",
              "mutual_information": "mutual information"}
MARGIN_VOXELS = 1  # a zero border so that a mask touching the box still gets a closed surface
PROVENANCE_PREFIX = "ProbSAM."
RESULT_ATTRIBUTE = "ProbSAM.Result"  # "1" on the segmentation node of every result: how results are found
# Node references from the result's segmentation node (they survive saving and loading the scene).
ROI_REFERENCE, VOLUME_REFERENCE, TABLE_REFERENCE = "ProbSAMROI", "ProbSAMInputVolume", "ProbSAMTable"
MAP_REFERENCE = "ProbSAMMap_"  # + kind
CONSENSUS_ID = "Consensus"
EDITED_SUFFIX = " (edited)"
# Every segment outlines the boxed object: the model is trained on lung nodules, so the DICOM/SNOMED
# "Morphologically altered structure / Nodule" terminology fits (Slicer's terminology tag format).
TERMINOLOGY = ("Segmentation category and type - DICOM master list~SCT^49755003^Morphologically Altered "
               "Structure~SCT^27925004^Nodule~^^~Anatomic codes - DICOM master list~^^~^^")


@dataclass
class BuildOptions:
    """How to build: the map shown, the version, replace the ROI's previous result (else a new node),
    closed surfaces for 3D."""

    uncertaintyKind: str = "entropy"
    version: str = ""
    replace: bool = True
    closedSurface: bool = False


@dataclass
class RoiOutputs:
    """The nodes of one ROI's result (``folderItemId`` is a subject-hierarchy item id)."""

    roiName: str
    roiNode: object = None
    folderItemId: int = 0
    segmentationNode: object = None
    mapNodes: dict = field(default_factory=dict)
    tableNode: object = None
    summary: dict = field(default_factory=dict)
    warnings: list = field(default_factory=list)  # geometry said aloud: clamp, rotated ROI, frames
    notes: list = field(default_factory=list)  # what replacing did (a kept edit)
    markingShare: Optional[float] = None

    def nodes(self) -> list:
        return [n for n in [self.segmentationNode, *self.mapNodes.values(), self.tableNode] if n is not None]

    def sampleSegmentIds(self) -> list:
        """Segment ids of the samples, in order ("Sample_01", ...)."""
        if self.segmentationNode is None:
            return []
        segmentation = self.segmentationNode.GetSegmentation()
        ids = [segmentation.GetNthSegmentID(n) for n in range(segmentation.GetNumberOfSegments())]
        return [i for i in ids if i.startswith("Sample_")]


def sample_segment_id(name: str) -> str:
    return name.replace(" ", "_")  # "Sample 01" -> "Sample_01"


def agreement_segment_id(level: str) -> str:
    return f"Agreement_{level}"


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


def segment_voxels(segmentation_node, segment_id: str) -> np.ndarray:
    """(n, 3) int64 (k, j, i) CT-grid indices of a segment's voxels, sorted; Slicer's shared labelmap
    layers (the Segment Editor merges segments into them) are read through the segment's own label."""
    image = slicer.vtkOrientedImageData()
    ok = slicer.vtkSlicerSegmentationsModuleLogic.GetSegmentBinaryLabelmapRepresentation(
        segmentation_node, segment_id, image)
    scalars = image.GetPointData().GetScalars() if ok else None
    if scalars is None:
        return np.zeros((0, 3), np.int64)
    extent = image.GetExtent()
    dims = [extent[2 * a + 1] - extent[2 * a] + 1 for a in range(3)]
    array = numpy_support.vtk_to_numpy(scalars).reshape(dims[::-1])
    return np.argwhere(array > 0) + np.array([extent[4], extent[2], extent[0]])


def voxels_digest(voxels: np.ndarray) -> str:
    """SHA-256 of a voxel list: whether the consensus was edited since it was made."""
    return hashlib.sha256(np.ascontiguousarray(voxels, dtype=np.int64).tobytes()).hexdigest()


# --- the segmentation -----------------------------------------------------------------------------------
def _segment_plan(result: dict) -> list:
    """(id, name, colour, visible, mask (Kb, Jb, Ib)) of every segment: consensus, samples, agreement."""
    colors = result["segment_colors"]  # ProbSAMLib.io.segfile's, as in the CLI's samples.seg.nrrd (checked on arrival)
    plan = [(CONSENSUS_ID, CONSENSUS_NAME, colors["consensus"], True, result["consensus"])]
    names = [sample["name"] for sample in result["summary"]["samples"]]
    plan += [(sample_segment_id(names[n]), names[n], result["colors"][n], False, result["masks"][n])
             for n in range(len(names))]
    plan += [(agreement_segment_id(level), AGREEMENT_NAMES[level], colors["agreement"][level], False,
              result["agreement"][level]) for level in AGREEMENT_LEVELS]
    return plan


def add_segmentation(input_volume, result: dict, name: str) -> object:
    """The one segmentation node of a result: every segment's cropped labelmap, where the input sits."""
    masks = result["masks"]
    lo_box = tuple(result["lo"])
    lo, hi = padded_box(lo_box, masks.shape[1:], input_volume.GetImageData().GetDimensions())
    ijk_to_ras = _ijk_to_ras(input_volume)
    with _new_node("vtkMRMLSegmentationNode", name) as node:
        node.SetAndObserveTransformNodeID(input_volume.GetTransformNodeID())
        node.CreateDefaultDisplayNodes()
        node.SetReferenceImageGeometryParameterFromVolumeNode(input_volume)
        segmentation, display = node.GetSegmentation(), node.GetDisplayNode()
        for segment_id, segment_name, color, visible, mask in _segment_plan(result):
            segmentation.AddEmptySegment(segment_id, segment_name, list(color))
            segmentation.GetSegment(segment_id).SetTag(slicer.vtkSegment.GetTerminologyEntryTagName(), TERMINOLOGY)
            labelmap = oriented_labelmap(_padded_values(mask, lo_box, lo, hi, np.uint8), lo, ijk_to_ras)
            if not slicer.vtkSlicerSegmentationsModuleLogic.SetBinaryLabelmapToSegment(labelmap, node, segment_id):
                raise RuntimeError(f"could not set the labelmap of segment '{segment_name}'")
            display.SetSegmentVisibility(segment_id, visible)
        node.SetAttribute(PROVENANCE_PREFIX + "ConsensusDigest", voxels_digest(segment_voxels(node, CONSENSUS_ID)))
        node.AddDefaultStorageNode()
        node.GetStorageNode().SetCropToMinimumExtent(True)  # saved .seg.nrrd files stay box-sized too
    return node


def add_closed_surfaces(segmentation_node) -> None:
    """Closed surfaces for the 3D view (on request: they take time for 64 samples)."""
    segmentation_node.CreateClosedSurfaceRepresentation()
    segmentation_node.GetDisplayNode().SetVisibility3D(True)


# --- the uncertainty volumes ----------------------------------------------------------------------------
def informative(result: dict) -> np.ndarray:
    """(Kb, Jb, Ib) bool: voxels where the samples do not all agree with confidence (the worker's exact
    "not every sample's probability < 0.1, not every one > 0.9", ProbSAMLib.inference.uncertainty); the maps
    are transparent elsewhere."""
    return np.asarray(result["informative"], dtype=bool)


def add_map_volume(input_volume, values_block: np.ndarray, lo, name: str, kind: str) -> object:
    """A float32 volume of the block on the input's grid (origin at voxel ``lo``), under its transform."""
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
        _style_map(node, kind, float(values_block.max(initial=0.0)))
        node.SetAttribute(PROVENANCE_PREFIX + "Map", kind)
    return node


def _style_map(node, kind: str, maximum: float) -> None:
    """Window 0..max (automatic window/level uses percentiles over a mostly empty box), values <= 0
    transparent (the uninformative voxels were set to 0), a colour legend."""
    display = node.GetDisplayNode()
    color = slicer.mrmlScene.GetFirstNodeByName(UNCERTAINTY_COLOR_NODE)
    if color is not None:
        display.SetAndObserveColorNodeID(color.GetID())
    top = 1.0 if kind == "mean_probability" else (maximum if maximum > 0 else 1.0)
    display.AutoWindowLevelOff()
    display.SetWindowLevelMinMax(0.0, top)
    display.SetApplyThreshold(True)
    display.SetLowerThreshold(float(np.nextafter(np.float32(0), np.float32(1))))  # zeros transparent
    display.SetUpperThreshold(max(top, 1e30))
    slicer.vtkSlicerColorLogic.AddDefaultColorLegendDisplayNode(node)
    legend = slicer.vtkSlicerColorLogic.GetColorLegendDisplayNode(node)
    if legend is not None:
        legend.SetTitleText(MAP_TITLES[kind])
        legend.SetVisibility(False)  # shown with the map (results.show_map)


def add_map_volumes(input_volume, result: dict, base_name: str) -> dict:
    """All four maps, zero where the samples all agree with confidence (so that is transparent)."""
    lo_box = tuple(result["lo"])
    lo, hi = padded_box(lo_box, result["masks"].shape[1:], input_volume.GetImageData().GetDimensions())
    keep = informative(result)
    nodes = {}
    for kind in MAP_KINDS:
        values = _padded_values(np.where(keep, result[kind], 0.0), lo_box, lo, hi, np.float32)
        nodes[kind] = add_map_volume(input_volume, values, lo, f"{base_name} {MAP_TITLES[kind]}", kind)
    return nodes


# --- the table ------------------------------------------------------------------------------------------
TABLE_COLUMNS = ("Sample", "Volume (mL)", "Longest diameter (mm)", "Note")


def marking_share_text(share: Optional[float]) -> str:
    return "n/a" if share is None else f"{100 * float(share):.0f} %"


def summary_rows(summary: dict, marking_share: Optional[float] = None, warnings=()) -> list:
    """(label, volume mL, diameter mm, note) per sample, then mean and sd, the share of readers expected to
    mark the lesion, and one row per warning: the table node's rows (and so the widget's)."""
    rows = [(s["name"], s["volume_mm3"] / 1000.0, s["longest_axial_diameter_mm"], "")
            for s in summary["samples"]]
    spread = summary["spread"]
    for stat in ("mean", "sd"):
        volume, diameter = spread["volume_mm3"][stat], spread["longest_axial_diameter_mm"][stat]
        rows.append((stat, None if volume is None else volume / 1000.0, diameter, "across samples"))
    rows.append(("marking share", None, None, marking_share_text(marking_share)))
    rows += [("warning", None, None, text) for text in warnings]
    return [(label, float("nan") if v is None else float(v), float("nan") if d is None else float(d), note)
            for label, v, d, note in rows]


def _column(array_class, name: str, values) -> object:
    column = array_class()
    column.SetName(name)
    for value in values:
        column.InsertNextValue(value)
    return column


def add_summary_table(rows: list, name: str) -> object:
    """The rows of ``summary_rows`` as a table node (numbers as doubles, NaN where none)."""
    labels, volumes, diameters, notes = zip(*rows)
    with _new_node("vtkMRMLTableNode", name) as node:
        node.AddColumn(_column(vtk.vtkStringArray, TABLE_COLUMNS[0], labels))
        node.AddColumn(_column(vtk.vtkDoubleArray, TABLE_COLUMNS[1], volumes))
        node.AddColumn(_column(vtk.vtkDoubleArray, TABLE_COLUMNS[2], diameters))
        node.AddColumn(_column(vtk.vtkStringArray, TABLE_COLUMNS[3], notes))
    return node


def table_rows(table_node) -> list:
    """The rows back from a table node (after a scene reload too): [(label, volume, diameter, note)]."""
    table = table_node.GetTable()
    rows = []
    for r in range(table.GetNumberOfRows()):
        cells = [table.GetValue(r, c) for c in range(min(4, table.GetNumberOfColumns()))]
        label, note = cells[0].ToString(), cells[3].ToString() if len(cells) > 3 else ""
        numbers = [_to_float(cell) for cell in cells[1:3]]
        rows.append((label, numbers[0], numbers[1], note))
    return rows


def _to_float(cell) -> float:
    if cell.IsNumeric():
        return float(cell.ToDouble())  # ToString() would round to 6 digits
    try:
        return float(cell.ToString())
    except ValueError:  # empty or "nan" after a reload from .tsv
        return float("nan")


# --- provenance -----------------------------------------------------------------------------------------
def provenance(result: dict, version: str, input_volume, roi_node, marking_share, warnings) -> dict:
    """The attributes every output node carries: how it was made, enough to make it again."""
    settings, box = result["summary"]["settings"], result["summary"]["box"]
    model = result.get("model", {})
    return {"Model": model.get("name", ""), "ModelSHA256": model.get("sha256", "") or "",
            "Seed": str(settings["seed"]), "NumberOfSamples": str(settings["n_samples"]),
            "BoxIJK": " ".join(str(v) for v in box["ijk_first"] + box["ijk_last"]),
            "Device": str(settings.get("device", "")),
            "Date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "InputVolume": input_volume.GetName(), "InputVolumeID": input_volume.GetID(),
            "ROI": roi_node.GetName() if roi_node is not None else "",
            "ROIID": roi_node.GetID() if roi_node is not None else "",
            "MarkingShare": "n/a" if marking_share is None else repr(float(marking_share)),
            "Warnings": json.dumps(list(warnings)), "Version": version}


def _link(outputs: RoiOutputs, input_volume) -> None:
    """References from the segmentation node to its ROI, volume, maps and table (saved with the scene)."""
    node = outputs.segmentationNode
    node.SetAttribute(RESULT_ATTRIBUTE, "1")
    node.SetNodeReferenceID(VOLUME_REFERENCE, input_volume.GetID())
    if outputs.roiNode is not None:
        node.SetNodeReferenceID(ROI_REFERENCE, outputs.roiNode.GetID())
    node.SetNodeReferenceID(TABLE_REFERENCE, outputs.tableNode.GetID())
    for kind, map_node in outputs.mapNodes.items():
        node.SetNodeReferenceID(MAP_REFERENCE + kind, map_node.GetID())


# --- building -------------------------------------------------------------------------------------------
def _unique_name(name: str, replace: bool) -> str:
    """The node name; "new node" runs on the same ROI get "<ROI> ProbSAM_1", ... instead of a twin."""
    if replace or slicer.mrmlScene.GetFirstNodeByName(name) is None:
        return name
    return slicer.mrmlScene.GenerateUniqueName(name)


def _build_one(input_volume, roi_node, roi_name: str, result: dict, options: BuildOptions,
               outputs: RoiOutputs) -> None:
    """Fills ``outputs`` as it goes, so that a failure leaves a record of what to remove."""
    sh = _subject_hierarchy()
    base = _unique_name(f"{roi_name} ProbSAM", options.replace)
    outputs.folderItemId = sh.CreateFolderItem(sh.GetSceneItemID(), base)
    outputs.segmentationNode = add_segmentation(input_volume, result, base)
    outputs.mapNodes = add_map_volumes(input_volume, result, base)
    rows = summary_rows(result["summary"], outputs.markingShare, outputs.warnings)
    outputs.tableNode = add_summary_table(rows, f"{base} sizes")
    if options.closedSurface:
        add_closed_surfaces(outputs.segmentationNode)
    _link(outputs, input_volume)
    attributes = provenance(result, options.version, input_volume, roi_node, outputs.markingShare, outputs.warnings)
    for node in outputs.nodes():
        for key, value in attributes.items():
            node.SetAttribute(PROVENANCE_PREFIX + key, value)
        item = sh.GetItemByDataNode(node)  # made by Slicer's (Qt) subject-hierarchy plugins, if present
        if item:
            sh.SetItemParent(item, outputs.folderItemId)
        else:
            sh.CreateItem(outputs.folderItemId, node)


def remove_outputs(all_outputs: list) -> None:
    """Remove every node and folder listed (the rollback of a failed build, or a replaced result)."""
    sh = _subject_hierarchy()
    for outputs in all_outputs:
        for node in outputs.nodes():
            remove_node(node)
        if outputs.folderItemId:
            sh.RemoveItem(outputs.folderItemId)


def build_outputs(input_volume, roi_nodes: list, roi_names: list, results: list, options: BuildOptions,
                  warnings: Optional[list] = None) -> list:
    """RoiOutputs per ROI from the worker's results (box-sized arrays, offset, summary); all or nothing.

    ``warnings``: per ROI, the geometry warnings to show in the table and attach to the nodes.
    """
    if options.uncertaintyKind not in MAP_KINDS:
        raise ValueError(f"uncertainty kind must be one of {list(MAP_KINDS)}, got {options.uncertaintyKind!r}")
    if input_volume.GetScene() is not slicer.mrmlScene:
        raise RuntimeError("the input volume left the scene while sampling (scene closed?): nothing was added")
    warnings = warnings or [[] for _ in results]
    built = []
    try:
        for roi_node, roi_name, result, roi_warnings in zip(roi_nodes, roi_names, results, warnings):
            built.append(RoiOutputs(roi_name, roi_node, summary=result["summary"], warnings=list(roi_warnings),
                                    markingShare=result.get("marking_share")))
            _build_one(input_volume, roi_node, roi_name, result, options, built[-1])
    except Exception:
        remove_outputs(built)
        raise
    return built
