"""CPU threads: one count per process, fixed before any torch work, so the bits a stage writes do not depend on how
busy the machine is; OpenMP threads that wait passively, so a busy machine costs about its share of the cores.

Why a fixed count: torch's CPU kernels split their work (and reductions) by thread, so the same arithmetic at another
thread count rounds differently in the last bits (measured: a 64-step inversion differed by up to 3.5e-7, and 15 of
50 generated images by one uint8 level, between 2 threads and 1). A count chosen from the load, as promptset did
before, made the bits depend on what else ran. The count is therefore a property of the command and the machine,
never of the load, and it is recorded with everything that changes a pixel (`cpu_threads` in the generation
settings), so `materialize` and `evaluate` can replay it.

Why passive waiting: after every parallel operation torch's OpenMP threads meet at a barrier. By default libgomp's
waiting threads spin for a while first; with two threads on two cores and one competing process, the spinning
thread takes the core its partner needs, and small operations slowed down 2-8x (BENCHMARKS.md, "Bits and speed on a
busy machine"). With `OMP_WAIT_POLICY=passive` a waiting thread sleeps at once, the descheduled partner gets the core,
and a competitor costs about the share of the cores it takes. OpenMP reads the policy once, when torch loads it, so
`import promptset` sets it (unless the user set `OMP_WAIT_POLICY` or `GOMP_SPINCOUNT`) when torch is not yet
imported. A program that imports torch first keeps spinning waits (same bits, slower under load); `wait_policy()`
says which one a process has and the verbs warn once.

The count: `set_threads(n)` (a caller that says so) > `PROMPTSET_THREADS` > `OMP_NUM_THREADS` > torch's own count
when promptset first configures (its default, one thread per core of this machine, unless the caller changed it).
The CLI and every Python verb configure the same way (`ensure()`, called by `config.make_config`, which every verb
runs first), once per process.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
import warnings
from collections.abc import Mapping, MutableMapping

_WAIT_ENV = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")
_PASSIVE_SET_BY_PROMPTSET = False
_TORCH_FIRST = False


def prefer_passive_waiting(env: MutableMapping[str, str] | None = None, modules: Mapping | None = None) -> bool:
    """Set OMP_WAIT_POLICY=passive for this process (and its children) if it can still take effect.

    Returns True when it was set here; False when the user chose a wait policy or torch (and OpenMP) already loaded.
    """
    global _PASSIVE_SET_BY_PROMPTSET, _TORCH_FIRST
    env = os.environ if env is None else env
    modules = sys.modules if modules is None else modules
    if any(env.get(name) for name in _WAIT_ENV):
        return False
    if "torch" in modules:
        _TORCH_FIRST = True
        return False
    env["OMP_WAIT_POLICY"] = "passive"
    _PASSIVE_SET_BY_PROMPTSET = True
    return True


def wait_policy(env: Mapping[str, str] | None = None) -> str:
    """How this process's OpenMP threads wait: 'passive', 'user: NAME=VALUE' or 'spinning (torch imported first)'."""
    env = os.environ if env is None else env
    if _TORCH_FIRST:
        return "spinning (torch imported before promptset)"
    for name in _WAIT_ENV:
        if env.get(name):
            ours = _PASSIVE_SET_BY_PROMPTSET and name == "OMP_WAIT_POLICY"
            return "passive" if ours else f"user: {name}={env[name]}"
    return "default"


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
    """(wall seconds, busy CPU seconds of the machine, CPU seconds of this process), or None off Linux.

    Benchmarks use it to record how busy the machine was; promptset no longer chooses threads from it."""
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


_configured: tuple[int, str] | None = None  # (count, where it came from), once per process


def _parse(value: str, name: str) -> int:
    try:
        threads = int(value)
    except ValueError:
        threads = 0
    if threads < 1:
        from .errors import UserError

        raise UserError(f"{name}={value!r}: pass a positive integer number of CPU threads")
    return threads


def configure(env: Mapping[str, str] | None = None) -> int:
    """Fix this process's torch CPU threads (see the module docstring) and return the count."""
    global _configured
    env = os.environ if env is None else env
    import torch

    spec = env.get("PROMPTSET_THREADS", "").strip().lower()
    if spec and spec != "auto":  # 'auto' was the load-following mode; it now means the default
        threads, source = _parse(spec, "PROMPTSET_THREADS"), "PROMPTSET_THREADS"
    elif env.get("OMP_NUM_THREADS"):
        threads, source = _parse(env["OMP_NUM_THREADS"].split(",")[0], "OMP_NUM_THREADS"), "OMP_NUM_THREADS"
    else:
        threads, source = torch.get_num_threads(), "default"
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    _configured = (threads, source)
    return threads


def set_threads(threads: int) -> int:
    """The caller's own CPU thread count for every later promptset call in this process (the API's explicit choice)."""
    global _configured
    import torch

    threads = _parse(str(threads), "set_threads")
    torch.set_num_threads(threads)
    _configured = (threads, "set_threads")
    return threads


def ensure() -> int:
    """Configure once per process (what every verb does first); later calls keep the count. Warns once if OpenMP
    spins because torch was imported before promptset."""
    global _TORCH_FIRST
    if _configured is None:
        configure()
        if _TORCH_FIRST and _configured[0] > 1 and not any(os.environ.get(name) for name in _WAIT_ENV):
            warnings.warn(
                "torch was imported before promptset, so OpenMP threads spin while they wait: beside a busy process "
                "a stage can run several times slower (the bits are the same). Import promptset before torch, or "
                "set OMP_WAIT_POLICY=passive in the environment.", RuntimeWarning, stacklevel=3)
    import torch

    if torch.get_num_threads() != _configured[0]:  # somebody changed it behind our back: the recorded count wins
        torch.set_num_threads(_configured[0])
    return _configured[0]


def current() -> int:
    """The torch CPU thread count in effect (what a CPU stage records with its outputs)."""
    import torch

    return torch.get_num_threads()


def describe() -> dict:
    """What a run records about its CPU threads."""
    count, source = _configured if _configured is not None else (current(), "unconfigured")
    return {"cpu_threads": count, "source": source, "openmp_wait": wait_policy()}


@contextlib.contextmanager
def replay(threads: int | None):
    """Run the block at `threads` torch CPU threads (a recorded count), then restore; None changes nothing."""
    import torch

    before = torch.get_num_threads()
    if threads and threads != before:
        torch.set_num_threads(int(threads))
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


def reset() -> None:
    """Forget the configured count (tests)."""
    global _configured
    _configured = None
