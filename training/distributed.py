"""torchrun support: a no-op on one process, DDP when WORLD_SIZE > 1 (gloo on CPU, NCCL on GPU)."""
from __future__ import annotations

import gc
import os
from typing import TypeVar

import torch
import torch.distributed as td
from torch import nn

T = TypeVar("T")


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return td.get_rank() if td.is_initialized() else int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def init() -> None:
    """Join the process group torchrun describes in the environment (idempotent)."""
    if world_size() > 1 and not td.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local_rank())
        td.init_process_group(backend=backend)


def shutdown() -> None:
    """Leave the process group: every rank first waits for the others, and the DDP wrapper
    (its reducer holds the group) is collected while the group is alive. Destroying the group
    under a live reducer let gloo's threads outlive it: rank 0 aborted at exit ("terminate
    called without an active exception") about once in six loaded runs."""
    if td.is_initialized():
        td.barrier()
        gc.collect()
        td.destroy_process_group()


def shard(items: list[T]) -> list[T]:
    """This rank's share; every rank gets the same count so their steps stay in lockstep."""
    n = world_size()
    if n == 1:
        return items
    usable = len(items) - len(items) % n
    return items[rank():usable:n]


class _LossModule(nn.Module):
    """DDP wraps forward(): route it to the configured training loss."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, ids, valid):  # type: ignore[no-untyped-def]
        return self.model.training_loss(ids, valid, report=False)  # no per-part host syncs


def wrap(model: nn.Module) -> nn.Module:
    module = _LossModule(model)
    if td.is_initialized():
        device_ids = [local_rank()] if torch.cuda.is_available() else None
        return nn.parallel.DistributedDataParallel(module, device_ids=device_ids, find_unused_parameters=True)
    return module


def _device() -> torch.device:
    # NCCL reduces CUDA tensors only.
    return torch.device("cuda", local_rank()) if td.get_backend() == "nccl" else torch.device("cpu")


def mean(value: float) -> float:
    if not td.is_initialized():
        return value
    t = torch.tensor([value], dtype=torch.float64, device=_device())
    td.all_reduce(t)
    return float(t.item()) / td.get_world_size()


def broadcast_flag(flag: bool) -> bool:
    """Rank 0 decides (early stopping); everyone follows."""
    return bool(broadcast_int(int(flag)))


def broadcast_int(value: int) -> int:
    """Rank 0's value everywhere (the learning-rate plan must match on every rank)."""
    if not td.is_initialized():
        return value
    t = torch.tensor([int(value)], device=_device())
    td.broadcast(t, src=0)
    return int(t.item())


def barrier() -> None:
    if td.is_initialized():
        td.barrier()
