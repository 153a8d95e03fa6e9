"""Slicer Markups ROI (.mrk.json) reading and writing."""

import json

import numpy as np
import pytest

from ProbSAMLib.geometry import Box3D
from ProbSAMLib.io.markups import MarkupsError, list_rois, read_roi_json, write_roi_json

C, S = np.cos(np.deg2rad(30)), np.sin(np.deg2rad(30))
ROT_Z30 = np.array([[C, -S, 0], [S, C, 0], [0, 0, 1]])  # columns: ROI x, y, z axes


def slicer_roi(center, size, orientation, system="LPS", name="R", **extra):
    """An ROI entry as Slicer 5 writes it (orientation: row-major 3×3, columns = ROI axes)."""
    markup = {"type": "ROI", "coordinateSystem": system, "coordinateUnits": "mm", "name": name,
              "roiType": "Box", "center": list(center), "orientation": list(np.ravel(orientation)),
              "size": list(size), "controlPoints": [], "insideOut": False}
    markup.update(extra)
    return markup


def write(tmp_path, *markups, name="roi.mrk.json"):
    path = tmp_path / name
    path.write_text(json.dumps({"@schema": "https://raw.githubusercontent.com/slicer/slicer/master/"
                                "Modules/Loadable/Markups/Resources/Schema/markups-schema-v1.0.3.json#",
                                "markups": list(markups)}))
    return path


@pytest.mark.parametrize("space", ["lps", "ras"])
def test_round_trip_of_a_rotated_box(tmp_path, space):
    box = Box3D((10.5, -20.25, 33.0), (12.0, 7.5, 4.0), ROT_Z30 @ np.array([[1, 0, 0], [0, 0, -1], [0, 1, 0]]))
    path = write_roi_json(box, tmp_path / "box.mrk.json", space=space)
    document = json.loads(path.read_text(encoding="utf-8"))
    assert document["markups"][0]["coordinateSystem"] == space.upper()
    back = read_roi_json(path)
    np.testing.assert_allclose(back.center, box.center, atol=1e-12)
    np.testing.assert_allclose(back.size, box.size, atol=1e-12)
    np.testing.assert_allclose(back.axes, box.axes, atol=1e-12)


def test_orientation_columns_are_the_roi_axes_in_ras(tmp_path):
    path = write(tmp_path, slicer_roi((1, 2, 3), (10, 4, 2), ROT_Z30, system="RAS"))
    box = read_roi_json(path)
    # ROI x axis in RAS is (cos, sin, 0); in LPS that is (-cos, -sin, 0). A transposed reading gives sin<0.
    np.testing.assert_allclose(box.axes[:, 0], [-C, -S, 0], atol=1e-12)
    np.testing.assert_allclose(box.center, [-1, -2, 3])
    np.testing.assert_allclose(box.size, [10, 4, 2])


def test_lps_file_equals_the_same_roi_saved_in_ras(tmp_path):
    ras = read_roi_json(write(tmp_path, slicer_roi((5, -6, 7), (3, 4, 5), ROT_Z30, system="RAS")))
    # Slicer's LPS form: centre x, y negated; first two ROWS of the orientation matrix negated.
    lps_orientation = np.diag([-1, -1, 1]) @ ROT_Z30
    lps = read_roi_json(write(tmp_path, slicer_roi((-5, 6, 7), (3, 4, 5), lps_orientation),
                              name="lps.mrk.json"))
    np.testing.assert_allclose(lps.center, ras.center, atol=1e-12)
    np.testing.assert_allclose(lps.axes, ras.axes, atol=1e-12)


def test_micrometre_units_and_default_lps(tmp_path):
    markup = slicer_roi((1000, 2000, 3000), (4000, 5000, 6000), np.eye(3), coordinateUnits="um")
    del markup["coordinateSystem"]
    box = read_roi_json(write(tmp_path, markup))
    np.testing.assert_allclose(box.center, [1, 2, 3])
    np.testing.assert_allclose(box.size, [4, 5, 6])


def test_several_rois_need_an_index(tmp_path):
    path = write(tmp_path, {"type": "Fiducial", "name": "F", "controlPoints": []},
                 slicer_roi((0, 0, 0), (1, 1, 1), np.eye(3), name="first"),
                 slicer_roi((9, 9, 9), (2, 2, 2), np.eye(3), name="second"))
    assert list_rois(path) == ["first", "second"]
    with pytest.raises(MarkupsError, match="2 ROIs.*'first'.*'second'"):
        read_roi_json(path)
    np.testing.assert_allclose(read_roi_json(path, index=1).center, [9, 9, 9])
    with pytest.raises(MarkupsError, match="out of range"):
        read_roi_json(path, index=2)


def test_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_roi_json(tmp_path / "missing.mrk.json")
    not_json = tmp_path / "a.mrk.json"
    not_json.write_text("center = 1, 2, 3")
    with pytest.raises(MarkupsError, match="not a JSON file"):
        read_roi_json(not_json)
    other = tmp_path / "b.json"
    other.write_text(json.dumps({"hello": 1}))
    with pytest.raises(MarkupsError, match="no 'markups' list"):
        read_roi_json(other)
    with pytest.raises(MarkupsError, match="no ROI markup.*Fiducial 'F'"):
        read_roi_json(write(tmp_path, {"type": "Fiducial", "name": "F"}, name="c.mrk.json"))
    markup = slicer_roi((0, 0, 0), (1, 1, 1), np.eye(3))
    del markup["center"]
    with pytest.raises(MarkupsError, match="no 'center' field"):
        read_roi_json(write(tmp_path, markup, name="d.mrk.json"))
    with pytest.raises(MarkupsError, match="'size' must be 3 finite numbers"):
        read_roi_json(write(tmp_path, slicer_roi((0, 0, 0), (1, 1), np.eye(3)), name="e.mrk.json"))
    with pytest.raises(MarkupsError, match="orthonormal"):
        read_roi_json(write(tmp_path, slicer_roi((0, 0, 0), (1, 1, 1), 2 * np.eye(3)), name="f.mrk.json"))
    with pytest.raises(MarkupsError, match="inside out"):
        read_roi_json(write(tmp_path, slicer_roi((0, 0, 0), (1, 1, 1), np.eye(3), insideOut=True),
                            name="g.mrk.json"))


@pytest.mark.parametrize("text, words", [
    ("[" + "9" * 400 + ", 0, 0]", "'center' must be 3 finite numbers, got [999"),  # too large for a float
    ("[NaN, 0, 0]", "'center' must be 3 finite numbers, got [nan, 0, 0]"),
    ("[-Infinity, 0, 0]", "'center' must be 3 finite numbers, got [-inf, 0, 0]"),
    ("[1e400, 0, 0]", "'center' must be 3 finite numbers, got [inf, 0, 0]"),
    ("[" + "9" * 5000 + ", 0, 0]", "is not a JSON file Slicer writes (Exceeds the limit"),  # past int()'s digits
])
def test_numbers_a_float_cannot_hold_are_refused_naming_the_file_and_field(tmp_path, text, words):
    path = tmp_path / "big.mrk.json"
    path.write_text('{"markups": [{"type": "ROI", "size": [5, 5, 5], "center": ' + text + "}]}", encoding="utf-8")
    with pytest.raises(MarkupsError) as caught:
        read_roi_json(path)
    message = str(caught.value)
    assert message.startswith(str(path)) and words in message and len(message) < 400, message
