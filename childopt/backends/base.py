"""The backend interface: what a bucket holds, what a backend declares, and the op calls.

A backend is a set of implementations of the ops of childopt.backends.contract under its own
namespace.  This class marshals a bucket into those ops once for every backend, and declares
what a backend covers (``PARAM_DTYPES``), so the optimizer routes a bucket to a backend that
can run it once, while bucketing, instead of inside an op.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from childopt import importance, philox
from childopt.backends import contract
from childopt.backends.contract import MaskKind, MaskSpec

KERNEL_DTYPES = frozenset({torch.float32, torch.bfloat16, torch.float16})


@dataclass
class TensorLists:
    """The tensors of one bucket; all contiguous, state in fp32, one device.

    ``masks`` (one per param) is set for the dense kind (bool) and the importance kind (uint8
    level codes), ``max_exp_avg_sqs`` under amsgrad.
    """

    params: list[torch.Tensor]
    grads: list[torch.Tensor]
    exp_avgs: list[torch.Tensor]
    exp_avg_sqs: list[torch.Tensor]
    max_exp_avg_sqs: Optional[list[torch.Tensor]] = None
    masks: Optional[list[torch.Tensor]] = None


@dataclass
class SparseTensorLists:
    """The tensors of one sparse bucket: only the entries ``indices`` of each param are stepped.

    ``indices`` are sorted flat indices (int32, or int64 past 2**31 elements; one dtype per
    bucket); ``exp_avgs`` etc. are compact fp32 tensors of the same length.  ``grads`` are the
    dense gradients (gathered at ``indices``) or, with ``compact_grads``, compact ones.
    """

    params: list[torch.Tensor]
    grads: list[torch.Tensor]
    indices: list[torch.Tensor]
    exp_avgs: list[torch.Tensor]
    exp_avg_sqs: list[torch.Tensor]
    max_exp_avg_sqs: Optional[list[torch.Tensor]] = None
    compact_grads: bool = False


class Backend:
    """Calls ``torch.ops.<namespace>.*`` of one backend; subclasses declare what they cover."""

    name = "reference"
    # Parameter dtypes the kernels step (gradients: the params' dtype or float32).
    PARAM_DTYPES: frozenset = frozenset({torch.float64, *KERNEL_DTYPES})

    def covers(self, param_dtype: torch.dtype, grad_dtype: torch.dtype) -> bool:
        """Whether this backend's kernels step params of ``param_dtype`` with ``grad_dtype`` grads."""
        return param_dtype in self.PARAM_DTYPES and grad_dtype in (param_dtype, torch.float32)

    def _op(self, op: str):
        return contract.op_handle(self.name, op)

    def adamw_step(self, tensors: TensorLists, scalars: torch.Tensor, mask: MaskSpec) -> None:
        """One op call over the bucket; ``scalars``: the contract's float64 rows, one per tensor."""
        seed_lo, seed_hi = mask.seed_words
        self._op("adamw_step")(
            tensors.params, tensors.grads, tensors.exp_avgs, tensors.exp_avg_sqs, tensors.max_exp_avg_sqs or [],
            tensors.masks if mask.kind in (MaskKind.DENSE, MaskKind.IMPORTANCE) else [], scalars, int(mask.kind),
            mask.freeze, tensors.max_exp_avg_sqs is not None, mask.keep_threshold, seed_lo, seed_hi,
        )

    def sparse_adamw_step(self, tensors: SparseTensorLists, scalars: torch.Tensor) -> None:
        """One op call over the selected entries of every tensor of the bucket."""
        self._op("sparse_adamw_step")(
            tensors.params, tensors.grads, tensors.indices, tensors.exp_avgs, tensors.exp_avg_sqs,
            tensors.max_exp_avg_sqs or [], scalars, tensors.max_exp_avg_sqs is not None, tensors.compact_grads,
        )

    def radix_histogram(self, scores: list, scopes: list, prefixes: torch.Tensor, shift: int, bits: int,
                        n_scopes: int) -> torch.Tensor:
        """One pass over every score tensor (contiguous fp32) of every scope."""
        return self._op("radix_histogram")(scores, list(scopes), prefixes, shift, bits, n_scopes)

    def fisher_accumulate(self, fisher: list, grads: list, scales: torch.Tensor) -> None:
        """``fisher[i] += (grads[i] * scales[i])**2`` in one op call (fisher contiguous fp32)."""
        if fisher:
            self._op("fisher_accumulate")(fisher, grads, scales.to(torch.float32))

    def random_words(self, numel: int, rng_base: int, seed: int, step: int, device) -> torch.Tensor:
        """The uint32 Philox words (int64) of ``numel`` elements: :func:`childopt.philox.random_words`."""
        return philox.random_words(numel, rng_base, seed, step, device)

    def score_logs(self, score: torch.Tensor, codes=None) -> torch.Tensor:
        """The flat log2 of one importance score tensor (at its level ``codes``' probabilities when given):
        :func:`childopt.importance.score_logs`."""
        return importance.score_logs(score, codes)

    def probabilities(self, log_r: torch.Tensor, log_c: float, p_min: float) -> torch.Tensor:
        """Keep probabilities of a piece of log ratios: :func:`childopt.importance.probabilities`."""
        return importance.probabilities(log_r, log_c, p_min)

    def kept_sums(self, log_r: torch.Tensor, log_c: float, p_min: float) -> tuple[int, int, int]:
        """A pass of the importance solve over a piece of log ratios: :func:`childopt.importance.kept_sums`."""
        return importance.kept_sums(log_r, log_c, p_min)

    def level_codes(self, p: torch.Tensor, rng_base: int, seed: int, step: int) -> torch.Tensor:
        """uint8 importance level codes of fp32 keep probabilities ``p`` (1-D), rounded by the Philox words
        of its elements from group ``rng_base`` on: :func:`childopt.importance.level_codes`."""
        return importance.level_codes(p, self.random_words(p.numel(), rng_base, seed, step, p.device))
