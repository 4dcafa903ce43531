"""Radix-select histograms over fp32 score bit patterns, many tensors and scopes per launch.

Semantics: every score ``s`` (``-0.0`` canonicalised to ``+0.0``) has the order-preserving
uint32 key ``bits | 0x80000000`` (s >= 0) or ``~bits`` (s < 0), so larger scores have larger
keys.  A pass counts, per scope, the elements whose key agrees with that scope's ``prefix`` on
the bits above ``shift + BITS``, into bin ``(key >> shift) & (2**BITS - 1)``.  Three passes of
11, 11 and 10 bits pin down the exact key of the k-th largest score (childopt.masks) without
concatenating or sorting anything.

Bytes: 4 per element per pass, read only; memory: one int64 histogram per scope.  Each program
owns a chunk of up to ``BLOCK * ITERS`` scores (``DEFAULT_ITERS`` = 64: 65,536 at BLOCK 1024)
of one tensor, reduces it block by block with ``tl.histogram`` into int32 bins in registers
(a chunk holds < 2^31 scores, so they cannot overflow), and only then flushes them: one relaxed
atomic add per *non-zero* bin.  Relaxed, because counts need no ordering: the host reads the
histogram after the launch (stream order), and an acq_rel atomic would put a GPU-wide fence in
front of every bin.  The flush (at most 2**BITS atomics per 64K scores, and far fewer in the later
passes, where only the scores matching the prefix count) is then a small share of the reads.
Layout: childopt.kernels.multi_tensor (base pointer + int64 offsets; chunks of BLOCK * ITERS).
The full blocks of a chunk are a runtime loop (ITERS does not unroll) of unpredicated, vector
loads, each block's issued before the previous one is counted (``tl.histogram``'s barriers
would otherwise keep one block in flight per program); only a tensor's last block is masked.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from childopt.kernels import multi_tensor

COL_S, COL_NUMEL, COL_SCOPE = (tl.constexpr(i) for i in range(3))
TABLE_COLS = tl.constexpr(3)
# Blocks per program: enough scores that the flush of up to 2**BITS bins is amortised.
DEFAULT_ITERS = 64


@triton.jit
def _block_counts(s, inb, prefix, shift, BITS: tl.constexpr, CHECK_PREFIX: tl.constexpr, MASKED: tl.constexpr):
    """int32 counts per bin of one block of scores ``s``; ``inb`` (lanes in bounds) only when ``MASKED``."""
    s = s + 0.0  # -0.0 -> +0.0
    bits = s.to(tl.uint32, bitcast=True)
    key = tl.where((bits >> 31) != 0, ~bits, bits | 0x80000000)
    if CHECK_PREFIX:
        match = (key >> (shift + BITS)).to(tl.int64) == prefix
        if MASKED:
            match = match & inb
    elif MASKED:
        match = inb
    else:
        match = None
    return tl.histogram(((key >> shift) & (2**BITS - 1)).to(tl.int32), 2**BITS, mask=match)


@triton.jit
def radix_histogram_kernel(
    s_base, table, chunk_tensor, chunk_start, hist, prefixes, shift,
    BITS: tl.constexpr, CHECK_PREFIX: tl.constexpr, S_ALIGN: tl.constexpr, BLOCK: tl.constexpr, ITERS: tl.constexpr,
):
    pid = tl.program_id(0)
    row = table + tl.load(chunk_tensor + pid).to(tl.int64) * TABLE_COLS
    start = tl.multiple_of(tl.load(chunk_start + pid), BLOCK)
    numel = tl.load(row + COL_NUMEL)
    scope = tl.load(row + COL_SCOPE)
    s_ptr = s_base + tl.multiple_of(tl.load(row + COL_S), S_ALIGN)
    prefix = tl.load(prefixes + scope)
    end = tl.minimum(start + BLOCK * ITERS, numel)
    full_end = start + (end - start) // BLOCK * BLOCK
    local = tl.zeros([2**BITS], dtype=tl.int32)
    if start < full_end:  # full blocks: unpredicated, so the loads vectorise
        s = tl.load(s_ptr + start + tl.arange(0, BLOCK).to(tl.int64))
        for first in tl.range(start + BLOCK, full_end, BLOCK):
            following = tl.load(s_ptr + first + tl.arange(0, BLOCK).to(tl.int64))  # in flight while s is counted
            local += _block_counts(s, None, prefix, shift, BITS, CHECK_PREFIX, False)
            s = following
        local += _block_counts(s, None, prefix, shift, BITS, CHECK_PREFIX, False)
    if full_end < end:  # a tensor's last, partial block
        offs = full_end + tl.arange(0, BLOCK).to(tl.int64)
        inb = offs < numel
        local += _block_counts(tl.load(s_ptr + offs, mask=inb, other=0.0), inb, prefix, shift, BITS, CHECK_PREFIX,
                               True)
    tl.atomic_add(hist + scope * 2**BITS + tl.arange(0, 2**BITS), local.to(tl.int64), mask=local != 0,
                  sem="relaxed")


def make_plan(lists: dict, scopes: tuple, *, block: int = multi_tensor.DEFAULT_BLOCK,
              iters: int = DEFAULT_ITERS) -> multi_tensor.Plan:
    """Tables for ``lists["scores"]`` (contiguous fp32 tensors), each tagged with its scope index."""
    scores = lists["scores"]
    numels = [s.numel() for s in scores]
    return multi_tensor.make_plan(lists, [numels, list(scopes)], numels, [scores], block=block, iters=iters)


def launch(plan: multi_tensor.Plan, scores: list, hist: torch.Tensor, prefixes: torch.Tensor, shift: int,
           bits: int) -> None:
    """Add one pass's counts into ``hist`` (int64, [scopes, 2**bits]); ``prefixes``: int64 per scope."""
    n_chunks = plan.chunk_tensor.numel()
    if n_chunks == 0:
        return
    radix_histogram_kernel[(n_chunks,)](
        scores[0], plan.table, plan.chunk_tensor, plan.chunk_start, hist, prefixes, shift,
        BITS=bits, CHECK_PREFIX=shift + bits < 32, S_ALIGN=plan.aligns[0], BLOCK=plan.block, ITERS=plan.iters,
    )
