"""The native backend: childopt._C's C++ (CPU) and CUDA kernels, through ``torch.ops.childopt``.

The extension is found or built by childopt._ext on first use.  Each op call passes a bucket's
tensor lists and its scalars (childopt.backends.ops; fp64 on the host, rounded to fp32 once
in C++, as every backend does).  Parameters in a dtype the kernels do not cover (float64) are
stepped by the reference backend, so ``auto`` never refuses a model the other backends accept.
"""
from __future__ import annotations

import torch

from childopt.backends import reference
from childopt.backends.ops import (MASK_BERNOULLI, MASK_DENSE, MaskScalars, SparseTensorLists, StepScalars,
                                   TensorLists)

NAME = "native"
AUTO_DEVICES = ("cpu", "cuda")
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_KINDS = {MASK_DENSE: 1, MASK_BERNOULLI: 2}


def available(device: torch.device) -> tuple[bool, str]:
    """Whether childopt._C loads, building it if needed, and has kernels for ``device``."""
    return _check(device, build=True)


def ready(device: torch.device) -> tuple[bool, str]:
    """Like :func:`available`, but without compiling: what ``backend="auto"`` asks."""
    return _check(device, build=False)


def _check(device: torch.device, build: bool) -> tuple[bool, str]:
    from childopt import _ext

    module, reason = _ext.try_load(build=build)
    if module is None:
        return False, f"childopt._C is not available ({reason})"
    if device.type == "cpu":
        return True, f"childopt._C ({reason})"
    if device.type == "cuda":
        if not module.with_cuda:
            return False, f"childopt._C was built without CUDA ({reason})"
        return True, f"childopt._C with CUDA kernels ({reason})"
    return False, f"childopt._C has no kernels for {device.type} tensors"


def _scalars(hp: StepScalars, grad_scale: float) -> list[float]:
    """The ops' ``float[] scalars``, in the field order of csrc's StepScalars."""
    return [
        1.0 if hp.decay_after else hp.decay, hp.decay if hp.decay_after else 1.0,
        hp.one_minus_beta1, hp.beta2, hp.one_minus_beta2, hp.eps, hp.step_size, hp.bc2_sqrt,
        grad_scale, -1.0 if hp.maximize else 1.0, 1.0 if hp.one_minus_beta1 < 0.5 else 0.0,
    ]


def _kernels_cover(params: list, grads: list) -> bool:
    return params[0].dtype in KERNEL_DTYPES and grads[0].dtype in (params[0].dtype, torch.float32)


class Backend:
    """Calls torch.ops.childopt.*; loads the extension when constructed."""

    name = NAME

    def __init__(self):
        from childopt import _ext

        _ext.load()
        self._ops = torch.ops.childopt

    def adamw_step(self, tensors: TensorLists, hp: StepScalars, mask: MaskScalars) -> None:
        """One op call over the bucket (see childopt.backends.ops for the update)."""
        if not tensors.params:
            return
        if not _kernels_cover(tensors.params, tensors.grads):
            reference.adamw_step(tensors, hp, mask)
            return
        kind = _KINDS.get(mask.kind, 0)
        scale = mask.grad_scale if kind and not mask.freeze else 1.0
        self._ops.adamw_step(
            tensors.params, tensors.grads, tensors.exp_avgs, tensors.exp_avg_sqs,
            tensors.max_exp_avg_sqs if hp.amsgrad else [], tensors.masks if kind == 1 else [],
            list(tensors.rng_bases) if kind == 2 else [], _scalars(hp, scale), kind, mask.freeze, hp.amsgrad,
            mask.keep_threshold if kind == 2 else 1, mask.seed & 0xFFFFFFFF, (mask.seed >> 32) & 0xFFFFFFFF,
            mask.step,
        )

    def sparse_adamw_step(self, tensors: SparseTensorLists, hp: StepScalars) -> None:
        """One op call over the selected entries of every tensor of the bucket."""
        if not tensors.params:
            return
        if not _kernels_cover(tensors.params, tensors.grads):
            reference.sparse_adamw_step(tensors, hp)
            return
        self._ops.sparse_adamw_step(
            tensors.params, tensors.grads, tensors.indices, tensors.exp_avgs, tensors.exp_avg_sqs,
            tensors.max_exp_avg_sqs if hp.amsgrad else [], _scalars(hp, 1.0), hp.amsgrad, tensors.compact_grads,
        )

    def radix_histogram(self, scores: list, scopes: list, prefixes: torch.Tensor, shift: int, bits: int,
                        n_scopes: int) -> torch.Tensor:
        """One pass over every score tensor (contiguous fp32) of every scope."""
        return self._ops.radix_histogram(scores, list(scopes), prefixes, shift, bits, n_scopes)

    def fisher_accumulate(self, fisher: list, grads: list, scales: torch.Tensor) -> None:
        """``fisher[i] += (grads[i] * scales[i])**2`` in one op call."""
        if not fisher:
            return
        if grads[0].dtype not in KERNEL_DTYPES or any(g.dtype != grads[0].dtype for g in grads):
            reference.Backend().fisher_accumulate(fisher, grads, scales)
            return
        self._ops.fisher_accumulate(fisher, grads, scales.to(torch.float32))
