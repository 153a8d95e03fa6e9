"""Reading CT volumes and writing ProbSAM's outputs (images, per-sample labelmaps). Slicer segmentation files
are :mod:`ProbSAMLib.io.segfile`; the output folder written whole or not at all is :mod:`ProbSAMLib.io.outputdir`.

One implementation for the CLI, the Slicer module and scripts. Arrays are ``(K, J, I)`` on a
:class:`~ProbSAMLib.geometry.VolumeGeometry`; mask stacks are ``(N, K, J, I)`` booleans.
"""

from __future__ import annotations

import contextlib
import errno
import gzip
import os
import shutil
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


# --- reading ----------------------------------------------------------------------------------------
def read_volume(path, series_uid: Optional[str] = None) -> sitk.Image:
    """A 3D volume as a float32 ``SimpleITK.Image`` (geometry kept; CT stays in HU).

    ``path``: any file SimpleITK reads (NRRD, NIfTI, MHA, ...) or a folder holding a DICOM series;
    ``series_uid`` picks one series when the folder holds several.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"input volume not found: {path}")
    if path.is_dir():
        image, is_dicom = _read_dicom_folder(path, series_uid), True
    else:
        if series_uid is not None:
            raise ValueError("series_uid applies only to a DICOM folder, not to a single file")
        _check_complete_gzip(path)
        image, is_dicom = _read_file(path)
    image = _validated(image, path, is_dicom)
    _warn_if_not_hu(image, path)
    return image


class IntensityWarning(UserWarning):
    """The voxel values do not look like CT Hounsfield units."""


def _warn_if_not_hu(image: sitk.Image, path: Path) -> None:
    """CT in HU has air near -1000 and rarely anything above a few thousand; say so when that is not seen."""
    values = sitk.GetArrayViewFromImage(image)
    low, high = float(values.min()), float(values.max())
    if low >= -100 or low < -3100 or high > 30000:
        warnings.warn(IntensityWarning(
            f"{path}: voxel values span {low:g}..{high:g}, which does not look like CT in Hounsfield units "
            f"(air is about -1000 HU). MR, cone-beam CT or DICOM without its rescale slope/intercept give "
            f"wrong masks; convert the volume to HU first"), stacklevel=3)


def _check_complete_gzip(path: Path) -> None:
    """A gzip-compressed file (.nii.gz, ...) must decode to its end: ITK reads a cut one as zeros."""
    with open(path, "rb") as handle:
        if handle.read(2) != b"\x1f\x8b":
            return
    try:
        with gzip.open(path, "rb") as stream:
            while stream.read(1 << 22):
                pass
    except (EOFError, OSError, zlib.error) as error:
        raise VolumeReadError(f"{path} is a compressed file that does not decode completely ({error}); "
                              f"it is truncated or corrupt: copy or download it again") from None


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
def _native_messages_kept_on_failure():
    """ITK's readers also print to the process's stderr (file descriptor 2) before raising. A failed read
    is reported by our one error line, so that text is dropped; after a good read it is passed on."""
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
                text = captured.read()
                if text:
                    os.write(2, text)


def _read_file(path: Path) -> tuple:
    with _native_messages_kept_on_failure():
        return _read_file_quietly(path)


def _read_file_quietly(path: Path) -> tuple:
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
        # GetImageIO() is empty unless set by hand; DICOM files carry their SOP class UID (0008,0016).
        is_dicom = reader.HasMetaDataKey("0008|0016") or reader.HasMetaDataKey("0002|0010")
        return reader.Execute(), is_dicom
    except RuntimeError as error:
        raise VolumeReadError(
            f"cannot read {path} as an image ({_short(error)}). Give a volume file SimpleITK reads "
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


def _read_dicom_folder(folder: Path, series_uid: Optional[str]) -> sitk.Image:
    uids = list(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)))
    if not uids:
        count = sum(1 for p in folder.iterdir() if p.is_file())
        raise VolumeReadError(f"{folder} is a folder with no DICOM series in it ({count} files, none "
                              f"readable as DICOM images); give a DICOM series folder or a volume file")
    if series_uid is None and len(uids) > 1 or series_uid is not None and series_uid not in uids:
        series = [_series_info(folder, uid) for uid in uids]
        listing = "; ".join(f"{s['uid']} ({s['files']} files"
                            + (f", {s['modality']}" if s["modality"] else "")
                            + (f", '{s['description']}'" if s["description"] else "") + ")" for s in series)
        if series_uid is None:
            raise MultipleSeriesError(f"{folder} holds {len(uids)} DICOM series; choose one with its "
                                      f"series UID (series_uid / --series-uid): {listing}", series)
        raise VolumeReadError(f"series {series_uid} is not in {folder}; it holds: {listing}")
    files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), series_uid or uids[0])
    _check_slice_positions(files, folder)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    try:
        with _native_messages_kept_on_failure():
            return reader.Execute()
    except RuntimeError as error:
        raise VolumeReadError(f"cannot read the DICOM series in {folder}: {_short(error)}") from None


def _header(file: str) -> sitk.ImageFileReader:
    reader = sitk.ImageFileReader()
    reader.SetFileName(file)
    reader.ReadImageInformation()
    return reader


def _check_slice_positions(files: Sequence[str], folder: Path) -> None:
    """Refuse a series with missing slices or uneven spacing (read as evenly spaced, it would be distorted)."""
    if len(files) < 3:
        return
    try:
        headers = [_header(f) for f in files]
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
        raise VolumeReadError(f"the DICOM series in {folder} has slices at the same position "
                              f"(duplicates?); remove the duplicates or give a single series")
    odd = np.flatnonzero(np.abs(np.abs(steps) - typical) > 0.05 * typical + 1e-3)
    if len(odd):
        shown = ", ".join(f"{abs(steps[n]):.3g} mm after slice {n}" for n in odd[:4])
        raise VolumeReadError(
            f"the DICOM series in {folder} has missing slices or uneven slice spacing (typical "
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
        sitk.WriteImage(image, str(path), useCompression=True)
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
