"""Sparse deltas (childopt.deltas) against dense oracles computed here from their definitions.

Oracles: the tuned weights themselves (round trips must be bit-identical), the dense formula
``(base.wide + scale * (tuned.wide - base.wide)).to(dtype)``, dense sums of deltas for merge,
and safetensors read directly for the file format.  Bitwise comparisons view floats as integers,
so that -0.0 != 0.0 and NaN payloads count.
"""
import copy
import hashlib

import pytest
import torch

from childopt.deltas import WIDE_DTYPES, DeltaEntry, SparseDelta, indices_from_mask

SHAPES = {"embed.weight": (11, 6), "block.0.weight": (3, 4, 5), "block.0.bias": (5,), "gain": ()}
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
INT_OF = {torch.float32: torch.int32, torch.float64: torch.int64, torch.bfloat16: torch.int16,
          torch.float16: torch.int16}


def bits(t):
    """The bit pattern of a float tensor, for comparisons that tell -0.0 from 0.0."""
    return t.view(INT_OF[t.dtype])


def assert_bitwise_equal(xs, ys):
    assert xs.keys() == ys.keys()
    for name in xs:
        assert xs[name].dtype == ys[name].dtype, name
        assert torch.equal(bits(xs[name]), bits(ys[name])), name


def clone(tensors):
    """Independent copies of a name -> tensor mapping."""
    return {name: t.clone() for name, t in tensors.items()}


def make_base(dtype, seed=0):
    """Random base weights of SHAPES (a 0-d tensor among them)."""
    gen = torch.Generator().manual_seed(seed)
    return {name: torch.randn(shape, generator=gen).to(dtype) for name, shape in SHAPES.items()}


def tune(base, seed, density=0.3):
    """(tuned, chosen, exact): base plus random steps at random flat indices ``chosen``.

    ``exact`` holds base + step in float64; tuned holds it rounded to the dtype.  Steps span
    1e-4 to 1 in magnitude, so most round and, in bf16/fp16, some vanish entirely.
    """
    gen = torch.Generator().manual_seed(seed)
    tuned, chosen, exact = clone(base), {}, {}
    for name, t in tuned.items():
        idx = torch.nonzero(torch.rand(t.numel(), generator=gen) < density).reshape(-1)
        step = torch.randn(idx.numel(), generator=gen, dtype=torch.float64)
        step *= 10.0 ** torch.randint(-4, 1, (idx.numel(),), generator=gen)
        flat = t.view(-1)
        exact[name] = flat[idx].double() + step
        flat[idx] = exact[name].to(t.dtype)
        chosen[name] = idx
    return tuned, chosen, exact


def dense_delta(base, tuned, name):
    """``tuned - base`` of one tensor, dense, in the wide dtype."""
    wide = WIDE_DTYPES[base[name].dtype]
    return tuned[name].to(wide) - base[name].to(wide)


# --- round trips -------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("explicit", [False, True], ids=["bitwise-diff", "explicit-indices"])
def test_extract_apply_reproduces_tuned_bit_for_bit(dtype, explicit):
    base = make_base(dtype)
    tuned, chosen, exact = tune(base, seed=1)
    moved = {n: tuned[n].double() - base[n].double() for n in base}
    # the data must exercise rounding: tuned values are base + step rounded to the dtype
    assert any((tuned[n].view(-1)[chosen[n]].double() != exact[n]).any() for n in base)

    delta = SparseDelta.extract(base, tuned, indices=chosen if explicit else None)
    target = clone(base)
    assert delta.apply_to(target) is target
    assert_bitwise_equal(target, tuned)

    for name, entry in delta.entries.items():
        assert entry.shape == tuple(SHAPES[name]) and entry.dtype == dtype
        assert entry.indices.dtype == torch.int32 and entry.values.dtype == WIDE_DTYPES[dtype]
        expected = chosen[name] if explicit else torch.nonzero(moved[name].reshape(-1)).reshape(-1)
        assert torch.equal(entry.indices.long(), expected)
    if not explicit:  # unchanged tensors are omitted
        assert set(delta.entries) == {n for n in base if moved[n].any()}


