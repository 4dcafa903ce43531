"""The op contract of childopt, declared once: schemas, fake kernels, mask kinds, step scalars.

Every backend implements the same four ops; each lives in its own op namespace so that the
backends can be chosen per optimizer instead of by dispatch key alone:

* ``childopt::<op>``: the native kernels (childopt._C registers CPU and CUDA implementations
  with ``TORCH_LIBRARY_IMPL``; it defines nothing itself);
* ``childopt_triton::<op>``: the Triton kernels;
* ``childopt_reference::<op>``: plain torch, the oracle.

This module defines the schemas of all three namespaces from the one table :data:`SCHEMAS`
(mutated tensors annotated ``(a!)``; no op returns a tensor it mutated) and registers one fake
(meta) kernel per op for all of them, so ``torch.compile`` traces a step without running it.
Ops:

* ``adamw_step``: the masked AdamW step of a bucket (the element update below);
* ``sparse_adamw_step``: the same update on the selected entries ``indices`` of each tensor;
* ``radix_histogram``: one radix-select pass (childopt.masks);
* ``fisher_accumulate``: ``fisher[i] += (grads[i] * scales[i])**2``.

Element update, in fp32 (``g`` is the gradient), with the per-tensor scalars of
:data:`STEP_SCALAR_FIELDS` (one float64 row per tensor, rounded to fp32 once by every backend)::

    keep  = mask != 0                          (dense) | philox word < keep_threshold (bernoulli)
                                               | philox word < threshold(code) (importance)
    g     = g * grad_sign                      (-1 under maximize)
    g     = where(keep, g * grad_scale, 0)     unless freeze; under freeze, entries with
                                               keep == 0 keep p, m, v bit-identical
          (importance, zero-grad: g * scale(code), the level's scale in place of grad_scale)
    p     = p * decay_before
    m     = lerp(m, g, one_minus_beta1)        (torch.lerp's two-sided formula: lerp_from_start)
    v     = v * beta2 + one_minus_beta2 * g * g
    vmax  = max(vmax, v)                       (amsgrad; the denominator then uses vmax)
    p     = p - step_size * m / (sqrt(v) / bc2_sqrt + eps)
    p     = p * decay_after

``code`` is the element's uint8 entry of ``masks`` (importance: childopt.importance's level codes;
``threshold`` and ``scale`` are its arithmetic of the code, the same in every backend).  The Bernoulli and the
importance draw of element ``j`` use Philox4x32-10 with counter (rng_base + j // 4, step)
(childopt.philox); ``step`` and ``rng_base`` are columns of the tensor's row.
"""
from __future__ import annotations

import enum
import re
from dataclasses import astuple, dataclass, fields

import torch

NAMESPACES = {"native": "childopt", "triton": "childopt_triton", "reference": "childopt_reference"}


class MaskKind(enum.IntEnum):
    """How a bucket is masked; the integer is the ops' ``mask_kind`` (csrc: ``MaskKind``)."""

    NONE = 0
    DENSE = 1
    BERNOULLI = 2
    IMPORTANCE = 3

    @property
    def label(self) -> str:
        """The public name: ``"none"``, ``"dense"``, ``"bernoulli"`` or ``"importance"`` (``MaskedAdamW.mask_kind``)."""
        return self.name.lower()

    @property
    def draws(self) -> bool:
        """Whether the mask is drawn from the Philox stream each step (and so needs a seed)."""
        return self in (MaskKind.BERNOULLI, MaskKind.IMPORTANCE)

    @classmethod
    def from_label(cls, label: str) -> "MaskKind":
        return cls[label.upper()]


