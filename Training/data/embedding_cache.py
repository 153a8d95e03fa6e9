"""Frozen-encoder embedding cache: every slice of a split encoded once, stored fp16 and memory-mapped.

With a frozen image encoder the embedding of a slice never changes, so recomputing it every step (as the
reference code does) wastes most of the training time. The cache file's name carries a hash of the
encoder weights and of the data set, so a different encoder or data set never reads a stale cache.
fp16 halves the size (vit_b: 256 x 64 x 64 x 2 B = 2 MiB a slice); the training step upcasts to fp32.

Flips: an encoder is not flip-equivariant, so a flipped slice needs its own embedding. With flips on,
the training cache holds all four flip variants of every slice (Training/batches.FLIP_CODES: 4x the
size) and each step reads the variant its random flip chose; flips are never silently turned off.
The array is (S, V, C, h, w) with V = 1 (no flips) or 4.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from tqdm import tqdm

from ProbSAMLib import errors
from ProbSAMLib.inference import memory
from ProbSAMLib.modeling.probsam import ProbSAM
from Training.data.batches import FLIP_CODES, flip_images


def encoder_fingerprint(model: ProbSAM) -> str:
    """Short hash of the image encoder's weights and the preprocessing that feeds it."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.sam.image_encoder.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().float().numpy().tobytes())
    inputs = [model.config.img_size, model.config.window] + (["neighbours"] if model.config.neighbour_slices else [])
    digest.update(json.dumps(inputs).encode())
    return digest.hexdigest()[:16]


def cache_file(cache_dir: Path, batches, split: str, model: ProbSAM, flips: bool = False) -> Path:
    meta = batches.dataset.meta
    data_key = hashlib.sha256(json.dumps([str(meta.get("created")), meta.get("n_slices"), split,
                                          len(batches)]).encode()).hexdigest()[:8]
    variants = f"_flips{len(FLIP_CODES)}" if flips else ""
    return Path(cache_dir) / f"embeddings_{split}_{data_key}_{encoder_fingerprint(model)}{variants}.npy"


@torch.no_grad()
def build_cache(model: ProbSAM, batches, path: Path, batch_size: Optional[int] = None, progress: bool = True,
                flips: bool = False) -> Path:
    """Encode every slice of ``batches`` into an fp16 (S, V, C, h, w) .npy at ``path`` (atomic); V = 4 flip
    variants (FLIP_CODES order) when ``flips``, else 1.

    ``batch_size`` None chooses the slices per chunk from free memory (ProbSAMLib.inference.memory: SAM ViT-B needs
    about 2.4 GiB a slice); an out-of-memory error halves the chunk and encodes it again, so a smaller GPU
    builds the same cache, only in more chunks.
    """
    path = Path(path)
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    grid, channels = model.config.embedding_size, model.config.prompt_dim
    tmp = path.with_name(path.name + f".{os.getpid()}.part")
    codes = FLIP_CODES if flips else (0,)
    chunk = int(batch_size) if batch_size else memory.choose_batch(model, 0, len(batches))
    store = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16,
                                      shape=(len(batches), len(codes), channels, grid, grid))
    try:
        model.eval()
        with tqdm(total=len(batches), desc=f"caching {path.name}", disable=not progress) as bar:
            start = 0
            while start < len(batches):
                positions = np.arange(start, min(start + chunk, len(batches)))
                try:
                    store[start:start + len(positions)] = _encode_variants(model, batches, positions, codes)
                except Exception as error:
                    if not errors.is_gpu_out_of_memory(error) or chunk == 1:
                        raise
                    memory.release_cached_memory()
                    chunk = max(1, chunk // 2)
                    continue
                start += len(positions)
                bar.update(len(positions))
        store.flush()
        del store
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def _encode_variants(model: ProbSAM, batches, positions: np.ndarray, codes) -> np.ndarray:
    """(B, V, C, h, w) fp16 embeddings of ``positions``, one variant per flip code."""
    images = batches.read(positions).model_images(model.config.neighbour_slices)
    encoded = [model.encode(flip_images(images, code).contiguous()).float().cpu().numpy() for code in codes]
    return np.stack(encoded, axis=1).astype(np.float16)


def open_cache(path: Path) -> np.ndarray:
    return np.load(path, mmap_mode="r")


def cached_embeddings(cache: np.ndarray, positions: np.ndarray, device: torch.device,
                      flips: Optional[np.ndarray] = None) -> torch.Tensor:
    """(B, C, h, w) fp32 embeddings of the split's ``positions``, flipped by the codes ``flips`` (B,)."""
    positions = np.asarray(positions)
    codes = np.zeros(len(positions), dtype=np.int64) if flips is None else np.asarray(flips, dtype=np.int64)
    if codes.any() and cache.shape[1] != len(FLIP_CODES):
        raise ValueError("flipped embeddings asked of a cache built without flips")
    variants = codes if cache.shape[1] == len(FLIP_CODES) else np.zeros_like(codes)
    return torch.from_numpy(np.asarray(cache[positions, variants], dtype=np.float32)).to(device)
