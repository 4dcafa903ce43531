"""torch.compile of a training step that calls ``opt.step()``: no more graph breaks than torch
AdamW takes in the same step, the same parameters as eager, and with ``capturable=True`` no
recompile while an LR scheduler changes the learning rate.

Compiled and eager steps are compared bit for bit: the step scalars are float64 tensor
arithmetic in the compiled step and Python float arithmetic in the eager one (one formula,
childopt.optim.functional._columns); inductor's fused kernels and the C library's pow may differ
from torch's eager pow in the last float64 bit, which the rounding to fp32 here removes (if a
torch release made them differ after it, the test would show it).
"""
import warnings

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

from childopt import Importance, MaskedAdamW
from tests.helpers import assert_all_equal, capture_step

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
# storage "sparse+compact": sparse storage with compact gradients (a hook in backward)
CASES = [("dense", "none"), ("dense", "dense"), ("dense", "bernoulli"), ("sparse", "none"), ("sparse", "dense"),
         ("sparse+compact", "dense")]


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))


def _mask(model, kind):
    if kind == "bernoulli":
        return "bernoulli"
    if kind == "dense":
        gen = torch.Generator().manual_seed(1)
        return {p: torch.rand(p.shape, generator=gen) < 0.5 for p in model.parameters()}
    return None


def _train(make_optimizer, compiled: bool, steps: int, scheduled: bool = False, resumed: bool = False):
    """Params after ``steps`` training steps (forward, backward, step, zero_grad), and graph breaks;
    ``resumed``: one eager step and a reload of the optimizer's state dict come first."""
    torch._dynamo.reset()
    counters.clear()
    model = _model()
    opt = make_optimizer(model)
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s)) if scheduled else None
    x = torch.randn(8, 16, generator=torch.Generator().manual_seed(2))

    def step():
        loss = model(x).square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        return loss

    if resumed:
        step()
        opt.load_state_dict(opt.state_dict())
    fn = torch.compile(step) if compiled else step
    for _ in range(steps):
        fn()
        if scheduler is not None:
            scheduler.step()
    return [p.detach().clone() for p in model.parameters()], sum(counters["graph_break"].values()), fn, scheduler


@pytest.fixture(scope="module")
def torch_adamw_breaks():
    return _train(lambda m: torch.optim.AdamW(m.parameters(), lr=1e-2), compiled=True, steps=2)[1]


@pytest.mark.parametrize("storage,mask", CASES, ids=[f"{s}-{m}" for s, m in CASES])
@pytest.mark.parametrize("backend", ["reference", "native"])
def test_a_compiled_step_breaks_no_more_than_torch_adamw_and_matches_eager(lane_on_cpu, backend, storage, mask,
                                                                           torch_adamw_breaks):
    lane_on_cpu(backend)

    def make(model):
        return MaskedAdamW(model.parameters(), lr=1e-2, weight_decay=0.1, mask=_mask(model, mask), reserve_p=0.5,
                           seed=7, backend=backend, storage=storage.split("+")[0],
                           compact_grads=storage.endswith("+compact"))

    eager, _, _, _ = _train(make, compiled=False, steps=3)
    compiled, breaks, _, _ = _train(make, compiled=True, steps=3)
    # torch's own optimizers break twice around step() (torch.optim.optimizer._use_grad_for_differentiable,
    # so AOT sees an inference graph); backward() and zero_grad() break for both.  No extra break is ours,
    # the compact-gradient hook that backward runs included.
    assert breaks <= torch_adamw_breaks
    assert_all_equal(compiled, eager)


def test_a_live_compact_gradient_optimizer_leaves_torch_adamws_compiled_step_alone(torch_adamw_breaks):
    """The global step pre-hook that refuses to let another optimizer skip hooked parameters runs
    eagerly only: traced, its weak dictionary changed the graph breaks of torch's compiled steps."""
    other = torch.nn.Linear(4, 4)
    live = MaskedAdamW(other.parameters(), mask={p: torch.ones_like(p, dtype=torch.bool) for p in other.parameters()},
                       storage="sparse", compact_grads=True)
    breaks = _train(lambda m: torch.optim.AdamW(m.parameters(), lr=1e-2), compiled=True, steps=2)[1]
    assert live.compact_gradients() == {} and breaks == torch_adamw_breaks


