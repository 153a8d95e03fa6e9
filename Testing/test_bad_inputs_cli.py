"""`probsam` under bad input: one table of cases, each run in-process through `cli.main(argv)`.

Every case asserts: the exit status (2 bad input or settings, 1 failure at run time), exactly one
``probsam: error: ...`` line that names the problem, no traceback, nothing left behind and nothing that
existed before changed or removed (a snapshot of the whole test folder, contents hashed, before and
after). Then the cases that must succeed (far-away boxes are clamped), determinism across slice batches,
and Ctrl-C / SIGTERM at start-up and while writing, in subprocesses paused by the PROBSAM_TEST_PAUSE
hook (no sleeps: the test waits for the "paused at" line on the child's stderr).
"""

import gzip
import hashlib
import json
import os
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from safetensors.torch import save_file

from ProbSAMLib.weights import checkpoints, registry
from ProbSAMLib.app import cli
from ProbSAMLib import errors, save_probsam
from ProbSAMLib.geometry import VolumeGeometry
from ProbSAMLib.io.markups import write_roi_json
from ProbSAMLib.geometry import Box3D
from ProbSAMLib.io.outputdir import MARKER, OutputFolder
from Testing.helpers import diverse_tiny_model, snapshot, write_dicom_series

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[1]
BOX = ["--box", "14,16,3,29,31,9", "--box-space", "ijk"]


def write_ct(path, size=(48, 48, 12)):
    geometry = VolumeGeometry(size, (-20.0, 15.0, -40.0), (0.8, 0.7, 2.5), np.eye(3))
    values = np.random.default_rng(0).normal(-800, 40, geometry.shape)
    values[4:9, 18:30, 16:28] = 20.0
    image = geometry.apply_to(sitk.GetImageFromArray(values.astype(np.int16)))
    sitk.WriteImage(image, str(path), useCompression=True)
    return path


def weights_with_config(model, path, **changes):
    """A ProbSAM safetensors file whose stored config has ``changes`` (wrong types, zero sizes...)."""
    config = json.loads(model.config.to_json())
    config.update(changes)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path), metadata={"format": checkpoints.FORMAT, "config": json.dumps(config),
                                          "contents": "full", "extra": "{}"})
    return path


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli_model")
    model = diverse_tiny_model()
    save_probsam(model, root / "tiny.safetensors")
    return root / "tiny.safetensors", model


