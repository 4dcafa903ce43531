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
from childopt.delta_entry import (DTYPE_NAMES, WIDE_DTYPES, DeltaEntry, add_at, bits, check_same_layout, difference,
                                  merge_entries, values_at, wide_dtype)
from childopt.optim.validation import check_bool
from childopt.sparse import check_indices, index_dtype, indices_from_mask

__all__ = ["DeltaEntry", "SparseDelta", "DeltaFormatError", "indices_from_mask", "WIDE_DTYPES", "FORMAT_VERSION"]

_OUTSIDE_CHOICES = ("raise", "store", "drop")  # SparseDelta.extract's changes off its indices
_UNITS = ("B", "kB", "MB", "GB", "TB")

NamedTensors = Union[torch.nn.Module, Mapping[str, torch.Tensor]]


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
                wide_dtype(name, t.dtype)  # a changed integer buffer: no outside= choice could store it
            if idx.numel():
                entries[name] = difference(name, b, t, idx, aliases[name][1:])
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
        check_bool(check_base, "check_base")
        self._check()
        tensors = _named_tensors(target)
        found = {name: [n for n in (name, *e.aliases) if n in tensors] for name, e in self.entries.items()}
        if missing := [name for name, names in found.items() if not names]:
            raise ValueError(f"target lacks tensors the delta changes: {short_list(missing)} "
                             "(is the delta for another model?)")
        owner = {n: name for name, names in found.items() for n in names}
        for n, name in owner.items():
            e, p = self.entries[name], tensors[n]
            check_same_layout(n, ("the delta", e.shape, e.dtype), ("the target", p.shape, p.dtype))
        tied = _tied_duplicates(tensors, owner)
        if shared := [(n, first) for n, first in tied.items() if owner[n] != owner[first]]:
            name, first = shared[0]
            raise ValueError(f"{name!r} and {first!r} are the same tensor in target (tied weights); "
                             f"applying both entries would add the change twice: drop one from entries")
        distinct = {name: [n for n in names if n not in tied] for name, names in found.items()}
        _check_targets(self.entries, distinct, tensors, check_base)
        for name, e in self.entries.items():
            for n in distinct[name]:
                add_at(tensors[n], e, scale)
        return target

    @classmethod
    def merge(cls, *deltas: "SparseDelta", weights: Optional[Iterable[float]] = None,
              check_base: bool = True) -> "SparseDelta":
        """One delta equal to ``sum_i weights[i] * deltas[i]`` (weights default to 1).

        Per tensor, entries live on the union of the deltas' indices, and the (weighted) values
        are summed in the wide dtype where indices coincide; a tensor in only some of the deltas
        keeps their entries.  In exact arithmetic applying the merged delta equals applying each
        delta in turn (with its weight as ``scale``, and ``check_base=False`` after the first); in the
        wide dtype the sums are exact unless the values are extremely far apart in magnitude, so
        the two agree up to the rounding to the parameter dtype that applying in turn does after
        every delta.  Sums are folded left to right, two operands per entry at a time, so the
        result is deterministic on every device.  The deltas must agree on each tensor: its shape,
        dtype and aliases, and which entry each name belongs to.  A merged entry keeps its parts'
        base fingerprint only where all parts have the same indices and the same fingerprint (a
        fingerprint covers the base at its own indices, so no other sum has a known one: ``apply_to``
        does not check its base).  Parts with the same indices but different fingerprints prove
        different bases: with ``check_base`` that raises; pass ``check_base=False`` to merge a
        delta with one extracted on top of it (stacked fine-tunes).

        Raises:
            TypeError: a weight is not a real number, or ``check_base`` is not a bool.
            ValueError: no deltas, a weight count that differs from the delta count, a NaN or
                infinite weight, or deltas that disagree on a tensor: shape, dtype, aliases, a name
                that is an entry in one and an alias of another entry in another, or (with
                ``check_base``) different bases at the same indices.  The message names the
                tensor and the deltas.
        """
        weights = ([1.0] * len(deltas) if weights is None
                   else [_finite_number(w, f"weights[{i}]") for i, w in enumerate(weights)])
        if not deltas or len(weights) != len(deltas):
            raise ValueError(f"merge needs one or more deltas and one weight per delta, got "
                             f"{len(deltas)} deltas and {len(weights)} weights")
        check_bool(check_base, "check_base")
        parts: dict[str, list[tuple[int, DeltaEntry, float]]] = {}
        owner: dict[str, tuple[int, str]] = {}  # tensor name -> (first delta naming it, its entry there)
        for i, (delta, weight) in enumerate(zip(deltas, weights)):
            delta._check()
            for name, entry in delta.entries.items():
                parts.setdefault(name, []).append((i, entry, weight))
                for n in (name, *entry.aliases):
                    at, first = owner.setdefault(n, (i, name))
                    if first != name:
                        tied = {first, *deltas[at].entries[first].aliases}
                        if tied == {name, *entry.aliases}:
                            raise ValueError(f"deltas[{at}] and deltas[{i}] store the tied tensor {sorted(tied)} "
                                             f"under different names: {first!r} in deltas[{at}], {name!r} in "
                                             f"deltas[{i}]; extract both with the same state dict's names")
                        raise ValueError(f"deltas[{at}] and deltas[{i}] disagree on which names are one tensor: "
                                         f"{n!r} belongs to the entry {first!r} in deltas[{at}] but to the entry "
                                         f"{name!r} in deltas[{i}]")
        return cls({name: merge_entries(name, entry_parts, check_base) for name, entry_parts in parts.items()})

    def save(self, path: Union[str, os.PathLike], metadata: Optional[Mapping[str, str]] = None) -> None:
        """Write the delta to a safetensors file, with ``self.metadata`` updated by ``metadata``.

        Tensors are ``"{name}.indices"`` and ``"{name}.values"`` (moved to CPU); the string
        metadata holds the user's keys plus ``childopt.*`` keys: format, format version, a JSON
        object ``{name: {"shape": [...], "dtype": "bfloat16", "aliases": [...], "base_sha256": ...}}``
        and a SHA-256 checksum of the metadata and tensors (:mod:`childopt.delta_file`).  Every
        entry is checked first (as ``load`` will), so a malformed delta raises and writes nothing.
        The file is written under a temporary name beside ``path`` and renamed onto it, so a failed
        save leaves an earlier file there intact (childopt.arguments.replacing: a new file gets the
        mode ``open()`` gives one, a saved-over file keeps its own).
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
        raw = delta_file.read(path, DTYPE_NAMES)
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
        check_same_layout(name, ("base", b.shape, b.dtype), ("tuned", t.shape, t.dtype))
    shared = [n for n, t in tuned.items() if t.numel() and _memory_key(base[n]) == _memory_key(t)]
    if shared and len(shared) == sum(1 for t in tuned.values() if t.numel()):
        raise ValueError(f"every tensor of base is the tuned tensor itself ({short_list(shared)}): a base taken as "
                         "model.state_dict() without a copy follows the model as it trains, so the delta would hold "
                         "no change; copy it before training: {k: v.clone() for k, v in model.state_dict().items()}")


def _memory_key(t: torch.Tensor) -> tuple:
    """What two tensors that view the same memory with the same layout have alike (tied tensors, or a
    base that is the tuned tensor itself)."""
    return t.device, t.data_ptr(), t.dtype, tuple(t.shape), t.stride()


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
            earlier = first.setdefault(_memory_key(t), name)
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
    return indices_from_mask(bits(base) != bits(tuned))


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


def _check_targets(entries: Mapping[str, DeltaEntry], names: Mapping[str, list], tensors: Mapping[str, torch.Tensor],
                   check_base: bool) -> None:
    """Raise unless, for each entry, its distinct target tensors ``names[entry]`` match the base
    fingerprint (with ``check_base``, where the entry has one) or else agree bitwise at its indices."""
    wrong_base, differ = [], []
    for name, e in entries.items():
        checked = check_base and e.base_sha256 is not None
        if not checked and len(names[name]) == 1:
            continue
        values = [values_at(tensors[n], e.indices) for n in names[name]]
        if checked:
            wrong_base += [n for n, v in zip(names[name], values) if delta_file.digest(v) != e.base_sha256]
        elif any(not torch.equal(bits(values[0]), bits(v)) for v in values[1:]):
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
