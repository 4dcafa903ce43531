"""The optimizers childopt's rows are compared against, or :class:`~childopt.bench.measure.Unavailable`
saying what one needs: torch's fused AdamW, bitsandbytes' 8-bit AdamW, and the per-parameter
Python loop of the published ChildTuning optimizer.

ChildTuning (Xu et al., 2021) ships its optimizer as a loop over parameters that runs one torch
op after another on each tensor: build the gradient mask (Child-Tuning-F samples a Bernoulli
tensor every step), multiply it into the gradient in place, then the Adam moment updates, the
denominator, the parameter update and decoupled weight decay.  ``ChildTuningReferenceAdamW``
re-implements that loop from its formulas so ``python -m childopt bench`` can show what the fused
kernels of :class:`childopt.ChildTuningAdamW` (same arithmetic) gain over it.  It is a
measuring stick, not an optimizer to train with: use ``ChildTuningAdamW``.
"""
from __future__ import annotations

import importlib.util
import math

import torch
from torch.optim import Optimizer

from childopt.bench.measure import Unavailable

MODES = (None, "ChildTuning-D", "ChildTuning-F")


def fused_adamw(params, **hyper) -> torch.optim.Optimizer:
    """torch's fused AdamW, or :class:`Unavailable` where this torch has no fused kernel for the device."""
    try:
        return torch.optim.AdamW(params, fused=True, **hyper)
    except RuntimeError as exc:
        raise Unavailable(f"torch.optim.AdamW(fused=True): {exc}") from exc


def adamw_8bit(params, **hyper) -> torch.optim.Optimizer:
    """bitsandbytes' 8-bit AdamW over ``params`` (a list), or :class:`Unavailable` saying what it needs."""
    if importlib.util.find_spec("bitsandbytes") is None or params[0].device.type != "cuda":
        raise Unavailable("bitsandbytes 8-bit AdamW needs the bitsandbytes package and a CUDA GPU")
    import bitsandbytes

    return bitsandbytes.optim.AdamW8bit(params, **hyper)


class ChildTuningReferenceAdamW(Optimizer):
    r"""The original ChildTuning AdamW step, one parameter and one op at a time.

    Per parameter with a gradient: ``ChildTuning-D`` multiplies the gradient in place by its
    entry of :meth:`set_gradient_mask` (if any); ``ChildTuning-F`` multiplies it by a fresh
    Bernoulli(``reserve_p``) sample divided by ``reserve_p``.  Then
    ``m = beta1 m + (1 - beta1) g``, ``v = beta2 v + (1 - beta2) g^2``,
    ``p -= step_size * m / (sqrt(v) + eps)`` with
    ``step_size = lr * sqrt(1 - beta2^t) / (1 - beta1^t)`` when ``correct_bias`` (else ``lr``),
    and ``p -= lr * weight_decay * p`` when ``weight_decay > 0``.  The gradient is modified in
    place, as in the original.
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0,
                 correct_bias=True, reserve_p=1.0, mode=None):
        if lr < 0.0:
            raise ValueError(f"lr must be >= 0, got {lr}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"betas must be in [0, 1), got {betas}")
        if eps < 0.0:
            raise ValueError(f"eps must be >= 0, got {eps}")
        if not 0.0 < reserve_p <= 1.0:
            raise ValueError(f"reserve_p must be in (0, 1], got {reserve_p}")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, correct_bias=correct_bias)
        super().__init__(params, defaults)
        self.reserve_p = reserve_p
        self.mode = mode
        self.gradient_mask: dict = {}

    def set_gradient_mask(self, gradient_mask: dict) -> None:
        """Set the Child-Tuning-D mask: a dict from parameter to a tensor multiplied into its gradient."""
        self.gradient_mask = gradient_mask

    def _mask_grad(self, p: torch.Tensor, grad: torch.Tensor) -> None:
        """Apply this step's child-network mask to ``grad`` in place."""
        if self.mode == "ChildTuning-D" and p in self.gradient_mask:
            grad *= self.gradient_mask[p]
        elif self.mode == "ChildTuning-F":
            grad_mask = torch.distributions.Bernoulli(grad.new_full(size=grad.size(), fill_value=self.reserve_p))
            grad *= grad_mask.sample() / self.reserve_p

    @torch.no_grad()
    def step(self, closure=None):
        """Perform one optimisation step; ``closure`` re-evaluates the model and returns the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                self._mask_grad(p, grad)
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                state["step"] += 1
                exp_avg.mul_(beta1).add_(grad, alpha=1.0 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
                denom = exp_avg_sq.sqrt().add_(group["eps"])
                step_size = group["lr"]
                if group["correct_bias"]:
                    step = state["step"]
                    step_size = step_size * math.sqrt(1.0 - beta2**step) / (1.0 - beta1**step)
                p.addcdiv_(exp_avg, denom, value=-step_size)
                if group["weight_decay"] > 0.0:
                    p.add_(p, alpha=-group["lr"] * group["weight_decay"])
        return loss
