"""One tensor's sparse delta: the :class:`DeltaEntry` type and the arithmetic on a single entry.

:mod:`childopt.deltas` builds a :class:`~childopt.deltas.SparseDelta` from these pieces: the
exact difference ``tuned - base`` at given indices (:func:`difference`), adding an entry to a
tensor in place (:func:`add_at`), the weighted sum of one tensor's entries from several deltas
(:func:`merge_entries`), and the checks an entry must pass on its own.  Nothing here knows of
names of other tensors, files or modules.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from childopt import delta_file
from childopt.sparse import check_indices, gather, index_dtype

__all__ = ["WIDE_DTYPES", "DTYPE_NAMES", "DeltaEntry", "wide_dtype", "check_same_layout", "bits", "difference",
           "values_at", "add_at", "merge_entries"]

# The exact difference of two floats of one type needs the significand bits of the type plus
# the gap between their exponents (plus one for a carry).  The next wider type has more than
# twice the significand bits (fp32: 24 against 8 for bf16 and 11 for fp16; fp64: 53 against 24
# for fp32), so ``tuned - base`` is exact there unless |tuned| and |base| are about 2**15 (bf16),
# 2**12 (fp16) or 2**28 (fp32) apart, far beyond a fine-tuning update; then
# ``(base.wide + delta).to(dtype)`` is ``tuned`` bit for bit.  fp64 has no wider type: its
# differences are exact when the two values are within a factor of two (Sterbenz), the usual case.
# SparseDelta.extract checks the round trip of every entry and raises where it fails (operands
# extremely far apart, infinities), so a delta it returns is always exact -- up to what addition
# cannot carry: a zero may come back with the other sign (0.0 + -0.0 is 0.0) and a NaN with
# another payload.
WIDE_DTYPES = {
    torch.float16: torch.float32,
    torch.bfloat16: torch.float32,
    torch.float32: torch.float64,
    torch.float64: torch.float64,
}
DTYPE_NAMES = {str(d).removeprefix("torch."): d for d in WIDE_DTYPES}  # as files record them
_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


@dataclass(eq=False)
class DeltaEntry:
    """The change of one tensor: ``values[i] = tuned.flatten()[indices[i]] - base.flatten()[indices[i]]``.

    Attributes:
        shape: shape of the tensor the delta applies to.
        dtype: dtype of that tensor (a floating type in :data:`WIDE_DTYPES`).
        indices: 1-D strictly increasing flat indices: int32 below 2**31 elements, else int64
            (what extract, merge and load produce; int64 is accepted for any size).
        values: 1-D differences in ``WIDE_DTYPES[dtype]``, one per index.
        aliases: the tensor's other names, when it was tied (one tensor under several names).
        base_sha256: :func:`~childopt.delta_file.digest` of the base values at ``indices``, which
            ``apply_to`` compares with its target's (None: unknown, as in files before version 3).
    """

    shape: tuple[int, ...]
    dtype: torch.dtype
    indices: torch.Tensor
    values: torch.Tensor
    aliases: tuple[str, ...] = ()
    base_sha256: Optional[str] = None

    def __post_init__(self):
        self.shape = delta_file.check_shape(self.shape, "DeltaEntry shape")
        self.aliases = delta_file.check_aliases(self.aliases, "DeltaEntry aliases")
        self.base_sha256 = delta_file.check_digest(self.base_sha256, "DeltaEntry base_sha256")

    @property
    def numel(self) -> int:
        """Elements of the tensor the delta applies to."""
        return torch.Size(self.shape).numel()

    @property
    def num_entries(self) -> int:
        """Stored entries (indices)."""
        return self.indices.numel()

    @property
    def nbytes(self) -> int:
        """Bytes of indices and values."""
        return self.indices.nbytes + self.values.nbytes

    def __repr__(self) -> str:
        return f"DeltaEntry(shape={self.shape}, dtype={self.dtype}, {self.num_entries:,} entries)"

    def _check(self, name: str) -> None:
        """Raise unless the entry is well formed (an entry built by hand or read from a file)."""
        self.shape = delta_file.check_shape(self.shape, f"{name!r}: shape")  # fields may be reassigned
        self.aliases = delta_file.check_aliases(self.aliases, f"{name!r}: aliases")
        delta_file.check_digest(self.base_sha256, f"{name!r}: base_sha256")
        if name in self.aliases:
            raise ValueError(f"{name!r}: aliases must name the tensor's other names, not {name!r} itself")
        wide = wide_dtype(name, self.dtype)
        check_indices(self.indices, self.numel, repr(name))
        if self.values.shape != self.indices.shape or self.values.dtype != wide:
            raise ValueError(f"{name!r}: values must be {wide} of shape {tuple(self.indices.shape)} "
                             f"(one per index), got {self.values.dtype} of shape {tuple(self.values.shape)}")
        if self.values.device != self.indices.device:
            raise ValueError(f"{name!r}: indices are on {self.indices.device} but values on "
                             f"{self.values.device}")


def wide_dtype(name: str, dtype: torch.dtype) -> torch.dtype:
    """The dtype delta values of a ``dtype`` tensor are kept in (:data:`WIDE_DTYPES`)."""
    if dtype not in WIDE_DTYPES:
        raise TypeError(f"{name!r}: sparse deltas hold floating-point tensors "
                        f"({', '.join(map(str, WIDE_DTYPES))}), got {dtype}; leave it out of base and tuned")
    return WIDE_DTYPES[dtype]


def check_same_layout(name: str, a: tuple, b: tuple) -> None:
    """Raise unless two (description, shape, dtype) triples agree in shape and dtype."""
    (a_what, a_shape, a_dtype), (b_what, b_shape, b_dtype) = a, b
    if tuple(a_shape) != tuple(b_shape) or a_dtype != b_dtype:
        raise ValueError(f"{name!r}: {a_what} has shape {tuple(a_shape)} and dtype {a_dtype}, "
                         f"but {b_what} has shape {tuple(b_shape)} and dtype {b_dtype}")


def bits(t: torch.Tensor) -> torch.Tensor:
    """The bit pattern of a float tensor (so that -0.0 != 0.0 and NaN == NaN of one payload)."""
    return t.view(_BITS[t.element_size()]) if t.is_floating_point() else t


def difference(name: str, base: torch.Tensor, tuned: torch.Tensor, idx: torch.Tensor, aliases) -> DeltaEntry:
    """The entry ``tuned - base`` at ``idx``, computed in the wide dtype and checked to round-trip,
    with the tensor's other names and the fingerprint of ``base`` at ``idx``."""
    wide = wide_dtype(name, tuned.dtype)
    base_values, tuned_values = gather(base, idx), gather(tuned, idx)
    # The fingerprint covers exactly the base values the delta depends on: applied to a base that
    # differs there, it cannot give ``tuned``; elsewhere it writes nothing.  It costs a SHA-256 of
    # the stored entries' base values (4 bytes per fp32 entry; about 3 ms for 1.2M entries on one
    # CPU core), in proportion to the delta, not the model, and only those values leave the GPU.
    # (A hash of every base tensor would also catch a base that differs elsewhere, at the cost of
    # hashing, and copying to the host, the whole model at each extract and apply.)
    base_sha256 = delta_file.digest(base_values)
    base_values = base_values.to(wide)
    values = tuned_values.to(wide) - base_values
    rebuilt = (base_values + values).to(tuned.dtype)
    wrong = (rebuilt != tuned_values) & ~(rebuilt.isnan() & tuned_values.isnan())
    if wrong.any():
        i = int(wrong.nonzero()[0])
        raise ValueError(f"{name!r}: {int(wrong.sum())} entries cannot be stored exactly as tuned - base in "
                         f"{wide} (e.g. flat index {int(idx[i])}: base {base_values[i].item()!r}, tuned "
                         f"{tuned_values[i].item()!r}); their magnitudes are too far apart or infinite")
    return DeltaEntry(tuple(tuned.shape), tuned.dtype, idx, values, tuple(aliases), base_sha256)


