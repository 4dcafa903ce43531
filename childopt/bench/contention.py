"""CPU time other processes took while the bench measured: a loaded machine's times are not this code's.

Why it matters: on the 2-core EPYC VM a ``--quick`` run that shared the machine with a test run
printed torch fused AdamW at 1096 ms per step in its paired table (13-16 ms
alone), a paired ratio of 60x, and marked the goal met.  torch's CPU fused Adam steps tensor by
tensor (aten/src/ATen/native/FusedAdam.cpp), a parallel region each (139 on the 24m list), so a
descheduled thread can hold up every one of them; MaskedAdamW's step is one region.  A plain busy
loop beside the step costs far less (torch fused 11-13 -> 18-24 ms, MaskedAdamW 11-12 -> 16-17 ms):
how much the load distorts a ratio depends on what else runs.

Linux only (``/proc/stat``); elsewhere the share is unknown (None).  Counted on the CPUs this
process may run on (its affinity): their busy time (user, nice, system, irq, softirq and steal:
a hypervisor that runs another guest delays the step alike), less this process's own CPU time,
as a share of those CPUs' time over the block.
"""
from __future__ import annotations

import os
import resource
import time
from typing import Optional

# A table measured while other processes took more than this share of the CPUs is flagged.
LOADED_SHARE = 0.05
# Shorter blocks get no share: /proc/stat counts in clock ticks (10 ms), too coarse below a second.
MIN_SECONDS = 1.0
_BUSY_FIELDS = (0, 1, 2, 5, 6, 7)  # user, nice, system, irq, softirq, steal (idle and iowait are not busy)


def _busy_seconds(cpus: set) -> Optional[float]:
    """Busy seconds since boot of ``cpus``, from /proc/stat, or None where it cannot be read."""
    try:
        with open("/proc/stat") as stat:
            lines = [line.split() for line in stat if line.startswith("cpu") and line[3:4].isdigit()]
        ticks = sum(int(fields[1 + i]) for fields in lines if int(fields[0][3:]) in cpus for i in _BUSY_FIELDS)
    except (OSError, ValueError, IndexError):
        return None
    return ticks / os.sysconf("SC_CLK_TCK")


def _own_seconds() -> float:
    """CPU seconds this process (all its threads) and its waited-for children have used."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


class OtherLoad:
    """Context manager: ``share``, after the block, is the CPU share other processes took during it."""

    def __init__(self):
        self.share: Optional[float] = None
        self._cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set(range(os.cpu_count() or 1))

    def __enter__(self) -> "OtherLoad":
        self._start = (time.perf_counter(), _busy_seconds(self._cpus), _own_seconds())
        return self

    def __exit__(self, *exc) -> None:
        wall, busy, own = time.perf_counter(), _busy_seconds(self._cpus), _own_seconds()
        start_wall, start_busy, start_own = self._start
        if busy is None or start_busy is None or wall - start_wall < MIN_SECONDS:
            return
        others = (busy - start_busy) - (own - start_own)
        self.share = min(1.0, max(0.0, others / ((wall - start_wall) * len(self._cpus))))


def describe(share: Optional[float]) -> str:
    """The share as a table heading ends: what else ran, and whether the times can be trusted."""
    if share is None:
        return "other processes' CPU use unknown (no /proc/stat, or under a second to count it in)"
    text = f"other processes took {share:.0%} of the CPUs meanwhile"
    return text + (": LOADED, these times are not this code's; rerun on a quiet machine"
                   if share > LOADED_SHARE else "")
