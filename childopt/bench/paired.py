"""Paired ratios: the childopt steps and torch fused AdamW stepping the *same* parameters.

The step tables give every row its own copy of the parameter list, one row after another, so a
ratio of two rows carries two spreads besides the code: what else the machine ran meanwhile, and
where in memory each copy landed (on the 2-core EPYC VM, four identical optimizers on their own
tensors, stepped in rotation, differed by 4% at 2 threads and 20% at 1).  Here every optimizer
of :data:`KEYS` and the baseline are built over one parameter list and its fixed gradients, each
with its own state, and stepped in rotation: round r starts at the r-th optimizer, so none always
follows the same one.  A ratio is the baseline's median step over the row's; only the placement
of the optimizer state still differs.  The rows step the parameters in turn, which changes their
values a little each time (lr 1e-3 of :data:`childopt.bench.step.HYPER`) but not what a step costs.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch
from tqdm import tqdm

from childopt.bench import step
from childopt.bench.measure import Unavailable, skip_record, synchronized
from childopt.bench.shapes import make_params, roberta_base_shapes
from childopt.bench.table import aligned_table
from childopt.bench.threads import intra_op_threads, label

BASELINE = "adamw-fused"
# Rows that neither scale the gradients in place nor hook them, so they can share them.
KEYS = ("masked-none", "masked-dense-freeze", "masked-dense-zero_grad", "masked-bernoulli", "masked-importance",
        "childtuning-f")


@dataclass(frozen=True)
class PairedRow:
    """One optimizer's median step in the rotation and the baseline's median over it."""

    key: str
    optimizer: str
    mode: str
    backend: str
    ms_per_step: float
    x_fused: float


@dataclass(frozen=True)
class PairedTable:
    """The paired rows of one parameter list, dtype and thread count (``baseline_ms``: torch fused
    AdamW's median step in the same rotation)."""

    size: str
    dtype: str
    threads: int
    rounds: int
    baseline_ms: float
    rows: list[PairedRow]
    skipped: list[dict]


def step_in_rotation(steps: dict[str, Callable[[], object]], rounds: int,
                     clock: Callable[[], float] = time.perf_counter) -> dict[str, list[float]]:
    """Seconds of each call of every ``steps`` entry over ``rounds`` rounds; round r calls them in
    their order rotated left by r."""
    keys = list(steps)
    times = {key: [] for key in keys}
    for r in tqdm(range(rounds), desc="paired steps", unit="round", leave=False):
        shift = r % len(keys)
        for key in keys[shift:] + keys[:shift]:
            start = clock()
            steps[key]()
            times[key].append(clock() - start)
    return times


def run_paired(size: str, dtype: torch.dtype, device: torch.device, *, rounds: int, warmup: int,
               backend: str = "auto") -> PairedTable:
    """The rows of :data:`KEYS` (those :data:`childopt.bench.step.ROWS` has) and the baseline over one
    ``size`` list of ``dtype`` parameters at the current thread count; a row that cannot run here (or
    with these parameters) is skipped with the reason."""
    specs = {spec.key: spec for spec in step.ROWS}
    params = make_params(roberta_base_shapes(*step.SIZES[size]), device, dtype=dtype)
    optimizers, skipped = {BASELINE: specs[BASELINE].make(params, backend)}, []
    for key in (key for key in KEYS if key in specs):
        spec = specs[key]
        try:
            optimizers[key] = spec.make(params, backend)
        except (Unavailable, RuntimeError, TypeError, NotImplementedError) as exc:
            skipped.append(skip_record(key, spec.optimizer, spec.mode, f"{type(exc).__name__}: {exc}"))
    steps = {key: synchronized(opt.step, device) for key, opt in optimizers.items()}
    for _ in range(warmup):
        for call in steps.values():
            call()
    times = step_in_rotation(steps, rounds)
    baseline = statistics.median(times[BASELINE])
    rows = []
    for key, opt in optimizers.items():
        if key == BASELINE:
            continue
        median = statistics.median(times[key])
        spec = specs[key]
        rows.append(PairedRow(key, spec.optimizer, spec.mode, spec.backend or opt.backend_name(), median * 1e3,
                              baseline / median))
    return PairedTable(size, step.dtype_name(dtype), torch.get_num_threads(), rounds, baseline * 1e3, rows, skipped)


def run_tables(sizes: list[str], dtypes: list[str], thread_counts: list[int], device: torch.device, *, rounds: int,
               warmup: int, backend: str = "auto") -> list[PairedTable]:
    """One :class:`PairedTable` per size, thread count and dtype, in the step tables' order."""
    tables = []
    for size in sizes:
        for count in thread_counts:
            with intra_op_threads(count):
                tables += [run_paired(size, step.DTYPES[dtype], device, rounds=rounds, warmup=warmup,
                                      backend=backend) for dtype in dtypes]
    return tables


def heading(table: PairedTable, all_threads: int) -> str:
    """What a paired table stepped, and how."""
    return (f"paired ratios, {table.size} list, {table.dtype}, {label(table.threads, all_threads)}: these optimizers "
            f"and torch fused AdamW step the same parameters and gradients (each its own state) in rotation, "
            f"{table.rounds} rounds; torch fused's median step {table.baseline_ms:.2f} ms")


def format_table(table: PairedTable) -> str:
    """The paired rows as an aligned text table."""
    columns = (("optimizer", lambda r: r.optimizer), ("mode", lambda r: r.mode), ("backend", lambda r: r.backend),
               ("ms/step", lambda r: f"{r.ms_per_step:.2f}"), ("x torch-fused", lambda r: f"{r.x_fused:.2f}x"))
    return aligned_table(columns, table.rows, numeric=range(3, len(columns)))
