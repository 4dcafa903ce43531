"""Checks of the optimizers' arguments, with messages that name the parameter and the range.

Shared by the constructors, ``add_param_group`` and ``load_state_dict``, so a value is judged
the same way wherever it comes from.
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Mapping

import torch

from childopt.optim import aliasing, sharding

MASKED_MODES = ("freeze", "zero_grad")
STORAGES = ("dense", "sparse")
STEPPED_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def check_number(value, name: str, where: str = "", *, low: float, high: float = math.inf,
                 low_open: bool = False, high_open: bool = False, read_tensor: bool = True) -> float:
    """``value`` as a float, or a clear error when it is not a number in the interval.

    A one-element tensor is read on the host unless ``read_tensor`` is False (the per-step
    check: reading a device tensor would synchronise, and break a CUDA graph or a compiled graph).
    """
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.dtype.is_complex or value.dtype == torch.bool:
            raise TypeError(f"{name}{where} must be a number or a one-element real tensor, "
                            f"got a tensor of shape {tuple(value.shape)} and dtype {value.dtype}")
        if not read_tensor:
            return math.nan
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):  # numpy scalars are Real too
        raise TypeError(f"{name}{where} must be a number, got {type(value).__name__}")
    value = float(value)
    below = value <= low if low_open else value < low
    above = value >= high if high_open else value > high
    if below or above or math.isnan(value):
        interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        raise ValueError(f"{name}{where} must be in {interval}, got {value}")
    return float(value)


def check_bool(value, name: str, *, none_ok: bool = False) -> None:
    """Raise unless ``value`` is a bool (or None where ``none_ok``): a truthy stand-in such as
    ``"no"`` or ``1`` must not quietly turn an option on."""
    if not (isinstance(value, bool) or (none_ok and value is None)):
        raise TypeError(f"{name} must be {'None or ' if none_ok else ''}a bool, got {value!r}")


def check_arguments(defaults: Mapping, storage: str, compact_grads) -> None:
    """The constructor's checks: hyper-parameters, torch's flags, storage."""
    check_storage(storage, compact_grads)
    check_group(defaults, "", storage)
    check_torch_flags(defaults["foreach"], defaults["fused"], defaults["capturable"], defaults["differentiable"])


def check_group(group: Mapping, where: str = "", storage: str = "dense", *, at_step: bool = False) -> None:
    """Raise a clear error for any hyper-parameter of ``group`` that is out of range (or storage).

    ``at_step``: the check ``step()`` makes of groups the user may have edited since; it does
    not read tensor hyper-parameters (see :func:`check_number`).
    """
    read = not at_step
    finite = dict(low=0.0, high_open=True, read_tensor=read)  # [0, inf): inf or NaN would poison the weights
    check_number(group["lr"], "lr", where, **finite)
    check_number(group["eps"], "eps", where, **finite)
    check_number(group["weight_decay"], "weight_decay", where, **finite)
    check_number(group["reserve_p"], "reserve_p", where, low=0.0, high=1.0, low_open=True, read_tensor=read)
    betas = group["betas"]
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"betas{where} must be a pair (beta1, beta2), got {betas!r}")
    for i, beta in enumerate(betas):
        check_number(beta, f"betas[{i}]", where, low=0.0, high=1.0, high_open=True, read_tensor=read)
    if group["masked"] is not None and group["masked"] not in MASKED_MODES:
        raise ValueError(f"masked{where} must be one of {MASKED_MODES} (or None), got {group['masked']!r}")
    for flag in ("amsgrad", "maximize"):
        check_bool(group[flag], f"{flag}{where}")
    if storage == "sparse" and group["masked"] == "zero_grad":
        raise ValueError(f"masked='zero_grad'{where} needs state for every entry; storage='sparse' "
                         "keeps only the selected ones (use masked='freeze')")


def check_params(params: list, describe) -> None:
    """Refuse parameters the update is not defined for: complex or non-floating, or self-overlapping.

    torch's AdamW steps a complex parameter as real pairs; childopt's masks, Bernoulli counters
    and sparse indices address real elements, so a complex parameter is refused rather than
    silently losing its imaginary part in a cast.
    """
    for p in params:
        if hasattr(p, "ds_id") or hasattr(p, "ds_tensor"):
            raise TypeError(f"{describe(p)} is partitioned by DeepSpeed ZeRO-3, whose flat partitions no mask or "
                            "Bernoulli counter can address; shard with FSDP2 (torch.distributed.fsdp.fully_shard), "
                            "which childopt supports")
        if p.dtype not in STEPPED_DTYPES:
            hint = (" (view it as real pairs, e.g. register torch.view_as_real(p) as the parameter, or "
                    "use torch.optim.AdamW)" if p.dtype.is_complex else "")
            raise TypeError(f"{describe(p)} has dtype {p.dtype}; MaskedAdamW steps "
                            f"{', '.join(str(d) for d in STEPPED_DTYPES)} parameters{hint}")
        _check_own_memory(p, describe)


def _check_own_memory(p: torch.Tensor, describe) -> None:
    if aliasing.overlaps_itself(p):
        raise RuntimeError(f"{describe(p)} has memory shared between its elements (an expanded or "
                           f"overlapping view, strides {p.stride()}): an update cannot write each element "
                           "on its own; make it a parameter with its own storage (e.g. .clone())")


def check_steppable(params: list, grads: list, describe, sharded: bool, shapes: Mapping) -> None:
    """Everything a step could fail on partway, checked before the first tensor is written.

    ``sharded``: some parameters are DTensors (else only a DTensor gradient needs a look);
    ``shapes``: each parameter's shape when the optimizer numbered it, which its state, masks,
    sparse indices and Bernoulli counters were made for.
    """
    for p, g in zip(params, grads):
        # p.data may have been replaced since construction; a contiguous one cannot overlap itself
        # (overlaps_itself's first test, asked here to save two calls per tensor on every step)
        if not p.is_contiguous():
            _check_own_memory(p, describe)
        if g.layout != torch.strided:
            raise RuntimeError(f"{describe(p)} has a {g.layout} gradient; childopt steps dense gradients")
        if sharded or (type(g) is not torch.Tensor and isinstance(g, sharding.DTENSOR)):
            sharding.check_gradient(p, g, describe)
        if p.shape != shapes[p]:
            raise RuntimeError(f"{describe(p)} was given to the optimizer with shape {tuple(shapes[p])}; its .data "
                               f"now has shape {tuple(p.shape)}, which its state, masks and indices do not fit. "
                               "Give the optimizer the new parameter (a new optimizer, or add_param_group for a "
                               "new tensor)")


def check_eps_divides(eps, where: str) -> None:
    """Refuse ``eps == 0`` where gradients are masked to zero: a masked-out entry's moments are
    zero, and ``0 / (sqrt(0) + 0)`` writes NaN into its weight (a tensor ``eps`` is read, as the step reads it)."""
    if float(eps) == 0:
        raise ValueError(f"eps=0{where} with masked='zero_grad' and a mask: an entry whose gradient is masked "
                         "out has zero moments, and 0 / (sqrt(0) + eps) would write NaN into the weights; use "
                         "eps > 0 or masked='freeze'")


def check_numbered(params: list, numbered: dict, group_index: int) -> None:
    """Refuse a group whose parameters were swapped after construction (DeepSpeed ZeRO does this).

    ZeRO-1/2 replace ``param_groups[i]["params"]`` by flat fp32 partitions: masks and Philox
    ranges keyed by the original parameters would match nothing, and the step would silently
    train every entry.
    """
    for p in params:
        if p not in numbered:
            raise RuntimeError(
                f"param group {group_index} holds a tensor of shape {tuple(p.shape)} that was not given to this "
                "optimizer (were its params replaced, as DeepSpeed ZeRO does with flat partitions?): its masks "
                "and Bernoulli counters would match nothing; shard with FSDP2 (torch.distributed.fsdp."
                "fully_shard), which childopt supports, or use add_param_group for new parameters")


def check_torch_flags(foreach, fused, capturable, differentiable) -> None:
    """torch.optim.AdamW's implementation flags: types, and the combinations torch refuses."""
    check_bool(foreach, "foreach", none_ok=True)
    check_bool(fused, "fused", none_ok=True)
    check_bool(capturable, "capturable")
    check_bool(differentiable, "differentiable")
    if fused and foreach:
        raise ValueError("fused=True and foreach=True cannot be set together (as in torch.optim.AdamW)")
    if differentiable:
        raise ValueError("differentiable=True is not supported: the childopt kernels update the parameters in "
                         "place without an autograd formula; use torch.optim.AdamW(differentiable=True) to "
                         "differentiate through a step")