@pytest.mark.parametrize("resumed", [False, True], ids=["fresh", "resumed"])
@pytest.mark.parametrize("backend", ["reference", "native"])
def test_an_importance_refresh_leaves_the_graph_as_one_unit(lane_on_cpu, backend, resumed, torch_adamw_breaks):
    """The refresh (a solve with host reads, opaque kernel calls) runs eagerly: one graph break where
    a compiled step refreshes (step 0, before the state exists, and step 3, in the graph with state,
    which later refreshes reuse), none where it does not; a resumed run rebuilds its sampler at the
    saved step count, so the refreshes fall on the eager run's steps."""
    lane_on_cpu(backend)

    def make(model):
        return MaskedAdamW(model.parameters(), lr=1e-2, mask=Importance(refresh_every=3), reserve_p=0.5, seed=7,
                           backend=backend)

    eager, _, _, _ = _train(make, compiled=False, steps=5, resumed=resumed)
    compiled, breaks, _, _ = _train(make, compiled=True, steps=5, resumed=resumed)
    assert breaks <= torch_adamw_breaks + 2, breaks
    assert_all_equal(compiled, eager)


@pytest.mark.parametrize("mask", ["none", "dense", "bernoulli"])
@pytest.mark.parametrize("backend", ["reference", "native"])
def test_capturable_lr_schedules_cause_no_recompile(lane_on_cpu, backend, mask):
    """lr is a tensor the scheduler writes in place and the step counts are tensors: after the
    first two calls (the second recompiles once because the state now exists, as torch AdamW's
    does), 20 scheduler steps reuse the compiled graphs."""
    lane_on_cpu(backend)

    def make(model):
        return MaskedAdamW(model.parameters(), lr=1e-2, mask=_mask(model, mask), reserve_p=0.5, seed=7,
                           backend=backend, capturable=True)

    eager, _, _, _ = _train(make, compiled=False, steps=22, scheduled=True)
    torch._dynamo.reset()
    _, _, fn, scheduler = _train(make, compiled=True, steps=2, scheduled=True)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for _ in range(20):
            fn()
            scheduler.step()
    compiled = [p.detach().clone() for p in scheduler.optimizer.param_groups[0]["params"]]
    assert isinstance(scheduler.optimizer.param_groups[0]["lr"], torch.Tensor)
    assert_all_equal(compiled, eager)


def test_capturable_keeps_step_counts_on_the_parameters_device():
    p = torch.nn.Parameter(torch.ones(3))
    opt = MaskedAdamW([p], lr=0.1, capturable=True, backend="reference")
    p.grad = torch.ones(3)
    opt.step()
    assert opt.state[p]["step"].device == p.device and opt.state[p]["step"].item() == 1
    assert opt.param_groups[0]["lr"].dtype == torch.float64


def test_a_cuda_graph_captures_and_replays_the_step(cuda_backend):
    """Capture one step after warm-up; each replay equals an eager step on a twin model."""
    backend = cuda_backend
    params = [torch.nn.Parameter(torch.randn(4099, device="cuda")) for _ in range(3)]
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    grads = [torch.randn_like(p) for p in params]
    opt = MaskedAdamW(params, lr=1e-2, mask="bernoulli", reserve_p=0.5, seed=3, backend=backend, capturable=True)
    ref = MaskedAdamW(twins, lr=1e-2, mask="bernoulli", reserve_p=0.5, seed=3, backend=backend, capturable=True)
    for p, g in zip(params + twins, grads + grads):
        p.grad = g.clone()
    graph = capture_step(opt)
    for _ in range(3):
        ref.step()
    for _ in range(3):
        graph.replay()
        ref.step()
    torch.cuda.synchronize()
    assert_all_equal([p.detach() for p in params], [p.detach() for p in twins])


def test_step_runs_torch_s_capture_health_check_before_touching_a_tensor(monkeypatch):
    """The check that refuses a CUDA graph capture without ``capturable`` (on a GPU, below) runs
    first: when it raises, nothing has changed."""
    params = [torch.nn.Parameter(torch.randn(7))]
    params[0].grad = torch.randn(7)
    before = params[0].detach().clone()
    opt = MaskedAdamW(params, lr=1e-2, mask="bernoulli", reserve_p=0.5, seed=3)

    def refuse():
        raise RuntimeError("capture refused")

    monkeypatch.setattr(opt, "_capture_health_check", refuse)
    with pytest.raises(RuntimeError, match="capture refused"):
        opt.step()
    assert torch.equal(params[0].detach(), before) and opt.state[params[0]] == {}


def test_the_capture_check_warns_about_nothing_on_every_step():
    """torch's check under its current name: no deprecation warning per step."""
    params = [torch.nn.Parameter(torch.randn(7))]
    params[0].grad = torch.randn(7)
    opt = MaskedAdamW(params, lr=1e-2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step()
        opt.step()


def test_capturing_a_step_without_capturable_is_refused(cuda_backend):
    """Its step counts and rows live on the host: every replay would repeat the captured step."""
    params = [torch.nn.Parameter(torch.randn(4099, device="cuda"))]
    params[0].grad = torch.randn_like(params[0])
    opt = MaskedAdamW(params, lr=1e-2, backend=cuda_backend)
    with pytest.raises(RuntimeError, match="capturable is False"):
        capture_step(opt)