@dataclass(frozen=True)
class StepScalars:
    """The per-tensor scalars of one step, in the column order of the ops' ``scalars`` rows.

    csrc/include/childopt/step_scalars.h declares the same fields in the same order (a test
    compares them); the Triton kernels read columns by :data:`COLUMN`.
    """

    decay_before: float      # weight decay factor before the update (AdamW), else 1
    decay_after: float       # after it (ChildTuning's published order), else 1
    one_minus_beta1: float
    beta2: float
    one_minus_beta2: float
    eps: float
    step_size: float
    bc2_sqrt: float
    grad_scale: float        # 1 / reserve_p for a Bernoulli zero-grad mask, else 1
    grad_sign: float         # -1 under maximize, else 1
    lerp_from_start: float   # 1 when one_minus_beta1 < 0.5 (torch.lerp's formula), else 0
    step: float              # the step count after this step (the Philox counter's high half)
    rng_base: float          # the tensor's first Philox group (exact in float64 below 2**53)

    def rows(self, n: int, device=None) -> torch.Tensor:
        """``n`` identical rows (a float64 tensor [n, len(STEP_SCALAR_FIELDS)])."""
        return torch.tensor([astuple(self)] * n, dtype=torch.float64, device=device).reshape(n, NUM_STEP_SCALARS)


STEP_SCALAR_FIELDS = tuple(f.name for f in fields(StepScalars))
NUM_STEP_SCALARS = len(STEP_SCALAR_FIELDS)
COLUMN = {name: i for i, name in enumerate(STEP_SCALAR_FIELDS)}


@dataclass(frozen=True)
class MaskSpec:
    """The bucket-wide mask arguments: kind, freeze or zero-grad, and the Philox key."""

    kind: MaskKind = MaskKind.NONE
    freeze: bool = False
    keep_threshold: int = 1
    seed: int = 0

    @property
    def seed_words(self) -> tuple[int, int]:
        return self.seed & 0xFFFFFFFF, (self.seed >> 32) & 0xFFFFFFFF


SCHEMAS = {
    "adamw_step": (
        "(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, "
        "Tensor(d!)[] max_exp_avg_sqs, Tensor[] masks, Tensor scalars, int mask_kind, bool freeze, bool amsgrad, "
        "int keep_threshold, int seed_lo, int seed_hi) -> ()"
    ),
    "sparse_adamw_step": (
        "(Tensor(a!)[] params, Tensor[] grads, Tensor[] indices, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, "
        "Tensor(d!)[] max_exp_avg_sqs, Tensor scalars, bool amsgrad, bool compact_grads) -> ()"
    ),
    "fisher_accumulate": "(Tensor(a!)[] fisher, Tensor[] grads, Tensor scales) -> ()",
    "radix_histogram": "(Tensor[] scores, int[] scopes, Tensor prefixes, int shift, int bits, int n_scopes) -> Tensor",
}


def mutated_args(op: str) -> tuple[str, ...]:
    """The arguments ``op`` writes, read from their ``(x!)`` annotation in :data:`SCHEMAS`."""
    return tuple(re.findall(r"Tensor\([a-z]!\)(?:\[\])? (\w+)", SCHEMAS[op]))


def qualname(backend: str, op: str) -> str:
    return f"{NAMESPACES[backend]}::{op}"


def op_handle(backend: str, op: str):
    """``torch.ops.<namespace>.<op>``."""
    return getattr(getattr(torch.ops, NAMESPACES[backend]), op)


# ------------------------------------------------------------------------- fake kernels
def _fake_in_place(*args, **kwargs) -> None:
    """The in-place ops write only their arguments: nothing to allocate."""


def _fake_radix_histogram(scores, scopes, prefixes, shift, bits, n_scopes):
    return prefixes.new_empty((n_scopes, 2**bits), dtype=torch.int64)


_FAKES = {"adamw_step": _fake_in_place, "sparse_adamw_step": _fake_in_place,
          "fisher_accumulate": _fake_in_place, "radix_histogram": _fake_radix_histogram}

# The Library objects must stay alive for their definitions to stay registered.
_LIBRARIES = {backend: torch.library.Library(ns, "DEF") for backend, ns in NAMESPACES.items()}
for _backend in NAMESPACES:
    for _op, _schema in SCHEMAS.items():
        _LIBRARIES[_backend].define(_op + _schema)
        torch.library.register_fake(qualname(_backend, _op), _FAKES[_op], lib=_LIBRARIES[_backend])


def register(backend: str, op: str, device_types, fn) -> None:
    """Register ``fn`` as ``backend``'s implementation of ``op`` for ``device_types`` (None: all)."""
    torch.library.register_kernel(qualname(backend, op), device_types, fn, lib=_LIBRARIES[backend])
