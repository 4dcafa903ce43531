"""The intra-op thread counts the CPU step tables are timed at, and switching to one of them.

On CPU the optimizer step and its stream reference run on torch's intra-op threads, so the report
times them at one thread (what a kernel does per core) and at all of them (the default
``torch.get_num_threads()`` when the run starts: what the machine does), and says which with
every table.  ``--threads 1,all`` names the counts; the count in force before is always restored.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Iterator

import torch

DEFAULT_CPU = "1,all"


def max_threads() -> int:
    """The largest count accepted: 8 threads per CPU.  More measures nothing, and a far larger count
    (99999) crashes torch's thread pool at its first parallel op."""
    return 8 * (os.cpu_count() or 1)


def parse_threads(text: str, all_threads: int) -> list[int]:
    """Thread counts of a comma-separated list of positive integers (at most :func:`max_threads`) and
    ``all`` (= ``all_threads``), in order, each once; ValueError naming the bad item otherwise."""
    counts = []
    for item in (part.strip() for part in text.split(",")):
        if item == "all":
            count = all_threads
        elif item.isascii() and item.isdigit() and int(item) >= 1:  # isdigit alone takes "²" and "١"
            count = int(item)
        else:
            raise ValueError(f"thread counts are positive integers or 'all', got {item!r}")
        if count > max_threads():
            raise ValueError(f"thread count {count} is more than {max_threads()} (8 per CPU of this machine)")
        if count not in counts:
            counts.append(count)
    return counts


def label(count: int, all_threads: int) -> str:
    """How a table names its thread count: "1 thread", "2 threads (all)"."""
    text = f"{count} thread{'s' if count != 1 else ''}"
    return f"{text} (all)" if count == all_threads else text


@contextmanager
def intra_op_threads(count: int) -> Iterator[int]:
    """Run the block at ``torch.set_num_threads(count)``; the previous count is restored on exit,
    exceptions included."""
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield count
    finally:
        torch.set_num_threads(previous)
