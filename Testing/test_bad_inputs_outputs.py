"""The output guard, round 3 (issue 36): an input named by any path option, the marker that names the tool
which wrote a folder, stale temporary folders beside a refused run, and the guard's parts.

`probsam sample` runs in-process through ``cli.main``; it refuses an output before it reads the CT or loads a
model, so these cases take milliseconds. Every refused case asserts exit status 2, exactly one
``probsam: error: ...`` line naming the problem, and that nothing under the test folder changed (a hashed
snapshot before and after). The Training scripts' cases are rows of Testing/test_bad_inputs_training.py.
"""

import argparse
import json
import os
import runpy
import signal
import socket
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from ProbSAMLib.app import cli
from ProbSAMLib.errors import OutputRefusedError
from ProbSAMLib.io.outputdir import MARKER, MARKER_FORMAT, OutputFolder, overlapping, parser_inputs, read_marker
from Testing.helpers import snapshot

ROOT = Path(__file__).resolve().parents[1]
BOX = ["--box", "1,1,1,4,4,2", "--box-space", "ijk"]
DEAD = 2 ** 22 + 4321  # above Linux's default pid_max: no such process


def written_by(folder: Path, tool: str, **files) -> Path:
    """A folder as ``tool`` writes it (through the one writer), holding ``files`` (name -> text)."""
    with OutputFolder(folder, tool=tool) as tmp:
        for name, text in files.items():
            (tmp / name).write_text(text, encoding="utf-8")
    return folder


def marked(folder: Path, marker: str) -> Path:
    """A folder holding a marker with the given text (the old empty one, a newer format...) and a file."""
    folder.mkdir()
    (folder / MARKER).write_text(marker, encoding="utf-8")
    (folder / "summary.json").write_text("{}", encoding="utf-8")
    return folder


@pytest.fixture
def world(tmp_path, monkeypatch):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    image = sitk.GetImageFromArray(np.full((4, 8, 8), -800, np.int16))
    sitk.WriteImage(image, str(inputs / "ct.nrrd"))
    dicom = tmp_path / "dicom_series"  # a folder input (never read: the output is refused first)
    dicom.mkdir()
    (dicom / "0001.dcm").write_bytes(b"a slice")
    w = {"root": tmp_path, "ct": inputs / "ct.nrrd", "dicom": dicom,
         "data_set": written_by(tmp_path / "data_set", "make_phantom.py", **{"meta.json": "{}"}),
         "results": written_by(tmp_path / "results", "evaluate.py", **{"results.md": "table"}),
         "demo": written_by(tmp_path / "demo", "probsam demo", **{"montage.png": "png"}),
         "sampled": written_by(tmp_path / "sampled", "probsam sample", **{"summary.json": "{}"}),
         "old": marked(tmp_path / "old", ""),
         "newer": marked(tmp_path / "newer", json.dumps({"tool": "probsam sample", "format": MARKER_FORMAT + 1})),
         "garbage": marked(tmp_path / "garbage", "not json")}
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    return w


def cases(w: dict) -> dict:
    """name -> (argv, words the error line must hold)."""
    def sample(out, *args, source=w["ct"]):
        return ["sample", str(source), *BOX, "--out", str(out), *args]

    return {
        "--force over make_phantom's data set": (sample(w["data_set"], "--force"),
                                                 "was written by make_phantom.py, not probsam sample"),
        "--force over evaluate.py's results": (sample(w["results"], "--force"), "was written by evaluate.py"),
        "--force over probsam demo's folder": (sample(w["demo"], "--force"), "was written by probsam demo"),
        "--force over the old empty marker": (sample(w["old"], "--force"), "older ProbSAM"),
        "--force over a newer marker format": (sample(w["newer"], "--force"), "newer ProbSAM"),
        "--force over an unreadable marker": (sample(w["garbage"], "--force"), "older ProbSAM"),
        "no --force, another tool's folder": (sample(w["results"]), "already exists and was written by evaluate.py"),
        "--out inside the DICOM folder read": (sample(w["dicom"] / "results", source=w["dicom"]),
                                               "is inside the input"),
        "--out is the DICOM folder read, --force": (sample(w["dicom"], "--force", source=w["dicom"]),
                                                    "holds the input"),
    }


def test_probsam_refuses_another_tools_folder_and_any_overlap_with_an_input(world, capsys):
    for name, (argv, words) in cases(world).items():
        before = snapshot(world["root"])
        code = cli.main(argv)
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if "error:" in line]
        assert code == 2, (name, code, err)
        assert len(lines) == 1 and lines[0].startswith("probsam: error: ") and words in lines[0], (name, err)
        assert "Traceback" not in err and snapshot(world["root"]) == before, name


