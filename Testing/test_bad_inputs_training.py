"""The Training scripts under bad input: train.py, evaluate.py, import_pickle.py, make_phantom.py,
prepare_lidc.py — one table, each case asserting the exit status (2 bad input or settings), exactly one
``<script>: error: ...`` line naming the problem, no traceback, and that nothing was created, changed or
removed (a hashed snapshot of the whole test folder before and after).

train.py is a top-level script: the table runs it in-process with runpy and ends an uncaught error
through ``errors.finish_script`` — the function its exception hook calls — and a few cases run it as a
real subprocess to cover the hook itself. The data set is a tiny synthetic one written by
``Testing.helpers.tiny_dataset`` (no pylidc), so the whole module takes seconds.
"""

import os
import pickle
import runpy
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from ProbSAMLib import errors
from Testing.helpers import snapshot, tiny_dataset
from Training.evaluation import evaluate
from Training.data import import_pickle, make_phantom, prepare_lidc
from Training.config import TrainConfig
from ProbSAMLib.io.outputdir import OutputFolder
from Training.learning.learners import build_learner

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[1]
TRAIN = ROOT / "Training" / "train.py"


def resumable_run(run: Path, data: Path, step: int) -> Path:
    """A train.py run folder stopped at ``step``: config.yaml and a ckpt.pt that train.py would resume (the
    learner and optimiser of that config, as train.py builds them)."""
    from Training.config import load_config
    from Training.learning.learners import parameter_groups

    run.mkdir(parents=True)
    (run / "config.yaml").write_text(f"data: {data}\nout: {run}\npreset: tiny\nbatch_size: 2\nnum_threads: 1\n"
                                     f"max_steps: 10\n", encoding="utf-8")
    cfg = load_config(str(run / "config.yaml"))
    learner = build_learner(cfg, "hu", context_size=64)
    optimiser = torch.optim.AdamW(parameter_groups(learner, cfg), lr=cfg.lr)
    torch.save({"learner": learner.state_dict(), "optimiser": optimiser.state_dict(), "step": step,
                "best_ged": 1.0, "config": cfg.to_dict()}, run / "ckpt.pt")
    return run


class LoadsAFile:
    """Unpickling this would call numpy.load: a numpy function, but not one that builds an array."""

    def __reduce__(self):
        return np.load, ("/nowhere.npy",)


