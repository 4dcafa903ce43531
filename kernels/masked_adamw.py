"""Multi-tensor masked AdamW in Triton: one launch steps a whole bucket of tensors.

Semantics: the element update of ``childopt.backends.ops`` (AdamW in fp32 with mask kinds
none / dense / Bernoulli, freeze or zero-grad, amsgrad, maximize, decay before or after).

Work layout: every tensor list (p, g, m, v, vmax, mask) is addressed as one base pointer (its
first tensor) plus a per-tensor int64 *element* offset, held in a device table of
``TABLE_COLS`` int64 per tensor.  Keeping the base a real pointer argument (instead of loading
raw addresses) keeps Triton's 16-byte alignment facts, and ``tl.multiple_of`` on the offsets
restores them per tensor, so loads can vectorise.  Each program owns one chunk of
``BLOCK * ITERS`` elements of one tensor (a chunk -> tensor map built once per shape set).
All indexing is int64.

Bytes per element (fp32, one step): p, g, m, v read + p, m, v written = 28; +1 for a uint8
dense mask; Bernoulli masks cost no bytes (Philox in registers, one call per 4 elements);
+8 with amsgrad.  Under freeze, dropped entries are read and written back unchanged: the
traffic stays 28 B so that accesses vectorise (skipping them only pays for very sparse masks,
which sparse-index storage serves).  Blocks wholly inside a tensor run unpredicated; only a
tensor's last block masks its loads.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from childopt.kernels.philox import philox4x32_10

# Columns of the per-tensor table (int64): element offsets of each list, numel, Philox group base.
COL_P, COL_G, COL_M, COL_V, COL_VMAX, COL_MASK, COL_NUMEL, COL_RNG = (tl.constexpr(i) for i in range(8))
TABLE_COLS = tl.constexpr(8)

KIND_NONE, KIND_DENSE, KIND_BERNOULLI = 0, 1, 2

# No multiply-add contraction: the rounding of every step is then the same on every Triton
# version (3.9 contracts by default, 3.10 will not) and closer to torch's separate ops.
FP_FUSION = False
DEFAULT_BLOCK = 1024
DEFAULT_ITERS = 4


@triton.jit
def round_to(x, dtype: tl.constexpr):
    """fp32 -> ``dtype`` with round-to-nearest-even, NaN kept.

    bf16 is rounded by hand because Triton's interpreter truncates fp32 -> bf16 casts (compiled
    kernels round to nearest even); doing it here makes both give torch's bits.
    """
    if dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).to(tl.uint16)
        rounded = tl.where(x != x, 0x7FC0, rounded).to(tl.uint16)
        return rounded.to(tl.bfloat16, bitcast=True)
    return x.to(dtype)


@triton.jit
def _load(ptr, io_mask, MASKED_IO: tl.constexpr):
    if MASKED_IO:
        return tl.load(ptr, mask=io_mask, other=0.0)
    return tl.load(ptr)


@triton.jit
def _store(ptr, value, io_mask, MASKED_IO: tl.constexpr):
    if MASKED_IO:
        tl.store(ptr, value, mask=io_mask)
    else:
        tl.store(ptr, value)


@triton.jit
def adamw_block(p_ptr, g_ptr, m_ptr, v_ptr, vmax_ptr, offs, io_mask, keep,
                decay, one_minus_beta1, beta2, one_minus_beta2, eps, step_size, bc2_sqrt, grad_scale,
                MASKED_IO: tl.constexpr, MASKED: tl.constexpr, FREEZE: tl.constexpr, SCALE_GRAD: tl.constexpr, AMSGRAD: tl.constexpr,
                MAXIMIZE: tl.constexpr, DECAY_AFTER: tl.constexpr, LERP_FROM_START: tl.constexpr):
    """One block of the element update; ``io_mask`` applies only to a tensor's last block.

    Frozen entries are loaded and written back unchanged (``where(keep, new, old)`` on the raw
    values, so bit-identical): unpredicated loads and stores vectorise, where per-element
    predicates would split every access into scalar ones.
    """
    g_raw = _load(g_ptr + offs, io_mask, MASKED_IO)
    p_raw = _load(p_ptr + offs, io_mask, MASKED_IO)
    m_old = _load(m_ptr + offs, io_mask, MASKED_IO)
    v_old = _load(v_ptr + offs, io_mask, MASKED_IO)
    g = g_raw.to(tl.float32)
    if MAXIMIZE:
        g = -g
    if MASKED:
        if not FREEZE:
            if SCALE_GRAD:
                g = g * grad_scale
            g = tl.where(keep, g, 0.0)
    p = p_raw.to(tl.float32)
    if not DECAY_AFTER:
        p = p * decay
    # torch.lerp's two-sided formula, so m matches torch.optim.AdamW's exp_avg.lerp_
    if LERP_FROM_START:
        m = m_old + one_minus_beta1 * (g - m_old)
    else:
        m = g - (g - m_old) * (1.0 - one_minus_beta1)
    v = v_old * beta2 + one_minus_beta2 * g * g
    if AMSGRAD:
        vmax_old = _load(vmax_ptr + offs, io_mask, MASKED_IO)
        vmax = tl.maximum(vmax_old, v)
        denom = tl.div_rn(tl.sqrt_rn(vmax), bc2_sqrt) + eps
    else:
        denom = tl.div_rn(tl.sqrt_rn(v), bc2_sqrt) + eps
    p = p - tl.div_rn(step_size * m, denom)
    if DECAY_AFTER:
        p = p * decay
    p_new = round_to(p, p_ptr.dtype.element_ty)
    if MASKED:
        if FREEZE:
            p_new = tl.where(keep, p_new, p_raw)
            m = tl.where(keep, m, m_old)
            v = tl.where(keep, v, v_old)
            if AMSGRAD:
                vmax = tl.where(keep, vmax, vmax_old)
    _store(p_ptr + offs, p_new, io_mask, MASKED_IO)
    _store(m_ptr + offs, m, io_mask, MASKED_IO)
    _store(v_ptr + offs, v, io_mask, MASKED_IO)
    if AMSGRAD:
        _store(vmax_ptr + offs, vmax, io_mask, MASKED_IO)


@triton.jit(do_not_specialize=["keep_threshold", "seed_lo", "seed_hi", "step_lo", "step_hi"])
def masked_adamw_kernel(
    p_base, g_base, m_base, v_base, vmax_base, mask_base,
    table, chunk_tensor, chunk_start,
    decay, one_minus_beta1, beta2, one_minus_beta2, eps, step_size, bc2_sqrt, grad_scale,
    keep_threshold, seed_lo, seed_hi, step_lo, step_hi,
    MASK_KIND: tl.constexpr, FREEZE: tl.constexpr, SCALE_GRAD: tl.constexpr,
    AMSGRAD: tl.constexpr, MAXIMIZE: tl.constexpr, DECAY_AFTER: tl.constexpr,
    LERP_FROM_START: tl.constexpr,
    P_ALIGN: tl.constexpr, G_ALIGN: tl.constexpr, S_ALIGN: tl.constexpr, MASK_ALIGN: tl.constexpr,
    BLOCK: tl.constexpr, ITERS: tl.constexpr,
):
    pid = tl.program_id(0)
    row = table + tl.load(chunk_tensor + pid).to(tl.int64) * TABLE_COLS
    start = tl.multiple_of(tl.load(chunk_start + pid), BLOCK)
    numel = tl.load(row + COL_NUMEL)
    p_ptr = p_base + tl.multiple_of(tl.load(row + COL_P), P_ALIGN)
    g_ptr = g_base + tl.multiple_of(tl.load(row + COL_G), G_ALIGN)
    m_ptr = m_base + tl.multiple_of(tl.load(row + COL_M), S_ALIGN)
    v_ptr = v_base + tl.multiple_of(tl.load(row + COL_V), S_ALIGN)
    vmax_ptr = vmax_base + tl.multiple_of(tl.load(row + COL_VMAX), S_ALIGN)
    mask_ptr = mask_base + tl.multiple_of(tl.load(row + COL_MASK), MASK_ALIGN)
    if MASK_KIND == 2:
        rng_base = tl.load(row + COL_RNG)
        key0 = seed_lo.to(tl.uint32)
        key1 = seed_hi.to(tl.uint32)
        ctr2 = tl.zeros([BLOCK // 4], dtype=tl.uint32) + step_lo.to(tl.uint32)
        ctr3 = tl.zeros([BLOCK // 4], dtype=tl.uint32) + step_hi.to(tl.uint32)

    for it in tl.static_range(ITERS):
        first = start + it * BLOCK
        offs = first + tl.arange(0, BLOCK).to(tl.int64)
        inb = offs < numel
        if MASK_KIND == 1:
            keep = tl.load(mask_ptr + offs, mask=inb, other=0) != 0
        elif MASK_KIND == 2:
            group = rng_base + first // 4 + tl.arange(0, BLOCK // 4).to(tl.int64)
            w0, w1, w2, w3 = philox4x32_10(
                (group & 0xFFFFFFFF).to(tl.uint32), (group >> 32).to(tl.uint32), ctr2, ctr3, key0, key1
            )
            words = tl.interleave(tl.interleave(w0, w2), tl.interleave(w1, w3))
            keep = words.to(tl.int64) < keep_threshold
        else:
            keep = inb
        if first + BLOCK <= numel:
            adamw_block(p_ptr, g_ptr, m_ptr, v_ptr, vmax_ptr, offs, inb, keep,
                        decay, one_minus_beta1, beta2, one_minus_beta2, eps, step_size, bc2_sqrt, grad_scale,
                        False, MASK_KIND != 0, FREEZE, SCALE_GRAD, AMSGRAD, MAXIMIZE, DECAY_AFTER, LERP_FROM_START)
        elif first < numel:
            adamw_block(p_ptr, g_ptr, m_ptr, v_ptr, vmax_ptr, offs, inb, keep,
                        decay, one_minus_beta1, beta2, one_minus_beta2, eps, step_size, bc2_sqrt, grad_scale,
                        True, MASK_KIND != 0, FREEZE, SCALE_GRAD, AMSGRAD, MAXIMIZE, DECAY_AFTER, LERP_FROM_START)


@dataclass
class Plan:
    """Device tables of one bucket: per-tensor element offsets and the chunk -> tensor map.

    It holds no reference to the bucket's tensors (a cached plan must not keep freed gradients
    alive): the offsets are relative to the first tensor of each list, passed at launch.
    """

    table: torch.Tensor
    chunk_tensor: torch.Tensor
    chunk_start: torch.Tensor
    aligns: tuple
    block: int
    iters: int


def _vector_align(tensors: list[torch.Tensor]) -> int:
    """How many elements every offset is a multiple of when all tensors are 16-byte aligned."""
    if all(t.data_ptr() % 16 == 0 for t in tensors):
        return max(16 // tensors[0].element_size(), 1)
    return 1


def _offsets(tensors: list[torch.Tensor], what: str) -> list[int]:
    base = tensors[0]
    size = base.element_size()
    offsets = []
    for t in tensors:
        delta = t.data_ptr() - base.data_ptr()
        if delta % size or t.dtype != base.dtype:
            raise ValueError(f"{what}: tensors of one launch must share dtype and element alignment")
        offsets.append(delta // size)
    return offsets


def launch_lists(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs=None, masks=None) -> list:
    """The six tensor lists a launch addresses; absent ones alias exp_avg_sqs (never read)."""
    masks = [m.view(torch.uint8) for m in masks] if masks is not None else None
    return [params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs or exp_avg_sqs, masks or exp_avg_sqs]


def make_plan(lists: list, rng_bases=None, *, block: int = DEFAULT_BLOCK, iters: int = DEFAULT_ITERS) -> Plan:
    """Build the device tables for the contiguous tensors of ``launch_lists``."""
    if block < 4 or block & (block - 1):
        raise ValueError(f"block must be a power of two >= 4, got {block}")
    params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, masks = lists
    n = len(params)
    names = ("params", "grads", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs", "masks")
    columns = [_offsets(lst, name) for lst, name in zip(lists, names)]
    numels = [p.numel() for p in params]
    columns.append(numels)
    columns.append(list(rng_bases) if rng_bases is not None else [0] * n)
    device = params[0].device
    table = torch.tensor(columns, dtype=torch.int64).t().contiguous().to(device)

    chunk = block * iters
    counts = torch.tensor([(k + chunk - 1) // chunk for k in numels], dtype=torch.int64)
    first_chunk = torch.cumsum(counts, 0) - counts
    chunk_tensor = torch.repeat_interleave(torch.arange(n, dtype=torch.int32), counts)
    chunk_ids = torch.arange(int(counts.sum()), dtype=torch.int64)
    chunk_start = (chunk_ids - first_chunk.repeat_interleave(counts)) * chunk
    state_align = _vector_align(exp_avgs + exp_avg_sqs + max_exp_avg_sqs)
    aligns = (_vector_align(params), _vector_align(grads), state_align, _vector_align(masks))
    return Plan(
        table=table,
        chunk_tensor=chunk_tensor.to(device),
        chunk_start=chunk_start.to(device),
        aligns=aligns,
        block=block,
        iters=iters,
    )


def launch(plan: Plan, lists: list, *, decay, one_minus_beta1, beta2, one_minus_beta2, eps, step_size, bc2_sqrt,
           maximize, amsgrad, decay_after, mask_kind=KIND_NONE, freeze=False, grad_scale=1.0,
           keep_threshold=0, seed=0, step=0) -> None:
    """Run one masked AdamW step over every tensor of ``plan`` in a single launch."""
    n_chunks = plan.chunk_tensor.numel()
    if n_chunks == 0:
        return
    masked = mask_kind != KIND_NONE
    masked_adamw_kernel[(n_chunks,)](
        *(lst[0] for lst in lists), plan.table, plan.chunk_tensor, plan.chunk_start,
        decay, one_minus_beta1, beta2, one_minus_beta2, eps, step_size, bc2_sqrt, grad_scale,
        keep_threshold, seed & 0xFFFFFFFF, (seed >> 32) & 0xFFFFFFFF, step & 0xFFFFFFFF, (step >> 32) & 0xFFFFFFFF,
        MASK_KIND=mask_kind, FREEZE=masked and freeze, SCALE_GRAD=masked and grad_scale != 1.0,
        AMSGRAD=amsgrad, MAXIMIZE=maximize, DECAY_AFTER=decay_after,
        LERP_FROM_START=one_minus_beta1 < 0.5,
        P_ALIGN=plan.aligns[0], G_ALIGN=plan.aligns[1], S_ALIGN=plan.aligns[2], MASK_ALIGN=plan.aligns[3],
        BLOCK=plan.block, ITERS=plan.iters,
        enable_fp_fusion=FP_FUSION,
    )
