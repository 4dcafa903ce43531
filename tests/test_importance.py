"""childopt.importance: the scale solve, the level table and the randomised level rounding.

Oracles: the solve against a sort-based exact solution written here; the table against
childopt.philox.keep_threshold and 1 / p; the rounding's expectation against p with a
binomial bound.
"""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from childopt import importance, philox


def exact_scale(ratios: torch.Tensor, reserve_p: float, p_min: float) -> float:
    """The oracle: walk the pieces of sum(clamp(c r, p_min, 1)) between its kinks, in float64."""
    r = ratios.double()
    target = reserve_p * r.numel()
    kinks = torch.cat([p_min / r[r > 0], 1.0 / r[r > 0]]).unique().sort().values.tolist()
    previous, f_previous = 0.0, float(torch.clamp(r * 0.0, p_min, 1.0).sum())
    if f_previous >= target:
        return 0.0
    for kink in kinks:
        f_kink = float(torch.clamp(r * kink, p_min, 1.0).sum())
        if f_kink >= target:  # linear between the two kinks
            return previous + (target - f_previous) * (kink - previous) / (f_kink - f_previous)
        previous, f_previous = kink, f_kink
    return math.inf


def kept_share(logs, log_c, p_min):
    n = sum(r.numel() for r in logs)
    return sum(float(p.sum()) for p in importance.keep_probabilities(logs, log_c, p_min)) / n


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 400), reserve_p=st.floats(0.01, 0.99), floor_share=st.floats(0.0, 1.0),
       power=st.floats(0.1, 8.0), zeros=st.floats(0.0, 0.5), seed=st.integers(0, 2**31))
def test_scale_hits_reserve_p_and_matches_the_exact_solution(n, reserve_p, floor_share, power, zeros, seed):
    gen = torch.Generator().manual_seed(seed)
    r = torch.rand(n, generator=gen) ** power
    r = torch.where(torch.rand(n, generator=gen) < zeros, 0.0, r)
    r = r / r.max() if r.max() > 0 else torch.ones(n)
    p_min = floor_share * reserve_p
    logs = list(torch.log2(r).split(max(n // 3, 1)))  # a scope of several tensors
    log_c = importance.solve_log_scale(logs, reserve_p, p_min)
    want = exact_scale(r, reserve_p, p_min)
    if math.isinf(want):
        assert log_c == math.inf
        return
    assert kept_share(logs, log_c, p_min) == pytest.approx(reserve_p, rel=1e-6)
    if floor_share < 0.9:  # c is unique (and well conditioned) where the sum rises through the target
        assert 2.0**log_c == pytest.approx(want, rel=1e-6)


def test_scale_is_infinite_when_too_few_scores_are_positive():
    logs = importance.log_ratios([torch.tensor([1.0, 0.0, 0.0, 0.0])], 1.0)
    assert importance.solve_log_scale(logs, 0.5, 0.0) == math.inf
    assert importance.keep_probabilities(logs, math.inf, 0.1)[0].tolist() == [1.0, 0.1, 0.1, 0.1]
    assert importance.solve_log_scale(logs, 0.5, 0.5) == -math.inf  # the floor alone keeps reserve_p
    assert importance.keep_probabilities(logs, -math.inf, 0.5)[0].tolist() == [0.5] * 4


def test_a_tiny_temperature_still_solves_in_the_log_domain():
    """T = 1e-4 puts the ratios far below float64's range; the solve must still hit reserve_p."""
    logs = importance.log_ratios([torch.linspace(1.0, 2.0, 1000)], 1e-4)
    assert float(logs[0].min()) < -5000
    log_c = importance.solve_log_scale(logs, 0.3, 0.0)
    assert kept_share(logs, log_c, 0.0) == pytest.approx(0.3, rel=1e-6)


def test_level_table_matches_the_bernoulli_threshold_of_each_level():
    p = importance.level_probabilities()
    table = importance.level_table()
    assert p[0] == 0 and p[-1] == 1 and torch.all(p[1:] > 0) and torch.all(p[1:] / p[:-1].clamp_min(1e-300) > 1)
    assert p[255 - 8] == 0.5  # eight levels per octave
    assert table[0, 0] == 0 and table[0, -1] == 2**32 and table[1, 0] == 0
    for q in (1, 100, 200, 254):
        assert table[0, q] == philox.keep_threshold(float(p[q]))
        assert table[1, q] == 1 / p[q]


def test_rounding_keeps_the_expectation_of_p():
    """Codes are one of the two levels around p, and their mean level is p (binomial bound)."""
    p = torch.tensor([1e-12, 3e-4, 0.0123, 0.3, 0.77, 0.999, 1.0, 0.0], dtype=torch.float64)
    n = 40_000
    words = philox.random_words(n * p.numel(), 0, 7, 0, "cpu")
    codes = importance.level_codes(p.repeat(n), words).view(n, -1)
    levels = importance.level_probabilities()[codes.long()]
    lower = importance.level_probabilities()[codes.long().min(0).values]
    upper = importance.level_probabilities()[codes.long().max(0).values]
    assert torch.all(lower <= p) and torch.all(p <= upper)
    assert torch.all(codes.long().max(0).values - codes.long().min(0).values <= 1)
    spread = (upper - lower) / 2
    bound = 6 * spread / math.sqrt(n) + 1e-15
    assert torch.all((levels.mean(0) - p).abs() <= bound), (levels.mean(0) - p, bound)
    assert codes[:, -2].eq(255).all() and codes[:, -1].eq(0).all()


def test_log_ratios_follow_the_temperature():
    s = torch.tensor([1e30, 1e20, 1e-30, 0.0])
    logs = importance.log_ratios([s], 0.01)[0]
    assert logs[0] == 0 and logs[1] == pytest.approx(-100 * math.log2(1e10), rel=1e-6) and logs[3] == -math.inf
    logs = importance.log_ratios([s], 10.0)[0]
    assert 2.0 ** float(logs[1]) == pytest.approx(1e-1, rel=1e-5)  # (1e-10) ** (1 / 10)
    assert importance.log_ratios([torch.zeros(3)], 1.0)[0].tolist() == [0.0] * 3  # nothing to order by: uniform
