"""Paired ratios: the childopt steps and torch fused AdamW stepping the *same* parameters.

The step tables give every row its own copy of the parameter list, one row after another, so a
ratio of two rows carries two spreads besides the code: what else the machine ran meanwhile, and
where in memory each copy landed (on the 2-core EPYC VM, four identical optimizers on their own
tensors, stepped in rotation, differed by 4% at 2 threads and 20% at 1).  Here the baseline and
every optimizer of :data:`KEYS` are built over one parameter list and its fixed gradients, each
with its own state, and stepped in rotation: round r starts at the r-th optimizer, so no
optimizer always goes first (over a multiple of their number of rounds, each takes every place
equally often), each after an untimed pass evicting the last-level cache, as the step tables
time theirs (:mod:`childopt.bench.evict`).  A ratio is the baseline's median step over the row's; only
the placement of the optimizer state still differs.  The rows step the parameters in turn, which
changes their values a little each time (lr 1e-3 of :data:`childopt.bench.step.HYPER`) but not
what a step costs.  All the optimizers are alive at once: parameters, gradients, seven pairs of
fp32 moments and three byte masks, 67 B per fp32 parameter (1.6 GB for the 24m list, 8.4 GB for
125m).
"""
from __future__ import annotations

import dataclasses
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from tqdm import tqdm

from childopt.bench import contention, step
from childopt.bench.contention import OtherLoad
from childopt.bench.evict import CacheEvictor
from childopt.bench.measure import Unavailable, release_memory, synchronized
from childopt.bench.shapes import make_params, roberta_base_shapes
from childopt.bench.table import aligned_table
from childopt.bench.threads import intra_op_threads, label

# torch fused AdamW, else foreach where this torch has no fused kernel for the device (as the step
# tables compare).
BASELINES = ("adamw-fused", "adamw-foreach")
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

    @property
    def it_s(self) -> float:
        """Steps per second, as the step rows give it (the goals divide these)."""
        return 1e3 / self.ms_per_step


@dataclass(frozen=True)
class PairedTable:
    """The paired rows of one parameter list, dtype and thread count, the baseline's first
    (``baseline``: its key, one of :data:`BASELINES`)."""

    size: str
    dtype: str
    threads: int
    rounds: int
    baseline: str
    rows: list[PairedRow]
    skipped: list[dict]
    other_cpu: Optional[float] = None  # CPU share other processes took meanwhile (childopt.bench.contention)


def step_in_rotation(steps: dict[str, Callable[[], object]], rounds: int,
                     clock: Callable[[], float] = time.perf_counter,
                     before: Optional[Callable[[], object]] = None) -> dict[str, list[float]]:
    """Seconds of each call of every ``steps`` entry over ``rounds`` rounds; round r calls them in
    their order rotated left by r, each after an untimed call of ``before``, if given."""
    keys = list(steps)
    times = {key: [] for key in keys}
    for r in tqdm(range(rounds), desc="paired steps", unit="round", leave=False):
        shift = r % len(keys)
        for key in keys[shift:] + keys[:shift]:
            if before is not None:
                before()
            start = clock()
            steps[key]()
            times[key].append(clock() - start)
    return times


def _stepped(spec: step.RowSpec, params, backend: str, device: torch.device) -> tuple[str, Callable[[], None]]:
    """``spec``'s optimizer over ``params``: its backend label and its synchronized step, stepped once
    (a first warm-up step), so a row that builds but cannot step fails here, before the rotation."""
    opt = spec.make(params, backend)
    call = synchronized(opt.step, device)
    call()
    return spec.backend or opt.backend_name(), call


def run_paired(size: str, dtype: torch.dtype, device: torch.device, *, rounds: int, warmup: int,
               backend: str = "auto") -> PairedTable:
    """The baseline and the rows of :data:`KEYS` (those :data:`childopt.bench.step.ROWS` has) over one
    ``size`` list of ``dtype`` parameters at the current thread count; rows are skipped, or their
    failure raised, as the step tables do (:func:`childopt.bench.step.skip_for`)."""
    specs = {spec.key: spec for spec in step.ROWS}
    params = make_params(roberta_base_shapes(*step.SIZES[size]), device, dtype=dtype)
    labels, steps, skipped = {}, {}, []
    for key in BASELINES:
        try:
            labels[key], steps[key] = _stepped(specs[key], params, backend, device)
            break
        except step.ROW_FAILURES as exc:
            skipped.append(step.skip_for(specs[key], dtype, exc))
    else:
        raise Unavailable("no baseline: " + "; ".join(f"{s['key']}: {s['reason']}" for s in skipped))
    baseline = next(iter(steps))
    for key in (key for key in KEYS if key in specs):
        try:
            labels[key], steps[key] = _stepped(specs[key], params, backend, device)
        except step.ROW_FAILURES as exc:
            skipped.append(step.skip_for(specs[key], dtype, exc))
    for _ in range(warmup - 1):
        for call in steps.values():
            call()
    rotation = step_in_rotation(steps, rounds, before=CacheEvictor(device))
    times = {key: statistics.median(seconds) for key, seconds in rotation.items()}
    rows = [PairedRow(key, specs[key].optimizer, specs[key].mode, labels[key], times[key] * 1e3,
                      times[baseline] / times[key]) for key in steps]
    return PairedTable(size, step.dtype_name(dtype), torch.get_num_threads(), rounds, baseline, rows, skipped)


def run_tables(sizes: list[str], dtypes: list[str], thread_counts: list[int], device: torch.device, *, rounds: int,
               warmup: int, backend: str = "auto") -> list[PairedTable]:
    """One :class:`PairedTable` per size, thread count and dtype, in the step tables' order."""
    tables = []
    for size in sizes:
        for count in thread_counts:
            with intra_op_threads(count):
                for dtype in dtypes:
                    with OtherLoad() as load:
                        table = run_paired(size, step.DTYPES[dtype], device, rounds=rounds, warmup=warmup,
                                           backend=backend)
                    tables.append(dataclasses.replace(table, other_cpu=load.share))
                    release_memory(device)
    return tables


def heading(table: PairedTable, all_threads: int) -> str:
    """What a paired table stepped, and how."""
    return (f"paired ratios, {table.size} list, {table.dtype}, {label(table.threads, all_threads)}: these optimizers "
            f"step the same parameters and gradients (each its own state) in rotation, {table.rounds} rounds; "
            f"the ratio is {table.rows[0].optimizer} {table.rows[0].mode}'s median step over the row's\n"
            f"  {contention.describe(table.other_cpu)}")


def format_table(table: PairedTable) -> str:
    """The paired rows as an aligned text table."""
    columns = (("optimizer", lambda r: r.optimizer), ("mode", lambda r: r.mode), ("backend", lambda r: r.backend),
               ("ms/step", lambda r: f"{r.ms_per_step:.2f}"),
               (f"x {table.baseline.replace('adamw', 'torch')}", lambda r: f"{r.x_fused:.2f}x"))
    return aligned_table(columns, table.rows, numeric=range(3, len(columns)))
