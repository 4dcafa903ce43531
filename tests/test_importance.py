"""childopt.importance: the scale solve, the levels and the randomised level rounding.

Oracles: the solve against a piecewise-linear exact solution written here; the levels against
``2 ** (32 + (q - 255) / 8)`` and ``2**32 / threshold``; the rounding's expectation against p with
a binomial bound.
"""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from childopt import importance, philox
from tests.helpers import kernel_backend


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
    return sum(float(importance.probabilities(r, log_c, p_min).sum(dtype=torch.float64)) for r in logs) / n


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
    if floor_share < 0.9:  # the same root (c is ill-conditioned when few entries sit between the clamps)
        assert 2.0**log_c == pytest.approx(want, rel=1e-4)


@pytest.mark.parametrize("p_min", [0.0, 0.05])
def test_kept_count_and_slope_against_float64_sums(p_min):
    """The solve's pass: ``sum(p)`` and its slope ``ln 2 * sum(p in (p_min, 1))`` over pieces,
    against float64 sums written here (a slope counting the clamped entries fails; a wrong slope
    would still solve, only in more passes)."""
    gen = torch.Generator().manual_seed(5)
    log_r = torch.cat([-torch.rand(importance.PIECE + 9, generator=gen) * 12, torch.full((50,), -math.inf)])
    log_c = 3.25
    total, slope = importance._expected_kept([log_r[:1000], log_r[1000:]], log_c, p_min)
    p = torch.clamp(torch.exp2(log_r.double() + log_c), float(torch.tensor(p_min, dtype=torch.float32)), 1.0)
    interior = (p > p.min()) & (p < 1.0) if p_min else p < 1.0
    assert 0.2 < float((p == 1.0).double().mean()) < 0.8 and 0.1 < float((~interior).double().mean()) < 0.9
    assert total == pytest.approx(float(p.sum()), rel=1e-6)
    assert slope == pytest.approx(float(p[interior].sum()) * math.log(2.0), rel=1e-6)


def test_scale_is_infinite_when_too_few_scores_are_positive():
    logs = importance.log_ratios([torch.tensor([1.0, 0.0, 0.0, 0.0])], 1.0)
    assert importance.solve_log_scale(logs, 0.5, 0.0) == math.inf
    assert torch.equal(importance.probabilities(logs[0], math.inf, 0.1), torch.tensor([1.0, 0.1, 0.1, 0.1]))
    assert importance.solve_log_scale(logs, 0.5, 0.5) == -math.inf  # the floor alone keeps reserve_p
    assert importance.probabilities(logs[0], -math.inf, 0.5).tolist() == [0.5] * 4


@pytest.mark.parametrize("temperature", [1e-4, 1e-30])
def test_a_tiny_temperature_still_solves_in_the_log_domain(temperature):
    """T = 1e-4 puts the ratios far below float64's range, T = 1e-30 puts log2 c past int64; the
    solve must still hit reserve_p."""
    logs = importance.log_ratios([torch.linspace(1.0, 2.0, 1000)], temperature)
    assert float(logs[0].min()) < -5000
    log_c = importance.solve_log_scale(logs, 0.3, 0.0)
    assert kept_share(logs, log_c, 0.0) == pytest.approx(0.3, rel=1e-6)


def test_float64_scores_beyond_fp32_range_keep_their_order():
    """log_ratios takes float64 logs before scaling them into fp32, so 1e-50 and 1e39 keep their ratios."""
    tiny = importance.log_ratios([torch.tensor([1e-50, 2e-50], dtype=torch.float64)], 1.0)[0]
    assert tiny.dtype == torch.float32 and tiny.tolist() == [-1.0, 0.0]
    huge = importance.log_ratios([torch.tensor([1e39, 1.0, 0.0], dtype=torch.float64)], 2.0)[0]
    assert huge.tolist() == pytest.approx([0.0, -math.log2(1e39) / 2, -math.inf])


def test_levels_are_eight_per_octave_and_their_scale_is_one_over_p():
    """Hand-checked against the definition: threshold ~ 2**(32 + (q - 255) / 8), scale = 2**32 / threshold."""
    assert importance.MANTISSAS == tuple(round(2 ** (31 - j / 8)) for j in range(8))
    codes = torch.arange(256)
    thresholds = importance.level_thresholds(codes)
    assert thresholds[0] == 0 and thresholds[255] == 2**32 and thresholds[247] == 2**31 and thresholds[239] == 2**30
    assert torch.all(thresholds[1:] >= thresholds[:-1])
    assert torch.all(thresholds[25:] > thresholds[24:-1])  # distinct from code 24 up (p above 2**-29)
    ideal = torch.exp2(32 + (codes[1:].double() - 255) / 8)
    assert torch.all((thresholds[1:].double() - ideal).abs() <= 1)  # the shifts truncate: within one unit
    p = importance.level_probabilities()
    assert torch.equal(p, thresholds.double() / 2**32)
    scales = importance.level_scales(codes)
    assert scales[255] == 1 and torch.equal(scales[1:255], (2.0**32 / thresholds[1:255].float()).float())


