"""Weights: safetensors round trip, heads-only files, SAM .pth loading, and clear errors for bad files."""

import hashlib
import re
from pathlib import Path

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

    assert registry.MANIFEST == {f.name: f for e in registry.MODELS.values() for f in (e.weights, e.heads) if f}
    assert inspect.signature(load_model).parameters["name"].default == registry.DEFAULT_MODEL
    assert registry.DEFAULT_MODEL in registry.MODELS
    for entry in registry.MODELS.values():
        assert entry.loader in registry.LOADERS
        assert (entry.weights is None) == (entry.loader == "file"), entry.name
        if entry.loader == "bundled":
            assert entry.weights.bundled and checkpoints.entry_path(entry.weights).is_file(), entry.name
        if entry.heads is not None:  # shipped heads are in the package, and verified like every file
            assert entry.heads.bundled and checkpoints.entry_path(entry.heads).is_file(), entry.name
    with pytest.raises(CheckpointError, match="unknown weights 'sam_vit_q'"):
        checkpoints.resolve_weights("sam_vit_q")


# --- the per-kind loaders of load_model, and the weights cache ---------------------------------------------
def test_file_model_without_a_checkpoint_says_what_to_pass():
    """load_model("file") needs the ProbSAM file: without one, a CheckpointError naming --checkpoint."""
    with pytest.raises(CheckpointError, match=r"model 'file' needs --checkpoint PATH"):
        load_model("file")


@pytest.fixture
def tiny_sam_heads_model(tiny, tmp_path, monkeypatch):
    """A registry entry of the "sam_heads" kind for the tiny preset, so the SAM-plus-heads loader runs on
    small files: SAM's weights are the tiny model's SAM state dict saved with torch.save (the format of
    the official sam_vit_*.pth), and the entry's SHA-256 is that file's, so resolve_weights verifies it as
    it verifies the official files. Only the table entry is a test one; the loader, the SHA-256 check and
    the state-dict loading are the library's own."""
    sam_pth = tmp_path / "sam_tiny.pth"
    torch.save(tiny.sam.state_dict(), sam_pth)
    weights = WeightsFile("sam_tiny", "sam_tiny.pth", None, checkpoints.sha256_file(sam_pth),
                          sam_pth.stat().st_size, "test", "tiny SAM for tests")
    entry = registry.ModelEntry("tiny", "SAM tiny + ProbSAM heads (test entry)", False, 0, "sam_heads",
                                weights=weights)
    monkeypatch.setitem(registry.MODELS, "tiny", entry)
    monkeypatch.setitem(registry.MANIFEST, "sam_tiny", weights)
    monkeypatch.setenv("PROBSAM_CACHE", str(tmp_path / "cache"))
    return sam_pth


def test_sam_model_without_heads_warns_and_has_sams_weights(tiny, tiny_sam_heads_model):
    """SAM weights without --checkpoint: a warning that the prior is untrained, and a model whose SAM
    part is exactly the given file's weights (every sample is then SAM's own box prediction)."""
    with pytest.warns(UserWarning, match=r"no ProbSAM heads given for tiny: the prior is untrained"):
        model = load_model("tiny", sam_checkpoint=tiny_sam_heads_model, device="cpu", download=False)
    assert not model.training and model.config.encoder == "tiny"
    for key, value in tiny.sam.state_dict().items():
        assert torch.equal(model.sam.state_dict()[key], value), key
    masks = sample_masks(model, image(), [30, 30, 90, 90], n_samples=3, seed=0).probabilities
    assert np.array_equal(masks[:, 0], masks[:, 1]) and np.array_equal(masks[:, 0], masks[:, 2])


def test_sam_model_with_heads_gives_the_trained_model(tiny, tiny_sam_heads_model, tmp_path):
    """SAM weights plus a heads file (--checkpoint): the loaded model samples exactly as the one saved."""
    heads = tmp_path / "heads.safetensors"
    save_probsam(tiny, heads, heads_only=True)
    model = load_model("tiny", checkpoint=heads, sam_checkpoint=tiny_sam_heads_model, device="cpu",
                       download=False)
    a = sample_masks(tiny, image(), [30, 30, 90, 90], n_samples=2, seed=4).probabilities
    b = sample_masks(model, image(), [30, 30, 90, 90], n_samples=2, seed=4).probabilities
    assert np.array_equal(a, b)