def backend_for_flags(backend: str, foreach, fused) -> tuple[str, tuple]:
    """Map torch's ``foreach``/``fused`` onto a backend request: (backend, backends auto must skip).

    ``fused=True`` asks for a fused kernel: ``auto`` then never settles for the reference
    backend, and naming the reference is an error.  ``foreach=False`` or ``fused=False`` ask
    for the one-tensor-at-a-time implementation, which is the reference backend.
    """
    if fused:
        if backend == "reference":
            raise ValueError("fused=True needs a kernel backend ('auto', 'native' or 'triton'), got backend='reference'")
        return backend, ("reference",)
    if foreach is False or fused is False:
        if backend not in ("auto", "reference"):
            raise ValueError(f"foreach=False / fused=False select the one-tensor-at-a-time reference backend; "
                             f"they contradict backend={backend!r}")
        return "reference", ()
    return backend, ()


def check_storage(storage: str, compact_grads) -> None:
    if storage not in STORAGES:
        raise ValueError(f"storage must be one of {STORAGES}, got {storage!r}")
    check_bool(compact_grads, "compact_grads")
    if compact_grads and storage != "sparse":
        raise ValueError("compact_grads=True needs storage='sparse' (it keeps only the selected entries)")


def check_no_grad_scaler(optimizer) -> None:
    """Compact gradients cannot run under a GradScaler, which unscales and checks only ``.grad``."""
    if getattr(optimizer, "grad_scale", None) is not None or getattr(optimizer, "found_inf", None) is not None:
        raise RuntimeError("compact_grads=True cannot run under torch.amp.GradScaler: it unscales and checks "
                           "only .grad, which the compact gradients replace; use bf16 autocast (no scaler) or "
                           "compact_grads=False")