def test_the_cpp_mantissas_are_the_python_ones():
    import re
    from pathlib import Path

    header = (Path(__file__).parents[1] / "csrc" / "include" / "childopt" / "importance_levels.h").read_text()
    block = header[header.index("#define CHILDOPT_LEVEL_MANTISSAS"):].split("\n\n")[0]
    assert tuple(int(m) for m in re.findall(r"(\d+)u", block)) == importance.MANTISSAS


def test_rounding_keeps_the_expectation_of_p():
    """Codes are one of the two levels around p, and their mean level is p (binomial bound), down to
    the lowest levels, whose thresholds repeat (rounded between 0 and the first distinct level)."""
    p = torch.tensor([1e-12, 1.5 * 2**-32, 2.5 * 2**-32, 3e-4, 0.0123, 0.3, 0.77, 0.999, 1.0, 0.0],
                     dtype=torch.float64)
    n = 40_000
    words = philox.random_words(n * p.numel(), 0, 7, 0, "cpu")
    codes = importance.level_codes(p.repeat(n), words).view(n, -1)
    levels = importance.level_probabilities()[codes.long()]
    lower = importance.level_probabilities()[codes.long().min(0).values]
    upper = importance.level_probabilities()[codes.long().max(0).values]
    assert torch.all(lower <= p) and torch.all(p <= upper)
    low_codes, high_codes = codes.long().min(0).values, codes.long().max(0).values
    neighbours = (high_codes - low_codes <= 1) | ((low_codes == 0) & (high_codes == importance.FIRST_LEVEL))
    assert torch.all(neighbours), (low_codes, high_codes)
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


def test_codes_drawn_piece_by_piece_are_the_codes_of_the_whole_tensor():
    """draw_codes takes its rounding words a piece at a time: the words of elements from ``start``
    on are those of Philox group ``rng_base + start // 4``, so the codes equal one draw over the
    whole tensor (fails if a piece's counter were off by one group)."""
    n, rng_base, seed, refresh = importance.PIECE + 4 * 3 + 1, 2**33 + 7, 12345, 4
    gen = torch.Generator().manual_seed(0)
    log_r = -torch.rand(n, generator=gen) * 6
    log_c, p_min = 0.5, 0.02
    codes = importance.draw_codes(log_r, log_c, p_min, rng_base, seed, refresh, kernel_backend("reference").level_codes)
    key = (seed + refresh * 0x9E3779B97F4A7C15) % 2**64
    words = philox.random_words(n, rng_base, key, importance.ROUNDING_STREAM, "cpu")
    assert torch.equal(codes, importance.level_codes(importance.probabilities(log_r, log_c, p_min), words))


def _refresh_codes(scores: list, device: str, temperature: float) -> tuple[float, list]:
    """The scale and codes of a refresh's torch definitions (the reference backend's) on ``device``."""
    logs = importance.log_ratios([s.to(device) for s in scores], temperature)
    log_c = importance.solve_log_scale(logs, 0.3, 0.01)
    return log_c, [importance.draw_codes(log_r, log_c, 0.01, 4 * i, 7, 1, kernel_backend("reference").level_codes)
                   .cpu() for i, log_r in enumerate(logs)]


@pytest.mark.parametrize("count", [2, 3])
def test_a_refresh_draws_the_same_codes_at_every_thread_count(count):
    """Log ratios, the solve and the rounding at 1 thread and at ``count``: torch's own exp2 differed
    between 1 and 3 threads on elements at the ends of the threads' chunks, and its float64 sums with
    the reduction's order."""
    gen = torch.Generator().manual_seed(3)
    scores = [torch.rand(n, generator=gen) ** 6 * (torch.rand(n, generator=gen) < 0.6) for n in ((1 << 20) + 77, 5000)]
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = _refresh_codes(scores, "cpu", 0.3)
        torch.set_num_threads(count)
        several = _refresh_codes(scores, "cpu", 0.3)
    finally:
        torch.set_num_threads(before)
    assert single[0] == several[0] and all(torch.equal(a, b) for a, b in zip(single[1], several[1]))


@pytest.mark.cuda
def test_a_refresh_on_a_gpu_draws_the_cpu_codes():
    """The same scale and codes from the same scores on CUDA: portable exp2 / log2, the division by T
    (not CUDA's multiply by a host scalar's reciprocal) and the solve's integer sums round alike."""
    gen = torch.Generator().manual_seed(4)
    scores = [torch.rand(n, generator=gen) ** 6 * (torch.rand(n, generator=gen) < 0.6) for n in ((1 << 20) + 77, 5000)]
    on_cpu, on_gpu = _refresh_codes(scores, "cpu", 0.3), _refresh_codes(scores, "cuda", 0.3)
    assert on_cpu[0] == on_gpu[0] and all(torch.equal(a, b) for a, b in zip(on_cpu[1], on_gpu[1]))