class Evil:
    """Unpickling this would create a folder: a stand-in for any code a crafted pickle could run."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return os.mkdir, (str(self.path),)


def make_world(root: Path) -> dict:
    data = tiny_dataset(root / "data")
    cut = tiny_dataset(root / "cut_data")
    images = (cut / "images.npy").read_bytes()
    (cut / "images.npy").write_bytes(images[:len(images) // 2])
    foreign = root / "foreign_data"
    foreign.mkdir()
    (foreign / "meta.json").write_text('{"format": "something-else"}')
    weights = root / "weights"
    weights.mkdir()
    build_learner(TrainConfig(preset="tiny", seed=0)).save(weights / "probsam.safetensors")
    (weights / "garbage.safetensors").write_bytes(b"\x00garbage" * 100)
    save_file({"x": torch.zeros(2)}, str(weights / "foreign.safetensors"), metadata={"format": "other"})
    runs = root / "runs"
    (runs / "garbage").mkdir(parents=True)
    (runs / "garbage" / "ckpt.pt").write_bytes(b"PK\x03\x04 not a checkpoint")
    (runs / "garbage" / "config.yaml").write_text(f"data: {data}\nout: {runs / 'garbage'}\npreset: tiny\n"
                                                  f"batch_size: 2\nnum_threads: 1\n")
    (runs / "evil").mkdir()
    torch_pickle = runs / "evil" / "ckpt.pt"
    with open(torch_pickle, "wb") as fh:
        pickle.dump({"learner": Evil(root / "pwned_by_ckpt"), "optimiser": {}, "step": 0, "best_ged": 0.0}, fh)
    (runs / "evil" / "config.yaml").write_text((runs / "garbage" / "config.yaml").read_text(encoding="utf-8")
                                               .replace("garbage", "evil"))
    (runs / "notes").mkdir()
    (runs / "notes" / "todo.txt").write_text("my notes")
    (runs / "removed").mkdir()  # a run written when train_refiner_only existed, and used
    (runs / "removed" / "ckpt.pt").write_bytes(b"never read: the settings are refused first")
    (runs / "removed" / "config.yaml").write_text((runs / "garbage" / "config.yaml").read_text(encoding="utf-8")
                                                  .replace("garbage", "removed") + "train_refiner_only: true\n")
    (root / "configs").mkdir()
    (root / "configs" / "list.yaml").write_text("- 1\n- 2\n")
    (root / "configs" / "broken.yaml").write_text("lr: [1, 2\n")
    pickles = root / "pickles"
    pickles.mkdir()
    good_entry = {"image": np.zeros((8, 8), np.float32), "masks": [np.ones((8, 8))] * 4, "series_uid": "1"}
    content = {"empty": b"", "text": b"hello, not a pickle",
               "evil": pickle.dumps({"LIDC-IDRI-0001_slice_1": Evil(root / "pwned_by_pickle")}),
               "string_entry": pickle.dumps({"LIDC-IDRI-0001_slice_1": "not a dict"}),
               "three_masks": pickle.dumps({"k": dict(good_entry, masks=[np.ones((8, 8))] * 3)}),
               "shapes": pickle.dumps({"k": dict(good_entry, image=np.zeros((9, 9), np.float32))}),
               "text_masks": pickle.dumps({"k": dict(good_entry, masks=["a", "b", "c", "d"])}),
               "empty_dict": pickle.dumps({}), "a_list": pickle.dumps([1, 2, 3]),
               "truncated": pickle.dumps({"k": good_entry})[:200],
               "image_3d": pickle.dumps({"k": dict(good_entry, image=np.zeros((2, 8, 8), np.float32))}),
               "nan_image": pickle.dumps({"k": dict(good_entry, image=np.full((8, 8), np.nan, np.float32))}),
               "all_empty": pickle.dumps({"k": dict(good_entry, masks=[np.zeros((8, 8))] * 4)}),
               "hu_image": pickle.dumps({"k": dict(good_entry, image=np.full((8, 8), -1000.0, np.float32))}),
               "evil_protocol5": pickle.dumps({"LIDC-IDRI-0001_slice_1": Evil(root / "pwned_by_pickle")},
                                              protocol=5),
               "numpy_load": pickle.dumps({"k": LoadsAFile()}, protocol=pickle.HIGHEST_PROTOCOL)}
    for name, blob in content.items():
        (pickles / f"{name}.pickle").write_bytes(blob)
    (root / "work").mkdir()
    (root / "dicom" / "LIDC-IDRI-0001").mkdir(parents=True)
    done = root / "done"  # an earlier output of the tools (with the marker)
    done.mkdir()
    (done / ".probsam-output").write_text("")  # the marker's first format: an empty file
    sampled = root / "sampled"  # what `probsam sample` wrote
    with OutputFolder(sampled, tool="probsam sample") as tmp:
        (tmp / "summary.json").write_text("{}")
    results = root / "results_a"  # an evaluate.py --out folder, later given to --reuse
    with OutputFolder(results, tool="evaluate.py") as tmp:
        (tmp / "per_slice_a.csv").write_text("slice\n")
        (tmp / "my_notes.txt").write_text("written into the results folder by its user")
    (root / "cfgrun").mkdir()  # a user's config, kept in a folder of its own
    (root / "cfgrun" / "config.yaml").write_text(f"data: {data}\npreset: tiny\nbatch_size: 2\nnum_threads: 1\n")
    resumable_run(runs / "ahead", data, step=5)
    return {"root": root, "data": data, "cut": cut, "foreign": foreign, "weights": weights, "runs": runs,
            "pickles": pickles, "done": done, "sampled": sampled, "results": results}


def cases(w: dict) -> dict:
    """name -> (script, argv, exit status, words)."""
    root, data, runs, weights, pickles = w["root"], w["data"], w["runs"], w["weights"], w["pickles"]
    new_run = f"out={runs / 'new'}"

    def train(*settings):
        return ("train.py", [f"data={data}", new_run, "preset=tiny", "num_threads=1", *settings])

    def ev(*args, model=weights / "probsam.safetensors", data_dir=data, out=root / "results"):
        return ("evaluate.py", ["--data", data_dir, "--model", model, "--out", out, "--max-slices", "2",
                                "--samples", "2", *args])

    def pk(name, *args):
        return ("import_pickle.py", [pickles / f"{name}.pickle", "--out", root / "imported", *args])

    table = {
        "train: batch_size=abc": (*train("batch_size=abc"), 2, "batch_size must be a whole number"),
        "train: lr=fast": (*train("lr=fast"), 2, "lr must be a number"),
        "train: batch_size=0": (*train("batch_size=0"), 2, "batch_size must be at least 1"),
        "train: max_steps=0": (*train("max_steps=0"), 2, "max_steps must be at least 1"),
        "train: max_steps=-5": (*train("max_steps=-5"), 2, "max_steps must be at least 1"),
        "train: a 400-digit max_steps": (*train("max_steps=1" + "0" * 400), 2,
                                         "max_steps must be a whole number below 2**63, got 10000"),
        "train: a 400-digit lr": (*train("lr=1" + "0" * 400), 2, "setting lr must be a finite number, got 10000"),
        "train: lr=0": (*train("lr=0"), 2, "lr must be greater than 0"),
        "train: cache=maybe": (*train("cache=maybe"), 2, "cache must be true or false"),
        "train: unknown preset": (*train("preset=vit_q"), 2, "preset must be one of"),
        "train: unknown model": (*train("model=unet"), 2, "model must be one of"),
        "train: unet_channels=[8]": (*train("unet_channels=[8]"), 2, "unet_channels"),
        "train: unknown device": (*train("device=gpu"), 2, "device must be"),
        "train: unknown setting": (*train("bath_size=4"), 2, "unknown setting 'bath_size'"),
        "train: not key=value": (*train("fast"), 2, "not key=value"),
        "train: missing config": ("train.py", [root / "configs" / "none.yaml", f"data={data}", new_run], 2,
                                  "not found"),
        "train: config is a list": ("train.py", [root / "configs" / "list.yaml", new_run], 2, "mapping"),
        "train: config not YAML": ("train.py", [root / "configs" / "broken.yaml", new_run], 2, "not valid YAML"),
        "train: missing data set": ("train.py", [f"data={root / 'nowhere'}", new_run, "preset=tiny"], 2,
                                    "is not a data set"),
        "train: truncated data set": ("train.py", [f"data={w['cut']}", new_run, "preset=tiny"], 2, "truncated"),
        "train: foreign data set": ("train.py", [f"data={w['foreign']}", new_run, "preset=tiny"], 2,
                                    "not a data set of format"),
        "train: missing init weights": (*train(f"init={root / 'none.safetensors'}"), 2, "no such file"),
        "train: out is a folder of notes": ("train.py", [f"data={data}", f"out={runs / 'notes'}"], 2,
                                            "neither empty nor a train.py run"),
        "train: out is the working folder": ("train.py", [f"data={data}", f"out={root / 'work'}"], 2,
                                             "working folder"),
        "train: out holds the data": ("train.py", [f"data={data}", f"out={data}"], 2, "holds the input"),
        "train: --resume without ckpt": ("train.py", [f"data={data}", new_run, "--resume"], 2, "no checkpoint"),
        "train: --resume garbage ckpt": ("train.py", [f"out={runs / 'garbage'}", "--resume"], 2,
                                         "not a readable training checkpoint"),
        "train: --resume ckpt with code": ("train.py", [f"out={runs / 'evil'}", "--resume"], 2,
                                           "not a readable training checkpoint"),
        # --- output guard, round 3: inputs from the parser and config, markers naming the tool, --resume
        "train: out= holds the config file": ("train.py", [root / "cfgrun" / "config.yaml", f"out={root / 'cfgrun'}"],
                                              2, "holds the input"),
        "train: out= written by probsam sample": ("train.py", [f"data={data}", f"out={w['sampled']}"], 2,
                                                  "was written by probsam sample, not train.py"),
        "train: --resume max_steps below the step reached": ("train.py", [f"out={runs / 'ahead'}", "--resume",
                                                                          "max_steps=3"], 2,
                                                             "max_steps=3 is below step 5"),
        "evaluate: --out is --reuse, --force": (*ev("--reuse", w["results"], "--force", out=w["results"]), 2,
                                                "holds the input"),
        "evaluate: --out inside --reuse": (*ev("--reuse", w["results"], out=w["results"] / "again"), 2,
                                           "is inside the input"),
        "evaluate: --out inside --data": (*ev(out=data / "results"), 2, "is inside the input"),
        "evaluate: --samples 2000": (*ev("--samples", "2000"), 2, "--samples must be at most 1000, got 2000"),
        "evaluate: a 400-digit --bootstrap": (*ev("--bootstrap", "1" + "0" * 400), 2,
                                              "--bootstrap must be at most 100000, got 1000"),
        "evaluate: --force over probsam sample's folder": (*ev("--force", out=w["sampled"]), 2,
                                                           "was written by probsam sample, not evaluate.py"),
        "evaluate: --force over an old marker": (*ev("--force", out=w["done"]), 2, "older ProbSAM"),
        "import: --force over make_phantom's data set": ("import_pickle.py", [pickles / "hu_image.pickle", "--out", data,
                                                                             "--force"], 2,
                                                         "was written by make_phantom.py, not import_pickle.py"),
        "import: protocol-5 pickle with code": (*pk("evil_protocol5"), 2, "only numpy arrays"),
        "import: pickle calling numpy.load": (*pk("numpy_load"), 2, "wants to create numpy.load"),
        "phantom: --work-dir is --out": ("make_phantom.py", ["--out", root / "ph", "--work-dir", root / "ph"], 2,
                                         "overlap"),
        "phantom: --work-dir inside --out": ("make_phantom.py", ["--out", root / "ph", "--work-dir", root / "ph" / "w"],
                                             2, "overlap"),
        "phantom: --work-dir holds --out": ("make_phantom.py", ["--out", root / "wd" / "ph", "--work-dir", root / "wd"],
                                            2, "overlap"),
        "lidc: --out inside --dicom-root": ("prepare_lidc.py", ["--dicom-root", root / "dicom", "--out",
                                                                root / "dicom" / "built"], 2, "is inside the input"),
        "lidc: --work-dir is --out": ("prepare_lidc.py", ["--dicom-root", root / "dicom", "--out", root / "l",
                                                          "--work-dir", root / "l"], 2, "overlap"),
        "train: --resume a run with a removed setting": ("train.py", [f"out={runs / 'removed'}", "--resume"], 2,
                                                         "setting train_refiner_only was removed"),
        "train: loss.set_samples=0": (*train("loss.set_samples=0"), 2, "set_samples must be at least 1"),
        "train: a removed setting": (*train("empty_weight=5"), 2, "setting empty_weight was removed"),
        "evaluate: --samples 0": (*ev("--samples", "0"), 2, "--samples must be at least 1"),
        "evaluate: --max-slices -1": (*ev("--max-slices", "-1"), 2, "--max-slices must be at least 0"),
        "evaluate: --batch-size -1": (*ev("--batch-size", "-1"), 2, "--batch-size must be at least 0"),
        "evaluate: --box-margin nan": (*ev("--box-margin", "nan"), 2, "--box-margin"),
        "evaluate: corrupt weights": (*ev(model=weights / "garbage.safetensors"), 2, "not a usable"),
        "evaluate: foreign weights": (*ev(model=weights / "foreign.safetensors"), 2, "not a usable"),
        "evaluate: corrupt weights, --prior-mean": (*ev("--prior-mean", model=weights / "garbage.safetensors"), 2,
                                                    "not a usable"),
        "evaluate: missing weights": (*ev(model=weights / "none.safetensors"), 2, "no weights file"),
        "evaluate: missing data set": (*ev(data_dir=root / "nowhere"), 2, "is not a data set"),
        "evaluate: truncated data set": (*ev(data_dir=w["cut"]), 2, "truncated"),
        "evaluate: unknown device": (*ev("--device", "gpu"), 2, "unknown device"),
        "evaluate: --out exists": (*ev(out=w["done"]), 2, "already exists"),
        "evaluate: --out holds the weights": (*ev("--force", out=weights), 2, "holds the input"),
        "evaluate: --out not ours": (*ev("--force", out=runs / "notes"), 2, "not written by ProbSAM"),
        "evaluate: --reuse not a results folder": (*ev("--reuse", str(runs / "notes")), 2,
                                                   "not an evaluate.py output folder"),
        "import: empty file": (*pk("empty"), 2, "not a readable pickle"),
        "import: not a pickle": (*pk("text"), 2, "not a readable pickle"),
        "import: truncated pickle": (*pk("truncated"), 2, "not a readable pickle"),
        "import: pickle with code": (*pk("evil"), 2, "only numpy arrays"),
        "import: entry is a string": (*pk("string_entry"), 2, "expected a dict with 'image' and 'masks'"),
        "import: three masks": (*pk("three_masks"), 2, "3 masks, expected 4"),
        "import: image/mask shapes": (*pk("shapes"), 2, "image (9, 9) vs masks"),
        "import: masks of text": (*pk("text_masks"), 2, "not numeric arrays"),
        "import: empty dict": (*pk("empty_dict"), 2, "no slices"),
        "import: a list": (*pk("a_list"), 2, "expected a dict of slices"),
        "import: missing file": (*pk("none"), 2, "no such file"),
        "import: 3D image": (*pk("image_3d"), 2, "must be 2D"),
        "import: NaN image": (*pk("nan_image"), 2, "the image holds NaN or infinite values"),
        "import: every mask empty": (*pk("all_empty"), 2, "no slice with a non-empty mask"),
        "import: images in HU": (*pk("hu_image"), 2, "pickle images span (-1000.0, -1000.0), expected [0, 1]"),
        "import: --out holds the pickle": ("import_pickle.py", [pickles / "empty_dict.pickle", "--out", pickles,
                                                                "--force"], 2, "holds the input"),
        "phantom: --scans 0": ("make_phantom.py", ["--out", root / "ph", "--scans", "0"], 2, "--scans must be"),
        "phantom: --scans -1": ("make_phantom.py", ["--out", root / "ph", "--scans", "-1"], 2, "--scans must be"),
        "phantom: --crop 8": ("make_phantom.py", ["--out", root / "ph", "--crop", "8"], 2, "--crop must be"),
        "phantom: --pad-slices -1": ("make_phantom.py", ["--out", root / "ph", "--pad-slices", "-1"], 2,
                                     "--pad-slices must be"),
        "phantom: --out exists": ("make_phantom.py", ["--out", w["done"]], 2, "already exists"),
        "phantom: --work-dir is the working folder": ("make_phantom.py", ["--out", root / "ph", "--work-dir",
                                                                          root / "work"], 2, "working folder"),
        "lidc: missing --dicom-root": ("prepare_lidc.py", ["--dicom-root", root / "nowhere", "--out", root / "l"], 2,
                                       "no such folder"),
        "lidc: --scans -2": ("prepare_lidc.py", ["--dicom-root", root / "work", "--out", root / "l", "--scans", "-2"],
                             2, "--scans must be"),
        "lidc: --out holds the DICOM root": ("prepare_lidc.py", ["--dicom-root", root / "dicom", "--out",
                                                                 root / "dicom", "--force"], 2, "holds the input"),
    }
    if not torch.cuda.is_available():
        table["train: cuda without a GPU"] = (*train("device=cuda"), 2, "CUDA was requested")
        table["evaluate: cuda without a GPU"] = (*ev("--device", "cuda"), 2, "CUDA was requested")
    return table


def run_train_in_process(argv, monkeypatch) -> int:
    """train.py as `python Training/train.py ARGV`, its uncaught error ended as its exception hook ends it."""
    previous_term = signal.getsignal(signal.SIGTERM)
    monkeypatch.setattr(sys, "excepthook", sys.excepthook)  # restored after the test
    monkeypatch.setattr(sys, "argv", [str(TRAIN), *map(str, argv)])
    try:
        runpy.run_path(str(TRAIN), run_name="__main__")
        return 0
    except SystemExit as exit_:  # argparse
        return exit_.code
    except BaseException as error:  # noqa: B036 (what the hook receives)
        return errors.finish_script("train.py", error)
    finally:
        signal.signal(signal.SIGTERM, previous_term)


MAINS = {"evaluate.py": evaluate.main, "import_pickle.py": import_pickle.main,
         "make_phantom.py": make_phantom.main, "prepare_lidc.py": prepare_lidc.main}


def test_every_bad_input_fails_cleanly_and_touches_nothing(tmp_path, monkeypatch, capsys):
    world = make_world(tmp_path)
    monkeypatch.chdir(tmp_path / "work")
    table = cases(world)
    assert len(table) >= 20
    for name, (script, argv, status, words) in table.items():
        before = snapshot(tmp_path)
        if script == "train.py":
            code = run_train_in_process(argv, monkeypatch)
        else:
            code = MAINS[script]([str(a) for a in argv])
        err = capsys.readouterr().err
        error_lines = [line for line in err.splitlines() if "error:" in line]
        assert code == status, (name, code, err)
        assert len(error_lines) == 1 and error_lines[0].startswith(f"{script}: error: "), (name, err)
        assert words in error_lines[0], (name, err)
        assert "Traceback" not in err, (name, err)
        assert snapshot(tmp_path) == before, name
    assert not (tmp_path / "pwned_by_pickle").exists() and not (tmp_path / "pwned_by_ckpt").exists()


def run_train(argv, cwd, **env):
    return subprocess.run([sys.executable, str(TRAIN), *map(str, argv)], cwd=cwd, capture_output=True, text=True,
                          encoding="utf-8", env=dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", **env),
                          timeout=300)


def test_train_script_hook_gives_one_line_and_the_status_by_type(tmp_path):
    world = make_world(tmp_path)
    before = snapshot(tmp_path)
    done = run_train([f"data={world['data']}", f"out={tmp_path / 'run'}", "batch_size=abc"], tmp_path / "work")
    assert done.returncode == 2, done.stderr
    assert done.stderr == "train.py: error: setting batch_size must be a whole number, got 'abc'\n"
    assert snapshot(tmp_path) == before


def test_train_script_interrupted_at_start_up(tmp_path):
    child = subprocess.Popen([sys.executable, str(TRAIN), f"out={tmp_path / 'run'}"], cwd=tmp_path,
                             env=dict(os.environ, PYTHONPATH=str(ROOT), PROBSAM_TEST_PAUSE="startup"),
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             encoding="utf-8", preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert child.stderr.readline().strip() == "paused at startup"  # waits for the child: no sleep
    child.send_signal(signal.SIGINT)
    _, err = child.communicate(timeout=120)
    assert child.returncode == 130 and err.strip() == "train.py: interrupted", err
    assert list(tmp_path.iterdir()) == []


def test_evaluate_terminated_while_writing_leaves_nothing(tmp_path, monkeypatch, capsys):
    """At the writer's pause point the process sends itself SIGTERM (in-process: no child, no sleep)."""
    world = make_world(tmp_path)
    monkeypatch.chdir(tmp_path / "work")
    before = snapshot(tmp_path)

    def deliver(name, stream=None):
        if name == "writing":
            assert list(tmp_path.glob(".results.tmp-*")), "the results were being written"
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(errors, "pause_point", deliver)
    code = evaluate.main(["--data", str(world["data"]), "--model", str(world["weights"] / "probsam.safetensors"),
                          "--out", str(tmp_path / "results"), "--max-slices", "2", "--samples", "2"])
    err = capsys.readouterr().err
    assert code == 143 and err.strip().endswith("evaluate.py: terminated; nothing was written"), err
    assert "Traceback" not in err and snapshot(tmp_path) == before


