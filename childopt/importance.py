"""Importance-sampled keep probabilities: the scale solve, the levels and the level codes.

Each step an importance-sampled child network keeps element ``i`` with probability

    p_i = clamp(c * s_i ** (1 / T), p_min, 1)

where ``s_i`` is its importance, ``T`` a temperature and ``c`` is solved per scope so that the
expected kept share ``sum(p_i) / N`` is exactly ``reserve_p`` (:func:`solve_log_scale`, in the log domain).

What the kernels read (contract kind ``IMPORTANCE``): one level code per element (uint8, the
traffic of a dense mask).  Level ``q`` keeps an element when its Philox word (the Bernoulli
stream's) is below an integer threshold that every backend computes from the code with shifts
and a select among :data:`MANTISSAS`, no table and no transcendental function:

    k = 255 - q,  threshold = MANTISSAS[k % 8] << 1          if k < 8
                              MANTISSAS[k % 8] >> (k // 8 - 1) otherwise
    q = 0: never kept;  q = 255: always kept (threshold 2**32)

so level ``q`` keeps with probability ``threshold / 2**32`` (about ``2 ** ((q - 255) / 8)``,
levels 9% apart), and under zero-grad a kept gradient is scaled by the fp32 quotient
``2**32 / float(threshold)`` (1 for q = 255).  One byte per element rather than none (p_i
computed from ``exp_avg_sq`` in the kernel) because a power function in every backend would not
round alike, and the keep decisions must be bit-identical on every backend; one byte rather than
four (p_i in fp32) because the step streams 28 bytes per element already.  Arithmetic levels
rather than a 256-entry table because a gather per element costs the CPU kernel as much as the
rest of its element update.

p_i is rounded to one of its two neighbouring levels at random (Philox stream
:data:`ROUNDING_STREAM`), up with probability ``(p_i - lower) / (upper - lower)``.  The level's
expectation is p_i, so the expected kept share stays ``reserve_p``, and the gradient scaled by
``1 / level`` stays an unbiased estimate (up to the fp32 rounding of the scale).  Each refresh
draws the rounding anew, so over refreshes every element is kept at rate p_i.
"""
from __future__ import annotations

import functools
import math

import torch

from childopt import portable_math

LEVEL_COUNT = 256
LEVELS_PER_OCTAVE = 8
# round(2 ** (31 - j / 8)): the keep thresholds of one octave of levels (csrc: kLevelMantissas).
MANTISSAS = (2147483648, 1969251188, 1805811301, 1655936265, 1518500250, 1392470869, 1276901417, 1170923762)
# Philox counter words 2-3 (the "step") of the level rounding: above any step an optimizer reaches,
# so its words are never an optimizer step's keep words.
ROUNDING_STREAM = (1 << 62) | 0x5A3E
# Elements per piece of a refresh's elementwise work: its temporaries then stay in the cache
# between torch ops (3x faster on a CPU than whole-tensor ops over a large model).
PIECE = 1 << 20  # elements a refresh computes at a time; a multiple of 4 (one Philox group)
# The solve sums probabilities as integers in units of 2**-30 (each p truncated; an int32, at most
# 2**30): exact, so the same in any order, thread count or device.  Truncation moves a sum by less
# than one unit per element: below 1e-9 of an element each, far under the solve's tolerance.
SUM_UNITS = 2**30
_SOLVE_ITERATIONS = 200
_SOLVE_TOLERANCE = 1e-7  # relative error of the expected kept count the solve stops at (fp32 passes)


def level_thresholds(codes: torch.Tensor) -> torch.Tensor:
    """The int64 keep threshold (``word < threshold``) of each uint8 level code (module docstring)."""
    k = (LEVEL_COUNT - 1) - codes.long()
    mantissa = torch.tensor(MANTISSAS, dtype=torch.int64, device=codes.device)[k & 7]
    shift = k >> 3
    threshold = torch.where(shift == 0, mantissa << 1, mantissa >> (shift - 1).clamp_min(0))
    threshold = torch.where(k == 0, 2**32, threshold)
    return torch.where(k == LEVEL_COUNT - 1, 0, threshold)


def level_scales(codes: torch.Tensor) -> torch.Tensor:
    """The fp32 gradient scale ``2**32 / float(threshold)`` of each level code (1 when always kept)."""
    threshold = level_thresholds(codes)
    quotient = torch.full_like(threshold, 2**32, dtype=torch.float32) / threshold.float()
    return torch.where(threshold == 2**32, 1.0, quotient)


