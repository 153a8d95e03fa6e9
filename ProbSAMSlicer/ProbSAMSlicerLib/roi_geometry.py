"""Markups ROI -> voxel box of a scalar volume, through both nodes' parent transforms.

The path (all 8 corners, so oblique volumes and rotated ROIs are right):
  ROI object space (centre at 0, axes = ROI axes, half sizes +-size/2)
    --ROI.GetObjectToWorldMatrix()-->  world RAS (includes the ROI's parent transforms)
    --world -> volume's parent-transform space-->  the RAS space the volume's IJKToRAS refers to
    --ProbSAMLib.geometry: VolumeGeometry.from_ijk_to_ras + Box3D + voxel_box_from_physical-->  VoxelBox

Non-linear transforms (grid, B-spline, thin-plate) are refused with a message that says how to fix it
(harden the transform or use a linear one): a warped ROI is no longer a box, and silently using the
transform's linear part would segment the wrong place.
"""

import numpy as np
import vtk

import slicer


class NonLinearTransformError(ValueError):
    """A node that the ROI -> voxel box mapping depends on sits under a non-linear transform."""


def matrix_to_numpy(matrix: "vtk.vtkMatrix4x4") -> np.ndarray:
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)], dtype=np.float64)


def _check_linear(node, role: str) -> None:
    parent = node.GetParentTransformNode()
    if parent is not None and not parent.IsTransformToWorldLinear():
        raise NonLinearTransformError(
            f"the {role} '{node.GetName()}' is under the non-linear transform '{parent.GetName()}'. "
            f"ProbSAM needs a box: harden the transform on the volume (Data module, right-click the "
            f"transform -> 'Harden transform') or use a linear transform.")


def volume_geometry(volume_node):
    """ProbSAMLib VolumeGeometry of a scalar volume node (its IJKToRAS, in its parent-transform space)."""
    from ProbSAMLib.geometry import VolumeGeometry

    image = volume_node.GetImageData()
    if image is None:
        raise ValueError(f"the volume '{volume_node.GetName()}' holds no image data")
    ijk_to_ras = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(ijk_to_ras)
    return VolumeGeometry.from_ijk_to_ras(matrix_to_numpy(ijk_to_ras), image.GetDimensions())


def world_to_volume_parent(volume_node) -> np.ndarray:
    """4x4 matrix from world RAS to the space of the volume's parent transform (identity without one)."""
    matrix = vtk.vtkMatrix4x4()
    slicer.vtkMRMLTransformNode.GetMatrixTransformBetweenNodes(None, volume_node.GetParentTransformNode(), matrix)
    return matrix_to_numpy(matrix)


def roi_box_in_volume_space(roi_node, volume_node):
    """The ROI as a ProbSAMLib Box3D in the volume's (parent-transform) RAS space.

    The ROI's axes after both transforms are the columns of the combined matrix; their lengths are the
    transforms' scaling, folded into the box size. Slicer orthogonalises the ROI's own object-to-world
    matrix (a shear above the ROI is not visible here and the ROI stays a box in world), but a shear in
    the volume's transform makes the axes non-orthogonal in the volume's space: not a box, refused.
    """
    from ProbSAMLib.geometry import Box3D

    _check_linear(roi_node, "ROI")
    _check_linear(volume_node, "volume")
    object_to_volume = world_to_volume_parent(volume_node) @ matrix_to_numpy(roi_node.GetObjectToWorldMatrix())
    columns = object_to_volume[:3, :3]
    scale = np.linalg.norm(columns, axis=0)
    if np.any(scale < 1e-12):
        raise ValueError(f"the transform of ROI '{roi_node.GetName()}' collapses one of its axes")
    axes = columns / scale
    if not np.allclose(axes.T @ axes, np.eye(3), atol=1e-5):
        raise ValueError(f"the transform of the volume '{volume_node.GetName()}' shears it, so ROI "
                         f"'{roi_node.GetName()}' is no longer a box on its grid; harden the transform on the "
                         f"volume (Data module, 'Harden transform') and sample again")
    size = np.asarray(roi_node.GetSize(), dtype=np.float64) * scale
    return Box3D.from_center_size(object_to_volume[:3, 3], size, axes=axes, space="ras")


def roi_voxel_box(roi_node, volume_node):
    """(VoxelBox, VolumeGeometry) of the voxels the ROI covers; BoxOutsideVolumeError if none."""
    from ProbSAMLib.geometry import voxel_box_from_physical

    geometry = volume_geometry(volume_node)
    return voxel_box_from_physical(roi_box_in_volume_space(roi_node, volume_node), geometry), geometry


def frame_warning(roi_node, volume_node):
    """A sentence when the ROI and the volume sit under different transforms (the ROI is mapped into the
    volume's frame: right, but worth saying, since a transform moved later moves one and not the other)."""
    roi_parent, volume_parent = roi_node.GetParentTransformNode(), volume_node.GetParentTransformNode()
    if roi_parent is volume_parent or (roi_parent is not None and volume_parent is not None
                                       and roi_parent.GetID() == volume_parent.GetID()):
        return None
    name = lambda node: f"'{node.GetName()}'" if node is not None else "none"  # noqa: E731
    return (f"ROI '{roi_node.GetName()}' (transform {name(roi_parent)}) and volume '{volume_node.GetName()}' "
            f"(transform {name(volume_parent)}) are in different frames: the ROI was mapped into the volume's")


def roi_request_parts(roi_node, volume_node):
    """(VoxelBox, drawn box for the worker's cut, warnings) of one ROI on one volume.

    The drawn box goes to the worker as ``{center_ras, axes_ras, size_mm}`` in the volume's parent space;
    the worker samples the voxel box (its axis-aligned hull on the grid) and cuts the masks to the box.
    """
    box = roi_box_in_volume_space(roi_node, volume_node)
    voxel_box, _geometry = roi_voxel_box(roi_node, volume_node)
    warnings = [w for w in (voxel_box.warning and f"ROI '{roi_node.GetName()}': {voxel_box.warning}",
                            frame_warning(roi_node, volume_node)) if w]
    drawn = {"center_ras": box.center_in("ras").tolist(), "axes_ras": box.axes_in("ras").tolist(),
             "size_mm": box.size.tolist()}
    return voxel_box, drawn, warnings
