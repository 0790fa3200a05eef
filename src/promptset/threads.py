"""CPU threads: one count per process, fixed before any torch work, so the bits a stage writes do not depend on how
busy the machine is; OpenMP threads that spin on an idle machine and sleep on a busy one, chosen at start.

Why a fixed count: torch's CPU kernels split their work (and reductions) by thread, so the same arithmetic at another
thread count rounds differently in the last bits (measured: a 64-step inversion differed by up to 3.5e-7, and 15 of
50 generated images by one uint8 level, between 2 threads and 1). A count chosen from the load, as promptset did
before, made the bits depend on what else ran. The count is therefore a property of the command and the machine,
never of the load, and it is recorded with everything that changes a pixel (`cpu_threads` in the generation
settings), so `materialize` and `evaluate` can replay it.

How OpenMP threads wait: after every parallel operation torch's OpenMP threads meet at a barrier. Spinning
waiters (`OMP_WAIT_POLICY=active`) are fastest on an idle machine, but with two threads on two cores and a competing
process a spinning thread takes the core its partner needs; sleeping waiters (`passive`) give the core up at once,
so a competitor costs about its share, but every wake-up costs time, and on an idle machine small operations ran
up to 2x slower (measured, BENCHMARKS.md "Bits and speed on a busy machine": a tiny inversion 11.2 s spinning vs
16.6 s passive idle, 21.0 s vs 13.6 s beside a busy loop; `promptset demo` 462 s passive idle). libgomp's default
(spin a while, then sleep) was the worst beside a busy process (5-25x). OpenMP reads the policy once, when torch
loads it, so `import promptset` chooses it then from how busy the other processes keep the cores over 50 ms:
`active` when they are idle, `passive` when they keep at least half a core busy. The wait policy never changes a
bit (only the thread count does), so choosing it from the load is safe; it is recorded (`describe()`). A policy the
user set (`OMP_WAIT_POLICY`, `GOMP_SPINCOUNT`, `KMP_BLOCKTIME`) is kept; a child process re-chooses the one its
promptset parent chose (`PROMPTSET_OMP_WAIT` marks it). A program that imports torch first keeps libgomp's default
(same bits, slower under load); `wait_policy()` says which one a process has and the verbs warn once.

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
_MARK = "PROMPTSET_OMP_WAIT"  # the policy a promptset process chose (children re-choose it)
_CHOSEN: str | None = None  # 'active' or 'passive' when this process chose OMP_WAIT_POLICY
_TORCH_FIRST = False
BUSY_THRESHOLD = 0.5  # cores other processes keep busy at start from which threads wait passively
PROBE_SECONDS = 0.05


def _others_busy_now(seconds: float = PROBE_SECONDS) -> float | None:
    """Cores other processes keep busy over the next `seconds` (None where /proc/stat cannot be read)."""
    before = sample()
    if before is None:
        return None
    time.sleep(seconds)
    after = sample()
    return None if after is None else others_busy_cores(before, after)


def choose_waiting(env: MutableMapping[str, str] | None = None, modules: Mapping | None = None,
                   busy_cores=_others_busy_now) -> str | None:
    """Set OMP_WAIT_POLICY for this process (and its children) if it can still take effect: 'active' when the other
    processes leave the cores idle now, 'passive' when they keep at least `BUSY_THRESHOLD` cores busy (or the load
    cannot be read). Returns the policy set here, or None when the user chose one or torch (and OpenMP) already
    loaded. `busy_cores()` -> cores the others keep busy (tests pass their own)."""
    global _CHOSEN, _TORCH_FIRST
    env = os.environ if env is None else env
    modules = sys.modules if modules is None else modules
    inherited = env.get(_MARK) and env.get("OMP_WAIT_POLICY") == env.get(_MARK)  # a promptset parent's choice
    if not inherited and any(env.get(name) for name in _WAIT_ENV):
        return None
    if "torch" in modules:
        _TORCH_FIRST = True
        return None
    busy = busy_cores()
    _CHOSEN = "active" if busy is not None and busy < BUSY_THRESHOLD else "passive"
    env["OMP_WAIT_POLICY"] = env[_MARK] = _CHOSEN
    return _CHOSEN


def wait_policy(env: Mapping[str, str] | None = None) -> str:
    """How this process's OpenMP threads wait: 'active (idle at start)', 'passive (busy at start)', 'user: NAME=VALUE',
    'spinning (torch imported before promptset)' or 'default'."""
    env = os.environ if env is None else env
    if _TORCH_FIRST:
        return "spinning (torch imported before promptset)"
    if _CHOSEN is not None and env.get("OMP_WAIT_POLICY") == _CHOSEN:
        return f"{_CHOSEN} ({'idle' if _CHOSEN == 'active' else 'busy'} at start)"
    for name in _WAIT_ENV:
        if env.get(name):
            return f"user: {name}={env[name]}"
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
