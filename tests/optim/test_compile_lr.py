"""A compiled step with a float lr and an LR scheduler recompiles no more than torch AdamW's and
equals the eager step bit for bit.

Dynamo leaves a float it has seen change unspecialised (a graph input); the step's rows used to
turn lr into a tensor with ``torch.as_tensor``, which bakes the value in: a recompile per
scheduler step, then, past the recompile limit, an eager step with no warning.
"""
import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

from childopt import MaskedAdamW
from tests.helpers import assert_all_equal

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
WARM, STEPS = 3, 10


def _train(make_optimizer, compiled: bool) -> tuple:
    """Params after STEPS scheduled steps, and the graphs compiled after the first WARM steps
    (the first compiles, the second sees the state, the third a changed lr)."""
    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    opt = make_optimizer(model)
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    x = torch.randn(8, 16, generator=torch.Generator().manual_seed(2))

    def step():
        model(x).square().mean().backward()
        opt.step()
        opt.zero_grad()

    fn = torch.compile(step) if compiled else step
    warm = 0
    for s in range(STEPS):
        fn()
        scheduler.step()
        if s == WARM - 1:
            warm = counters["stats"]["unique_graphs"]
    assert isinstance(opt.param_groups[0]["lr"], float)
    return [p.detach().clone() for p in model.parameters()], counters["stats"]["unique_graphs"] - warm


@pytest.mark.parametrize("mask", [None, "bernoulli"])
@pytest.mark.parametrize("backend", ["reference", "native"])
def test_a_float_lr_schedule_compiles_no_graph_after_warm_up_and_matches_eager(lane_on_cpu, backend, mask):
    lane_on_cpu(backend)

    def make(model):
        return MaskedAdamW(model.parameters(), lr=1e-2, weight_decay=0.1, mask=mask, reserve_p=0.5, seed=7,
                           backend=backend)

    eager, _ = _train(make, compiled=False)
    compiled, late_graphs = _train(make, compiled=True)
    theirs, torch_late_graphs = _train(lambda m: torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.1),
                                       compiled=True)
    assert torch_late_graphs == 0
    assert late_graphs == 0
    assert_all_equal(compiled, eager)
    if mask is None:  # tolerance of tests/optim/test_masked_adamw.py
        for ours, ref in zip(compiled, theirs):
            torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
