"""Multi-process runs under `torchrun` or `accelerate launch`: every helper that talks to other processes.

Stages shard work by rank: `team_schedule` gives every work item (an inversion class group) a team of processes, one
process per item while there are at least as many items as processes, and the spare processes share the last items
data-parallel (`Team`: each takes a slice of the batch, gradients are summed over the team). Every rank validates its
inputs, then all ranks `agree` before anything is written; rank 0 alone writes the shared files, and a gloo barrier
orders the writes. Students train data-parallel: `span` gives each rank its contiguous slice of a batch,
`all_gather_rows` reassembles shared work. Under a launcher each process works on `cuda:LOCAL_RANK`
(`bind_local_device`, called by `rank_world` before any CUDA work).
"""

from __future__ import annotations

import atexit
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as torch_dist

from .errors import UserError

# A barrier waits for the slowest rank's whole share of a stage (hours on a CPU), so the timeout is long.
BARRIER_TIMEOUT = timedelta(hours=24)


def rank_world() -> tuple[int, int]:
    """(rank, world size) from the launcher's environment; under a launcher, also binds this process's GPU."""
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        bind_local_device()
    return rank, world


def bind_local_device() -> None:
    """`torch.cuda.set_device(LOCAL_RANK)` before any CUDA work, so that everything that uses the current
    device (NCCL groups, SyncBatchNorm, `torch.cuda` queries, libraries) uses this process's own GPU rather than all
    processes piling onto GPU 0. Nothing happens without CUDA, without LOCAL_RANK, or when LOCAL_RANK has no GPU
    (a CPU run with more processes than GPUs)."""
    if "LOCAL_RANK" not in os.environ or not torch.cuda.is_available():
        return
    local_rank = int(os.environ["LOCAL_RANK"])
    if local_rank < torch.cuda.device_count():
        torch.cuda.set_device(local_rank)  # cheap when already bound


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


def prepared_everywhere(prepare, *args):
    """`prepare(*args)` on every rank (it validates and reads only), then `agree`: no rank writes while one refuses."""
    try:
        plan = prepare(*args)
    except UserError as err:
        agree(err)
        raise
    agree(None)
    return plan


def shutdown() -> None:
    """Leave the process group (if joined), so the process exits cleanly."""
    if torch_dist.is_available() and torch_dist.is_initialized():
        torch_dist.destroy_process_group()


# ------------------------------------------------------------------------------------------------------------
# data parallelism: every process holds the same data and draws the same random numbers, so all agree on every
# global batch; each works on its contiguous slice of it


def ddp_world() -> tuple[int, int]:
    """(rank, world size) of the joined process group; (0, 1) when there is none (a single process)."""
    if torch_dist.is_available() and torch_dist.is_initialized():
        return torch_dist.get_rank(), torch_dist.get_world_size()
    return 0, 1


def span(n: int, rank: int, world: int) -> tuple[int, int]:
    """This rank's contiguous slice [lo, hi) of n items: sizes differ by at most one, earlier ranks take more."""
    base, extra = divmod(n, world)
    lo = rank * base + min(rank, extra)
    return lo, lo + base + (rank < extra)


_NCCL_GROUPS: dict[int, object] = {}


def gradient_group(device: torch.device):
    """The process group that reduces gradients: the default gloo group on CPU, an NCCL group on CUDA."""
    if device.type != "cuda":
        return None
    key = id(torch_dist.group.WORLD)
    if key not in _NCCL_GROUPS:  # new_group is collective: every rank reaches this in the same order
        _NCCL_GROUPS[key] = torch_dist.new_group(backend="nccl")
    return _NCCL_GROUPS[key]


