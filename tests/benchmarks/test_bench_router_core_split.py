"""bench/router.py cpu mode's split of the router core's time (from /proc/stat), on fixed tick counts."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.router import core_split, core_times


def test_core_split_shares_of_the_ticks_between_two_readings():
    # /proc/stat's order: user, nice, system, idle, iowait, irq, softirq, steal
    before = [100, 5, 40, 1000, 10, 0, 20, 3]
    after = [160, 5, 50, 1010, 10, 2, 38, 3]  # +60 user, +10 system, +10 idle, +2 irq, +18 softirq = 100 ticks
    split = core_split(before, after)
    assert split == pytest.approx({"user": 0.60, "system": 0.10, "softirq": 0.20, "idle": 0.10, "steal": 0.0})
    assert core_split(None, after) == {}  # no /proc/stat: no split, not an error


@pytest.mark.skipif(not Path("/proc/stat").exists(), reason="no /proc/stat")
def test_core_times_reads_core_zero():
    t = core_times(0)
    assert t is not None and len(t) == 8 and all(x >= 0 for x in t)
    assert core_times(10**6) is None  # no such core
