"""In-place Fisher accumulation in Triton: ``F += (g * scale)^2`` over many tensors per launch.

Semantics: ``F`` fp32, ``g`` any float dtype (math in fp32), ``scale`` one fp32 device scalar per
tensor (a per-tensor clip coefficient; no host sync to apply it).  Bytes per element: F read +
write 8, g 4 (fp32) or 2 (bf16/fp16) = 12 / 10.  Layout: childopt.kernels.multi_tensor; full
blocks are unpredicated so they vectorise; all indexing int64.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from childopt.kernels import multi_tensor

COL_F, COL_G, COL_SCALE, COL_NUMEL = (tl.constexpr(i) for i in range(4))
TABLE_COLS = tl.constexpr(4)


@triton.jit
def fisher_accumulate_kernel(f_base, g_base, scale_base, table, chunk_tensor, chunk_start,
                             F_ALIGN: tl.constexpr, G_ALIGN: tl.constexpr, BLOCK: tl.constexpr,
                             ITERS: tl.constexpr):
    pid = tl.program_id(0)
    row = table + tl.load(chunk_tensor + pid).to(tl.int64) * TABLE_COLS
    start = tl.multiple_of(tl.load(chunk_start + pid), BLOCK)
    numel = tl.load(row + COL_NUMEL)
    f_ptr = f_base + tl.multiple_of(tl.load(row + COL_F), F_ALIGN)
    g_ptr = g_base + tl.multiple_of(tl.load(row + COL_G), G_ALIGN)
    scale = tl.load(scale_base + tl.load(row + COL_SCALE))
    for it in tl.static_range(ITERS):
        first = start + it * BLOCK
        offs = first + tl.arange(0, BLOCK).to(tl.int64)
        if first + BLOCK <= numel:
            g = tl.load(g_ptr + offs).to(tl.float32) * scale
            tl.store(f_ptr + offs, tl.load(f_ptr + offs) + g * g)
        elif first < numel:
            inb = offs < numel
            g = tl.load(g_ptr + offs, mask=inb, other=0.0).to(tl.float32) * scale
            tl.store(f_ptr + offs, tl.load(f_ptr + offs, mask=inb, other=0.0) + g * g, mask=inb)


def make_plan(lists: dict, *, block: int = multi_tensor.DEFAULT_BLOCK,
              iters: int = multi_tensor.DEFAULT_ITERS) -> multi_tensor.Plan:
    """Tables for contiguous fp32 ``lists["fisher"]`` and same-shaped ``lists["grads"]``."""
    numels = [f.numel() for f in lists["fisher"]]
    return multi_tensor.make_plan(lists, [list(range(len(numels))), numels], numels,
                                  [lists["fisher"], lists["grads"]], block=block, iters=iters)


def launch(plan: multi_tensor.Plan, lists: dict, scales: torch.Tensor) -> None:
    """``fisher[i] += (grads[i] * scales[i])**2`` for every tensor of ``plan``, in one launch."""
    n_chunks = plan.chunk_tensor.numel()
    if n_chunks == 0:
        return
    fisher_accumulate_kernel[(n_chunks,)](
        lists["fisher"][0], lists["grads"][0], scales, plan.table, plan.chunk_tensor, plan.chunk_start,
        F_ALIGN=plan.aligns[0], G_ALIGN=plan.aligns[1], BLOCK=plan.block, ITERS=plan.iters,
        enable_fp_fusion=multi_tensor.FP_FUSION,
    )