def test_train_max_steps_below_one_is_refused_not_announced(tmp_path):
    from Training.config import load_config

    with pytest.raises(errors.SettingsError, match="max_steps must be at least 1"):
        load_config(None, ["max_steps=0"])


def test_a_run_that_fails_before_its_first_checkpoint_leaves_no_folder(tmp_path, monkeypatch, capsys):
    """A failure at run time after train.py made its run folder (here: a full disk while building the
    embedding cache) is one line, exit status 1, and the half-made folder is gone."""
    import errno
    from Training.data import embedding_cache

    data = tiny_dataset(tmp_path / "data")
    monkeypatch.chdir(tmp_path)

    def full_disk(model, data, path, **options):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(embedding_cache, "build_cache", full_disk)
    before = snapshot(tmp_path)
    code = run_train_in_process([f"data={data}", f"out={tmp_path / 'run'}", "preset=tiny", "num_threads=1",
                                 "batch_size=2", "max_steps=1"], monkeypatch)
    err = capsys.readouterr().err
    assert code == 1 and "train.py: error: no space left on device while writing" in err, err
    assert snapshot(tmp_path) == before and not (tmp_path / "run").exists()


def test_out_of_gpu_memory_is_one_line_that_says_what_to_change(tmp_path, monkeypatch, capsys):
    """No GPU here: the cache build raises the error torch raises on a full GPU (its real text, many lines).
    train.py ends with one line naming what failed and the settings that need less memory, exit status 1."""
    import torch
    from Training.data import embedding_cache

    data = tiny_dataset(tmp_path / "data")
    monkeypatch.chdir(tmp_path)

    def full_gpu(model, data, path, **options):
        raise torch.cuda.OutOfMemoryError(
            "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 23.55 GiB of which "
            "1.06 GiB is free. Including non-PyTorch memory, this process has 22.48 GiB memory in use.\nOf the "
            "allocated memory 21.9 GiB is allocated by PyTorch. If reserved but unallocated memory is large try "
            "setting PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True to avoid fragmentation.")

    monkeypatch.setattr(embedding_cache, "build_cache", full_gpu)
    before = snapshot(tmp_path)
    code = run_train_in_process([f"data={data}", f"out={tmp_path / 'run'}", "preset=tiny", "num_threads=1",
                                 "batch_size=2", "max_steps=1"], monkeypatch)
    err = capsys.readouterr().err
    line = "train.py: error: CUDA out of memory. Tried to allocate 2.00 GiB. The GPU cannot hold this much at once"
    assert code == 1 and err.count("\n") == 1 and err.startswith(line), err
    assert "batch_size" in err and "cache=true" in err and "PYTORCH_CUDA_ALLOC_CONF" not in err
    assert snapshot(tmp_path) == before and not (tmp_path / "run").exists()


