"""Damaged files that still decode, odd DICOM slices, values that cannot be HU, ITK's own warnings, paths that
are not UTF-8 and a closed stdout: what ProbSAMLib.io.imageio and ProbSAMLib.errors do with them (issue 36).
The `probsam` table of bad inputs is Testing/test_bad_inputs_cli.py; these are the library's side and the
cases that need a child process (a locale, a closed pipe)."""

import gzip
import io
import os
import struct
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from ProbSAMLib import errors
from ProbSAMLib.geometry import VolumeGeometry
from ProbSAMLib.io import imageio
from ProbSAMLib.io.imageio import GeometryWarning, IntensityWarning, ITKWarning, VolumeReadError, read_volume
from Testing.helpers import write_dicom_series

ROOT = Path(__file__).resolve().parents[1]


def write_ct(path, size=(24, 20, 6), dtype=np.int16):
    geometry = VolumeGeometry(size, (-20.0, 15.0, -40.0), (0.8, 0.7, 2.5), np.eye(3))
    values = np.random.default_rng(0).normal(-800, 40, geometry.shape)
    sitk.WriteImage(geometry.apply_to(sitk.GetImageFromArray(values.astype(dtype))), str(path))
    return path


# --- a NIfTI cut short -------------------------------------------------------------------------------------
def test_a_nifti_cut_short_is_refused_plain_or_zipped_and_a_whole_one_reads(tmp_path):
    whole = write_ct(tmp_path / "ct.nii").read_bytes()
    expected = 352 + 24 * 20 * 6 * 2
    assert len(whole) == expected
    (tmp_path / "cut.nii").write_bytes(whole[:-1])  # one byte short is short
    (tmp_path / "cut.nii.gz").write_bytes(gzip.compress(whole[:5000]))  # a complete gzip of a cut file
    with pytest.raises(VolumeReadError, match=rf"cut\.nii is cut short: its NIfTI header promises {expected} bytes "
                                              rf".* holds {expected - 1};"):
        read_volume(tmp_path / "cut.nii")
    with pytest.raises(VolumeReadError, match=r"cut\.nii\.gz is cut short: .* holds 5000 once decompressed"):
        read_volume(tmp_path / "cut.nii.gz")
    (tmp_path / "longer.nii").write_bytes(whole + b"\0" * 16)  # bytes after the data are harmless
    (tmp_path / "whole.nii.gz").write_bytes(gzip.compress(whole))
    for name in ("ct.nii", "longer.nii", "whole.nii.gz"):
        assert read_volume(tmp_path / name).GetSize() == (24, 20, 6), name


def test_a_hdr_img_pair_whose_img_is_cut_short_is_refused_and_a_whole_one_reads(tmp_path):
    """The .hdr of a NIfTI pair (or Analyze 7.5) promises the .img's bytes: ITK reads a cut .img as zeros."""
    write_ct(tmp_path / "ct.hdr")
    image = (tmp_path / "ct.img").read_bytes()
    assert len(image) == 24 * 20 * 6 * 2
    assert read_volume(tmp_path / "ct.hdr").GetSize() == (24, 20, 6)
    (tmp_path / "ct.img").write_bytes(image[:1000])
    with pytest.raises(VolumeReadError, match=r"ct\.img \(the voxels of ct\.hdr\) is cut short: .* promises "
                                              rf"{len(image)} bytes .* holds 1000;"):
        read_volume(tmp_path / "ct.hdr")
    (tmp_path / "ct.img").unlink()
    with pytest.raises((VolumeReadError, ValueError), match=r"\.img file is missing"):
        read_volume(tmp_path / "ct.hdr")


def test_the_nifti_size_check_reads_both_byte_orders_and_nifti_2():
    one = bytearray(348)
    struct.pack_into(">i", one, 0, 348)
    struct.pack_into(">8h", one, 40, 3, 10, 20, 5, 1, 1, 1, 1)
    struct.pack_into(">h", one, 72, 32)
    struct.pack_into(">f", one, 108, 352.0)
    one[344:348] = b"n+1\0"
    assert imageio._nifti_size(bytes(one)) == (352 + 10 * 20 * 5 * 4, 1000, 32, 352)
    two = bytearray(540)
    struct.pack_into("<i", two, 0, 540)
    two[4:8] = b"n+2\0"
    struct.pack_into("<h", two, 14, 16)
    struct.pack_into("<8q", two, 16, 4, 3, 4, 5, 2, 1, 1, 1)
    struct.pack_into("<q", two, 168, 544)
    assert imageio._nifti_size(bytes(two)) == (544 + 120 * 2, 120, 16, 544)
    assert imageio._nifti_size(b"NRRD0004\n" + bytes(600)) is None  # not NIfTI: other checks apply


