"""Multi-process runs under `torchrun` or `accelerate launch`: rank and world size from the environment.

Stages shard classes by rank (no gradient all-reduce); a gloo barrier lets rank 0 assemble the shared files.
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch.distributed as torch_dist


def rank_world() -> tuple[int, int]:
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def is_main() -> bool:
    return rank_world()[0] == 0


def barrier() -> None:
    """Wait for every process (no-op in a single-process run)."""
    rank, world = rank_world()
    if world <= 1:
        return
    if not torch_dist.is_initialized():
        torch_dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(hours=24))
    torch_dist.barrier()


def shard(items: list, rank: int | None = None, world: int | None = None) -> list:
    """Round-robin share of `items` for this process."""
    r, w = rank_world()
    rank = r if rank is None else rank
    world = w if world is None else world
    return items[rank::world]