def test_explicit_indices_are_sorted_and_deduplicated():
    base = make_base(torch.float32)
    tuned, *_ = tune(base, seed=2)
    given = torch.tensor([7, 3, 3, 0, 7], dtype=torch.int64)
    delta = SparseDelta.extract(base, tuned, indices={"embed.weight": given}, outside="drop")
    entry = delta.entries["embed.weight"]
    assert list(delta.entries) == ["embed.weight"]
    assert entry.indices.tolist() == [0, 3, 7] and entry.indices.dtype == torch.int32
    flat_b, flat_t = base["embed.weight"].view(-1).double(), tuned["embed.weight"].view(-1).double()
    assert entry.values.tolist() == (flat_t - flat_b)[[0, 3, 7]].tolist()


def test_changes_outside_the_indices_raise_by_default_naming_them():
    base = make_base(torch.float32)
    tuned, chosen, _ = tune(base, seed=3)
    part = {"embed.weight": chosen["embed.weight"][:-2], "gain": chosen["gain"]}  # two changed entries left out
    with pytest.raises(ValueError, match=r"outside the given indices: 'embed.weight' \(2 entries\), "
                                         r"'block.0.weight' \(\d+ entries\), 'block.0.bias'.*outside='store'"):
        SparseDelta.extract(base, tuned, indices=part)
    with pytest.raises(ValueError, match="outside must be one of 'raise', 'store', 'drop', got 'keep'"):
        SparseDelta.extract(base, tuned, indices=part, outside="keep")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_outside_store_rebuilds_tuned_and_drop_keeps_only_the_indices(dtype):
    base = make_base(dtype)
    tuned, chosen, _ = tune(base, seed=4)
    part = {"embed.weight": chosen["embed.weight"][::2]}
    stored = SparseDelta.extract(base, tuned, indices=part, outside="store")
    target = clone(base)
    stored.apply_to(target)
    assert_bitwise_equal(target, tuned)
    assert stored.entries.keys() == SparseDelta.extract(base, tuned).entries.keys()
    changed = torch.nonzero((bits(tuned["embed.weight"]) != bits(base["embed.weight"])).reshape(-1)).reshape(-1)
    given_or_changed = torch.unique(torch.cat([chosen["embed.weight"][::2], changed]))  # bf16 drops some steps
    assert torch.equal(stored.entries["embed.weight"].indices.long(), given_or_changed)
    dropped = SparseDelta.extract(base, tuned, indices=part, outside="drop")
    assert list(dropped.entries) == ["embed.weight"]
    assert torch.equal(dropped.entries["embed.weight"].indices.long(), chosen["embed.weight"][::2])


def test_indices_that_cover_every_change_need_no_outside():
    base = make_base(torch.float32)
    tuned, chosen, _ = tune(base, seed=5)
    unchanged = {n: t for n, t in tuned.items() if n != "gain"} | {"gain": base["gain"].clone()}
    delta = SparseDelta.extract(base, unchanged, indices={n: i for n, i in chosen.items() if n != "gain"})
    assert "gain" not in delta.entries

def test_nan_and_signed_zero():
    """Selection is bitwise, so an unchanged NaN is no entry; addition cannot restore a zero's sign."""
    nan = float("nan")
    base = {"w": torch.tensor([nan, 1.0, 0.0, 2.0, -0.0])}
    tuned = {"w": torch.tensor([nan, nan, -0.0, 2.0, -0.0])}
    delta = SparseDelta.extract(base, tuned)
    assert delta.entries["w"].indices.tolist() == [1, 2]
    target = clone(base)
    delta.apply_to(target)
    assert target["w"][:2].isnan().all() and target["w"][2:].tolist() == [0.0, 2.0, 0.0]
    assert torch.equal(bits(target["w"][4:]), bits(tuned["w"][4:]))
    assert not torch.equal(bits(target["w"][2:3]), bits(tuned["w"][2:3]))  # 0.0 + -0.0 is 0.0


def test_indices_from_mask_gives_the_true_entries():
    mask = torch.zeros(3, 4, dtype=torch.bool)
    mask[0, 1] = mask[2, 3] = mask[1, 0] = True
    idx = indices_from_mask(mask)
    assert idx.dtype == torch.int32 and idx.tolist() == [1, 4, 11]


