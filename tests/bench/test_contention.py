"""childopt.bench.contention: the CPU share other processes take while a table is measured."""
import os
import subprocess
import sys
import time

import pytest

from childopt.bench import contention
from childopt.bench.contention import OtherLoad, describe


def test_the_share_is_the_machines_busy_time_less_our_own_over_its_capacity(monkeypatch):
    """Hand-computed: 2 CPUs for 4 s hold 8 CPU-seconds; 5 busy, 3 of them ours: others took 25%."""
    clock, busy, own = iter([10.0, 14.0]), iter([100.0, 105.0]), iter([7.0, 10.0])
    monkeypatch.setattr(contention.time, "perf_counter", lambda: next(clock))
    monkeypatch.setattr(contention, "_busy_seconds", lambda cpus: next(busy))
    monkeypatch.setattr(contention, "_own_seconds", lambda: next(own))
    load = OtherLoad()
    load._cpus = {0, 1}
    with load:
        pass
    assert load.share == pytest.approx(0.25)
    assert describe(load.share) == ("other processes took 25% of the CPUs meanwhile: LOADED, these times are "
                                    "not this code's; rerun on a quiet machine")
    assert describe(0.01) == "other processes took 1% of the CPUs meanwhile"


def test_no_share_without_proc_stat_or_under_a_second(monkeypatch):
    with OtherLoad() as short:
        pass
    assert short.share is None and "unknown" in describe(short.share)
    monkeypatch.setattr(contention, "MIN_SECONDS", 0.0)
    monkeypatch.setattr(contention, "_busy_seconds", lambda cpus: None)
    with OtherLoad() as unreadable:
        time.sleep(0.01)
    assert unreadable.share is None


@pytest.mark.skipif(not os.path.exists("/proc/stat") or not hasattr(os, "sched_getaffinity"), reason="Linux only")
def test_a_busy_process_beside_the_block_is_counted():
    cpus = len(os.sched_getaffinity(0))
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)  # the hog is running
        with OtherLoad() as load:
            time.sleep(1.5)
    finally:
        hog.kill()
        hog.wait()
    assert load.share is not None and load.share >= 0.5 / cpus  # one whole CPU, counted in ticks