def test_a_run_folder_left_by_a_killed_run_may_be_reused_a_foreign_one_not(tmp_path, monkeypatch):
    from Training.guards import check_run_folder

    monkeypatch.chdir(tmp_path)
    left = tmp_path / "left"  # what train.py writes before its first checkpoint
    (left / "embedding_cache").mkdir(parents=True)
    (left / "config.yaml").write_text("lr: 0.001\n")
    (left / "log.jsonl").write_text("")
    assert check_run_folder(left, resume=False) is True
    (left / "thesis.tex").write_text("not train.py's")
    with pytest.raises(errors.OutputRefusedError, match="neither empty nor a train.py run"):
        check_run_folder(left, resume=False)
    assert check_run_folder(tmp_path / "new", resume=False) is False



# --- the library calls behind the scripts: argument checks ---------------------------------------------------
def test_import_pickle_refuses_an_unknown_split_rule(tmp_path):
    """import_pickle(split=...) takes "patient" or "literature" only (the CLI's choices), before any work."""
    from ProbSAMLib.errors import SettingsError
    with pytest.raises(SettingsError, match="split must be 'patient' or 'literature', got 'series'"):
        import_pickle.import_pickle(None, tmp_path / "out", data={}, split="series")
    assert list(tmp_path.iterdir()) == []


