"""Reading CT volumes and writing ProbSAM's outputs (images, per-sample labelmaps). Slicer segmentation files
are :mod:`ProbSAMLib.io.segfile`; the output folder written whole or not at all is :mod:`ProbSAMLib.io.outputdir`.

One implementation for the CLI, the Slicer module and scripts. Arrays are ``(K, J, I)`` on a
:class:`~ProbSAMLib.geometry.VolumeGeometry`; mask stacks are ``(N, K, J, I)`` booleans.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import gzip
import math
import os
import re
import shutil
import struct
import sys
import tempfile
import threading
import warnings
import zlib
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import SimpleITK as sitk

from ProbSAMLib.errors import InputError
from ProbSAMLib.geometry import VolumeGeometry
from ProbSAMLib.io.segfile import check_masks


class VolumeReadError(InputError):
    """The input exists but is not a usable 3D single-channel volume."""


class MultipleSeriesError(VolumeReadError):
    """A DICOM folder holds several series; ``series`` lists them as dicts (uid, files, description)."""

    def __init__(self, message: str, series: list):
        super().__init__(message)
        self.series = series


# --- reading ---------------------------------------------------------------------------------------
def read_volume(path, series_uid: Optional[str] = None) -> sitk.Image:
    """A 3D volume as a float32 ``SimpleITK.Image`` (geometry kept; CT stays in HU).

    ``path``: any file SimpleITK reads (NRRD, NIfTI, MHA, ...) or a folder holding a DICOM series;
    ``series_uid`` picks one series when the folder holds several.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"input volume not found: {path}")
    if not path.is_dir() and series_uid is not None:
        raise ValueError(f"series_uid (--series-uid) applies only to a DICOM folder, and {path} is a file")
    with _itk_path(path) as itk_path:
        if path.is_dir():
            with _native_messages_as_warnings(path):  # GDCM's scan prints too ("No Series were found")
                image, is_dicom = _read_dicom_folder(Path(itk_path), series_uid, path), True
        else:
            _check_decoded_size(path)
            image, is_dicom = _read_file(itk_path, path)
        pixel_type = image.GetPixelIDTypeAsString()
        image = _validated(image, path, is_dicom)
    _warn_if_sheared(image, path)
    _warn_if_not_hu(image, path, pixel_type)
    return image


class IntensityWarning(UserWarning):
    """The voxel values do not look like CT Hounsfield units."""


class GeometryWarning(UserWarning):
    """The voxel grid is valid but unusual (sheared axes): numbers from it need a caveat."""


class ITKWarning(UserWarning):
    """A warning SimpleITK/ITK printed while reading, passed on as one line."""


# Pixel types that cannot hold air's -1000 HU (a volume cast to 8 bits, a label map, a mask).
_NOT_HU_TYPES = ("8-bit signed integer", "8-bit unsigned integer", "16-bit unsigned integer",
                 "32-bit unsigned integer", "64-bit unsigned integer")


def _warn_if_not_hu(image: sitk.Image, path: Path, pixel_type: str = "") -> None:
    """CT in HU has air near -1000 and rarely anything above a few thousand; say so when that is not seen,
    or when the file's voxel type cannot hold -1000 at all (an int8 volume spans -128..127: no air)."""
    values = sitk.GetArrayViewFromImage(image)
    low, high = float(values.min()), float(values.max())
    if pixel_type in _NOT_HU_TYPES:
        why = (f"voxels are stored as {pixel_type} (values span {low:g}..{high:g}), which cannot hold air's "
               f"-1000 HU and")
    elif low >= -100 or low < -3100 or high > 30000:
        why = f"voxel values span {low:g}..{high:g}, which"
    else:
        return
    warnings.warn(IntensityWarning(
        f"{path}: {why} does not look like CT in Hounsfield units (air is about -1000 HU). MR, cone-beam CT, a "
        f"volume cast to 8 bits or DICOM without its rescale slope/intercept give wrong masks; convert the volume "
        f"to HU first"), stacklevel=3)


def _warn_if_sheared(image: sitk.Image, path: Path) -> None:
    try:
        note = VolumeGeometry.from_sitk(image).shear_note()
    except ValueError as error:  # a NaN origin, say: name the file (the geometry's own text names the field)
        raise VolumeReadError(f"{path}: unusable voxel grid: {error}") from None
    if note:
        warnings.warn(GeometryWarning(f"{path}: {note}"), stacklevel=3)


# --- paths SimpleITK can be given ---------------------------------------------------------------------
def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # a byte that is not UTF-8, kept by os.fsdecode as a lone surrogate
        return False
    return True