# --- one odd slice in a DICOM series ---------------------------------------------------------------------
def test_a_dicom_slice_of_another_size_is_named_with_its_field(tmp_path):
    write_dicom_series(tmp_path, np.full((4, 20, 20), -800), "1.2.3.8", "s")
    odd = sitk.Image([24, 20, 1], sitk.sitkInt16)
    header = sitk.ImageFileReader()
    header.SetFileName(str(tmp_path / "s002.dcm"))
    header.ReadImageInformation()
    for key in header.GetMetaDataKeys():
        odd.SetMetaData(key, header.GetMetaData(key))
    odd.SetSpacing((0.8, 0.8, 1.0))
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    writer.SetFileName(str(tmp_path / "s002.dcm"))
    writer.Execute(odd)
    with pytest.raises(VolumeReadError, match=r"mixes slices: s002\.dcm has Columns \(0028,0011\) 24 where the "
                                              r"other slices have 20"):
        read_volume(tmp_path)


# --- values that cannot be HU ------------------------------------------------------------------------------
def test_a_volume_stored_in_8_bits_is_warned_about_even_with_negative_values(tmp_path):
    values = np.random.default_rng(0).integers(-128, 128, (6, 20, 20)).astype(np.int8)  # spans -128..127
    sitk.WriteImage(sitk.GetImageFromArray(values), str(tmp_path / "int8.nrrd"))
    with pytest.warns(IntensityWarning, match=r"int8\.nrrd: voxels are stored as 8-bit signed integer \(values span "
                                              r"-128\.\.127\), which cannot hold air's -1000 HU"):
        read_volume(tmp_path / "int8.nrrd")


