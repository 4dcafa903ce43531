"""The compute ceiling of an optimizer-step row on CPU: what its step costs per element when memory
is not the limit, the counterpart of the in-place stream reference (the memory ceiling).

The row's optimizer steps a list of :data:`TENSORS` tensors small enough that everything the step
touches stays in the last-level cache, at two sizes, n and 2n elements (both lists alive, stepped
alternately, the fastest of :data:`REPS` steps each): the slope ``(t(2n) - t(n)) / n`` is the
step's cost per element (arithmetic and cache traffic) without its fixed costs per step and per
tensor (Python, dispatch, small torch ops), which cancel in the difference.  A row's "compute ms"
is that slope times its own elements.  Near the row's ms/step, the row is bound by its arithmetic
and a faster memory would not speed it up; well below, memory (or fixed costs) bound it, and its
"% of stream" says how well it streams.  CPU only: on CUDA the step's launch costs hide a slope
at sizes that fit the L2 cache.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from childopt.bench.measure import grad_restorer, time_calls
from childopt.bench.shapes import make_params

TENSORS = 4
# Bytes a step can hold per element, at the most: p, g, m, v, a compact gradient, an index (4 B
# each) and a mask byte, rounded up.
HELD_BYTES = 32
# Share of the last-level cache the two lists (3n elements) may fill together.
LLC_SHARE = 0.75
# Elements per tensor are a multiple of this (whole 32K-element chunks of the CPU kernels' split
# are not needed; whole Philox groups and vector widths are).
GRAIN = 1024
WARMUP = 3
REPS = 40


@dataclass(frozen=True)
class ComputeCeiling:
    """``ns_per_element``: the slope, None when noise left it at or below zero; ``fixed_us``: the
    intercept (a step's fixed cost over the small list); ``numel``: the two list sizes."""

    ns_per_element: Optional[float]
    fixed_us: float
    numel: tuple[int, int]

    def ms_for(self, numel: int) -> Optional[float]:
        """The compute time of a step over ``numel`` elements, in ms."""
        return None if self.ns_per_element is None else self.ns_per_element * numel / 1e6


def ceiling_numel(llc_bytes: int) -> int:
    """n: the smaller list's elements, so that both lists (3n elements of at most HELD_BYTES each)
    fill at most LLC_SHARE of a cache of ``llc_bytes``; a multiple of TENSORS * GRAIN, at least one."""
    unit = TENSORS * GRAIN
    return max(unit, int(LLC_SHARE * llc_bytes / (3 * HELD_BYTES)) // unit * unit)


def slope_and_intercept(small: float, large: float, small_numel: int, large_numel: int) -> tuple[float, float]:
    """The line through (small_numel, small) and (large_numel, large): seconds per element, seconds at 0."""
    slope = (large - small) / (large_numel - small_numel)
    return slope, small - slope * small_numel


def measure_compute(make: Callable[[list], torch.optim.Optimizer], dtype: torch.dtype, llc_bytes: int, *,
                    restore_grads: bool = False, reps: int = REPS) -> ComputeCeiling:
    """The compute ceiling of the optimizer ``make(params)`` builds, on CPU lists of ``dtype``.

    ``restore_grads``: the optimizer scales its gradients in place (the published ChildTuning
    loop); they are put back before every step, outside the timer.
    """
    small_numel = ceiling_numel(llc_bytes)
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
    slope, intercept = slope_and_intercept(best[0], best[1], small_numel, 2 * small_numel)
    return ComputeCeiling(ns_per_element=slope * 1e9 if slope > 0 else None, fixed_us=intercept * 1e6,
                          numel=(small_numel, 2 * small_numel))
