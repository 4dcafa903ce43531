"""select_mask / sample_mask against sort-based oracles, ties, scopes and statistics."""
import pytest
import torch

from childopt.masks import apportion, layer_index, sample_mask, select_mask
from tests.helpers import kernel_backend

NAMES = ("encoder.layer.0.attention.weight", "encoder.layer.0.attention.bias", "encoder.layer.1.output.weight",
         "embeddings.word.weight", "classifier.weight")


def tied_scores(device="cpu", seed=0):
    """Scores full of ties: exact zeros, a coarse grid of values, and a constant tensor."""
    gen = torch.Generator().manual_seed(seed)
    tensors = [torch.rand(40, 33, generator=gen), torch.zeros(33), (torch.rand(25, 20, generator=gen) * 4).round() / 4,
               torch.full((17, 3), 0.5), torch.rand(301, generator=gen) * (torch.rand(301, generator=gen) < 0.5)]
    return {n: t.to(device) for n, t in zip(NAMES, tensors)}


def oracle(scores, k):
    """The k largest by a stable descending sort over the concatenation (ties: earlier first)."""
    flat = torch.cat([s.reshape(-1).cpu() for s in scores.values()])
    order = torch.sort(-flat, stable=True).indices[:k]
    keep = torch.zeros(flat.numel(), dtype=torch.bool)
    keep[order] = True
    return keep


def flat_mask(masks):
    return torch.cat([m.reshape(-1).cpu() for m in masks.values()])


@pytest.mark.parametrize("reserve_p", [0.0, 0.01, 0.1, 0.3, 0.5, 0.77, 1.0])
def test_global_selection_equals_a_stable_sort_oracle(lane, reserve_p):
    backend, device = lane
    scores = tied_scores(device)
    n = sum(s.numel() for s in scores.values())
    masks = select_mask(scores, reserve_p, backend=backend)
    assert all(masks[k].shape == scores[k].shape and masks[k].device.type == device for k in scores)
    assert torch.equal(flat_mask(masks), oracle(scores, round(reserve_p * n)))


@pytest.mark.parametrize("scope", ["layer", "tensor"])
def test_scoped_selection_equals_the_oracle_per_scope_and_keeps_the_global_total(lane, scope):
    backend, device = lane
    scores = tied_scores(device, seed=1)
    reserve_p = 0.3
    masks = select_mask(scores, reserve_p, scope=scope, backend=backend)
    total = sum(int(m.sum()) for m in masks.values())
    assert total == sum(int(m.sum()) for m in select_mask(scores, reserve_p, backend=backend).values())
    groups = {}
    for name in scores:
        groups.setdefault(layer_index(name) if scope == "layer" else name, []).append(name)
    sizes = [sum(scores[n].numel() for n in names) for names in groups.values()]
    for names, k in zip(groups.values(), apportion(reserve_p, sizes)):
        part = {n: scores[n] for n in names}
        assert torch.equal(flat_mask({n: masks[n] for n in names}), oracle(part, k))


def test_kernel_histograms_equal_the_reference_histograms(kernel_lane):
    from childopt.backends import reference

    name, device = kernel_lane
    scores = [t.reshape(-1).float().contiguous() for t in tied_scores(device, seed=2).values()]
    scopes = [0, 0, 1, 1, 2]
    # later passes' prefixes: the key bits above the pass of an element of each scope, so bins are non-empty
    keys = torch.stack([reference.score_keys(scores[i])[5] for i in (0, 2, 4)])
    for shift, bits, pre in ((21, 11, torch.zeros_like(keys)), (10, 11, keys >> 21), (0, 10, keys >> 10)):
        got = kernel_backend(name).radix_histogram(scores, scopes, pre, shift, bits, 3)
        want = reference.Backend().radix_histogram(scores, scopes, pre, shift, bits, 3)
        assert torch.equal(got, want) and int(want.sum()) > 0


def test_negative_scores_and_signed_zeros_are_ordered():
    scores = {"a": torch.tensor([-3.0, -0.0, 0.0, 2.0, -1.0, float("-inf"), float("inf")])}
    mask = select_mask(scores, 4 / 7, backend="reference")["a"]
    assert mask.tolist() == [False, True, True, True, False, False, True]  # -0.0 ties with 0.0


