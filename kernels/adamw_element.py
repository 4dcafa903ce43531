"""The AdamW element update as Triton device functions, shared by the dense and sparse kernels.

``adamw_block`` implements ``childopt.backends.ops`` on a block of pointers: contiguous blocks
(dense step) and gathered ones (sparse step) run the very same arithmetic, so the two storages
give bit-identical parameters on one backend.  fp32 math; IEEE sqrt and division.
"""
import triton
import triton.language as tl


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
def adamw_block(p_ptrs, g_ptrs, m_ptrs, v_ptrs, vmax_ptrs, io_mask, keep,
                decay, one_minus_beta1, beta2, one_minus_beta2, eps, step_size, bc2_sqrt, grad_scale,
                MASKED_IO: tl.constexpr, MASKED: tl.constexpr, FREEZE: tl.constexpr, SCALE_GRAD: tl.constexpr, AMSGRAD: tl.constexpr,
                MAXIMIZE: tl.constexpr, DECAY_AFTER: tl.constexpr, LERP_FROM_START: tl.constexpr):
    """One block of the element update, on blocks of pointers (contiguous or gathered).

    ``io_mask`` guards loads and stores only when ``MASKED_IO`` (a tensor's last block); ``keep``
    is the mask decision when ``MASKED``.

    Frozen entries are loaded and written back unchanged (``where(keep, new, old)`` on the raw
    values, so bit-identical): unpredicated loads and stores vectorise, where per-element
    predicates would split every access into scalar ones.
    """
    g_raw = _load(g_ptrs, io_mask, MASKED_IO)
    p_raw = _load(p_ptrs, io_mask, MASKED_IO)
    m_old = _load(m_ptrs, io_mask, MASKED_IO)
    v_old = _load(v_ptrs, io_mask, MASKED_IO)
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
        vmax_old = _load(vmax_ptrs, io_mask, MASKED_IO)
        vmax = tl.maximum(vmax_old, v)
        denom = tl.div_rn(tl.sqrt_rn(vmax), bc2_sqrt) + eps
    else:
        denom = tl.div_rn(tl.sqrt_rn(v), bc2_sqrt) + eps
    p = p - tl.div_rn(step_size * m, denom)
    if DECAY_AFTER:
        p = p * decay
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
