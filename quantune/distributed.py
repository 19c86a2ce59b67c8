"""Data parallel training through torch.distributed (DDP), launched by torchrun or ``--gpus N``.

Each process holds the whole (small, quantized) model and its LoRA adapters; gradients of
the adapters are averaged across processes after every optimizer step's last micro-batch.
A single process (CPU or one GPU) runs the same loop without any of this.
"""
from __future__ import annotations

import os
import subprocess
import sys
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as torch_dist

from quantune.config import QuantuneError


@dataclass
class DistContext:
    rank: int
    world: int
    local_rank: int
    device: torch.device

    def wrap(self, model):
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)

    @staticmethod
    def no_sync(ddp_model):
        return ddp_model.no_sync() if hasattr(ddp_model, "no_sync") else nullcontext()

    def mean(self, value: float) -> float:
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        torch_dist.all_reduce(t)
        return float(t) / self.world

    def barrier(self) -> None:
        torch_dist.barrier()

    def close(self) -> None:
        if torch_dist.is_initialized():
            torch_dist.destroy_process_group()


def from_environment(device: str) -> DistContext | None:
    """A process group when launched by torchrun (WORLD_SIZE > 1), else None."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return None
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device == "cuda" or (device == "auto" and torch.cuda.is_available()):
        if torch.cuda.device_count() <= local_rank:
            raise QuantuneError(f"process {rank} needs GPU {local_rank} but only {torch.cuda.device_count()} are visible")
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
        backend = "nccl"
    else:
        dev, backend = torch.device("cpu"), "gloo"
    torch_dist.init_process_group(backend, rank=rank, world_size=world, device_id=dev if backend == "nccl" else None)
    return DistContext(rank, world, local_rank, dev)


def relaunch_with_torchrun(nproc: int, argv: list[str]) -> int:
    """Run ``python -m quantune <argv>`` under torchrun with ``nproc`` processes; its exit status."""
    if nproc < 1:
        raise QuantuneError(f"--gpus must be >= 1, got {nproc}")
    if not torch.cuda.is_available():
        raise QuantuneError(f"--gpus {nproc} asked for, but no CUDA GPU is available")
    if torch.cuda.device_count() < nproc:
        raise QuantuneError(f"--gpus {nproc} asked for, but only {torch.cuda.device_count()} GPU(s) are visible")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "quantune", *argv]
    return subprocess.call(cmd)
