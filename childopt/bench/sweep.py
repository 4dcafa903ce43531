"""The optimizer-step tables of one run of ``python -m childopt bench``: every parameter list size,
parameter dtype and intra-op thread count asked for, each table beside the in-place stream
reference measured at its thread count, just before its rows.

Tables come in the order size, thread count, dtype; the stream is measured once per size and
thread count (its buffers are at least the size of the parameter list) and shared by the dtypes.
The intra-op thread count in force before the run is restored after every table.
"""
from __future__ import annotations

import dataclasses

import torch

from childopt.bench import step
from childopt.bench.contention import OtherLoad
from childopt.bench.llc import last_level_cache
from childopt.bench.shapes import roberta_base_shapes
from childopt.bench.stream import measure_stream, stream_kernel
from childopt.bench.threads import intra_op_threads

# Timed passes of the stream reference at the least (a pass takes milliseconds).
STREAM_MIN_STEPS = 10


def size_numel(size: str) -> int:
    """Elements of the parameter list ``size`` names (a key of :data:`childopt.bench.step.SIZES`)."""
    return sum(torch.Size(s).numel() for s in roberta_base_shapes(*step.SIZES[size]))


def run_tables(sizes: list[str], dtypes: list[str], thread_counts: list[int], device: torch.device, *,
               warmup: int, steps: int, backend: str = "auto") -> list[step.Table]:
    """One :class:`~childopt.bench.step.Table` per size, thread count and dtype (``dtypes``: keys of
    :data:`childopt.bench.step.DTYPES`), each with the stream reference of its size and thread count."""
    llc = last_level_cache(device)
    # a native run builds childopt._C for its rows anyway: build it first, so the reference is native
    kernel = stream_kernel(device, build=backend == "native")
    tables = []
    for size in sizes:
        for count in thread_counts:
            with intra_op_threads(count):
                stream = measure_stream(device, warmup=warmup, steps=max(steps, STREAM_MIN_STEPS),
                                        min_numel=size_numel(size), llc=llc, kernel=kernel)
                for dtype in dtypes:
                    with OtherLoad() as load:
                        table = step.run_table(size, step.DTYPES[dtype], stream, device, warmup=warmup, steps=steps,
                                               backend=backend)
                    tables.append(dataclasses.replace(table, other_cpu=load.share))
    return tables
