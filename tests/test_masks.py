"""select_mask / sample_mask against sort-based oracles, ties, scopes and statistics."""
import itertools
import math
import random
from fractions import Fraction

import pytest
import torch

from childopt import masks, philox
from childopt.importance import PIECE
from childopt.masks import apportion, gumbel_noise, layer_key, sample_mask, select_mask
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


# Shares of reserve_p = 0.3 of tied_scores' 2205 entries, by hand: 0.3 * 2205 = 661.5 rounds to 662.
# Layers 0, 1 and none (1353, 500, 352 entries): 405.9, 150, 105.6 -> floors 660, the two ups go to
# the largest remainders .9 and .6.  Tensors (1320, 33, 500, 51, 301): 396, 9.9, 150, 15.3, 90.3 ->
# floors 660, ups to .9 and to the first of the tied .3s.
SCOPE_COUNTS = {"layer": {"encoder.layer.0": 406, "encoder.layer.1": 150, None: 106},
                "tensor": dict(zip(NAMES, (396, 10, 150, 16, 90)))}


@pytest.mark.parametrize("scope", ["layer", "tensor"])
def test_scoped_selection_equals_the_oracle_per_scope_and_keeps_the_global_total(lane, scope):
    backend, device = lane
    scores = tied_scores(device, seed=1)
    masks = select_mask(scores, 0.3, scope=scope, backend=backend)
    assert sum(int(m.sum()) for m in masks.values()) == 662
    groups = {}
    for name in scores:
        groups.setdefault(layer_key(name) if scope == "layer" else name, []).append(name)
    for key, names in groups.items():
        part = {n: scores[n] for n in names}
        assert torch.equal(flat_mask({n: masks[n] for n in names}), oracle(part, SCOPE_COUNTS[scope][key]))


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


def brute_force_apportion(reserve_p, sizes):
    """Try every set of scopes to round up; keep the one closest to the exact shares (sum of
    |count - share| with the shares in exact decimal arithmetic), ties to the earliest scopes."""
    share = Fraction(repr(reserve_p))
    exact = [share * n for n in sizes]
    floors = [math.floor(x) for x in exact]
    ups = round(reserve_p * sum(sizes)) - sum(floors)
    best = min(itertools.combinations(range(len(sizes)), ups),
               key=lambda up: (sum(abs(floors[i] + (i in up) - exact[i]) for i in range(len(sizes))), up))
    return [f + (i in best) for i, f in enumerate(floors)]


def test_apportion_equals_a_brute_force_search_and_hand_computed_cases():
    assert apportion(0.3, [31, 21]) == [10, 6]  # 9.3 and 6.3: tied remainders, the earlier scope gets the up
    assert apportion(0.5, [3, 3, 3]) == [2, 1, 1]  # round(4.5) = 4: one up among three tied halves
    assert apportion(0.3, [22, 24, 12]) == [7, 7, 3]  # 6.6, 7.2, 3.6 -> total round(16.8) = 17
    assert apportion(0.25, [4, 0, 7]) == [1, 0, 2]  # 1, 0, 1.75 -> total round(2.75) = 3
    gen = random.Random(0)
    for _ in range(300):
        sizes = [gen.randint(0, 40) for _ in range(gen.randint(1, 6))]
        p = gen.choice([round(gen.random(), 2), gen.randint(0, 64) / 64, gen.random()])
        assert apportion(p, sizes) == brute_force_apportion(p, sizes), (p, sizes)


