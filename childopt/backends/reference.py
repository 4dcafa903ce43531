"""The reference backend: plain torch, one tensor at a time.  The oracle of the kernels.

It follows the element update of childopt.backends.contract literally, with torch ops on flat
views in the moments' dtype (fp32; float64 for the float64 parameters only this backend steps), and writes frozen entries back with ``torch.where`` so they stay bit-identical.
The histogram and Fisher ops are plain torch too (``bincount``; foreach multiply-add).  Its
implementations are registered for every device (CompositeExplicitAutograd) under
``childopt_reference::``.
"""
from __future__ import annotations

import torch

from childopt import importance, philox
from childopt.backends import base, contract
from childopt.backends.contract import MaskKind

NAME = "reference"
AUTO_DEVICES = ("cpu", "cuda", "mps", "xpu")


def available(device: torch.device) -> tuple[bool, str]:
    """The reference backend runs wherever torch does."""
    return True, "plain torch"


class Backend(base.Backend):
    """Stateless: the ops are registered below."""

    name = NAME


def _rows(scalars: torch.Tensor) -> list[dict]:
    """Each tensor's row as a dict of Python floats, read with one host copy for the bucket."""
    return [dict(zip(contract.STEP_SCALAR_FIELDS, row)) for row in scalars.tolist()]


def adamw_math(p, g, m, v, vmax, s: dict):
    """The element update on flat tensors of the moments' dtype; returns new (p, m, v, vmax) without writing."""
    p = p * s["decay_before"]
    m = torch.lerp(m, g, s["one_minus_beta1"])  # the kernels' lerp_from_start picks torch's formula
    v = v * s["beta2"] + s["one_minus_beta2"] * g * g
    if vmax is not None:
        vmax = torch.maximum(vmax, v)
    denom = torch.sqrt(vmax if vmax is not None else v) / s["bc2_sqrt"] + s["eps"]
    p = p - s["step_size"] * m / denom
    return p * s["decay_after"], m, v, vmax


def _keep_mask(i, masks, mask_kind, numel, s, keep_threshold, seed, device):
    if mask_kind == MaskKind.DENSE:
        return masks[i].reshape(-1)
    if mask_kind in (MaskKind.BERNOULLI, MaskKind.IMPORTANCE):
        words = philox.random_words(numel, int(s["rng_base"]), seed, int(s["step"]), device)
        if mask_kind == MaskKind.IMPORTANCE:
            return words < importance.level_thresholds(masks[i].reshape(-1))
        return words < keep_threshold
    return None


def adamw_step(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, masks, scalars, mask_kind, freeze, amsgrad,
               keep_threshold, seed_lo, seed_hi) -> None:
    """Apply one masked AdamW step in place to every tensor of the bucket."""
    seed = seed_lo | (seed_hi << 32)
    for i, (param, s) in enumerate(zip(params, _rows(scalars))):
        p_flat = param.view(-1)
        m = exp_avgs[i].view(-1)
        v = exp_avg_sqs[i].view(-1)
        vmax = max_exp_avg_sqs[i].view(-1) if amsgrad else None
        g = grads[i].reshape(-1).to(m.dtype) * s["grad_sign"]
        if mask_kind == MaskKind.IMPORTANCE and not freeze:  # the level's scale replaces grad_scale
            g = g * importance.level_scales(masks[i].reshape(-1))
        else:
            g = g * s["grad_scale"]
        keep = _keep_mask(i, masks, mask_kind, p_flat.numel(), s, keep_threshold, seed, p_flat.device)
        if keep is not None and not freeze:
            g = torch.where(keep, g, 0.0)
        p_new, m_new, v_new, vmax_new = adamw_math(p_flat.to(m.dtype), g, m, v, vmax, s)
        p_new = p_new.to(param.dtype)
        if keep is not None and freeze:
            p_new = torch.where(keep, p_new, p_flat)
            m_new = torch.where(keep, m_new, m)
            v_new = torch.where(keep, v_new, v)
            if amsgrad:
                vmax_new = torch.where(keep, vmax_new, vmax)
        p_flat.copy_(p_new)
        m.copy_(m_new)
        v.copy_(v_new)
        if amsgrad:
            vmax.copy_(vmax_new)


def sparse_adamw_step(params, grads, indices, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, scalars, amsgrad,
                      compact_grads) -> None:
    """Apply one AdamW step in place to the selected entries of every tensor of the bucket."""
    for i, (param, s) in enumerate(zip(params, _rows(scalars))):
        idx = indices[i]
        p_flat = param.view(-1)
        grad = grads[i].reshape(-1)
        dtype = exp_avgs[i].dtype
        g = (grad if compact_grads else grad.index_select(0, idx)).to(dtype) * s["grad_sign"] * s["grad_scale"]
        vmax = max_exp_avg_sqs[i] if amsgrad else None
        p_new, m_new, v_new, vmax_new = adamw_math(p_flat.index_select(0, idx).to(dtype), g, exp_avgs[i],
                                                   exp_avg_sqs[i], vmax, s)
        p_flat.index_copy_(0, idx.long(), p_new.to(param.dtype))
        exp_avgs[i].copy_(m_new)
        exp_avg_sqs[i].copy_(v_new)
        if amsgrad:
            vmax.copy_(vmax_new)


def score_keys(scores: torch.Tensor) -> torch.Tensor:
    """Order-preserving uint32 keys (held in int64) of fp32 scores, ``-0.0`` counted as ``+0.0``."""
    bits = (scores.reshape(-1).float() + 0.0).view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    return torch.where(bits >= 2**31, bits ^ 0xFFFFFFFF, bits | 0x80000000)


def radix_histogram(scores, scopes, prefixes, shift, bits, n_scopes) -> torch.Tensor:
    """Per scope, count keys matching the scope's prefix above ``shift + bits`` by their next ``bits``."""
    hist = torch.zeros(n_scopes, 2**bits, dtype=torch.int64, device=prefixes.device)
    for s, scope in zip(scores, scopes):
        keys = score_keys(s)
        if shift + bits < 32:
            keys = keys[(keys >> (shift + bits)) == prefixes[scope]]
        hist[scope] += torch.bincount((keys >> shift) & (2**bits - 1), minlength=2**bits)
    return hist


def fisher_accumulate(fisher, grads, scales) -> None:
    """``fisher[i] += (grads[i] * scales[i])**2`` with two foreach ops over the whole list."""
    if not fisher:
        return
    scaled = torch._foreach_mul([g.float() for g in grads], list(scales.unbind()))
    torch._foreach_addcmul_(fisher, scaled, scaled)


for _op in contract.SCHEMAS:
    contract.register(NAME, _op, None, globals()[_op])
