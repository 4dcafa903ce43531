"""Sparse-index storage: the selected entries of a parameter and their compact state.

A parameter with a fixed mask stores sorted flat indices of its selected entries (int32, int64
past 2**31 elements) and fp32 moments of the same length: 12 bytes per selected entry instead of
8 per element.  This module holds the pure pieces: indices from masks, moving state between the
dense and compact layouts, and the gradient hooks that keep only compact gradients.
"""
from __future__ import annotations

import weakref
from typing import Callable

import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook
from torch.utils.weak import WeakIdKeyDictionary

from childopt import user_warning

INT32_LIMIT = 2**31


def index_dtype(numel: int) -> torch.dtype:
    """int32 while every flat index fits, else int64."""
    return torch.int32 if numel < INT32_LIMIT else torch.int64


def indices_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """Sorted flat indices of the True entries of a bool mask, in the narrowest safe dtype."""
    return torch.nonzero(mask.reshape(-1)).reshape(-1).to(index_dtype(mask.numel()))


def check_indices(indices: torch.Tensor, numel: int, what: str) -> None:
    """Raise unless ``indices`` are 1-D, integer, strictly increasing and inside ``[0, numel)``."""
    if indices.dim() != 1 or indices.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{what}: indices must be a 1-D int32/int64 tensor, got {indices.dtype} "
                         f"of shape {tuple(indices.shape)}")
    if indices.numel() and (int(indices[0]) < 0 or int(indices[-1]) >= numel
                            or not bool((indices[1:] > indices[:-1]).all())):
        raise ValueError(f"{what}: indices must be strictly increasing and inside [0, {numel})")


