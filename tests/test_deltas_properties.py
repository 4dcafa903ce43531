"""The sparse delta file format: examples, then property-based tests (hypothesis).

Random valid deltas (shapes with zero-size dimensions, every dtype, int32/int64 index sets
including empty ones, values with NaN, infinities and signed zeros, aliases, base fingerprints,
checked by apply_to against a SHA-256 computed here with hashlib) must round trip bit for bit
through save/load, and ``apply_to`` must equal a dense oracle: the formula on the whole tensor,
``(base.wide + scale * dense_delta).to(dtype)`` where an entry is stored and ``base`` elsewhere.
Corrupted files (truncated, a byte flipped, the layout metadata or the tensors altered) must
raise DeltaFormatError naming the file, or, for a flip that changes nothing the file means
(whitespace in the header), load the very same delta: never crash, never load another delta.
No hypothesis database is written (``database=None``).
"""
import hashlib
import json
import math
import os
import re
import tempfile

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from childopt import delta_file
from childopt.deltas import WIDE_DTYPES, DeltaEntry, DeltaFormatError, SparseDelta
from tests.test_deltas import assert_bitwise_equal, clone, make_base, tune

INT_OF = {torch.float64: torch.int64, torch.float32: torch.int32, torch.bfloat16: torch.int16,
          torch.float16: torch.int16}
FAST = settings(max_examples=60, deadline=None, database=None)
MANY = settings(max_examples=150, deadline=None, database=None)


def bits(t):
    """Bit patterns, so that -0.0 != 0.0 and NaN payloads count."""
    return t.view(INT_OF[t.dtype]) if t.is_floating_point() else t


# --- example files ------------------------------------------------------------------------------

def test_saving_into_a_missing_or_unwritable_folder_names_the_path_given(tmp_path):
    base = make_base(torch.float32)
    delta = SparseDelta.extract(base, tune(base, seed=6)[0])
    target = tmp_path / "nodir" / "delta.safetensors"
    with pytest.raises(FileNotFoundError, match=f"cannot save the delta to {str(target)!r}: its folder .*nodir"):
        delta.save(target)
    (tmp_path / "a_file").write_text("")
    with pytest.raises(FileNotFoundError, match="its folder .*a_file' is a file, not a folder"):
        delta.save(tmp_path / "a_file" / "delta.safetensors")
    if os.path.isdir("/proc/self"):  # takes no new files, whatever its permission bits say to root
        with pytest.raises(OSError, match="cannot save the delta to '/proc/delta.safetensors'"):
            delta.save("/proc/delta.safetensors")


def test_save_load_apply_is_exact_and_a_plain_safetensors_file(tmp_path):
    base = make_base(torch.bfloat16)
    base["fp32.weight"] = torch.randn(9, 2)
    tuned, *_ = tune(base, seed=3)
    delta = SparseDelta.extract(base, tuned)
    path = tmp_path / "delta.safetensors"
    delta.save(path, metadata={"base_model": "tiny"})

    raw = load_file(path)
    assert set(raw) == {f"{n}.{part}" for n in delta.entries for part in ("indices", "values")}
    for name, entry in delta.entries.items():
        assert torch.equal(raw[f"{name}.indices"], entry.indices)
        assert torch.equal(raw[f"{name}.values"], entry.values)
    with safe_open(path, framework="pt") as f:
        meta = f.metadata()
    assert meta["base_model"] == "tiny" and meta["childopt.format_version"] == "3"
    assert len(meta["childopt.sha256"]) == 64
    layout = json.loads(meta["childopt.entries"])
    for name, shape, dtype in [("fp32.weight", [9, 2], "float32"), ("block.0.weight", [3, 4, 5], "bfloat16")]:
        at = delta.entries[name].indices.long()  # the fingerprint: SHA-256 of the base's bytes there
        fingerprint = hashlib.sha256(bits(base[name]).reshape(-1)[at].numpy().tobytes()).hexdigest()
        assert layout[name] == {"shape": shape, "dtype": dtype, "base_sha256": fingerprint}

    loaded = SparseDelta.load(path)
    assert loaded.metadata == {"base_model": "tiny"}
    target = clone(base)
    loaded.apply_to(target)
    assert_bitwise_equal(target, tuned)


