"""Property-based tests (hypothesis) of the sparse delta file format.

Random valid deltas (shapes with zero-size dimensions, every dtype, int32/int64 index sets
including empty ones, values with NaN, infinities and signed zeros) must round trip bit for bit
through save/load, and ``apply_to`` must equal a dense oracle: the formula on the whole tensor,
``(base.wide + scale * dense_delta).to(dtype)`` where an entry is stored and ``base`` elsewhere.
Corrupted files (truncated, a byte flipped, the layout metadata or the tensors altered) must
raise DeltaFormatError naming the file, or, for a flip that changes nothing the file means
(whitespace in the header), load the very same delta: never crash, never load another delta.
No hypothesis database is written (``database=None``).
"""
import json
import math
import os
import tempfile

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save_file

from childopt.deltas import WIDE_DTYPES, DeltaEntry, DeltaFormatError, SparseDelta

INT_OF = {torch.float64: torch.int64, torch.float32: torch.int32, torch.bfloat16: torch.int16,
          torch.float16: torch.int16}
FAST = settings(max_examples=60, deadline=None, database=None)
MANY = settings(max_examples=150, deadline=None, database=None)


def bits(t):
    """Bit patterns, so that -0.0 != 0.0 and NaN payloads count."""
    return t.view(INT_OF[t.dtype]) if t.is_floating_point() else t


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
    return DeltaEntry(shape, dtype, torch.tensor(chosen, dtype=index_dtype), torch.tensor(values, dtype=wide))


NAMES = st.text(min_size=1, max_size=8)
USER_METADATA = st.dictionaries(NAMES.filter(lambda k: not k.startswith("childopt.")), st.text(max_size=8),
                                max_size=3)


@st.composite
def deltas(draw, min_entries=0, min_indices=0):
    """A valid SparseDelta with user metadata; the first entry has at least ``min_indices`` indices."""
    names = draw(st.lists(NAMES, min_size=min_entries, max_size=4, unique=True))
    found = {name: draw(entries(min_indices if i == 0 else 0)) for i, name in enumerate(names)}
    return SparseDelta(found, draw(USER_METADATA))


def assert_same_delta(got, want):
    """Same names in the same order, shapes, dtypes, index dtypes and bit patterns, and metadata."""
    assert got.metadata == want.metadata
    assert list(got.entries) == list(want.entries)
    for name, w in want.entries.items():
        g = got.entries[name]
        assert (g.shape, g.dtype) == (w.shape, w.dtype), name
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
    loaded.apply_to(target, scale=scale)
    for name, entry in delta.entries.items():
        want, got = dense_oracle(base[name], entry, scale), target[name]
        same = (bits(got) == bits(want)) | (got.isnan() & want.isnan())
        assert same.all(), name


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
}


def damage_layout(layout, name, kind, bad):
    """The layout metadata with entry ``name``'s shape, dtype or whole spec replaced by ``bad``."""
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