def test_sam_model_refuses_a_sam_file_with_another_checksum(tiny_sam_heads_model, tmp_path):
    """The SAM file given is verified against the registry's SHA-256 before it is loaded."""
    other = tmp_path / "other.pth"
    other.write_bytes(tiny_sam_heads_model.read_bytes() + b"\0")
    with pytest.raises(CheckpointError, match="does not match the expected"):
        load_model("tiny", sam_checkpoint=other, device="cpu", download=False)


def test_copy_into_cache_verifies_and_then_resolves_from_the_cache(tmp_path, monkeypatch):
    """`probsam fetch NAME --from FILE`: a file with the right SHA-256 is copied into the cache (no
    temporary file left), resolve_weights then finds it there offline; a bundled entry is refused."""
    monkeypatch.setenv("PROBSAM_CACHE", str(tmp_path / "cache"))
    source = tmp_path / "download.bin"
    source.write_bytes(b"some weights")
    entry = WeightsFile("fake", "w.bin", "http://127.0.0.1:9/w.bin",
                        hashlib.sha256(b"some weights").hexdigest(), 12, "test", "test")
    monkeypatch.setitem(registry.MANIFEST, "fake", entry)
    target = checkpoints.copy_into_cache(source, "fake")
    assert target == tmp_path / "cache" / "w.bin" and target.read_bytes() == b"some weights"
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["w.bin"]
    assert checkpoints.resolve_weights("fake", download=False) == target
    with pytest.raises(CheckpointError, match="'lite_medsam_heads' is bundled with ProbSAM and cannot be replaced"):
        checkpoints.copy_into_cache(source, "lite_medsam_heads")


def test_download_writes_the_verified_file_into_the_cache(tmp_path, monkeypatch):
    """A download (urlopen replaced by an in-memory response, so no network) is written in blocks,
    verified and moved into the cache; a second resolve uses the cached file without downloading."""
    import io
    import urllib.request

    payload = b"w" * (3 << 20) + b"tail"  # more than one 1 MiB block
    opened = []

    class Response(io.BytesIO):
        headers = {"Content-Length": str(len(payload))}

    def urlopen(url, timeout):
        opened.append(url)
        return Response(payload)

    monkeypatch.setattr(urllib.request, "urlopen", urlopen)
    monkeypatch.setenv("PROBSAM_CACHE", str(tmp_path / "cache"))
    entry = WeightsFile("fake", "w.bin", "http://example.invalid/w.bin", hashlib.sha256(payload).hexdigest(),
                        None, "test", "test")
    monkeypatch.setitem(registry.MANIFEST, "fake", entry)
    path = checkpoints.resolve_weights("fake", progress=False)
    assert path == tmp_path / "cache" / "w.bin" and path.read_bytes() == payload
    assert opened == ["http://example.invalid/w.bin"]
    assert sorted(p.name for p in path.parent.iterdir()) == ["w.bin"]  # no .part left
    assert checkpoints.resolve_weights("fake", progress=False) == path and len(opened) == 1


def test_weights_file_errors_name_the_problem(tmp_path, monkeypatch):
    """A given path that does not exist, a bundled file missing from the installation, and a weights entry
    without a checksum (accepted as it is)."""
    with pytest.raises(CheckpointError, match="weights file .*nope.pth does not exist"):
        checkpoints.resolve_weights("sam_vit_b", tmp_path / "nope.pth")
    monkeypatch.setattr(checkpoints, "PACKAGE_MODELS", tmp_path / "no_models")
    with pytest.raises(CheckpointError, match="bundled weights .*probsam_lite_medsam_heads.safetensors are missing"):
        checkpoints.resolve_weights("lite_medsam_heads")
    unchecked = tmp_path / "u.bin"
    unchecked.write_bytes(b"anything")
    monkeypatch.setitem(registry.MANIFEST, "unchecked",
                        WeightsFile("unchecked", "u.bin", None, None, None, "test", "test"))
    assert checkpoints.resolve_weights("unchecked", unchecked) == unchecked


