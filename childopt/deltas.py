"""Sparse deltas: the fine-tuned change of a model as (indices, values) per tensor.

A child network changes a small fraction of the weights, so the fine-tuned model is stored as
its difference from the base weights at the changed entries only::

    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    ...  # fine-tune
    delta = SparseDelta.extract(base, model.state_dict())   # or indices=opt.sparse_indices(), outside="store"
    delta.save("delta.safetensors", metadata={"base_model": "bert-base-cased"})

    model = load_base_model()
    SparseDelta.load("delta.safetensors").apply_to(model)  # the fine-tuned weights, bit for bit

Each :class:`DeltaEntry` holds sorted flat (row-major) indices and the differences
``tuned - base`` there, in a float type wider than the parameter's, so that applying the delta
to the base reproduces the tuned weights exactly (see :data:`WIDE_DTYPES`).  Files are plain
safetensors: tensors ``"{name}.indices"`` and ``"{name}.values"``, with the shapes, dtypes, tied
names, base fingerprints, format version and a checksum in the string metadata; a file that
is damaged or not a delta raises :class:`DeltaFormatError` naming the file and the problem.
"""
from __future__ import annotations

import math
import numbers
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from itertools import chain
from typing import Optional, Union

import torch

from childopt import delta_file
from childopt.delta_file import FORMAT_VERSION, DeltaFormatError, short_list
from childopt.sparse import check_indices, gather, index_dtype, indices_from_mask

__all__ = ["DeltaEntry", "SparseDelta", "DeltaFormatError", "indices_from_mask", "WIDE_DTYPES", "FORMAT_VERSION"]

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
_DTYPE_NAMES = {str(d).removeprefix("torch."): d for d in WIDE_DTYPES}  # as files record them
_OUTSIDE_CHOICES = ("raise", "store", "drop")  # SparseDelta.extract's changes off its indices
_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_UNITS = ("B", "kB", "MB", "GB", "TB")

NamedTensors = Union[torch.nn.Module, Mapping[str, torch.Tensor]]


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
        wide = _wide_dtype(name, self.dtype)
        check_indices(self.indices, self.numel, repr(name))
        if self.values.shape != self.indices.shape or self.values.dtype != wide:
            raise ValueError(f"{name!r}: values must be {wide} of shape {tuple(self.indices.shape)} "
                             f"(one per index), got {self.values.dtype} of shape {tuple(self.values.shape)}")
        if self.values.device != self.indices.device:
            raise ValueError(f"{name!r}: indices are on {self.indices.device} but values on "
                             f"{self.values.device}")