def test_resume_checkpoint_contents_are_checked(tmp_path):
    """--resume reads ckpt.pt with weights_only and refuses a file without the learner, optimiser, step and
    best GED, or with a step that is not a count; a complete one is returned as saved."""
    from ProbSAMLib.errors import InputError
    from Training import guards
    path = tmp_path / "ckpt.pt"
    good = {"learner": {"w": torch.ones(2)}, "optimiser": {}, "step": 3, "best_ged": 0.5}
    torch.save({k: v for k, v in good.items() if k != "best_ged"}, path)
    with pytest.raises(InputError, match="not a train.py checkpoint .*learner, optimiser, step, best_ged"):
        guards.load_resume_state(path, "cpu")
    torch.save(dict(good, step=-1), path)
    with pytest.raises(InputError, match="step -1 is not a step count"):
        guards.load_resume_state(path, "cpu")
    torch.save(dict(good, step=2.5), path)
    with pytest.raises(InputError, match="step 2.5 is not a step count"):
        guards.load_resume_state(path, "cpu")
    torch.save(good, path)
    state = guards.load_resume_state(path, "cpu")
    assert state["step"] == 3 and state["best_ged"] == 0.5 and torch.equal(state["learner"]["w"], torch.ones(2))


def test_a_run_folder_with_a_checkpoint_needs_resume(tmp_path, capsys):
    """out= holding ckpt.pt without --resume is refused (it would overwrite the run); guards.say writes to
    stderr only."""
    from ProbSAMLib.errors import OutputRefusedError
    from Training import guards
    run = tmp_path / "run"
    run.mkdir()
    (run / "ckpt.pt").write_bytes(b"a checkpoint")
    with pytest.raises(OutputRefusedError, match="already holds a run .*pass --resume"):
        guards.check_run_folder(run, resume=False)
    assert guards.check_run_folder(run, resume=True) is True
    guards.say("a message")
    captured = capsys.readouterr()
    assert captured.err == "a message\n" and captured.out == ""


