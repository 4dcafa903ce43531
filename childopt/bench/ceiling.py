"""The in-cache time of an optimizer-step row on CPU: what its step costs per element when its data
stays in cache, the counterpart of the in-place stream reference (the memory ceiling).

The row's optimizer steps a list of :data:`TENSORS` tensor(s) small enough that everything the
step touches stays in one instance of the last-level cache, at two sizes, n and 2n elements (both
lists alive, stepped alternately, the fastest of :data:`REPS` steps each): the slope
``(t(2n) - t(n)) / n`` is the step's cost per element, its arithmetic and its traffic to the cache,
without its fixed costs per step and per tensor (Python, dispatch, small torch ops), which cancel
in the difference.  A row's "compute ms" is that slope times its own elements.  Near the row's
ms/step, the row is bound by what its cores do and a faster memory would not speed it up; well
below, memory (or fixed costs) bound it, and its "% of stream" says how well it streams.

Every tensor holds a whole number of the CPU kernels' 32K-element work items per thread, so both
lists keep every thread busy (torch's CPU ops also go parallel only above 32K elements); where
that does not fit the cache, or where the two times differ by less than :data:`MIN_DIFFERENCE`
(the slope would be noise), there is no figure.  CPU only: on CUDA a step's launch costs hide a
slope at sizes that fit the L2 cache.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from childopt.bench.measure import grad_restorer, time_calls
from childopt.bench.shapes import make_params

# One tensor: a list of several would need TENSORS times the elements for every thread to get
# whole work items, and fit fewer threads in a cache (4 tensors: none past 2 threads in 32 MiB).
TENSORS = 1
# Bytes a step can hold per element, at the most: p, g, m, v, a compact gradient, an index (4 B
# each) and a mask byte, rounded up.
HELD_BYTES = 32
# Share of one last-level cache instance the two lists (3n elements) may fill together.
LLC_SHARE = 0.75
# Elements of one work item of the CPU kernels (kChunk, csrc/cpu/cpu_common.h), and torch's grain.
WORK_ITEM = 1 << 15
# t(2n) - t(n) below this share of t(n) gives no slope: the difference would be timing noise.
MIN_DIFFERENCE = 0.05
WARMUP = 3
REPS = 40


def ceiling_numel(cache_bytes: int, threads: int) -> Optional[int]:
    """n, the smaller list's elements: a multiple of TENSORS * WORK_ITEM * ``threads`` (each tensor
    gives every thread whole work items), the largest whose two lists (3n elements of at most
    HELD_BYTES each) fill at most LLC_SHARE of a cache instance of ``cache_bytes``; None when not
    even one such unit fits."""
    unit = TENSORS * WORK_ITEM * threads
    n = int(LLC_SHARE * cache_bytes / (3 * HELD_BYTES)) // unit * unit
    return n or None


def slope(small: float, large: float, small_numel: int, large_numel: int) -> Optional[float]:
    """Seconds per element between (small_numel, small) and (large_numel, large); None when the two
    times differ by less than MIN_DIFFERENCE of the smaller list's."""
    if large - small < MIN_DIFFERENCE * small:
        return None
    return (large - small) / (large_numel - small_numel)


def measure_compute(make: Callable[[list], torch.optim.Optimizer], dtype: torch.dtype, cache_bytes: int, *,
                    restore_grads: bool = False, reps: int = REPS) -> Optional[float]:
    """Nanoseconds per element of the step of the optimizer ``make(params)`` builds, on CPU lists of
    ``dtype`` in one last-level cache instance of ``cache_bytes``, at the current thread count;
    None where no list fits or no slope stands out of the noise.

    ``restore_grads``: the optimizer scales its gradients in place (the published ChildTuning
    loop); they are put back before every step, outside the timer.
    """
    small_numel = ceiling_numel(cache_bytes, torch.get_num_threads())
    if small_numel is None:
        return None
    steppers = []
    for numel in (small_numel, 2 * small_numel):
        params = make_params([(numel // TENSORS,)] * TENSORS, torch.device("cpu"), dtype=dtype)
        opt = make(params)
        restore = grad_restorer(params) if restore_grads else None
        time_calls(opt.step, WARMUP, before=restore)
        steppers.append((opt.step, restore))
    best = [float("inf"), float("inf")]
    for _ in range(reps):  # alternating, so a slow spell of the machine hits both sizes
        for i, (step, restore) in enumerate(steppers):
            best[i] = min(best[i], *time_calls(step, 1, before=restore))
    seconds = slope(best[0], best[1], small_numel, 2 * small_numel)
    return None if seconds is None else seconds * 1e9