@dataclass(eq=False)
class SparseDelta:
    """Sparse changes of named tensors against base weights; see the module docstring.

    Attributes:
        entries: tensor name (as in ``state_dict()``) -> :class:`DeltaEntry`.
        metadata: free-form string metadata saved with the delta (e.g. the base model's name).
    """

    entries: dict[str, DeltaEntry] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)

    def __post_init__(self):
        self._check()

    def _check(self) -> None:
        """Raise unless every entry is well formed and every tensor name belongs to one entry."""
        owner = {}
        for name, entry in self.entries.items():
            if not isinstance(entry, DeltaEntry):
                raise TypeError(f"entries[{name!r}] must be a DeltaEntry, got {type(entry).__name__}")
            entry._check(name)
            for alias in entry.aliases:
                if alias in self.entries or alias in owner:
                    also = "an entry of its own" if alias in self.entries else f"an alias of {owner[alias]!r}"
                    raise ValueError(f"{alias!r} is an alias of {name!r} and {also}: the tensor would change twice")
                owner[alias] = name

    @classmethod
    @torch.no_grad()
    def extract(cls, base: NamedTensors, tuned: NamedTensors,
                indices: Optional[Mapping[str, torch.Tensor]] = None, *, outside: str = "raise") -> "SparseDelta":
        """The delta that turns ``base`` into ``tuned``.

        Args:
            base, tuned: name -> tensor mappings with the same names, shapes and dtypes (a
                ``state_dict()``, ``dict(model.named_parameters())``), or modules.  ``base`` may
                live on another device (e.g. a CPU snapshot); work happens on ``tuned``'s device.
            indices: optional name -> 1-D flat indices to store (e.g. the child network's
                selected entries, ``opt.sparse_indices()``; :func:`indices_from_mask` turns a bool
                mask into them), duplicates dropped.  Without it, every tensor is stored where
                ``tuned`` differs bitwise from ``base``.
            outside: what to do with changes ``indices`` does not cover (a tensor it does not
                name, as the dense-trained head or embeddings beside a masked encoder, or an entry
                it leaves out): ``"raise"`` (ValueError naming them: the delta would not rebuild
                ``tuned``), ``"store"`` (stored too, where they differ bitwise, so the delta is
                exact) or ``"drop"`` (left out on purpose).  Ignored without ``indices``.  Except
                with ``"drop"``, every tensor is compared whole with its base, as without ``indices``.

        Tensors without entries are omitted.  Tied tensors (one tensor under several names, as
        ``state_dict()`` lists shared embeddings) are stored once, under their first name (the
        indices given under any of the names joined), with the other names as its ``aliases``,
        so that applying the delta changes the model's tensor once and each copy in a state dict.
        Each entry records ``base_sha256``, the fingerprint of ``base`` at its indices, which
        ``apply_to`` checks.  Only floating-point tensors can hold entries: a changed integer
        buffer (e.g. BatchNorm's ``num_batches_tracked``) raises TypeError; leave it out of
        ``base``/``tuned``.

        Raises:
            TypeError: ``indices`` is keyed by tensors rather than names (``sparse_indices()`` of
                an optimizer built on ``model.parameters()``).
            ValueError: names, shapes or dtypes of ``base`` and ``tuned`` differ, ``indices``
                names an unknown tensor or an index out of range, ``outside="raise"`` and
                ``tuned`` changed outside ``indices``, or an entry cannot round-trip exactly (see
                :data:`WIDE_DTYPES`).
        """
        if outside not in _OUTSIDE_CHOICES:
            raise ValueError(f"outside must be one of {', '.join(map(repr, _OUTSIDE_CHOICES))}, got {outside!r}")
        base, tuned = _named_tensors(base), _named_tensors(tuned)
        _check_same_tensors(base, tuned)
        if indices is not None:
            _check_index_names(indices, tuned)
        listed = [n for n in tuned if indices is None or n in indices]
        unlisted = [n for n in tuned if n not in listed]
        names = listed if outside == "drop" else listed + unlisted
        tied = _tied_duplicates(tuned, listed + unlisted)  # a listed name is kept before an unlisted one
        aliases = {name: [name] + [other for other, kept in tied.items() if kept == name] for name in names}
        entries, missed = {}, {}
        for name in names:
            if name in tied:
                continue
            t = tuned[name]
            b = base[name].to(t.device)
            if indices is None:
                idx = _changed_indices(b, t)
            else:  # a tied tensor stores the indices given under any of its names
                given = [_given_indices(alias, indices[alias], t) for alias in aliases[name] if alias in indices]
                idx = torch.unique(torch.cat(given)) if given else \
                    torch.empty(0, dtype=index_dtype(t.numel()), device=t.device)
                if outside != "drop":
                    idx, missed[name] = _cover_changes(b, t, idx, store=outside == "store")
            if missed.get(name):
                _wide_dtype(name, t.dtype)  # a changed integer buffer: no outside= choice could store it
            if idx.numel():
                entries[name] = _difference(name, b, t, idx, aliases[name][1:])
        if missing := {name: count for name, count in missed.items() if count}:
            shown = ", ".join(f"{name!r} ({count} entries)" for name, count in list(missing.items())[:5])
            more = f", ... ({len(missing)} tensors in all)" if len(missing) > 5 else ""
            raise ValueError(f"tuned differs from base outside the given indices: {shown}{more}; the delta would "
                             "not rebuild tuned.  Pass outside='store' to store those changes too (exact), or "
                             "outside='drop' to leave them out")
        return cls(entries)

    @torch.no_grad()
    def apply_to(self, target: NamedTensors, scale: float = 1.0, *, check_base: bool = True) -> NamedTensors:
        """Add ``scale`` times the delta to ``target`` in place and return ``target``.

        ``target`` is a module (its parameters and buffers, by ``state_dict()`` names) or a name
        -> tensor mapping, on any devices.  Each entry computes, in the wide dtype,
        ``p.flatten()[idx] = (p.flatten()[idx].wide + scale * values).to(p.dtype)``, so with
        ``scale=1`` the base becomes the tuned weights bit for bit (up to the sign of zeros and
        NaN payloads, see :data:`WIDE_DTYPES`).  An entry of a tied tensor changes every one of
        its names that ``target`` holds once per distinct tensor (a state-dict copy or an untied
        model holds separate copies, which must agree at the stored entries).  With
        ``check_base``, each tensor's values at the stored entries must match the fingerprint of
        the base recorded by ``extract`` (``base_sha256``; deltas from files before format
        version 3, and merged entries whose deltas do not share one, have none and are not
        checked).  Pass ``check_base=False`` to apply on purpose to another base, e.g. a
        second delta on top of a first.  Everything is checked before anything is written.

        Raises:
            TypeError: ``scale`` is not a real number (e.g. the string ``'2'``), or an entry is malformed.
            ValueError: ``scale`` is NaN or infinite, an entry is malformed (indices out of range,
                ...), ``target`` lacks a tensor of the delta, or one has another shape or dtype (a
                delta for another model), two entries name the same (tied) tensor, copies of a
                tied tensor differ, or a tensor's values differ from the base the delta was
                extracted from (the message names them).
        """
        scale = _finite_number(scale, "scale")
        if not isinstance(check_base, bool):  # a truthy stand-in must not turn the base check off
            raise TypeError(f"check_base must be a bool, got {check_base!r} ({type(check_base).__name__})")
        self._check()
        tensors = _named_tensors(target)
        found = {name: [n for n in (name, *e.aliases) if n in tensors] for name, e in self.entries.items()}
        if missing := [name for name, names in found.items() if not names]:
            raise ValueError(f"target lacks tensors the delta changes: {short_list(missing)} "
                             "(is the delta for another model?)")
        owner = {n: name for name, names in found.items() for n in names}
        for n, name in owner.items():
            e, p = self.entries[name], tensors[n]
            _check_same_layout(n, ("the delta", e.shape, e.dtype), ("the target", p.shape, p.dtype))
        tied = _tied_duplicates(tensors, owner)
        if shared := [(n, first) for n, first in tied.items() if owner[n] != owner[first]]:
            name, first = shared[0]
            raise ValueError(f"{name!r} and {first!r} are the same tensor in target (tied weights); "
                             f"applying both entries would add the change twice: drop one from entries")
        distinct = {name: [n for n in names if n not in tied] for name, names in found.items()}
        _check_targets(self.entries, distinct, tensors, check_base)
        for name, e in self.entries.items():
            for n in distinct[name]:
                _add_at(tensors[n], e, scale)
        return target

    @classmethod
    def merge(cls, *deltas: "SparseDelta", weights: Optional[Iterable[float]] = None) -> "SparseDelta":
        """One delta equal to ``sum_i weights[i] * deltas[i]`` (weights default to 1).

        Per tensor, entries live on the union of the deltas' indices, and the (weighted) values
        are summed in the wide dtype where indices coincide; a tensor in only some of the deltas
        keeps their entries.  In exact arithmetic applying the merged delta equals applying each
        delta in turn (with its weight as ``scale``, and ``check_base=False`` after the first); in the
        wide dtype the sums are exact unless the values are extremely far apart in magnitude, so
        the two agree up to the rounding to the parameter dtype that applying in turn does after
        every delta.  Sums are folded left to right, two operands per entry at a time, so the
        result is deterministic on every device.  A merged entry keeps the aliases of all its
        parts, and their base fingerprint only where all parts have the same indices and the same
        fingerprint (else ``apply_to`` cannot check its base).

        Raises:
            TypeError: a weight is not a real number.
            ValueError: no deltas, a weight count that differs from the delta count, a NaN or
                infinite weight, or one tensor name with different shapes or dtypes in two deltas.
        """
        weights = ([1.0] * len(deltas) if weights is None
                   else [_finite_number(w, f"weights[{i}]") for i, w in enumerate(weights)])
        if not deltas or len(weights) != len(deltas):
            raise ValueError(f"merge needs one or more deltas and one weight per delta, got "
                             f"{len(deltas)} deltas and {len(weights)} weights")
        parts: dict[str, list[tuple[DeltaEntry, float]]] = {}
        for delta, weight in zip(deltas, weights):
            delta._check()
            for name, entry in delta.entries.items():
                parts.setdefault(name, []).append((entry, weight))
        return cls({name: _merge_entries(name, entry_weights) for name, entry_weights in parts.items()})

    def save(self, path: Union[str, os.PathLike], metadata: Optional[Mapping[str, str]] = None) -> None:
        """Write the delta to a safetensors file, with ``self.metadata`` updated by ``metadata``.

        Tensors are ``"{name}.indices"`` and ``"{name}.values"`` (moved to CPU); the string
        metadata holds the user's keys plus ``childopt.*`` keys: format, format version, a JSON
        object ``{name: {"shape": [...], "dtype": "bfloat16", "aliases": [...], "base_sha256": ...}}``
        and a SHA-256 checksum of the metadata and tensors (:mod:`childopt.delta_file`).  Every
        entry is checked first (as ``load`` will), so a malformed delta raises and writes nothing.
        """
        self._check()
        user = {**self.metadata, **(metadata or {})}
        tensors = {}
        for name, e in self.entries.items():
            tensors[f"{name}.indices"] = e.indices.contiguous().cpu()
            tensors[f"{name}.values"] = e.values.contiguous().cpu()
        layout = {name: delta_file.EntryLayout(e.shape, e.dtype, e.aliases, e.base_sha256)
                  for name, e in self.entries.items()}
        delta_file.write(path, layout, tensors, user)

    @classmethod
    def load(cls, path: Union[str, os.PathLike], device: Union[str, torch.device] = "cpu") -> "SparseDelta":
        """Read a delta written by :meth:`save` (format version 1, 2 or 3), onto ``device``.

        Files before version 3 hold no aliases and no base fingerprints: ``apply_to`` cannot check
        their base, nor update the other names of a tied tensor in a state-dict copy.

        The file is read and checked on the CPU: container, metadata, layout, every entry's
        indices and values, then the checksum; only a delta that passes all moves to ``device``.

        Raises:
            DeltaFormatError: (a ValueError) the file is not a readable safetensors file or not a
                childopt sparse delta, has an unsupported format version, malformed layout
                metadata, missing or stray tensors, an entry whose indices or values are invalid
                (out of range, unsorted, wrong dtype, mismatched lengths), or contents that do
                not match its checksum.  The message names the file and the key or entry.
        """
        raw = delta_file.read(path, _DTYPE_NAMES)
        try:
            delta = cls({name: DeltaEntry(spec.shape, spec.dtype, raw.tensors[f"{name}.indices"],
                                          raw.tensors[f"{name}.values"], spec.aliases, spec.base_sha256)
                         for name, spec in raw.layout.items()}, raw.user_metadata)
        except (TypeError, ValueError) as err:
            raise DeltaFormatError(f"{raw.path}: {err}") from err
        delta_file.verify(raw)
        for entry in delta.entries.values():
            entry.indices, entry.values = entry.indices.to(device), entry.values.to(device)
        return delta

    @property
    def num_entries(self) -> int:
        """Stored entries over all tensors."""
        return sum(e.num_entries for e in self.entries.values())

    @property
    def nbytes(self) -> int:
        """Bytes of all indices and values."""
        return sum(e.nbytes for e in self.entries.values())

    def density(self, numel_total: Optional[int] = None) -> float:
        """Stored entries per element: of the tensors the delta touches, or of ``numel_total``
        elements (pass the model's parameter count for the fraction of the whole model)."""
        total = sum(e.numel for e in self.entries.values()) if numel_total is None else numel_total
        return self.num_entries / total if total else 0.0

    def __repr__(self) -> str:
        size = _format_bytes(self.nbytes)
        return f"SparseDelta({len(self.entries)} params, {self.num_entries:,} entries, {size})"