def test_learner_argument_checks():
    """The learners refuse what would otherwise sample silently wrong: a mode other than sample/mean, noise
    of the wrong shape, an unknown model kind, and a weights path that does not exist."""
    from ProbSAMLib.errors import InputError
    from Training.learning.learners import build_learner, is_probsam_file, load_weights
    cfg = TrainConfig(preset="tiny", seed=0)
    learner = build_learner(cfg).eval()
    images, boxes = torch.rand(1, 64, 64), torch.tensor([[16.0, 16.0, 48.0, 48.0]])
    with pytest.raises(ValueError, match="mode must be 'sample' or 'mean', got 'median'"):
        learner.sample_probabilities(images, boxes, 2, mode="median")
    latent = learner.model.config.latent_dim
    with pytest.raises(ValueError, match=rf"noise must have shape \(1, 2, {latent}\), got \(1, 3, {latent}\)"):
        learner.sample_probabilities(images, boxes, 2, noise=torch.zeros(1, 3, latent))
    fixed = learner.sample_probabilities(images, boxes, 2, noise=torch.zeros(1, 2, latent))
    assert fixed.shape == (1, 2, 64, 64) and torch.equal(fixed[0, 0], fixed[0, 1])  # one z, twice
    with pytest.raises(ValueError, match="model must be 'probsam' or 'prob_unet', got 'unet'"):
        build_learner(TrainConfig(preset="tiny", model="unet"))  # built by hand: no settings check on the way
    for check in (load_weights, is_probsam_file):
        with pytest.raises(InputError, match="--model /nowhere/m.safetensors: no such file"):
            check("/nowhere/m.safetensors")


