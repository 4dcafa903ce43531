"""The file format of sparse deltas: plain safetensors plus string metadata, checked on read.

A delta file holds tensors ``"{name}.indices"`` and ``"{name}.values"`` per entry and, beside
the user's metadata, the reserved keys::

    childopt.format          "childopt.sparse_delta"
    childopt.format_version  "3"
    childopt.entries         JSON {name: {"shape": [non-negative ints], "dtype": "bfloat16",
                                          "aliases": [names], "base_sha256": hex}}
    childopt.sha256          SHA-256 of the metadata and tensors (see :func:`checksum`)

``aliases`` (other names of a tied tensor) and ``base_sha256`` (:func:`digest` of the base values
at the stored indices) are optional, and new in version 3.  Version 1 (no checksum) and version 2
files are still read.  :func:`read` checks the safetensors container,
the reserved keys, the layout and the tensor names, each with a message naming the file and the
key; :func:`verify` compares the checksum, so a flipped byte in the data is an error rather than
a silently different delta.  Every problem raises :class:`DeltaFormatError`.
"""
from __future__ import annotations

import ctypes
import hashlib
import json
import math
import operator
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import NamedTuple, Optional, Union

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as serialize

from childopt.arguments import replacing

FORMAT = "childopt.sparse_delta"
FORMAT_VERSION = "3"
READ_VERSIONS = ("1", "2", "3")
META_PREFIX = "childopt."  # metadata keys the format reserves
FORMAT_KEY = "childopt.format"
VERSION_KEY = "childopt.format_version"
ENTRIES_KEY = "childopt.entries"
CHECKSUM_KEY = "childopt.sha256"
RESERVED_KEYS = {"1": (FORMAT_KEY, VERSION_KEY, ENTRIES_KEY), "2": (FORMAT_KEY, VERSION_KEY, ENTRIES_KEY, CHECKSUM_KEY),
                 "3": (FORMAT_KEY, VERSION_KEY, ENTRIES_KEY, CHECKSUM_KEY)}
SPEC_KEYS = ("shape", "dtype")  # every entry of the layout metadata
OPTIONAL_SPEC_KEYS = {"1": (), "2": (), "3": ("aliases", "base_sha256")}
PARTS = ("indices", "values")
NUMEL_LIMIT = 2**63  # flat indices are int64

Path = Union[str, os.PathLike]


class EntryLayout(NamedTuple):
    """What the layout metadata says of one entry."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    aliases: tuple[str, ...] = ()
    base_sha256: Optional[str] = None


Layout = dict[str, EntryLayout]


class DeltaFormatError(ValueError):
    """A file that is not a readable childopt sparse delta; the message names the file and the problem."""


@dataclass
class RawDelta:
    """What :func:`read` found: the layout, the tensors (on CPU) and the metadata of a delta file."""

    path: str
    layout: Layout
    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str]

    @property
    def user_metadata(self) -> dict[str, str]:
        """The metadata without the format's reserved keys."""
        return {k: v for k, v in self.metadata.items() if not k.startswith(META_PREFIX)}


def check_shape(shape, what: str) -> tuple[int, ...]:
    """``shape`` as a tuple, after checking it is a sequence of ints >= 0 with fewer than 2**63 elements.

    Raises TypeError for anything but a tuple, list or torch.Size of ints (a string, a float or a
    bool is not silently converted) and ValueError for negative or too large sizes.
    """
    if not isinstance(shape, (tuple, list, torch.Size)) or not all(_is_int(s) for s in shape):
        raise TypeError(f"{what} must be a list of non-negative ints, got {shape!r}")
    sizes = tuple(operator.index(s) for s in shape)
    if any(s < 0 for s in sizes) or math.prod(sizes) >= NUMEL_LIMIT:
        raise ValueError(f"{what} must be non-negative ints with fewer than 2**63 elements in all, got {list(sizes)!r}")
    return sizes


def _is_int(value) -> bool:
    """An integer (an int, a numpy or 0-d torch integer: anything with ``__index__``), not a bool."""
    if isinstance(value, bool):
        return False
    try:
        operator.index(value)
    except TypeError:
        return False
    return True


def check_aliases(aliases, what: str) -> tuple[str, ...]:
    """``aliases`` as a tuple, after checking it is a list or tuple of distinct non-empty strings."""
    if (not isinstance(aliases, (tuple, list)) or not all(isinstance(a, str) and a for a in aliases)
            or len(set(aliases)) != len(aliases)):
        raise TypeError(f"{what} must be a list of distinct non-empty names, got {_clip(aliases)}")
    return tuple(aliases)


