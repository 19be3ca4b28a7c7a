"""Sharding a benchmark's work items across torch.distributed ranks and gathering the results on rank 0.

Under `torchrun --nproc_per_node=N` every process reads RANK, WORLD_SIZE and LOCAL_RANK from its environment;
without them (a plain `python -m ...`) the helpers describe a single process and never touch torch.distributed.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Sequence, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


@dataclass
class Shard:
    """This process's place in the run: which rank of how many, on which device, and whether a group is live."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: str = "cpu"
    initialized: bool = False  # True when this module started a process group that `finish` must end

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"environment variable {name}={raw!r} is not an integer") from None


def setup(device: str = "auto") -> Shard:
    """Join the process group torchrun describes (gloo on CPU, nccl on CUDA) and pick this rank's device.

    `device` is 'auto' (cuda:LOCAL_RANK when CUDA is available, else cpu), 'cpu', or 'cuda' (then cuda:LOCAL_RANK).
    An explicit 'cuda:K' is kept only in a single-process run; sharded runs always use their local rank's GPU.
    """
    world = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local = _env_int("LOCAL_RANK", 0)
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"RANK={rank} does not fit WORLD_SIZE={world}")
    use_cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
    if use_cuda and not torch.cuda.is_available():
        raise RuntimeError(f"device {device!r} asked for but CUDA is not available")
    if use_cuda:
        dev = device if (world == 1 and device.startswith("cuda:")) else f"cuda:{local}"
        torch.cuda.set_device(torch.device(dev))
    else:
        dev = "cpu"
    shard = Shard(rank=rank, world_size=world, local_rank=local, device=dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", init_method="env://",
                                rank=rank, world_size=world)
        shard.initialized = True
    return shard


def shard_items(items: Sequence[T], rank: int, world_size: int) -> list[tuple[int, T]]:
    """Round-robin share of (index, item) pairs: item i goes to rank i mod N, the same split on every run."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} does not fit a world of {world_size}")
    return [(i, item) for i, item in enumerate(items) if i % world_size == rank]


def gather_to_main(obj: Any, shard: Shard) -> list[Any] | None:
    """Every rank's object, in rank order, on rank 0 (None elsewhere); a single process gets [obj]."""
    if shard.world_size == 1:
        return [obj]
    out: list[Any] | None = [None] * shard.world_size if shard.is_main else None
    dist.gather_object(obj, out, dst=0)
    return out


def broadcast_from_main(obj: Any, shard: Shard) -> Any:
    """Rank 0's object on every rank, so a choice made once (e.g. calibrated drafters) is the same everywhere."""
    if shard.world_size == 1:
        return obj
    box = [obj if shard.is_main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def finish(shard: Shard) -> None:
    """Wait for every rank (so none exits while rank 0 still writes) and end the group this module started."""
    if shard.initialized and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
