"""Geometry: index ↔ physical mapping, boxes, and the voxel footprint of a physical box.

Expected voxel sets are computed independently of ProbSAMLib.geometry: corners by hand and the mapping
by SimpleITK's own TransformPhysicalPointToContinuousIndex / TransformIndexToPhysicalPoint.
"""

import itertools

import numpy as np
import pytest
import SimpleITK as sitk

from ProbSAMLib.geometry import (Box3D, BoxOutsideVolumeError, VolumeGeometry, VoxelBox, slice_boxes_2d,
                                 voxel_box_from_cli, voxel_box_from_ijk, voxel_box_from_physical)
from Testing.helpers import rotation





# Rotated 30° about z, then tilted 12° about x: every index axis is oblique.
OBLIQUE = rotation(2, 30) @ rotation(0, 12)


def sitk_image(geometry: VolumeGeometry) -> sitk.Image:
    image = sitk.Image(list(geometry.size), sitk.sitkUInt8)
    image.SetOrigin(tuple(geometry.origin))
    image.SetSpacing(tuple(geometry.spacing))
    image.SetDirection(tuple(geometry.direction.ravel()))
    return image


def hand_corners(center, size, axes):
    return np.array([np.asarray(center) + axes @ (np.array(signs) * np.asarray(size) / 2)
                     for signs in itertools.product((-1, 1), repeat=3)])


def expected_voxel_range(image, corners):
    """Per index axis, the voxels whose centres lie within the corners' continuous-index span."""
    index = np.array([image.TransformPhysicalPointToContinuousIndex(tuple(map(float, p))) for p in corners])
    lo = np.ceil(index.min(0) - 1e-9).astype(int)
    hi = np.floor(index.max(0) + 1e-9).astype(int) + 1
    return np.maximum(lo, 0), np.minimum(hi, image.GetSize())


def test_mapping_matches_simpleitk_on_oblique_volume():
    geometry = VolumeGeometry((30, 20, 10), (-12.5, 40.0, 7.25), (0.7, 0.9, 2.5), OBLIQUE)
    image = sitk_image(geometry)
    points = np.random.default_rng(0).uniform(-5, 30, size=(50, 3))
    expected = np.array([image.TransformContinuousIndexToPhysicalPoint(tuple(p)) for p in points])
    np.testing.assert_allclose(geometry.index_to_physical(points), expected, atol=1e-9)
    np.testing.assert_allclose(geometry.physical_to_index(expected), points, atol=1e-9)
    assert geometry.shape == (10, 20, 30)


def test_from_sitk_apply_to_and_reference_round_trip():
    geometry = VolumeGeometry((5, 6, 7), (1, 2, 3), (0.5, 0.6, 3.0), OBLIQUE)
    assert VolumeGeometry.from_sitk(sitk_image(geometry)).isclose(geometry, 1e-12)
    reference = geometry.to_sitk_reference()
    assert reference.GetSize() == (5, 6, 7)
    assert VolumeGeometry.from_sitk(reference).isclose(geometry, 1e-12)
    with pytest.raises(ValueError, match="size"):
        geometry.apply_to(sitk.Image([5, 6, 8], sitk.sitkUInt8))


def test_ijk_to_ras_matrix_flips_x_and_y():
    geometry = VolumeGeometry((4, 4, 4), (1.0, 2.0, 3.0), (1.0, 1.0, 2.0), np.eye(3))
    ras = geometry.ijk_to_ras_matrix()
    np.testing.assert_allclose(ras[:3, 3], [-1.0, -2.0, 3.0])
    np.testing.assert_allclose(ras[:3, :3], np.diag([-1.0, -1.0, 2.0]))
    oblique = VolumeGeometry((4, 5, 6), (10, -3, 8), (0.8, 0.9, 1.7), OBLIQUE)
    assert VolumeGeometry.from_ijk_to_ras(oblique.ijk_to_ras_matrix(), oblique.size).isclose(oblique, 1e-12)


def test_identity_box_edges_on_voxel_centres_are_covered():
    geometry = VolumeGeometry((10, 10, 10), (0, 0, 0), (1, 1, 1), np.eye(3))
    vb = voxel_box_from_physical(Box3D.from_corners((2, 3, 4), (5, 6, 7)), geometry)
    assert (vb.lo, vb.hi, vb.clamped) == ((2, 3, 4), (6, 7, 8), False)
    # Just inside the centres: the edge voxels are no longer covered.
    vb = voxel_box_from_physical(Box3D.from_corners((2.01, 3.01, 4.01), (4.99, 5.99, 6.99)), geometry)
    assert (vb.lo, vb.hi) == ((3, 4, 5), (5, 6, 7))
    assert vb.slices() == (slice(5, 7), slice(4, 6), slice(3, 5))


