"""Several processes started by torchrun: which one this is, its device, and the few collective steps a run
over many GPUs or machines needs.

    processes = start_processes("auto")      # alone: rank 0 of 1 on choose_device("auto")
    try:
        plan = processes.from_rank0(prepare)   # rank 0 prepares; every rank gets its answer or its exit
        ... each rank works on its share ...
        processes.barrier()
    finally:
        processes.close()

torchrun sets WORLD_SIZE, RANK and LOCAL_RANK; with WORLD_SIZE > 1 each rank takes cuda:LOCAL_RANK when CUDA
is asked for (auto or cuda) and available, else the CPU, and joins the process group with NCCL on CUDA and
gloo on the CPU (the rules Training/train.py follows under torchrun).
"""

from __future__ import annotations

import inspect
import os
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist

from ProbSAMLib.errors import exit_status
from ProbSAMLib.inference.device import choose_device


@dataclass
class Processes:
    rank: int
    world_size: int
    device: torch.device

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def from_rank0(self, work: Callable):
        """``work()`` run on rank 0 only; every rank returns its result. If it raises, rank 0 raises the error
        (its entry point reports it in one line) and the other ranks exit quietly with the same status, so one
        failure is told once, not once per rank."""
        if not self.distributed:
            return work()
        answer = [None]
        if self.rank == 0:
            try:
                answer[0] = ("ok", work())
            except Exception as error:
                dist.broadcast_object_list([("failed", exit_status(error))], src=0)
                raise
        dist.broadcast_object_list(answer, src=0)
        kind, value = answer[0]
        if kind == "failed":
            raise SystemExit(value)
        return value

    def close(self) -> None:
        if self.distributed and dist.is_initialized():
            dist.destroy_process_group()


def start_processes(device_preference: str = "auto") -> Processes:
    """This process's place among torchrun's (rank 0 of 1 without torchrun) and its device."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Processes(0, 1, choose_device(device_preference))
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    wanted = choose_device(device_preference)  # refuses an unavailable device
    device = torch.device(f"cuda:{local_rank}") if wanted.type == "cuda" else wanted
    if device.type == "cuda":
        torch.cuda.set_device(device)
    # Naming each rank's GPU (torch >= 2.3) spares NCCL guessing it from the rank, which can hang.
    bound = ({"device_id": device} if device.type == "cuda"
             and "device_id" in inspect.signature(dist.init_process_group).parameters else {})
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", **bound)
    return Processes(rank, world_size, device)
