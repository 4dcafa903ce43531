"""Radix-select histograms over fp32 score bit patterns, many tensors and scopes per launch.

Semantics: every score ``s`` (``-0.0`` canonicalised to ``+0.0``) has the order-preserving
uint32 key ``bits | 0x80000000`` (s >= 0) or ``~bits`` (s < 0), so larger scores have larger
keys.  A pass counts, per scope, the elements whose key agrees with that scope's ``prefix`` on
the bits above ``shift + BITS``, into bin ``(key >> shift) & (2**BITS - 1)``.  Three passes of
11, 11 and 10 bits pin down the exact key of the k-th largest score (childopt.masks) without
concatenating or sorting anything.

Bytes: 4 per element per pass, read only; memory: one int64 histogram per scope.  Each program
reduces its block with ``tl.histogram`` and adds it to the global bins with one atomic per bin.
Layout: childopt.kernels.multi_tensor (base pointer + int64 offsets; chunks of BLOCK * ITERS).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from childopt.kernels import multi_tensor

COL_S, COL_NUMEL, COL_SCOPE = (tl.constexpr(i) for i in range(3))
TABLE_COLS = tl.constexpr(3)


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
    local = tl.zeros([2**BITS], dtype=tl.int32)
    for it in tl.static_range(ITERS):
        first = start + it * BLOCK
        offs = first + tl.arange(0, BLOCK).to(tl.int64)
        inb = offs < numel
        if first + BLOCK <= numel:  # unpredicated, so the load vectorises; only a tensor's tail is masked
            s = tl.load(s_ptr + offs)
        else:
            s = tl.load(s_ptr + offs, mask=inb, other=0.0)
        s = s + 0.0
        bits = s.to(tl.uint32, bitcast=True)
        key = tl.where((bits >> 31) != 0, ~bits, bits | 0x80000000)
        match = inb
        if CHECK_PREFIX:
            match = match & ((key >> (shift + BITS)).to(tl.int64) == prefix)
        bins = ((key >> shift) & (2**BITS - 1)).to(tl.int32)
        local += tl.histogram(bins, 2**BITS, mask=match)
    tl.atomic_add(hist + scope * 2**BITS + tl.arange(0, 2**BITS), local.to(tl.int64))


def make_plan(lists: dict, scopes: tuple, *, block: int = multi_tensor.DEFAULT_BLOCK,
              iters: int = multi_tensor.DEFAULT_ITERS) -> multi_tensor.Plan:
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
