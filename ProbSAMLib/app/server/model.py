"""The one model a server serves: loaded once at start, never a file a client names.

It stands in for jobs.ModelCache in SampleJob (same ``get(spec)``), so a remote job is sampled by the same
code as a local one; a request for another model gets a line naming the model the server has.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from ProbSAMLib.app.jobs import ModelCache, RequestError


class ServedModel:
    def __init__(self, name: str, checkpoint: Optional[Path] = None, sam_checkpoint: Optional[Path] = None,
                 device: str = "auto"):
        cache = ModelCache()  # the operator's files, named on the server's command line; get() refuses a client's
        spec = {"name": name, "checkpoint": str(checkpoint) if checkpoint else None,
                "sam_checkpoint": str(sam_checkpoint) if sam_checkpoint else None, "device": device}
        self.model, info = cache.get(spec)
        self.name, self.sha256 = name, info["sha256"]
        self.device = str(self.model.device)

    def describe(self) -> str:
        return f"model {self.name} (SHA-256 {self.sha256}) on {self.device}"

    def get(self, spec: dict):
        """The model and its info for a request's ``model`` field; RequestError if it asks for another."""
        if spec.get("checkpoint") or spec.get("sam_checkpoint"):
            raise RequestError("this server does not read weights files named by the client; leave the checkpoint "
                               f"fields empty (it serves {self.describe()})")
        if spec.get("name") != self.name:
            raise RequestError(f"this server serves {self.describe()}, not model {spec.get('name')!r}; choose "
                               f"{self.name} or another server")
        device = spec.get("device") or "auto"
        if device not in ("auto", self.device, self.model.device.type):
            raise RequestError(f"this server runs on {self.device}, not {device}; choose device auto")
        return self.model, {"name": self.name, "sha256": self.sha256, "loads": 1, "reused": True}

    def free_gpu_bytes(self) -> Optional[int]:
        """Free memory on the model's GPU, or None on a CPU or MPS."""
        if self.model.device.type != "cuda":
            return None
        import torch

        free, _total = torch.cuda.mem_get_info(self.model.device)
        return int(free)