def _wide_dtype(name: str, dtype: torch.dtype) -> torch.dtype:
    """The dtype delta values of a ``dtype`` tensor are kept in (:data:`WIDE_DTYPES`)."""
    if dtype not in WIDE_DTYPES:
        raise TypeError(f"{name!r}: sparse deltas hold floating-point tensors "
                        f"({', '.join(map(str, WIDE_DTYPES))}), got {dtype}; leave it out of base and tuned")
    return WIDE_DTYPES[dtype]


def _named_tensors(tensors: NamedTensors) -> Mapping[str, torch.Tensor]:
    """Name -> tensor for a mapping, or a module's parameters and buffers (tied ones under every
    name, as ``state_dict()`` lists them; the tensors themselves, so writes reach the module)."""
    if isinstance(tensors, torch.nn.Module):
        return dict(chain(tensors.named_parameters(remove_duplicate=False),
                          tensors.named_buffers(remove_duplicate=False)))
    if isinstance(tensors, Mapping):
        return tensors
    raise TypeError(f"expected an nn.Module or a mapping name -> tensor, got {type(tensors).__name__}")


def _finite_number(value, what: str) -> float:
    """``value`` as a float, if it is a finite real number or one-element real tensor (``scale``,
    merge weights)."""
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not (value.dtype.is_complex
                                                                        or value.dtype == torch.bool):
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{what} must be a finite real number, got {value!r} ({type(value).__name__})")
    if not math.isfinite(value):
        raise ValueError(f"{what} must be a finite real number, got {value!r}")
    return float(value)


