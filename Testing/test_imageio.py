"""Volume reading, atomic output folders, images, sample files and Slicer .seg.nrrd files."""

import numpy as np
import pytest
import SimpleITK as sitk

from ProbSAMLib.io import nrrd
from ProbSAMLib.geometry import VolumeGeometry
from ProbSAMLib.io.imageio import (IntensityWarning, MultipleSeriesError, VolumeReadError, read_volume, write_image,
                                   write_sample_files)
from ProbSAMLib.errors import OutputRefusedError
from ProbSAMLib.io.outputdir import OutputExistsError, OutputFolder
from ProbSAMLib.io.segfile import distinct_colors, read_segment_metadata, read_segmentation, write_segmentation
from Testing.helpers import write_dicom_series

C, S = np.cos(np.deg2rad(30)), np.sin(np.deg2rad(30))
T, U = np.cos(np.deg2rad(12)), np.sin(np.deg2rad(12))
OBLIQUE = np.array([[C, -S, 0], [S, C, 0], [0, 0, 1]]) @ np.array([[1, 0, 0], [0, T, -U], [0, U, T]])
GEOMETRY = VolumeGeometry((18, 14, 9), (-30.5, 12.25, 101.0), (0.7, 0.8, 2.5), OBLIQUE)


def sample_image(values=None, geometry=GEOMETRY, dtype=np.int16):
    if values is None:
        values = np.arange(np.prod(geometry.shape)).reshape(geometry.shape) % 2000 - 1000
    return geometry.apply_to(sitk.GetImageFromArray(values.astype(dtype)))


# --- reading ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("suffix", [".nrrd", ".nii.gz", ".mha"])
def test_read_volume_files_keep_geometry_and_values(tmp_path, suffix):
    image = sample_image()
    sitk.WriteImage(image, str(tmp_path / f"ct{suffix}"))
    volume = read_volume(tmp_path / f"ct{suffix}")
    assert volume.GetPixelID() == sitk.sitkFloat32
    # NIfTI stores geometry in float32: a looser tolerance there.
    assert VolumeGeometry.from_sitk(volume).isclose(GEOMETRY, 1e-4)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(volume), sitk.GetArrayFromImage(image))





def test_dicom_folder_one_and_two_series(tmp_path):
    first = np.arange(4 * 6 * 5).reshape(4, 6, 5) - 50
    write_dicom_series(tmp_path, first, "1.2.3.4.5.1", "a", "lung window")
    with pytest.warns(IntensityWarning, match="span -50..69, which does not look like CT"):  # not HU: warned
        volume = read_volume(tmp_path)
    assert volume.GetSize() == (5, 6, 4)
    np.testing.assert_allclose(volume.GetSpacing(), (0.8, 0.8, 2.5), atol=1e-6)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(volume), first)

    write_dicom_series(tmp_path, first[:3] + 1000, "1.2.3.4.5.2", "b", "bone")
    with pytest.raises(MultipleSeriesError) as info:
        read_volume(tmp_path)
    message = str(info.value)
    assert "2 DICOM series" in message and "1.2.3.4.5.1 (4 files, CT, 'lung window')" in message
    assert "1.2.3.4.5.2 (3 files, CT, 'bone')" in message and "series_uid" in message
    assert sorted(s["files"] for s in info.value.series) == [3, 4]
    with pytest.warns(IntensityWarning, match="span 950..1039"):
        chosen = read_volume(tmp_path, series_uid="1.2.3.4.5.2")
    np.testing.assert_array_equal(sitk.GetArrayFromImage(chosen), first[:3] + 1000)
    with pytest.raises(VolumeReadError, match="series 9.9 is not in"):
        read_volume(tmp_path, series_uid="9.9")
    with pytest.raises(VolumeReadError, match="2D image.*whole series"):
        read_volume(tmp_path / "a000.dcm")