@contextlib.contextmanager
def _itk_path(path: Path):
    """The path as SimpleITK may be given it. SimpleITK aborts the whole process (std::logic_error, no
    message) on a path that is not valid UTF-8, so such a path reaches it through a symbolic link with a
    plain name in a temporary folder: the file or DICOM folder itself for reading, the folder it goes
    into for writing."""
    if _utf8(str(path)):
        yield str(path)
        return
    path = Path(os.path.abspath(path))
    with tempfile.TemporaryDirectory(prefix="probsam-") as folder:
        if path.exists():
            link = Path(folder) / ("input" + "".join(s for s in path.suffixes if _utf8(s)))
            target = path
        elif _utf8(path.name):
            link, target = Path(folder) / "folder", path.parent
        else:
            raise OSError(errno.EINVAL, "SimpleITK cannot write a file whose name is not UTF-8; choose "
                                        "another name", str(path))
        try:
            os.symlink(target, link)
        except OSError as error:
            raise VolumeReadError(f"{path}: its name is not valid UTF-8, which SimpleITK cannot open, and "
                                  f"no link to it could be made ({error.strerror}); rename it") from None
        yield str(link / path.name if target == path.parent else link)


# --- damaged files that still decode ------------------------------------------------------------------
def _check_decoded_size(path: Path) -> None:
    """Refuse a file cut short that ITK would still read, the missing voxels as zeros: a gzip stream must
    decode to its end, and a NIfTI file must hold as many bytes as its header promises (the check works
    on the decoded bytes, so it also catches a complete gzip of a cut .nii)."""
    head, size, compressed = _check_complete_gzip(path)
    promised, data = _nifti_size(head), path
    if promised is None and _is_header_of_pair(path):  # a .hdr/.img pair: the voxels are in the .img
        data = _image_of_pair(path)
        promised = _nifti_size(head, pair=True)
        if data is None:
            raise VolumeReadError(f"{path} is the header of a .hdr/.img pair, but its .img file is missing")
        _, size, compressed = _check_complete_gzip(data)
    if promised is not None and size < promised[0]:
        expected, voxels, bits, offset = promised
        decoded = " once decompressed" if compressed else ""
        where = f"{data} (the voxels of {path.name})" if data != path else f"{path}"
        raise VolumeReadError(
            f"{where} is cut short: its NIfTI header promises {expected} bytes ({offset}-byte header + {voxels} "
            f"voxels of {bits} bits) but the file holds {size}{decoded}; it is truncated: copy or "
            f"download it again")


def _is_header_of_pair(path: Path) -> bool:
    return path.name.lower().endswith((".hdr", ".hdr.gz"))


def _image_of_pair(header: Path) -> Optional[Path]:
    """The .img (or .img.gz) beside a .hdr (or .hdr.gz), None if there is none."""
    stem = header.name[:-len(".hdr.gz")] if header.name.lower().endswith(".hdr.gz") else header.name[:-len(".hdr")]
    for suffix in (".img", ".img.gz", ".IMG", ".IMG.GZ"):
        if (header.parent / (stem + suffix)).is_file():
            return header.parent / (stem + suffix)
    return None


def _check_complete_gzip(path: Path) -> tuple:
    """A gzip-compressed file (.nii.gz, ...) must decode to its end: ITK reads a cut one as zeros.
    Returns (the first 540 decoded bytes, the decoded size, whether it was compressed)."""
    with open(path, "rb") as handle:
        head = handle.read(540)
    if head[:2] != b"\x1f\x8b":
        return head, path.stat().st_size, False
    size, head = 0, b""
    try:
        with gzip.open(path, "rb") as stream:
            while True:
                block = stream.read(1 << 22)
                if not block:
                    break
                head = head or block[:540]
                size += len(block)
    except (EOFError, OSError, zlib.error) as error:
        raise VolumeReadError(f"{path} is a compressed file that does not decode completely ({error}); "
                              f"it is truncated or corrupt: copy or download it again") from None
    return head, size, True


