"""Adaptive CPU threads (threads.py): the count follows the idle cores, and every progress bar re-checks it."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
import torch

from promptset import threads
from promptset.errors import UserError
from promptset.progress import progress_bar


def test_choose_threads_takes_the_idle_cores():
    assert threads.choose_threads(2, 0.0) == 2
    assert threads.choose_threads(2, 0.3) == 2  # a background trickle keeps both
    assert threads.choose_threads(2, 0.7) == 1  # a busy loop slowed by our two threads still takes a core
    assert threads.choose_threads(2, 1.0) == 1
    assert threads.choose_threads(2, 5.0) == 1  # never fewer than one
    assert threads.choose_threads(8, 3.0) == 5
    assert threads.others_busy_cores((0.0, 10.0, 1.0), (2.0, 14.0, 3.0)) == pytest.approx(1.0)  # 4 s busy, 2 ours
    assert threads.others_busy_cores((0.0, 10.0, 1.0), (2.0, 11.0, 3.0)) == 0.0  # clamped


def test_governor_moves_the_thread_count_with_the_load():
    """Fake /proc/stat readings: a competitor arrives (2 -> 1 thread) and leaves (1 -> 2); checks are rate-limited."""
    readings = iter([(0.0, 0.0, 0.0), (4.0, 8.0, 7.9), (8.0, 16.0, 11.9), (12.0, 24.0, 19.8)])
    calls = []
    gov = threads.Governor(2, sampler=lambda: next(readings), set_threads=calls.append, interval=3.0)
    gov.apply(2)
    gov.rebalance(now=1.0)  # too soon: no reading taken
    gov.rebalance(now=4.0)  # 8 busy seconds in 4, 7.9 of them ours: idle machine
    assert calls == [2]
    gov.rebalance(now=8.0)  # 8 busy, 4 ours: another process holds a core
    assert calls == [2, 1]
    gov.rebalance(now=12.0)  # it left
    assert calls == [2, 1, 2] and gov.changes == 2


def test_progress_bars_rebalance(monkeypatch):
    seen = []
    monkeypatch.setattr("promptset.progress.rebalance", lambda: seen.append(1))
    list(progress_bar(range(3), disable=True))
    bar = progress_bar(total=2, desc="x", disable=True)
    bar.update(1)
    bar.update(1)
    bar.close()
    assert len(seen) == 5


def test_configure_respects_fixed_counts_and_refuses_bad_ones():
    before = torch.get_num_threads()
    try:
        assert threads.configure({"PROMPTSET_THREADS": "1"}) == 1 and torch.get_num_threads() == 1
        assert threads.configure({"OMP_NUM_THREADS": "3"}) is None  # the user's own choice stands
        with pytest.raises(UserError, match="PROMPTSET_THREADS"):
            threads.configure({"PROMPTSET_THREADS": "many"})
    finally:
        threads.reset()
        torch.set_num_threads(before)


@pytest.mark.skipif(threads.sample() is None, reason="needs /proc/stat")
def test_a_busy_process_beside_us_is_measured():
    """A real busy loop in another process shows up as (most of) a core taken, and configure() leaves it to it."""
    spin = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.5)
        before = threads.sample()
        time.sleep(1.0)
        after = threads.sample()
        assert threads.others_busy_cores(before, after) >= 0.6
        if threads.available_cores() == 2:
            t = torch.get_num_threads()
            try:
                assert threads.configure({}) == 1
            finally:
                threads.reset()
                torch.set_num_threads(t)
    finally:
        spin.kill()
        spin.wait()