def test_a_refused_run_still_removes_stale_temporary_folders(world, capsys):
    """Leftovers of a killed run into the same place go even when the new run is refused; a live process's
    temporary folder, and one written on another host (its pid means nothing here), stay."""
    out = world["sampled"]
    dead = written_by(out.parent / f".{out.name}.tmp-{DEAD}", "probsam sample", **{"half.nrrd": "half"})
    live = written_by(out.parent / f".{out.name}.tmp-{os.getppid()}", "probsam sample")
    elsewhere = out.parent / f".{out.name}.tmp-{DEAD + 1}"
    marked(elsewhere, json.dumps({"tool": "probsam sample", "format": MARKER_FORMAT, "host": "another-host"}))
    assert cli.main(["sample", str(world["ct"]), *BOX, "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert not dead.exists() and live.is_dir() and elsewhere.is_dir()
    assert (out / "summary.json").is_file()


# --- the writer's parts ------------------------------------------------------------------------------------
def test_force_replaces_only_the_same_tools_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = written_by(tmp_path / "out", "evaluate.py", **{"a.txt": "first"})
    marker = read_marker(out)
    assert marker["tool"] == "evaluate.py" and marker["format"] == MARKER_FORMAT
    assert marker["host"] == socket.gethostname() and marker["pid"] == os.getpid()
    with OutputFolder(out, force=True, tool="evaluate.py") as tmp:
        (tmp / "b.txt").write_text("second")
    assert sorted(p.name for p in out.iterdir()) == [MARKER, "b.txt"]
    with pytest.raises(OutputRefusedError, match="was written by evaluate.py, not product_checks.py"):
        OutputFolder(out, force=True, tool="product_checks.py").check()
    assert (out / "b.txt").read_text(encoding="utf-8") == "second"
    assert read_marker(tmp_path) is None  # no marker: not ProbSAM's


def test_out_equal_inside_or_above_an_input_is_refused_and_a_sibling_is_not(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data = tmp_path / "data"
    (data / "sub").mkdir(parents=True)
    (tmp_path / "link").symlink_to(data)
    for out, words in ((data, "holds the input"), (tmp_path, "working folder"), (data / "sub" / "r", "inside"),
                       (tmp_path / "link" / "r", "inside")):
        with pytest.raises(OutputRefusedError, match=words):
            OutputFolder(out, force=True, inputs=[data]).check()
    OutputFolder(tmp_path / "data_results", inputs=[data]).check()  # a name that merely starts alike
    assert overlapping(data, tmp_path / "link" / "sub") and not overlapping(data, tmp_path / "data_results")


def test_parser_inputs_are_the_path_options_of_the_chosen_command():
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", type=Path)
    commands = parser.add_subparsers(dest="command")
    run = commands.add_parser("run")
    run.add_argument("source", type=Path)
    run.add_argument("--reuse", type=Path, action="append", default=[])
    run.add_argument("--pair", type=Path, nargs=2)
    run.add_argument("--name")
    run.add_argument("--out", type=Path)
    other = commands.add_parser("other")
    other.add_argument("--elsewhere", type=Path, default=Path("never"))
    args = parser.parse_args(["--config", "c.yaml", "run", "s", "--reuse", "r1", "--reuse", "r2", "--pair", "p", "q",
                              "--name", "n", "--out", "o"])
    assert parser_inputs(parser, args) == [Path(p) for p in ("c.yaml", "s", "r1", "r2", "p", "q")]
    assert Path("o") in parser_inputs(parser, args, outputs=())


# --- every entry point declares what it reads as type=Path ------------------------------------------------------
# Options that take text which is not a path (names, ids, devices, key=value settings, a box). An option that
# names a file or folder must be declared type=Path instead, so the output guard sees it: add one here only if
# it is not a path.
TEXT_OPTIONS = {"name", "device", "series_uid", "box", "model", "patients", "overrides", "host"}


class _Parsed(BaseException):
    """Raised in place of parsing, to hand the entry point's parser to the test (run_main lets it through)."""

    def __init__(self, parser):
        self.parser = parser


def _entry_point_parser(main, argv, monkeypatch) -> argparse.ArgumentParser:
    def capture(self, *args, **kwargs):
        raise _Parsed(self)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", capture)
    monkeypatch.setattr(argparse.ArgumentParser, "parse_intermixed_args", capture)
    with pytest.raises(_Parsed) as parsed:
        main(argv)
    monkeypatch.undo()
    return parsed.value.parser


def _all_actions(parser):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from _all_actions(sub)
        else:
            yield action


def test_every_entry_point_declares_the_files_it_reads_as_paths(monkeypatch):
    from research import subsample
    from Training.data import import_pickle, make_phantom, prepare_lidc
    from Training.evaluation import evaluate, product_checks

    def train(argv):
        monkeypatch.setattr(sys, "excepthook", sys.excepthook)  # train.py installs its own
        monkeypatch.setattr(signal, "signal", lambda *a: None)
        monkeypatch.setattr(sys, "argv", ["train.py"])
        runpy.run_path(str(ROOT / "Training" / "train.py"), run_name="__main__")

    mains = {"probsam": lambda argv: cli.build_parser().parse_args(argv), "evaluate.py": evaluate.main,
             "product_checks.py": product_checks.main, "import_pickle.py": import_pickle.main,
             "make_phantom.py": make_phantom.main, "prepare_lidc.py": prepare_lidc.main,
             "subsample.py": subsample.main, "train.py": train}
    reads = {}
    for name, main in mains.items():
        parser = _entry_point_parser(main, [], monkeypatch)
        for action in _all_actions(parser):
            takes_text = action.nargs != 0 and action.type is None and action.choices is None
            assert not takes_text or action.dest in TEXT_OPTIONS or action.dest == "help", (name, action.dest)
        reads[name] = {a.dest for a in _all_actions(parser) if a.type is Path}
    # the options the fuzz found unguarded, or that hold what a run reads
    assert {"reuse", "data", "model", "sam_checkpoint", "out"} <= reads["evaluate.py"]
    assert {"input", "roi", "checkpoint", "sam_checkpoint"} <= reads["probsam"]
    assert {"config"} <= reads["train.py"] and {"dicom_root", "work_dir"} <= reads["prepare_lidc.py"]
