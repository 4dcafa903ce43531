"""Importance-sampled keep probabilities: the scale solve, the level table and the level codes.

Each step an importance-sampled child network keeps element ``i`` with probability

    p_i = clamp(c * s_i ** (1 / T), p_min, 1)

where ``s_i`` is its importance, ``T`` a temperature and ``c`` is solved per scope so that the
expected kept share ``sum(p_i) / N`` is exactly ``reserve_p`` (:func:`solve_log_scale`, in the log domain).

What the kernels read (contract kind ``IMPORTANCE``): one level code per element (uint8, the
traffic of a dense mask) and the 256-entry :func:`level_table` of levels ``2 ** ((q - 255) / 8)``
(``q = 0`` is p = 0) with their keep thresholds and ``1 / p``.  The kernels compare the Philox
word with the threshold of the element's level and, under zero-grad, scale its gradient by the
level's ``1 / p``.  One byte per element rather than none (p_i computed from ``exp_avg_sq`` in
the kernel) because a power function in every backend would not round alike, and the keep
decisions must be bit-identical on every backend; one byte rather than four (p_i in fp32)
because the step streams 28 bytes per element and the dense mask already showed what one
more costs.

p_i is rounded to one of its two neighbouring levels at random (Philox stream
:data:`ROUNDING_STREAM`), up with probability ``(p_i - lower) / (upper - lower)``.  The level's
expectation is p_i, so the expected kept share stays ``reserve_p``, and the gradient scaled by
``1 / level`` stays an unbiased estimate.  Each refresh draws the rounding anew, so over
refreshes every element is kept at rate p_i (levels are 9% apart; the rounding adds variance,
no bias).  A level's keep threshold rounds ``p * 2**32`` to an integer, as the Bernoulli mask does.
"""
from __future__ import annotations

import functools
import math

import torch

from childopt import philox

LEVEL_COUNT = 256
LEVELS_PER_OCTAVE = 8
ROUNDING_STREAM = 0x5A3E  # Philox counter words 2-3 of the level rounding: apart from any optimizer step
_SOLVE_ITERATIONS = 200
_SOLVE_TOLERANCE = 1e-9  # relative error of the expected kept count the solve stops at


def level_probabilities(device=None) -> torch.Tensor:
    """The keep probability of each level code (float64 [256]): 0, then ``2 ** ((q - 255) / 8)``."""
    q = torch.arange(LEVEL_COUNT, dtype=torch.float64, device=device)
    p = torch.exp2((q - (LEVEL_COUNT - 1)) / LEVELS_PER_OCTAVE)
    p[0] = 0.0
    return p


@functools.lru_cache(maxsize=None)
def _table(device: torch.device) -> torch.Tensor:
    p = level_probabilities()
    thresholds = [0.0] + [float(philox.keep_threshold(float(x))) for x in p[1:-1]] + [float(2**32)]
    scales = torch.where(p > 0, 1.0 / p, torch.zeros_like(p))
    return torch.stack([torch.tensor(thresholds, dtype=torch.float64), scales]).to(device)


def level_table(device=None) -> torch.Tensor:
    """The kernels' float64 [2, 256] table: keep thresholds (``word < threshold``), then ``1 / p``.

    Thresholds are :func:`childopt.philox.keep_threshold` of each level, 0 for p = 0 (never kept)
    and ``2**32`` for p = 1 (always kept); ``1 / p`` is 0 for p = 0 (never read).  Built once
    per device (the kernels only read it).
    """
    return _table(torch.device(device if device is not None else "cpu"))


def level_codes(p: torch.Tensor, words: torch.Tensor) -> torch.Tensor:
    """uint8 level codes of keep probabilities ``p`` (float64), rounded at random by uint32 ``words``.

    Level ``q`` or ``q + 1`` around each p, up with probability ``(p - P[q]) / (P[q+1] - P[q])``,
    so ``E[P[code]] = p`` (exactly, up to float64 rounding and the 2**-32 steps of ``words``).
    """
    levels = level_probabilities(p.device)
    position = (LEVEL_COUNT - 1) + LEVELS_PER_OCTAVE * torch.log2(p)
    lower = torch.floor(position).clamp(0, LEVEL_COUNT - 2).long()
    low, high = levels[lower], levels[lower + 1]
    up = ((p - low) / (high - low)).clamp(0.0, 1.0)
    uniform = (words.double() + 0.5) * 2.0**-32
    return (lower + (uniform < up).long()).to(torch.uint8)