def _nifti_size(head: bytes, pair: bool = False) -> Optional[tuple]:
    """(bytes promised, voxels, bits per voxel, header bytes) of a single-file NIfTI-1/2 header, or None
    for anything else (another format, or values ITK refuses by itself). ``pair``: ``head`` is the .hdr of
    a .hdr/.img pair (NIfTI-1 "ni1", or Analyze 7.5, which has the same layout and no magic) and the bytes
    promised are the .img's."""
    for order in "<>":
        single = head[344:348] == b"n+1\0" and not pair
        paired = pair and head[344:348] != b"n+1\0"  # "ni1", or Analyze's field that is no magic
        if len(head) >= 348 and struct.unpack(order + "i", head[:4])[0] == 348 and (single or paired):
            dims = struct.unpack(order + "8h", head[40:56])
            bits = struct.unpack(order + "h", head[72:74])[0]
            offset = struct.unpack(order + "f", head[108:112])[0]
        elif len(head) >= 540 and struct.unpack(order + "i", head[:4])[0] == 540 and head[4:8] == b"n+2\0":
            bits = struct.unpack(order + "h", head[14:16])[0]
            dims = struct.unpack(order + "8q", head[16:80])
            offset = struct.unpack(order + "q", head[168:176])[0]
        else:
            continue
        count = dims[0]
        if not 1 <= count <= 7 or min(dims[1:count + 1]) < 1 or bits < 1 or not math.isfinite(offset):
            return None
        voxels = math.prod(dims[1:count + 1])
        return int(offset) + (voxels * bits + 7) // 8, voxels, bits, int(offset)
    return None


def _short(error: Exception) -> str:
    """The useful sentence of an ITK exception (which ends with file:line and matrix rows)."""
    text = str(error)
    if "determinant is 0" in text or "Bad direction" in text:
        return "its direction matrix is singular (two axes point the same way, or one is zero)"
    if "change spacing" in text:
        return "it has a zero or negative voxel spacing"
    errors = [line.split("ITK ERROR:", 1)[1].strip() for line in text.splitlines() if "ITK ERROR:" in line]
    if errors:
        return errors[-1].split("): ", 1)[-1][:300]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1][:300] if lines else type(error).__name__


@contextlib.contextmanager
def _native_messages_as_warnings(where: Path):
    """ITK's readers print to the process's stderr (file descriptor 2): before raising, and multi-line
    "WARNING: In itkXxx.cxx, line N" blocks. A failed read is reported by our one error line, so that text
    is dropped; after a good read each ITK message becomes one warning line naming the file."""
    if threading.current_thread() is not threading.main_thread():
        yield  # redirecting fd 2 would swallow other threads' output
        return
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        succeeded = False
        try:
            yield
            succeeded = True
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            if succeeded:
                captured.seek(0)
                for line in itk_messages(captured.read().decode("utf-8", "backslashreplace")):
                    warnings.warn(ITKWarning(f"{where}: {line}"), stacklevel=4)


def itk_messages(text: str) -> list:
    """ITK's printed messages, one line each, each once: "WARNING: In <file>, line N" / "<Class> (0x..): <text>"
    blocks become "<Class>: <text>"; any other text is kept, its lines joined."""
    messages = []
    for block in re.split(r"\n\s*\n|(?=^WARNING: In )", text, flags=re.MULTILINE):
        lines = [line.strip() for line in block.splitlines() if line.strip()]
        if lines and lines[0].startswith("WARNING: In "):
            lines = lines[1:]
        if lines:
            first = re.sub(r"^(\w+) \(0x[0-9a-fA-F]+\): ", r"\1: ", lines[0])
            messages.append(" ".join([first] + lines[1:])[:500])
    return list(dict.fromkeys(messages))  # ITK often prints the same warning once per pass over the header


def _read_file(path: str, where: Path) -> tuple:
    with _native_messages_as_warnings(where):
        return _read_file_quietly(path, where)


def _read_file_quietly(path: str, where: Path) -> tuple:
    reader = sitk.ImageFileReader()
    reader.SetFileName(path)
    try:
        reader.ReadImageInformation()
        # GetImageIO() is empty unless set by hand; DICOM files carry their SOP class UID (0008,0016).
        is_dicom = reader.HasMetaDataKey("0008|0016") or reader.HasMetaDataKey("0002|0010")
        return reader.Execute(), is_dicom
    except RuntimeError as error:
        raise VolumeReadError(
            f"cannot read {where} as an image ({_short(error)}). Give a volume file SimpleITK reads "
            f"(.nrrd, .nii/.nii.gz, .mha, ...) or a folder holding a DICOM series") from None


def _series_info(folder: Path, uid: str) -> dict:
    files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), uid)
    info = {"uid": uid, "files": len(files), "description": "", "modality": ""}
    try:  # only the header of the first file: cheap
        reader = sitk.ImageFileReader()
        reader.SetFileName(files[0])
        reader.ReadImageInformation()
        for key, tag in (("description", "0008|103e"), ("modality", "0008|0060")):
            if reader.HasMetaDataKey(tag):
                info[key] = reader.GetMetaData(tag).strip()
    except (RuntimeError, IndexError):
        pass
    return info


