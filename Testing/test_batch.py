"""`probsam batch`: the CSV's checks (row and column named, nothing written), failed cases recorded while the
run goes on, resuming (after SIGKILL and after Ctrl-C, on another process count) to the very table of an
uninterrupted run with no case run twice, seeds independent of order and process count, and two processes
under torchrun (gloo, CPU).

The model is a tiny random ProbSAM saved to a file; the CTs are 48 x 48 x 12 voxels, so a case takes a
fraction of a second and the torchrun test's time is mostly starting two Python processes.
"""

import csv
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from ProbSAMLib import save_probsam
from ProbSAMLib.app import batch, cli
from ProbSAMLib.geometry import Box3D, VolumeGeometry
from ProbSAMLib.io.markups import write_roi_json
from Testing.helpers import diverse_tiny_model, snapshot

torch.set_num_threads(1)

GEOMETRY = VolumeGeometry((48, 48, 12), (-20.0, 15.0, -40.0), (0.8, 0.7, 2.5), np.eye(3))
VARYING = ("device", "read_s", "sample_s", "write_s", "total_s")  # the columns two runs may differ in
ENV = dict(os.environ, OMP_NUM_THREADS="1")  # the threads of the in-process runs (and torchrun's default)


def write_ct(path, seed: int, j0: int):
    values = np.random.default_rng(seed).normal(-800, 40, GEOMETRY.shape)
    values[4:9, j0:j0 + 12, 16:28] = 20.0  # a soft-tissue block: the "nodule"
    sitk.WriteImage(GEOMETRY.apply_to(sitk.GetImageFromArray(values.astype(np.int16))), str(path))


def corners(lo_ijk, hi_ijk, space: str) -> str:
    points = GEOMETRY.index_to_physical(np.array([lo_ijk, hi_ijk], dtype=float))
    if space == "ras":
        points = points * [-1, -1, 1]
    return ",".join(f"{v:.4f}" for v in points.ravel())


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("batch")
    save_probsam(diverse_tiny_model(), root / "tiny.safetensors")
    (root / "data").mkdir()
    write_ct(root / "data" / "ct_a.nrrd", 0, 16)
    write_ct(root / "data" / "ct_b.nrrd", 1, 22)
    rois = [Box3D.from_center_size(GEOMETRY.index_to_physical(c), [11, 9, 14]) for c in ([22, 20, 6], [22, 27, 6])]
    write_roi_json(rois[0], root / "data" / "two.mrk.json", space="ras")
    document = json.loads((root / "data" / "two.mrk.json").read_text(encoding="utf-8"))
    second = json.loads(write_roi_json(rois[1], root / "second.mrk.json", space="ras").read_text(encoding="utf-8"))
    document["markups"] += second["markups"]
    (root / "data" / "two.mrk.json").write_text(json.dumps(document), encoding="utf-8")
    # Four cases: an IJK box, a RAS box, the second ROI of a file, an LPS box with the default id (row5).
    rows = [["c1", "data/ct_a.nrrd", "14,16,3,29,31,9", "ijk", "", ""],
            ["c2", "data/ct_b.nrrd", corners([14, 22, 3], [29, 37, 9], "ras"), "ras", "", ""],
            ["c3", "data/ct_b.nrrd", "", "", "data/two.mrk.json", "1"],
            ["", str(root / "data" / "ct_a.nrrd"), corners([15, 15, 2], [28, 30, 10], "lps"), "lps", "", ""]]
    write_csv(root / "cases.csv", ["id", "volume", "box", "box_space", "roi", "roi_index"], rows)
    return {"root": root, "model": root / "tiny.safetensors", "cases": root / "cases.csv"}


@pytest.fixture(scope="module")
def reference(files):
    """An uninterrupted one-process run of the four cases."""
    out = files["root"] / "reference"
    assert run_batch(files, files["cases"], out) == 0
    return out


def write_csv(path, header, rows):
    with open(path, "w", encoding="utf-8", newline="") as file:
        csv.writer(file).writerows([header] + rows)
    return path


