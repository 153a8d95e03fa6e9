"""Issue 36's fuzz: every class of bad input it names, run as a user would — real subprocesses of `probsam`
and the Training scripts, stderr redirected to a file, some under LC_ALL=C — and each result sorted into

    loss  a file or folder that existed before was changed or removed (the worst outcome)
    bad   success on invalid input, a wrong number, a crash (signal, traceback), a wrong exit status, or
          an error message that does not name the file, field, option or slice
    weak  the right outcome, but noise: more than one line on stderr for one error, a temporary folder
          left behind
    good  everything else

    python research/tools/fuzz_bad_inputs.py [--only SUBSTRING] [--out research/results/fuzz_round3.md]

The Slicer worker's faults are not here: they need a scene, and Testing/test_worker_faults.py runs that
table on slicer-core. This script is research, not part of the suite: it takes a few minutes (each case
starts Python and imports torch).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import SimpleITK as sitk

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from ProbSAMLib import save_probsam  # noqa: E402
from ProbSAMLib.geometry import Box3D, VolumeGeometry  # noqa: E402
from ProbSAMLib.io.markups import write_roi_json  # noqa: E402
from Testing.helpers import diverse_tiny_model, snapshot, tiny_dataset, write_dicom_series  # noqa: E402

PROBSAM = [sys.executable, "-m", "ProbSAMLib.app.cli"]
TRAINING = ROOT / "Training"
BOX_IJK = ["--box", "14,16,3,29,31,9", "--box-space", "ijk"]


@dataclass
class Case:
    name: str
    kind: str                      # the class
    argv: list                     # or a shell line (str) when ``shell``
    status: int                    # the exit status a correct program gives
    words: tuple = ()              # each must appear on stderr (file, field, option...)
    protect: tuple = ()            # paths that must come out unchanged
    shell: bool = False
    env: dict = field(default_factory=dict)
    check: Optional[Callable[[subprocess.CompletedProcess], Optional[str]]] = None  # -> what is wrong
    one_line: bool = True          # an error must be one line
    setup: Optional[Callable[[], None]] = None  # run just before the case


# --- the world the cases run in -------------------------------------------------------------------------
def write_ct(path: Path, direction=np.eye(3), dtype=np.int16, size=(48, 48, 12)) -> Path:
    geometry = VolumeGeometry(size, (-20.0, 15.0, -40.0), (0.8, 0.7, 2.5), direction)
    values = np.random.default_rng(0).normal(-800, 40, geometry.shape)
    values[4:9, 18:30, 16:28] = 20.0
    if dtype == np.int8:
        values = np.clip(values / 10, -128, 127)
    image = geometry.apply_to(sitk.GetImageFromArray(values.astype(dtype)))
    sitk.WriteImage(image, str(path), useCompression=path.suffix == ".nrrd")
    return path


def dicom_with_odd_slice(folder: Path, odd: str) -> Path:
    """A 6-slice axial series where slice 3 differs: rotated in-plane, coronal, or another pixel spacing."""
    folder.mkdir(parents=True)
    values = np.random.default_rng(1).normal(-800, 40, (6, 32, 32))
    write_dicom_series(folder, values, uid="1.2.826.0.1.9", prefix="s")
    odd_file = folder / "s003.dcm"
    image = sitk.ReadImage(str(odd_file))
    if odd == "rotated":
        image.SetMetaData("0020|0037", "0.8660254\\0.5\\0\\-0.5\\0.8660254\\0")
    elif odd == "coronal":
        image.SetMetaData("0020|0037", "1\\0\\0\\0\\0\\-1")
    elif odd == "spacing":
        image.SetMetaData("0028|0030", "0.6\\0.6")
        image.SetSpacing((0.6, 0.6, 1.0))
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    writer.SetFileName(str(odd_file))
    writer.Execute(image)
    return odd_file


def nifti_cut(folder: Path) -> tuple:
    whole = folder / "whole.nii"
    write_ct(whole)
    data = whole.read_bytes()
    cut = folder / "cut.nii"
    cut.write_bytes(data[: len(data) - 4000])
    gz = folder / "cut_then_gzipped.nii.gz"
    gz.write_bytes(gzip.compress(data[: len(data) - 4000]))
    write_ct(folder / "pair.hdr")  # a .hdr/.img pair whose .img is cut short
    image = (folder / "pair.img").read_bytes()
    (folder / "pair.img").write_bytes(image[: len(image) // 2])
    return cut, gz


def run_ok(argv, **kwargs) -> None:
    result = subprocess.run(argv, cwd=ROOT, capture_output=True, encoding="utf-8", errors="replace", **kwargs)
    if result.returncode != 0:
        raise RuntimeError(f"setting up the fuzz failed: {argv}\n{result.stderr}")


def make_world(root: Path) -> dict:
    w = {"root": root}
    inputs = w["inputs"] = root / "inputs"
    inputs.mkdir(parents=True)
    w["ct"] = write_ct(inputs / "ct.nrrd")
    w["int8"] = write_ct(inputs / "int8.nrrd", dtype=np.int8)
    shear = np.eye(3)
    shear[:, 1] = [0.5, np.sqrt(0.75), 0.0]  # the j axis 30 degrees off perpendicular: |det| = 0.866
    w["sheared"] = write_ct(inputs / "sheared.nrrd", direction=shear)
    w["cut_nii"], w["gz_cut_nii"] = nifti_cut(inputs)
    for odd in ("rotated", "coronal", "spacing"):
        w[f"dicom_{odd}"] = dicom_with_odd_slice(inputs / f"dicom_{odd}", odd)
    model = diverse_tiny_model()
    w["model"] = inputs / "tiny.safetensors"
    save_probsam(model, w["model"])
    geometry = VolumeGeometry.from_sitk(sitk.ReadImage(str(w["ct"])))
    box = Box3D.from_corners(geometry.index_to_physical(np.array([14.0, 16, 3])),
                             geometry.index_to_physical(np.array([29.0, 31, 9])), space="ras")
    w["roi"] = inputs / "roi.mrk.json"
    write_roi_json(box, w["roi"])
    huge = json.loads(w["roi"].read_text(encoding="utf-8"))
    text = json.dumps(huge).replace(str(huge["markups"][0]["center"][0]), "1" * 400, 1)
    w["huge_roi"] = inputs / "huge.mrk.json"
    w["huge_roi"].write_text(text, encoding="utf-8")
    odd_name = os.fsdecode(b"ct-\xff.nrrd")  # a byte that is not UTF-8 (Latin-1 file names)
    w["odd_name"] = inputs / odd_name
    shutil.copyfile(w["ct"], w["odd_name"])
    # earlier outputs, written by the tools themselves
    w["data"] = tiny_dataset(root / "data")
    w["one_patient"] = tiny_dataset(root / "one_patient", patients=1)
    w["prev_sample"] = root / "prev_sample"
    run_ok(PROBSAM + ["sample", str(w["ct"]), *BOX_IJK, "--model", "file", "--checkpoint", str(w["model"]),
                      "--samples", "2", "--out", str(w["prev_sample"]), "--quiet"])
    w["weights"] = root / "weights"
    w["weights"].mkdir()
    from Training.config import TrainConfig
    from Training.learning.learners import build_learner
    build_learner(TrainConfig(preset="tiny", seed=0)).save(w["weights"] / "probsam.safetensors")
    w["results"] = root / "results"
    run_ok([sys.executable, str(TRAINING / "evaluation" / "evaluate.py"), "--data", str(w["data"]), "--model",
            str(w["weights"] / "probsam.safetensors"), "--out", str(w["results"]), "--max-slices", "2",
            "--samples", "2", "--bootstrap", "5", "--num-threads", "1", "--device", "cpu"])
    w["run"] = root / "run"
    run_ok([sys.executable, str(TRAINING / "train.py"), f"data={w['data']}", f"out={w['run']}", "preset=tiny",
            "num_threads=1", "max_steps=4", "eval_interval=2", "batch_size=2", "device=cpu"])
    w["old_marker"] = root / "old_marker"
    w["old_marker"].mkdir()
    (w["old_marker"] / ".probsam-output").write_text("", encoding="utf-8")
    (w["old_marker"] / "mine.txt").write_text("written by an older probsam", encoding="utf-8")
    pickles = root / "pickles"
    pickles.mkdir()
    entry = {"image": np.zeros((8, 8), np.float32), "masks": [np.ones((8, 8))] * 4, "series_uid": "1"}
    w["pickle5"] = pickles / "protocol5.pickle"
    w["pickle5"].write_bytes(pickle.dumps({f"LIDC-IDRI-{p:04d}_slice_{s}": entry for p in range(6) for s in range(2)},
                                          protocol=5))
    configs = root / "configs"
    configs.mkdir()
    w["lr_config"] = configs / "lr.yaml"
    w["lr_config"].write_text(f"data: {w['data']}\npreset: tiny\nnum_threads: 1\nbatch_size: 2\nmax_steps: 1\n"
                              f"eval_interval: 1\ndevice: cpu\nlr: 1e-3\n", encoding="utf-8")
    return w


# --- the cases ------------------------------------------------------------------------------------------
def cases(w: dict) -> list:
    root, ct, model = w["root"], str(w["ct"]), str(w["model"])
    tiny = ["--model", "file", "--checkpoint", model, "--samples", "2", "--quiet"]
    py = sys.executable
    evaluate = [py, str(TRAINING / "evaluation" / "evaluate.py")]
    ev_args = ["--data", str(w["data"]), "--model", str(w["weights"] / "probsam.safetensors"), "--max-slices", "2",
               "--samples", "2", "--bootstrap", "5", "--num-threads", "1", "--device", "cpu"]
    train = [py, str(TRAINING / "train.py")]
    make_phantom = [py, str(TRAINING / "data" / "make_phantom.py")]
    checks = [py, str(TRAINING / "evaluation" / "product_checks.py")]
    everything = (str(root),)  # a snapshot of the whole world: any change to anything that existed is loss

    def sample(*argv, out=None):
        return PROBSAM + ["sample", *argv, *tiny, "--out", str(out or root / "new_out")]

    def volume_from_det(result) -> Optional[str]:
        summary = json.loads((root / "sheared_out" / "summary.json").read_text(encoding="utf-8"))
        got = summary.get("geometry", {}).get("voxel_volume_mm3")
        want = 0.8 * 0.7 * 2.5 * np.sqrt(0.75)
        if got is None:
            return "summary.json states no voxel volume to check"
        return None if abs(got - want) < 1e-6 * want else f"voxel volume {got} mm³, want {want:.6f}"

    def no_broken_pipe(result) -> Optional[str]:
        return "Broken pipe on stderr" if "Broken pipe" in result.stderr or "BrokenPipe" in result.stderr else None

    return [
        # inputs named by another option (data loss)
        Case("evaluate --reuse R --out R --force", "input given twice", evaluate + ev_args + [
            "--reuse", str(w["results"]), "--out", str(w["results"]), "--force"], 2, ("--reuse",), everything),
        Case("evaluate --out inside --data", "input given twice", evaluate + ev_args + [
            "--out", str(w["data"] / "results")], 2, ("--data",), everything),
        Case("evaluate --out = the --model's folder --force", "input given twice", evaluate + ev_args + [
            "--out", str(w["weights"]), "--force"], 2, ("--model",), everything),
        Case("product_checks --out = --data --force", "input given twice", checks + [
            "--data", str(w["data"]), "--model", str(w["weights"] / "probsam.safetensors"), "--out", str(w["data"]),
            "--force"], 2, ("--data",), everything),
        Case("sample --roi inside --out --force", "input given twice",
             sample("--roi", str(w["prev_sample"] / "summary.json"), ct, out=w["prev_sample"]) + ["--force"], 2,
             ("--roi",), everything),
        Case("sample --checkpoint inside --out --force", "input given twice",
             PROBSAM + ["sample", ct, *BOX_IJK, "--model", "file", "--checkpoint",
                        str(w["prev_sample"] / "summary.json"), "--out", str(w["prev_sample"]), "--force"], 2,
             ("--checkpoint",), everything),
        Case("sample --out contains the CT --force", "input given twice",
             sample(ct, *BOX_IJK, out=w["inputs"]) + ["--force"], 2, ("ct.nrrd",), everything),
        Case("train.py out= the data set", "input given twice", train + [
            f"data={w['data']}", f"out={w['data']}", "preset=tiny", "num_threads=1"], 2, ("data",), everything),
        Case("make_phantom --out X --work-dir X", "partial output", make_phantom + [
            "--out", str(root / "ph"), "--work-dir", str(root / "ph"), "--scans", "1", "--crop", "64"], 2,
             ("--work-dir",), everything,
             check=lambda r: "left a folder" if (root / "ph").exists() else None),
        Case("make_phantom --work-dir inside --out", "partial output", make_phantom + [
            "--out", str(root / "ph2"), "--work-dir", str(root / "ph2" / "work"), "--scans", "1", "--crop", "64"], 2,
             ("--work-dir",), everything,
             check=lambda r: "left a folder" if (root / "ph2").exists() else None),
        # the marker names the tool
        Case("sample --out <data set> --force", "marker", sample(ct, *BOX_IJK, out=w["data"]) + ["--force"], 2,
             ("--out",), everything),
        Case("sample --out <evaluate results> --force", "marker",
             sample(ct, *BOX_IJK, out=w["results"]) + ["--force"], 2, ("evaluate",), everything),
        Case("evaluate --out <probsam sample output> --force", "marker", evaluate + ev_args + [
            "--out", str(w["prev_sample"]), "--force"], 2, ("probsam sample",), everything),
        Case("sample --out <old-format marker> --force", "marker",
             sample(ct, *BOX_IJK, out=w["old_marker"]) + ["--force"], 2, ("--out",), everything),
        # damaged files that decode
        Case("uncompressed .nii cut short", "damaged file", sample(str(w["cut_nii"]), *BOX_IJK), 2,
             ("cut.nii",), everything),
        Case("gzip of a cut .nii", "damaged file", sample(str(w["gz_cut_nii"]), *BOX_IJK), 2,
             ("cut_then_gzipped.nii.gz",), everything),
        Case(".hdr/.img pair with the .img cut short", "damaged file",
             sample(str(w["inputs"] / "pair.hdr"), *BOX_IJK), 2, ("pair.img",), everything),
        Case("DICOM: one slice rotated in-plane", "damaged file",
             sample(str(w["dicom_rotated"].parent), *BOX_IJK), 2, ("s003.dcm",), everything),
        Case("DICOM: a coronal slice with the axial UID", "damaged file",
             sample(str(w["dicom_coronal"].parent), *BOX_IJK), 2, ("s003.dcm",), everything),
        Case("DICOM: one slice of another pixel spacing", "damaged file",
             sample(str(w["dicom_spacing"].parent), *BOX_IJK), 2, ("s003.dcm",), everything),
        # wrong numbers
        Case("sheared grid: volume from the determinant", "wrong number",
             sample(str(w["sheared"]), *BOX_IJK, out=root / "sheared_out"), 0, ("shear",), (str(w["inputs"]),),
             check=volume_from_det, one_line=False),
        # crashes and exit codes
        Case("path with a non-UTF-8 byte, LC_ALL=C", "crash",
             sample(str(w["odd_name"]) + ".missing", *BOX_IJK), 2, ("ct-",), everything,
             env={"LC_ALL": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0"}),
        Case("a CT whose name has a non-UTF-8 byte, sampled", "crash",
             sample(str(w["odd_name"]), *BOX_IJK, out=root / "odd_name_out"), 0, (), (str(w["inputs"]),)),
        Case("400-digit number in an ROI file", "crash", sample(ct, "--roi", str(w["huge_roi"])), 2,
             ("huge.mrk.json", "center"), everything),
        Case("400-digit number in --box", "crash", sample(ct, "--box", "1" * 400 + ",1,1,2,2,2"), 2, ("--box",),
             everything),
        Case("400-digit --samples", "crash", PROBSAM + ["sample", ct, *BOX_IJK, "--model", "file", "--checkpoint",
             model, "--samples", "1" * 400, "--out", str(root / "x")], 2, ("--samples",), everything),
        Case("400-digit --roi-index", "crash", sample(ct, "--roi", str(w["roi"]), "--roi-index", "1" * 400), 2,
             ("ROI index", "roi.mrk.json"), everything),
        Case("400-digit max_steps= for train.py", "crash", train + [
            f"data={w['data']}", f"out={root / 'huge_run'}", "preset=tiny", "max_steps=1" + "0" * 400], 2,
             ("max_steps",), everything),
        Case("400-digit lr= for train.py", "crash", train + [
            f"data={w['data']}", f"out={root / 'huge_run'}", "preset=tiny", "lr=1" + "0" * 400], 2, ("lr",),
             everything),
        Case("400-digit --bootstrap for evaluate.py", "crash", evaluate + ev_args + [
            "--out", str(root / "huge_eval"), "--bootstrap", "1" * 400], 2, ("--bootstrap",), everything),
        Case("probsam sample ... | true", "crash",
             " ".join(map(_quote, sample(ct, *BOX_IJK, out=root / "piped_out"))).replace(" --quiet", "") + " | true",
             0, (), (str(w["inputs"]),), shell=True, check=no_broken_pipe),
        Case("probsam info | head -1", "crash", " ".join(map(_quote, PROBSAM + ["info"])) + " | head -1", 0, (),
             (), shell=True, check=no_broken_pipe),
        # weak, as a class
        Case("protocol-5 pickle with numpy arrays", "weak", [py, str(TRAINING / "data" / "import_pickle.py"),
             str(w["pickle5"]), "--out", str(root / "from_pickle5")], 0, (), (str(w["pickle5"]),), one_line=False),
        Case("YAML lr: 1e-3", "weak", train + [str(w["lr_config"]), f"out={root / 'lr_run'}"], 0, (),
             (str(w["data"]),), one_line=False),
        Case("int8 volume warns", "weak", sample(str(w["int8"]), *BOX_IJK, out=root / "int8_out"), 0, ("CT",),
             (str(w["inputs"]),), one_line=False),
        Case("--checkpoint with a bundled model", "weak", PROBSAM + [
            "sample", ct, *BOX_IJK, "--model", "lite_medsam", "--checkpoint", model, "--out", str(root / "x")], 2,
             ("--checkpoint",), everything),
        Case("--sam-checkpoint with a model that needs none", "weak",
             sample(ct, *BOX_IJK) + ["--sam-checkpoint", model], 2, ("--sam-checkpoint",), everything),
        Case("a second --box", "weak", sample(ct, *BOX_IJK, "--box", "1,1,1,5,5,5"), 2, ("--box",), everything),
        Case("--box-space with --roi", "weak", sample(ct, "--roi", str(w["roi"]), "--box-space", "lps"), 2,
             ("--box-space",), everything),
        Case("stale temporary folder, run refused", "weak", sample(ct, *BOX_IJK, out=w["prev_sample"]), 2,
             ("--force",), (str(w["inputs"]),), setup=lambda: _stale_tmp(root),
             check=lambda r: "stale temporary folder left" if (root / ".prev_sample.tmp-999999999").exists() else None),
        Case("--resume max_steps below the step reached", "weak", train + [
            str(w["run"] / "config.yaml"), "--resume", "max_steps=1"], 2, ("max_steps",), everything),
        Case("one-patient split warns", "weak", [py, str(TRAINING / "data" / "import_pickle.py"),
             str(_one_patient_pickle(root)), "--out", str(root / "one_patient_import")], 0, ("patient",), (),
             one_line=False),
        # last: it replaces prev_sample, which cases above read
        Case("sample --out <its own earlier output> --force", "marker",
             sample(ct, *BOX_IJK, out=w["prev_sample"]) + ["--force"], 0, (), (str(w["inputs"]),)),
    ]


def _quote(text: str) -> str:
    import shlex
    return shlex.quote(text)


def _stale_tmp(root: Path) -> None:
    (root / ".prev_sample.tmp-999999999").mkdir(exist_ok=True)  # a run killed outright (a dead pid)
    (root / ".prev_sample.tmp-999999999" / ".probsam-output").write_text("", encoding="utf-8")


def _one_patient_pickle(root: Path) -> Path:
    path = root / "pickles" / "one_patient.pickle"
    entry = {"image": np.zeros((8, 8), np.float32), "masks": [np.ones((8, 8))] * 4, "series_uid": "1"}
    path.write_bytes(pickle.dumps({f"LIDC-IDRI-0001_slice_{s}": entry for s in range(12)}))
    return path


# --- running and judging --------------------------------------------------------------------------------
def judge(case: Case, result: subprocess.CompletedProcess, before: dict, world_root: Path) -> tuple:
    after = {p: snapshot(Path(p)) if Path(p).is_dir() else _file_state(Path(p)) for p in case.protect}
    lost = [p for p in case.protect if _lost(before[p], after[p])]
    if lost:
        return "loss", f"changed: {', '.join(lost)}"
    err = result.stderr
    lines = [line for line in err.splitlines() if line.strip()]
    problems = []
    if result.returncode < 0 or result.returncode == 134:
        problems.append(f"crashed (status {result.returncode})")
    elif result.returncode != case.status:
        problems.append(f"exit {result.returncode}, want {case.status}")
    if "Traceback" in err:
        problems.append("traceback")
    missing = [word for word in case.words if word.lower() not in err.lower()]
    if missing:
        problems.append(f"message lacks {missing}")
    if case.check is not None:
        wrong = case.check(result)
        if wrong:
            problems.append(wrong)
    if problems:
        return "bad", "; ".join(problems)
    if case.status != 0 and case.one_line and len(lines) != 1:
        return "weak", f"{len(lines)} lines on stderr"
    leftovers = [p.name for p in world_root.glob(".*.tmp-*") if "999999999" not in p.name]
    if leftovers:
        return "weak", f"temporary folders left: {leftovers}"
    return "good", ""


def _file_state(path: Path):
    return snapshot(path.parent).get(path.name) if path.exists() else None


def _lost(before: dict, after) -> bool:
    """Something that existed before is gone or different (new files are not loss)."""
    if not isinstance(before, dict):
        return before is not None and before != after
    return any(after.get(key) != value for key, value in before.items())


def run_case(case: Case, world_root: Path, timeout: float = 300) -> tuple:
    if case.setup is not None:
        case.setup()
    before = {p: snapshot(Path(p)) if Path(p).is_dir() else _file_state(Path(p)) for p in case.protect}
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", **case.env)
    start = time.monotonic()
    with tempfile.TemporaryFile() as err_file:  # stderr redirected to a file, as in a pipeline's log
        completed = subprocess.run(case.argv, cwd=ROOT, env=env, shell=case.shell, stdout=subprocess.PIPE,
                                   stderr=err_file, timeout=timeout)
        err_file.seek(0)
        stderr = err_file.read().decode("utf-8", "backslashreplace")
    result = subprocess.CompletedProcess(case.argv, completed.returncode, completed.stdout, stderr)
    verdict, why = judge(case, result, before, world_root)
    first = next((line for line in stderr.splitlines() if "error" in line), stderr.strip().splitlines()[-1:] or [""])
    return verdict, why, result.returncode, first if isinstance(first, str) else (first[0] if first else ""), \
        time.monotonic() - start


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", help="run the cases whose name holds this text")
    parser.add_argument("--out", type=Path, help="write the table (Markdown) here")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="probsam-fuzz-") as tmp:
        world = make_world(Path(tmp) / "world")
        rows = []
        for case in cases(world):
            if args.only and args.only not in case.name:
                continue
            verdict, why, status, message, seconds = run_case(case, world["root"])
            rows.append((case, verdict, why, status, message.replace(str(world["root"]), "…")))
            print(f"{verdict:5} {case.name} (exit {status}, {seconds:.0f} s) {why}", flush=True)
    counts = {v: sum(r[1] == v for r in rows) for v in ("good", "weak", "bad", "loss")}
    table = ["| case | class | exit | verdict | message or reason |", "|---|---|---|---|---|"]
    table += [f"| {c.name} | {c.kind} | {s} | {v} | {(why or m).replace('|', '/')[:160]} |"
              for c, v, why, s, m in rows]
    text = (f"{len(rows)} cases: " + ", ".join(f"{n} {v}" for v, n in counts.items()) + "\n\n" + "\n".join(table) + "\n")
    print(text)
    if args.out:
        args.out.write_text(text, encoding="utf-8")
    return 0 if counts["bad"] == counts["loss"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
