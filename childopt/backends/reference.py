"""The reference backend: plain torch, one tensor at a time.  The oracle of the kernels.

It follows the element update of childopt.backends.ops literally, with torch ops on flat fp32
views, and writes frozen entries back with ``torch.where`` so they stay bit-identical.  The
histogram and Fisher ops are plain torch too (``bincount``; foreach multiply-add).
"""
from __future__ import annotations

import torch

from childopt import philox
from childopt.backends.ops import (MASK_BERNOULLI, MASK_DENSE, MaskScalars, SparseTensorLists, StepScalars,
                                   TensorLists)

NAME = "reference"
AUTO_DEVICES = ("cpu", "cuda", "mps", "xpu")


def available(device: torch.device) -> tuple[bool, str]:
    """The reference backend runs wherever torch does."""
    return True, "plain torch"


def _keep_mask(i: int, tensors: TensorLists, mask: MaskScalars, numel: int, device) -> torch.Tensor | None:
    if mask.kind == MASK_DENSE:
        return tensors.masks[i].reshape(-1)
    if mask.kind == MASK_BERNOULLI:
        words = philox.random_words(numel, tensors.rng_bases[i], mask.seed, mask.step, device)
        return words < mask.keep_threshold
    return None


class Backend:
    """Stateless; a class only so every backend has the same shape."""

    name = NAME

    def adamw_step(self, tensors: TensorLists, hp: StepScalars, mask: MaskScalars) -> None:
        adamw_step(tensors, hp, mask)

    def sparse_adamw_step(self, tensors: SparseTensorLists, hp: StepScalars) -> None:
        sparse_adamw_step(tensors, hp)

    def radix_histogram(self, scores: list, scopes: list, prefixes: torch.Tensor, shift: int, bits: int,
                        n_scopes: int) -> torch.Tensor:
        return radix_histogram(scores, scopes, prefixes, shift, bits, n_scopes)

    def fisher_accumulate(self, fisher: list, grads: list, scales: torch.Tensor) -> None:
        """``fisher[i] += (grads[i] * scales[i])**2`` with two foreach ops over the whole list."""
        scaled = torch._foreach_mul([g.float() for g in grads], list(scales.unbind()))
        torch._foreach_addcmul_(fisher, scaled, scaled)


def adamw_math(p, g, m, v, vmax, hp: StepScalars):
    """The element update on flat fp32 tensors; returns new (p, m, v, vmax) without writing."""
    if hp.maximize:
        g = -g
    if not hp.decay_after:
        p = p * hp.decay
    m = torch.lerp(m, g, hp.one_minus_beta1)
    v = v * hp.beta2 + hp.one_minus_beta2 * g * g
    if hp.amsgrad:
        vmax = torch.maximum(vmax, v)
    denom = torch.sqrt(vmax if hp.amsgrad else v) / hp.bc2_sqrt + hp.eps
    p = p - hp.step_size * m / denom
    if hp.decay_after:
        p = p * hp.decay
    return p, m, v, vmax


def adamw_step(tensors: TensorLists, hp: StepScalars, mask: MaskScalars) -> None:
    """Apply one masked AdamW step in place to every tensor of the bucket."""
    for i, param in enumerate(tensors.params):
        p_flat = param.view(-1)
        g = tensors.grads[i].reshape(-1).float()
        m = tensors.exp_avgs[i].view(-1)
        v = tensors.exp_avg_sqs[i].view(-1)
        vmax = tensors.max_exp_avg_sqs[i].view(-1) if hp.amsgrad else None
        keep = _keep_mask(i, tensors, mask, p_flat.numel(), p_flat.device)
        if keep is not None and not mask.freeze:
            g = torch.where(keep, g * mask.grad_scale if mask.grad_scale != 1.0 else g, 0.0)
        p_new, m_new, v_new, vmax_new = adamw_math(p_flat.float(), g, m, v, vmax, hp)
        p_new = p_new.to(param.dtype)
        if keep is not None and mask.freeze:
            p_new = torch.where(keep, p_new, p_flat)
            m_new = torch.where(keep, m_new, m)
            v_new = torch.where(keep, v_new, v)
            if hp.amsgrad:
                vmax_new = torch.where(keep, vmax_new, vmax)
        p_flat.copy_(p_new)
        m.copy_(m_new)
        v.copy_(v_new)
        if hp.amsgrad:
            vmax.copy_(vmax_new)


def sparse_adamw_step(tensors: SparseTensorLists, hp: StepScalars) -> None:
    """Apply one AdamW step in place to the selected entries of every tensor of the bucket."""
    for i, param in enumerate(tensors.params):
        idx = tensors.indices[i]
        p_flat = param.view(-1)
        grad = tensors.grads[i].reshape(-1)
        g = (grad if tensors.compact_grads else grad.index_select(0, idx)).float()
        vmax = tensors.max_exp_avg_sqs[i] if hp.amsgrad else None
        p_new, m_new, v_new, vmax_new = adamw_math(p_flat.index_select(0, idx).float(), g, tensors.exp_avgs[i],
                                                   tensors.exp_avg_sqs[i], vmax, hp)
        p_flat.index_copy_(0, idx.long(), p_new.to(param.dtype))
        tensors.exp_avgs[i].copy_(m_new)
        tensors.exp_avg_sqs[i].copy_(v_new)
        if hp.amsgrad:
            vmax.copy_(vmax_new)


def score_keys(scores: torch.Tensor) -> torch.Tensor:
    """Order-preserving uint32 keys (held in int64) of fp32 scores, ``-0.0`` counted as ``+0.0``."""
    bits = (scores.reshape(-1).float() + 0.0).view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    return torch.where(bits >= 2**31, bits ^ 0xFFFFFFFF, bits | 0x80000000)


def radix_histogram(scores: list, scopes: list, prefixes: torch.Tensor, shift: int, bits: int,
                    n_scopes: int) -> torch.Tensor:
    """Per scope, count keys matching the scope's prefix above ``shift + bits`` by their next ``bits``."""
    device = scores[0].device if scores else prefixes.device
    hist = torch.zeros(n_scopes, 2**bits, dtype=torch.int64, device=device)
    for s, scope in zip(scores, scopes):
        keys = score_keys(s)
        if shift + bits < 32:
            keys = keys[(keys >> (shift + bits)) == prefixes[scope]]
        hist[scope] += torch.bincount((keys >> shift) & (2**bits - 1), minlength=2**bits)
    return hist