def _first_distinct_level() -> int:
    """The lowest non-zero code from which every level is above the one below it."""
    thresholds = level_thresholds(torch.arange(LEVEL_COUNT))
    repeats = (thresholds[1:] == thresholds[:-1]).nonzero()
    return int(repeats.max()) + 2 if repeats.numel() else 1


FIRST_LEVEL = _first_distinct_level()  # 25: levels 1..24 repeat a few thresholds, so codes draw 0 or >= 25


@functools.lru_cache(maxsize=None)
def _probabilities(device: torch.device) -> torch.Tensor:
    codes = torch.arange(LEVEL_COUNT, device=device)
    return level_thresholds(codes).double() / 2**32


def level_probabilities(device=None) -> torch.Tensor:
    """The keep probability of each level code (float64 [256], exact): ``threshold / 2**32``."""
    return _probabilities(torch.device(device if device is not None else "cpu"))


def level_codes(p: torch.Tensor, words: torch.Tensor) -> torch.Tensor:
    """uint8 level codes of keep probabilities ``p`` (fp32), rounded at random by uint32 ``words``.

    Level ``q`` or ``q + 1`` around each p (``q`` from ``log2 p``, corrected by one where the
    levels' truncated thresholds put p in the neighbouring interval), up with probability
    ``(p - P[q]) / (P[q+1] - P[q])``, so ``E[P[code]] = p`` up to fp32 rounding (relative 1e-7) and
    the 2**-24 steps of the uniform draw.  fp32 and in place where it can: a refresh of a large
    model is a few passes over its parameters.  Level indices are int32 and looked up with
    index_select (on CPU 6x faster than ``levels[q]``'s advanced indexing, and half the bytes of int64).
    """
    levels = level_probabilities(p.device).float()
    shape = p.shape
    p, words = p.float().reshape(-1), words.reshape(-1)  # index_select takes a 1-D index
    q = torch.log2(p).mul_(LEVELS_PER_OCTAVE).add_(LEVEL_COUNT - 1).floor_().clamp_(0, LEVEL_COUNT - 2).int()
    q -= (p < levels.index_select(0, q)).int()  # a p just below its level (the thresholds truncate) or p = 0
    q.clamp_(min=0)
    q += ((p >= levels.index_select(0, q + 1)) & (q < LEVEL_COUNT - 2)).int()
    # Below FIRST_LEVEL the shifts run out of bits and levels repeat: round between 0 and FIRST_LEVEL.
    # Selects as integer arithmetic with 0/1 factors: torch's CPU where and masked_fill take ~2 ns
    # per element, 6x a multiply.
    below = q < FIRST_LEVEL
    q.mul_(~below)  # 0 below FIRST_LEVEL
    upper = (q + 1).add_(below, alpha=FIRST_LEVEL - 1)  # FIRST_LEVEL below it, else q + 1
    low, high = levels.index_select(0, q), levels.index_select(0, upper)
    up = (p - low) / (high - low)
    uniform = (words >> 8).float().add_(0.5).mul_(2.0**-24)
    return q.add_(upper.sub_(q).mul_(uniform < up)).to(torch.uint8).view(shape)  # upper where drawn up, else q


