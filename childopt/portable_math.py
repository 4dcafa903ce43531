"""``exp2`` and ``log2`` whose bits depend on nothing but the input element.

torch's CPU ``exp2`` is not that: its vectorised loop takes Sleef's function and the last few
elements of each thread's chunk take libm's, and the two differ in the last bit on about 1 in 16
inputs of a refresh's range (``exp2(8.6e-8)`` is 1 or the float above it, by position).  So keep
probabilities, and with them importance codes, changed with the thread count and the cut into
pieces.  torch's ``log2`` agreed between its two paths on every input tried, but nothing promises
that, and CUDA's functions round differently again.  These are built from IEEE basic operations
only (add, multiply, divide, round to integer, exponent bits), each rounded once in a fixed order,
so every thread count, ISA and position gives the same bits (and CUDA, whose basic operations
round alike; not yet run on a GPU): the torch ops here on any device, and childopt._C's one-pass
CPU kernels (``csrc/cpu/portable_math.h``, the same constants and order; the build has
``-ffp-contract=off``).  Accuracy against float64 (tests/test_portable_math.py): ``exp2`` within
1.5 fp32 ulp, ``log2`` within 3.5 ulp (1.5e-7 absolute near 1).
"""
from __future__ import annotations

import torch

# 2**f - 1 = f * (c1 + f * (c2 + ... + f * c6)) on [-1/2, 1/2]: fp32 coefficients of a relative-error
# least-squares fit at Chebyshev nodes (csrc/cpu/portable_math.h: kExp2Coefficients)
EXP2_COEFFICIENTS = tuple(float.fromhex(h) for h in (
    "0x1.62e43p-1", "0x1.ebfbdcp-3", "0x1.c6aed6p-5", "0x1.3b2cc4p-7", "0x1.5f44dcp-10", "0x1.4258d8p-13"))
# log2(m) = t * (a1 + u * (a3 + ... + u * a9)), t = (m - 1) / (m + 1), u = t * t, m in [sqrt(1/2), sqrt(2)):
# the odd series of atanh, fitted the same way (csrc: kLog2Coefficients)
LOG2_COEFFICIENTS = tuple(float.fromhex(h) for h in (
    "0x1.715476p+1", "0x1.ec709cp-1", "0x1.2777e6p-1", "0x1.a56974p-2", "0x1.5f08d4p-2"))
SQRT_HALF = float.fromhex("0x1.6a09e6p-1")  # fp32 sqrt(1/2), rounded down
EXP2_LIMIT = 200.0  # |y| clamped here: 2**200 is inf in fp32 and 2**-200 is 0, as they should be
_SCALE_SPLIT = 100  # 2**k applied as 2**k1 * 2**k2 with |k1|, |k2| <= 100: both normal floats


def _horner(x: torch.Tensor, coefficients: tuple) -> torch.Tensor:
    """``c0 + x * (c1 + x * (... + x * cn))``, a multiply and an add at a time (fp32 each)."""
    acc = x * coefficients[-1]
    for c in reversed(coefficients[1:-1]):
        acc.add_(c).mul_(x)
    return acc.add_(coefficients[0])


def _power_of_two(k: torch.Tensor) -> torch.Tensor:
    """fp32 ``2**k`` of int32 ``k`` in [-126, 127], from its exponent bits (exact)."""
    return ((k + 127) << 23).view(torch.float32)


def _frexp(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.frexp`` of positive finite fp32 values from their bits (other values: any pair), as the
    C++ takes it; torch.frexp is missing on some devices (MPS).  A subnormal ``x`` is ``M * 2**-149``
    with ``M`` its mantissa bits, and ``float(M)`` is exact and normal."""
    subnormal = x < 2.0**-126
    normal = torch.where(subnormal, (x.view(torch.int32) & 0x7FFFFF).float(), x)
    bits = normal.view(torch.int32)
    exponent = ((bits >> 23) & 0xFF) - 126 - subnormal.int() * 149
    return ((bits & 0x7FFFFF) | 0x3F000000).view(torch.float32), exponent


def exp2(y: torch.Tensor) -> torch.Tensor:
    """fp32 ``2**y`` of an fp32 tensor (a new tensor): ``2**round(y) * 2**f``, ``f`` in [-1/2, 1/2].

    ``f = y - round(y)`` is exact; ``2**f`` a degree-6 polynomial; ``2**round(y)`` applied in two
    exact power-of-two factors, so the only rounding past the polynomial is the last multiply
    (into the subnormal range or to inf where the value goes).  ``-inf`` gives 0, NaN gives NaN.
    """
    y = y.float().clamp(-EXP2_LIMIT, EXP2_LIMIT)
    k = torch.round(y)
    f = y - k
    whole = k.int()
    first = whole.clamp(-_SCALE_SPLIT, _SCALE_SPLIT)
    polynomial = _horner(f, (1.0,) + EXP2_COEFFICIENTS)
    return polynomial.mul_(_power_of_two(first)).mul_(_power_of_two(whole - first))


def log2(x: torch.Tensor) -> torch.Tensor:
    """``log2 x`` of a tensor of values >= 0 (a new tensor); -inf at 0, inf at inf, NaN below 0.

    ``x = m * 2**e`` with ``m`` in [sqrt(1/2), sqrt(2)) (``frexp``, exact, subnormals included);
    ``log2 m`` from the atanh series of ``t = (m - 1) / (m + 1)``; then ``e + log2 m``, one rounding.
    fp32 out, except for float64 in: float64 out, ``e`` exact and ``log2 m`` of ``m`` rounded to fp32
    (the range of float64 scores kept; the same absolute precision as fp32 scores near 1).
    """
    if x.dtype == torch.float64:
        mantissa, exponent = torch.frexp(x)
        return log2(mantissa.float()).double().add_(exponent.double())
    x = x.float()
    mantissa, exponent = _frexp(x)  # mantissa in [1/2, 1)
    low = (mantissa < SQRT_HALF).int()
    mantissa = mantissa * (low + 1).float()  # doubled below sqrt(1/2): exact
    exponent = exponent - low
    t = (mantissa - 1.0) / (mantissa + 1.0)
    series = _horner(t * t, LOG2_COEFFICIENTS).mul_(t)
    out = exponent.float().add_(series)
    out = torch.where(x == 0, -torch.inf, out)
    return torch.where(torch.isfinite(x) & (x >= 0), out, torch.where(x == torch.inf, x, torch.nan))