def arguments(files, cases, out, *extra):
    return ["batch", str(cases), "--out", str(out), "--samples", "3", "--device", "cpu", "--model", "file",
            "--checkpoint", str(files["model"]), "--quiet"] + [str(a) for a in extra]


def run_batch(files, cases, out, *extra):
    return cli.main(arguments(files, cases, out, *extra))


def table(out, drop=VARYING):
    with open(out / "results.csv", encoding="utf-8", newline="") as file:
        return [{k: v for k, v in row.items() if k not in drop} for row in csv.DictReader(file)]


def records(out) -> dict:
    return {p.stem: p.read_bytes() for p in sorted((out / "records").glob("*.json"))}


def same_masks(out_a, out_b, case_id) -> bool:
    path = f"cases/{case_id}/samples.seg.nrrd"
    return (out_a / path).read_bytes() == (out_b / path).read_bytes()


# --- the CSV --------------------------------------------------------------------------------------------
BAD_CSVS = [
    ("id,volume,box,box_space,colour\nc1,a.nrrd,\"1,2,3,4,5,6\",ijk,red\n", ["row 1", "unknown column 'colour'"]),
    ("id,box,box_space\nc1,\"1,2,3,4,5,6\",ijk\n", ["row 1", "'volume' is missing"]),
    ("id,volume,box,box_space,roi\nc1,a.nrrd,\"1,2,3,4,5,6\",ijk,\nc2,a.nrrd,,,\n",
     ["row 3", "column box/roi", "neither"]),
    ("id,volume,box,box_space,roi\nc1,a.nrrd,\"1,2,3,4,5,6\",ijk,r.mrk.json\n", ["row 2", "column box/roi", "both"]),
    ("volume,box,box_space\na.nrrd,\"1,2,3,4,5,6\",\n", ["row 2", "column box_space", "ras, lps, ijk"]),
    ("volume,box,box_space\na.nrrd,\"1,2,3,4,5\",ijk\n", ["row 2", "column box", "6"]),
    ("id,volume,box,box_space\np1,a.nrrd,\"1,2,3,4,5,6\",ijk\nq,a.nrrd,\"1,2,3,4,5,6\",ijk\n"
     "P1,b.nrrd,\"1,2,3,4,5,6\",ijk\n", ["rows 2 and 4", "column id", "'P1'"]),
    ("id,volume,box,box_space\n../up,a.nrrd,\"1,2,3,4,5,6\",ijk\n", ["row 2", "column id", "'../up'"]),
    ("volume,roi,roi_index\na.nrrd,r.mrk.json,first\n", ["row 2", "column roi_index", "'first'"]),
    ("volume,box,box_space,roi_index\na.nrrd,\"1,2,3,4,5,6\",ijk,1\n", ["row 2", "column roi_index", "without"]),
    ("volume,box,box_space\n", ["no cases"]),
]


@pytest.mark.parametrize("text, expected", BAD_CSVS, ids=[
    "unknown column", "no volume column", "neither box nor roi", "both box and roi", "box without space",
    "box of 5 numbers", "duplicate ids", "bad id", "roi_index not a number", "roi_index without roi", "no rows"])
def test_csv_errors_name_the_row_and_column_and_write_nothing(files, tmp_path, capsys, text, expected):
    (tmp_path / "cases.csv").write_text(text, encoding="utf-8")
    before = snapshot(tmp_path)
    assert run_batch(files, tmp_path / "cases.csv", tmp_path / "out") == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("probsam: error: ") and "\n" not in err, err
    assert all(fragment in err for fragment in expected), err
    assert snapshot(tmp_path) == before  # no --out, no temporary folder


