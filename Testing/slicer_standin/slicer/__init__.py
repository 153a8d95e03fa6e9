"""STAND-IN for 3D Slicer's ``slicer`` module — a mock, because Slicer cannot run in CI.

It implements exactly the Slicer/MRML calls that ProbSAMSlicer uses, with the same names and the same
geometry semantics, on real ``vtk`` matrices and numpy arrays:

- a scene (AddNewNodeByClass, RemoveNode, GetFirstNodeByClass/ByName, GetNodeByID, Clear);
- scalar volumes (IJKToRAS, a (K, J, I) array, CopyOrientation, parent transforms);
- Markups ROIs (centre, size, ObjectToNode orientation; GetObjectToWorldMatrix through the parents);
- linear transform nodes with parent chains, a non-linear (grid) transform node, and
  vtkMRMLTransformNode.GetMatrixTransformBetweenNodes;
- segmentation nodes storing one array per segment plus the reference geometry they were filled with;
- table nodes (a real vtkTable), display nodes, a "Viridis" colour node, the subject hierarchy.

It is NOT Slicer: no rendering, no resampling (updateSegmentBinaryLabelmapFromArray insists that the
array is already on the reference volume's grid, which is what ProbSAMSlicer guarantees), no events.
The in-Slicer test (ProbSAMSlicerTest) checks the real thing. Install with
``Testing/slicer_standin.install()``; pytest fixtures do this and remove it again.
"""

import itertools

import numpy as np
import vtk

from . import util  # noqa: F401  (slicer.util is an attribute of slicer, as in Slicer)


def _to_numpy(matrix) -> np.ndarray:
    if isinstance(matrix, vtk.vtkMatrix4x4):
        return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])
    return np.array(matrix, dtype=np.float64).reshape(4, 4)


def _fill_vtk(matrix: "vtk.vtkMatrix4x4", values: np.ndarray) -> None:
    for r in range(4):
        for c in range(4):
            matrix.SetElement(r, c, float(values[r, c]))


def _new_vtk(values: np.ndarray) -> "vtk.vtkMatrix4x4":
    matrix = vtk.vtkMatrix4x4()
    _fill_vtk(matrix, values)
    return matrix


class _App:
    """slicer.app: only processEvents is used outside the widget."""

    def processEvents(self):
        pass


app = _App()


# --- nodes --------------------------------------------------------------------------------------------
class vtkMRMLNode:
    singleton = False

    def __init__(self):
        self._name, self._id, self._scene, self._transform_id = "", None, None, None
        self._display_id = None

    def GetName(self):
        return self._name

    def SetName(self, name):
        self._name = name

    def GetID(self):
        return self._id

    def GetScene(self):
        return self._scene

    def GetClassName(self):
        return type(self).__name__

    def IsA(self, class_name):
        return any(c.__name__ == class_name for c in type(self).__mro__)

    # transformable nodes
    def SetAndObserveTransformNodeID(self, node_id):
        self._transform_id = node_id

    def GetParentTransformNode(self):
        return mrmlScene.GetNodeByID(self._transform_id) if self._transform_id else None

    def _parent_to_world(self) -> np.ndarray:
        parent = self.GetParentTransformNode()
        return parent._to_world() if parent is not None else np.eye(4)

    # displayable nodes
    _display_class = None

    def CreateDefaultDisplayNodes(self):
        if self._display_class is not None and self.GetDisplayNode() is None:
            display = mrmlScene.AddNewNodeByClass(self._display_class)
            self._display_id = display.GetID()

    def GetDisplayNode(self):
        return mrmlScene.GetNodeByID(self._display_id) if self._display_id else None


class vtkMRMLDisplayNode(vtkMRMLNode):
    def __init__(self):
        super().__init__()
        self._visible, self._color_id = True, None

    def SetVisibility(self, visible):
        self._visible = bool(visible)

    def GetVisibility(self):
        return int(self._visible)

    def SetAndObserveColorNodeID(self, node_id):
        self._color_id = node_id

    def GetColorNodeID(self):
        return self._color_id


class vtkMRMLScalarVolumeDisplayNode(vtkMRMLDisplayNode):
    pass


class vtkMRMLSegmentationDisplayNode(vtkMRMLDisplayNode):
    pass


class vtkMRMLColorTableNode(vtkMRMLNode):
    singleton = True


class vtkMRMLScriptedModuleNode(vtkMRMLNode):
    singleton = True

    def __init__(self):
        super().__init__()
        self.parameters = {}


class _ImageData:
    """The part of vtkImageData the module reads: GetDimensions() = (I, J, K)."""

    def __init__(self, array: np.ndarray):
        self.array = array

    def GetDimensions(self):
        return tuple(int(s) for s in self.array.shape[::-1])


