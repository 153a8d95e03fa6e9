"""Choosing the torch device and the autocast policy, shared by the CLI, Slicer and Training."""

from __future__ import annotations

import contextlib

import torch

from ProbSAMLib.errors import DeviceError, SettingsError


def mps_works() -> bool:
    """MPS reported available AND able to run a small op (some macOS/torch combinations are not)."""
    backend = getattr(torch.backends, "mps", None)
    if backend is None or not backend.is_available():
        return False
    try:
        (torch.ones(2, device="mps") * 2).cpu()
        return True
    except Exception:
        return False


def choose_device(preference: str = "auto") -> torch.device:
    """'auto' -> CUDA, then a working MPS, then CPU; 'cpu' / 'cuda' / 'cuda:1' / 'mps' are forced."""
    preference = (preference or "auto").lower()
    if preference == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if mps_works():
            return torch.device("mps")
        return torch.device("cpu")
    if preference.startswith("cuda"):
        index = preference[len("cuda"):]
        if index and not (index[0] == ":" and index[1:].isdigit()):
            raise SettingsError(f"unknown device {preference!r}; use auto, cpu, cuda, cuda:N or mps")
        if not torch.cuda.is_available():
            raise DeviceError(
                "CUDA was requested but torch.cuda.is_available() is False (no NVIDIA GPU, a driver "
                f"older than this CUDA build of torch {torch.__version__}, or a CPU-only torch). Use --device cpu."
            )
        if index and int(index[1:]) >= torch.cuda.device_count():
            raise DeviceError(f"{preference} was requested but only {torch.cuda.device_count()} CUDA "
                              f"device(s) are present")
        return torch.device(preference)
    if preference == "mps":
        if not mps_works():
            raise DeviceError("MPS was requested but is not available in this torch build / macOS. Use --device cpu.")
        return torch.device("mps")
    if preference == "cpu":
        return torch.device("cpu")
    raise SettingsError(f"unknown device {preference!r}; use auto, cpu, cuda, cuda:N or mps")


def synchronize(device: torch.device) -> None:
    """Wait for the work queued on ``device``: CUDA and MPS run asynchronously, so a clock read without
    this measures the queueing, not the work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def autocast(device: torch.device, enabled: bool = True):
    """bf16 autocast on CUDA GPUs that support it; a no-op elsewhere (CPU results stay exact fp32)."""
    if enabled and device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()
