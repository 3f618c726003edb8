"""Distributed set-up in one place (as VAR's dist.py): join torchrun's process group, say which
process this is, reduce / gather across processes, and always leave the group again.

One process (no torchrun, or WORLD_SIZE=1) needs no group: every helper is then a no-op.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Any, Iterator

import torch


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init(device_name: str) -> tuple[DistInfo, torch.device]:
    """Join the process group when launched by torchrun (gloo on CPU, nccl on CUDA, one GPU per
    local rank); an existing group is joined as it is."""
    import torch.distributed as dist

    from arpg.utils import resolve_device

    device = resolve_device(device_name)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo(), device
    info = DistInfo(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    if device.type == "cuda":
        device = torch.device("cuda", info.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return info, device


@contextlib.contextmanager
def session(device_name: str) -> Iterator[tuple[DistInfo, torch.device]]:
    """`with session(params["device"]) as (info, device):` init, then destroy the process group
    when the block ends, also on an error (a stale group would hang the other ranks)."""
    import torch.distributed as dist

    info, device = init(device_name)
    try:
        yield info, device
    finally:
        if info.enabled and dist.is_initialized():
            dist.destroy_process_group()


def all_reduce_sum(tensor: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Sum `tensor` over all processes, in place; returns it."""
    if info.enabled:
        import torch.distributed as dist

        dist.all_reduce(tensor)
    return tensor


def barrier(info: DistInfo) -> None:
    if info.enabled:
        import torch.distributed as dist

        dist.barrier()


def gather_to_main(obj: Any, info: DistInfo) -> list | None:
    """Every process's `obj`, in rank order, on rank 0 (None elsewhere); [obj] for one process."""
    if not info.enabled:
        return [obj]
    import torch.distributed as dist

    objs = [None] * info.world_size if info.is_main else None
    dist.gather_object(obj, objs, dst=0)
    return objs