def scores_at_levels(score: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """``score`` times each entry's level probability (fp32): a zero-grad group's running scores, whose
    kept gradients were scaled by ``1 / level``.  Looked up with index_select (6x ``levels[codes]`` on CPU)."""
    levels = level_probabilities(score.device).float()
    return score * levels.index_select(0, codes.reshape(-1).int()).view(codes.shape)


def score_logs(score: torch.Tensor, codes=None) -> torch.Tensor:
    """The flat log2 of a score tensor (:func:`childopt.portable_math.log2`), of :func:`scores_at_levels`
    when level ``codes`` are given; a piece at a time, so its temporaries stay the size of a piece."""
    flat = score.reshape(-1)
    levels = None if codes is None else codes.reshape(-1)
    logs = torch.empty(flat.numel(), dtype=torch.float64 if score.dtype == torch.float64 else torch.float32,
                       device=score.device)
    for start in range(0, flat.numel(), PIECE):
        piece = flat[start:start + PIECE]
        if levels is not None:
            piece = scores_at_levels(piece, levels[start:start + PIECE])
        logs[start:start + PIECE] = portable_math.log2(piece)
    return logs


def log_ratios(scores: list, temperature: float, logs_of=score_logs) -> list:
    """``log2((s / max s) ** (1 / T))`` of a scope's score tensors, flat fp32 (``-inf`` for zeros).

    In the log domain, so neither a large score nor a small temperature overflows or underflows:
    ``T -> 0`` sends every ratio but the largest towards ``-inf``, and the solve still separates
    them.  An all-zero scope has no order: every entry gets 0 (ratio 1, a uniform draw).
    ``logs_of(score)``: the flat log2 of one of ``scores`` (:func:`score_logs`, or a backend's on what
    its caller reads, the same bits).
    """
    # each score read once; float64 scores in float64 until scaled (fp32 cannot hold 1e-50 or 1e39)
    logs = [logs_of(s) for s in scores]
    top = max((float(log.max()) for log in logs if log.numel()), default=-math.inf)  # log2 of the peak
    if top == -math.inf:
        return [torch.zeros(log.numel(), dtype=torch.float32, device=log.device) for log in logs]
    # a 0-dim tensor, not a Python number: CUDA multiplies by the reciprocal of a host scalar, which
    # rounds differently from the division the CPU does
    return [log.sub_(top).div_(torch.tensor(temperature, dtype=log.dtype, device=log.device)).float() for log in logs]


def scale_parts(log_c: float) -> tuple[float, float]:
    """``2 ** log_c`` as (``floor(log_c)``, ``2 ** frac(log_c)``): the part added to a log ratio exactly and
    the factor (a float: an int past int64, as ``T -> 0`` gives, would not convert)."""
    whole = math.floor(log_c)
    return float(whole), 2.0 ** (log_c - whole)


def probabilities(log_r: torch.Tensor, log_c: float, p_min: float) -> torch.Tensor:
    """``clamp(2 ** (log_c + log r), p_min, 1)`` in fp32; ``log_c = inf`` keeps every non-zero score.

    ``2 ** (log r + floor(log_c)) * 2 ** frac(log_c)``: the integer part is added exactly where it
    matters (where ``p`` is not clamped to 0 or 1 the sum is small), the fraction is a factor with
    fp32's relative precision, so ``log_c`` is not rounded to fp32 as a whole.  ``2 **`` is
    :func:`childopt.portable_math.exp2`: ``p`` depends on its element only, not on the thread count
    or the piece.
    """
    if math.isinf(log_c):
        if log_c < 0:
            return torch.full_like(log_r, p_min)
        return torch.full_like(log_r, p_min).masked_fill_(torch.isfinite(log_r), 1.0)
    whole, factor = scale_parts(log_c)
    return portable_math.exp2(torch.add(log_r, whole)).mul_(factor).clamp_(p_min, 1.0)


def probability_sums(p: torch.Tensor, floor: float) -> tuple[int, int, int]:
    """(sum in :data:`SUM_UNITS`, entries equal to 1, entries equal to ``floor``) of probabilities clamped
    to ``[floor, 1]``: what a pass of the solve needs (the unclamped sum is ``sum - ones - floor *
    floors``; two counts are 5x faster on a CPU than a sum over a ``torch.where`` of the interior).
    Integers, so exact whatever the order of the additions.  One host transfer for the three (on
    CUDA, one sync per piece)."""
    units = (p * SUM_UNITS).int().sum(dtype=torch.int64)
    total, ones, floors = torch.stack([units, torch.count_nonzero(p == 1.0), torch.count_nonzero(p == floor)]).tolist()
    return total, ones, floors


def fp32_floor(p_min: float) -> float:
    """The fp32 value ``clamp_(p_min, 1)`` writes at the floor."""
    return float(torch.tensor(p_min, dtype=torch.float32))


def kept_sums(log_r: torch.Tensor, log_c: float, p_min: float) -> tuple[int, int, int]:
    """:func:`probability_sums` of :func:`probabilities`: one pass of the solve over a piece of log ratios.
    childopt._C computes the same on CPU in one read, without writing ``p`` (a backend's ``kept_sums``)."""
    return probability_sums(probabilities(log_r, log_c, p_min), fp32_floor(p_min))


def _expected_kept(logs: list, log_c: float, p_min: float, sums=kept_sums) -> tuple[float, float]:
    """``sum(p)`` over the scope and its slope in ``log_c`` (``ln 2`` times the sum of unclamped p)."""
    units, ones, floors = 0, 0, 0
    for log_r in logs:
        for piece in log_r.split(PIECE):
            piece_units, piece_ones, piece_floors = sums(piece, log_c, p_min)
            units, ones, floors = units + piece_units, ones + piece_ones, floors + piece_floors
    total = units / SUM_UNITS
    return total, (total - ones - fp32_floor(p_min) * floors) * math.log(2.0)


def solve_log_scale(logs: list, reserve_p: float, p_min: float, sums=kept_sums) -> float:
    """``log2 c`` with ``sum(clamp(c * r, p_min, 1)) = reserve_p * N`` over one scope's log ratios.

    The sum is non-decreasing in ``log2 c``; Newton's step from the current point is taken when it
    stays inside the bracket of the root found so far, else the bracket is halved, or, while it is
    open on one side, widened by steps that double.  Each step is one fp32 pass over the
    ratios, with exact integer sums: the kept count is hit to ``1e-7`` relative, and every backend,
    thread count and device takes the same steps.  Returns ``-inf`` when
    ``p_min`` alone keeps ``reserve_p`` (every p is ``p_min``) and ``inf`` when even ``c = inf``
    keeps too few (more zero scores than ``1 - reserve_p`` of the scope, and ``p_min`` too small to
    make up for them).  ``sums``: :func:`kept_sums` or a backend's (the same values).
    """
    n = sum(r.numel() for r in logs)
    target = reserve_p * n
    if p_min * n >= target:
        return -math.inf
    pieces = [piece for r in logs for piece in r.split(PIECE)]  # a piece's temporaries at a time
    positive = sum(int(torch.count_nonzero(torch.isfinite(piece))) for piece in pieces)
    if positive + p_min * (n - positive) < target * (1 - _SOLVE_TOLERANCE):
        return math.inf
    low, high, widen = -math.inf, math.inf, 1.0
    # the root when nothing is clamped; from the data alone, so a resumed run solves alike
    ratio_sum = sum(sums(piece, 0.0, 0.0)[0] for piece in pieces) / SUM_UNITS  # of 2 ** log r; the top's is 1
    x = math.log2(target) - math.log2(ratio_sum)
    for _ in range(_SOLVE_ITERATIONS):
        kept, slope = _expected_kept(logs, x, p_min, sums)
        if abs(kept - target) <= _SOLVE_TOLERANCE * target:
            return x
        if kept < target:
            low = x
        else:
            high = x
        if math.isfinite(low) and math.isfinite(high) and high - low <= 1e-12 * max(1.0, abs(high)):
            return high  # the sum steps over the target here
        step = x + (target - kept) / slope if slope > 0 else math.nan
        unbounded = math.isinf(high) or math.isinf(low)
        # Newton's step is taken inside the bracket; while the bracket is open, only as far as the
        # widening step (a near-zero slope would send it to 1e37, past what exp2 can take)
        if low < step < high and (not unbounded or abs(step - x) <= widen):
            x = step
        elif unbounded:
            x = x + widen if math.isinf(high) else x - widen
            widen *= 2.0
        else:
            x = (low + high) / 2.0
    return x


def draw_codes(log_r: torch.Tensor, log_c: float, p_min: float, rng_base: int, seed: int, refresh: int,
               codes_of, probabilities_of=probabilities) -> torch.Tensor:
    """Level codes of one tensor's keep probabilities (:func:`probabilities`), rounded by Philox.

    The rounding words are keyed like the Bernoulli draw (counter: the element's group and
    :data:`ROUNDING_STREAM`), with ``refresh`` folded into the key so each refresh draws anew.
    ``codes_of(p, first_group, key, stream)`` rounds (a backend's ``level_codes``: this module's
    :func:`level_codes` on its words, or childopt._C's on CPU) the probabilities ``probabilities_of``
    gives (:func:`probabilities` or a backend's, the same bits).  A piece at a time (a piece starts
    on a 4-element group: its words are the tensor's words from that group on), so a refresh holds
    one piece's probabilities and words, not the tensor's.
    """
    key = (seed + refresh * 0x9E3779B97F4A7C15) % 2**64
    codes = torch.empty(log_r.numel(), dtype=torch.uint8, device=log_r.device)
    for start in range(0, log_r.numel(), PIECE):
        p = probabilities_of(log_r[start:start + PIECE], log_c, p_min)
        codes[start:start + PIECE].copy_(codes_of(p, rng_base + start // 4, key, ROUNDING_STREAM))
    return codes