class vtkMRMLScalarVolumeNode(vtkMRMLNode):
    _display_class = "vtkMRMLScalarVolumeDisplayNode"

    def __init__(self):
        super().__init__()
        self._ijk_to_ras = np.eye(4)
        self._image = None

    def SetIJKToRASMatrix(self, matrix):
        self._ijk_to_ras = _to_numpy(matrix)

    def GetIJKToRASMatrix(self, matrix):
        _fill_vtk(matrix, self._ijk_to_ras)

    def CopyOrientation(self, other):
        self._ijk_to_ras = other._ijk_to_ras.copy()

    def GetImageData(self):
        return self._image


class vtkMRMLMarkupsROINode(vtkMRMLNode):
    """Centre and axes live in ObjectToNode (as in Slicer); size is the full edge lengths in mm."""

    def __init__(self):
        super().__init__()
        self._object_to_node = np.eye(4)
        self._size = (0.0, 0.0, 0.0)

    def SetCenter(self, x, y, z):
        self._object_to_node[:3, 3] = (x, y, z)

    def GetCenter(self):
        return tuple(self._object_to_node[:3, 3])

    def SetSize(self, x, y, z):
        self._size = (float(x), float(y), float(z))

    def GetSize(self):
        return self._size

    def SetAndObserveObjectToNodeMatrix(self, matrix):
        self._object_to_node = _to_numpy(matrix)

    def GetObjectToNodeMatrix(self):
        return _new_vtk(self._object_to_node)

    def GetObjectToWorldMatrix(self):
        return _new_vtk(self._parent_to_world() @ self._object_to_node)


class vtkMRMLTransformNode(vtkMRMLNode):
    linear = True

    def IsLinear(self):
        return self.linear

    def IsTransformToWorldLinear(self):
        parent = self.GetParentTransformNode()
        return self.IsLinear() and (parent is None or parent.IsTransformToWorldLinear())

    def _to_parent(self) -> np.ndarray:
        return np.eye(4)

    def _to_world(self) -> np.ndarray:
        return self._parent_to_world() @ self._to_parent()

    def GetMatrixTransformToWorld(self, matrix):
        _fill_vtk(matrix, self._to_world())
        return self.IsTransformToWorldLinear()

    @staticmethod
    def GetMatrixTransformBetweenNodes(source, target, matrix):
        """Maps points of ``source``'s space to ``target``'s (None = world); False if not linear."""
        source_to_world = source._to_world() if source is not None else np.eye(4)
        target_to_world = target._to_world() if target is not None else np.eye(4)
        _fill_vtk(matrix, np.linalg.inv(target_to_world) @ source_to_world)
        return all(n is None or n.IsTransformToWorldLinear() for n in (source, target))


class vtkMRMLLinearTransformNode(vtkMRMLTransformNode):
    def __init__(self):
        super().__init__()
        self._matrix = np.eye(4)

    def SetMatrixTransformToParent(self, matrix):
        self._matrix = _to_numpy(matrix)

    def GetMatrixTransformToParent(self, matrix):
        _fill_vtk(matrix, self._matrix)

    def _to_parent(self):
        return self._matrix


class vtkMRMLGridTransformNode(vtkMRMLTransformNode):
    """A non-linear transform: its displacement field is not modelled, only its non-linearity."""

    linear = False


class vtkSegment:
    def __init__(self, name, color):
        self._name, self._color = name, tuple(color)

    def GetName(self):
        return self._name

    def GetColor(self):
        return self._color


class vtkSegmentation:
    def __init__(self):
        self._segments = {}
        self._ids = itertools.count(1)

    def AddEmptySegment(self, segment_id="", name="", color=None):
        segment_id = segment_id or f"Segment_{next(self._ids)}"
        self._segments[segment_id] = vtkSegment(name or segment_id, color if color is not None else (1, 0, 0))
        return segment_id

    def GetSegment(self, segment_id):
        return self._segments.get(segment_id)

    def GetNumberOfSegments(self):
        return len(self._segments)

    def GetNthSegmentID(self, index):
        return list(self._segments)[index]


class vtkMRMLSegmentationNode(vtkMRMLNode):
    _display_class = "vtkMRMLSegmentationDisplayNode"

    def __init__(self):
        super().__init__()
        self._segmentation = vtkSegmentation()
        self.reference_geometry = None  # (IJKToRAS 4x4, dims (I, J, K)) — what Slicer keeps as a string
        self.labelmaps = {}  # segment id -> (K, J, I) uint8 array on the reference grid

    def GetSegmentation(self):
        return self._segmentation

    def SetReferenceImageGeometryParameterFromVolumeNode(self, volume):
        self.reference_geometry = (volume._ijk_to_ras.copy(), volume.GetImageData().GetDimensions())


class vtkMRMLTableNode(vtkMRMLNode):
    def __init__(self):
        super().__init__()
        self._table = vtk.vtkTable()

    def AddColumn(self, array):
        self._table.AddColumn(array)
        return array

    def GetTable(self):
        return self._table

    def GetNumberOfRows(self):
        return self._table.GetNumberOfRows()

    def GetNumberOfColumns(self):
        return self._table.GetNumberOfColumns()