def gather(dense: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """The compact copy of ``dense`` at ``indices``."""
    return dense.reshape(-1).index_select(0, indices)


def scatter(compact: torch.Tensor, indices: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """A dense tensor of ``shape``: zeros, with ``compact`` at ``indices``."""
    dense = torch.zeros(shape.numel(), dtype=compact.dtype, device=compact.device)
    return dense.index_copy_(0, indices.long(), compact).view(shape)


def remap(compact: torch.Tensor, old: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """Compact values moved from index set ``old`` to ``new``: kept where both hold an entry, else 0."""
    result = torch.zeros(new.numel(), dtype=compact.dtype, device=compact.device)
    if old.numel() == 0 or new.numel() == 0:
        return result
    pos = torch.searchsorted(old.long(), new.long()).clamp_(max=old.numel() - 1)
    shared = old.long()[pos] == new.long()
    result[shared] = compact[pos[shared]]
    return result


def gradient_of(param: torch.Tensor, compact: "CompactGradients | None", describe) -> torch.Tensor | None:
    """The gradient a step uses: ``param``'s compact buffer when hooked, else ``param.grad``.

    Refuses a sparse gradient, or a dense ``.grad`` beside a compact one (``describe(param)``
    names the parameter in the message).
    """
    buffer = compact.buffers.get(param) if compact is not None else None
    grad = param.grad
    if buffer is None:
        if grad is None:  # skipped, unless another optimizer took it
            if param.requires_grad and _live_owner(param) not in (None, compact):
                raise RuntimeError(f"the gradients of {describe(param)} go to another optimizer built with "
                                   "compact_grads=True, which hooks this parameter (the one built or loaded last "
                                   "takes the hook): step that one, or call its release_gradients() to step this one")
            return None
        if grad.is_sparse:
            raise RuntimeError(f"childopt does not support sparse gradients ({describe(param)}); use dense "
                               "gradients, e.g. nn.Embedding(sparse=False)")
        return grad
    if grad is not None:
        raise RuntimeError(f"{describe(param)} has both a .grad ({grad.layout}) and a compact gradient; with "
                           "compact_grads=True gradients come from backward (set .grad only without it).  "
                           "Under DDP, which writes the dense .grad after its all-reduce: leave the model "
                           "unwrapped and call childopt.ddp.all_reduce_gradients(opt) between backward and step")
    return buffer


# parameter -> weak reference to the CompactGradients whose hook takes its gradients.  Keyed by
# identity, weakly (torch.utils.weak: a WeakKeyDictionary would compare tensors with ==).
_OWNERS = WeakIdKeyDictionary()
_GUARD: list = []  # the handle of the global optimizer hook below, once registered


def _live_owner(param: torch.Tensor) -> "CompactGradients | None":
    """The live CompactGradients whose hook takes ``param``'s gradients, or None."""
    owner = _OWNERS.get(param)
    return owner() if owner is not None else None


def _refuse_hooked_parameters(optimizer: torch.optim.Optimizer, args, kwargs) -> None:
    """A step pre-hook of every torch optimizer: one that is not a MaskedAdamW (which checks in
    :func:`gradient_of`) and would step a parameter whose ``.grad`` a live compact-gradient hook
    takes would skip it without a word; it raises instead.  Costs nothing while no hook lives.
    Eager steps only: traced, its weak dictionary breaks the graph of every compiled optimizer
    step (torch's too, from the first compact-gradient optimizer of the process on)."""
    if torch.compiler.is_compiling() or hasattr(optimizer, "release_gradients") or not _OWNERS:
        return
    for group in optimizer.param_groups:
        for param in group["params"]:
            if param.grad is None and param.requires_grad and _live_owner(param) is not None:
                raise RuntimeError(f"{type(optimizer).__name__} would skip a parameter of shape {tuple(param.shape)}: "
                                   "a MaskedAdamW with compact_grads=True takes its gradients (its hook frees "
                                   ".grad in backward).  Call that optimizer's release_gradients() first")


class CompactGradients:
    """Keeps only ``grad[indices]`` of the registered parameters, freeing each dense gradient.

    A post-accumulate-grad hook gathers the selected entries into a compact buffer (adding to it
    across micro-batches, in the gradient's dtype, as dense accumulation would) and sets
    ``p.grad = None`` at once, so the dense gradients of the model never live together.  The
    hook holds this object weakly and this object holds ``indices_of`` (the optimizer's bound
    method) weakly: parameters do not keep an optimizer alive, and a dropped optimizer is freed
    at once, without waiting for the cycle collector.

    One live owner per parameter: registering a parameter another live instance hooks takes the
    hook from it (a rebuilt optimizer while the old one is still referenced, e.g. by a Trainer).
    While it holds the hook, any other MaskedAdamW refuses to step that parameter
    (:func:`gradient_of`) instead of finding no gradient and skipping it.
    """

    def __init__(self, indices_of: Callable[[torch.Tensor], torch.Tensor]):
        self._indices_of = weakref.WeakMethod(indices_of)
        self.buffers: dict = {}
        self._handles: dict = {}
        self._stepped = False  # buffers were consumed by a step and not zeroed since
        self._warned = False

    def register(self, param: torch.Tensor) -> None:
        """Hook ``param`` (a frozen parameter never gets a gradient: nothing to hook)."""
        if param.requires_grad and param not in self._handles:
            previous = _live_owner(param)
            if previous is not None and previous is not self:
                previous.unregister(param)
            self._handles[param] = param.register_post_accumulate_grad_hook(_hook(weakref.ref(self)))
            _OWNERS[param] = weakref.ref(self)
            if not _GUARD:
                _GUARD.append(register_optimizer_step_pre_hook(_refuse_hooked_parameters))

    def unregister(self, param: torch.Tensor) -> None:
        handle = self._handles.pop(param, None)
        if handle is not None:
            handle.remove()
            if _live_owner(param) is self:
                del _OWNERS[param]
        self.buffers.pop(param, None)

    def unregister_all(self) -> None:
        for param in self.registered():
            self.unregister(param)

    def registered(self) -> list:
        return list(self._handles)

    def accumulate(self, param: torch.Tensor) -> None:
        selected = gather(param.grad, self._indices_of()(param))
        buffer = self.buffers.get(param)
        if buffer is None:
            self.buffers[param] = selected
        else:
            if self._stepped and not self._warned:
                self._warned = True
                user_warning.warn("compact gradients are adding onto those of an earlier step: call "
                                  "optimizer.zero_grad() between steps (model.zero_grad() does not clear them)")
            buffer.add_(selected)
        param.grad = None

    def mark_stepped(self) -> None:
        """A step consumed the buffers; accumulating into them again before zero() is suspicious."""
        self._stepped = bool(self.buffers)

    def zero(self, set_to_none: bool) -> None:
        self._stepped = False
        if set_to_none:
            self.buffers.clear()
        else:
            for buffer in self.buffers.values():
                buffer.zero_()


def _hook(owner: weakref.ref):
    # Eager always: a backward that a compiled training step leaves to eager (its graph breaks at
    # backward()) still has dynamo watching each Python frame it calls, and this hook's weak
    # references are not traceable, so every call would count graph breaks of its own.
    @torch.compiler.disable
    def hook(param: torch.Tensor) -> None:
        compact = owner()
        if compact is not None:
            compact.accumulate(param)

    return hook
