"""The Triton backend: childopt.kernels' multi-tensor masked AdamW, one launch per bucket.

Device tables are cached per set of tensor addresses, so a training loop whose gradients keep
their storage (or get the same blocks back from the caching allocator) does no table work
after the first step; new addresses cost one small host-to-device copy.
"""
from __future__ import annotations

from collections import OrderedDict

import torch

from childopt.backends.ops import MASK_BERNOULLI, MASK_DENSE, MaskScalars, StepScalars, TensorLists

NAME = "triton"
# The interpreter (TRITON_INTERPRET=1) is for tests: auto never picks Triton for CPU tensors.
AUTO_DEVICES = ("cuda",)
_PLAN_CACHE_SIZE = 8
_KINDS = {MASK_DENSE: 1, MASK_BERNOULLI: 2}


def available(device: torch.device) -> tuple[bool, str]:
    """Whether the Triton kernels can step tensors on ``device``, and why (not)."""
    try:
        from childopt.kernels import masked_adamw
    except ImportError as exc:
        return False, f"triton is not importable ({exc})"
    interpreted = type(masked_adamw.masked_adamw_kernel).__name__ == "InterpretedFunction"
    if device.type == "cuda":
        if interpreted:
            return False, "TRITON_INTERPRET=1 was set when childopt.kernels was imported; CUDA tensors need compiled kernels"
        return True, "CUDA tensors and Triton available"
    if interpreted and device.type == "cpu":
        return True, "TRITON_INTERPRET=1: Triton kernels interpreted on CPU"
    return False, f"Triton kernels need CUDA tensors (got {device.type}; TRITON_INTERPRET=1 runs them on CPU for tests)"


class Backend:
    """Steps buckets with the Triton kernel; holds the plan cache of one optimizer."""

    name = NAME

    def __init__(self, block: int | None = None, iters: int | None = None):
        from childopt.kernels import masked_adamw

        self._kernels = masked_adamw
        self._block = block or masked_adamw.DEFAULT_BLOCK
        self._iters = iters or masked_adamw.DEFAULT_ITERS
        self._plans: OrderedDict = OrderedDict()

    def _plan(self, lists: list, rng_bases):
        key = (tuple(tuple(t.data_ptr() for t in lst) for lst in lists),
               tuple(t.numel() for t in lists[0]), tuple(rng_bases or ()))
        plan = self._plans.get(key)
        if plan is None:
            plan = self._kernels.make_plan(lists, rng_bases, block=self._block, iters=self._iters)
            self._plans[key] = plan
            if len(self._plans) > _PLAN_CACHE_SIZE:
                self._plans.popitem(last=False)
        else:
            self._plans.move_to_end(key)
        return plan

    def adamw_step(self, tensors: TensorLists, hp: StepScalars, mask: MaskScalars) -> None:
        """One launch over the bucket (see childopt.backends.ops for the update)."""
        lists = self._kernels.launch_lists(
            tensors.params, tensors.grads, tensors.exp_avgs, tensors.exp_avg_sqs,
            tensors.max_exp_avg_sqs if hp.amsgrad else None, tensors.masks,
        )
        plan = self._plan(lists, tensors.rng_bases)
        self._kernels.launch(
            plan, lists,
            decay=hp.decay, one_minus_beta1=hp.one_minus_beta1, beta2=hp.beta2,
            one_minus_beta2=hp.one_minus_beta2, eps=hp.eps, step_size=hp.step_size, bc2_sqrt=hp.bc2_sqrt,
            maximize=hp.maximize, amsgrad=hp.amsgrad, decay_after=hp.decay_after,
            mask_kind=_KINDS.get(mask.kind, 0), freeze=mask.freeze, grad_scale=mask.grad_scale,
            keep_threshold=mask.keep_threshold, seed=mask.seed, step=mask.step,
        )