# --- a run ----------------------------------------------------------------------------------------------
def test_a_run_writes_each_case_as_probsam_sample_does_and_one_table(files, reference, tmp_path):
    rows = table(reference, drop=())
    assert [r["id"] for r in rows] == ["c1", "c2", "c3", "row5"] and [r["row"] for r in rows] == ["2", "3", "4", "5"]
    assert all(r["status"] == "done" and not r["error"] for r in rows)
    assert all(r["seed"] == str(batch.case_seed(0, r["id"])) for r in rows)
    assert all(float(r["volume_mean_mm3"]) > 0 and 0 < float(r["pairwise_dice_mean"]) <= 1 for r in rows)
    summary = json.loads((reference / "cases" / "c3" / "summary.json").read_text(encoding="utf-8"))
    assert summary["request"]["roi_index"] == 1 and summary["batch"]["id"] == "c3"
    assert float(rows[2]["volume_mean_mm3"]) == summary["spread"]["volume_mm3"]["mean"]
    # The case's files are the ones `probsam sample` writes for its box and seed.
    assert cli.main(["sample", str(files["root"] / "data" / "ct_a.nrrd"), "--box", "14,16,3,29,31,9", "--box-space",
                     "ijk", "--samples", "3", "--seed", rows[0]["seed"], "--out", str(tmp_path / "one"), "--model",
                     "file", "--checkpoint", str(files["model"]), "--device", "cpu", "--quiet"]) == 0
    for path in (tmp_path / "one").iterdir():
        if path.name not in ("summary.json", ".probsam-output"):
            assert path.read_bytes() == (reference / "cases" / "c1" / path.name).read_bytes(), path.name


def test_a_failed_case_is_recorded_and_the_run_goes_on(files, tmp_path, capsys, monkeypatch):
    rows = [["good", "data/ct_a.nrrd", "14,16,3,29,31,9", "ijk"],
            ["far", "data/ct_a.nrrd", "100,100,3,120,120,9", "ijk"],   # outside the volume
            ["gone", "data/missing.nrrd", "14,16,3,29,31,9", "ijk"],
            ["also", "data/ct_b.nrrd", "14,22,3,29,37,9", "ijk"]]
    cases = write_csv(files["root"] / "failing.csv", ["id", "volume", "box", "box_space"], rows)
    out = tmp_path / "out"
    assert run_batch(files, cases, out) == 1
    assert "2 of 4 cases failed" in capsys.readouterr().err
    result = {r["id"]: r for r in table(out)}
    assert [result[i]["status"] for i in ("good", "far", "gone", "also")] == ["done", "failed", "failed", "done"]
    assert "outside the volume" in result["far"]["error"] and "not found" in result["gone"]["error"]
    assert sorted(p.name for p in (out / "cases").iterdir()) == ["also", "good"]

    # A rerun runs nothing again; --retry-failed runs only the failed cases.
    ran = []
    real_run_case = batch.run_case
    monkeypatch.setattr(batch, "run_case", lambda case, *rest: ran.append(case.id) or real_run_case(case, *rest))
    before = records(out)
    assert run_batch(files, cases, out) == 1 and records(out) == before and ran == []
    assert run_batch(files, cases, out, "--retry-failed") == 1 and ran == ["far", "gone"]
    assert table(out) == list(result.values())


def test_an_existing_out_of_another_run_is_refused_unless_force(files, reference, tmp_path, capsys):
    out = tmp_path / "out"
    cases = write_csv(tmp_path / "one.csv", ["id", "volume", "box", "box_space"],
                      [["c1", str(files["root"] / "data" / "ct_a.nrrd"), "14,16,3,29,31,9", "ijk"]])
    assert run_batch(files, cases, out) == 0
    before = snapshot(out)
    capsys.readouterr()
    assert run_batch(files, cases, out, "--seed", 5) == 2
    err = capsys.readouterr().err
    assert "other settings (seed 0 -> 5)" in err and "--force" in err and snapshot(out) == before
    assert run_batch(files, files["cases"], out) == 2
    assert "another CSV" in capsys.readouterr().err and snapshot(out) == before
    assert run_batch(files, cases, out, "--seed", 5, "--force") == 0
    assert table(out)[0]["seed"] == str(batch.case_seed(5, "c1"))
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep", encoding="utf-8")
    assert run_batch(files, cases, tmp_path / "mine") == 2
    assert "not a probsam batch folder" in capsys.readouterr().err
    assert run_batch(files, cases, tmp_path / "mine", "--force") == 2
    assert "not written by ProbSAM" in capsys.readouterr().err
    assert (tmp_path / "mine" / "notes.txt").read_text(encoding="utf-8") == "keep"