def test_read_volume_rejects_unusable_inputs(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        read_volume(tmp_path / "nope.nrrd")
    (tmp_path / "notes.nrrd").write_text("not an image")
    with pytest.raises(VolumeReadError, match="cannot read"):
        read_volume(tmp_path / "notes.nrrd")
    (tmp_path / "empty").mkdir()
    with pytest.raises(VolumeReadError, match="no DICOM series"):
        read_volume(tmp_path / "empty")

    sitk.WriteImage(sitk.Image([8, 8], sitk.sitkInt16), str(tmp_path / "flat.nrrd"))
    with pytest.raises(VolumeReadError, match="2D image"):
        read_volume(tmp_path / "flat.nrrd")
    sitk.WriteImage(sitk.Image([4, 4, 4, 3], sitk.sitkInt16), str(tmp_path / "time.nrrd"))
    with pytest.raises(VolumeReadError, match="4D image"):
        read_volume(tmp_path / "time.nrrd")
    sitk.WriteImage(sitk.Image([4, 4, 4], sitk.sitkVectorUInt8, 3), str(tmp_path / "rgb.nrrd"))
    with pytest.raises(VolumeReadError, match="3 components"):
        read_volume(tmp_path / "rgb.nrrd")
    values = np.zeros(GEOMETRY.shape, np.float32)
    values[2, 3, 4], values[5, 6, 7] = np.nan, np.inf
    sitk.WriteImage(sample_image(values, dtype=np.float32), str(tmp_path / "nan.nrrd"))
    with pytest.raises(VolumeReadError, match="2 non-finite"):
        read_volume(tmp_path / "nan.nrrd")


def test_4d_volume_with_one_time_point_is_accepted(tmp_path):
    sitk.WriteImage(sitk.Image([5, 4, 3, 1], sitk.sitkInt16), str(tmp_path / "one.nrrd"))
    with pytest.warns(IntensityWarning, match="span 0..0"):  # an all-zero image is not CT either
        assert read_volume(tmp_path / "one.nrrd").GetSize() == (5, 4, 3)


# --- atomic output folder ---------------------------------------------------------------------------
def test_atomic_output_dir_success_failure_existing_and_force(tmp_path):
    out = tmp_path / "run"
    with OutputFolder(out) as tmp:
        assert tmp != out and tmp.parent == tmp_path
        (tmp / "a.txt").write_text("first")
        assert not out.exists()
    assert (out / "a.txt").read_text(encoding="utf-8") == "first"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]

    with pytest.raises(OutputExistsError, match="already exists"):
        with OutputFolder(out):
            pass
    with pytest.raises(RuntimeError):  # force, but the run fails: the old output stays untouched
        with OutputFolder(out, force=True) as tmp:
            (tmp / "b.txt").write_text("half")
            raise RuntimeError("model crashed")
    assert sorted(p.name for p in out.iterdir() if p.name != ".probsam-output") == ["a.txt"]
    with OutputFolder(out, force=True) as tmp:
        (tmp / "b.txt").write_text("second")
    assert sorted(p.name for p in out.iterdir() if p.name != ".probsam-output") == ["b.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]

    fresh = tmp_path / "new" / "run"
    with pytest.raises(KeyboardInterrupt):
        with OutputFolder(fresh) as tmp:
            (tmp / "c.txt").write_text("half")
            raise KeyboardInterrupt
    assert not fresh.exists() and list((tmp_path / "new").iterdir()) == []


# --- images, samples, colours -----------------------------------------------------------------------
def test_write_image_and_sample_files(tmp_path):
    values = np.random.default_rng(1).random(GEOMETRY.shape).astype(np.float32)
    write_image(values, GEOMETRY, tmp_path / "u.nrrd")
    back = sitk.ReadImage(str(tmp_path / "u.nrrd"))
    assert VolumeGeometry.from_sitk(back).isclose(GEOMETRY, 1e-9)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), values)
    with pytest.raises(ValueError, match="does not match"):
        write_image(values[1:], GEOMETRY, tmp_path / "bad.nrrd")

    masks = np.random.default_rng(2).random((3,) + GEOMETRY.shape) > 0.5
    paths = write_sample_files(masks, GEOMETRY, tmp_path)
    assert [p.name for p in paths] == ["sample_00.nrrd", "sample_01.nrrd", "sample_02.nrrd"]
    for mask, path in zip(masks, paths):
        image = sitk.ReadImage(str(path))
        assert image.GetPixelID() == sitk.sitkUInt8
        np.testing.assert_array_equal(sitk.GetArrayFromImage(image), mask)



