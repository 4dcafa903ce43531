"""The Triton backend: childopt.kernels' multi-tensor dense and sparse AdamW, one launch per bucket.

Device tables are cached per set of tensor addresses, so a training loop whose gradients keep
their storage (or get the same blocks back from the caching allocator) does no table work
after the first step; new addresses cost one small host-to-device copy.
"""
from __future__ import annotations

from collections import OrderedDict

import torch

from childopt.backends.ops import (MASK_BERNOULLI, MASK_DENSE, MaskScalars, SparseTensorLists, StepScalars,
                                   TensorLists)

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
    """Steps buckets with the Triton kernels; holds the plan cache of one optimizer."""

    name = NAME

    def __init__(self, block: int | None = None, iters: int | None = None):
        from childopt.kernels import fisher_accumulate, masked_adamw, multi_tensor, radix_histogram, sparse_adamw

        self._dense = masked_adamw
        self._sparse = sparse_adamw
        self._histogram = radix_histogram
        self._fisher = fisher_accumulate
        self._block = block or multi_tensor.DEFAULT_BLOCK
        self._iters = iters or multi_tensor.DEFAULT_ITERS
        self._plans: OrderedDict = OrderedDict()

    def _plan(self, family, lists: dict, *extra):
        """The cached plan of ``lists`` (keyed by every tensor's address and size), built on a miss."""
        key = (family.__name__, tuple(tuple(t.data_ptr() for t in tensors) for tensors in lists.values()),
               tuple(t.numel() for tensors in lists.values() for t in tensors), extra)
        plan = self._plans.get(key)
        if plan is None:
            plan = family.make_plan(lists, *extra, block=self._block, iters=self._iters)
            self._plans[key] = plan
            if len(self._plans) > _PLAN_CACHE_SIZE:
                self._plans.popitem(last=False)
        else:
            self._plans.move_to_end(key)
        return plan

    def adamw_step(self, tensors: TensorLists, hp: StepScalars, mask: MaskScalars) -> None:
        """One launch over the bucket (see childopt.backends.ops for the update)."""
        lists = self._dense.launch_lists(
            tensors.params, tensors.grads, tensors.exp_avgs, tensors.exp_avg_sqs,
            tensors.max_exp_avg_sqs if hp.amsgrad else None, tensors.masks,
        )
        plan = self._plan(self._dense, lists, tuple(tensors.rng_bases) if tensors.rng_bases else None)
        self._dense.launch(
            plan, lists, hp, mask_kind=_KINDS.get(mask.kind, 0), freeze=mask.freeze, grad_scale=mask.grad_scale,
            keep_threshold=mask.keep_threshold, seed=mask.seed, step=mask.step,
        )

    def sparse_adamw_step(self, tensors: SparseTensorLists, hp: StepScalars) -> None:
        """One launch over the selected entries of every tensor of the bucket."""
        lists = self._sparse.launch_lists(
            tensors.params, tensors.grads, tensors.indices, tensors.exp_avgs, tensors.exp_avg_sqs,
            tensors.max_exp_avg_sqs if hp.amsgrad else None,
        )
        self._sparse.launch(self._plan(self._sparse, lists), lists, hp, compact_grads=tensors.compact_grads)

    def radix_histogram(self, scores: list, scopes: list, prefixes: torch.Tensor, shift: int, bits: int,
                        n_scopes: int) -> torch.Tensor:
        """One launch over every score tensor (contiguous fp32) of every scope."""
        hist = torch.zeros(n_scopes, 2**bits, dtype=torch.int64, device=prefixes.device)
        plan = self._plan(self._histogram, {"scores": scores}, tuple(scopes))
        self._histogram.launch(plan, scores, hist, prefixes, shift, bits)
        return hist

    def fisher_accumulate(self, fisher: list, grads: list, scales: torch.Tensor) -> None:
        """``fisher[i] += (grads[i] * scales[i])**2`` in one launch (fisher contiguous fp32)."""
        lists = {"fisher": fisher, "grads": grads}
        self._fisher.launch(self._plan(self._fisher, lists), lists, scales)