def _format_bytes(n: int) -> str:
    """Decimal units, e.g. '14.8 MB'."""
    size, unit = float(n), 0
    while size >= 1000 and unit < len(_UNITS) - 1:
        size, unit = size / 1000, unit + 1
    return f"{n} B" if unit == 0 else f"{size:.1f} {_UNITS[unit]}"


def _check_same_tensors(base: Mapping[str, torch.Tensor], tuned: Mapping[str, torch.Tensor]) -> None:
    """Raise unless ``base`` and ``tuned`` hold the same names with the same shapes and dtypes."""
    only_base = [n for n in base if n not in tuned]
    only_tuned = [n for n in tuned if n not in base]
    if only_base or only_tuned:
        raise ValueError(f"base and tuned name different tensors: only in base: {short_list(only_base) or '-'}; "
                         f"only in tuned: {short_list(only_tuned) or '-'}")
    for name, t in tuned.items():
        b = base[name]
        _check_same_layout(name, ("base", b.shape, b.dtype), ("tuned", t.shape, t.dtype))


def _check_same_layout(name: str, a: tuple, b: tuple) -> None:
    """Raise unless two (description, shape, dtype) triples agree in shape and dtype."""
    (a_what, a_shape, a_dtype), (b_what, b_shape, b_dtype) = a, b
    if tuple(a_shape) != tuple(b_shape) or a_dtype != b_dtype:
        raise ValueError(f"{name!r}: {a_what} has shape {tuple(a_shape)} and dtype {a_dtype}, "
                         f"but {b_what} has shape {tuple(b_shape)} and dtype {b_dtype}")