class vtkMRMLSubjectHierarchyNode(vtkMRMLNode):
    """Items: id -> [name, parent id, data node]. The scene item is 1; every data node gets an item."""

    singleton = True
    SCENE_ITEM = 1

    def __init__(self):
        super().__init__()
        self._items = {self.SCENE_ITEM: ["Scene", 0, None]}
        self._next = itertools.count(2)

    @staticmethod
    def GetSubjectHierarchyNode(scene):
        return scene._subject_hierarchy

    def GetSceneItemID(self):
        return self.SCENE_ITEM

    def CreateFolderItem(self, parent, name):
        item = next(self._next)
        self._items[item] = [name, parent, None]
        return item

    def GetItemByDataNode(self, node):
        for item, (_, _, data) in self._items.items():
            if data is node:
                return item
        return 0

    def _add_data_node(self, node):
        self._items[next(self._next)] = [node.GetName(), self.SCENE_ITEM, node]

    def SetItemParent(self, item, parent):
        self._items[item][1] = parent

    def GetItemParent(self, item):
        return self._items[item][1]

    def GetItemName(self, item):
        return self._items[item][0]

    def GetItemDataNode(self, item):
        return self._items[item][2]

    def RemoveItem(self, item, removeDataNode=True, recursive=True):
        for child in [i for i, (_, parent, _) in self._items.items() if parent == item]:
            self.RemoveItem(child, removeDataNode, recursive)
        data = self._items.pop(item, [None, None, None])[2]
        if removeDataNode and data is not None and data.GetScene() is not None:
            mrmlScene.RemoveNode(data)
        return True

    # stand-in helpers for tests (Slicer itself has GetItemChildren(item, vtkIdList))
    def children(self, item):
        return [i for i, (_, parent, _) in self._items.items() if parent == item]

    def folders(self):
        return {i: name for i, (name, _, data) in self._items.items() if data is None and i != self.SCENE_ITEM}


# --- the scene ----------------------------------------------------------------------------------------
class vtkMRMLScene:
    StartCloseEvent, EndCloseEvent = 66030, 66031

    def __init__(self):
        self._nodes = []
        self._ids = itertools.count(1)
        self._subject_hierarchy = vtkMRMLSubjectHierarchyNode()
        self._defaults()

    def _defaults(self):
        viridis = self.AddNewNodeByClass("vtkMRMLColorTableNode", "Viridis")
        viridis._id = "vtkMRMLColorTableNodeFileViridis.txt"

    def AddNewNodeByClass(self, class_name, name=""):
        node = _CLASSES[class_name]()
        node._name = name or class_name.replace("vtkMRML", "").replace("Node", "")
        node._id = f"{class_name}{next(self._ids)}"
        node._scene = self
        self._nodes.append(node)
        if not isinstance(node, (vtkMRMLDisplayNode, vtkMRMLScriptedModuleNode, vtkMRMLColorTableNode)):
            self._subject_hierarchy._add_data_node(node)
        return node

    def RemoveNode(self, node):
        if node in self._nodes:
            self._nodes.remove(node)
            display = node.GetDisplayNode()
            if display is not None:
                self.RemoveNode(display)  # Slicer removes a displayable node's display nodes with it
            item = self._subject_hierarchy.GetItemByDataNode(node)
            if item:
                self._subject_hierarchy._items.pop(item)
            node._scene = None

    def GetNodeByID(self, node_id):
        return next((n for n in self._nodes if n.GetID() == node_id), None)

    def GetFirstNodeByClass(self, class_name):
        return next((n for n in self._nodes if n.IsA(class_name)), None)

    def GetFirstNodeByName(self, name):
        return next((n for n in self._nodes if n.GetName() == name), None)

    def GetNumberOfNodes(self):
        return len(self._nodes)

    def Clear(self, removeSingletons=False):
        for node in list(self._nodes):
            if removeSingletons or not node.singleton:
                self.RemoveNode(node)
        self._subject_hierarchy._items = {vtkMRMLSubjectHierarchyNode.SCENE_ITEM: ["Scene", 0, None]}
        for node in self._nodes:
            if not isinstance(node, (vtkMRMLDisplayNode, vtkMRMLScriptedModuleNode, vtkMRMLColorTableNode)):
                self._subject_hierarchy._add_data_node(node)

    # stand-in helper for tests
    def nodes(self):
        return list(self._nodes)


_CLASSES = {cls.__name__: cls for cls in (
    vtkMRMLScalarVolumeNode, vtkMRMLScalarVolumeDisplayNode, vtkMRMLMarkupsROINode, vtkMRMLLinearTransformNode,
    vtkMRMLGridTransformNode, vtkMRMLTransformNode, vtkMRMLSegmentationNode, vtkMRMLSegmentationDisplayNode,
    vtkMRMLTableNode, vtkMRMLColorTableNode, vtkMRMLScriptedModuleNode)}

mrmlScene = vtkMRMLScene()
