"""Live tensor bytes of one step: the profiler walk against allocations made on purpose, and the
optimizer state a first step must allocate, counted from the state tensors themselves."""
import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from childopt import MaskedAdamW
from childopt.bench import live
from childopt.bench.shapes import make_params

CPU = torch.device("cpu")
SHAPES = [(1000, 200), (200,), (300, 300)]


def test_the_profiler_sees_each_allocation_and_free_in_time_order():
    """1 MB allocated and freed, then 2 MB and 1 MB held together: the peak above the start is 3 MB."""
    def allocate():
        first = torch.empty(250_000)
        del first
        second, third = torch.empty(500_000), torch.empty(250_000)
        del second, third

    assert live.cpu_peak_increase(allocate) == 3_000_000


def test_freeing_what_was_live_before_never_counts_below_the_start():
    """A tensor made under an earlier profile (so the profiler knows its size) and freed in the step:
    its free is not counted, so the step's own 2 MB peak is not hidden under it."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True):
        before = torch.empty(1_000_000)

    def free_then_allocate():
        nonlocal before
        before = None
        held = torch.empty(250_000), torch.empty(250_000)
        del held

    assert live.cpu_peak_increase(free_then_allocate) == 2_000_000


def test_marked_bytes_are_the_marked_allocations_live_at_the_peak():
    """a (1 MB, marked) and b (2 MB, unmarked) are live at the 3 MB peak; d, marked, is allocated
    after b is freed, below the peak: only a counts."""
    def step():
        a, b = torch.empty(250_000), torch.empty(500_000)
        live.mark_allocation("test@", a)
        del b
        d = torch.empty(100_000)
        live.mark_allocation("test@", d)

    assert live.cpu_peak_and_marked(step, "test@") == (3_000_000, 1_000_000)
    assert live.cpu_peak_and_marked(step) == (3_000_000, 0)


def test_held_bytes_count_parameters_gradients_and_state_each_storage_once():
    params = make_params(SHAPES, CPU)
    numel = sum(p.numel() for p in params)
    opt = torch.optim.AdamW(params, fused=True)
    assert live.held_bytes(params, opt) == 8 * numel  # parameters and gradients, fp32
    opt.state[params[0]]["view"] = params[0].detach()[:10]  # a view of a parameter adds nothing
    opt.state[params[1]]["grad"] = params[1].grad  # nor a gradient held twice
    assert live.held_bytes(params, opt) == 8 * numel
    opt.state[params[2]]["own"] = torch.zeros(10)
    assert live.held_bytes(params, opt) == 8 * numel + 40


def state_bytes(opt):
    """Bytes of the optimizer's state tensors, summed from the tensors (the oracle)."""
    return sum(v.nbytes for s in opt.state.values() for v in s.values() if isinstance(v, torch.Tensor))


def test_a_first_adamw_step_allocates_its_moments_and_sparse_storage_far_less():
    """torch AdamW's first step creates exp_avg and exp_avg_sq: at least 8 B per parameter, as the
    state tensors it leaves count; MaskedAdamW with sparse storage at 5% holds 12 B per selected
    entry, and its first step allocates well under a quarter of that 8 B per parameter."""
    params = make_params(SHAPES, CPU)
    numel = sum(p.numel() for p in params)
    adamw = torch.optim.AdamW(params, fused=True)
    dense = live.measure_live(adamw.step, params, adamw, CPU)
    assert dense.held == 8 * numel
    assert dense.peak_increase >= state_bytes(adamw) >= 8 * numel
    assert dense.peak == dense.held + dense.peak_increase

    params = make_params(SHAPES, CPU)
    masks = {p: torch.rand(p.shape) < 0.05 for p in params}
    sparse = MaskedAdamW(params, mask=masks, storage="sparse", backend="reference")
    held_before = live.held_bytes(params, sparse)
    first = live.measure_live(sparse.step, params, sparse, CPU)
    assert first.held == held_before
    assert first.held + first.peak_increase >= live.held_bytes(params, sparse)  # its state was allocated in it
    assert first.peak_increase < 0.25 * dense.peak_increase
    assert state_bytes(sparse) == pytest.approx(12 * 0.05 * numel, rel=0.05, abs=64)
