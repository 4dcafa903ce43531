"""The in-cache time: the list sizes it picks from the cache and thread count, the slope between
two timings worked out by hand, and the slope it recovers from an optimizer whose step costs a
known time per element."""
import time

import pytest
import torch

from childopt.bench import ceiling
from childopt.bench.threads import intra_op_threads


def test_lists_give_every_thread_whole_work_items_and_fill_at_most_the_cache_share():
    """32 MiB: 0.75 * 33554432 / (3 * 32) = 262144 elements; a unit is 32768 elements per thread, so
    up to 8 threads get whole work items, 16 do not fit; 105 MiB: 860160, in units of 65536 at 2."""
    assert ceiling.TENSORS == 1
    assert [ceiling.ceiling_numel(32 * 2**20, t) for t in (1, 2, 3, 8, 16)] == [262144, 262144, 196608, 262144, None]
    assert ceiling.ceiling_numel(105 * 2**20, 2) == 851968
    assert ceiling.ceiling_numel(2**20, 1) is None


def test_slope_between_two_timings_and_none_within_the_noise():
    """3 ms at 1000 elements and 5 ms at 2000: 2 us per element; 3.1 ms against 3 ms differ by
    less than 5%: no slope."""
    assert ceiling.slope(3e-3, 5e-3, 1000, 2000) == pytest.approx(2e-6)
    assert ceiling.slope(3e-3, 3.1e-3, 1000, 2000) is None
    assert ceiling.slope(3e-3, 2e-3, 1000, 2000) is None


class TimedOptimizer(torch.optim.Optimizer):
    """A step that spins for FIXED seconds plus PER_ELEMENT per element of its parameters (spinning,
    not sleeping, so the time is exact to a microsecond), and doubles their gradients in place."""

    FIXED = 1e-3
    PER_ELEMENT = 4e-9

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
    """At 1 thread on a 16 MiB "cache": lists of 131072 and 262144 elements, 1.52 and 2.05 ms per
    step; the 0.52 ms between them over 131072 elements is 4 ns per element, the fixed 1 ms cancels.
    (One thread also keeps the gradients' in-place doubling serial: a parallel op on a loaded
    machine waits for its second thread.)"""
    seen = []
    with intra_op_threads(1):
        ns = ceiling.measure_compute(lambda params: TimedOptimizer(params, seen), torch.float32, 16 * 2**20,
                                     restore_grads=restore)
    assert ns == pytest.approx(TimedOptimizer.PER_ELEMENT * 1e9, rel=0.2)
    # restored: each list's steps all saw the gradient it started with; else it doubled step after step
    assert (len({abs(g) for g in seen}) == 2) if restore else (len({abs(g) for g in seen}) > 2)


def test_no_figure_without_a_slope_or_without_room_in_the_cache(monkeypatch):
    """The larger list timed no slower than the smaller: nothing can be read off; a cache too small
    for one unit of lists: nothing is stepped."""
    timings = iter([0.0] * (2 * ceiling.WARMUP) + [2e-3, 1e-3] * ceiling.REPS)
    monkeypatch.setattr(ceiling, "time_calls", lambda fn, n, before=None: [next(timings) for _ in range(n)])
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    assert ceiling.measure_compute(lambda params: torch.optim.SGD(params, lr=0.1), torch.float32, 32 * 2**20) is None
    made = []
    assert ceiling.measure_compute(lambda params: made.append(params), torch.float32, 2**20) is None and made == []