def test_lps_and_ras_boxes_describe_the_same_region():
    geometry = VolumeGeometry((40, 40, 10), (-20, -20, 0), (1, 1, 2), np.eye(3))
    in_lps = Box3D.from_corners((-5, -8, 4), (6, 3, 12), space="lps")
    in_ras = Box3D.from_corners((5, 8, 4), (-6, -3, 12), space="ras")
    np.testing.assert_allclose(in_ras.center, in_lps.center)
    np.testing.assert_allclose(in_ras.size, in_lps.size)
    np.testing.assert_allclose(in_ras.center_in("ras"), [-0.5, 2.5, 8.0])
    assert voxel_box_from_physical(in_lps, geometry) == voxel_box_from_physical(in_ras, geometry)
    # Interpreting RAS numbers as LPS would give a different (mirrored) box.
    as_lps = Box3D.from_corners((5, 8, 4), (-6, -3, 12), space="lps")
    assert voxel_box_from_physical(as_lps, geometry) != voxel_box_from_physical(in_lps, geometry)


@pytest.mark.parametrize("direction", [np.eye(3), OBLIQUE], ids=["axis-aligned-volume", "oblique-volume"])
def test_rotated_box_matches_brute_force(direction):
    geometry = VolumeGeometry((24, 22, 12), (-10.0, -8.0, -9.0), (0.9, 0.8, 1.6), direction)
    image = sitk_image(geometry)
    center, size = np.array([0.5, 1.0, -0.5]), np.array([9.0, 6.0, 5.0])
    axes = rotation(2, 40) @ rotation(1, -25)
    box = Box3D(center, size, axes)
    vb = voxel_box_from_physical(box, geometry)

    corners = hand_corners(center, size, axes)
    np.testing.assert_allclose(np.sort(box.corners(), axis=0), np.sort(corners, axis=0), atol=1e-12)
    lo, hi = expected_voxel_range(image, corners)
    assert vb.lo == tuple(lo) and vb.hi == tuple(hi) and not vb.clamped

    # Every voxel whose centre is inside the rotated box itself lies in the voxel box, and the voxel
    # box is no larger than needed: each of its faces holds a voxel inside the corner span.
    inside = [(i, j, k) for k in range(12) for j in range(22) for i in range(24)
              if np.all(np.abs((np.array(image.TransformIndexToPhysicalPoint((i, j, k))) - center) @ axes)
                        <= size / 2)]
    assert inside, "the test box must contain voxel centres"
    inside = np.array(inside)
    assert np.all(inside >= lo) and np.all(inside < hi)


def test_two_corner_bounding_box_would_be_wrong_for_rotated_box():
    # Guards the method, not just the numbers: min/max of two opposite corners misses the other six.
    geometry = VolumeGeometry((40, 40, 40), (-20, -20, -20), (1, 1, 1), np.eye(3))
    box = Box3D((0, 0, 0), (20, 2, 2), rotation(2, 45))
    vb = voxel_box_from_physical(box, geometry)
    two = np.sort(hand_corners(box.center, box.size, box.axes)[[0, 7]], axis=0)
    two_corner_width = two[1, 0] - two[0, 0]
    assert vb.size[0] > two_corner_width + 1


def test_partial_clamping_reports_the_cut():
    geometry = VolumeGeometry((10, 10, 5), (0, 0, 0), (1, 1, 1), np.eye(3))
    vb = voxel_box_from_physical(Box3D.from_corners((-3, 2, 1), (4, 12.5, 3)), geometry)
    assert (vb.lo, vb.hi) == ((0, 2, 1), (5, 10, 4))
    assert vb.clamped and "i -3..4 -> 0..4" in vb.warning and "j 2..12 -> 2..9" in vb.warning
    assert "k" not in vb.warning.split("clamped to it:")[1]


def test_fully_outside_box_is_an_error_with_extents():
    geometry = VolumeGeometry((10, 10, 5), (0, 0, 0), (1, 1, 1), np.eye(3))
    with pytest.raises(BoxOutsideVolumeError, match="outside the volume") as info:
        voxel_box_from_physical(Box3D.from_corners((20, 0, 0), (30, 5, 3)), geometry)
    assert isinstance(info.value, ValueError)
    assert "(20.0, 0.0, 0.0)" in str(info.value) and "(-0.5, -0.5, -0.5)..(9.5, 9.5, 4.5)" in str(info.value)
    with pytest.raises(BoxOutsideVolumeError):
        voxel_box_from_ijk((12, 0, 0), (15, 3, 3), geometry)


