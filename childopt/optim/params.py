"""Naming parameters in messages and resolving user masks onto the optimizer's parameters."""
from __future__ import annotations

from collections.abc import Mapping

import torch

from childopt import user_warning
from childopt.backends.contract import MaskKind
from childopt.optim import sharding
from childopt.optim.importance_mask import Importance


def parse_mask(param_groups: list, mask) -> tuple[MaskKind, dict]:
    """The kind of a ``mask=`` argument and its per-parameter masks (a dict), or its Importance config."""
    if mask is None:
        return MaskKind.NONE, {}
    if isinstance(mask, Importance):
        _warn_if_every_entry_kept(param_groups, "mask=Importance(...)")
        return MaskKind.IMPORTANCE, mask
    if isinstance(mask, str):
        if mask not in (MaskKind.IMPORTANCE.label, MaskKind.BERNOULLI.label):
            raise ValueError(f"mask must be None, 'bernoulli', 'importance', an Importance or a dict of bool tensors, "
                             f"got {mask!r}")
        _warn_if_every_entry_kept(param_groups, f"mask={mask!r}")
        if mask == MaskKind.IMPORTANCE.label:
            return MaskKind.IMPORTANCE, Importance()
        return MaskKind.BERNOULLI, {}
    if isinstance(mask, Mapping):
        return MaskKind.DENSE, resolve_masks(param_groups, mask)
    raise TypeError(f"mask must be None, 'bernoulli', 'importance', an Importance or a dict of bool tensors, "
                    f"got {type(mask).__name__}")


def _warn_if_every_entry_kept(param_groups: list, given: str) -> None:
    """A drawn mask keeps ``reserve_p`` of the entries: at 1.0 in every group it keeps them all."""
    if all(g["reserve_p"] == 1.0 for g in param_groups):
        user_warning.warn(f"{given} with reserve_p=1.0 in every group keeps every entry: this trains like plain "
                          "AdamW; pass reserve_p < 1")


def describe(param_groups: list, param: torch.Tensor) -> str:
    """How a message names ``param``: by its name when named parameters were given."""
    for gi, group in enumerate(param_groups):
        for pi, p in enumerate(group["params"]):
            if p is param:
                if "param_names" in group:
                    return f"parameter {group['param_names'][pi]!r}"
                return f"param_groups[{gi}]['params'][{pi}] (shape {tuple(p.shape)})"
    return f"a tensor of shape {tuple(param.shape)}"


SHARED_NAME = ("a name that several parameters of this optimizer have (param groups built from submodules' "
               "named_parameters() can repeat one): key them by the parameters, or name them apart (one "
               "model.named_parameters() split into groups)")


def parameters_by_name(param_groups: list) -> dict:
    """name -> parameter over every group's ``param_names``; a name that two parameters share maps to
    None, so that whoever looks it up can refuse it instead of picking one."""
    named: dict = {}
    for group in param_groups:
        for name, p in zip(group.get("param_names", ()), group["params"]):
            named[name] = p if named.get(name, p) is p else None
    return named


def resolve_masks(param_groups: list, mask: Mapping) -> dict:
    """``mask`` (parameter or name -> bool tensor) as parameter -> contiguous mask on its device."""
    return resolve_entries(param_groups, mask, "mask", check_mask)


def resolve_entries(param_groups: list, entries: Mapping, what: str, check) -> dict:
    """``entries`` (parameter or name -> tensor of its shape) as parameter -> contiguous tensor on its device.

    ``check(value, param, label)`` judges each value (raising with ``what`` in the message);
    a DTensor parameter keeps its shard of a full value.
    """
    held = {id(p): p for g in param_groups for p in g["params"]}
    named = parameters_by_name(param_groups)
    resolved = {}
    for key, value in entries.items():
        if isinstance(key, str):
            if key not in named:
                hint = "" if named else " (pass model.named_parameters() to address parameters by name)"
                raise ValueError(f"{what} has an entry for {key!r}, which is not a parameter of this optimizer{hint}")
            if named[key] is None:
                raise ValueError(f"{what} has an entry for {key!r}, {SHARED_NAME}")
            param, label = named[key], f"parameter {key!r}"
        elif isinstance(key, torch.Tensor):
            if id(key) not in held:
                raise ValueError(f"{what} has an entry for a tensor of shape {tuple(key.shape)} "
                                 "that is not a parameter of this optimizer")
            param, label = key, describe(param_groups, key)
        else:
            raise TypeError(f"{what} keys must be parameters or parameter names, got {type(key).__name__}")
        check(value, param, label)
        if param in resolved:
            raise ValueError(f"{what} has two entries for {label}")
        if sharding.is_dtensor(param):
            resolved[param] = sharding.shard_like(value.detach(), param, label)
        elif sharding.is_dtensor(value):
            raise TypeError(f"{what} for {label} is a DTensor but the parameter is a plain tensor; pass a plain "
                            "tensor of its shape")
        else:
            resolved[param] = value.detach().to(device=param.device, copy=True).contiguous()
    return resolved


def check_mask(value, param: torch.Tensor, label: str) -> None:
    """Raise unless ``value`` is a bool tensor of ``param``'s shape that holds values."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"mask for {label} must be a bool tensor, got {type(value).__name__}")
    if value.dtype != torch.bool:
        raise TypeError(f"mask for {label} has dtype {value.dtype}, expected torch.bool")
    if value.device.type == "meta":
        raise ValueError(f"mask for {label} is on the meta device, which holds no values; "
                         "build the mask on a real device (e.g. after the model is materialised)")
    if value.shape != param.shape:
        raise ValueError(f"mask for {label} has shape {tuple(value.shape)}, "
                         f"expected the parameter's shape {tuple(param.shape)}")