def _tied_duplicates(tensors: Mapping[str, torch.Tensor], names: Iterable[str]) -> dict[str, str]:
    """{name: earlier name} for each of ``names`` whose tensor is the very tensor of an earlier one.

    Two names are tied when they view the same memory with the same layout (shared input and
    output embeddings); empty tensors have no memory to share and are never tied.
    """
    first: dict[tuple, str] = {}
    tied = {}
    for name in names:
        t = tensors[name]
        if t.numel():
            key = (t.device, t.data_ptr(), t.dtype, tuple(t.shape), t.stride())
            earlier = first.setdefault(key, name)
            if earlier != name:
                tied[name] = earlier
    return tied


def _check_index_names(indices: Mapping, tuned: Mapping[str, torch.Tensor]) -> None:
    """Raise unless every key of ``indices`` is the name of a tensor of ``tuned``."""
    if unnamed := [k for k in indices if not isinstance(k, str)]:
        shown = ", ".join(f"{type(k).__name__} of shape {tuple(k.shape)}" if isinstance(k, torch.Tensor)
                          else repr(k)[:40] for k in unnamed[:3])
        raise TypeError(f"indices must be keyed by tensor names (as in state_dict()), but {len(unnamed)} keys are "
                        f"not names: {shown}{', ...' if len(unnamed) > 3 else ''}.  sparse_indices() of an optimizer "
                        "built on model.parameters() is keyed by the parameters; build it on "
                        "model.named_parameters() instead")
    if unknown := [n for n in indices if n not in tuned]:
        raise ValueError(f"indices given for tensors that base and tuned lack: {short_list(unknown)}")