# --- scale and merge ---------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_apply_with_scale_is_the_dense_formula(dtype):
    base = make_base(dtype)
    tuned, *_ = tune(base, seed=4)
    target = clone(base)
    SparseDelta.extract(base, tuned).apply_to(target, scale=0.5)
    for name in base:
        wide = WIDE_DTYPES[dtype]
        expected = (base[name].to(wide) + 0.5 * dense_delta(base, tuned, name)).to(dtype)
        assert torch.equal(bits(target[name]), bits(expected)), name


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_merge_is_the_weighted_sum_of_deltas(dtype):
    base = make_base(dtype)
    (t1, *_), (t2, *_) = tune(base, seed=5, density=0.5), tune(base, seed=6, density=0.5)
    d1, d2 = SparseDelta.extract(base, t1), SparseDelta.extract(base, t2)
    name = "embed.weight"  # the index sets overlap, so some entries really are summed
    assert set(d1.entries[name].indices.tolist()) & set(d2.entries[name].indices.tolist())

    for weights in (None, (0.75, -2.0)):
        w1, w2 = weights or (1.0, 1.0)
        merged = SparseDelta.merge(d1, d2, weights=weights)
        target = clone(base)
        merged.apply_to(target)
        for name in base:
            wide = WIDE_DTYPES[dtype]
            summed = w1 * dense_delta(base, t1, name) + w2 * dense_delta(base, t2, name)
            assert torch.equal(bits(target[name]), bits((base[name].to(wide) + summed).to(dtype))), name
        for name, entry in merged.entries.items():
            union = torch.cat([d.entries[name].indices for d in (d1, d2) if name in d.entries]).unique()
            assert torch.equal(entry.indices, union.int())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_merged_delta_equals_deltas_applied_in_turn(dtype):
    """On a dyadic grid every sum is exact in the parameter dtype, so the two agree bit for bit."""
    gen = torch.Generator().manual_seed(7)

    def grid(shape, top):  # multiples of 2**-6 below `top` in magnitude: at most 8 significant bits
        return (torch.randint(-top * 64 + 1, top * 64, shape, generator=gen) / 64).to(dtype)

    base = {name: grid(shape, 1) for name, shape in SHAPES.items()}
    deltas = []
    for _ in range(3):
        moved = {name: torch.rand(t.shape, generator=gen) < 0.5 for name, t in base.items()}
        tuned = {name: t + grid(t.shape, 1) * moved[name] for name, t in base.items()}
        deltas.append(SparseDelta.extract(base, tuned))
    in_turn, at_once = clone(base), clone(base)
    deltas[0].apply_to(in_turn)
    before = clone(in_turn)
    with pytest.raises(ValueError, match="differ from the base the delta was extracted from"):
        deltas[1].apply_to(in_turn)  # its base is not the target: say so, unless asked not to
    assert_bitwise_equal(in_turn, before)
    for delta in deltas[1:]:
        delta.apply_to(in_turn, check_base=False)
    merged = SparseDelta.merge(*deltas)
    merged.apply_to(at_once)
    assert_bitwise_equal(at_once, in_turn)
    # a merged entry keeps the base fingerprint where all its parts share it (same indices, same base)
    assert all(merged.entries[n].base_sha256 is None for n in merged.entries if n != "gain")
    same = SparseDelta.merge(deltas[0], deltas[0], weights=[0.5, 0.5])
    assert [e.base_sha256 for e in same.entries.values()] == [e.base_sha256 for e in deltas[0].entries.values()]


# --- modules, layouts, devices -----------------------------------------------------------------

