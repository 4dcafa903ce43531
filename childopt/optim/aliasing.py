"""Whether parameters share memory: with themselves (an expanded view) or with each other (two
Parameters over one storage, or one listed twice).

The kernels write each element of a bucket once, in parallel chunks: an element reached twice
would be updated twice, racing.  Written here because torch exposes no overlap test between two
tensors (its private debug helper answers "too hard" for most strided views).  Layouts are
judged by their strides where a rule can (host arithmetic on int64 CPU tensors, whatever the
parameters' device or the default device): a *nested* layout (the dimensions sorted by stride,
each stride past the extent of the smaller ones) reaches each address once, and an address can
be tested against it by dividing by its strides; only layouts no rule judges enumerate offsets.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch._subclasses.fake_tensor import is_fake

from childopt.optim import sharding

CHUNK = 1 << 22  # addresses enumerated at a time: 32 MiB of int64


def _nested(dims: list) -> bool:
    """Whether (stride, size) pairs sorted by stride reach each address once by the quick rule."""
    extent = 1
    for stride, size in dims:
        if stride < extent:
            return False
        extent = stride * size
    return True


def _dims(t: torch.Tensor, unit: int) -> tuple[int, list]:
    """``t``'s first address and (stride, size) pairs in units of ``unit`` bytes, sorted by stride;
    an element wider than the unit is a last dimension of its bytes."""
    scale = t.element_size() // unit
    dims = [(stride * scale, size) for stride, size in zip(t.stride(), t.shape) if size > 1]
    if scale > 1:
        dims.append((1, scale))
    return t.storage_offset() * scale, sorted(dims)


def overlaps_itself(t: torch.Tensor) -> bool:
    """Whether two elements of ``t`` share memory (an expanded or overlapping strided alias)."""
    if t.is_contiguous() or t.numel() == 0:
        return False
    _, dims = _dims(t, t.element_size())
    if any(stride == 0 for stride, _ in dims):
        return True
    return not _nested(dims) and torch.unique(torch.cat(list(_addresses(t, t.element_size())))).numel() < t.numel()


def _addresses(t: torch.Tensor, unit: int):
    """``t``'s addresses in units of ``unit`` bytes, in pieces of at most :data:`CHUNK` (flat
    element ranges unravelled by the shape, so memory stays bounded whatever the layout)."""
    scale = t.element_size() // unit
    step = max(1, CHUNK // scale)
    for start in range(0, t.numel(), step):
        flat = torch.arange(start, min(start + step, t.numel()), dtype=torch.int64, device="cpu")
        offsets = torch.full_like(flat, t.storage_offset())
        for size, stride in zip(reversed(t.shape), reversed(t.stride())):
            offsets += flat.remainder(size) * stride
            flat = flat.div(size, rounding_mode="floor")
        yield (offsets.unsqueeze(-1) * scale + torch.arange(scale, device="cpu")).reshape(-1)


def _reaches(addresses: torch.Tensor, first: int, dims: list) -> bool:
    """Whether a nested layout starting at ``first`` reaches any of ``addresses``: each address
    divided by the strides, largest first, must give in-range indices and no remainder."""
    rest = addresses - first
    hit = rest >= 0
    for stride, size in reversed(dims):
        index = rest.div(stride, rounding_mode="floor")
        hit &= index < size
        rest = rest - index * stride
    return bool((hit & (rest == 0)).any())


def share_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two tensors of one storage, whose byte spans cross, have a byte in common."""
    if a.is_contiguous() and b.is_contiguous():
        return True  # each covers its whole span
    unit = a.element_size() if a.element_size() == b.element_size() else 1
    if b.numel() < a.numel():
        a, b = b, a  # enumerate the smaller one
    first, dims = _dims(b, unit)
    if not _nested(dims):
        first, dims = _dims(a, unit)
        a, b = b, a
    if _nested(dims):
        return any(_reaches(addresses, first, dims) for addresses in _addresses(a, unit))
    return any(bool(torch.isin(mine, theirs).any()) for mine in _addresses(a, unit) for theirs in _addresses(b, unit))


class MemorySpans:
    """The byte spans of the parameters an optimizer holds, by storage, so that a new group is
    checked against the same-storage parameters only (linear in the groups added, as torch is)."""

    def __init__(self):
        self._by_storage: dict[int, list] = {}

    @staticmethod
    def _span(p: torch.Tensor) -> Optional[tuple]:
        """(storage address, first byte, end byte, p); None for what holds no memory to share
        (empty, meta or fake tensors) or is left to its owner (DTensor shards)."""
        if p.numel() == 0 or p.device.type == "meta" or sharding.is_dtensor(p) or is_fake(p):
            return None
        size, offset = p.element_size(), p.storage_offset()
        last = offset + sum((n - 1) * stride for n, stride in zip(p.shape, p.stride()))
        return p.data_ptr() - offset * size, offset * size, (last + 1) * size, p

    @classmethod
    def _by_storage_of(cls, params: list) -> dict[int, list]:
        spans: dict[int, list] = {}
        for span in filter(None, map(cls._span, params)):
            spans.setdefault(span[0], []).append(span)
        return spans

    def check(self, params: list, describe: Callable[[torch.Tensor], str]) -> None:
        """Refuse ``params`` if one shares an element with another of them or with one remembered.

        The remembered spans of a storage a new parameter uses are read again first: a parameter
        whose ``.data`` was replaced since (``model.to(dtype)``) left its old address free for a
        new one.  One moved into a new parameter's storage from elsewhere is not seen (reading
        every held parameter at each added group would make adding groups quadratic).
        """
        new = self._by_storage_of(params)
        for storage in new:
            self._refresh(storage)
        for storage, spans in new.items():
            fresh = {id(span) for span in spans}
            open_spans = []
            for span in sorted(self._by_storage.get(storage, []) + spans, key=lambda s: s[1]):
                open_spans = [other for other in open_spans if other[2] > span[1]]
                for other in open_spans:
                    if id(other) in fresh or id(span) in fresh:
                        _refuse_shared(other[3], span[3], describe)
                open_spans.append(span)

    def _refresh(self, storage: int) -> None:
        """Re-read the remembered spans of ``storage``; move those whose parameter moved."""
        for span in self._by_storage.pop(storage, []):
            current = self._span(span[3])
            if current is not None:
                self._by_storage.setdefault(current[0], []).append(current)

    def remember(self, params: list) -> None:
        """Hold ``params`` (checked) for the checks of groups added later."""
        for storage, spans in self._by_storage_of(params).items():
            self._by_storage.setdefault(storage, []).extend(spans)


def _refuse_shared(a: torch.Tensor, b: torch.Tensor, describe) -> None:
    if a is b:
        raise RuntimeError(f"{describe(b)} is listed twice: it would be stepped twice, racing with itself")
    if share_memory(a, b):
        raise RuntimeError(f"{describe(a)} and {describe(b)} share memory (two Parameters over one storage): "
                           "their updates would race; tie weights by sharing one Parameter, or give each its own "
                           "storage (e.g. .clone())")