def test_write_image_of_booleans_is_a_uint8_labelmap(tmp_path):
    """A bool array is written as 0/1 uint8 (ITK has no bool voxels), on the reference geometry."""
    mask = np.random.default_rng(3).random(GEOMETRY.shape) > 0.5
    write_image(mask, GEOMETRY, tmp_path / "m.nrrd")
    back = sitk.ReadImage(str(tmp_path / "m.nrrd"))
    assert back.GetPixelID() == sitk.sitkUInt8
    assert VolumeGeometry.from_sitk(back).isclose(GEOMETRY, 1e-9)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), mask.astype(np.uint8))


def test_write_image_failure_is_an_os_error_with_itks_reason(tmp_path):
    """An image ITK cannot write (no writer for the suffix) is an OSError EIO with ITK's one useful
    sentence, not ITK's multi-line dump, and no file is left."""
    import errno

    values = np.zeros(GEOMETRY.shape, np.float32)
    with pytest.raises(OSError) as info:
        write_image(values, GEOMETRY, tmp_path / "u.notanimageformat")
    assert info.value.errno == errno.EIO and "cannot write the image" in str(info.value)
    assert "Unable to determine ImageIO writer" in str(info.value) and "\n" not in str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_complex_volume_is_refused(tmp_path):
    """A complex-valued image (e.g. MR k-space) is not a CT volume: a clear VolumeReadError."""
    values = (np.full(GEOMETRY.shape, -1000.0) + 1j).astype(np.complex64)
    sitk.WriteImage(GEOMETRY.apply_to(sitk.GetImageFromArray(values)), str(tmp_path / "c.nrrd"))
    with pytest.raises(VolumeReadError, match="complex voxel values"):
        read_volume(tmp_path / "c.nrrd")


def test_read_volume_from_another_thread_gives_the_same_volume(tmp_path):
    """Reading off the main thread (the Slicer worker's inbox, a GUI thread) leaves fd 2 alone and gives
    the same volume as on the main thread."""
    import threading

    sitk.WriteImage(sample_image(), str(tmp_path / "ct.nrrd"))
    results = {}
    thread = threading.Thread(target=lambda: results.update(volume=read_volume(tmp_path / "ct.nrrd")))
    thread.start()
    thread.join(60)
    main = read_volume(tmp_path / "ct.nrrd")
    np.testing.assert_array_equal(sitk.GetArrayFromImage(results["volume"]), sitk.GetArrayFromImage(main))
    assert VolumeGeometry.from_sitk(results["volume"]).isclose(VolumeGeometry.from_sitk(main), 1e-9)


def test_a_two_slice_dicom_series_is_read(tmp_path):
    """Two slices are too few to check the spacing against, and are read as they are."""
    values = np.arange(2 * 6 * 5).reshape(2, 6, 5) - 1000
    write_dicom_series(tmp_path, values, "1.2.3.4.5.9", "s")
    volume = read_volume(tmp_path)
    assert volume.GetSize() == (5, 6, 2)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(volume), values)


# --- atomic output folder: the rarer paths ------------------------------------------------------------
def test_output_folder_refuses_a_broken_symlink(tmp_path):
    """An --out that is a dangling symbolic link is refused (following it would write somewhere else)."""
    (tmp_path / "run").symlink_to(tmp_path / "gone")
    with pytest.raises(OutputRefusedError, match="broken symbolic link"):
        with OutputFolder(tmp_path / "run", force=True):
            pass
    assert not (tmp_path / "gone").exists()