def test_cache_dir_is_the_platform_cache_unless_overridden(tmp_path, monkeypatch):
    """Without PROBSAM_CACHE the cache is platformdirs' user cache for ProbSAMSlicer (a "weights" folder);
    with it, that folder (user-expanded)."""
    import platformdirs

    monkeypatch.delenv("PROBSAM_CACHE", raising=False)
    assert checkpoints.cache_dir() == Path(platformdirs.user_cache_dir("ProbSAMSlicer", appauthor=False)) / "weights"
    monkeypatch.setenv("PROBSAM_CACHE", "~/probsam-weights")
    assert checkpoints.cache_dir() == Path("~/probsam-weights").expanduser()


def test_weights_sha256_is_the_files_or_the_registrys(tmp_path):
    """Provenance: the SHA-256 of the --checkpoint file when one is given, else the registry's value for
    the model (for a bundled model, that of the file it is loaded from)."""
    given = tmp_path / "m.safetensors"
    given.write_bytes(b"model bytes")
    assert checkpoints.weights_sha256("file", given) == hashlib.sha256(b"model bytes").hexdigest()
    heads = registry.MODELS["lite_medsam"].heads  # the trained part; the backbone's SHA-256 is the registry's
    assert checkpoints.weights_sha256("lite_medsam") == heads.sha256
    assert checkpoints.sha256_file(checkpoints.entry_path(heads)) == heads.sha256


def test_weights_sha256_hashes_the_file_of_an_entry_without_a_checksum(tmp_path, monkeypatch):
    """An entry without a recorded SHA-256: the provenance hash is computed from its file."""
    monkeypatch.setattr(checkpoints, "PACKAGE_MODELS", tmp_path)
    (tmp_path / "x.safetensors").write_bytes(b"unrecorded")
    weights = WeightsFile("x", "x.safetensors", None, None, None, "test", "test", bundled=True)
    monkeypatch.setitem(registry.MODELS, "x", registry.ModelEntry("x", "test", False, 1, "bundled", weights=weights))
    assert checkpoints.weights_sha256("x") == hashlib.sha256(b"unrecorded").hexdigest()


def test_a_pth_that_is_not_a_state_dict_is_refused(tmp_path):
    """A readable torch file holding something other than {name: tensor} is a CheckpointError."""
    path = tmp_path / "list.pth"
    torch.save([torch.zeros(2)], path)
    with pytest.raises(CheckpointError, match="does not hold a state dict of tensors"):
        checkpoints.load_torch_checkpoint(path)
    torch.save({"a": torch.zeros(2), "step": 3}, path)
    with pytest.raises(CheckpointError, match="does not hold a state dict of tensors"):
        checkpoints.load_torch_checkpoint(path)


def test_missing_probsam_file_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="weights file .*none.safetensors does not exist"):
        load_probsam(tmp_path / "none.safetensors")


def test_a_failed_save_leaves_neither_the_file_nor_a_temporary_one(tmp_path):
    """safetensors refuses a non-contiguous tensor: the temporary file is removed and no file appears."""
    with pytest.raises(ValueError):
        checkpoints.save_safetensors({"w": torch.zeros(4, 4).t()}, tmp_path / "out.safetensors", {"format": "x"})
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("config, words", [
    ("{not json", "is not JSON"),
    (None, "is not JSON"),
    ("[1, 2]", "is not a JSON object"),
    ('{"img_size": 0}', "img_size = 0"),
    ('{"img_size": true}', "img_size = True"),
    ('{"window": [1]}', "window = [1]"),
    ('{"freeze_encoder": "yes"}', "freeze_encoder = 'yes'"),
    ('{"extra": []}', "wrong 'extra' or 'encoder'"),
    ('{"encoder": 3}', "wrong 'extra' or 'encoder'"),
])
def test_a_stored_config_that_is_not_usable_is_refused(config, words):
    """config_from_metadata names the bad field of a weights file's stored config (a corrupt or foreign
    file must end in a CheckpointError, never reach torch with a nonsense size)."""
    with pytest.raises(CheckpointError, match=re.escape(words)):
        checkpoints.config_from_metadata(config, "w.safetensors")


def test_a_stored_config_round_trips(tiny):
    """The config a saved file holds is read back equal to the model's."""
    assert checkpoints.config_from_metadata(tiny.config.to_json(), "w.safetensors") == tiny.config