def all_gather_rows(part: torch.Tensor, total: int, spans: list[tuple[int, int]] | None = None) -> torch.Tensor:
    """Concatenate every rank's `span` slice (this rank's is `part`) of a (total, ...) tensor, on every rank;
    `spans`: every rank's [lo, hi) when the slices are not `span`'s (contiguous, in rank order, covering total)."""
    rank, world = ddp_world()
    if world == 1:
        return part
    spans = spans or [span(total, r, world) for r in range(world)]
    width = max(hi - lo for lo, hi in spans)
    buf = torch.zeros((width, *part.shape[1:]), dtype=part.dtype)
    buf[: len(part)] = part.cpu()
    out = [torch.empty_like(buf) for _ in range(world)]
    torch_dist.all_gather(out, buf)  # on the CPU through gloo
    return torch.cat([o[: hi - lo] for o, (lo, hi) in zip(out, spans)]).to(part.device)


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """The sum of `x` over all ranks (through gloo, on the CPU), on `x`'s device; `x` itself in one process."""
    if ddp_world()[1] == 1:
        return x
    total = x.cpu()
    torch_dist.all_reduce(total)
    return total.to(x.device)


def broadcast_buffers(model: torch.nn.Module, group=None) -> None:
    """Rank 0's buffers (batch norm running statistics) on every rank."""
    for buf in model.buffers():
        torch_dist.broadcast(buf, 0, group=group)


# ------------------------------------------------------------------------------------------------------------
# teams: processes that train one work item together, data-parallel


def team_schedule(num_items: int, world: int) -> list[tuple[int, tuple[int, ...]]]:
    """(item, ranks of its team) for every item, in the order each rank works through its items.

    Items go one per process, round robin, while a whole round remains (item i to rank i % world); the last
    `num_items % world` items (all of them when there are fewer items than processes) are each trained by a team of
    `span`-sized rank ranges, so every process has work for any item count. A pure function of (num_items, world).
    """
    solo = num_items - num_items % world
    out = [(i, (i % world,)) for i in range(solo)]
    rest = num_items - solo
    for j in range(rest):
        lo, hi = span(world, j, rest)
        out.append((solo + j, tuple(range(lo, hi))))
    return out


@dataclass
class Team:
    """The processes that train one work item together; a team of one trains alone and never communicates.

    Attributes:
        ranks: global ranks of the team, in order; the first (the leader) alone writes the item's files.
        rank: this process's global rank.
        group: the team's gloo process group (None for a team of one).
        grad_group: the group gradients are summed in: the gloo group on CPU, an NCCL group on CUDA.
    """

    ranks: tuple[int, ...]
    rank: int
    group: object = None
    grad_group: object = None

    @property
    def size(self) -> int:
        return len(self.ranks)

    @property
    def index(self) -> int:
        """This process's place in the team (0 .. size-1): it takes the `span(n, index, size)` share of a batch."""
        return self.ranks.index(self.rank)

    @property
    def leader(self) -> bool:
        return self.rank == self.ranks[0]

    def all_reduce_(self, x: torch.Tensor, op=None) -> torch.Tensor:
        """Reduce `x` in place over the team (sum unless `op`): through NCCL for CUDA tensors, gloo otherwise."""
        if self.size > 1:
            group = self.grad_group if x.device.type == "cuda" else self.group
            torch_dist.all_reduce(x, op=op or torch_dist.ReduceOp.SUM, group=group)
        return x

    def all_finite(self, finite: torch.Tensor) -> torch.Tensor:
        """True on every member only when `finite` is True on every member (so all stop together)."""
        if self.size == 1:
            return finite
        flag = finite.to(torch.int32)
        return self.all_reduce_(flag, torch_dist.ReduceOp.MIN).bool()

    def barrier(self) -> None:
        if self.size > 1:
            torch_dist.barrier(group=self.group)


def join_teams(schedule: list[tuple[int, tuple[int, ...]]], device: torch.device) -> dict[int, Team]:
    """This process's `Team` for each of its items of `schedule`. Collective: every rank calls it with the same
    schedule, and every rank creates every team's process group in schedule order (torch requires that)."""
    rank, world = rank_world()
    if world > 1:
        _process_group()
    mine = {}
    for item, ranks in schedule:
        group = grad_group = None
        if len(ranks) > 1:
            group = torch_dist.new_group(list(ranks), backend="gloo", timeout=BARRIER_TIMEOUT)
            grad_group = group
            if device.type == "cuda":
                grad_group = torch_dist.new_group(list(ranks), backend="nccl")
        if rank in ranks:
            mine[item] = Team(ranks, rank, group, grad_group)
    return mine
