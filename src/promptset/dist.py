"""Multi-process runs under `torchrun` or `accelerate launch`: rank and world size from the environment.

Stages shard classes by rank (no gradient all-reduce). Every rank validates its inputs, then all ranks `agree` before
anything is written; rank 0 alone writes the shared files, and a gloo barrier orders the writes.
"""

from __future__ import annotations

import atexit
import os
from datetime import timedelta

import torch
import torch.distributed as torch_dist

from .errors import UserError

# A barrier waits for the slowest rank's whole share of a stage (hours on a CPU), so the timeout is long.
BARRIER_TIMEOUT = timedelta(hours=24)


def rank_world() -> tuple[int, int]:
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def is_main() -> bool:
    return rank_world()[0] == 0


def _process_group() -> bool:
    """Join the gloo group on first use; False in a single-process run."""
    rank, world = rank_world()
    if world <= 1:
        return False
    if not torch_dist.is_initialized():
        torch_dist.init_process_group("gloo", rank=rank, world_size=world, timeout=BARRIER_TIMEOUT)
        atexit.register(shutdown)  # also for API users: a gloo group left at exit can abort the interpreter
    return True


def barrier() -> None:
    """Wait for every process (no-op in a single-process run)."""
    if _process_group():
        torch_dist.barrier()


def agree(error: UserError | None) -> None:
    """Raise on every rank if any rank refused the run, so no rank starts writing while another refuses.

    Call it on every rank with the `UserError` this rank hit while validating (or None). The message of the lowest
    failing rank is sent to the others as bytes (never pickled).
    """
    rank, world = rank_world()
    if not _process_group():
        if error is not None:
            raise error
        return
    first = torch.tensor([rank if error is not None else world], dtype=torch.int64)
    torch_dist.all_reduce(first, op=torch_dist.ReduceOp.MIN)
    failed = int(first)
    if failed == world:
        return
    message = str(error).encode("utf-8") if rank == failed else b""
    length = torch.tensor([len(message)], dtype=torch.int64)
    torch_dist.broadcast(length, src=failed)
    buffer = torch.zeros(int(length), dtype=torch.uint8)
    if rank == failed:
        buffer = torch.frombuffer(bytearray(message), dtype=torch.uint8)
    torch_dist.broadcast(buffer, src=failed)
    shutdown()  # every rank stops here; an undestroyed gloo group can abort the interpreter at exit
    if error is not None:
        raise error
    raise UserError(bytes(buffer.tolist()).decode("utf-8") + f" (reported by process {failed})")


def shutdown() -> None:
    """Leave the process group (if joined), so the process exits cleanly."""
    if torch_dist.is_available() and torch_dist.is_initialized():
        torch_dist.destroy_process_group()


def shard(items: list, rank: int | None = None, world: int | None = None) -> list:
    """Round-robin share of `items` for this process."""
    r, w = rank_world()
    rank = r if rank is None else rank
    world = w if world is None else world
    return items[rank::world]
