"""Multi-tensor masked AdamW in Triton: one launch steps a whole bucket of tensors.

Semantics: the element update of ``childopt.backends.contract`` (AdamW in fp32 with mask kinds
none / dense / Bernoulli / importance, freeze or zero-grad, amsgrad, maximize, decay before or after); the
scalars, the Philox base and the step of each tensor are its float64 row of ``scalars``.

Layout: see childopt.kernels.multi_tensor (base pointer + int64 element offsets per tensor,
chunks of ``BLOCK * ITERS`` elements).  All indexing is int64.

Bytes per element (fp32, one step): p, g, m, v read + p, m, v written = 28; +1 for a uint8
dense mask; Bernoulli masks cost no bytes (Philox in registers, one call per 4 elements);
importance masks 1 (a uint8 level code, read as the dense mask is; its threshold and scale are
computed from it, childopt.importance); +8 with amsgrad.  Under freeze, dropped entries are read and written back unchanged: the
traffic stays 28 B so that accesses vectorise (skipping them only pays for very sparse masks,
which sparse-index storage serves).  Blocks wholly inside a tensor run unpredicated; only a
tensor's last block masks its loads (the dense mask's included).

Layouts: Triton gives all loads of a step the widest per-thread run any one of them could take
(up to 128 bits), but caps each store at 128 bits, i.e. 4 fp32.  A 16-byte aligned uint8 mask
would take 8 bytes per thread and drag the fp32 loads to 8 elements, so that p, m and v each
pass through shared memory (a layout conversion, bar.sync) before their 4-wide stores.  The
kernel therefore claims at most 4-byte alignment for the mask: it loads as one 32-bit word per
4 elements in the fp32 streams' layout, with no conversion (tools/triton_resources.py reports
``bar_sync``).  bf16 parameters (8 per 128-bit load) still widen the fp32 loads, for every mask
kind, and convert m and v before their stores.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from childopt import importance
from childopt.backends.contract import MaskKind
from childopt.kernels import multi_tensor
from childopt.kernels.adamw_element import COL_RNG_BASE, COL_STEP, NUM_STEP_SCALARS, adamw_block, load_step_scalars
from childopt.kernels.philox import philox4x32_10

# Columns of the per-tensor table (int64): element offsets of each list, numel.
COL_P, COL_G, COL_M, COL_V, COL_VMAX, COL_MASK, COL_NUMEL = (tl.constexpr(i) for i in range(7))
TABLE_COLS = tl.constexpr(7)
KIND_DENSE = tl.constexpr(int(MaskKind.DENSE))
KIND_BERNOULLI = tl.constexpr(int(MaskKind.BERNOULLI))
KIND_IMPORTANCE = tl.constexpr(int(MaskKind.IMPORTANCE))
M0, M1, M2, M3, M4, M5, M6, M7 = (tl.constexpr(m) for m in importance.MANTISSAS)


@triton.jit(do_not_specialize=["keep_threshold", "seed_lo", "seed_hi"])
def masked_adamw_kernel(
    p_base, g_base, m_base, v_base, vmax_base, mask_base,
    table, chunk_tensor, chunk_start, scalars,
    keep_threshold, seed_lo, seed_hi,
    MASK_KIND: tl.constexpr, FREEZE: tl.constexpr, AMSGRAD: tl.constexpr,
    P_ALIGN: tl.constexpr, G_ALIGN: tl.constexpr, S_ALIGN: tl.constexpr, MASK_ALIGN: tl.constexpr,
    BLOCK: tl.constexpr, ITERS: tl.constexpr,
):
    pid = tl.program_id(0)
    tensor = tl.load(chunk_tensor + pid).to(tl.int64)
    row = table + tensor * TABLE_COLS
    start = tl.multiple_of(tl.load(chunk_start + pid), BLOCK)
    numel = tl.load(row + COL_NUMEL)
    p_ptr = p_base + tl.multiple_of(tl.load(row + COL_P), P_ALIGN)
    g_ptr = g_base + tl.multiple_of(tl.load(row + COL_G), G_ALIGN)
    m_ptr = m_base + tl.multiple_of(tl.load(row + COL_M), S_ALIGN)
    v_ptr = v_base + tl.multiple_of(tl.load(row + COL_V), S_ALIGN)
    vmax_ptr = vmax_base + tl.multiple_of(tl.load(row + COL_VMAX), S_ALIGN)
    # at most 4-byte alignment claimed for the mask, so it loads in the fp32 streams' layout (header)
    mask_ptr = mask_base + tl.multiple_of(tl.load(row + COL_MASK), MASK_ALIGN if MASK_ALIGN < 4 else 4)
    (decay_before, decay_after, one_minus_beta1, beta2, one_minus_beta2, eps, step_size, bc2_sqrt, grad_scale,
     grad_sign, lerp_from_start) = load_step_scalars(scalars, tensor)
    DRAWN: tl.constexpr = MASK_KIND == KIND_BERNOULLI or MASK_KIND == KIND_IMPORTANCE
    if DRAWN:
        scalar_row = scalars + tensor * NUM_STEP_SCALARS
        rng_base = tl.load(scalar_row + COL_RNG_BASE).to(tl.int64)
        step = tl.load(scalar_row + COL_STEP).to(tl.int64)
        key0 = seed_lo.to(tl.uint32)
        key1 = seed_hi.to(tl.uint32)
        ctr2 = tl.zeros([BLOCK // 4], dtype=tl.uint32) + (step & 0xFFFFFFFF).to(tl.uint32)
        ctr3 = tl.zeros([BLOCK // 4], dtype=tl.uint32) + (step >> 32).to(tl.uint32)

    for it in tl.static_range(ITERS):
        first = start + it * BLOCK
        offs = first + tl.arange(0, BLOCK).to(tl.int64)
        inb = offs < numel
        if DRAWN:
            group = rng_base + first // 4 + tl.arange(0, BLOCK // 4).to(tl.int64)
            w0, w1, w2, w3 = philox4x32_10(
                (group & 0xFFFFFFFF).to(tl.uint32), (group >> 32).to(tl.uint32), ctr2, ctr3, key0, key1
            )
            words = tl.interleave(tl.interleave(w0, w2), tl.interleave(w1, w3))
            keep = words.to(tl.int64) < keep_threshold
        else:
            keep = inb  # unused (MASKED is off), or replaced by the dense mask's bytes below
            words = offs  # unused
        if first + BLOCK <= numel:
            if MASK_KIND == KIND_IMPORTANCE:  # unpredicated: 4 code bytes per 32-bit load
                keep, full_scale = _importance_decide(tl.load(mask_ptr + offs), words, grad_scale, FREEZE)
            else:
                full_scale = grad_scale
                if MASK_KIND == KIND_DENSE:  # unpredicated: 4 mask bytes per 32-bit load
                    keep = tl.load(mask_ptr + offs) != 0
            adamw_block(p_ptr + offs, g_ptr + offs, m_ptr + offs, v_ptr + offs, vmax_ptr + offs, inb, keep,
                        decay_before, decay_after, one_minus_beta1, beta2, one_minus_beta2, eps, step_size, bc2_sqrt,
                        full_scale, grad_sign, lerp_from_start, False, MASK_KIND != 0, FREEZE, AMSGRAD)
        elif first < numel:
            if MASK_KIND == KIND_IMPORTANCE:
                keep, tail_scale = _importance_decide(tl.load(mask_ptr + offs, mask=inb, other=0), words, grad_scale,
                                                      FREEZE)
            else:
                tail_scale = grad_scale
                if MASK_KIND == KIND_DENSE:
                    keep = tl.load(mask_ptr + offs, mask=inb, other=0) != 0
            adamw_block(p_ptr + offs, g_ptr + offs, m_ptr + offs, v_ptr + offs, vmax_ptr + offs, inb, keep,
                        decay_before, decay_after, one_minus_beta1, beta2, one_minus_beta2, eps, step_size, bc2_sqrt,
                        tail_scale, grad_sign, lerp_from_start, True, MASK_KIND != 0, FREEZE, AMSGRAD)


@triton.jit
def _importance_decide(code, words, grad_scale, FREEZE: tl.constexpr):
    """Keep decisions of a block from its level codes, and the gradient scale of each element.

    Kept when the Philox word is below the level's threshold (childopt.importance: shifts of an
    octave's mantissas, no table); under zero-grad the gradient is scaled by the level's
    ``2**32 / threshold`` in place of ``grad_scale`` (the unbiased estimate), under freeze by ``grad_scale``.
    """
    k = 255 - code.to(tl.int64)
    j = k & 7
    # int64 blocks, not scalars: Triton types a bare integer constant as int32 (M0 = 2**31 overflows it)
    mantissa = tl.full(k.shape, M7, tl.int64)
    mantissa = tl.where(j == 6, tl.full(k.shape, M6, tl.int64), mantissa)
    mantissa = tl.where(j == 5, tl.full(k.shape, M5, tl.int64), mantissa)
    mantissa = tl.where(j == 4, tl.full(k.shape, M4, tl.int64), mantissa)
    mantissa = tl.where(j == 3, tl.full(k.shape, M3, tl.int64), mantissa)
    mantissa = tl.where(j == 2, tl.full(k.shape, M2, tl.int64), mantissa)
    mantissa = tl.where(j == 1, tl.full(k.shape, M1, tl.int64), mantissa)
    mantissa = tl.where(j == 0, tl.full(k.shape, M0, tl.int64), mantissa)
    shift = k >> 3
    threshold = tl.where(shift == 0, mantissa << 1, mantissa >> tl.maximum(shift - 1, 0))
    threshold = tl.where(k == 255, 0, threshold)  # code 0: never kept; code 255 (k = 0): 2**32, always
    keep = words.to(tl.int64) < threshold
    if FREEZE:
        scale = tl.zeros(code.shape, tl.float32) + grad_scale
    else:
        scale = tl.where(k == 0, 1.0, tl.div_rn(4294967296.0, threshold.to(tl.float32)))
    return keep, scale


def launch_lists(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs=None, masks=None) -> dict:
    """The six tensor lists a launch addresses; absent ones alias exp_avg_sqs (never read).

    ``masks``: bool masks (dense kind) or uint8 level codes (importance kind), read as bytes.
    """
    masks = [m.view(torch.uint8) for m in masks] if masks is not None else None
    return {"params": params, "grads": grads, "exp_avgs": exp_avgs, "exp_avg_sqs": exp_avg_sqs,
            "max_exp_avg_sqs": max_exp_avg_sqs or exp_avg_sqs, "masks": masks or exp_avg_sqs}


def make_plan(lists: dict, *, block: int = multi_tensor.DEFAULT_BLOCK,
              iters: int = multi_tensor.DEFAULT_ITERS) -> multi_tensor.Plan:
    """Build the device tables for the contiguous tensors of ``launch_lists``."""
    numels = [p.numel() for p in lists["params"]]
    state = lists["exp_avgs"] + lists["exp_avg_sqs"] + lists["max_exp_avg_sqs"]
    return multi_tensor.make_plan(lists, [numels], numels,
                                  [lists["params"], lists["grads"], state, lists["masks"]], block=block, iters=iters)


def launch(plan: multi_tensor.Plan, lists: dict, scalars: torch.Tensor, *, mask_kind: int, freeze: bool,
           amsgrad: bool, keep_threshold: int = 1, seed: int = 0) -> None:
    """Run one masked AdamW step over ``plan`` in one launch; ``scalars``: the contract's rows."""
    n_chunks = plan.chunk_tensor.numel()
    if n_chunks == 0:
        return
    masked_adamw_kernel[(n_chunks,)](
        *(tensors[0] for tensors in lists.values()), plan.table, plan.chunk_tensor, plan.chunk_start, scalars,
        keep_threshold, seed & 0xFFFFFFFF, (seed >> 32) & 0xFFFFFFFF,
        MASK_KIND=mask_kind, FREEZE=mask_kind != 0 and freeze, AMSGRAD=amsgrad,
        P_ALIGN=plan.aligns[0], G_ALIGN=plan.aligns[1], S_ALIGN=plan.aligns[2], MASK_ALIGN=plan.aligns[3],
        BLOCK=plan.block, ITERS=plan.iters,
        enable_fp_fusion=multi_tensor.FP_FUSION,
    )