# --- round 3: what must be accepted, and said -------------------------------------------------------------------
def test_yaml_numbers_in_exponent_form_are_read_as_numbers(tmp_path):
    """PyYAML reads YAML 1.1, where `1e-3` (no dot) is text; a config file and an override both mean the number."""
    from Training.config import load_config

    (tmp_path / "run.yaml").write_text("lr: 1e-3\nmin_lr: 5E-5\nweight_decay: 1.0e-2\nout: runs/1e5\n",
                                       encoding="utf-8")
    cfg = load_config(str(tmp_path / "run.yaml"), ["loss.beta=2e0"])
    assert (cfg.lr, cfg.min_lr, cfg.weight_decay, cfg.loss.beta) == (1e-3, 5e-5, 1e-2, 2.0)
    assert cfg.out == "runs/1e5"  # text stays text
    with pytest.raises(errors.SettingsError, match="setting lr must be a number, got '1e'"):
        load_config(None, ["lr=1e"])


def test_import_pickle_reads_the_highest_protocol_and_warns_of_a_one_patient_split(tmp_path, capsys):
    """pickle.HIGHEST_PROTOCOL (5) stores numpy arrays through numpy's _frombuffer: read, values unchanged. With
    three patients, each split gets one: one warning line for each, naming the split."""
    from Training.data.dataset_format import load_dataset

    rng = np.random.default_rng(0)
    slices = {f"LIDC-IDRI-000{p}_slice_{k}": {"image": rng.random((8, 8), dtype=np.float32),
                                               "masks": [np.ones((8, 8))] * 4, "series_uid": f"1.{p}"}
              for p in range(3) for k in range(2)}
    (tmp_path / "lidc.pickle").write_bytes(pickle.dumps(slices, protocol=pickle.HIGHEST_PROTOCOL))
    assert import_pickle.main([str(tmp_path / "lidc.pickle"), "--out", str(tmp_path / "ds")]) == 0
    data = load_dataset(tmp_path / "ds")
    assert np.array_equal(data.images[0], slices["LIDC-IDRI-0000_slice_0"]["image"])
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 3, warnings
    for part, line in zip(("train", "val", "test"), warnings):
        assert f"the {part} split holds only one patient (LIDC-IDRI-000" in line, line


def test_resume_accepts_max_steps_at_or_above_the_step_reached(tmp_path):
    from Training import guards

    run = resumable_run(tmp_path / "run", tmp_path / "data", step=5)
    for max_steps in (5, 6, None):
        assert guards.load_resume_state(run / "ckpt.pt", "cpu", max_steps)["step"] == 5
    with pytest.raises(errors.SettingsError, match="max_steps=4 is below step 5"):
        guards.load_resume_state(run / "ckpt.pt", "cpu", 4)
