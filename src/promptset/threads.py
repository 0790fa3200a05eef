"""CPU threads that share a machine: as many torch threads as there are cores other processes leave idle.

Why: torch's OpenMP threads meet at a barrier after every parallel operation. With two threads on two cores and one
competing process, one of the two threads is regularly descheduled and the other waits for it at every barrier, so
small operations (promptset's CPU models are small) slow down many times over instead of by the share of the cores
the competitor takes (measured in BENCHMARKS.md, "The demo on a busy machine"). One thread per idle core avoids the
barrier stalls: a competitor then costs about the cores it takes.

The CLI calls `configure()` once per process before any torch work: it samples how many cores other processes keep
busy (from /proc/stat, minus this process's own CPU time) and sets `torch.set_num_threads` to the idle ones (at
least 1). Long loops call `rebalance()` through their progress bars (progress.py); at most every
`REBALANCE_INTERVAL_S` seconds it re-measures over the time since the last check and moves the thread count up or
down. `PROMPTSET_THREADS=N` (or an explicit `OMP_NUM_THREADS`) fixes the count and turns all of this off; the Python
API is left alone unless the caller runs `configure()` itself.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping

REBALANCE_INTERVAL_S = 3.0
_FIRST_SAMPLE_S = 0.25


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def _busy_cpu_seconds() -> float | None:
    """CPU seconds all processes have spent busy since boot (/proc/stat), or None where it cannot be read."""
    try:
        with open("/proc/stat", encoding="ascii") as f:
            fields = f.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu":
        return None
    ticks = [int(x) for x in fields[1:9]]  # user nice system idle iowait irq softirq steal
    busy = sum(ticks) - ticks[3] - ticks[4]
    return busy / os.sysconf("SC_CLK_TCK")


def sample() -> tuple[float, float, float] | None:
    """(wall seconds, busy CPU seconds of the machine, CPU seconds of this process), or None off Linux."""
    busy = _busy_cpu_seconds()
    if busy is None:
        return None
    return time.monotonic(), busy, time.process_time()


def others_busy_cores(before: tuple[float, float, float], after: tuple[float, float, float]) -> float:
    """Cores kept busy by other processes between two samples (>= 0)."""
    wall = after[0] - before[0]
    if wall <= 0:
        return 0.0
    others = (after[1] - before[1]) - (after[2] - before[2])
    return max(0.0, others / wall)


def choose_threads(cores: int, others: float) -> int:
    """Threads for `cores` cores when other processes keep `others` of them busy: the idle ones, at least 1.

    A competitor that holds a core most of the time counts as taking it (others 0.6 of a core leaves 1.4: one
    thread), a background trickle does not (0.3 leaves 1.7: two threads).
    """
    return max(1, min(cores, int(cores - others + 0.5)))


class Governor:
    """Keeps torch's thread count at the idle cores; `sampler` and `set_threads` are injectable for tests."""

    def __init__(
        self,
        cores: int,
        sampler: Callable[[], tuple[float, float, float] | None] = sample,
        set_threads: Callable[[int], None] | None = None,
        interval: float = REBALANCE_INTERVAL_S,
    ):
        import torch

        self.cores = cores
        self.sampler = sampler
        self.set_threads = set_threads or torch.set_num_threads
        self.interval = interval
        self.last = sampler()
        self.threads = 0
        self.changes = 0

    def apply(self, threads: int) -> None:
        if threads != self.threads:
            self.set_threads(threads)
            self.changes += self.threads != 0
            self.threads = threads

    def rebalance(self, now: float | None = None) -> None:
        if self.last is None:
            return
        now = time.monotonic() if now is None else now
        if now - self.last[0] < self.interval:
            return
        current = self.sampler()
        if current is None:
            return
        self.apply(choose_threads(self.cores, others_busy_cores(self.last, current)))
        self.last = current


_governor: Governor | None = None


def configure(env: Mapping[str, str] | None = None) -> int | None:
    """Choose this process's torch threads (see the module docstring); returns the count, or None if left alone."""
    global _governor
    env = os.environ if env is None else env
    spec = env.get("PROMPTSET_THREADS", "auto").strip().lower() or "auto"
    import torch

    _governor = None
    if spec != "auto":
        try:
            threads = int(spec)
        except ValueError:
            threads = 0
        if threads < 1:
            from .errors import UserError

            raise UserError(f"PROMPTSET_THREADS={env['PROMPTSET_THREADS']!r}: pass a positive integer or 'auto'")
        torch.set_num_threads(threads)
        return threads
    if env.get("OMP_NUM_THREADS"):
        return None  # the user chose; torch already follows it
    cores = available_cores()
    governor = Governor(cores)
    if governor.last is None or cores == 1:
        return None
    time.sleep(_FIRST_SAMPLE_S)
    first = governor.sampler()
    governor.apply(choose_threads(cores, others_busy_cores(governor.last, first)))
    governor.last = first
    _governor = governor
    return governor.threads


def rebalance() -> None:
    """Re-check the idle cores (cheap; at most every REBALANCE_INTERVAL_S seconds does it read /proc/stat)."""
    if _governor is not None:
        _governor.rebalance()


def reset() -> None:
    """Stop adapting (tests; a caller that sets its own threads)."""
    global _governor
    _governor = None