# --- seeds, resuming, processes -------------------------------------------------------------------------
def test_seeds_depend_only_on_the_run_seed_and_the_case_id(files, reference, tmp_path):
    assert batch.case_seed(0, "c1") == batch.case_seed(0, "c1") < 2 ** 63
    assert len({batch.case_seed(0, "c1"), batch.case_seed(1, "c1"), batch.case_seed(0, "c2")}) == 3
    with open(files["cases"], encoding="utf-8", newline="") as file:
        header, *rows = list(csv.reader(file))
    rows[3][0] = "row5"  # the default id follows the row, so name it when moving the row
    reversed_cases = write_csv(files["root"] / "reversed.csv", header, rows[::-1])
    assert run_batch(files, reversed_cases, tmp_path / "out") == 0
    moved = {r["id"]: dict(r, row=None) for r in table(tmp_path / "out")}
    assert moved == {r["id"]: dict(r, row=None) for r in table(reference)}
    assert all(same_masks(reference, tmp_path / "out", case_id) for case_id in moved)


def test_a_killed_run_resumes_to_the_same_table_without_running_a_case_twice(files, reference, tmp_path):
    out = tmp_path / "out"
    command = [sys.executable, "-m", "ProbSAMLib.app.cli"] + arguments(files, files["cases"], out)
    process = subprocess.Popen(command, stdin=subprocess.PIPE, stderr=subprocess.PIPE, text=True, encoding="utf-8",
                               env=dict(ENV, PROBSAM_TEST_PAUSE="batch-record"))
    try:
        lines = []
        while not lines or "paused at batch-record" not in lines[-1]:  # just after the first case's record
            lines.append(process.stderr.readline())
            assert lines[-1], "".join(lines)  # the process ended without pausing
        process.send_signal(signal.SIGKILL)
    finally:
        process.kill()
        process.wait(timeout=60)
    first = records(out)
    assert list(first) == ["c1"] and not (out / "results.csv").exists()
    assert run_batch(files, files["cases"], out) == 0
    resumed = records(out)
    assert resumed["c1"] == first["c1"]  # not run again
    assert {json.loads(resumed[i])["pid"] for i in ("c2", "c3", "row5")} == {os.getpid()}
    assert table(out) == table(reference)
    assert all(same_masks(reference, out, case_id) for case_id in resumed)
    assert not [p for p in (out / "cases").iterdir() if p.name.startswith(".")]  # no temporary folder left


def test_an_interrupted_run_resumed_by_two_torchrun_processes_gives_the_same_table(files, reference, tmp_path,
                                                                                   monkeypatch, capsys):
    out = tmp_path / "out"
    done = []

    def ctrl_c_on_the_second_case(case, *rest):
        if done:
            raise KeyboardInterrupt
        done.append(case.id)
        return real_run_case(case, *rest)

    real_run_case = batch.run_case
    monkeypatch.setattr(batch, "run_case", ctrl_c_on_the_second_case)
    with pytest.raises(SystemExit) as stopped:
        run_batch(files, files["cases"], out)
    assert stopped.value.code == 130 and "run the same command again" in capsys.readouterr().err
    first = records(out)
    assert list(first) == ["c1"]

    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
                "ProbSAMLib.app.cli"]
    finished = subprocess.run(torchrun + arguments(files, files["cases"], out), capture_output=True, text=True,
                              encoding="utf-8", env=ENV, timeout=300)
    assert finished.returncode == 0, finished.stderr
    resumed = records(out)
    assert resumed["c1"] == first["c1"]
    assert sorted(json.loads(resumed[i])["rank"] for i in ("c2", "c3", "row5")) == [0, 0, 1]
    assert table(out) == table(reference)
    assert all(same_masks(reference, out, case_id) for case_id in resumed)
