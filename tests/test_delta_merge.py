"""SparseDelta.merge on deltas that disagree about a tensor, and its sums against hand-computed values.

Oracles: the expected sums, written out by hand (dyadic numbers, exact in every dtype involved),
and the messages that must name the tensor and the deltas that disagree.
"""
import hashlib

import pytest
import torch

from childopt.deltas import DeltaEntry, SparseDelta

H = hashlib.sha256(b"one base").hexdigest()  # any fingerprint: merge compares them, never recomputes them
OTHER = hashlib.sha256(b"another base").hexdigest()


def entry(idx, values, shape=(6,), dtype=torch.float32, aliases=(), base_sha256=None):
    wide = torch.float64 if dtype == torch.float32 else torch.float32
    return DeltaEntry(shape, dtype, torch.tensor(idx, dtype=torch.int32), torch.tensor(values, dtype=wide),
                      aliases, base_sha256)


def bits(t):
    return t.view(torch.int64 if t.dtype == torch.float64 else torch.int32)


@pytest.mark.parametrize("first,second,match", [
    ({"w": entry([1], [1.0])}, {"w": entry([1], [1.0], shape=(7,))},
     r"'w': deltas\[0\] has shape \(6,\) and dtype torch.float32, but deltas\[1\] has shape \(7,\)"),
    ({"w": entry([1], [1.0])}, {"w": entry([1], [1.0], dtype=torch.bfloat16)},
     r"'w': deltas\[0\] has .* dtype torch.float32, but deltas\[1\] has .* dtype torch.bfloat16"),
    ({"w": entry([1], [1.0], aliases=("x",))}, {"w": entry([1], [1.0], aliases=("y",))},
     r"'w': deltas\[0\] gives it the aliases \['x'\] but deltas\[1\] \['y'\]"),
    ({"w": entry([1], [1.0], aliases=("x",))}, {"w": entry([1], [1.0])},
     r"'w': deltas\[0\] gives it the aliases \['x'\] but deltas\[1\] \[\]"),
    ({"w": entry([1], [1.0], aliases=("x",))}, {"x": entry([1], [1.0], aliases=("w",))},
     r"store the tied tensor \['w', 'x'\] under different names: 'w' in deltas\[0\], 'x' in deltas\[1\]"),
    ({"w": entry([1], [1.0], aliases=("x",))}, {"v": entry([1], [1.0]), "x": entry([2], [1.0])},
     r"'x' belongs to the entry 'w' in deltas\[0\] but to the entry 'x' in deltas\[1\]"),
    ({"w": entry([1, 4], [1.0, 2.0], base_sha256=H)}, {"w": entry([1, 4], [1.0, 2.0], base_sha256=OTHER)},
     r"'w': deltas\[0\] and deltas\[1\] store the same entries but were extracted from different bases"),
], ids=["shape", "dtype", "aliases", "aliases-vs-none", "entry-vs-alias", "entry-vs-alias-elsewhere", "bases"])
def test_merge_refuses_deltas_that_disagree_on_a_tensor_naming_it(first, second, match):
    with pytest.raises(ValueError, match=match):
        SparseDelta.merge(SparseDelta(first), SparseDelta(second))


def test_stacked_deltas_with_different_bases_merge_only_when_asked_and_rebuild_the_last_model():
    """d2 was extracted on top of d1 at the same indices (a fine-tune continued on the same mask):
    their fingerprints differ, merge says so, and with check_base=False gives tuned2 - base."""
    base = torch.tensor([1.0, 2.0, 3.0, 4.0])
    tuned1 = torch.tensor([1.5, 2.0, 2.75, 4.0])
    tuned2 = torch.tensor([1.25, 2.0, 3.5, 4.0])
    idx = {"w": torch.tensor([0, 2])}
    d1 = SparseDelta.extract({"w": base}, {"w": tuned1}, indices=idx)
    d2 = SparseDelta.extract({"w": tuned1}, {"w": tuned2}, indices=idx)
    with pytest.raises(ValueError, match=r"'w': deltas\[0\] and deltas\[1\] .* different bases .* check_base=False"):
        SparseDelta.merge(d1, d2)
    merged = SparseDelta.merge(d1, d2, check_base=False)
    assert merged.entries["w"].base_sha256 is None
    assert merged.entries["w"].values.tolist() == [0.25, 0.5]
    target = {"w": base.clone()}
    merged.apply_to(target)
    assert torch.equal(target["w"], tuned2)
    with pytest.raises(TypeError, match="check_base must be a bool, got 0"):
        SparseDelta.merge(d1, d2, check_base=0)


def test_fingerprints_at_different_indices_do_not_count_as_different_bases():
    merged = SparseDelta.merge(SparseDelta({"w": entry([1, 4], [1.0, 2.0], base_sha256=H)}),
                               SparseDelta({"w": entry([1, 5], [1.0, 2.0], base_sha256=OTHER)}))
    assert merged.entries["w"].indices.tolist() == [1, 4, 5] and merged.entries["w"].base_sha256 is None


def test_parts_with_the_same_indices_keep_their_fingerprint_and_sum_by_hand():
    """The equal-count branch: every part holds the union, so the base fingerprint is kept."""
    a = entry([1, 3, 4], [0.5, -0.0, 2.0], aliases=("x", "y"), base_sha256=H)
    b = entry([1, 3, 4], [0.25, 1.0, -4.0], aliases=("y", "x"), base_sha256=H)
    merged = SparseDelta.merge(SparseDelta({"w": a}), SparseDelta({"w": b}), weights=[2.0, -1.0]).entries["w"]
    assert merged.indices.dtype == torch.int32 and merged.indices.tolist() == [1, 3, 4]
    assert merged.values.tolist() == [2 * 0.5 - 0.25, 2 * -0.0 - 1.0, 2 * 2.0 + 4.0]  # [0.75, -1.0, 8.0]
    assert merged.base_sha256 == H and merged.aliases == ("x", "y")

    subset = entry([1, 3], [1.0, 1.0], aliases=("x", "y"), base_sha256=H)  # fewer entries: another base region
    merged = SparseDelta.merge(SparseDelta({"w": a}), SparseDelta({"w": subset})).entries["w"]
    assert merged.values.tolist() == [1.5, 1.0, 2.0] and merged.base_sha256 is None

    empty = hashlib.sha256(b"").hexdigest()  # the fingerprint of no base values
    merged = SparseDelta.merge(SparseDelta({"w": entry([], [], base_sha256=empty)}),
                               SparseDelta({"w": entry([], [], base_sha256=empty)})).entries["w"]
    assert merged.num_entries == 0 and merged.base_sha256 == empty


def test_a_slot_only_one_part_holds_keeps_its_value_bit_for_bit():
    """Sums start from -0.0, not 0.0: 0.0 + -0.0 would turn a stored -0.0 into 0.0."""
    a = entry([0, 2], [-0.0, 1.5])
    b = entry([2, 5], [0.5, -0.0])
    merged = SparseDelta.merge(SparseDelta({"w": a}), SparseDelta({"w": b})).entries["w"]
    want = torch.tensor([-0.0, 2.0, -0.0], dtype=torch.float64)
    assert merged.indices.tolist() == [0, 2, 5]
    assert torch.equal(bits(merged.values), bits(want))
