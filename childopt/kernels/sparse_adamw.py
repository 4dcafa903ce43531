"""Sparse-index AdamW in Triton: only the selected entries of each tensor are read and written.

Semantics: the element update of ``childopt.backends.contract`` on the entries ``idx`` of each
parameter (sorted flat indices, int32 or int64), with compact fp32 state ``m[k], v[k]`` and the
gradient either dense (gathered at ``idx``) or compact (``g[k]``, from a gradient hook).  The
arithmetic is ``adamw_block``'s, so the parameters equal a dense ``freeze`` step bit for bit.

Layout: see childopt.kernels.multi_tensor; chunks cover the compact index space ``k < K``.
Bytes per selected entry (fp32): idx 4 + g 4 + p 4 + 4 + m 8 + v 8 = 32 (+8 with amsgrad); the
gathers of p (and of a dense g) touch a 32-byte sector each, so scattered indices cost up to
~4x that in DRAM traffic.  Compact accesses (idx, m, v, compact g) vectorise; all indexing int64.
"""
from __future__ import annotations

import triton
import triton.language as tl

from childopt.kernels import multi_tensor
from childopt.kernels.adamw_element import adamw_block, load_step_scalars

# Columns of the per-tensor table (int64): element offsets of each list, then the entry count K.
COL_P, COL_G, COL_IDX, COL_M, COL_V, COL_VMAX, COL_COUNT = (tl.constexpr(i) for i in range(7))
TABLE_COLS = tl.constexpr(7)


@triton.jit
def sparse_adamw_kernel(
    p_base, g_base, idx_base, m_base, v_base, vmax_base,
    table, chunk_tensor, chunk_start, scalars,
    COMPACT_GRADS: tl.constexpr, AMSGRAD: tl.constexpr,
    G_ALIGN: tl.constexpr, I_ALIGN: tl.constexpr, S_ALIGN: tl.constexpr,
    BLOCK: tl.constexpr, ITERS: tl.constexpr,
):
    pid = tl.program_id(0)
    tensor = tl.load(chunk_tensor + pid).to(tl.int64)
    row = table + tensor * TABLE_COLS
    start = tl.multiple_of(tl.load(chunk_start + pid), BLOCK)
    count = tl.load(row + COL_COUNT)
    p_ptr = p_base + tl.load(row + COL_P)
    g_ptr = g_base + tl.multiple_of(tl.load(row + COL_G), G_ALIGN)
    idx_ptr = idx_base + tl.multiple_of(tl.load(row + COL_IDX), I_ALIGN)
    m_ptr = m_base + tl.multiple_of(tl.load(row + COL_M), S_ALIGN)
    v_ptr = v_base + tl.multiple_of(tl.load(row + COL_V), S_ALIGN)
    vmax_ptr = vmax_base + tl.multiple_of(tl.load(row + COL_VMAX), S_ALIGN)
    (decay_before, decay_after, one_minus_beta1, beta2, one_minus_beta2, eps, step_size, bc2_sqrt, grad_scale,
     grad_sign, lerp_from_start) = load_step_scalars(scalars, tensor)

    for it in tl.static_range(ITERS):
        first = start + it * BLOCK
        offs = first + tl.arange(0, BLOCK).to(tl.int64)
        inb = offs < count
        if first + BLOCK <= count:
            idx = tl.load(idx_ptr + offs).to(tl.int64)
            g_ptrs = _grad_ptrs(g_ptr, idx, offs, COMPACT_GRADS)
            adamw_block(p_ptr + idx, g_ptrs, m_ptr + offs, v_ptr + offs, vmax_ptr + offs, inb, inb,
                        decay_before, decay_after, one_minus_beta1, beta2, one_minus_beta2, eps, step_size, bc2_sqrt,
                        grad_scale, grad_sign, lerp_from_start, False, False, False, AMSGRAD)
        elif first < count:
            idx = tl.load(idx_ptr + offs, mask=inb, other=0).to(tl.int64)
            g_ptrs = _grad_ptrs(g_ptr, idx, offs, COMPACT_GRADS)
            adamw_block(p_ptr + idx, g_ptrs, m_ptr + offs, v_ptr + offs, vmax_ptr + offs, inb, inb,
                        decay_before, decay_after, one_minus_beta1, beta2, one_minus_beta2, eps, step_size, bc2_sqrt,
                        grad_scale, grad_sign, lerp_from_start, True, False, False, AMSGRAD)


@triton.jit
def _grad_ptrs(g_ptr, idx, offs, COMPACT_GRADS: tl.constexpr):
    """A compact gradient is read at ``offs``; a dense one is gathered at ``idx``."""
    if COMPACT_GRADS:
        return g_ptr + offs
    return g_ptr + idx


def launch_lists(params, grads, indices, exp_avgs, exp_avg_sqs, max_exp_avg_sqs=None) -> dict:
    """The tensor lists a launch addresses; an absent vmax list aliases exp_avg_sqs (never read)."""
    return {"params": params, "grads": grads, "indices": indices, "exp_avgs": exp_avgs,
            "exp_avg_sqs": exp_avg_sqs, "max_exp_avg_sqs": max_exp_avg_sqs or exp_avg_sqs}


def make_plan(lists: dict, *, block: int = multi_tensor.DEFAULT_BLOCK,
              iters: int = multi_tensor.DEFAULT_ITERS) -> multi_tensor.Plan:
    """Build the device tables; chunks cover each tensor's selected entries."""
    counts = [i.numel() for i in lists["indices"]]
    state = lists["exp_avgs"] + lists["exp_avg_sqs"] + lists["max_exp_avg_sqs"]
    return multi_tensor.make_plan(lists, [counts], counts, [lists["grads"], lists["indices"], state],
                                  block=block, iters=iters)


def launch(plan: multi_tensor.Plan, lists: dict, scalars, *, amsgrad: bool, compact_grads: bool) -> None:
    """One sparse AdamW step over ``plan`` in one launch; ``scalars``: the contract's rows."""
    n_chunks = plan.chunk_tensor.numel()
    if n_chunks == 0:
        return
    sparse_adamw_kernel[(n_chunks,)](
        *(tensors[0] for tensors in lists.values()), plan.table, plan.chunk_tensor, plan.chunk_start, scalars,
        COMPACT_GRADS=compact_grads, AMSGRAD=amsgrad,
        G_ALIGN=plan.aligns[0] if compact_grads else 1, I_ALIGN=plan.aligns[1], S_ALIGN=plan.aligns[2],
        BLOCK=plan.block, ITERS=plan.iters,
        enable_fp_fusion=multi_tensor.FP_FUSION,
    )