def check_digest(value, what: str) -> Optional[str]:
    """``value`` after checking it is None or a SHA-256 in lowercase hex (as :func:`digest` gives)."""
    if value is not None and not (isinstance(value, str) and len(value) == 64
                                  and all(c in "0123456789abcdef" for c in value)):
        raise TypeError(f"{what} must be None or a SHA-256 as 64 lowercase hex digits, got {_clip(value)}")
    return value


def digest(values: torch.Tensor) -> str:
    """SHA-256 (hex) of the bytes of ``values`` (a 1-D tensor, on any device): the fingerprint of a
    delta's base values at its stored indices."""
    return hashlib.sha256(_tensor_bytes(values.contiguous().cpu())).hexdigest()


def check_user_metadata(metadata: Mapping) -> dict[str, str]:
    """The user's metadata, checked: string keys and values, none under the reserved prefix."""
    if bad := [k for k, v in metadata.items() if not (isinstance(k, str) and isinstance(v, str))]:
        raise TypeError(f"metadata keys and values must be strings; not so for {short_list(bad)}")
    if reserved := [k for k in metadata if k.startswith(META_PREFIX)]:
        raise ValueError(f"metadata keys starting with {META_PREFIX!r} are reserved: {short_list(reserved)}")
    return dict(metadata)


def short_list(names: list) -> str:
    """A short quoted list of names for error messages."""
    shown = ", ".join(repr(n) for n in names[:5])
    return shown if len(names) <= 5 else f"{shown}, ... ({len(names)} in all)"


def _tensor_bytes(t: torch.Tensor) -> bytes:
    """The raw bytes of a contiguous CPU tensor (torch tensors have no buffer protocol, and numpy
    is no dependency of childopt)."""
    return ctypes.string_at(t.data_ptr(), t.nbytes) if t.nbytes else b""