def _changed_indices(base: torch.Tensor, tuned: torch.Tensor) -> torch.Tensor:
    """Flat indices where ``tuned`` differs from ``base`` bitwise (so an unchanged NaN is unchanged)."""
    return indices_from_mask(_bits(base) != _bits(tuned))


def _cover_changes(base: torch.Tensor, tuned: torch.Tensor, idx: torch.Tensor, store: bool) -> tuple:
    """(``idx``, plus where ``tuned`` changed off it when ``store``; how many changed entries ``idx`` misses)."""
    changed = _changed_indices(base, tuned)
    off = changed[~torch.isin(changed, idx.to(changed.dtype))]
    if not store:
        return idx, off.numel()
    if off.numel():
        idx = torch.cat([idx.to(off.dtype), off]).sort().values.to(index_dtype(tuned.numel()))
    return idx, 0


def _given_indices(name: str, idx: torch.Tensor, tuned: torch.Tensor) -> torch.Tensor:
    """User-given flat indices for ``tuned``, checked, sorted and deduplicated."""
    what = f"indices[{name!r}]"
    if idx.dtype == torch.bool:
        raise TypeError(f"{what} is a bool mask; pass indices_from_mask(mask) instead")
    if idx.dim() != 1 or idx.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{what} must be a 1-D int32/int64 tensor of flat indices, got {idx.dtype} "
                         f"of shape {tuple(idx.shape)}")
    idx = torch.unique(idx.to(tuned.device))
    check_indices(idx, tuned.numel(), what)
    return idx.to(index_dtype(tuned.numel()))


def _difference(name: str, base: torch.Tensor, tuned: torch.Tensor, idx: torch.Tensor, aliases) -> DeltaEntry:
    """The entry ``tuned - base`` at ``idx``, computed in the wide dtype and checked to round-trip,
    with the tensor's other names and the fingerprint of ``base`` at ``idx``."""
    wide = _wide_dtype(name, tuned.dtype)
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