def test_int64_indices_past_two_to_the_31_survive_merge_and_files(tmp_path):
    """A tensor of 2**31 elements needs int64 indices; nothing of that size is allocated here."""
    shape = (2**31,)
    idx = torch.tensor([5, 2**31 - 1], dtype=torch.int64)
    a = SparseDelta({"big": DeltaEntry(shape, torch.bfloat16, idx, torch.tensor([1.0, 2.0]))})
    b = SparseDelta({"big": DeltaEntry(shape, torch.bfloat16, idx[:1], torch.tensor([0.5]))})
    merged = SparseDelta.merge(a, b)
    assert merged.entries["big"].indices.dtype == torch.int64
    assert merged.entries["big"].indices.tolist() == [5, 2**31 - 1]
    assert merged.entries["big"].values.tolist() == [1.5, 2.0]
    merged.save(tmp_path / "big.safetensors")
    loaded = SparseDelta.load(tmp_path / "big.safetensors").entries["big"]
    assert loaded.shape == shape and loaded.indices.dtype == torch.int64
    assert loaded.indices.tolist() == [5, 2**31 - 1]



def test_load_rejects_files_that_are_not_childopt_deltas(tmp_path):
    checkpoint = tmp_path / "model.safetensors"
    save_file({"w": torch.zeros(2)}, checkpoint, metadata={"format": "pt"})
    with pytest.raises(ValueError, match="is not a childopt sparse delta"):
        SparseDelta.load(checkpoint)

    base = make_base(torch.float32)
    tuned, *_ = tune(base, seed=11, density=1.0)
    path = tmp_path / "delta.safetensors"
    SparseDelta.extract(base, tuned).save(path)
    with safe_open(path, framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}

    broken = tmp_path / "broken.safetensors"
    save_file({k: v for k, v in tensors.items() if k != "gain.values"}, broken, metadata=meta)
    with pytest.raises(ValueError, match="missing tensors 'gain.values'"):
        SparseDelta.load(broken)
    save_file(tensors, broken, metadata={**meta, "childopt.format_version": "99"})
    with pytest.raises(ValueError, match="format version '99' is not supported"):
        SparseDelta.load(broken)
    save_file({**tensors, "stray": torch.zeros(1)}, broken, metadata=meta)
    with pytest.raises(ValueError, match="belong to no entry: 'stray'"):
        SparseDelta.load(broken)