def make_world(root: Path, model_path: Path, model) -> dict:
    """The files the cases use, all under ``root`` (so the snapshot sees any change)."""
    inputs = root / "inputs"
    inputs.mkdir()
    ct = write_ct(inputs / "ct.nrrd")
    w = {"root": root, "ct": ct, "inputs": inputs, "model": model_path}
    # integrity
    sitk.WriteImage(sitk.ReadImage(str(ct)), str(inputs / "ct.nii.gz"), useCompression=True)
    whole = (inputs / "ct.nii.gz").read_bytes()
    (inputs / "cut.nii.gz").write_bytes(whole[:len(whole) // 2])
    whole = ct.read_bytes()
    (inputs / "cut.nrrd").write_bytes(whole[:len(whole) // 2])
    (inputs / "empty.nrrd").write_bytes(b"")
    sitk.WriteImage(sitk.ReadImage(str(ct)), str(inputs / "ct.mha"), useCompression=True)
    whole = (inputs / "ct.mha").read_bytes()
    (inputs / "cut.mha").write_bytes(whole[:len(whole) // 2])
    header = (b"NRRD0004\ntype: short\ndimension: 3\nspace: left-posterior-superior\nsizes: 8 8 4\n"
              b"space directions: (1,0,0) (1,0,0) (0,0,1)\nkinds: domain domain domain\nendian: little\n"
              b"encoding: raw\nspace origin: (0,0,0)\n\n")
    voxels = np.full((4, 8, 8), -800, np.int16).tobytes()
    (inputs / "singular.nrrd").write_bytes(header + voxels)
    (inputs / "zero_spacing.nrrd").write_bytes(header.replace(b"(1,0,0) (1,0,0)", b"(1,0,0) (0,0,0)") + voxels)
    (inputs / "notes.nrrd").write_text("this is not an image")
    sitk.WriteImage(sitk.Image([32, 32], sitk.sitkInt16), str(inputs / "flat.nrrd"))
    sitk.WriteImage(sitk.Image([8, 8, 4, 3], sitk.sitkInt16), str(inputs / "time.nrrd"))
    nan = np.full((12, 48, 48), -800, np.float32)
    nan[5, 20, 20] = np.nan
    sitk.WriteImage(sitk.GetImageFromArray(nan), str(inputs / "nan.nrrd"))
    for name, keep in (("gap", [0, 1, 2, 4, 5]), ("dup", [0, 1, 1, 2, 3])):
        folder = inputs / name
        folder.mkdir()
        series = np.full((6, 20, 20), -800)
        write_dicom_series(folder, series, f"1.2.3.{len(name)}", "s")
        files = sorted(folder.iterdir())
        for n, f in enumerate(files):  # drop a slice / repeat a position
            if n not in keep:
                f.unlink()
        if name == "dup":
            data = files[2].read_bytes()
            files[1].write_bytes(data.replace(b"1.2.3.3.3", b"1.2.3.3.9"))
    # damaged files that still decode: a NIfTI cut short, plain and as a complete gzip of the cut file
    sitk.WriteImage(sitk.ReadImage(str(ct)), str(inputs / "ct.nii"))
    whole = (inputs / "ct.nii").read_bytes()
    (inputs / "cut.nii").write_bytes(whole[:len(whole) * 2 // 3])
    (inputs / "cut_then_zipped.nii.gz").write_bytes(gzip.compress(whole[:len(whole) * 2 // 3]))
    # a series with one odd slice carrying the series' UID: rotated in-plane, coronal, another pixel size
    for name, tag, value in (("rotated", "0020|0037", "0\\1\\0\\-1\\0\\0"),
                             ("coronal", "0020|0037", "1\\0\\0\\0\\0\\-1"), ("finer", "0028|0030", "0.5\\0.5")):
        folder = inputs / name
        folder.mkdir()
        write_dicom_series(folder, np.full((6, 20, 20), -800), "1.2.3.77", "s")
        odd = sitk.ReadImage(str(folder / "s003.dcm"))
        odd.SetMetaData(tag, value)
        if tag == "0028|0030":  # the writer takes the pixel spacing from the image, not the tag
            odd.SetSpacing((0.5, 0.5, 2.5))
        writer = sitk.ImageFileWriter()
        writer.KeepOriginalImageUIDOn()
        writer.SetFileName(str(folder / "s003.dcm"))
        writer.Execute(odd)
    (inputs / "nodicom").mkdir()
    (inputs / "nodicom" / "readme.txt").write_text("no images here")
    # markups
    roi = lambda **kw: {"markups": [dict({"type": "ROI", "center": [0, 0, 0], "size": [5, 5, 5]}, **kw)]}  # noqa: E731
    markups = {"center_text": roi(center="abc"), "negative": roi(size=[-1, 5, 5]),
               "units_dict": roi(coordinateUnits={"mm": 1}), "system_number": roi(coordinateSystem=5),
               "inside_out_text": roi(insideOut="yes"), "no_list": {"markups": {"type": "ROI"}},
               "points": {"markups": [{"type": "Fiducial", "name": "F"}]},
               "two": {"markups": roi()["markups"] * 2}, "orientation_short": roi(orientation=[1, 0, 0])}
    markups["huge_number"] = roi(center=[int("9" * 400), 0, 0])
    for name, document in markups.items():
        (inputs / f"{name}.mrk.json").write_text(json.dumps(document))
    (inputs / "broken.mrk.json").write_text("{not json")
    geometry = VolumeGeometry.from_sitk(sitk.ReadImage(str(ct)))
    centre = geometry.index_to_physical([21, 23, 6])
    write_roi_json(Box3D(centre, [10, 10, 10]), inputs / "good.mrk.json")
    write_roi_json(Box3D(centre + 500, [10, 10, 10]), inputs / "outside.mrk.json")
    # weights
    weights = root / "weights"
    weights.mkdir()
    weights_with_config(model, weights / "zero_patch.safetensors", patch_size=0)
    weights_with_config(model, weights / "text_size.safetensors", img_size="abc")
    weights_with_config(model, weights / "bool_window.safetensors", window=True)
    weights_with_config(model, weights / "other_latent.safetensors", latent_dim=3)
    save_file({"x": torch.zeros(2)}, str(weights / "foreign.safetensors"), metadata={"format": "other"})
    (weights / "truncated.safetensors").write_bytes(model_path.read_bytes()[:5000])
    (weights / "fake_sam.pth").write_bytes(b"not the official weights")
    # folders --force must never replace
    user = root / "user_folder"
    user.mkdir()
    (user / "notes.txt").write_text("mine")
    os.symlink(inputs, root / "link_to_inputs")
    (root / "home").mkdir()
    (root / "home" / "thesis.txt").write_text("years of work")
    (root / "work").mkdir()
    (root / "work" / "script.py").write_text("print('mine')")
    done = root / "done"  # an earlier probsam output (with the marker)
    done.mkdir()
    (done / MARKER).write_text("")
    (done / "summary.json").write_text("{}")
    return w


def cases(w: dict) -> dict:
    """name -> (argv, exit status, words the error line must contain)."""
    ct, inputs, root, m = w["ct"], w["inputs"], w["root"], w["model"]
    model = ["--model", "file", "--checkpoint", m]
    out = root / "out"

    def sample(*args, out_dir=out, with_model=True):
        return ["sample", *args, "--out", out_dir] + (model if with_model else [])

    weights = root / "weights"

    def sample_with_weights(name):  # a ProbSAM file given as --model file --checkpoint
        return sample(ct, *BOX, with_model=False) + ["--model", "file", "--checkpoint", weights / name]

    return {
        # --- data loss: --force never replaces these
        "force: working folder": (sample(ct, *BOX, "--force", out_dir=root / "work"), 2, "working folder"),
        "force: above working folder": (sample(ct, *BOX, "--force", out_dir=root), 2, "working folder"),
        "force: the input's folder": (sample(ct, *BOX, "--force", out_dir=inputs), 2, "holds the input"),
        "force: folder above the input": (sample(inputs / "gap", "--box", "2,2,0,9,9,3", "--box-space", "ijk",
                                                 "--force", out_dir=inputs), 2, "holds the input"),
        "force: link to the input's folder": (sample(ct, *BOX, "--force", out_dir=root / "link_to_inputs"), 2,
                                              "holds the input"),
        "force: folder of the ROI file": (["sample", ct, "--roi", w["roi_elsewhere"], "--force", "--out",
                                           w["roi_elsewhere"].parent] + model, 2, "holds the input"),
        "force: folder of the checkpoint": (sample(ct, *BOX, "--force", out_dir=m.parent), 2, "holds the input"),
        "force: home": (sample(ct, *BOX, "--force", out_dir=root / "home"), 2, "home folder"),
        "force: /": (sample(ct, *BOX, "--force", out_dir=Path("/")), 2, "is /"),
        "force: a folder probsam did not write": (sample(ct, *BOX, "--force", out_dir=root / "user_folder"), 2,
                                                  "not written by ProbSAM"),
        "out is the input file": (sample(ct, *BOX, "--force", out_dir=ct), 2, "is not a folder"),
        "out exists, no --force": (sample(ct, *BOX, out_dir=root / "done"), 2, "already exists"),
        "fetch over the bundled heads": (["fetch", "lite_medsam_heads", "--from", m], 2, "bundled"),
        "fetch the bundled heads": (["fetch", "lite_medsam_heads"], 2, "bundled"),
        # --- integrity: silent wrong results refused
        "truncated .nii.gz": (sample(inputs / "cut.nii.gz", *BOX), 2, "does not decode completely"),
        "truncated .nrrd": (sample(inputs / "cut.nrrd", *BOX), 2, "cannot read"),
        "empty file": (sample(inputs / "empty.nrrd", *BOX), 2, "cannot read"),
        "truncated .mha": (sample(inputs / "cut.mha", *BOX), 2, "cannot read"),
        "singular direction matrix": (sample(inputs / "singular.nrrd", *BOX), 2, "direction matrix is singular"),
        "zero voxel spacing": (sample(inputs / "zero_spacing.nrrd", *BOX), 2, "zero or negative voxel spacing"),
        "DICOM with a missing slice": (sample(inputs / "gap", "--box", "2,2,0,9,9,3", "--box-space", "ijk"), 2,
                                       "missing slices or uneven"),
        "DICOM with a repeated position": (sample(inputs / "dup", "--box", "2,2,0,9,9,3", "--box-space", "ijk"),
                                           2, "missing slices or uneven"),
        "folder without DICOM": (sample(inputs / "nodicom", *BOX), 2, "no DICOM series"),
        "not an image": (sample(inputs / "notes.nrrd", *BOX), 2, "cannot read"),
        "2D image": (sample(inputs / "flat.nrrd", *BOX), 2, "2D image"),
        "4D image": (sample(inputs / "time.nrrd", *BOX), 2, "4D image"),
        "NaN voxels": (sample(inputs / "nan.nrrd", *BOX), 2, "non-finite"),
        "missing input": (sample(inputs / "nope.nrrd", *BOX), 2, "not found"),
        "--series-uid on a file": (sample(ct, *BOX, "--series-uid", "1.2"), 2, "only to a DICOM folder"),
        "truncated .nii": (sample(inputs / "cut.nii", *BOX), 2, "header promises 55648 bytes"),
        "gzip of a truncated .nii": (sample(inputs / "cut_then_zipped.nii.gz", *BOX), 2, "once decompressed"),
        "DICOM slice rotated in-plane": (sample(inputs / "rotated", "--box", "2,2,0,9,9,3", "--box-space", "ijk"), 2,
                                         "s003.dcm has ImageOrientationPatient (0020,0037) 0\\1\\0\\-1\\0\\0"),
        "DICOM coronal slice in an axial series": (sample(inputs / "coronal", "--box", "2,2,0,9,9,3", "--box-space",
                                                          "ijk"), 2, "s003.dcm has ImageOrientationPatient"),
        "DICOM slice of another pixel spacing": (sample(inputs / "finer", "--box", "2,2,0,9,9,3", "--box-space",
                                                        "ijk"), 2, "s003.dcm has PixelSpacing (0028,0030) 0.5\\0.5"),
        # --- boxes
        "box outside": (sample(ct, "--box", "100,100,3,120,120,9", "--box-space", "ijk"), 2, "outside the volume"),
        "box outside (mm)": (sample(ct, "--box", "500,500,500,510,510,510"), 2, "outside the volume"),
        "box NaN": (sample(ct, "--box", "nan,0,0,1,1,1"), 2, "6 finite numbers"),
        "box infinite": (sample(ct, "--box", "-inf,0,0,1,1,1"), 2, "6 finite numbers"),
        "box of text": (sample(ct, "--box", "a,b,c,d,e,f"), 2, "6 numbers"),
        "five numbers": (sample(ct, "--box", "1,2,3,4,5", "--box-space", "ijk"), 2, "6 finite numbers"),
        "fractional voxel index": (sample(ct, "--box", "1.5,2,3,20,20,8", "--box-space", "ijk"), 2, "integers"),
        "box too thin": (sample(ct, "--box", "14,16,3,14,31,9", "--box-space", "ijk"), 2, "1 x 16 voxels"),
        "box: a 400-digit number": (sample(ct, "--box", "1,2,3,4,5," + "9" * 400), 2, "--box: box must be 6 finite"),
        "box given twice": (sample(ct, *BOX, "--box", "1,1,1,5,5,5"), 2, "--box given twice"),
        "--box-space with --roi": (sample(ct, "--roi", inputs / "good.mrk.json", "--box-space", "lps"), 2,
                                   "--box-space applies to --box only"),
        "box outside (named)": (sample(ct, "--box", "500,500,500,510,510,510"), 2, "--box (--box-space ras): the box"),
        # --- markups
        "ROI centre is text": (sample(ct, "--roi", inputs / "center_text.mrk.json"), 2, "'center' must be 3"),
        "ROI negative size": (sample(ct, "--roi", inputs / "negative.mrk.json"), 2, "negative ROI size"),
        "ROI units a dict": (sample(ct, "--roi", inputs / "units_dict.mrk.json"), 2, "coordinateUnits"),
        "ROI system a number": (sample(ct, "--roi", inputs / "system_number.mrk.json"), 2, "coordinateSystem"),
        "ROI insideOut text": (sample(ct, "--roi", inputs / "inside_out_text.mrk.json"), 2, "insideOut"),
        "ROI orientation short": (sample(ct, "--roi", inputs / "orientation_short.mrk.json"), 2, "9 finite"),
        "markups not a list": (sample(ct, "--roi", inputs / "no_list.mrk.json"), 2, "no 'markups' list"),
        "markups not JSON": (sample(ct, "--roi", inputs / "broken.mrk.json"), 2, "not a JSON file"),
        "no ROI in markups": (sample(ct, "--roi", inputs / "points.mrk.json"), 2, "no ROI markup"),
        "two ROIs, no index": (sample(ct, "--roi", inputs / "two.mrk.json"), 2, "choose one by its index"),
        "ROI index too large": (sample(ct, "--roi", inputs / "two.mrk.json", "--roi-index", "5"), 2, "out of range"),
        "ROI index negative": (sample(ct, "--roi", inputs / "two.mrk.json", "--roi-index", "-1"), 2, "out of range"),
        "ROI index with --box": (sample(ct, *BOX, "--roi-index", "0"), 2, "--roi-index applies to --roi"),
        "markups file missing": (sample(ct, "--roi", inputs / "none.mrk.json"), 2, "not found"),
        "ROI: a 400-digit number": (sample(ct, "--roi", inputs / "huge_number.mrk.json"), 2,
                                    "huge_number.mrk.json (ROI 0 ''): 'center' must be 3 finite numbers"),
        "ROI outside the volume": (sample(ct, "--roi", inputs / "outside.mrk.json"), 2,
                                   "outside.mrk.json: the box lies outside the volume"),
        # --- weights
        "weights: zero patch size": (sample_with_weights("zero_patch.safetensors"), 2, "patch_size = 0"),
        "weights: size is text": (sample_with_weights("text_size.safetensors"), 2, "img_size = 'abc'"),
        "weights: window a bool": (sample_with_weights("bool_window.safetensors"), 2, "window = True"),
        "weights: another model's tensors": (sample_with_weights("other_latent.safetensors"), 2, "does not fit this model"),
        "weights: foreign safetensors": (sample_with_weights("foreign.safetensors"), 2, "not a ProbSAM checkpoint"),
        "weights: truncated": (sample_with_weights("truncated.safetensors"), 2, "truncated or corrupt"),
        "weights: missing file": (sample_with_weights("none.safetensors"), 2, "no such file"),
        "weights: SAM checksum": (sample(ct, *BOX, with_model=False) + ["--model", "vit_b", "--sam-checkpoint",
                                  weights / "fake_sam.pth"], 2, "does not match the expected"),
        "weights: offline, not cached": (sample(ct, *BOX, with_model=False) + ["--model", "vit_b", "--offline"], 2,
                                         "not available offline"),
        "unknown model": (sample(ct, *BOX, with_model=False) + ["--model", "vit_z"], 2, "unknown model 'vit_z'"),
        "--sam-checkpoint with a full model": (sample(ct, *BOX) + ["--sam-checkpoint", weights / "fake_sam.pth"], 2,
                                               "--sam-checkpoint does not apply"),
        "--checkpoint: a full model for lite_medsam": (sample(ct, *BOX, with_model=False) + ["--checkpoint", m], 2,
                                                       "but --model lite_medsam takes only ProbSAM heads"),
        "--checkpoint: a .pth for lite_medsam": (sample(ct, *BOX, with_model=False) + ["--checkpoint",
                                                 weights / "fake_sam.pth"], 2, "for --model lite_medsam --checkpoint"),
        "--model file without checkpoint": (sample(ct, *BOX, with_model=False) + ["--model", "file"], 2,
                                            "needs --checkpoint"),
        # --- settings and limits
        "no samples": (sample(ct, *BOX, "--samples", "0"), 2, "--samples must be 1..1000, got 0"),
        "negative samples": (sample(ct, *BOX, "--samples", "-3"), 2, "--samples must be 1..1000"),
        "a typo's number of samples": (sample(ct, *BOX, "--samples", "100000000"), 2, "--samples must be 1..1000"),
        "a 400-digit number of samples": (sample(ct, *BOX, "--samples", "1" + "0" * 400), 2,
                                          "--samples must be 1..1000, got 1000"),
        "slice batch 0": (sample(ct, *BOX, "--slice-batch", "0"), 2, "--slice-batch must be"),
        "negative seed": (sample(ct, *BOX, "--seed", "-1"), 2, "--seed must be"),
        "unknown device": (sample(ct, *BOX, "--device", "tpu"), 2, "unknown device 'tpu'"),
        "cuda:x": (sample(ct, *BOX, "--device", "cuda:x"), 2, "unknown device"),
        "demo nodule out of range": (["demo", "--nodule", "99", "--out", out] + model, 2, "--nodule must be"),
    }


@pytest.fixture
def world(tmp_path, model_file, monkeypatch):
    w = make_world(tmp_path, *model_file)
    elsewhere = tmp_path / "rois"
    elsewhere.mkdir()
    (elsewhere / "good.mrk.json").write_bytes((w["inputs"] / "good.mrk.json").read_bytes())
    w["roi_elsewhere"] = elsewhere / "good.mrk.json"
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("PROBSAM_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path / "work")
    return w


def check_fails_cleanly(name, argv, status, words, root, capsys):
    before = snapshot(root)
    bundled = checkpoints.entry_path(registry.MANIFEST["lite_medsam_heads"])
    bundled_hash = hashlib.sha256(bundled.read_bytes()).hexdigest() if bundled.is_file() else None
    code = cli.main([str(a) for a in argv] + ["--quiet"] * (argv[0] in ("sample", "demo")))
    err = capsys.readouterr().err
    error_lines = [line for line in err.splitlines() if "error:" in line]
    assert code == status, (name, code, err)
    assert len(error_lines) == 1 and error_lines[0].startswith("probsam: error: "), (name, err)
    assert words in error_lines[0], (name, err)
    assert "Traceback" not in err, (name, err)
    assert snapshot(root) == before, name  # nothing new, nothing changed, nothing removed
    if bundled_hash:
        assert hashlib.sha256(bundled.read_bytes()).hexdigest() == bundled_hash, name


def test_every_bad_input_fails_cleanly_and_touches_nothing(world, capsys):
    table = cases(world)
    assert len(table) >= 40
    skipped = []
    for name, (argv, status, words) in table.items():
        if name == "cuda:x" and torch.cuda.is_available():
            skipped.append(name)
            continue
        check_fails_cleanly(name, argv, status, words, world["root"], capsys)
    assert not skipped or torch.cuda.is_available()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_a_gpu_is_a_usage_error(world, capsys):
    argv = ["sample", world["ct"], *BOX, "--out", world["root"] / "out", "--device", "cuda",
            "--model", "file", "--checkpoint", world["model"]]
    check_fails_cleanly("cuda", argv, 2, "CUDA was requested", world["root"], capsys)


def test_bundled_model_with_a_flipped_bit_is_refused(world, capsys, monkeypatch):
    for entry in registry.MANIFEST.values():  # every bundled file's manifest line is current
        if entry.bundled:
            path = checkpoints.entry_path(entry)
            assert (checkpoints.sha256_file(path), path.stat().st_size) == (entry.sha256, entry.size), entry.name
    from ProbSAMLib.weights.registry import DEFAULT_MODEL, model_entry
    bundled = checkpoints.entry_path(model_entry(DEFAULT_MODEL).heads)  # what `sample` loads from the package
    copy = world["root"] / "package_models"
    copy.mkdir()
    data = bytearray(bundled.read_bytes())
    data[len(data) // 2] ^= 0x01
    (copy / bundled.name).write_bytes(bytes(data))
    monkeypatch.setattr(checkpoints, "PACKAGE_MODELS", copy)
    check_fails_cleanly("bit flip", ["sample", world["ct"], *BOX, "--out", world["root"] / "out"], 2,
                        "does not match the expected", world["root"], capsys)


def test_offline_environment_variable_reads_yes_and_no(monkeypatch):
    for value, expected in (("1", True), ("yes", True), ("0", False), ("false", False), ("", False)):
        monkeypatch.setenv("PROBSAM_OFFLINE", value)
        assert errors.env_flag("PROBSAM_OFFLINE") is expected, value
    monkeypatch.setenv("PROBSAM_OFFLINE", "maybe")
    with pytest.raises(errors.SettingsError, match="PROBSAM_OFFLINE"):
        errors.env_flag("PROBSAM_OFFLINE")


def test_offline_variable_that_is_not_yes_or_no_is_a_usage_error(world, capsys, monkeypatch):
    monkeypatch.setenv("PROBSAM_OFFLINE", "maybe")
    check_fails_cleanly("PROBSAM_OFFLINE=maybe", ["sample", world["ct"], *BOX, "--out", world["root"] / "out",
                                                  "--model", "file", "--checkpoint", world["model"]],
                        2, "PROBSAM_OFFLINE='maybe'", world["root"], capsys)


def test_values_that_are_not_hounsfield_units_are_warned_about(tmp_path):
    from ProbSAMLib.io.imageio import IntensityWarning, read_volume

    mr = np.random.default_rng(0).uniform(0, 1200, (6, 20, 20)).astype(np.int16)
    sitk.WriteImage(sitk.GetImageFromArray(mr), str(tmp_path / "mr.nrrd"))
    with pytest.warns(IntensityWarning, match=r"span 0\.\.11\d\d.*does not look like CT"):
        read_volume(tmp_path / "mr.nrrd")
    ct = np.random.default_rng(0).uniform(-1000, 400, (6, 20, 20)).astype(np.int16)
    sitk.WriteImage(sitk.GetImageFromArray(ct), str(tmp_path / "ct.nrrd"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        read_volume(tmp_path / "ct.nrrd")  # real HU: no warning


# --- what is clamped, not refused --------------------------------------------------------------------------
@pytest.mark.parametrize("box, space", [("-1e20,-1e20,-1e20,1e20,1e20,1e20", "ras"),
                                        ("-1e20,-1e20,-1e20,1e20,1e20,1e20", "ijk")])
def test_a_box_far_past_the_volume_is_clamped(world, capsys, box, space):
    out = world["root"] / "clamped"
    assert cli.main(["sample", str(world["ct"]), f"--box={box}", "--box-space", space, "--samples", "2",
                     "--out", str(out), "--model", "file", "--checkpoint", str(world["model"]), "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "clamped to it" in err and "e+" not in err and len(err) < 600
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    assert summary["box"]["ijk_first"] == [0, 0, 0] and summary["box"]["ijk_last"] == [47, 47, 11]


def test_same_seed_gives_identical_files_whatever_the_slice_batch(world):
    outputs = []
    for batch in ("1", "3", "8"):
        out = world["root"] / f"batch{batch}"
        assert cli.main(["sample", str(world["ct"]), *BOX, "--samples", "3", "--seed", "5", "--slice-batch", batch,
                         "--out", str(out), "--model", "file", "--checkpoint", str(world["model"]), "--quiet"]) == 0
        outputs.append(out)
    for path in outputs[0].iterdir():
        if path.suffix == ".nrrd":
            for other in outputs[1:]:
                assert path.read_bytes() == (other / path.name).read_bytes(), (path.name, other.name)


# --- the output writer ------------------------------------------------------------------------------------
def test_replacing_keeps_the_old_output_until_the_new_one_is_complete(tmp_path):
    out = tmp_path / "run"
    with OutputFolder(out) as tmp:
        (tmp / "a.txt").write_text("first")
    with pytest.raises(RuntimeError):
        with OutputFolder(out, force=True) as tmp:
            (tmp / "b.txt").write_text("half")
            raise RuntimeError("failed while writing")
    assert (out / "a.txt").read_text(encoding="utf-8") == "first" and not (out / "b.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_stale_temporary_folders_of_killed_runs_are_removed(tmp_path):
    out = tmp_path / "run"
    dead = 2 ** 22 + 12345  # above Linux's default pid_max: no such process
    stale = tmp_path / f".run.tmp-{dead}"
    stale.mkdir()
    (stale / MARKER).write_text("")
    orphan = tmp_path / f".run.old-{dead}"  # killed between the two renames of a --force replacement
    orphan.mkdir()
    (orphan / MARKER).write_text("")
    (orphan / "summary.json").write_text("previous")
    foreign = tmp_path / f".run.tmp-{dead + 1}"  # not ours (no marker): left alone
    foreign.mkdir()
    with pytest.raises(errors.OutputRefusedError, match="already exists"):
        with OutputFolder(out):  # the orphan was put back as `run`, which now exists
            pass
    assert (out / "summary.json").read_text(encoding="utf-8") == "previous" and not stale.exists() and foreign.exists()


# --- signals: start-up and while writing ---------------------------------------------------------------
def _default_sigint():
    # A child of a background job inherits "SIGINT ignored", and Python then leaves it ignored; a user's
    # terminal never does that, so give the child the default disposition (Python's KeyboardInterrupt).
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start_paused(argv, point, tmp_path):
    env = dict(os.environ, PROBSAM_TEST_PAUSE=point, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1",
               PROBSAM_CACHE=str(tmp_path / "cache"))
    child = subprocess.Popen([sys.executable, "-m", "ProbSAMLib.app.cli", *map(str, argv)], cwd=tmp_path, env=env,
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             encoding="utf-8", preexec_fn=_default_sigint)
    lines = []
    for line in child.stderr:  # blocks until the child reaches the pause point: no sleeps
        lines.append(line)
        if line.strip() == f"paused at {point}":
            return child, lines
    child.wait()
    raise AssertionError("the child never paused: " + "".join(lines))


@pytest.mark.parametrize("sig, status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_at_start_up_is_one_line(world, tmp_path, sig, status):
    """Paused before torch is imported (the slow part of start-up), in a real child process."""
    out = tmp_path / "signal_out"
    before = snapshot(tmp_path)
    child, _ = start_paused(["sample", world["ct"], *BOX, "--out", out], "startup", tmp_path)
    child.send_signal(sig)
    _, err = child.communicate(timeout=120)
    assert child.returncode == status, err
    assert "Traceback" not in err and "nothing was written" in err and len(err.strip().splitlines()) == 1, err
    assert snapshot(tmp_path) == before


def signal_self_at(point, sig, monkeypatch):
    """The pause hook, in-process: at ``point`` the process sends itself ``sig`` (as `kill` would)."""
    def deliver(name, stream=None):
        if name == point:
            os.kill(os.getpid(), sig)

    monkeypatch.setattr(errors, "pause_point", deliver)


@pytest.mark.parametrize("replace", [False, True])
def test_sigterm_while_writing_leaves_nothing_behind(world, tmp_path, capsys, monkeypatch, replace):
    out = tmp_path / "signal_out"
    argv = ["sample", str(world["ct"]), *BOX, "--samples", "2", "--out", str(out), "--model", "file",
            "--checkpoint", str(world["model"]), "--quiet"]
    if replace:  # --force over an earlier output: the earlier one must survive untouched
        assert cli.main(argv) == 0
        (out / "earlier.txt").write_text("kept")
        argv.append("--force")
    before = snapshot(tmp_path)
    signal_self_at("writing", signal.SIGTERM, monkeypatch)
    assert cli.main(argv) == 143
    err = capsys.readouterr().err
    assert err.strip() == "probsam: terminated; nothing was written", err
    assert snapshot(tmp_path) == before
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # the handler is put back


def test_run_main_is_the_one_ending_of_every_entry_point(capsys, monkeypatch):
    """errors.run_main: main's own status, else one line and the status of the error's type; an interrupted
    run says "nothing was written" only when asked; the on_failure clean-ups run on failure only."""
    monkeypatch.delenv("PROBSAM_DEBUG", raising=False)
    assert errors.run_main("tool", lambda: 0) == 0 and errors.run_main("tool", lambda: 3) == 3

    def fail(error):
        def main():
            raise error
        return main

    cleaned = []
    errors.on_failure(lambda: cleaned.append("success"))
    assert errors.run_main("tool", lambda: 0) == 0
    errors.on_failure(lambda: cleaned.append("failure"))
    assert errors.run_main("tool", fail(errors.InputError("no such file: x.nrrd"))) == 2
    assert cleaned == ["failure"]  # a succeeded run's clean-ups are dropped, a failed one's run
    assert capsys.readouterr().err == "tool: error: no such file: x.nrrd\n"
    assert errors.run_main("tool", fail(RuntimeError("boom\nsecond line"))) == 1
    assert capsys.readouterr().err == "tool: error: boom second line\n"
    assert errors.run_main("tool", fail(KeyboardInterrupt())) == 130
    assert capsys.readouterr().err == "tool: interrupted; nothing was written\n"
    assert errors.run_main("tool", fail(errors.Terminated()), nothing_written=False) == 143
    assert capsys.readouterr().err == "tool: terminated\n"
    monkeypatch.setenv("PROBSAM_DEBUG", "1")
    with pytest.raises(RuntimeError, match="boom"):
        errors.run_main("tool", fail(RuntimeError("boom")))


def test_a_killed_run_leaves_a_temporary_folder_that_the_next_run_removes(world, tmp_path):
    out = tmp_path / "killed_out"
    argv = ["sample", world["ct"], *BOX, "--samples", "2", "--out", out, "--model", "file", "--checkpoint",
            world["model"], "--quiet"]
    child, _ = start_paused(argv, "writing", tmp_path)
    child.kill()  # SIGKILL: nothing can clean up
    child.communicate(timeout=60)
    leftovers = list(tmp_path.glob(".killed_out.tmp-*"))
    assert len(leftovers) == 1 and not out.exists()
    assert cli.main([str(a) for a in argv]) == 0
    assert not list(tmp_path.glob(".killed_out.tmp-*")) and (out / "summary.json").is_file()


def test_gzip_check_reads_a_whole_file(tmp_path):
    from ProbSAMLib.io.imageio import VolumeReadError, _check_complete_gzip

    path = tmp_path / "x.gz"
    path.write_bytes(gzip.compress(b"x" * 100000))
    _check_complete_gzip(path)  # complete: no error
    path.write_bytes(gzip.compress(b"x" * 100000)[:-8])  # only the trailer missing
    with pytest.raises(VolumeReadError, match="does not decode completely"):
        _check_complete_gzip(path)


def test_a_full_disk_is_named_not_dumped(world, capsys, monkeypatch):
    """ITK reports ENOSPC as a multi-line exception; the CLI says "no space left" and exits 1 (run time)."""
    def full_disk(image, path, *args, **kwargs):
        raise RuntimeError(f"Exception thrown in SimpleITK ImageFileWriter_Execute: itkNrrdImageIO.cxx:1092:\n"
                           f"ITK ERROR: NrrdImageIO(0x55): Write: Error writing {path}:\n"
                           f"[nrrd] nrrdSave: No space left on device\n")

    monkeypatch.setattr(sitk, "WriteImage", full_disk)
    before = snapshot(world["root"])
    code = cli.main(["demo", "--out", str(world["root"] / "out"), "--samples", "2", "--quiet", "--model", "file",
                     "--checkpoint", str(world["model"])])
    err = capsys.readouterr().err
    assert code == 1 and err.startswith("probsam: error: no space left on device while writing"), err
    assert len(err.strip().splitlines()) == 1 and "ITK" not in err
    assert snapshot(world["root"]) == before


def test_itk_native_messages_of_a_failed_read_are_not_printed(tmp_path):
    """ITK's MetaImage reader writes 'data not read completely' straight to file descriptor 2 before it
    raises; only our one error line may reach the user (a child process: capsys cannot see fd 2)."""
    write_ct(tmp_path / "ct.mha")
    whole = (tmp_path / "ct.mha").read_bytes()
    (tmp_path / "cut.mha").write_bytes(whole[:len(whole) // 2])
    code = ("import sys; from ProbSAMLib.io.imageio import read_volume\n"
            "try:\n    read_volume(sys.argv[1])\nexcept ValueError as e:\n    print('error:', e, file=sys.stderr)")
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path / "cut.mha")], capture_output=True, text=True,
                          encoding="utf-8", env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=120)
    assert done.stderr.startswith("error: cannot read") and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "MetaImage" not in done.stderr


# --- wrong numbers and raw warnings (issue 36) ------------------------------------------------------------
def test_a_sheared_grid_reports_the_true_volume_and_one_warning_line_each(world, capsys):
    """A sheared grid (i and j at 73.3°): volumes from |det(direction · diag(spacing))|, not the product of the
    spacings (4.4 % too large here); a NIfTI whose sform ITK distrusts: ITK's multi-line block is one line."""
    direction = np.array([[1.0, 0.3, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    direction[:, 1] /= np.linalg.norm(direction[:, 1])
    image = sitk.ReadImage(str(world["ct"]))
    image.SetDirection(direction.ravel().tolist())
    sitk.WriteImage(image, str(world["inputs"] / "sheared.nrrd"))
    sitk.WriteImage(sitk.ReadImage(str(world["ct"])), str(world["inputs"] / "odd_sform.nii"))
    data = bytearray((world["inputs"] / "odd_sform.nii").read_bytes())
    data[280:328] = np.array([-0.8, 0.3, 0, 20, 0, -0.7, 0, -15, 0, 0, 2.5, -40], "<f4").tobytes()
    (world["inputs"] / "odd_sform.nii").write_bytes(bytes(data))
    for name, words in (("sheared.nrrd", "the voxel grid is sheared (angle between index axes i-j 73.30°"),
                        ("odd_sform.nii", "odd_sform.nii: NiftiImageIO: ")):
        out = world["root"] / name.replace(".", "_")
        assert cli.main(["sample", str(world["inputs"] / name), *BOX, "--samples", "2", "--out", str(out), "--model",
                         "file", "--checkpoint", str(world["model"]), "--quiet"]) == 0
        err = capsys.readouterr().err
        warned = [line for line in err.splitlines() if line.startswith("probsam: warning: ")]
        assert len(warned) == 1 and words in warned[0] and err.count("\n") == 1 and "WARNING: In" not in err, err
    summary = json.loads((world["root"] / "sheared_nrrd" / "summary.json").read_text(encoding="utf-8"))
    voxel = 0.8 * 0.7 * 2.5 * np.linalg.det(direction)
    geometry = summary["geometry"]
    assert geometry["voxel_volume_mm3"] == pytest.approx(voxel) and "sheared" in geometry["warning"]
    for sample in summary["samples"]:
        assert sample["voxels"] > 0 and sample["volume_mm3"] == pytest.approx(sample["voxels"] * voxel)


def test_samples_that_cannot_fit_are_refused_before_any_work(model_file, monkeypatch):
    """Within the option's range, the memory estimate decides: a run that would not fit says what to change."""
    from ProbSAMLib.geometry import VoxelBox
    from ProbSAMLib.inference import volume

    monkeypatch.setattr(volume, "host_available_bytes", lambda: 2 ** 20)  # a machine with 1 MiB free
    with pytest.raises(errors.SettingsError, match=r"^1000 samples on a box of 15 x 15 x 6 voxels need about .* "
                                                   r"use fewer samples \(about \d+ fit\) or a smaller box"):
        volume.check_fits(model_file[1], 1000, VoxelBox((14, 16, 3), (29, 31, 9)))