def test_apportion_gives_floor_or_ceil_shares_summing_to_the_rounded_total():
    sizes = [7, 13, 1, 0, 250, 3]
    for p in (0.05, 0.33, 0.5, 0.999):
        counts = apportion(p, sizes)
        assert sum(counts) == round(p * sum(sizes))
        assert all(int(p * n) <= c <= -(-p * n // 1) for c, n in zip(counts, sizes))


def test_layer_key_parses_common_naming_schemes():
    assert layer_key("bert.encoder.layer.11.output.dense.weight") == "bert.encoder.layer.11"
    assert layer_key("model.layers.3.mlp.up_proj.weight") == "model.layers.3"
    assert layer_key("transformer.h.0.attn.c_attn.weight") == "transformer.h.0"
    assert layer_key("model.layers.3.experts.7.w1.weight") == "model.layers.3"
    assert layer_key("classifier.weight") is None


def test_an_encoder_s_and_a_decoder_s_layer_of_one_number_are_two_scopes():
    """BART/T5 number the encoder's and the decoder's layers from 0 each: per layer means per
    block of the model, so each keeps its own share (all of the encoder's scores above the
    decoder's must not leave the decoder's layer 0 empty)."""
    scores = {"model.encoder.layers.0.fc1.weight": torch.arange(100, 110, dtype=torch.float32),
              "model.decoder.layers.0.fc1.weight": torch.arange(10, dtype=torch.float32)}
    masks = select_mask(scores, 0.3, scope="layer", backend="reference")
    assert [int(m.sum()) for m in masks.values()] == [3, 3]
    assert masks["model.decoder.layers.0.fc1.weight"][-3:].all()


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


# --- float64 scores ------------------------------------------------------------------------------

def float64_scores(device="cpu"):
    """float64 scores that fp32 cannot tell apart (1 + k * 1e-12 all round to 1.0), plus signed
    zeros, infinities, subnormals, negatives and an fp32 tensor to be compared in float64."""
    gen = torch.Generator().manual_seed(6)
    close = 1.0 + torch.randperm(300, generator=gen).double() * 1e-12
    assert torch.unique(close.float()).numel() == 1
    inf = float("inf")
    special = torch.tensor([0.0, -0.0, 5e-324, -5e-324, inf, -inf, -1.0, 1.0, 1.0], dtype=torch.float64)
    coarse = (torch.rand(40, 10, generator=gen, dtype=torch.float64) * 4).round() / 4 - 1
    return {n: t.to(device) for n, t in zip(NAMES, (close.view(20, 15), special, coarse, torch.rand(60, generator=gen),
                                                     torch.randn(33, generator=gen, dtype=torch.float64) * 1e-300))}


@pytest.mark.parametrize("reserve_p", [0.0, 0.05, 0.33, 0.5, 0.9, 1.0])
def test_float64_scores_are_selected_in_float64(lane, reserve_p):
    backend, device = lane
    scores = float64_scores(device)
    n = sum(s.numel() for s in scores.values())
    masks = select_mask(scores, reserve_p, backend=backend)
    assert torch.equal(flat_mask(masks), oracle(scores, round(reserve_p * n)))


def test_float64_scores_below_fp32_precision_pick_exactly_the_largest():
    """Of 1 + k * 1e-12 for k = 0..99 in a shuffled order, keeping 10 must keep k = 90..99."""
    order = torch.randperm(100, generator=torch.Generator().manual_seed(7))
    scores = {"w": 1.0 + order.double() * 1e-12}
    for scope in ("global", "tensor"):
        assert select_mask(scores, 0.1, scope=scope)["w"].tolist() == (order >= 90).tolist()


@pytest.mark.parametrize("scope", ["layer", "tensor"])
def test_float64_scoped_selection_equals_the_oracle_per_scope(scope):
    scores = float64_scores()
    masks = select_mask(scores, 0.3, scope=scope)
    groups = {}
    for name in scores:
        groups.setdefault(layer_key(name) if scope == "layer" else name, []).append(name)
    sizes = [sum(scores[n].numel() for n in names) for names in groups.values()]
    for names, k in zip(groups.values(), brute_force_apportion(0.3, sizes)):
        part = {n: scores[n] for n in names}
        assert torch.equal(flat_mask({n: masks[n] for n in names}), oracle(part, k))


# --- sample_mask: ties, zeros, extreme temperatures ------------------------------------------------

def inclusion_counts(scores_of, reserve_p, seeds):
    """Per position, how often it is drawn over ``seeds`` x 200 independent tensors (scope 'tensor'),
    and the distinct drawn subsets."""
    counts, subsets = torch.zeros(10), set()
    for seed in seeds:
        masks = sample_mask({f"t{i}": scores_of() for i in range(200)}, reserve_p, temperature=1.0, seed=seed,
                            scope="tensor")
        for m in masks.values():
            counts += m
            subsets.add(tuple(m.nonzero().reshape(-1).tolist()))
    return counts, subsets


@pytest.mark.parametrize("value", [0.0, 2.5])
def test_sample_mask_draws_all_zero_or_tied_scores_uniformly(value):
    """3 of 10 tied entries, 1000 draws: each position ~300 times (binomial sd 14.5; bounds 4.5 sd),
    and nearly all C(10, 3) = 120 subsets appear."""
    counts, subsets = inclusion_counts(lambda: torch.full((10,), value), 0.3, seeds=range(5))
    assert counts.sum() == 3000
    assert ((counts > 235) & (counts < 365)).all(), counts.tolist()
    assert len(subsets) >= 110


def test_sample_mask_draws_zero_scores_after_positive_ones_and_uniformly_among_them():
    """Scores (3, 1, 0 x 8), keep 4: both positives always, 2 of the 8 zeros uniformly (~250 of 1000)."""
    counts, _ = inclusion_counts(lambda: torch.tensor([3.0, 1.0] + [0.0] * 8), 0.4, seeds=range(5))
    assert counts[:2].tolist() == [1000, 1000]
    assert ((counts[2:] > 190) & (counts[2:] < 310)).all(), counts.tolist()


def test_sample_mask_seeds_give_different_draws_of_all_zero_scores():
    scores = {"a": torch.zeros(50), "b": torch.zeros(7, 3)}
    draws = {tuple(flat_mask(sample_mask(scores, 0.2, temperature=1.0, seed=s)).tolist()) for s in range(6)}
    assert len(draws) == 6


def test_sample_mask_at_extreme_temperatures():
    """1e300 overflowed to NaN keys before; now it is a uniform draw with zeros last and
    infinities first.  1e-300 is select_mask, also for float64 scores fp32 cannot order."""
    scores = {"w": torch.tensor([0.0, 4.0, float("inf"), 1.0, 0.0, 2.0, 0.0, 3.0])}
    for seed in range(4):
        hot = sample_mask(scores, 0.5, temperature=1e300, seed=seed)["w"]
        assert hot.sum() == 4 and hot[2] and not hot[[0, 4, 6]].any()
    counts = sum(sample_mask({"w": torch.ones(100)}, 0.1, temperature=1e300, seed=s)["w"].float() for s in range(50))
    assert counts.max() <= 15  # uniform: each ~5 times in 50 draws (a fixed choice would give 50)
    close = {"w": 1.0 + torch.randperm(200, generator=torch.Generator().manual_seed(8)).double() * 1e-12}
    for scope in ("global", "tensor"):
        cold = sample_mask(close, 0.25, temperature=1e-300, seed=3, scope=scope)["w"]
        assert torch.equal(cold, oracle(close, 50).view(200))


def test_gumbel_noise_is_finite_at_the_extreme_words():
    """In fp32 the largest uniform (2**24 - 0.5) / 2**24 rounds to 1.0, whose noise is +inf."""
    words = torch.tensor([0, 0xFFFFFFFF, 0x80000000, 0x12345678], dtype=torch.int64)
    expected = [-math.log(-math.log(((w >> 8) + 0.5) / 2**24)) for w in words.tolist()]
    assert gumbel_noise(words).tolist() == pytest.approx(expected, rel=1e-14)
    assert 17.3 < expected[1] < 17.4


@pytest.mark.parametrize("lane", [0, 3])
def test_keys_drawn_piece_by_piece_are_the_keys_of_one_whole_draw(lane):
    """sample_mask draws its Gumbel noise a piece at a time: a piece from element ``start`` on takes
    the words from Philox group ``first_group + start // 4`` with the tensor's lane (a shard's offset
    in its group), so the keys equal one draw over the whole tensor (fails if a piece's counter or
    lane were off)."""
    n, first_group, seed = PIECE + 4 * 3 + 1, 2**33 + 7, 99
    score = torch.rand(n, generator=torch.Generator().manual_seed(1)) * 3
    score[::97] = 0.0
    for temperature in (0.5, 2.0):
        keys = masks._perturbed_keys(score, philox.random_words, first_group, lane, seed, temperature, torch.float32)
        whole = philox.random_words(n + lane, first_group, seed, masks.GUMBEL_STREAM, "cpu")[lane:]
        assert torch.equal(keys, masks._sample_keys(score, gumbel_noise(whole), temperature, torch.float32))


@pytest.mark.parametrize("call,error,match", [
    (lambda: select_mask(tied_scores(), 1.5), ValueError, "reserve_p must be in \\[0.0, 1.0\\], got 1.5"),
    (lambda: select_mask(tied_scores(), "0.3"), TypeError, "reserve_p must be a number"),
    (lambda: select_mask({}, 0.1), TypeError, "non-empty mapping"),
    (lambda: select_mask({"a": torch.tensor([1.0, float("nan")])}, 0.5), ValueError, "scores\\['a'\\] contains NaN"),
    (lambda: select_mask({"a": torch.arange(3)}, 0.5), TypeError, "scores\\['a'\\] must be a floating-point"),
    (lambda: select_mask(tied_scores(), 0.1, scope="row"), ValueError, "scope must be one of"),
    (lambda: sample_mask(tied_scores(), 0.1, temperature=0.0, seed=1), ValueError,
     "temperature must be in \\(0.0, inf\\), got 0.0"),
    (lambda: sample_mask({"a": torch.tensor([-1.0, 2.0])}, 0.5, temperature=1.0, seed=1), ValueError, "negative"),
    (lambda: sample_mask(tied_scores(), 0.1, temperature=float("inf"), seed=1), ValueError,
     "temperature must be in \\(0.0, inf\\), got inf"),
])
def test_bad_input_raises_a_clear_error(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_reserve_p_and_temperature_take_what_maskedadamw_takes():
    """A numpy scalar or a one-element tensor (an LR-schedule-like config often holds them) selects
    what the same value as a Python float selects."""
    np = pytest.importorskip("numpy")
    scores = {"a": torch.rand(40, generator=torch.Generator().manual_seed(3)), "b": torch.rand(9)}
    for reserve_p in (np.float32(0.3), np.float64(0.3), torch.tensor(0.3), torch.tensor([0.25])):
        expected = select_mask(scores, float(reserve_p))
        got = select_mask(scores, reserve_p)
        assert all(torch.equal(got[k], expected[k]) for k in scores)
        sampled = sample_mask(scores, reserve_p, temperature=np.float32(0.5), seed=1)
        assert all(torch.equal(sampled[k], sample_mask(scores, float(reserve_p), temperature=0.5, seed=1)[k])
                   for k in scores)