@pytest.mark.parametrize("spec,match", [
    ({"shape": "3x4", "dtype": "float32"}, r"entry 'w': shape must be a list of non-negative ints, got '3x4'"),
    ({"shape": [2.7, 4], "dtype": "float32"}, r"entry 'w': shape must be a list of non-negative ints, got \[2.7, 4\]"),
    ({"shape": [-3, 4], "dtype": "float32"}, r"entry 'w': shape must be non-negative ints .* got \[-3, 4\]"),
    ({"shape": [3, 4], "dtype": 3}, r"entry 'w' has dtype 3; expected one of 'float16', 'bfloat16'"),
    ([3, 4], r"entry 'w' must be an object with exactly the keys 'shape' and 'dtype' \(and optionally 'aliases' "
             r"and 'base_sha256'\), got \[3, 4\]"),
])
def test_malformed_layout_metadata_says_what_was_expected(tmp_path, spec, match):
    path = tmp_path / "delta.safetensors"
    SparseDelta({"w": DeltaEntry((3, 4), torch.float32, torch.tensor([1, 5]), torch.ones(2).double())}).save(path)
    with safe_open(path, framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    save_file(tensors, path, metadata={**meta, "childopt.entries": json.dumps({"w": spec})})
    with pytest.raises(DeltaFormatError, match=match) as err:
        SparseDelta.load(path)
    assert str(path) in str(err.value) and isinstance(err.value, ValueError)


def test_version_1_files_without_a_checksum_still_load_and_unknown_reserved_keys_do_not(tmp_path):
    path = tmp_path / "v1.safetensors"
    layout = json.dumps({"w": {"shape": [3], "dtype": "bfloat16"}})
    v1 = {"childopt.format": "childopt.sparse_delta", "childopt.format_version": "1", "childopt.entries": layout,
          "base_model": "tiny"}
    tensors = {"w.indices": torch.tensor([0, 2], dtype=torch.int32), "w.values": torch.tensor([0.5, -1.0])}
    save_file(tensors, path, metadata=v1)
    loaded = SparseDelta.load(path)
    assert loaded.metadata == {"base_model": "tiny"} and loaded.entries["w"].values.tolist() == [0.5, -1.0]
    save_file(tensors, path, metadata={**v1, "childopt.sha256": "0" * 64})
    with pytest.raises(DeltaFormatError, match="keys that format version '1' does not define: 'childopt.sha256'"):
        SparseDelta.load(path)
    save_file(tensors, path, metadata={**v1, "childopt.format_version": "2"})
    with pytest.raises(DeltaFormatError, match="format version '2' needs metadata keys 'childopt.sha256'"):
        SparseDelta.load(path)


def test_version_2_files_still_apply_unchecked_and_cannot_hold_version_3_keys(tmp_path):
    """Files before version 3 hold no base fingerprints or aliases: they load and apply to any
    base of the right layout, as they did."""
    base = make_base(torch.float32)
    tuned, *_ = tune(base, seed=12)
    path = tmp_path / "v2.safetensors"
    SparseDelta.extract(base, tuned).save(path)
    with safe_open(path, framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    layout = {name: {"shape": spec["shape"], "dtype": spec["dtype"]}
              for name, spec in json.loads(meta["childopt.entries"]).items()}

    def save_v2(entries_layout):
        v2 = {**meta, "childopt.format_version": "2", "childopt.entries": json.dumps(entries_layout)}
        save_file(tensors, path, metadata={**v2, "childopt.sha256": delta_file.checksum(v2, tensors)})

    save_v2(layout)
    loaded = SparseDelta.load(path)
    assert all(e.base_sha256 is None and e.aliases == () for e in loaded.entries.values())
    other = make_base(torch.float32, seed=1)
    target = clone(other)
    loaded.apply_to(target)
    assert_bitwise_equal(target, {n: (other[n].double() + tuned[n].double() - base[n].double()).float() for n in base})
    save_v2({**layout, "gain": {**layout["gain"], "aliases": ["other"]}})
    with pytest.raises(DeltaFormatError, match="entry 'gain' must be an object with exactly the keys 'shape' and "
                                               "'dtype', got"):
        SparseDelta.load(path)


def test_a_truncated_file_is_a_clear_error(tmp_path):
    path = tmp_path / "delta.safetensors"
    SparseDelta({"w": DeltaEntry((4,), torch.float32, torch.tensor([1]), torch.ones(1).double())}).save(path)
    path.write_bytes(path.read_bytes()[:-3])
    with pytest.raises(DeltaFormatError, match="is not a readable safetensors file"):
        SparseDelta.load(path)


def test_a_directory_is_named_as_such(tmp_path):
    (tmp_path / "delta.safetensors").mkdir()
    with pytest.raises(DeltaFormatError, match="delta.safetensors is a directory, not a delta file"):
        SparseDelta.load(tmp_path / "delta.safetensors")


# --- random deltas ------------------------------------------------------------------------------


@st.composite
def entries(draw, min_indices=0):
    """A valid DeltaEntry: shape of up to 3 dims (sizes 0-5), any dtype, a random sorted index set."""
    dtype = draw(st.sampled_from(list(WIDE_DTYPES)))
    shape = tuple(draw(st.lists(st.integers(1 if min_indices else 0, 5), min_size=1 if min_indices else 0,
                                max_size=3)))
    numel = math.prod(shape)
    if numel < min_indices:
        shape, numel = shape + (min_indices,), numel * min_indices
    chosen = sorted(draw(st.sets(st.integers(0, numel - 1), min_size=min_indices, max_size=numel))) if numel else []
    wide = WIDE_DTYPES[dtype]
    floats = st.floats(width=32 if wide == torch.float32 else 64)  # NaN, infinities, subnormals, -0.0
    values = draw(st.lists(floats, min_size=len(chosen), max_size=len(chosen)))
    index_dtype = draw(st.sampled_from([torch.int32, torch.int64]))
    base_sha256 = draw(st.none() | st.text("0123456789abcdef", min_size=64, max_size=64))
    return DeltaEntry(shape, dtype, torch.tensor(chosen, dtype=index_dtype), torch.tensor(values, dtype=wide),
                      base_sha256=base_sha256)


NAMES = st.text(min_size=1, max_size=8)
USER_METADATA = st.dictionaries(NAMES.filter(lambda k: not k.startswith("childopt.")), st.text(max_size=8),
                                max_size=3)


@st.composite
def deltas(draw, min_entries=0, min_indices=0):
    """A valid SparseDelta with user metadata; the first entry has at least ``min_indices`` indices.
    Entries may have aliases (names of no other entry) and base fingerprints."""
    names = draw(st.lists(NAMES, min_size=min_entries, max_size=6, unique=True))
    count = draw(st.integers(min_entries, min(len(names), 4)))
    found = {name: draw(entries(min_indices if i == 0 else 0)) for i, name in enumerate(names[:count])}
    for alias in names[count:] if found else []:
        found[draw(st.sampled_from(list(found)))].aliases += (alias,)
    return SparseDelta(found, draw(USER_METADATA))


def assert_same_delta(got, want):
    """Same names in the same order, shapes, dtypes, index dtypes and bit patterns, and metadata."""
    assert got.metadata == want.metadata
    assert list(got.entries) == list(want.entries)
    for name, w in want.entries.items():
        g = got.entries[name]
        assert (g.shape, g.dtype, g.aliases, g.base_sha256) == (w.shape, w.dtype, w.aliases, w.base_sha256), name
        assert g.indices.dtype == w.indices.dtype and torch.equal(g.indices, w.indices), name
        assert g.values.dtype == w.values.dtype and torch.equal(bits(g.values), bits(w.values)), name


def saved(delta):
    """(path, temporary directory) of ``delta`` saved to a fresh file."""
    folder = tempfile.TemporaryDirectory()
    path = os.path.join(folder.name, "delta.safetensors")
    delta.save(path)
    return path, folder


def dense_oracle(base, entry, scale):
    """The dense formula at the stored entries, ``base`` elsewhere (no indexing of ``base``)."""
    wide = WIDE_DTYPES[entry.dtype]
    stored = torch.zeros(base.numel(), dtype=torch.bool)
    dense = torch.zeros(base.numel(), dtype=wide)
    for i, v in zip(entry.indices.tolist(), entry.values.tolist()):
        stored[i], dense[i] = True, v
    formula = (base.reshape(-1).to(wide) + dense * scale).to(entry.dtype)
    return torch.where(stored, formula, base.reshape(-1)).view(base.shape)


# --- valid deltas ------------------------------------------------------------------------------------

@FAST
@given(delta=deltas(), scale=st.sampled_from([1.0, -1.0, 0.5, 3.0, 0.0, -2.25]), seed=st.integers(0, 2**16))
def test_random_deltas_round_trip_exactly_and_apply_as_the_dense_formula(delta, scale, seed):
    path, folder = saved(delta)
    with folder:
        loaded = SparseDelta.load(path)
    assert_same_delta(loaded, delta)

    gen = torch.Generator().manual_seed(seed)
    base = {name: (torch.randn(e.shape, generator=gen) * 4).to(e.dtype) for name, e in delta.entries.items()}
    target = {name: t.clone() for name, t in base.items()}
    loaded.apply_to(target, scale=scale, check_base=False)  # the fingerprints are random
    for name, entry in delta.entries.items():
        want, got = dense_oracle(base[name], entry, scale), target[name]
        same = (bits(got) == bits(want)) | (got.isnan() & want.isnan())
        assert same.all(), name


@FAST
@given(delta=deltas(min_entries=1, min_indices=1), seed=st.integers(0, 2**16), at=st.integers(0, 2**16))
def test_apply_checks_the_base_at_the_stored_entries_against_an_independent_sha256(delta, seed, at):
    gen = torch.Generator().manual_seed(seed)
    base = {name: (torch.randn(e.shape, generator=gen) * 4).to(e.dtype) for name, e in delta.entries.items()}
    for name, e in delta.entries.items():
        e.base_sha256 = hashlib.sha256(bits(base[name]).reshape(-1)[e.indices.long()].numpy().tobytes()).hexdigest()
    delta.apply_to(clone(base))  # the right base passes
    name = next(iter(delta.entries))
    other = clone(base)
    bits(other[name]).view(-1)[delta.entries[name].indices[at % delta.entries[name].num_entries]] ^= 1
    before = clone(other)
    with pytest.raises(ValueError, match=f"stored entries of {re.escape(repr(name))}.* differ from the base"):
        delta.apply_to(other)
    assert_bitwise_equal(other, before)


# --- damaged files ----------------------------------------------------------------------------------

def load_or_error(path, original):
    """Load ``path``: either DeltaFormatError naming the file, or exactly ``original``."""
    try:
        loaded = SparseDelta.load(path)
    except DeltaFormatError as err:
        assert path in str(err)
        return str(err)
    assert_same_delta(loaded, original)
    return None


@MANY
@given(delta=deltas(), where=st.floats(0, 1, exclude_max=True))
def test_truncated_files_raise(delta, where):
    path, folder = saved(delta)
    with folder:
        data = open(path, "rb").read()
        with open(path, "wb") as f:
            f.write(data[: int(where * len(data))])
        assert load_or_error(path, delta) is not None


@MANY
@given(delta=deltas(), in_data=st.booleans(), where=st.floats(0, 1, exclude_max=True), mask=st.integers(1, 255))
def test_flipped_bytes_raise_or_change_nothing(delta, in_data, where, mask):
    """A byte anywhere, or (half the examples) in the tensor data after the JSON header."""
    path, folder = saved(delta)
    with folder:
        data = bytearray(open(path, "rb").read())
        start = 8 + int.from_bytes(data[:8], "little") if in_data else 0
        if start == len(data):  # no tensor data (an empty delta): flip anywhere
            start = 0
        at = start + int(where * (len(data) - start))
        data[at] ^= mask
        with open(path, "wb") as f:
            f.write(bytes(data))
        message = load_or_error(path, delta)
        if message is None:  # a flip between JSON whitespace characters of the header is all that may pass
            assert chr(data[at]) in " \t\n\r" and chr(data[at] ^ mask) in " \t\n\r"


def rewrite(path, change_meta=None, change_tensors=None):
    """Re-save the file at ``path`` with its metadata and tensors passed through the changes."""
    with safe_open(path, framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    save_file((change_tensors or dict)(tensors), path, metadata=(change_meta or dict)(meta))


BAD_SHAPES = ["3x4", 2.7, [2.7], [-3], [3, -1], [True], None, [None], [[2]], {"n": 2}, ["3"], [2**64],
              [2**40, 2**40]]
BAD_DTYPES = [3, None, "float8", "int32", ["float32"], "torch.float32"]
BAD_SPECS = [[3, 4], "x", None, {"shape": [1]}, {"shape": [1], "dtype": "float32", "extra": 1}]
LAYOUT_DAMAGE = {  # kind -> (the bad values, the message DeltaFormatError must contain)
    "shape": (BAD_SHAPES, "shape must be"),
    "dtype": (BAD_DTYPES, "has dtype"),
    "spec": (BAD_SPECS, "must be an object with exactly the keys 'shape' and 'dtype'"),
    "aliases": (["x", [1], [""], ["a", "a"], {"a": 1}, None, [["a"]]], "aliases must be a list of distinct"),
    "base_sha256": ([1, "abc", "g" * 64, "A" * 64, ["0" * 64], "0" * 63], "base_sha256 must be None or a SHA-256"),
}


def damage_layout(layout, name, kind, bad):
    """The layout metadata with one field of entry ``name`` (or its whole spec) replaced by ``bad``."""
    spec = bad if kind == "spec" else {**layout[name], kind: bad}
    return {**layout, name: spec}


@FAST
@given(delta=deltas(min_entries=1), kind=st.sampled_from(sorted(LAYOUT_DAMAGE)), choice=st.integers(0, 12))
def test_malformed_layout_metadata_names_the_file_the_entry_and_the_field(delta, kind, choice):
    bad_values, expected = LAYOUT_DAMAGE[kind]
    bad = bad_values[choice % len(bad_values)]
    name = next(iter(delta.entries))
    path, folder = saved(delta)
    with folder:
        def change(meta):
            layout = json.loads(meta["childopt.entries"])
            return {**meta, "childopt.entries": json.dumps(damage_layout(layout, name, kind, bad))}

        rewrite(path, change_meta=change)
        with pytest.raises(DeltaFormatError) as err:
            SparseDelta.load(path)
    assert path in str(err.value) and repr(name) in str(err.value) and expected in str(err.value)


@pytest.mark.parametrize("entries_json,expected", [
    ("[1, 2]", "must be a JSON object"),
    ('"w"', "must be a JSON object"),
    ("null", "must be a JSON object"),
    ("{", "is not valid JSON"),
    ("[" * 100_000, "is not valid JSON"),
])
def test_layout_metadata_that_is_no_object_is_a_clear_error(tmp_path, entries_json, expected):
    path = str(tmp_path / "delta.safetensors")
    SparseDelta({"w": DeltaEntry((3, 4), torch.float32, torch.tensor([1, 5]), torch.ones(2).double())}).save(path)
    rewrite(path, change_meta=lambda meta: {**meta, "childopt.entries": entries_json})
    with pytest.raises(DeltaFormatError, match=expected) as err:
        SparseDelta.load(path)
    assert path in str(err.value) and "'childopt.entries'" in str(err.value)


TENSOR_DAMAGE = {  # kind -> the message DeltaFormatError must contain
    "past the end": "inside [0,", "negative": "inside [0,", "unsorted": "strictly increasing",
    "duplicate": "strictly increasing", "int16 indices": "int32/int64", "float indices": "int32/int64",
    "2-D indices": "1-D", "one value short": "one per index", "one value more": "one per index",
    "values dtype": "one per index", "missing values": "missing tensors", "stray tensor": "belong to no entry",
}


def damage_tensors(tensors, name, numel, kind):
    """``tensors`` with entry ``name`` (at least 2 indices, ``numel`` elements) damaged as ``kind`` says."""
    idx, values = tensors[f"{name}.indices"], tensors[f"{name}.values"]
    if kind == "missing values":
        return {k: v for k, v in tensors.items() if k != f"{name}.values"}
    if kind == "stray tensor":
        return {**tensors, f"{name}.extra": torch.zeros(1)}
    new_idx = {"past the end": lambda: torch.cat([idx[:-1], idx.new_tensor([numel])]),
               "negative": lambda: torch.cat([idx.new_tensor([-1]), idx[1:]]),
               "unsorted": lambda: idx.flip(0),
               "duplicate": lambda: torch.cat([idx[:1], idx[:-1]]),
               "int16 indices": lambda: idx.to(torch.int16),
               "float indices": lambda: idx.double(),
               "2-D indices": lambda: idx.view(1, -1)}.get(kind, lambda: idx)()
    new_values = {"one value short": lambda: values[:-1],
                  "one value more": lambda: torch.cat([values, values[:1]]),
                  "values dtype": lambda: values.half()}.get(kind, lambda: values)()
    return {**tensors, f"{name}.indices": new_idx, f"{name}.values": new_values}


@FAST
@given(delta=deltas(min_entries=1, min_indices=2), kind=st.sampled_from(sorted(TENSOR_DAMAGE)))
def test_damaged_tensors_name_the_file_and_the_entry(delta, kind):
    name = next(iter(delta.entries))
    numel, expected = delta.entries[name].numel, TENSOR_DAMAGE[kind]
    path, folder = saved(delta)
    with folder:
        rewrite(path, change_tensors=lambda tensors: damage_tensors(tensors, name, numel, kind))
        with pytest.raises(DeltaFormatError) as err:
            SparseDelta.load(path)
    assert path in str(err.value) and repr(name)[1:-1] in str(err.value) and expected in str(err.value)


@FAST
@given(delta=deltas(min_entries=1, min_indices=1), edit=st.sampled_from(["value bit", "metadata"]))
def test_a_well_formed_but_different_file_fails_the_checksum(delta, edit):
    """A flipped bit of a value (NaN and infinity included) or an added metadata key keeps the
    file well formed: only the checksum can tell, and it must."""
    name = next(iter(delta.entries))
    path, folder = saved(delta)

    def flip_lowest_bit(tensors):
        values = tensors[f"{name}.values"].clone()
        bits(values)[0] ^= 1
        return {**tensors, f"{name}.values": values}

    with folder:
        if edit == "value bit":
            rewrite(path, change_tensors=flip_lowest_bit)
        else:
            rewrite(path, change_meta=lambda meta: {**meta, "note": "edited"})
        with pytest.raises(DeltaFormatError, match="do not match 'childopt.sha256'") as err:
            SparseDelta.load(path)
    assert path in str(err.value)
