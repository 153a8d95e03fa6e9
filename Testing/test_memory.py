"""ProbSAMLib.inference.memory: the per-slice estimate against peaks measured on a GPU and the free-memory figure;
and the recognition of out-of-memory errors (ProbSAMLib.errors). No GPU here: the CUDA memory queries are
replaced by stand-ins (monkeypatch) where a test needs them, which says so."""
from types import SimpleNamespace

import pytest
import torch

from ProbSAMLib.inference import memory
from ProbSAMLib.modeling.config import ProbSAMConfig
from ProbSAMLib.errors import is_gpu_out_of_memory

# Peaks per slice of SAM ViT-B's encoder at 1024², measured on an NVIDIA H200 with
# Testing/benchmarks/embedding_cache.py (78,476 MiB for 32 slices in float32, 58,162 MiB for 29 under bf16
# autocast, model weights included).
MEASURED_FP32 = 78476 * 2**20 / 32
MEASURED_BF16 = 58162 * 2**20 / 29


def sam_like(preset: str, **overrides):
    return SimpleNamespace(config=ProbSAMConfig.preset(preset, **overrides), device=torch.device("cpu"))


def test_the_vit_b_estimate_covers_the_measured_peaks_without_wasting_half_the_gpu():
    model = sam_like("vit_b")
    fp32, half = memory.bytes_per_slice(model, 0, half=False), memory.bytes_per_slice(model, 0, half=True)
    assert MEASURED_FP32 <= fp32 <= 1.3 * MEASURED_FP32
    assert MEASURED_BF16 <= half <= 1.5 * MEASURED_BF16


def test_samples_cost_decoder_memory_on_top_of_the_encoder():
    model = sam_like("vit_b")
    encoder_only, sixteen = memory.bytes_per_slice(model, 0, False), memory.bytes_per_slice(model, 16, False)
    # the logit maps at 1024² and the two-way transformer's image tokens (64² x 256) once per sample
    assert sixteen - encoder_only == 3 * 16 * 1024 ** 2 * 4 + 6 * 16 * 64 ** 2 * 256 * 4


def test_the_lite_medsam_estimate_covers_its_decoder():
    """LiteMedSAM: windowed attention only, so the N-sample decoder dominates (about 2.5 GiB for 100 samples,
    what 16 slices of 100 samples in one batch exceeded 24 GiB by)."""
    from ProbSAMLib.modeling.config import ProbSAMConfig

    model = type("Model", (), {"config": ProbSAMConfig.preset("lite_medsam")})()
    hundred = memory.bytes_per_slice(model, 100, False)
    assert 2 * 2 ** 30 < hundred < 4 * 2 ** 30


def test_free_cuda_memory_counts_the_allocators_unused_blocks(monkeypatch):
    """Stand-ins for torch.cuda's queries: 10 GiB free to the driver, 30 GiB reserved by torch, 12 in use."""
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (10 << 30, 140 << 30))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 30 << 30)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 12 << 30)
    assert memory.available_bytes(torch.device("cuda")) == 28 << 30


def test_the_batch_is_half_the_free_memory_over_the_estimate(monkeypatch):
    model = sam_like("vit_b")
    per_slice = memory.bytes_per_slice(model, 4, half=False)
    monkeypatch.setattr(memory, "available_bytes", lambda device: 2 * 7 * per_slice + 5)
    assert memory.choose_batch(model, 4, 100) == 7
    assert memory.choose_batch(model, 4, 3) == 3
    assert memory.choose_batch(model, 4, 100, cap=5) == 5
    monkeypatch.setattr(memory, "available_bytes", lambda device: per_slice)  # not even one: still 1
    assert memory.choose_batch(model, 4, 100) == 1


@pytest.mark.parametrize("error, expected", [
    (torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), True),
    (RuntimeError("MPS backend out of memory (MPS allocated: 1.00 GB)"), True),
    (RuntimeError("mat1 and mat2 shapes cannot be multiplied"), False),
    (MemoryError(), False),  # the host's memory: a smaller GPU chunk does not help
])
def test_out_of_memory_errors_are_told_apart(error, expected):
    assert is_gpu_out_of_memory(error) is expected