def test_selection_past_2_24_elements_where_quantile_fails():
    n = 2**24 + 4097
    scores = {"big": torch.rand(n, generator=torch.Generator().manual_seed(0)), "small": torch.rand(100)}
    with pytest.raises(RuntimeError):
        torch.quantile(scores["big"], 0.9)
    masks = select_mask(scores, 0.1, backend="reference")
    kept = torch.cat([scores[k][masks[k]] for k in scores])
    dropped = torch.cat([scores[k][~masks[k]] for k in scores])
    assert kept.numel() == round(0.1 * (n + 100)) and kept.min() >= dropped.max()


def test_apportion_gives_floor_or_ceil_shares_summing_to_the_rounded_total():
    sizes = [7, 13, 1, 0, 250, 3]
    for p in (0.05, 0.33, 0.5, 0.999):
        counts = apportion(p, sizes)
        assert sum(counts) == round(p * sum(sizes))
        assert all(int(p * n) <= c <= -(-p * n // 1) for c, n in zip(counts, sizes))


def test_layer_index_parses_common_naming_schemes():
    assert layer_index("bert.encoder.layer.11.output.dense.weight") == 11
    assert layer_index("model.layers.3.mlp.up_proj.weight") == 3
    assert layer_index("transformer.h.0.attn.c_attn.weight") == 0
    assert layer_index("classifier.weight") is None


def test_sample_mask_counts_reproducibility_and_limits():
    scores = tied_scores(seed=3)
    n = sum(s.numel() for s in scores.values())
    a = sample_mask(scores, 0.2, temperature=1.0, seed=7)
    assert sum(int(m.sum()) for m in a.values()) == round(0.2 * n)
    assert torch.equal(flat_mask(a), flat_mask(sample_mask(scores, 0.2, temperature=1.0, seed=7)))
    assert not torch.equal(flat_mask(a), flat_mask(sample_mask(scores, 0.2, temperature=1.0, seed=8)))
    distinct = {"w": torch.rand(500, generator=torch.Generator().manual_seed(4)) + 0.1}
    cold = sample_mask(distinct, 0.2, temperature=1e-6, seed=1)
    assert torch.equal(cold["w"], select_mask(distinct, 0.2)["w"])


def test_sample_mask_frequencies_follow_importance():
    """Half the entries weigh 9, half 1: at temperature 1 a small sample is ~90% heavy;
    at a huge temperature the draw is uniform (~50%)."""
    weights = {"w": torch.cat([torch.full((2000,), 9.0), torch.ones(2000)])}
    heavy = lambda m: m["w"][:2000].sum().item() / m["w"].sum().item()  # noqa: E731
    warm = [heavy(sample_mask(weights, 0.01, temperature=1.0, seed=s)) for s in range(30)]
    hot = [heavy(sample_mask(weights, 0.01, temperature=1e6, seed=s)) for s in range(30)]
    assert 0.85 < sum(warm) / 30 < 0.95  # 40 draws x 30 seeds: std of the mean ~0.008
    assert 0.42 < sum(hot) / 30 < 0.58   # std of the mean ~0.013


@pytest.mark.parametrize("call,error,match", [
    (lambda: select_mask(tied_scores(), 1.5), ValueError, "reserve_p must be in \\[0, 1\\]"),
    (lambda: select_mask({}, 0.1), TypeError, "non-empty mapping"),
    (lambda: select_mask({"a": torch.tensor([1.0, float("nan")])}, 0.5), ValueError, "scores\\['a'\\] contains NaN"),
    (lambda: select_mask({"a": torch.arange(3)}, 0.5), TypeError, "scores\\['a'\\] must be a floating-point"),
    (lambda: select_mask(tied_scores(), 0.1, scope="row"), ValueError, "scope must be one of"),
    (lambda: sample_mask(tied_scores(), 0.1, temperature=0.0, seed=1), ValueError, "temperature must be > 0"),
    (lambda: sample_mask({"a": torch.tensor([-1.0, 2.0])}, 0.5, temperature=1.0, seed=1), ValueError, "negative"),
])
def test_bad_input_raises_a_clear_error(call, error, match):
    with pytest.raises(error, match=match):
        call()