def test_zero_thickness_and_no_voxel_centre_errors_name_the_axis():
    geometry = VolumeGeometry((10, 10, 5), (0, 0, 0), (1, 1, 2), np.eye(3))
    with pytest.raises(ValueError, match="zero thickness along its axis 2"):
        voxel_box_from_physical(Box3D.from_corners((1, 1, 4), (5, 5, 4)), geometry)
    with pytest.raises(ValueError, match="no voxel centre along index axis k"):
        voxel_box_from_physical(Box3D.from_corners((1, 1, 4.5), (5, 5, 5.5)), geometry)


def test_ijk_boxes_are_inclusive_in_any_order():
    geometry = VolumeGeometry((10, 10, 5), (0, 0, 0), (1, 1, 1), np.eye(3))
    vb = voxel_box_from_ijk((7, 2, 3), (3, 5, 3), geometry)
    assert (vb.lo, vb.hi, vb.size) == ((3, 2, 3), (8, 6, 4), (5, 4, 1))
    assert voxel_box_from_cli("7,2,3,3,5,3", "ijk", geometry) == vb
    with pytest.raises(ValueError, match="integers"):
        voxel_box_from_ijk((1.5, 2, 3), (3, 5, 3), geometry)
    clamped = voxel_box_from_cli("-2,0,0,3,3,9", "ijk", geometry)
    assert clamped.clamped and (clamped.lo, clamped.hi) == ((0, 0, 0), (4, 4, 5))
    with pytest.raises(ValueError, match="6"):
        voxel_box_from_cli("1,2,3", "ijk", geometry)


def test_cli_physical_spaces():
    geometry = VolumeGeometry((10, 10, 5), (-5, -5, 0), (1, 1, 1), np.eye(3))
    lps = voxel_box_from_cli("-2,-1,1,2,3,3", "lps", geometry)
    ras = voxel_box_from_cli("2,1,1,-2,-3,3", "ras", geometry)
    assert lps == ras and (lps.lo, lps.hi) == ((3, 4, 1), (8, 9, 4))


def test_slice_boxes_follow_the_pixel_box_convention():
    vb = VoxelBox((3, 5, 2), (8, 9, 4))
    boxes = slice_boxes_2d(vb)
    assert boxes == [(2, (3, 5, 8, 9)), (3, (3, 5, 8, 9))]
    # The box of slice k covers exactly the pixels [j, i] of that slice inside the voxel box.
    volume = np.zeros((6, 12, 12), bool)
    volume[vb.slices()] = True
    for k, (x1, y1, x2, y2) in boxes:
        rows, cols = np.nonzero(volume[k])
        assert (x1, y1, x2, y2) == (cols.min(), rows.min(), cols.max() + 1, rows.max() + 1)


def test_box_validation():
    with pytest.raises(ValueError, match="orthonormal"):
        Box3D((0, 0, 0), (1, 1, 1), [[1, 0, 0], [0, 2, 0], [0, 0, 1]])
    with pytest.raises(ValueError, match="negative"):
        Box3D((0, 0, 0), (1, -1, 1))
    with pytest.raises(ValueError, match="space"):
        Box3D.from_corners((0, 0, 0), (1, 1, 1), space="xyz")
    box = Box3D.from_center_size((1, 2, 3), (2, 4, 6), axes=rotation(2, 30), space="ras")
    np.testing.assert_allclose(box.center, [-1, -2, 3])
    np.testing.assert_allclose(box.axes_in("ras"), rotation(2, 30), atol=1e-12)
    assert box.contains(box.center) and not box.contains(box.center + [0, 0, 3.01])


def test_voxel_volume_is_the_determinant_and_a_shear_is_named():
    rotated = VolumeGeometry((4, 4, 4), (0, 0, 0), (0.8, 0.7, 2.5), rotation(2, 30))
    assert rotated.voxel_volume_mm3 == pytest.approx(0.8 * 0.7 * 2.5) and rotated.shear_note() is None
    tilt = np.eye(3)
    tilt[:, 2] = [0.0, np.sin(np.radians(20)), np.cos(np.radians(20))]  # k leans 20° towards j: a gantry tilt
    sheared = VolumeGeometry((4, 4, 4), (0, 0, 0), (0.8, 0.7, 2.5), tilt)
    # the product of the spacings is 1/cos(20°) = 6.4 % too large; the determinant is the true volume
    assert sheared.voxel_volume_mm3 == pytest.approx(0.8 * 0.7 * 2.5 * np.cos(np.radians(20)))
    assert "j-k 70.00°" in sheared.shear_note() and "i-j" not in sheared.shear_note()
    # what SimpleITK gives for the same grid: the 4x4 index -> LPS matrix agrees with the volume
    assert abs(np.linalg.det(sheared.ijk_to_lps_matrix())) == pytest.approx(sheared.voxel_volume_mm3)
