"""Frozen-encoder embedding cache: every slice of a split encoded once, stored fp16 and memory-mapped.

With a frozen image encoder the embedding of a slice never changes, so recomputing it every step (as the
reference code does) wastes most of the training time. The cache file's name carries a hash of the
encoder weights and of the data set, so a different encoder or data set never reads a stale cache.
fp16 halves the size (vit_b: 256 x 64 x 64 x 2 B = 2 MiB a slice); the training step upcasts to fp32.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ProbSAMLib.model import ProbSAM


def encoder_fingerprint(model: ProbSAM) -> str:
    """Short hash of the image encoder's weights and the preprocessing that feeds it."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.sam.image_encoder.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().float().numpy().tobytes())
    digest.update(json.dumps([model.config.img_size, model.config.window]).encode())
    return digest.hexdigest()[:16]


def cache_file(cache_dir: Path, batches, split: str, model: ProbSAM) -> Path:
    meta = batches.dataset.meta
    data_key = hashlib.sha256(json.dumps([str(meta.get("created")), meta.get("n_slices"), split,
                                          len(batches)]).encode()).hexdigest()[:8]
    return Path(cache_dir) / f"embeddings_{split}_{data_key}_{encoder_fingerprint(model)}.npy"


@torch.no_grad()
def build_cache(model: ProbSAM, batches, path: Path, batch_size: int = 32, progress: bool = True) -> Path:
    """Encode every slice of ``batches`` into an fp16 (S, C, h, w) .npy at ``path`` (atomic)."""
    path = Path(path)
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    grid, channels = model.config.embedding_size, model.config.prompt_dim
    tmp = path.with_name(path.name + f".{os.getpid()}.part")
    store = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16, shape=(len(batches), channels, grid, grid))
    try:
        model.eval()
        for start in tqdm(range(0, len(batches), batch_size), desc=f"caching {path.name}", disable=not progress):
            positions = np.arange(start, min(start + batch_size, len(batches)))
            images = batches.read(positions).images
            store[start:start + len(positions)] = model.encode(images).float().cpu().numpy().astype(np.float16)
        store.flush()
        del store
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def open_cache(path: Path) -> np.ndarray:
    return np.load(path, mmap_mode="r")


def cached_embeddings(cache: np.ndarray, positions: np.ndarray, device: torch.device) -> torch.Tensor:
    """(B, C, h, w) fp32 embeddings of the split's ``positions``."""
    return torch.from_numpy(np.asarray(cache[np.asarray(positions)], dtype=np.float32)).to(device)