# --- a sheared grid ------------------------------------------------------------------------------------------
def test_a_sheared_volume_is_read_with_a_one_line_warning_giving_the_true_voxel_volume(tmp_path):
    direction = np.array([[1.0, 0.3, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    direction[:, 1] /= np.linalg.norm(direction[:, 1])
    image = sitk.GetImageFromArray(np.full((6, 20, 24), -800, np.int16))
    image.SetSpacing((0.8, 0.7, 2.5))
    image.SetDirection(direction.ravel().tolist())
    sitk.WriteImage(image, str(tmp_path / "sheared.nrrd"))
    with pytest.warns(GeometryWarning) as caught:
        read_volume(tmp_path / "sheared.nrrd")
    text = str(caught[0].message)
    true_volume = 0.8 * 0.7 * 2.5 * np.linalg.det(direction)  # 4.4 % below the product of the spacings
    assert "sheared (angle between index axes i-j 73.30°" in text and f"{true_volume:.4g} mm³" in text, text
    assert "\n" not in text


# --- ITK's own printed warnings ------------------------------------------------------------------------------
def test_itk_warnings_become_one_line_each_naming_the_file(tmp_path):
    """A NIfTI whose sform is sheared (but whose qform is good): ITK prints a three-line "WARNING: In ..."
    block, three times, on file descriptor 2; the reader passes it on as one Python warning."""
    data = bytearray(write_ct(tmp_path / "ct.nii").read_bytes())
    struct.pack_into("<12f", data, 280, -0.8, 0.3, 0, 20, 0, -0.7, 0, -15, 0, 0, 2.5, -40)
    (tmp_path / "odd_sform.nii").write_bytes(bytes(data))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        read_volume(tmp_path / "odd_sform.nii")
    texts = [str(w.message) for w in caught if issubclass(w.category, ITKWarning)]
    assert texts == [f"{tmp_path / 'odd_sform.nii'}: NiftiImageIO: {tmp_path / 'odd_sform.nii'} has unexpected "
                     f"scales in sform"], texts


def test_itk_message_blocks_are_parsed_into_lines():
    text = ("WARNING: In /build/itkGDCMSeriesFileNames.cxx, line 101\nGDCMSeriesFileNames (0x5624cbe147b0): No "
            "Series were found\n\nWARNING: In /b/x.cxx, line 3\nNiftiImageIO (0x1): two\nlines\n\nplain text\n")
    assert imageio.itk_messages(text) == ["GDCMSeriesFileNames: No Series were found", "NiftiImageIO: two lines",
                                          "plain text"]


# --- paths that are not UTF-8, and a closed stdout ------------------------------------------------------------
def test_printable_shows_a_byte_that_is_not_utf8_as_itself():
    name = os.fsdecode(b"/data/ct\xff.nrrd")
    assert errors.printable(f"input volume not found: {name}") == "input volume not found: /data/ct\\xff.nrrd"
    assert errors.printable("ünïcode ±") == "ünïcode ±"


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from ProbSAMLib import save_probsam
    from Testing.helpers import diverse_tiny_model

    path = tmp_path_factory.mktemp("model") / "tiny.safetensors"
    save_probsam(diverse_tiny_model(), path)
    return path


def sample_argv(ct, out, model) -> list:
    return ["sample", str(ct), "--box", "4,4,1,12,12,4", "--box-space", "ijk", "--samples", "1", "--out", str(out),
            "--model", "file", "--checkpoint", str(model), "--quiet"]


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX file names are bytes; Windows names are UTF-16")
def test_a_path_that_is_not_utf8_is_read_and_written(tmp_path, tiny_model, capsys):
    """SimpleITK aborted the process (exit 134, nothing printed) on such a path; now it reaches SimpleITK
    through a link, in reading a file, a DICOM folder, and writing the outputs."""
    from ProbSAMLib.app import cli

    folder = Path(os.fsdecode(os.fsencode(str(tmp_path)) + b"/in\xff"))
    folder.mkdir()
    ct = write_ct(tmp_path / "ct.nrrd").rename(folder / os.fsdecode(b"ct\xff.nrrd"))
    write_dicom_series(tmp_path, np.full((3, 8, 8), -800), "1.2.3.5", "s")
    for n in range(3):
        (tmp_path / f"s{n:03d}.dcm").rename(folder / f"s{n:03d}.dcm")
    assert read_volume(folder).GetSize() == (8, 8, 3)
    out = Path(os.fsdecode(os.fsencode(str(tmp_path)) + b"/out\xff"))
    assert cli.main(sample_argv(ct, out, tiny_model)) == 0
    assert sorted(p.name for p in out.iterdir() if p.suffix == ".nrrd") == [
        "entropy.nrrd", "mean_probability.nrrd", "mutual_information.nrrd", "samples.seg.nrrd", "variance.nrrd"]
    assert cli.main(sample_argv(folder / os.fsdecode(b"gone\xff.nrrd"), tmp_path / "x", tiny_model)) == 2
    assert capsys.readouterr().err == f"probsam: error: input volume not found: {tmp_path}/in\\xff/gone\\xff.nrrd\n"


@pytest.mark.parametrize("env", [{"LC_ALL": "C"}, {"LC_ALL": "C", "PYTHONIOENCODING": "utf-8"}])
def test_an_error_naming_such_a_path_is_printed_in_any_locale(tmp_path, env):
    """stderr redirected to a file, an ASCII locale or a UTF-8 one: the line is printed, the byte escaped."""
    code = ("import os, sys\nfrom ProbSAMLib import errors\ndef main():\n"
            "    raise FileNotFoundError('input volume not found: ' + os.fsdecode(b'/data/ct\\xff.nrrd'))\n"
            "sys.exit(errors.run_main('probsam', main))")
    environment = {k: v for k, v in os.environ.items() if k != "PYTHONIOENCODING"}
    environment.update(env, PYTHONPATH=str(ROOT))
    with open(tmp_path / "stderr.txt", "wb") as err:
        done = subprocess.run([sys.executable, "-c", code], stderr=err, env=environment, timeout=60)
    assert done.returncode == 2
    assert (tmp_path / "stderr.txt").read_bytes() == b"probsam: error: input volume not found: /data/ct\\xff.nrrd\n"


def test_a_stdout_whose_reader_left_is_not_an_error():
    """The stream: a write or flush into a pipe whose reader has gone goes to /dev/null instead."""
    read, write = os.pipe()
    os.close(read)
    stream = errors._StdoutReaderMayLeave(io.TextIOWrapper(io.FileIO(write, "w"), encoding="utf-8"))
    stream.write("x" * 100000)  # more than the buffer: the write itself meets the closed pipe
    stream.write("more\n")
    stream.flush()
    assert os.path.samestat(os.fstat(write), os.stat(os.devnull))
    stream.close()


def test_probsam_sample_into_a_closed_pipe_finishes_with_status_0(tmp_path, tiny_model, monkeypatch):
    """`probsam sample ... | true`: the report meets a closed pipe after the outputs are written."""
    from ProbSAMLib.app import cli

    read, write = os.pipe()
    os.close(read)
    closed = io.TextIOWrapper(io.FileIO(write, "w"), encoding="utf-8")
    monkeypatch.setattr(sys, "stdout", closed)
    argv = [a for a in sample_argv(write_ct(tmp_path / "ct.nrrd"), tmp_path / "out", tiny_model) if a != "--quiet"]
    assert cli.main(argv) == 0
    assert (tmp_path / "out" / "summary.json").is_file()
    assert os.path.samestat(os.fstat(write), os.stat(os.devnull))  # the report went nowhere, quietly
    monkeypatch.undo()
    closed.close()


def test_probsam_info_into_a_closed_pipe_exits_0_silently(tmp_path):
    """`probsam info | head -1` (the reader gone before the first write, so the case is certain): status 0 and
    nothing on stderr, also when the process ends and Python flushes stdout."""
    environment = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", PROBSAM_CACHE=str(tmp_path / "cache"))
    read, write = os.pipe()
    os.close(read)
    done = subprocess.run([sys.executable, "-m", "ProbSAMLib.app.cli", "info"], stdout=write, stderr=subprocess.PIPE,
                          env=environment, timeout=300)
    os.close(write)
    assert done.returncode == 0 and done.stderr == b"", done.stderr
