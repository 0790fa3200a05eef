"""Progress bars that suit where the output goes: a tqdm bar on a terminal (or a notebook widget), and on a log file
or pipe a plain line at most every `LOG_INTERVAL_S` seconds plus one when the loop ends, never bar fragments.
"""

from __future__ import annotations

import sys
import time

from tqdm.auto import tqdm as _auto_tqdm
from tqdm.autonotebook import tqdm as _notebook_or_std
from tqdm.std import tqdm as _std_tqdm

LOG_INTERVAL_S = 30.0


def progress_bar(iterable=None, *, desc: str = "", total: int | None = None, initial: int = 0, unit: str = "it",
             disable: bool = False, leave: bool = True):
    """A progress bar over `iterable` (or a manual one with `total`): tqdm on a terminal, log lines elsewhere."""
    if disable:
        return _std_tqdm(iterable, total=total, initial=initial, disable=True)
    notebook = _notebook_or_std is not _std_tqdm  # tqdm picks its widget inside a Jupyter kernel
    if notebook or sys.stderr.isatty():
        return _auto_tqdm(iterable, desc=desc, total=total, initial=initial, unit=unit, leave=leave)
    return LineProgress(iterable, desc=desc, total=total, initial=initial, unit=unit)


class LineProgress:
    """The tqdm methods promptset uses (iteration, update, set_postfix, write, close), as occasional whole lines."""

    def __init__(self, iterable=None, *, desc: str, total: int | None, initial: int, unit: str):
        self.iterable = iterable
        self.desc, self.unit, self.n = desc, unit, initial
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)
        self.total = total
        self.postfix = ""
        self.start = self.last = time.perf_counter()
        self.initial = initial
        self.closed = False

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.update(1)
        self.close()

    def __len__(self) -> int:
        return self.total or 0

    def _line(self, final: bool) -> str:
        elapsed = time.perf_counter() - self.start
        of = f"/{self.total}" if self.total is not None else ""
        rate = (self.n - self.initial) / elapsed if elapsed > 0 else 0.0
        state = "done" if final else "at"
        extra = f" {self.postfix}" if self.postfix else ""
        return f"{self.desc}: {state} {self.n}{of} {self.unit} in {elapsed:.0f} s ({rate:.2f} {self.unit}/s){extra}"

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.perf_counter()
        if now - self.last >= LOG_INTERVAL_S and not (self.total is not None and self.n >= self.total):
            self.last = now
            print(self._line(False), file=sys.stderr, flush=True)

    def set_postfix(self, **values) -> None:
        self.postfix = " ".join(f"{k}={v}" for k, v in values.items())

    def write(self, text: str) -> None:
        print(text, flush=True)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            print(self._line(True), file=sys.stderr, flush=True)