def _flat_access(p: torch.Tensor, idx: torch.Tensor) -> tuple:
    """(view, where): ``view[where]`` are the entries of ``p`` at flat indices ``idx``, without a copy of ``p``.

    A contiguous tensor is indexed through its flat view; any other layout (a transposed or
    channels-last weight) through the coordinates of each flat index.
    """
    idx = idx.to(p.device)
    return (p.view(-1), (idx,)) if p.is_contiguous() else (p, torch.unravel_index(idx, p.shape))


def values_at(p: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """The entries of ``p`` at flat indices ``idx``, as a 1-D tensor."""
    view, where = _flat_access(p, idx)
    return view[where]


def add_at(p: torch.Tensor, entry: DeltaEntry, scale: float) -> None:
    """``p.flatten()[idx] = (p.flatten()[idx].wide + scale * values).to(p.dtype)``, in place."""
    step = entry.values.to(p.device) * scale
    view, where = _flat_access(p, entry.indices)
    view.index_put_(where, (view[where].to(step.dtype) + step).to(p.dtype))


def merge_entries(name: str, parts: list[tuple[int, DeltaEntry, float]], check_base: bool) -> DeltaEntry:
    """``sum_i w_i * entry_i`` on the union of the entries' indices (see SparseDelta.merge).

    ``parts``: (position of the delta in merge's arguments, its entry of tensor ``name``, weight).
    Raises ValueError where two parts disagree on the tensor (see :func:`_check_parts_agree`).
    """
    _check_parts_agree(name, parts, check_base)
    _, first, weight = parts[0]
    indices, values = first.indices, first.values * weight
    for _, entry, weight in parts[1:]:
        both = torch.cat([indices, entry.indices.to(indices.device)])
        indices, slot = torch.unique(both, return_inverse=True)
        # The sums start from -0.0, the identity of IEEE addition (0.0 + -0.0 would be 0.0), so a
        # slot only one part holds keeps its value bit for bit.  index_add_ adds at most two terms
        # per slot onto it, and a + b == b + a exactly, so the order of the additions (atomic on
        # CUDA) cannot change the sum.
        summed = values.new_full((indices.numel(),), -0.0)
        values = summed.index_add_(0, slot, torch.cat([values, entry.values.to(values.device) * weight]))
    # each part's indices are a subset of the union: as many means the same indices
    same_base = all(entry.num_entries == indices.numel() and entry.base_sha256 == first.base_sha256
                    for _, entry, _ in parts)
    base_sha256 = first.base_sha256 if same_base else None
    return DeltaEntry(first.shape, first.dtype, indices.to(index_dtype(first.numel)), values, first.aliases,
                      base_sha256)


def _check_parts_agree(name: str, parts: list[tuple[int, DeltaEntry, float]], check_base: bool) -> None:
    """Raise unless the parts of tensor ``name`` have one shape, dtype and set of aliases and, with
    ``check_base``, no two parts with the same indices have different base fingerprints."""
    at, first, _ = parts[0]
    for i, entry, _ in parts[1:]:
        check_same_layout(name, (f"deltas[{at}]", first.shape, first.dtype), (f"deltas[{i}]", entry.shape, entry.dtype))
        if set(entry.aliases) != set(first.aliases):
            raise ValueError(f"{name!r}: deltas[{at}] gives it the aliases {list(first.aliases)} but deltas[{i}] "
                             f"{list(entry.aliases)}: they come from models that tie it to different tensors (or "
                             "one from a file before format version 3, which records no aliases).  Make the "
                             "entries' aliases agree before merging")
    if not check_base:
        return
    fingerprinted = [(i, entry) for i, entry, _ in parts if entry.base_sha256 is not None]
    for k, (i, a) in enumerate(fingerprinted):
        for j, b in fingerprinted[k + 1:]:
            if a.base_sha256 != b.base_sha256 and a.num_entries == b.num_entries and \
                    torch.equal(a.indices.long(), b.indices.to(a.indices.device).long()):
                raise ValueError(f"{name!r}: deltas[{i}] and deltas[{j}] store the same entries but were extracted "
                                 "from different bases (their base_sha256 differ), so their sum has no base.  If "
                                 f"deltas[{j}] was extracted on top of deltas[{i}] (stacked fine-tunes), pass "
                                 "check_base=False to merge them anyway, without a base fingerprint")
