"""The compute ceiling: the list sizes it picks from the cache size, the line through two timings
worked out by hand, and the slope it recovers from an optimizer whose step costs a known time
per element."""
import time

import pytest
import torch

from childopt.bench import ceiling


def test_the_two_lists_fill_at_most_the_cache_share_in_whole_grains():
    """32 MiB: 0.75 * 33554432 / (3 * 32) = 262144 elements, a multiple of 4 * 1024; a cache too
    small for one grain still gets one."""
    assert ceiling.ceiling_numel(32 * 2**20) == 262144
    assert ceiling.ceiling_numel(10**6) == 4096 * (int(0.75 * 10**6 / 96) // 4096) == 4096
    assert ceiling.ceiling_numel(1000) == 4096
    assert ceiling.ceiling_numel(105 * 2**20) % 4096 == 0


def test_slope_and_intercept_of_two_timings():
    """3 ms at 1000 elements and 5 ms at 2000: 2 us per element, 1 ms fixed."""
    slope, intercept = ceiling.slope_and_intercept(3e-3, 5e-3, 1000, 2000)
    assert slope == pytest.approx(2e-6) and intercept == pytest.approx(1e-3)


class TimedOptimizer(torch.optim.Optimizer):
    """A step that spins for FIXED seconds plus PER_ELEMENT per element of its parameters (spinning,
    not sleeping, so the time is exact to a microsecond), and doubles their gradients in place."""

    FIXED = 300e-6
    PER_ELEMENT = 40e-9

    def __init__(self, params, grads_seen):
        super().__init__(params, {})
        self.grads_seen = grads_seen

    def step(self, closure=None):
        params = self.param_groups[0]["params"]
        self.grads_seen.append(params[0].grad[0].item())
        for p in params:
            p.grad.mul_(2)
        until = time.perf_counter() + self.FIXED + self.PER_ELEMENT * sum(p.numel() for p in params)
        while time.perf_counter() < until:
            pass


@pytest.mark.parametrize("restore", [True, False])
def test_the_slope_is_the_step_s_cost_per_element_without_its_fixed_cost(restore):
    seen = []
    result = ceiling.measure_compute(lambda params: TimedOptimizer(params, seen), torch.float32, 4000,
                                     restore_grads=restore, reps=5)
    assert result.numel == (4096, 8192)
    assert result.ns_per_element == pytest.approx(TimedOptimizer.PER_ELEMENT * 1e9, rel=0.1)
    assert result.fixed_us == pytest.approx(TimedOptimizer.FIXED * 1e6, rel=0.25)
    assert result.ms_for(10**6) == pytest.approx(result.ns_per_element)
    # restored: every step saw the gradient it started with; else it doubled from step to step
    first = {abs(g) for g in seen}
    assert (len(first) == 2) if restore else (len(first) > 2)


def test_noise_that_leaves_no_slope_gives_no_ceiling(monkeypatch):
    """The larger list timed faster than the smaller: no per-element cost can be read off."""
    timings = iter([0.0] * 6 + [2e-3, 1e-3] * ceiling.REPS)
    monkeypatch.setattr(ceiling, "time_calls", lambda fn, n, before=None: [next(timings) for _ in range(n)])
    result = ceiling.measure_compute(lambda params: torch.optim.SGD(params, lr=0.1), torch.float32, 4000)
    assert result.ns_per_element is None and result.ms_for(10**6) is None