def checksum(metadata: Mapping[str, str], tensors: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 (hex) of the metadata (all keys but the checksum) and of every tensor's name, dtype,
    shape and bytes, in sorted order: what a delta file holds, independent of its byte layout."""
    digest = hashlib.sha256()
    digest.update(json.dumps(sorted((k, v) for k, v in metadata.items() if k != CHECKSUM_KEY)).encode())
    for key in sorted(tensors):
        t = tensors[key].contiguous().cpu()
        digest.update(json.dumps([key, str(t.dtype), list(t.shape)]).encode())
        digest.update(_tensor_bytes(t))
    return digest.hexdigest()


def write(path: Path, layout: Layout, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> None:
    """Save ``tensors`` (contiguous, CPU) with the user's ``metadata`` and the reserved keys."""
    entries = {}
    for name, (shape, dtype, aliases, base_sha256) in layout.items():
        spec = entries[name] = {"shape": list(shape), "dtype": str(dtype).removeprefix("torch.")}
        if aliases:
            spec["aliases"] = list(aliases)
        if base_sha256 is not None:
            spec["base_sha256"] = base_sha256
    meta = {**check_user_metadata(metadata), FORMAT_KEY: FORMAT, VERSION_KEY: FORMAT_VERSION,
            ENTRIES_KEY: json.dumps(entries)}
    where = os.fspath(path)
    absolute = os.path.abspath(where)  # as load() reads it: no ~ expansion (replacing() would expand it)
    folder = os.path.dirname(os.path.realpath(absolute))  # a symbolic link's file is the one replaced
    if not os.path.isdir(folder):  # else the error would name the temporary file written first
        why = "is a file, not a folder" if os.path.exists(folder) else "does not exist"
        raise FileNotFoundError(f"cannot save the delta to {where!r}: its folder {folder!r} {why}")
    # safetensors' save_file writes its own temporary file, mode 0600 whatever the umask and left
    # behind by an exception: serialized here and written through the package's one replacing()
    try:
        data = serialize(dict(tensors), metadata={**meta, CHECKSUM_KEY: checksum(meta, tensors)})
        with replacing(absolute) as temporary:
            temporary.write_bytes(data)
    except (SafetensorError, OSError) as err:
        raise OSError(f"cannot save the delta to {where!r}: {err}") from err


def read(path: Path, dtypes: Mapping[str, torch.dtype]) -> RawDelta:
    """Read a delta file onto the CPU, checking everything but the tensors' contents and checksum.

    ``dtypes``: the dtype names the layout may use.  Raises :class:`DeltaFormatError`.
    """
    where = os.fspath(path)
    if os.path.isdir(where):
        raise DeltaFormatError(f"{where} is a directory, not a delta file")
    try:
        with safe_open(where, framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            layout = _read_layout(where, meta, dtypes)
            expected = {f"{name}.{part}" for name in layout for part in PARTS}
            if missing := sorted(expected - set(f.keys())):
                raise DeltaFormatError(f"{where}: missing tensors {short_list(missing)}")
            if extra := sorted(set(f.keys()) - expected):
                raise DeltaFormatError(f"{where}: tensors that belong to no entry: {short_list(extra)}")
            tensors = {key: f.get_tensor(key) for key in sorted(expected)}
    except SafetensorError as err:
        raise DeltaFormatError(f"{where} is not a readable safetensors file (truncated or corrupted?): {err}") from err
    return RawDelta(where, layout, tensors, dict(meta))


def verify(raw: RawDelta) -> None:
    """Raise unless the file's checksum (version 2) matches what was read."""
    expected = raw.metadata.get(CHECKSUM_KEY)
    if expected is not None and expected != checksum(raw.metadata, raw.tensors):
        raise DeltaFormatError(f"{raw.path}: the contents do not match {CHECKSUM_KEY!r}; the file is corrupted "
                               "or was edited after it was saved")


def _read_layout(where: str, meta: Mapping[str, str], dtypes: Mapping[str, torch.dtype]) -> Layout:
    """name -> (shape, dtype) from the metadata of a delta file, after checking its format keys."""
    if meta.get(FORMAT_KEY) != FORMAT:
        raise DeltaFormatError(f"{where} is not a childopt sparse delta (its metadata has no "
                               f"{FORMAT_KEY!r}: {FORMAT!r}); it may be a full checkpoint")
    version = meta.get(VERSION_KEY)
    if version not in READ_VERSIONS:
        raise DeltaFormatError(f"{where}: sparse delta format version {version!r} is not supported (this "
                               f"childopt reads versions {', '.join(map(repr, READ_VERSIONS))})")
    known = RESERVED_KEYS[version]
    if unknown := sorted(k for k in meta if k.startswith(META_PREFIX) and k not in known):
        raise DeltaFormatError(f"{where}: reserved metadata keys that format version {version!r} does not "
                               f"define: {short_list(unknown)}")
    if missing := [k for k in known if k not in meta]:
        raise DeltaFormatError(f"{where}: format version {version!r} needs metadata keys {short_list(missing)}")
    try:
        entries = json.loads(meta[ENTRIES_KEY])
    except (ValueError, RecursionError) as err:
        raise DeltaFormatError(f"{where}: {ENTRIES_KEY!r} metadata is not valid JSON ({err})") from err
    if not isinstance(entries, dict):
        raise DeltaFormatError(f"{where}: {ENTRIES_KEY!r} metadata must be a JSON object "
                               f"{{name: {{\"shape\": [...], \"dtype\": ...}}}}, got {type(entries).__name__} "
                               f"{_clip(entries)}")
    optional = OPTIONAL_SPEC_KEYS[version]
    return {name: _entry_layout(where, name, spec, dtypes, optional) for name, spec in entries.items()}


def _entry_layout(where: str, name: str, spec, dtypes: Mapping[str, torch.dtype], optional: tuple) -> EntryLayout:
    """One entry of the layout metadata; ``optional``: the keys beside shape and dtype its version allows."""
    what = f"{where}: {ENTRIES_KEY!r} entry {name!r}"
    if not isinstance(spec, dict) or not set(SPEC_KEYS) <= set(spec) <= set(SPEC_KEYS + optional):
        also = f" (and optionally {' and '.join(map(repr, optional))})" if optional else ""
        raise DeltaFormatError(f"{what} must be an object with exactly the keys 'shape' and 'dtype'{also}, "
                               f"got {_clip(spec)}")
    if not isinstance(spec["dtype"], str) or spec["dtype"] not in dtypes:
        raise DeltaFormatError(f"{what} has dtype {_clip(spec['dtype'])}; expected one of "
                               f"{', '.join(map(repr, dtypes))}")
    try:
        return EntryLayout(check_shape(spec["shape"], f"{what}: shape"), dtypes[spec["dtype"]],
                           check_aliases(spec.get("aliases", []), f"{what}: aliases"),
                           check_digest(spec.get("base_sha256"), f"{what}: base_sha256"))
    except (TypeError, ValueError) as err:
        raise DeltaFormatError(str(err)) from err


def _clip(value, limit: int = 80) -> str:
    """``repr(value)``, shortened for an error message."""
    text = json.dumps(value, default=repr) if isinstance(value, (dict, list)) else repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
