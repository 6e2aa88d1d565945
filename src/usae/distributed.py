"""Data parallelism over rows with torch.distributed (torchrun): gloo on CPU, NCCL on GPU.

Every rank holds the whole UniversalSAE, reads its own rows of each global batch (see
``data.Loader``) and averages gradients with one all-reduce per step, so all ranks take the same
optimiser step and stay identical. Only rank 0 writes files. A single process is world size 1 and
none of this costs anything.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor


class World(NamedTuple):
    """This process's place among the data-parallel ranks."""

    rank: int
    size: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


SINGLE = World(0, 1)


def env_rank() -> int:
    """This process's rank as torchrun announces it (0 outside torchrun), readable before :func:`init`."""
    return int(os.environ.get("RANK", "0"))


def init(device: torch.device) -> tuple[World, torch.device]:
    """Join the process group torchrun describes (WORLD_SIZE > 1); pick this rank's GPU."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return SINGLE, device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return World(dist.get_rank(), dist.get_world_size()), device


def all_reduce_mean_(tensors: list[Tensor], world: World) -> None:
    """Average ``tensors`` across ranks in place, with one flat all-reduce."""
    if world.size == 1 or not tensors:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat)
    flat /= world.size
    offset = 0
    for t in tensors:
        t.copy_(flat[offset : offset + t.numel()].view_as(t))
        offset += t.numel()


def all_reduce_sum_(t: Tensor, world: World) -> None:
    if world.size > 1:
        dist.all_reduce(t)


def average_buffers_(module: torch.nn.Module, world: World) -> None:
    """Average floating buffers that ranks update from their own rows (BatchNorm stats, thresholds)."""
    buffers = [
        b for name, b in module.named_buffers() if b.is_floating_point() and not name.endswith(("shift_d", "scale_d"))
    ]
    all_reduce_mean_(buffers, world)


def barrier(world: World) -> None:
    if world.size > 1:
        dist.barrier()