def _check_targets(entries: Mapping[str, DeltaEntry], names: Mapping[str, list], tensors: Mapping[str, torch.Tensor],
                   check_base: bool) -> None:
    """Raise unless, for each entry, its distinct target tensors ``names[entry]`` match the base
    fingerprint (with ``check_base``, where the entry has one) or else agree bitwise at its indices."""
    wrong_base, differ = [], []
    for name, e in entries.items():
        checked = check_base and e.base_sha256 is not None
        if not checked and len(names[name]) == 1:
            continue
        values = [_values_at(tensors[n], e.indices) for n in names[name]]
        if checked:
            wrong_base += [n for n, v in zip(names[name], values) if delta_file.digest(v) != e.base_sha256]
        elif any(not torch.equal(_bits(values[0]), _bits(v)) for v in values[1:]):
            differ.append(names[name])
    if wrong_base:
        raise ValueError(f"the target's values at the stored entries of {short_list(wrong_base)} differ from the base "
                         "the delta was extracted from (their SHA-256 does not match the delta's base_sha256): "
                         "nothing was changed.  Is it that base?  A head that from_pretrained initialises at "
                         "random differs at every load, and so does a target a delta was already applied to.  "
                         "Pass check_base=False to apply anyway")
    if differ:
        raise ValueError(f"{short_list(differ[0])} were one tied tensor when the delta was extracted, but the target "
                         "holds them as separate tensors that differ at the stored entries, so the delta cannot "
                         "make them equal again: nothing was changed")


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The bit pattern of a float tensor (so that -0.0 != 0.0 and NaN == NaN of one payload)."""
    return t.view(_BITS[t.element_size()]) if t.is_floating_point() else t


def _flat_access(p: torch.Tensor, idx: torch.Tensor) -> tuple:
    """(view, where): ``view[where]`` are the entries of ``p`` at flat indices ``idx``, without a copy of ``p``.

    A contiguous tensor is indexed through its flat view; any other layout (a transposed or
    channels-last weight) through the coordinates of each flat index.
    """
    idx = idx.to(p.device)
    return (p.view(-1), (idx,)) if p.is_contiguous() else (p, torch.unravel_index(idx, p.shape))


def _values_at(p: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """The entries of ``p`` at flat indices ``idx``, as a 1-D tensor."""
    view, where = _flat_access(p, idx)
    return view[where]


def _add_at(p: torch.Tensor, entry: DeltaEntry, scale: float) -> None:
    """``p.flatten()[idx] = (p.flatten()[idx].wide + scale * values).to(p.dtype)``, in place."""
    step = entry.values.to(p.device) * scale
    view, where = _flat_access(p, entry.indices)
    view.index_put_(where, (view[where].to(step.dtype) + step).to(p.dtype))


def _merge_entries(name: str, entry_weights: list[tuple[DeltaEntry, float]]) -> DeltaEntry:
    """``sum_i w_i * entry_i`` on the union of the entries' indices (see SparseDelta.merge)."""
    first = entry_weights[0][0]
    indices, values = first.indices, first.values * entry_weights[0][1]
    for entry, weight in entry_weights[1:]:
        _check_same_layout(name, ("one delta", first.shape, first.dtype),
                           ("another", entry.shape, entry.dtype))
        both = torch.cat([indices, entry.indices.to(indices.device)])
        indices, slot = torch.unique(both, return_inverse=True)
        # index_add_ adds at most two terms per slot onto 0, and a + b == b + a exactly in IEEE
        # arithmetic, so the order of the additions (atomic on CUDA) cannot change the sum.
        summed = values.new_zeros(indices.numel())
        values = summed.index_add_(0, slot, torch.cat([values, entry.values.to(values.device) * weight]))
    aliases = tuple(dict.fromkeys(alias for entry, _ in entry_weights for alias in entry.aliases))
    # each part's indices are a subset of the union: as many means the same indices
    same_base = all(entry.num_entries == indices.numel() and entry.base_sha256 == first.base_sha256
                    for entry, _ in entry_weights)
    base_sha256 = first.base_sha256 if same_base else None
    return DeltaEntry(first.shape, first.dtype, indices.to(index_dtype(first.numel)), values, aliases, base_sha256)
