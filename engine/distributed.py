"""Distributed data parallel under torchrun: process group, device, agreement between ranks."""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from engine.common import UsageError, select_device

__all__ = ["Distributed"]


@dataclass(frozen=True)
class Distributed:
    """This process's place in a run: rank 0 of 1 without torchrun.

    Under torchrun (``WORLD_SIZE`` > 1) :meth:`start` joins the process group: NCCL with one GPU per
    process (``LOCAL_RANK``) when CUDA is used, gloo on CPUs.
    """

    rank: int = 0
    world_size: int = 1

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def start(cls, device_choice: str, gpu: int) -> tuple[Distributed, torch.device]:
        """Join the process group when launched by torchrun; returns the context and this rank's device."""
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        if world_size <= 1:
            return cls(), select_device(device_choice, gpu)
        rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
        use_cuda = device_choice != "cpu" and torch.cuda.is_available()
        if device_choice == "cuda" and not use_cuda:
            raise UsageError("--device cuda: no CUDA device is available (use --device cpu or auto)")
        if use_cuda:
            if local_rank >= torch.cuda.device_count():
                raise UsageError(f"LOCAL_RANK {local_rank}: this node has {torch.cuda.device_count()} CUDA devices")
            device = torch.device("cuda", local_rank)
            torch.cuda.set_device(device)
        else:
            device = torch.device("cpu")
        if not dist.is_initialized():
            dist.init_process_group("nccl" if use_cuda else "gloo")
        return cls(rank, world_size), device

    def gather(self, obj: object) -> list:
        """``obj`` from every rank, in rank order (on every rank)."""
        if not self.enabled:
            return [obj]
        gathered: list = [None] * self.world_size
        dist.all_gather_object(gathered, obj)
        return gathered

    def patient_group(self, seconds: float):
        """A gloo group whose collectives wait up to ``seconds``, for a wait longer than the process group's
        timeout (10 minutes with NCCL): rank 0 reading a large dataset through while the others wait.
        Every rank calls it, before rank 0 starts that work; None without torchrun."""
        if not self.enabled:
            return None
        return dist.new_group(backend="gloo", timeout=timedelta(seconds=seconds))

    def broadcast(self, obj: object, group=None) -> object:
        """Rank 0's ``obj`` (on every rank), through ``group`` (default: the process group); a group given
        here (a :meth:`patient_group`, made for this one wait) is destroyed after it."""
        if not self.enabled:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0, group=group)
        if group is not None:
            dist.destroy_process_group(group)
        return box[0]

    def broadcast_tensors(self, tensors: list[torch.Tensor]) -> None:
        """Overwrite ``tensors`` in place with rank 0's (model buffers, before a validation)."""
        if self.enabled:
            for tensor in tensors:
                dist.broadcast(tensor, src=0)

    def any(self, flag: bool, device: torch.device) -> bool:
        """True on every rank when ``flag`` is true on any rank."""
        if not self.enabled:
            return flag
        value = torch.tensor([1.0 if flag else 0.0], device=device)
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value.item())

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def close(self) -> None:
        if self.enabled and dist.is_initialized():
            dist.destroy_process_group()