def _read_dicom_folder(folder: Path, series_uid: Optional[str], where: Path) -> sitk.Image:
    """``folder``: the path SimpleITK is given (see _itk_path); ``where``: the user's, for messages."""
    uids = list(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)))
    if not uids:
        count = sum(1 for p in folder.iterdir() if p.is_file())
        raise VolumeReadError(f"{where} is a folder with no DICOM series in it ({count} files, none "
                              f"readable as DICOM images); give a DICOM series folder or a volume file")
    if series_uid is None and len(uids) > 1 or series_uid is not None and series_uid not in uids:
        series = [_series_info(folder, uid) for uid in uids]
        listing = "; ".join(f"{s['uid']} ({s['files']} files"
                            + (f", {s['modality']}" if s["modality"] else "")
                            + (f", '{s['description']}'" if s["description"] else "") + ")" for s in series)
        if series_uid is None:
            raise MultipleSeriesError(f"{where} holds {len(uids)} DICOM series; choose one with its "
                                      f"series UID (series_uid / --series-uid): {listing}", series)
        raise VolumeReadError(f"series {series_uid} is not in {where}; it holds: {listing}")
    files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), series_uid or uids[0])
    _check_slices(files, where)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    try:
        return reader.Execute()
    except RuntimeError as error:
        raise VolumeReadError(f"cannot read the DICOM series in {where}: {_short(error)}") from None


def _header(file: str) -> sitk.ImageFileReader:
    reader = sitk.ImageFileReader()
    reader.SetFileName(file)
    reader.ReadImageInformation()
    return reader


# Tags every slice of a series must share: a slice that differs cannot be stacked with the others (a
# rotated or coronal slice carrying the series' UID, another reconstruction's pixel size).
_SHARED_TAGS = (("0020|0037", "ImageOrientationPatient (0020,0037)"), ("0028|0030", "PixelSpacing (0028,0030)"),
                ("0028|0010", "Rows (0028,0010)"), ("0028|0011", "Columns (0028,0011)"))


def _tag_numbers(header: sitk.ImageFileReader, tag: str) -> Optional[tuple]:
    if not header.HasMetaDataKey(tag):
        return None
    try:
        return tuple(float(v) for v in header.GetMetaData(tag).split("\\"))
    except ValueError:
        return (header.GetMetaData(tag).strip(),)  # compared as text


def _check_slices(files: Sequence[str], where: Path) -> None:
    """Refuse a series whose slices disagree in orientation, pixel spacing or size, or that has missing
    slices or uneven spacing (read as one evenly spaced block, it would be distorted)."""
    if len(files) < 2:
        return
    try:
        headers = [_header(f) for f in files]
    except RuntimeError:
        return  # an unreadable slice: the series reader says which
    for tag, name in _SHARED_TAGS:
        _check_shared(tag, name, [_tag_numbers(h, tag) for h in headers], files, where)
    _check_slice_positions(headers, where)


def _same(a, b) -> bool:
    if a is None or b is None or len(a) != len(b) or any(isinstance(v, str) for v in a + b):
        return a == b
    return bool(np.allclose(a, b, rtol=1e-4, atol=1e-4))


def _check_shared(tag: str, name: str, values: list, files: Sequence[str], where: Path) -> None:
    """Every slice must carry the value most slices have; name the first slice that does not."""
    common = collections.Counter(values).most_common(1)[0][0]
    odd = [n for n, value in enumerate(values) if not _same(value, common)]
    if not odd:
        return
    if common is None:  # most slices lack the tag, a few carry it: still not one series
        common = next(v for v in values if v is not None)
        odd = [n for n, value in enumerate(values) if value is None]
    others = f" (and {len(odd) - 1} more)" if len(odd) > 1 else ""
    raise VolumeReadError(
        f"the DICOM series in {where} mixes slices: {Path(files[odd[0]]).name}{others} has {name} "
        f"{_tag_text(values[odd[0]])} where the other slices have {_tag_text(common)}; remove the odd slice or "
        f"give a consistent series")


def _tag_text(value: Optional[tuple]) -> str:
    return "missing" if value is None else "\\".join(f"{v:g}" if isinstance(v, float) else v for v in value)


