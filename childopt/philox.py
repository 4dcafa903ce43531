"""Philox4x32-10 and the Bernoulli keep rule, in plain torch: the definition every backend matches.

The Child-Tuning-F mask of an element is a pure function of (seed, step, global index):

    key     = (seed & 0xffffffff, seed >> 32)
    counter = (group & 0xffffffff, group >> 32, step & 0xffffffff, step >> 32)
    group   = index // 4,  word = index % 4   ->  u = Philox4x32_10(counter, key)[word]
    keep    = u < keep_threshold(reserve_p)

The global index of element ``j`` of a parameter is ``4 * rng_base + j`` where ``rng_base`` is
the number of 4-element groups of the parameters before it in the optimizer's canonical order
(:func:`rng_group_counts`).  One Philox call thus serves four consecutive elements of one tensor
in every backend, and the mask does not depend on block size, grid, chunking or launch grouping.

Written by hand rather than with ``torch.Generator``: torch's Philox streams are tied to
launch offsets and differ between CPU and CUDA, while this one must be bit-identical to the
Triton and C++ kernels.
"""
from __future__ import annotations

import operator

import torch

ROUND_A = 0xD2511F53
ROUND_B = 0xCD9E8D57
KEY_A = 0x9E3779B9
KEY_B = 0xBB67AE85
MASK32 = 0xFFFFFFFF
ROUNDS = 10
SEED_LIMIT = 2**64


def _mulhilo32(a: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """High and low 32 bits of ``a * x`` for uint32 values held in int64 tensors.

    The 64-bit product would overflow int64, so ``x`` is split into 16-bit halves; every
    intermediate stays below 2**50 and the result is exact on every device.
    """
    x_lo = x & 0xFFFF
    x_hi = x >> 16
    lo_part = a * x_lo
    hi_part = a * x_hi
    low = (((hi_part & 0xFFFF) << 16) + lo_part) & MASK32
    high = (hi_part + (lo_part >> 16)) >> 16
    return high, low


def philox4x32_10(c0, c1, c2, c3, k0: int, k1: int):
    """Philox4x32 with 10 rounds (Random123) on int64 tensors holding uint32 counters."""
    for _ in range(ROUNDS):
        hi_a, lo_a = _mulhilo32(ROUND_A, c0)
        hi_b, lo_b = _mulhilo32(ROUND_B, c2)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + KEY_A) & MASK32
        k1 = (k1 + KEY_B) & MASK32
    return c0, c1, c2, c3


def keep_threshold(reserve_p: float) -> int:
    """The uint32 threshold of the keep test ``u < threshold`` for keep probability ``reserve_p``.

    ``reserve_p == 1`` keeps everything and never reaches the kernels (callers treat it as no mask).
    """
    if not 0.0 < reserve_p < 1.0:
        raise ValueError(f"keep_threshold needs reserve_p in (0, 1), got {reserve_p}")
    return min(max(round(reserve_p * 2**32), 1), MASK32)


def check_seed(seed) -> int:
    """``seed`` as a Python int usable as the 64-bit Philox key, or a clear error.

    Integers of any kind are accepted (int, numpy integers, one-element integer tensors);
    floats and bools are refused rather than truncated.
    """
    if isinstance(seed, torch.Tensor) and (seed.numel() != 1 or seed.dtype.is_floating_point
                                           or seed.dtype.is_complex or seed.dtype == torch.bool):
        raise TypeError(f"seed must be an int in [0, 2**64); got a tensor of shape {tuple(seed.shape)} "
                        f"and dtype {seed.dtype} (a one-element integer tensor would do)")
    try:
        value = int(seed.item()) if isinstance(seed, torch.Tensor) else operator.index(seed)
    except TypeError:
        raise TypeError(f"seed must be an int in [0, 2**64), got {type(seed).__name__} {seed!r}") from None
    if isinstance(seed, bool) or not 0 <= value < SEED_LIMIT:
        raise ValueError(f"seed must be an int in [0, 2**64), got {seed!r}")
    return value


def split_seed(seed: int) -> tuple[int, int]:
    """The Philox key words of a 64-bit seed."""
    return seed & MASK32, (seed >> 32) & MASK32


def random_words(numel: int, rng_base: int, seed: int, step: int, device) -> torch.Tensor:
    """The uint32 Philox words (as int64) of a tensor's ``numel`` elements at ``step``."""
    groups = torch.arange((numel + 3) // 4, device=device, dtype=torch.int64) + rng_base
    k0, k1 = split_seed(seed)
    c2 = torch.full_like(groups, step & MASK32)
    c3 = torch.full_like(groups, (step >> 32) & MASK32)
    words = philox4x32_10(groups & MASK32, groups >> 32, c2, c3, k0, k1)
    return torch.stack(words, dim=1).reshape(-1)[:numel]


def bernoulli_keep(numel: int, rng_base: int, seed: int, step: int, reserve_p: float, device) -> torch.Tensor:
    """The flat bool keep-mask of one tensor, as every backend draws it."""
    return random_words(numel, rng_base, seed, step, device) < keep_threshold(reserve_p)


def rng_group_counts(numel: int) -> int:
    """How many 4-element Philox groups a tensor of ``numel`` elements occupies."""
    return (numel + 3) // 4
