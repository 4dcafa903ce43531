"""Per-head and per-layer quantities of a child network: Fisher importance, the child network's share,
and how far fine-tuning moved the weights.

Each function sums a per-entry quantity with a :class:`~childopt.analysis.layout.HeadLayout` and
returns :class:`HeadValues`, one number per (layer, head) and one per layer for the rest of it:

* :func:`fisher_importance`: the sum of the Fisher scores (as from
  :class:`childopt.fisher.FisherAccumulator` or :func:`childopt.fisher.fisher_scores`);
* :func:`child_share`: the kept fraction of a fixed mask (a bool mask dict, or a
  :class:`childopt.MaskedAdamW`'s masks or sparse indices); entries without a mask count as kept,
  as MaskedAdamW trains them fully, except that an optimizer's share counts the parameters it does not
  train (not held, or frozen) as not kept;
* :func:`update_norms` / :func:`delta_norms`: the L2 norm of ``tuned - base`` over each head's entries,
  from two state dicts or from a :class:`childopt.deltas.SparseDelta`.

Every tensor is checked against the model's parameters first; a wrong name or shape raises a
ValueError naming the parameter and what was expected, so a mask or state dict of another model
cannot be summed into plausible numbers.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Optional, Union

import torch

from childopt.analysis.layout import HeadLayout
from childopt.deltas import SparseDelta
from childopt.optim import MaskedAdamW
from childopt.sparse import scatter

FISHER, SHARE, UPDATE = "fisher", "share", "update_norm"
QUANTITIES = {  # name -> what it is, in the order reports list them
    FISHER: "Fisher importance (sum of scores)",
    SHARE: "child-network share (kept fraction)",
    UPDATE: "update norm ||tuned - base||",
}


@dataclass(frozen=True)
class HeadValues:
    """One quantity: ``heads[layer, head]`` and ``other[layer]`` (the layer's parameters outside the heads)."""

    heads: torch.Tensor  # float64 [num_layers, num_heads]
    other: torch.Tensor  # float64 [num_layers]

    def __post_init__(self):
        if self.heads.dim() != 2 or self.other.shape != self.heads.shape[:1]:
            raise ValueError(f"HeadValues: expected heads [layers, heads] and other [layers], got "
                             f"{tuple(self.heads.shape)} and {tuple(self.other.shape)}")


def _checked(layout: HeadLayout, tensors: Mapping[str, torch.Tensor], what: str) -> Mapping[str, torch.Tensor]:
    """``tensors`` after checking that each names a parameter of the model and has its shape."""
    for name, tensor in tensors.items():
        expected = layout.expected_shape(name)
        if tuple(tensor.shape) != expected:
            raise ValueError(f"{name!r}: {what} has shape {tuple(tensor.shape)}, expected {expected} (the "
                             "parameter's shape)")
    return tensors


def fisher_importance(layout: HeadLayout, scores: Mapping[str, torch.Tensor]) -> HeadValues:
    """Sum of the Fisher scores (name -> tensor of the parameter's shape) per head and per layer.

    Parameters without a score count 0 (FisherAccumulator scores what ``include`` selects).
    """
    return HeadValues(*layout.reduce(_checked(layout, scores, "the Fisher scores").items()))


def kept_entries(optimizer: torch.optim.Optimizer, param: torch.Tensor) -> Optional[torch.Tensor]:
    """The bool mask of ``param``'s trained entries under a fixed mask (dense masks or sparse indices of
    a MaskedAdamW), or None when it has none."""
    state = optimizer.state.get(param, {})
    if "mask" in state:
        return state["mask"]
    if "indices" in state:
        flat = torch.zeros(param.numel(), dtype=torch.bool, device=param.device)
        return flat.index_fill_(0, state["indices"].long(), True).view_as(param)
    return None


def _named_parameters(optimizer: MaskedAdamW) -> dict[str, torch.Tensor]:
    """name -> parameter of every parameter a MaskedAdamW with a fixed mask (or none) holds.

    Raises:
        ValueError: the optimizer's mask is not fixed (Bernoulli and importance masks change every
            step), or it was built without parameter names.
    """
    if not isinstance(optimizer, MaskedAdamW):
        raise TypeError(f"expected a MaskedAdamW or a dict of bool masks, got {type(optimizer).__name__}")
    if optimizer.mask_kind not in ("dense", "none"):
        raise ValueError(f"the optimizer's mask is {optimizer.mask_kind!r}; a child-network share needs a fixed "
                         "mask (a dict, as Child-Tuning-D's), since a Bernoulli or importance mask changes every step")
    named = {}
    for group in optimizer.param_groups:
        if "param_names" not in group:
            raise ValueError("the optimizer's parameters have no names: build it from model.named_parameters()")
        named.update(zip(group["param_names"], group["params"]))
    return named


def optimizer_masks(optimizer: MaskedAdamW) -> dict[str, torch.Tensor]:
    """name -> bool mask of every parameter a MaskedAdamW with a fixed mask holds one for.

    Raises:
        ValueError: the optimizer's mask is not fixed, or it was built without parameter names.
    """
    named = _named_parameters(optimizer)
    return {name: keep for name, param in named.items() if (keep := kept_entries(optimizer, param)) is not None}


def _trained_entries(optimizer: MaskedAdamW) -> dict[str, torch.Tensor]:
    """name -> bool mask of the entries a MaskedAdamW with a fixed mask trains, for each parameter it holds:
    its mask; every entry when it has none; no entry when the parameter does not require grad (it never
    gets a gradient, so the optimizer never steps it)."""
    trained = {}
    for name, param in _named_parameters(optimizer).items():
        keep = kept_entries(optimizer, param) if param.requires_grad else None
        trained[name] = keep if keep is not None else torch.full(param.shape, param.requires_grad)
    return trained


def child_share(layout: HeadLayout, masks: Union[Mapping[str, torch.Tensor], MaskedAdamW]) -> HeadValues:
    """Kept fraction of each head's and each layer's other entries under a fixed mask.

    ``masks`` is name -> bool tensor of the parameter's shape, where parameters without a mask count as
    fully kept (MaskedAdamW trains them fully); or a MaskedAdamW with a fixed mask (or none: every entry it
    trains is kept), whose parameters without a mask count as fully kept too, but whose untrained ones (not
    held by it, e.g. frozen and left out, or not requiring grad) count as not kept: the share is what
    receives gradient (under ``masked="zero_grad"``, weight decay still moves the other entries).
    """
    absent_kept = isinstance(masks, Mapping)  # an optimizer's dict names every parameter it trains
    if not absent_kept:
        masks = _trained_entries(masks)
    for name, mask in _checked(layout, masks, "the mask").items():
        if mask.dtype != torch.bool:
            raise ValueError(f"{name!r}: the mask must be a bool tensor, got {mask.dtype}")
    names = layout.layer_parameters()
    kept, kept_other = layout.reduce((n, masks[n] if n in masks else torch.full(layout.shapes[n], absent_kept))
                                     for n in names)
    total, total_other = layout.reduce((n, torch.ones(layout.shapes[n])) for n in names)
    return HeadValues(kept / total, kept_other / total_other)


def _lookup(tensors: Mapping[str, torch.Tensor], name: str, expected: tuple, what: str) -> torch.Tensor:
    if name not in tensors:
        raise ValueError(f"{what} has no {name!r} (expected a tensor of shape {expected}); is it of another "
                         "architecture, or a LoRA model not merged (peft: merge_and_unload())?")
    tensor = tensors[name]
    if tuple(tensor.shape) != expected:
        raise ValueError(f"{name!r}: {what} has shape {tuple(tensor.shape)}, expected {expected} (the base "
                         "model's)")
    return tensor


def total_norm(values: HeadValues) -> float:
    """The L2 norm over every entry of the layers, from norms by part (heads and others)."""
    return float(values.heads.square().sum() + values.other.square().sum()) ** 0.5


def _norms(layout: HeadLayout, squares: Iterable[tuple[str, torch.Tensor]]) -> HeadValues:
    heads, other = layout.reduce(squares)
    return HeadValues(heads.sqrt(), other.sqrt())


def update_norms(layout: HeadLayout, base: Mapping[str, torch.Tensor],
                 tuned: Mapping[str, torch.Tensor]) -> HeadValues:
    """L2 norm of ``tuned - base`` (computed in float64) over each head's and each layer's other entries.

    ``base`` and ``tuned`` are name -> tensor mappings (``state_dict()``, ``dict(named_parameters())``)
    of the model the layout describes; each may live on any device.

    Raises:
        ValueError: either lacks a parameter of the layers or has it in another shape, or ``tuned``
            has a layer parameter the model lacks (a state dict of another architecture).
    """
    pairs = {n: (_lookup(base, n, layout.shapes[n], "the base state dict"),
                 _lookup(tuned, n, layout.shapes[n], "the fine-tuned state dict")) for n in layout.layer_parameters()}
    unknown = [name for name in tuned if layout.place(name) is not None and name not in layout.shapes]
    if unknown:
        raise ValueError(f"the fine-tuned state dict has {unknown[0]!r}, which the base model lacks; is it of "
                         "another architecture?")
    return _norms(layout, ((n, (t.double() - b.to(t.device).double()).square()) for n, (b, t) in pairs.items()))


def delta_norms(layout: HeadLayout, delta: SparseDelta) -> HeadValues:
    """:func:`update_norms` of the change a :class:`~childopt.deltas.SparseDelta` stores (no base needed).

    Raises:
        ValueError: an entry names a parameter the model lacks, or has another shape.
    """
    for name, entry in delta.entries.items():
        if tuple(entry.shape) != layout.expected_shape(name):
            raise ValueError(f"{name!r}: the delta has shape {tuple(entry.shape)}, expected "
                             f"{layout.shapes[name]} (the parameter's shape)")
    return _norms(layout, ((name, scatter(entry.values.double().square(), entry.indices,
                                          torch.Size(entry.shape)))
                           for name, entry in delta.entries.items()))