def _check_slice_positions(headers: list, where: Path) -> None:
    """Refuse missing slices, repeated positions or uneven spacing (given one shared orientation)."""
    if len(headers) < 3:
        return
    try:
        positions = np.array([[float(v) for v in h.GetMetaData("0020|0032").split("\\")] for h in headers])
        orientation = [float(v) for v in headers[0].GetMetaData("0020|0037").split("\\")]
    except (RuntimeError, ValueError):
        return  # no positions in the headers: nothing to check against
    normal = np.cross(orientation[:3], orientation[3:6])
    if positions.shape[1] != 3 or not np.linalg.norm(normal) > 0.5:
        return
    steps = np.diff(positions @ normal)
    typical = float(np.median(np.abs(steps)))
    if typical <= 1e-6:
        raise VolumeReadError(f"the DICOM series in {where} has slices at the same position "
                              f"(duplicates?); remove the duplicates or give a single series")
    odd = np.flatnonzero(np.abs(np.abs(steps) - typical) > 0.05 * typical + 1e-3)
    if len(odd):
        shown = ", ".join(f"{abs(steps[n]):.3g} mm after slice {n}" for n in odd[:4])
        raise VolumeReadError(
            f"the DICOM series in {where} has missing slices or uneven slice spacing (typical "
            f"{typical:.3g} mm; {shown}{' ...' if len(odd) > 4 else ''}); ProbSAM needs evenly spaced slices: "
            f"supply the complete series or resample it to even spacing first")


def _validated(image: sitk.Image, path: Path, is_dicom: bool) -> sitk.Image:
    dim, size = image.GetDimension(), image.GetSize()
    hint = " (a single DICOM file: give the folder that holds the whole series)" if is_dicom else ""
    if dim == 4 and size[3] == 1:  # a 3D volume stored as 4D with one time point
        image = sitk.Extract(image, list(size[:3]) + [0], [0, 0, 0, 0])
        dim, size = 3, size[:3]
    if dim == 2 or (dim == 3 and size[2] == 1 and is_dicom):
        raise VolumeReadError(f"{path} is a 2D image (size {size}){hint}; ProbSAM needs a 3D volume")
    if dim != 3:
        raise VolumeReadError(f"{path} is a {dim}D image (size {size}), e.g. a time series; "
                              f"ProbSAM needs one 3D volume: extract it first")
    if image.GetPixelID() in (sitk.sitkComplexFloat32, sitk.sitkComplexFloat64):
        raise VolumeReadError(f"{path} has complex voxel values; ProbSAM needs a real-valued CT volume")
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise VolumeReadError(f"{path} has {image.GetNumberOfComponentsPerPixel()} components per voxel "
                              f"(RGB or vector image); ProbSAM needs a single-channel (HU) volume")
    image = sitk.Cast(image, sitk.sitkFloat32)
    values = sitk.GetArrayViewFromImage(image)
    bad = values.size - int(np.count_nonzero(np.isfinite(values)))
    if bad:
        raise VolumeReadError(f"{path} contains {bad} non-finite voxel values (NaN or infinity) out of "
                              f"{values.size}; fix or mask them before segmenting")
    return image


# --- writing images ---------------------------------------------------------------------------------
def write_image(array, reference_geometry: VolumeGeometry, path, dtype=None) -> Path:
    """Write a ``(K, J, I)`` array on ``reference_geometry`` (compressed; format from the suffix)."""
    array = np.asarray(array)
    if array.shape != reference_geometry.shape:
        raise ValueError(f"array shape {array.shape} does not match the volume (K, J, I) "
                         f"{reference_geometry.shape}")
    if dtype is not None:
        array = array.astype(dtype, copy=False)
    if array.dtype == bool:
        array = array.astype(np.uint8)
    image = reference_geometry.apply_to(sitk.GetImageFromArray(array))
    try:
        with _itk_path(Path(path)) as itk_path:
            sitk.WriteImage(image, itk_path, useCompression=True)
    except RuntimeError as error:  # ITK reports a full disk as a multi-line dump: say what happened
        raise _write_error(path, error) from None
    return Path(path)


def _write_error(path, error: RuntimeError) -> OSError:
    free = shutil.disk_usage(Path(path).parent).free if Path(path).parent.exists() else None
    if "No space left" in str(error) or (free is not None and free < 1 << 20):
        return OSError(errno.ENOSPC, "No space left on device", str(path))
    return OSError(errno.EIO, f"cannot write the image ({_short(error)})", str(path))


def write_sample_files(masks, geometry: VolumeGeometry, directory, prefix: str = "sample_") -> list:
    """One 0/1 labelmap per sample: ``<prefix>00.nrrd``, ``<prefix>01.nrrd``, ...; returns the paths."""
    masks = check_masks(masks, geometry)
    width = max(2, len(str(len(masks) - 1)))
    return [write_image(mask, geometry, Path(directory) / f"{prefix}{n:0{width}d}.nrrd", np.uint8)
            for n, mask in enumerate(masks)]
