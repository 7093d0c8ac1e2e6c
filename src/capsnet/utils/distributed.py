"""Multi-process training on PyTorch's distributed engine, set up from ``torchrun``'s variables.

Under ``torchrun`` every process (rank) gets RANK, WORLD_SIZE and LOCAL_RANK; without them
capsnet runs as a single process and nothing here talks to anything. Batch semantics:
``--batch-size`` is the global batch, split evenly across ranks, so N processes with the same
settings follow the same optimisation path as one process (up to floating-point order).
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..errors import CapsNetError

TIMEOUT = datetime.timedelta(minutes=int(os.environ.get("CAPSNET_DIST_TIMEOUT_MIN", "10")))


@dataclass(frozen=True)
class World:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_world(device_type: str) -> World:
    """Join the process group if launched by ``torchrun`` (NCCL on CUDA, else gloo)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return World()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        # torch.distributed.nn.functional binds the default group into ten functions' default
        # arguments when it is first imported (torch._dynamo, which DDP imports, imports it).
        # Imported after the group is made, it keeps the group from destroy_process_group: the
        # group's threads then live into interpreter exit, where a rank can abort ("terminate
        # called without an active exception") as one of them releases a tensor.
        import torch.distributed.nn.functional  # noqa: F401
        backend = "nccl" if device_type == "cuda" else "gloo"
        if device_type == "cuda":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend, timeout=TIMEOUT)
    return World(rank, world_size, local_rank)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(tensor: torch.Tensor, world: World) -> torch.Tensor:
    """Sum ``tensor`` over ranks in place (a no-op for one process)."""
    if world.distributed:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def any_rank(flag: bool, world: World, device: torch.device) -> bool:
    """True on every rank when ``flag`` is true on any rank."""
    if not world.distributed:
        return flag
    value = torch.tensor([int(flag)], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def per_rank_batch(batch_size: int, world: World) -> int:
    if batch_size % world.world_size:
        raise CapsNetError(f"batch size {batch_size} must be divisible by the {world.world_size} "
                           f"processes (it is the global batch)")
    return batch_size // world.world_size
