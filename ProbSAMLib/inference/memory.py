"""How many slices to put through the model at once: memory estimates and out-of-memory handling.

Shared by the volume sampler (ProbSAMLib.inference.volume), Training's embedding cache and evaluate.py, so a SAM
encoder is batched the same way everywhere. The estimates are generous on purpose and measured against
real peaks: SAM ViT-B at 1024² on an NVIDIA H200 (Testing/benchmarks/embedding_cache.py) peaked at 2.4 GiB
a slice in float32 and 2.0 GiB under bf16 autocast, weights included; the estimate gives 2.4 and 2.3 GiB.
"""

from __future__ import annotations

import os

import torch

from ProbSAMLib.modeling.config import ENCODER_VARIANTS

# Chunks larger than this gain nothing on a CPU and only cost memory.
CPU_MAX_BATCH = 8
GPU_MAX_BATCH = 32


def bytes_per_slice(model, n_samples: int, half: bool) -> int:
    """A generous estimate of the peak memory one slice needs in the encoder and the N-sample decoder
    (``n_samples=0``: the encoder alone, as when caching embeddings)."""
    config = model.config
    variant = ENCODER_VARIANTS[config.encoder]
    tokens = config.embedding_size ** 2
    element = 2 if half else 4
    if config.family == "tinyvit":
        # TinyViT: windowed attention only (no global T x T scores); the largest activations are its first
        # stage's MBConv (64 channels x 4 expansion at 64²); 16 such maps bound the rest generously.
        attention = 0
        activations = 16 * tokens * 4 * variant["embed_dims"][0] * element
    else:
        # SAM's global attention materialises (heads, T, T) scores; softmax and rel-pos keep ~3 copies, and
        # autocast runs softmax in float32, so half precision does not halve them (measured: 2.0 vs 2.4 GiB).
        attention = 3 * variant["num_heads"] * tokens ** 2 * 4
        activations = 16 * tokens * variant["embed_dim"] * element
    # Decoder: N logit maps upsampled to img_size², in float32, plus the resized copies; and its two-way
    # transformer, which holds the image tokens once per sample, several copies alive at once (measured: 100
    # samples of LiteMedSAM's 64² x 256 tokens took several GiB a slice).
    decoder = 3 * n_samples * config.img_size ** 2 * 4 + 6 * n_samples * tokens * config.prompt_dim * 4
    # Mask refiner: its input (2 channels) and two hidden maps alive at once, every sample at img_size².
    refiner = n_samples * config.img_size ** 2 * (2 + 2 * config.refine_channels) * 4 if config.refine_channels else 0
    return attention + activations + decoder + refiner


def available_bytes(device: torch.device) -> int:
    """Free memory on ``device``: the GPU's free memory, the host's available memory, 1 GiB on MPS."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        # Blocks torch's allocator holds but no tensor uses are free to this process, though not to the driver
        # (measured: after a float32 run, the driver's figure alone chose 13 slices instead of 29).
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return int(free + cached)
    if device.type == "cpu":
        return host_available_bytes()
    return 1 << 30  # MPS reports no free memory; stay modest


def host_available_bytes() -> int:
    """Memory the OS can give without swapping: MemAvailable (Linux), else free pages, else 2 GiB."""
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):  # not on Linux/macOS
        return 2 << 30


def choose_batch(model, n_samples: int, n_slices: int, cap: int = 0) -> int:
    """Slices per chunk: half the free memory over the per-slice estimate, within [1, cap] and n_slices.

    ``cap`` 0 = the device's default (GPU_MAX_BATCH on CUDA, else CPU_MAX_BATCH)."""
    device = model.device
    per_slice = bytes_per_slice(model, n_samples, half=device.type == "cuda")
    cap = cap or (GPU_MAX_BATCH if device.type == "cuda" else CPU_MAX_BATCH)
    return int(max(1, min(cap, n_slices, available_bytes(device) // 2 // per_slice)))


def release_cached_memory() -> None:
    """Give the allocator's cached blocks back after an out-of-memory error, before retrying smaller."""
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