def log_ratios(scores: list, temperature: float) -> list:
    """``log2((s / max s) ** (1 / T))`` of a scope's score tensors, flat fp32 (``-inf`` for zeros).

    In the log domain, so neither a large score nor a small temperature overflows or underflows:
    ``T -> 0`` sends every ratio but the largest towards ``-inf``, and the solve still separates
    them.  An all-zero scope has no order: every entry gets 0 (ratio 1, a uniform draw).
    """
    peak = max((float(s.max()) for s in scores if s.numel()), default=0.0)
    if peak == 0.0:
        return [torch.zeros(s.numel(), dtype=torch.float32, device=s.device) for s in scores]
    top = math.log2(peak)
    return [((torch.log2(s.reshape(-1).double()) - top) / temperature).float() for s in scores]


def _expected_kept(logs: list, log_c: float, p_min: float) -> tuple[float, float]:
    """``sum(clamp(2 ** (log_c + log r), p_min, 1))`` and its slope in ``log_c``."""
    total, slope = 0.0, 0.0
    for log_r in logs:
        p = torch.exp2(log_r.double() + log_c)
        clamped = p.clamp(p_min, 1.0)
        total += float(clamped.sum())
        slope += float(torch.where((p > p_min) & (p < 1.0), p, 0.0).sum()) * math.log(2.0)
    return total, slope


def solve_log_scale(logs: list, reserve_p: float, p_min: float) -> float:
    """``log2 c`` with ``sum(clamp(c * r, p_min, 1)) = reserve_p * N`` over one scope's log ratios.

    The sum is non-decreasing in ``log2 c``; Newton's step from the current point is taken when it
    stays inside the bracket of the root found so far, else the bracket is halved, or, while it is
    open on one side, widened by steps that double.  Returns ``-inf`` when ``p_min`` alone keeps
    ``reserve_p`` (every p is ``p_min``) and ``inf`` when even ``c = inf`` keeps too few (more
    zero scores than ``1 - reserve_p`` of the scope, and ``p_min`` too small to make up for them).
    """
    n = sum(r.numel() for r in logs)
    target = reserve_p * n
    if p_min * n >= target:
        return -math.inf
    positive = sum(int(torch.isfinite(r).sum()) for r in logs)
    if positive + p_min * (n - positive) < target * (1 - _SOLVE_TOLERANCE):
        return math.inf
    low, high, widen = -math.inf, math.inf, 1.0
    x = math.log2(target) - math.log2(sum(float(torch.exp2(r.double()).sum()) for r in logs))
    for _ in range(_SOLVE_ITERATIONS):
        kept, slope = _expected_kept(logs, x, p_min)
        if abs(kept - target) <= _SOLVE_TOLERANCE * target:
            return x
        if kept < target:
            low = x
        else:
            high = x
        if math.isfinite(low) and math.isfinite(high) and high - low <= 1e-15 * max(1.0, abs(high)):
            return high  # the sum steps over the target here
        step = x + (target - kept) / slope if slope > 0 else math.nan
        if low < step < high:
            x = step
        elif math.isinf(high) or math.isinf(low):
            x = x + widen if math.isinf(high) else x - widen
            widen *= 2.0
        else:
            x = (low + high) / 2.0
    return x


def keep_probabilities(logs: list, log_c: float, p_min: float) -> list:
    """``clamp(2 ** (log_c + log r), p_min, 1)`` per tensor (float64); ``log_c = inf`` keeps every non-zero score."""
    if math.isinf(log_c) and log_c > 0:
        return [torch.full_like(r, p_min, dtype=torch.float64).masked_fill_(torch.isfinite(r), 1.0) for r in logs]
    return [torch.exp2(r.double() + log_c).clamp(p_min, 1.0) for r in logs]


def draw_codes(p: torch.Tensor, rng_base: int, seed: int, refresh: int, random_words) -> torch.Tensor:
    """Level codes of one tensor's flat keep probabilities, rounded by Philox (key ``seed``).

    The rounding words are keyed like the Bernoulli draw (counter: the element's group and
    :data:`ROUNDING_STREAM`), with ``refresh`` folded into the key so each refresh draws anew.
    """
    key = (seed + refresh * 0x9E3779B97F4A7C15) % 2**64
    return level_codes(p, random_words(p.numel(), rng_base, key, ROUNDING_STREAM, p.device))
