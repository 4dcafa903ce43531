"""The reference backend: plain torch, one tensor at a time.  The oracle of the kernels.

It follows the element update of childopt.backends.ops literally, with torch ops on flat fp32
views, and writes frozen entries back with ``torch.where`` so they stay bit-identical.
"""
from __future__ import annotations

import torch

from childopt import philox
from childopt.backends.ops import MASK_BERNOULLI, MASK_DENSE, MaskScalars, StepScalars, TensorLists

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


def adamw_step(tensors: TensorLists, hp: StepScalars, mask: MaskScalars) -> None:
    """Apply one masked AdamW step in place to every tensor of the bucket."""
    for i, param in enumerate(tensors.params):
        p_flat = param.view(-1)
        p = p_flat.float()
        g = tensors.grads[i].reshape(-1).float()
        m = tensors.exp_avgs[i].view(-1)
        v = tensors.exp_avg_sqs[i].view(-1)
        vmax = tensors.max_exp_avg_sqs[i].view(-1) if hp.amsgrad else None
        if hp.maximize:
            g = -g
        keep = _keep_mask(i, tensors, mask, p.numel(), p.device)
        if keep is not None and not mask.freeze:
            g = torch.where(keep, g * mask.grad_scale if mask.grad_scale != 1.0 else g, 0.0)

        if not hp.decay_after:
            p = p * hp.decay
        m_new = torch.lerp(m, g, hp.one_minus_beta1)
        v_new = v * hp.beta2 + hp.one_minus_beta2 * g * g
        if hp.amsgrad:
            vmax_new = torch.maximum(vmax, v_new)
            denom = torch.sqrt(vmax_new) / hp.bc2_sqrt + hp.eps
        else:
            denom = torch.sqrt(v_new) / hp.bc2_sqrt + hp.eps
        p = p - hp.step_size * m_new / denom
        if hp.decay_after:
            p = p * hp.decay

        p_new = p.to(param.dtype)
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