class Small(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(4, 3)
        self.norm = torch.nn.LayerNorm(3)
        self.register_buffer("temperature", torch.ones(3))


def test_apply_to_module_changes_parameters_and_buffers():
    torch.manual_seed(0)
    base_model = Small()
    tuned_model = copy.deepcopy(base_model)
    with torch.no_grad():
        tuned_model.linear.weight[1, 2] += 0.25
        tuned_model.norm.bias[0] -= 1e-3
        tuned_model.temperature[2] = 0.5
    delta = SparseDelta.extract(base_model.state_dict(), tuned_model.state_dict())
    assert set(delta.entries) == {"linear.weight", "norm.bias", "temperature"}
    assert delta.num_entries == 3

    target = copy.deepcopy(base_model)
    assert delta.apply_to(target) is target
    assert_bitwise_equal(target.state_dict(), tuned_model.state_dict())
    assert target.linear.weight.requires_grad  # still the module's own parameters

    from_modules = SparseDelta.extract(base_model, tuned_model)  # modules work as inputs too
    assert not any(e.values.requires_grad for e in from_modules.entries.values())
    assert from_modules.entries.keys() == delta.entries.keys()


class Tied(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(5, 3)
        self.head = torch.nn.Linear(3, 5, bias=False)
        self.head.weight = self.embed.weight


def test_tied_weights_are_stored_once_and_changed_once():
    torch.manual_seed(0)
    base_model = Tied()
    base = clone(base_model.state_dict())  # two separate copies of the tied weight
    tuned_model = copy.deepcopy(base_model)
    with torch.no_grad():
        tuned_model.embed.weight[2, 1] += 1.0
    tuned = tuned_model.state_dict()
    assert set(tuned) == {"embed.weight", "head.weight"}

    delta = SparseDelta.extract(base, tuned)
    assert list(delta.entries) == ["embed.weight"]
    target = copy.deepcopy(base_model)
    delta.apply_to(target)
    assert_bitwise_equal(target.state_dict(), tuned)

    twice = SparseDelta.extract(base, clone(tuned))  # untied copies: both names get an entry
    assert set(twice.entries) == {"embed.weight", "head.weight"}
    before = clone(target.state_dict())
    with pytest.raises(ValueError, match="'head.weight' and 'embed.weight' are the same tensor"):
        twice.apply_to(target)
    assert_bitwise_equal(target.state_dict(), before)


def test_a_tied_tensor_changes_every_copy_of_it_in_the_target(tmp_path):
    """A state-dict copy, or an untied model, holds the tied weight under each name as separate
    tensors (load_state_dict keeps the last one), so each copy must get the change."""
    torch.manual_seed(0)
    base_model = Tied()
    base = clone(base_model.state_dict())
    tuned_model = copy.deepcopy(base_model)
    with torch.no_grad():
        tuned_model.embed.weight[2, 1] += 1.0
    tuned = clone(tuned_model.state_dict())
    SparseDelta.extract(base, tuned_model.state_dict()).save(tmp_path / "tied.safetensors")
    delta = SparseDelta.load(tmp_path / "tied.safetensors")
    assert list(delta.entries) == ["embed.weight"] and delta.entries["embed.weight"].aliases == ("head.weight",)

    copies = clone(base)
    delta.apply_to(copies)
    model = copy.deepcopy(base_model)
    model.load_state_dict(copies)
    assert_bitwise_equal(model.state_dict(), tuned)
    untied = copy.deepcopy(base_model)
    untied.head.weight = torch.nn.Parameter(base["head.weight"].clone())
    delta.apply_to(untied)
    assert_bitwise_equal(untied.state_dict(), tuned)
    only_alias = {"head.weight": base["head.weight"].clone()}
    delta.apply_to(only_alias)
    assert_bitwise_equal(only_alias, {"head.weight": tuned["head.weight"]})

    stale = clone(base)
    stale["head.weight"][2, 1] += 0.5  # a copy that no longer holds the base at the stored entry
    before = clone(stale)
    with pytest.raises(ValueError, match=r"stored entries of 'head.weight' differ from the base"):
        delta.apply_to(stale)
    with pytest.raises(ValueError, match=r"'embed.weight', 'head.weight' were one tied tensor .* differ"):
        delta.apply_to(stale, check_base=False)
    assert_bitwise_equal(stale, before)


@pytest.mark.parametrize("outside", ["raise", "store", "drop"])
def test_indices_given_under_each_tied_name_are_joined(outside):
    """Indices listed under both names of a tied tensor are stored together, under its first name."""
    torch.manual_seed(0)
    base_model = Tied()
    base = clone(base_model.state_dict())
    tuned_model = copy.deepcopy(base_model)
    with torch.no_grad():
        tuned_model.embed.weight.view(-1)[[1, 7, 13]] += 1.0
    indices = {"embed.weight": torch.tensor([1, 7]), "head.weight": torch.tensor([13, 7], dtype=torch.int32)}
    delta = SparseDelta.extract(base, tuned_model.state_dict(), indices, outside=outside)
    assert list(delta.entries) == ["embed.weight"]
    assert delta.entries["embed.weight"].indices.tolist() == [1, 7, 13]
    target = copy.deepcopy(base_model)
    delta.apply_to(target)
    assert_bitwise_equal(target.state_dict(), tuned_model.state_dict())


def test_non_contiguous_tensors_are_written_in_place():
    base = {"w": torch.randn(5, 7).t()}
    tuned = clone(base)
    tuned["w"][3, 1] += 2.0
    tuned["w"][6, 4] -= 1.0
    target = clone(base)
    storage = target["w"].data_ptr()
    assert not target["w"].is_contiguous()
    SparseDelta.extract(base, tuned).apply_to(target)
    assert target["w"].data_ptr() == storage
    assert_bitwise_equal(target, tuned)


@pytest.mark.cuda
def test_deltas_move_between_cpu_and_cuda():
    base = make_base(torch.bfloat16)
    tuned, *_ = tune(base, seed=9)
    cpu_delta = SparseDelta.extract(base, tuned)
    on_cuda = {n: t.cuda() for n, t in base.items()}
    cpu_delta.apply_to(on_cuda)
    assert_bitwise_equal({n: t.cpu() for n, t in on_cuda.items()}, tuned)

    cuda_delta = SparseDelta.extract(base, {n: t.cuda() for n, t in tuned.items()})  # CPU base snapshot
    assert all(e.indices.is_cuda and e.values.is_cuda for e in cuda_delta.entries.values())
    on_cpu = clone(base)
    SparseDelta.merge(cuda_delta, cpu_delta, weights=[0.5, 0.5]).apply_to(on_cpu)
    assert_bitwise_equal(on_cpu, tuned)


# --- bad input ---------------------------------------------------------------------------------

def test_a_base_that_is_the_live_model_is_refused_but_a_partly_shared_one_is_not():
    """base = model.state_dict() without a copy is the tuned tensors themselves after training: the
    delta would be empty (or all zeros at given indices).  A base that shares only the tensors
    training left alone (a copy of the rest, to save memory) is a real base."""
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    live = model.state_dict()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    with pytest.raises(ValueError, match=r"every tensor of base is the tuned tensor itself .*v\.clone\(\)"):
        SparseDelta.extract(live, model.state_dict())
    with pytest.raises(ValueError, match="every tensor of base is the tuned tensor itself"):
        SparseDelta.extract(live, model.state_dict(), indices={n: torch.arange(2) for n in live}, outside="store")

    tuned = model.state_dict()
    base = {name: t if name.startswith("1.") else (t - 1.0) for name, t in tuned.items()}
    delta = SparseDelta.extract(base, tuned)
    assert sorted(delta.entries) == ["0.bias", "0.weight"]
    assert all(torch.equal(e.values, torch.ones_like(e.values)) for e in delta.entries.values())

def test_delta_for_another_model_raises_before_modifying_anything():
    base = make_base(torch.float32)
    tuned, *_ = tune(base, seed=10, density=1.0)
    delta = SparseDelta.extract(base, tuned)
    assert list(delta.entries)[-1] == "gain"  # earlier entries would be written first if unchecked

    lacking = clone(base)
    del lacking["gain"]
    before = clone(lacking)
    with pytest.raises(ValueError, match=r"target lacks tensors the delta changes: 'gain'"):
        delta.apply_to(lacking)
    assert_bitwise_equal(lacking, before)

    reshaped = clone(base)
    reshaped["gain"] = torch.zeros(2)
    before = clone(reshaped)
    with pytest.raises(ValueError, match=r"'gain': the delta has shape \(\) .* the target has shape \(2,\)"):
        delta.apply_to(reshaped)
    assert_bitwise_equal(reshaped, before)

    other_dtype = {n: t.to(torch.float64) for n, t in base.items()}
    with pytest.raises(ValueError, match=r"'embed.weight': .*float32.*float64"):
        delta.apply_to(other_dtype)


@pytest.mark.parametrize("check_base", [None, 0, [], "False", torch.tensor(False)])
def test_check_base_takes_a_bool_only(check_base):
    """A falsy stand-in would silently turn the base check off."""
    base = make_base(torch.float32)
    tuned, *_ = tune(base, seed=12, density=0.5)
    target = clone(base)
    with pytest.raises(TypeError, match="check_base must be a bool"):
        SparseDelta.extract(base, tuned).apply_to(target, check_base=check_base)
    assert_bitwise_equal(target, base)


def test_apply_refuses_a_base_that_differs_where_the_delta_stores_entries():
    """The base's values at the stored entries are what the delta depends on; their SHA-256 is
    recorded at extract and compared before anything is written."""
    base = make_base(torch.bfloat16)
    tuned, *_ = tune(base, seed=12, density=0.5)
    delta = SparseDelta.extract(base, tuned)
    for name, e in delta.entries.items():  # an independent oracle of the fingerprint
        assert e.base_sha256 == hashlib.sha256(bits(base[name]).reshape(-1)[e.indices.long()].numpy()).hexdigest()
    other = clone(base)
    for name in ("embed.weight", "block.0.bias"):  # as a head drawn anew at each from_pretrained
        other[name].view(-1)[delta.entries[name].indices[-1]] += 1.0
    unstored = torch.ones(other["block.0.weight"].numel(), dtype=torch.bool)
    unstored[delta.entries["block.0.weight"].indices.long()] = False
    other["block.0.weight"].view(-1)[unstored] = 7.0  # values the delta does not depend on: not checked
    before = clone(other)
    with pytest.raises(ValueError, match=r"stored entries of 'embed.weight', 'block.0.bias' differ from the base "
                                         r".*check_base=False"):
        delta.apply_to(other)
    assert_bitwise_equal(other, before)
    delta.apply_to(other, check_base=False)
    wide = WIDE_DTYPES[torch.bfloat16]
    assert_bitwise_equal(other, {n: (before[n].to(wide) + dense_delta(base, tuned, n)).to(torch.bfloat16)
                                 for n in base})
    target = clone(base)
    target["block.0.weight"].view(-1)[unstored] = 7.0
    delta.apply_to(target)
    assert torch.equal(bits(target["embed.weight"]), bits(tuned["embed.weight"]))


def test_an_entry_added_by_hand_is_checked_before_anything_is_written(tmp_path):
    delta = SparseDelta({"weight": DeltaEntry((4, 4), torch.float32, torch.tensor([0]), torch.ones(1).double())})
    delta.entries["bias"] = DeltaEntry((4,), torch.float32, torch.tensor([7]), torch.ones(1).double())
    target = clone(torch.nn.Linear(4, 4).state_dict())
    before = clone(target)
    with pytest.raises(ValueError, match=r"'bias': indices must be strictly increasing and inside \[0, 4\)"):
        delta.apply_to(target)
    assert_bitwise_equal(target, before)
    with pytest.raises(ValueError, match=r"'bias': indices must be strictly increasing and inside \[0, 4\)"):
        delta.save(tmp_path / "delta.safetensors")
    assert not (tmp_path / "delta.safetensors").exists()
    delta.entries["bias"] = DeltaEntry((4,), torch.float32, torch.tensor([1]), torch.ones(1).double(), ("weight",))
    with pytest.raises(ValueError, match="'weight' is an alias of 'bias' and an entry of its own"):
        delta.apply_to(target)
    assert_bitwise_equal(target, before)


def test_indices_keyed_by_parameters_ask_for_named_parameters():
    from childopt import MaskedAdamW

    torch.manual_seed(0)
    net = torch.nn.Linear(64, 64)
    base = clone(net.state_dict())
    opt = MaskedAdamW(net.parameters(), lr=1e-2, mask={net.weight: torch.rand(64, 64) < 0.3}, storage="sparse")
    net(torch.randn(4, 64)).sum().backward()
    opt.step()
    with pytest.raises(TypeError, match=r"keyed by tensor names .*Parameter of shape \(64, 64\).*named_parameters\(\)"
                       ) as err:
        SparseDelta.extract(base, net.state_dict(), indices=opt.sparse_indices(), outside="store")
    assert len(str(err.value)) < 400  # no tensor printed whole


def test_extract_rejects_mismatched_inputs():
    base = make_base(torch.float32)
    tuned = clone(base)
    with pytest.raises(ValueError, match=r"only in base: 'gain'"):
        SparseDelta.extract(base, {n: t for n, t in tuned.items() if n != "gain"})
    with pytest.raises(ValueError, match=r"only in tuned: 'extra'"):
        SparseDelta.extract(base, {**tuned, "extra": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"'block.0.bias': base has shape \(5,\) .* tuned has shape \(6,\)"):
        SparseDelta.extract(base, {**tuned, "block.0.bias": torch.zeros(6)})
    with pytest.raises(ValueError, match=r"'gain': .*float32.*bfloat16"):
        SparseDelta.extract(base, {**tuned, "gain": tuned["gain"].bfloat16()})
    with pytest.raises(ValueError, match="indices given for tensors that base and tuned lack: 'nope'"):
        SparseDelta.extract(base, tuned, indices={"nope": torch.tensor([0])})
    with pytest.raises(TypeError, match="indices_from_mask"):
        SparseDelta.extract(base, tuned, indices={"gain": torch.tensor([True])})
    with pytest.raises(ValueError, match=r"indices\['block.0.bias'\].*\[0, 5\)"):
        SparseDelta.extract(base, tuned, indices={"block.0.bias": torch.tensor([1, 5])})


def test_extract_rejects_changes_it_cannot_store_exactly():
    base = {"ok": torch.zeros(2), "far": torch.tensor([1.0, 1e30]), "inf": torch.tensor([float("inf")])}
    tuned = {"ok": torch.ones(2), "far": torch.tensor([1.0, 1e-30]), "inf": torch.tensor([1.0])}
    with pytest.raises(ValueError, match=r"'far': 1 entries cannot be stored exactly .*flat index 1"):
        SparseDelta.extract(base, tuned)
    with pytest.raises(ValueError, match="'inf': 1 entries"):
        SparseDelta.extract(base, tuned, indices={"inf": torch.tensor([0])})


@pytest.mark.parametrize("outside", [None, "raise", "store"])
def test_integer_buffers_must_be_unchanged(outside):
    """A changed integer tensor raises the same TypeError with or without indices, whatever
    ``outside`` says (no choice of it could store one); ``"drop"`` leaves it alone, on purpose."""
    base = {"w": torch.zeros(3), "steps": torch.tensor(4)}
    options = {} if outside is None else {"indices": {"w": torch.arange(3)}, "outside": outside}
    assert list(SparseDelta.extract(base, {"w": torch.ones(3), "steps": torch.tensor(4)}, **options).entries) == ["w"]
    with pytest.raises(TypeError, match="'steps': sparse deltas hold floating-point tensors .* leave it out of base"):
        SparseDelta.extract(base, {"w": torch.ones(3), "steps": torch.tensor(5)}, **options)
    kept = SparseDelta.extract(base, {"w": torch.ones(3), "steps": torch.tensor(5)}, indices={"w": torch.arange(3)},
                               outside="drop")
    assert list(kept.entries) == ["w"]


def test_malformed_entries_and_metadata_raise(tmp_path):
    bad_values = DeltaEntry((4,), torch.bfloat16, torch.tensor([1]), torch.tensor([1.0]).double())
    with pytest.raises(ValueError, match="'w': values must be torch.float32"):
        SparseDelta({"w": bad_values})
    unsorted = DeltaEntry((4,), torch.float32, torch.tensor([2, 1]), torch.zeros(2, dtype=torch.float64))
    with pytest.raises(ValueError, match="'w': indices must be strictly increasing"):
        SparseDelta({"w": unsorted})
    delta = SparseDelta({"w": DeltaEntry((4,), torch.float32, torch.tensor([1]), torch.ones(1).double())})
    with pytest.raises(ValueError, match="reserved"):
        delta.save(tmp_path / "unused.safetensors", metadata={"childopt.format": "mine"})
    with pytest.raises(ValueError, match=r"'w': deltas\[0\] has shape \(4,\) .* deltas\[1\] has shape \(5,\)"):
        SparseDelta.merge(delta, SparseDelta({"w": DeltaEntry((5,), torch.float32, torch.tensor([1]),
                                                             torch.ones(1).double())}))
    with pytest.raises(ValueError, match="one weight per delta"):
        SparseDelta.merge(delta, weights=[1.0, 2.0])
    with pytest.raises(ValueError, match="one or more deltas"):
        SparseDelta.merge()


@pytest.mark.parametrize("shape,error,match", [
    ((2.7,), TypeError, r"DeltaEntry shape must be a list of non-negative ints, got \(2.7,\)"),
    ("34", TypeError, "DeltaEntry shape must be a list of non-negative ints, got '34'"),
    ((True, 2), TypeError, "DeltaEntry shape must be a list of non-negative ints"),
    ((-3,), ValueError, r"DeltaEntry shape must be non-negative ints .* got \[-3\]"),
    ((2**62, 4), ValueError, "fewer than 2\\*\\*63 elements"),
])
def test_entry_shapes_must_be_non_negative_ints(shape, error, match):
    with pytest.raises(error, match=match):
        DeltaEntry(shape, torch.float32, torch.tensor([0]), torch.zeros(1, dtype=torch.float64))


def test_entry_shapes_accept_integer_like_sizes():
    entry = DeltaEntry(torch.Size([3, 4]), torch.float32, torch.tensor([0]), torch.zeros(1, dtype=torch.float64))
    assert entry.shape == (3, 4) and type(entry.shape[0]) is int
    assert DeltaEntry([torch.tensor(5)], torch.float32, torch.tensor([4]), torch.zeros(1).double()).shape == (5,)


def test_scale_and_merge_weights_must_be_finite_real_numbers():
    delta = SparseDelta({"w": DeltaEntry((4,), torch.float32, torch.tensor([1]), torch.ones(1).double())})
    target = {"w": torch.zeros(4)}
    with pytest.raises(TypeError, match=r"scale must be a finite real number, got '2' \(str\)"):
        delta.apply_to(target, scale="2")
    with pytest.raises(ValueError, match="scale must be a finite real number, got nan"):
        delta.apply_to(target, scale=float("nan"))
    with pytest.raises(TypeError, match="scale must be a finite real number, got True"):
        delta.apply_to(target, scale=True)
    assert target["w"].tolist() == [0.0, 0.0, 0.0, 0.0]  # nothing written before the check
    with pytest.raises(ValueError, match=r"weights\[1\] must be a finite real number, got nan"):
        SparseDelta.merge(delta, delta, weights=[1.0, float("nan")])
    with pytest.raises(ValueError, match=r"weights\[0\] must be a finite real number, got -inf"):
        SparseDelta.merge(delta, weights=[float("-inf")])
    with pytest.raises(TypeError, match=r"weights\[0\] must be a finite real number, got '2' \(str\)"):
        SparseDelta.merge(delta, weights=["2"])
    delta.apply_to(target, scale=2)  # an int is a real number
    assert target["w"].tolist() == [0.0, 2.0, 0.0, 0.0]
    delta.apply_to(target, scale=torch.tensor(0.5))  # and so is a one-element real tensor
    assert target["w"].tolist() == [0.0, 2.5, 0.0, 0.0]
    with pytest.raises(TypeError, match="scale must be a finite real number"):
        delta.apply_to(target, scale=torch.tensor([1.0, 2.0]))


# --- size reporting ----------------------------------------------------------------------------

def test_nbytes_num_entries_density_and_repr():
    base = {"w": torch.zeros(1_000_000, dtype=torch.bfloat16), "b": torch.zeros(10)}
    tuned = clone(base)
    tuned["w"][::4] = 1.0
    tuned["b"][3] = 2.0
    delta = SparseDelta.extract(base, tuned)
    tensors = [t for e in delta.entries.values() for t in (e.indices, e.values)]
    assert delta.nbytes == sum(t.nbytes for t in tensors) == 250_000 * (4 + 4) + (4 + 8)
    assert delta.num_entries == 250_001
    assert delta.density() == 250_001 / 1_000_010
    assert delta.density(numel_total=2_000_020) == 250_001 / 2_000_020
    assert repr(delta) == "SparseDelta(2 params, 250,001 entries, 2.0 MB)"
    assert repr(SparseDelta()) == "SparseDelta(0 params, 0 entries, 0 B)"
    assert SparseDelta().density() == 0.0
    assert repr(delta.entries["b"]) == "DeltaEntry(shape=(10,), dtype=torch.float32, 1 entries)"
