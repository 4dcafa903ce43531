"""Philox4x32-10 as a Triton device function: the same words as childopt.philox.

Hand-written instead of ``tl.philox`` / ``tl.randint4x`` because Triton chooses Philox4x32 or
Philox4x64 from the counter's bit width and has changed that choice between releases; the
Bernoulli masks must stay bit-identical to the torch reference and the C++ kernels whatever
Triton version a user has.  Counters and keys are uint32 tensors; 10 rounds, 4 mul-hi/lo each.
"""
import triton
import triton.language as tl

ROUND_A = tl.constexpr(0xD2511F53)
ROUND_B = tl.constexpr(0xCD9E8D57)
KEY_A = tl.constexpr(0x9E3779B9)
KEY_B = tl.constexpr(0xBB67AE85)


@triton.jit
def philox4x32_10(c0, c1, c2, c3, k0, k1):
    """Four uint32 words of Philox4x32-10 for counter (c0..c3) and key (k0, k1)."""
    for _ in tl.static_range(10):
        a0 = c0
        a2 = c2
        c0 = tl.umulhi(a2, ROUND_B) ^ c1 ^ k0
        c2 = tl.umulhi(a0, ROUND_A) ^ c3 ^ k1
        c1 = a2 * ROUND_B
        c3 = a0 * ROUND_A
        k0 = k0 + KEY_A
        k1 = k1 + KEY_B
    return c0, c1, c2, c3
