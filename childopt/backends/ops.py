"""The op contract every backend implements (a ``Backend`` class per backend module):

* ``adamw_step(TensorLists, StepScalars, MaskScalars)``: the masked AdamW step of a bucket;
* ``sparse_adamw_step(SparseTensorLists, StepScalars)``: the same update on selected entries;
* ``radix_histogram(scores, scopes, prefixes, shift, bits, n_scopes)``: one radix-select pass
  (childopt.masks);
* ``fisher_accumulate(fisher, grads, scales)``: ``fisher[i] += (grads[i] * scales[i])**2``.

The front-end (childopt.optim) groups tensors into buckets that share device, dtypes, step
count and mask kind, turns the hyper-parameters into the scalars below (host float64
arithmetic, so every backend rounds the same values to fp32), and calls one op per bucket.

Element update, in fp32 (``g`` is the gradient, negated under ``maximize``)::

    keep  = mask != 0                      (dense) | philox word < keep_threshold (bernoulli)
    g     = where(keep, g * grad_scale, 0)  unless freeze; under freeze, entries with
                                            keep == 0 are not read or written at all
    p     = p * decay                       (before the update, AdamW; after it if decay_after)
    m     = lerp(m, g, 1 - beta1)           (torch.lerp's formula)
    v     = v * beta2 + (1 - beta2) * g * g
    vmax  = max(vmax, v)                    (amsgrad; the denominator then uses vmax)
    p     = p - step_size * m / (sqrt(v) / bc2_sqrt + eps)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

MASK_NONE = "none"
MASK_DENSE = "dense"
MASK_BERNOULLI = "bernoulli"


@dataclass(frozen=True)
class StepScalars:
    """Per-bucket scalars of the AdamW element update (see the module docstring)."""

    decay: float
    one_minus_beta1: float
    beta2: float
    one_minus_beta2: float
    eps: float
    step_size: float
    bc2_sqrt: float
    maximize: bool
    amsgrad: bool
    decay_after: bool


@dataclass(frozen=True)
class MaskScalars:
    """How a bucket is masked.

    ``freeze`` leaves dropped entries bit-identical; otherwise dropped gradients are zeroed and
    kept ones multiplied by ``grad_scale`` (``1 / reserve_p`` for Bernoulli, 1 for dense masks).
    ``seed``, ``step`` and ``keep_threshold`` drive the Bernoulli draw (childopt.philox).
    """

    kind: str = MASK_NONE
    freeze: bool = False
    grad_scale: float = 1.0
    keep_threshold: int = 0
    seed: int = 0
    step: int = 0


@dataclass
class TensorLists:
    """The tensors of one bucket; all contiguous, state in fp32, one device.

    ``masks`` (bool, one per param) is set for the dense kind, ``rng_bases`` (the Philox group
    offset of each param) for the Bernoulli kind, ``max_exp_avg_sqs`` under amsgrad.
    """

    params: list[torch.Tensor]
    grads: list[torch.Tensor]
    exp_avgs: list[torch.Tensor]
    exp_avg_sqs: list[torch.Tensor]
    max_exp_avg_sqs: Optional[list[torch.Tensor]] = None
    masks: Optional[list[torch.Tensor]] = None
    rng_bases: Optional[list[int]] = None


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
