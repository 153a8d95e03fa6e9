"""Weights: safetensors round trip, heads-only files, SAM .pth loading, and clear errors for bad files."""

import hashlib

import numpy as np
import pytest
import torch

from ProbSAMLib import ProbSAMConfig, build_probsam, load_probsam, save_probsam
from ProbSAMLib.weights import checkpoints
from ProbSAMLib.weights.build import load_model
from ProbSAMLib.errors import CheckpointError
from ProbSAMLib.weights import registry
from ProbSAMLib.weights.registry import WeightsFile
from ProbSAMLib.inference.sampling import sample_masks

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tiny():
    m = build_probsam(ProbSAMConfig.preset("tiny", latent_dim=4), seed=3).eval()
    torch.nn.init.normal_(m.latent_projection.mlp[-1].weight, std=0.5)
    return m


def image():
    return np.random.default_rng(0).normal(-700, 100, (128, 128)).astype(np.float32)


def test_full_round_trip_gives_identical_samples(tiny, tmp_path):
    path = tmp_path / "m.safetensors"
    save_probsam(tiny, path, extra={"note": "test"})
    loaded = load_probsam(path).eval()
    assert loaded.config == tiny.config  # the config travels inside the file
    a = sample_masks(tiny, image(), [30, 30, 90, 90], n_samples=3, seed=0).probabilities
    b = sample_masks(loaded, image(), [30, 30, 90, 90], n_samples=3, seed=0).probabilities
    assert np.array_equal(a, b)
    assert not list(tmp_path.glob("*.part"))  # no temporary file left behind


def test_heads_only_file_needs_and_uses_the_sam_checkpoint(tiny, tmp_path):
    heads = tmp_path / "heads.safetensors"
    save_probsam(tiny, heads, heads_only=True)
    sam_pth = tmp_path / "sam.pth"
    torch.save(tiny.sam.state_dict(), sam_pth)
    with pytest.raises(CheckpointError, match="also give the SAM checkpoint"):
        load_probsam(heads)
    loaded = load_probsam(heads, sam_checkpoint=sam_pth).eval()
    a = sample_masks(tiny, image(), [30, 30, 90, 90], n_samples=2, seed=1).probabilities
    b = sample_masks(loaded, image(), [30, 30, 90, 90], n_samples=2, seed=1).probabilities
    assert np.array_equal(a, b)
    assert heads.stat().st_size < (tmp_path / "sam.pth").stat().st_size  # the encoder is not in it


def test_sam_pth_loads_into_the_builder(tiny, tmp_path):
    sam_pth = tmp_path / "sam.pth"
    torch.save(tiny.sam.state_dict(), sam_pth)
    fresh = build_probsam(tiny.config, sam_checkpoint=sam_pth)
    for key, value in tiny.sam.state_dict().items():
        assert torch.equal(fresh.sam.state_dict()[key], value)


def test_truncated_safetensors_is_a_clear_error(tiny, tmp_path):
    path = tmp_path / "m.safetensors"
    save_probsam(tiny, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_probsam(path)


def test_truncated_pth_is_a_clear_error(tiny, tmp_path):
    sam_pth = tmp_path / "sam.pth"
    torch.save(tiny.sam.state_dict(), sam_pth)
    sam_pth.write_bytes(sam_pth.read_bytes()[:5000])
    with pytest.raises(CheckpointError, match="not a readable PyTorch checkpoint"):
        build_probsam(tiny.config, sam_checkpoint=sam_pth)


def test_wrong_shapes_name_the_tensor(tiny, tmp_path):
    sam_pth = tmp_path / "sam.pth"
    torch.save(tiny.sam.state_dict(), sam_pth)
    other = ProbSAMConfig.preset("tiny", prompt_dim=64)
    with pytest.raises(CheckpointError, match="wrong shape"):
        build_probsam(other, sam_checkpoint=sam_pth)


def test_plain_safetensors_is_not_mistaken_for_probsam(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "other.safetensors"
    save_file({"w": torch.zeros(2)}, str(path))
    with pytest.raises(CheckpointError, match="not a ProbSAM checkpoint"):
        load_probsam(path)


def test_sha256_mismatch_is_refused(tmp_path, monkeypatch):
    good = tmp_path / "w.bin"
    good.write_bytes(b"weights")
    sha = hashlib.sha256(b"weights").hexdigest()
    entry = WeightsFile("fake", "w.bin", "http://127.0.0.1:9/w.bin", sha, 7, "test", "test")
    monkeypatch.setitem(registry.MANIFEST, "fake", entry)
    assert checkpoints.resolve_weights("fake", good) == good
    bad = tmp_path / "bad.bin"
    bad.write_bytes(b"weightz")
    with pytest.raises(CheckpointError, match="does not match the expected"):
        checkpoints.resolve_weights("fake", bad)


def test_missing_weights_offline_say_where_to_put_them(tmp_path, monkeypatch):
    monkeypatch.setenv("PROBSAM_CACHE", str(tmp_path / "cache"))
    with pytest.raises(CheckpointError, match=r"sam_vit_b_01ec64\.pth.*cache.*--sam-checkpoint.*probsam fetch sam_vit_b"):
        checkpoints.resolve_weights("sam_vit_b", download=False)


def test_failed_download_leaves_no_partial_file(tmp_path, monkeypatch):
    monkeypatch.setenv("PROBSAM_CACHE", str(tmp_path / "cache"))
    # port 9 on loopback: nothing listens, the connection is refused at once
    entry = WeightsFile("fake", "w.bin", "http://127.0.0.1:9/w.bin", "0" * 64, 7, "test", "test")
    monkeypatch.setitem(registry.MANIFEST, "fake", entry)
    with pytest.raises(CheckpointError, match="could not download"):
        checkpoints.resolve_weights("fake", progress=False)
    assert not any((tmp_path / "cache").iterdir())


def test_unknown_model_name_is_a_clear_error():
    with pytest.raises(CheckpointError, match="unknown model 'vit_x'"):
        load_model("vit_x")


def test_one_table_names_every_model_and_its_weights_file():
    """registry.MODELS is the one table: the weights files (MANIFEST) are read off it, and load_model's
    default is its DEFAULT_MODEL."""
    import inspect

    assert registry.MANIFEST == {e.weights.name: e.weights for e in registry.MODELS.values() if e.weights}
    assert checkpoints.MANIFEST is registry.MANIFEST
    assert inspect.signature(load_model).parameters["name"].default == registry.DEFAULT_MODEL
    assert registry.DEFAULT_MODEL in registry.MODELS
    for entry in registry.MODELS.values():
        assert entry.loader in registry.LOADERS
        assert (entry.weights is None) == (entry.loader == "file"), entry.name
        if entry.loader == "bundled":
            assert entry.weights.bundled and checkpoints.entry_path(entry.weights).is_file(), entry.name
    with pytest.raises(CheckpointError, match="unknown weights 'sam_vit_q'"):
        checkpoints.resolve_weights("sam_vit_q")