def test_output_folder_replaces_its_own_leftover_temporary_folder(tmp_path):
    """A temporary folder of this very process (same pid, a failed earlier removal) is not mistaken for a
    live run's: it is cleared, and the output holds only what this run wrote."""
    import os

    stale = tmp_path / f".run.tmp-{os.getpid()}"
    stale.mkdir()
    (stale / ".probsam-output").write_text("")
    (stale / "old.txt").write_text("from before")
    with OutputFolder(tmp_path / "run") as tmp:
        assert tmp == stale and not (tmp / "old.txt").exists()
        (tmp / "new.txt").write_text("now")
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [".probsam-output", "new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_output_folder_puts_the_old_output_back_when_the_swap_fails(tmp_path, monkeypatch):
    """--force over an existing output: if renaming the new folder into place fails, the previous output is
    renamed back, the error propagates and the temporary folder is removed."""
    import os

    out = tmp_path / "run"
    with OutputFolder(out) as tmp:
        (tmp / "a.txt").write_text("first")
    real_rename = os.rename

    def rename(src, dst):
        if ".tmp-" in str(src):
            raise OSError("rename failed")
        return real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(OSError, match="rename failed"):
        with OutputFolder(out, force=True) as tmp:
            (tmp / "b.txt").write_text("second")
    monkeypatch.undo()
    assert (out / "a.txt").read_text(encoding="utf-8") == "first" and not (out / "b.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_pid_liveness_of_stale_folders():
    """A stale folder's pid: this process is alive; a pid too large for the OS is not."""
    import os

    from ProbSAMLib.io.outputdir import _pid_alive

    assert _pid_alive(os.getpid())
    assert not _pid_alive(2 ** 80)

def test_distinct_colors():
    colors = distinct_colors(35)
    assert len(set(colors)) == 35
    assert all(0.0 <= c <= 1.0 for rgb in colors for c in rgb)
    assert colors[0] == pytest.approx((0x4E / 255, 0x79 / 255, 0xA7 / 255), abs=1e-4)
    assert distinct_colors(3) == colors[:3]


# --- Slicer segmentation ----------------------------------------------------------------------------
def overlapping_masks(count=4):
    masks = np.zeros((count,) + GEOMETRY.shape, bool)
    for n in range(count):
        masks[n, 2:6, 3 + n:9, 4:10 + n] = True  # nested, overlapping samples
    masks[-1, 0, 0, 0] = True
    return masks


def test_seg_nrrd_round_trip_with_oblique_geometry(tmp_path):
    masks = overlapping_masks(4)
    names, colors = ["s0", "s1", "s2", "s3"], distinct_colors(4)
    path = write_segmentation(masks, GEOMETRY, tmp_path / "samples.seg.nrrd", names=names, colors=colors,
                              tags=[{"ProbSAM.sample": str(n)} for n in range(4)])
    back, geometry, back_names = read_segmentation(path)
    np.testing.assert_array_equal(back, masks)
    assert geometry.isclose(GEOMETRY, 1e-9) and back_names == names
    meta = read_segment_metadata(path)
    assert [m["color"] for m in meta] == [pytest.approx(c, abs=1e-12) for c in colors]
    assert [m["layer"] for m in meta] == [0, 1, 2, 3] and meta[2]["tags"] == {"ProbSAM.sample": "2"}
    assert len({m["id"] for m in meta}) == 4


def test_seg_nrrd_header_is_what_slicer_writes(tmp_path):
    masks = overlapping_masks(3)
    masks[-1, 0, 0, 0] = False
    path = write_segmentation(masks, GEOMETRY, tmp_path / "s.seg.nrrd")
    fields, keyvalues = nrrd.read_header(path)
    assert fields["kinds"] == "list domain domain domain" and fields["encoding"] == "gzip"
    assert fields["space"] == "left-posterior-superior" and fields["space directions"].startswith("none (")
    assert fields["sizes"] == "3 10 8 6"  # cropped to the union (i 4..11, j 3..8, k 2..5) plus one voxel
    assert keyvalues["Segmentation_MasterRepresentation"] == "Binary labelmap"
    assert keyvalues["Segmentation_ContainedRepresentationNames"] == "Binary labelmap|"
    assert keyvalues["Segmentation_ReferenceImageExtentOffset"] == "3 2 1"
    assert keyvalues["Segment0_Extent"] == "1 6 1 6 1 4" and keyvalues["Segment1_LabelValue"] == "1"
    assert keyvalues["Segmentation_ConversionParameters"].startswith("Reference image geometry|")
    # Independent check with ITK (Slicer's reader): N components, the file grid placed at the offset.
    image = sitk.ReadImage(str(path))
    assert image.GetNumberOfComponentsPerPixel() == 3 and image.GetSize() == (10, 8, 6)
    np.testing.assert_allclose(image.GetOrigin(), GEOMETRY.index_to_physical([3, 2, 1]), atol=1e-9)
    np.testing.assert_allclose(np.array(image.GetDirection()).reshape(3, 3), GEOMETRY.direction, atol=1e-9)
    data = sitk.GetArrayFromImage(image)
    np.testing.assert_array_equal(data[..., 1], masks[1, 1:7, 2:10, 3:13])
    back, geometry, _ = read_segmentation(path)  # placed back on the full grid at the offset
    np.testing.assert_array_equal(back, masks)
    assert geometry.isclose(GEOMETRY, 1e-9)


def test_seg_nrrd_single_empty_and_uncropped(tmp_path):
    one = overlapping_masks(1)
    path = write_segmentation(one, GEOMETRY, tmp_path / "one.seg.nrrd", names=["only"], crop=False)
    fields, _ = nrrd.read_header(path)
    assert fields["dimension"] == "3" and fields["sizes"] == "18 14 9"
    back, geometry, names = read_segmentation(path)
    np.testing.assert_array_equal(back, one)
    assert names == ["only"] and geometry.isclose(GEOMETRY, 1e-9)

    empty = np.zeros((2,) + GEOMETRY.shape, bool)
    back, geometry, _ = read_segmentation(write_segmentation(empty, GEOMETRY, tmp_path / "e.seg.nrrd"))
    assert back.shape == empty.shape and not back.any() and geometry.isclose(GEOMETRY, 1e-9)
    with pytest.raises(ValueError, match="one name"):
        write_segmentation(one, GEOMETRY, tmp_path / "x.seg.nrrd", names=["a", "b"])
    with pytest.raises(ValueError, match=r"\(N, K, J, I\)"):
        write_segmentation(one[0], GEOMETRY, tmp_path / "x.seg.nrrd")


def test_reads_slicer_files_with_shared_layers(tmp_path):
    # Slicer packs non-overlapping segments into one layer with different label values.
    labels = np.zeros(GEOMETRY.shape, np.uint8)
    labels[1:3, 2:5, 3:6], labels[5:7, 8:10, 9:12] = 1, 2
    image = sample_image(labels, dtype=np.uint8)
    for key, value in {"Segment0_ID": "a", "Segment0_Name": "liver", "Segment0_LabelValue": "1",
                       "Segment0_Layer": "0", "Segment0_Extent": "3 5 2 4 1 2", "Segment1_ID": "b",
                       "Segment1_Name": "lesion", "Segment1_LabelValue": "2", "Segment1_Layer": "0",
                       "Segment1_Extent": "9 11 8 9 5 6"}.items():
        image.SetMetaData(key, value)
    sitk.WriteImage(image, str(tmp_path / "slicer.seg.nrrd"))
    masks, geometry, names = read_segmentation(tmp_path / "slicer.seg.nrrd")
    assert names == ["liver", "lesion"] and geometry.isclose(GEOMETRY, 1e-9)
    np.testing.assert_array_equal(masks[0], labels == 1)
    np.testing.assert_array_equal(masks[1], labels == 2)
