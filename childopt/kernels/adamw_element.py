"""The AdamW element update as Triton device functions, shared by the dense and sparse kernels.

``adamw_block`` implements ``childopt.backends.contract``'s element update on a block of pointers: contiguous blocks
(dense step) and gathered ones (sparse step) run the very same arithmetic, so the two storages
give bit-identical parameters on one backend.  fp32 math; IEEE sqrt and division.
"""
import triton
import triton.language as tl

from childopt.backends.contract import COLUMN, NUM_STEP_SCALARS as _NUM

NUM_STEP_SCALARS = tl.constexpr(_NUM)
# Columns of the step-scalar rows, named after contract.STEP_SCALAR_FIELDS.
COL_DECAY_BEFORE, COL_DECAY_AFTER, COL_ONE_MINUS_BETA1, COL_BETA2, COL_ONE_MINUS_BETA2, COL_EPS, COL_STEP_SIZE, \
    COL_BC2_SQRT, COL_GRAD_SCALE, COL_GRAD_SIGN, COL_LERP_FROM_START, COL_STEP, COL_RNG_BASE = (
        tl.constexpr(COLUMN[name]) for name in (
            "decay_before", "decay_after", "one_minus_beta1", "beta2", "one_minus_beta2", "eps", "step_size",
            "bc2_sqrt", "grad_scale", "grad_sign", "lerp_from_start", "step", "rng_base"))


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
def load_step_scalars(scalars, tensor):
    """The fp32 scalars of ``tensor``'s row of the float64 [n, NUM_STEP_SCALARS] ``scalars``.

    Columns in the order of childopt.backends.contract.STEP_SCALAR_FIELDS (``COL_*`` below);
    each is rounded from float64 to fp32 once, as the C++ kernels do.
    """
    row = scalars + tensor.to(tl.int64) * NUM_STEP_SCALARS
    return (tl.load(row + COL_DECAY_BEFORE).to(tl.float32), tl.load(row + COL_DECAY_AFTER).to(tl.float32),
            tl.load(row + COL_ONE_MINUS_BETA1).to(tl.float32), tl.load(row + COL_BETA2).to(tl.float32),
            tl.load(row + COL_ONE_MINUS_BETA2).to(tl.float32), tl.load(row + COL_EPS).to(tl.float32),
            tl.load(row + COL_STEP_SIZE).to(tl.float32), tl.load(row + COL_BC2_SQRT).to(tl.float32),
            tl.load(row + COL_GRAD_SCALE).to(tl.float32), tl.load(row + COL_GRAD_SIGN).to(tl.float32),
            tl.load(row + COL_LERP_FROM_START) != 0)


@triton.jit
def adamw_block(p_ptrs, g_ptrs, m_ptrs, v_ptrs, vmax_ptrs, io_mask, keep,
                decay_before, decay_after, one_minus_beta1, beta2, one_minus_beta2, eps, step_size, bc2_sqrt,
                grad_scale, grad_sign, lerp_from_start,
                MASKED_IO: tl.constexpr, MASKED: tl.constexpr, FREEZE: tl.constexpr, AMSGRAD: tl.constexpr):
    """One block of the element update, on blocks of pointers (contiguous or gathered).

    ``io_mask`` guards loads and stores only when ``MASKED_IO`` (a tensor's last block); ``keep``
    is the mask decision when ``MASKED``.  The scalars are ``load_step_scalars``'; switches are
    folded into exact multiplies (by +-1 or 1) as in csrc/include/childopt/adamw_element.h, so
    both give the same bits.

    Frozen entries are loaded and written back unchanged (``where(keep, new, old)`` on the raw
    values, so bit-identical): unpredicated loads and stores vectorise, where per-element
    predicates would split every access into scalar ones.
    """
    g_raw = _load(g_ptrs, io_mask, MASKED_IO)
    p_raw = _load(p_ptrs, io_mask, MASKED_IO)
    m_old = _load(m_ptrs, io_mask, MASKED_IO)
    v_old = _load(v_ptrs, io_mask, MASKED_IO)
    g = g_raw.to(tl.float32) * grad_sign
    g = g * grad_scale
    if MASKED:
        if not FREEZE:
            g = tl.where(keep, g, 0.0)
    p = p_raw.to(tl.float32) * decay_before
    # torch.lerp's two-sided formula, so m matches torch.optim.AdamW's exp_avg.lerp_
    m = tl.where(lerp_from_start, m_old + one_minus_beta1 * (g - m_old), g - (g - m_old) * (1.0 - one_minus_beta1))
    v = v_old * beta2 + one_minus_beta2 * g * g
    if AMSGRAD:
        vmax_old = _load(vmax_ptrs, io_mask, MASKED_IO)
        vmax = tl.maximum(vmax_old, v)
        denom = tl.div_rn(tl.sqrt_rn(vmax), bc2_sqrt) + eps
    else:
        denom = tl.div_rn(tl.sqrt_rn(v), bc2_sqrt) + eps
    p = p - tl.div_rn(step_size * m, denom)
    p = p * decay_after
    p_new = round_to(p, p_ptrs.dtype.element_ty)
    if MASKED:
        if FREEZE:
            p_new = tl.where(keep, p_new, p_raw)
            m = tl.where(keep, m, m_old)
            v = tl.where(keep, v, v_old)
            if AMSGRAD:
                vmax = tl.where(keep, vmax, vmax_old)
    _store(p_ptrs, p_new, io_mask, MASKED_IO)
    _store(m_ptrs, m, io_mask, MASKED_IO)
    _store(v_ptrs, v, io_mask, MASKED_IO)
    if AMSGRAD:
        _store(vmax_ptrs, vmax, io_mask, MASKED_IO)
