"""Slicer Markups ROI files (``.mrk.json``) ↔ :class:`~ProbSAMLib.geometry.Box3D`.

What Slicer writes for an ROI (vtkMRMLMarkupsROIJsonStorageNode, schema markups-schema-v1.0.x):
``markups[n]`` with ``"type": "ROI"``, ``coordinateSystem`` ("LPS", the default, or "RAS"),
``coordinateUnits`` ("mm" or "um"), ``center`` (3), ``size`` (3, full edge lengths) and ``orientation``
(9): the 3×3 ROI→node matrix in row-major order, so its COLUMNS are the ROI axes
(``[o[0], o[3], o[6]]`` is the ROI's x axis). For LPS files Slicer negates the first two rows of that
matrix and the first two centre coordinates. The centre is in the node's own coordinates: a parent
transform of the ROI node in the scene is not stored in the file.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional

import numpy as np

from ProbSAMLib.errors import InputError, shown
from ProbSAMLib.geometry import Box3D

SCHEMA_URL = ("https://raw.githubusercontent.com/slicer/slicer/master/Modules/Loadable/Markups/"
              "Resources/Schema/markups-schema-v1.0.3.json#")
_UNIT_TO_MM = {"mm": 1.0, "um": 1e-3}


class MarkupsError(InputError):
    """The file is not a usable Slicer ROI markups file."""


def list_rois(path) -> list:
    """Names of the ROI markups in a ``.mrk.json`` file, in file order."""
    return [m.get("name", "") for m in _roi_markups(_load(path), path)]


def read_roi_json(path, index: Optional[int] = None) -> Box3D:
    """The ROI of a Slicer ``.mrk.json`` as a :class:`Box3D` (LPS).

    With several ROIs in the file, ``index`` (0-based among the ROIs) picks one; without it that is an
    error that lists them.
    """
    rois = _roi_markups(_load(path), path)
    if index is None:
        if len(rois) > 1:
            listing = ", ".join(f"{n}: {m.get('name', '')!r}" for n, m in enumerate(rois))
            raise MarkupsError(f"{path} contains {len(rois)} ROIs ({listing}); choose one by its index")
        index = 0
    if not 0 <= index < len(rois):
        raise MarkupsError(f"ROI index {shown(index)} is out of range: {path} contains {len(rois)} ROI(s)")
    return _roi_to_box(rois[index], f"{path} (ROI {index} {rois[index].get('name', '')!r})")


def write_roi_json(box: Box3D, path, space: str = "lps", name: str = "R") -> Path:
    """Write ``box`` as a Slicer ROI markups file that Slicer can load (coordinates in ``space``)."""
    space = space.lower()
    orientation = box.axes_in(space).ravel()  # row-major: columns stay the box axes
    markup = {
        "type": "ROI",
        "coordinateSystem": space.upper(),
        "coordinateUnits": "mm",
        "locked": False,
        "fixedNumberOfControlPoints": False,
        "labelFormat": "%N-%d",
        "lastUsedControlPointNumber": 0,
        "roiType": "Box",
        "insideOut": False,
        "center": [float(v) for v in box.center_in(space)],
        "orientation": [float(v) for v in orientation],
        "size": [float(v) for v in box.size],
        "controlPoints": [],  # a Box ROI is defined by centre/orientation/size alone
        "measurements": [],
    }
    if name:
        markup["name"] = name
    path = Path(path)
    path.write_text(json.dumps({"@schema": SCHEMA_URL, "markups": [markup]}, indent=4) + "\n", encoding="utf-8")
    return path


def _load(path) -> dict:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"markups file not found: {path}")
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as error:  # ValueError: bad UTF-8 or JSON, or a number past
        # Python's 4300-digit limit for int(); RecursionError: brackets nested thousands deep
        raise MarkupsError(f"{path} is not a JSON file Slicer writes ({str(error)[:120]}); expected a "
                           f"Slicer .mrk.json") from None
    if not isinstance(document, dict) or not isinstance(document.get("markups"), list):
        raise MarkupsError(f"{path} is JSON but not a Slicer markups file (no 'markups' list)")
    return document


def _roi_markups(document: dict, path) -> list:
    markups = [m for m in document["markups"] if isinstance(m, dict)]
    rois = [m for m in markups if m.get("type") == "ROI"]
    if not rois:
        found = ", ".join(f"{m.get('type', '?')} {m.get('name', '')!r}" for m in markups) or "nothing"
        raise MarkupsError(f"{path} contains no ROI markup (found: {found}); save an ROI from Slicer's "
                           f"Markups module")
    return rois


def _vector(markup: dict, key: str, count: int, where: str) -> np.ndarray:
    if key not in markup:
        raise MarkupsError(f"{where}: the ROI has no '{key}' field")
    values = markup[key]
    ok = (isinstance(values, list) and len(values) == count
          and all(isinstance(v, (int, float)) and not isinstance(v, bool) and _finite(v) for v in values))
    if not ok:
        raise MarkupsError(f"{where}: '{key}' must be {count} finite numbers, got {shown(values)}")
    return np.array(values, dtype=np.float64)


def _finite(value) -> bool:
    """A JSON number usable as a float: not NaN/Infinity (which json accepts) and not an integer too large
    for a float (a 400-digit one raises OverflowError in float())."""
    try:
        return math.isfinite(float(value))
    except OverflowError:
        return False


def _roi_to_box(markup: dict, where: str) -> Box3D:
    system = markup.get("coordinateSystem", "LPS")  # the schema's default is LPS
    if not isinstance(system, str) or system.upper() not in ("LPS", "RAS"):
        raise MarkupsError(f"{where}: unknown coordinateSystem {shown(system)} (expected LPS or RAS)")
    system = system.upper()
    units = markup.get("coordinateUnits", "mm")
    if isinstance(units, list):  # coded entry [code, scheme, meaning]
        units = units[0] if units else "mm"
    if not isinstance(units, str) or units not in _UNIT_TO_MM:
        raise MarkupsError(f"{where}: unsupported coordinateUnits {shown(units)} (expected mm or um)")
    inside_out = markup.get("insideOut", False)
    if not isinstance(inside_out, bool):
        raise MarkupsError(f"{where}: 'insideOut' must be true or false, got {shown(inside_out)}")
    if inside_out:
        raise MarkupsError(f"{where}: the ROI is 'inside out', which cannot be used as a box prompt")
    scale = _UNIT_TO_MM[units]
    center = _vector(markup, "center", 3, where) * scale
    size = _vector(markup, "size", 3, where) * scale
    # Hand-written files may leave out the orientation: then the ROI is axis-aligned in its space.
    orientation = (_vector(markup, "orientation", 9, where).reshape(3, 3)
                   if "orientation" in markup else np.eye(3))
    if np.any(size < 0):
        raise MarkupsError(f"{where}: negative ROI size {size.tolist()}")
    try:
        return Box3D.from_center_size(center, size, axes=orientation, space=system.lower())
    except ValueError as error:
        raise MarkupsError(f"{where}: {error}") from None
