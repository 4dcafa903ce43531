"""Property-based tests of the optimizer API: any valid configuration steps as the reference does.

hypothesis draws parameter shapes (empty and 0-d included), dtypes, mask kinds, storages,
masked modes, group splits and hyper-parameters; the kernel backends must match the reference
backend (itself checked against torch.optim.AdamW in test_masked_adamw.py), and the invariants
that need no oracle hold on every backend: frozen entries stay bit-identical, weights stay
finite, step counts advance once per step.

Tolerance: fp32 weights rtol 1e-5 / atol 1e-6 (the backends' fp32 operation orders may differ
in the last bit, e.g. a fused multiply-add); bf16/fp16 weights one ulp of their dtype (a last-bit
fp32 difference can move a value across a rounding boundary); float64 weights are stepped by
the reference on every backend, so they must be equal.  Sized for about a minute on 2 cores.
"""
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from childopt import MaskedAdamW

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
ULP = {torch.float32: 1e-5, torch.bfloat16: 2**-7, torch.float16: 2**-10, torch.float64: 0.0}
SETTINGS = dict(deadline=None, database=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

shapes = st.lists(st.integers(0, 9), min_size=0, max_size=3).map(tuple)


@st.composite
def configurations(draw):
    """One optimizer configuration and its training inputs (plain data: rebuilt per backend)."""
    kind = draw(st.sampled_from(["none", "dense", "bernoulli"]))
    storage = draw(st.sampled_from(["dense", "sparse"])) if kind == "dense" else "dense"
    masked = draw(st.sampled_from([None, "freeze"] + ([] if storage == "sparse" else ["zero_grad"])))
    return dict(
        shapes=draw(st.lists(shapes, min_size=1, max_size=4)),
        dtype=draw(st.sampled_from(DTYPES)),
        kind=kind, storage=storage, masked=masked,
        split=draw(st.integers(0, 4)),
        lr=draw(st.sampled_from([1e-2, 0.1])),  # large enough that each term shows
        weight_decay=draw(st.sampled_from([0.0, 0.5])),
        betas=draw(st.sampled_from([(0.9, 0.999), (0.5, 0.9), (0.0, 0.99)])),
        amsgrad=draw(st.booleans()), maximize=draw(st.booleans()),
        reserve_p=draw(st.sampled_from([0.3, 0.7])),
        seed=draw(st.integers(0, 2**64 - 1)), steps=draw(st.integers(1, 3)),
        data_seed=draw(st.integers(0, 2**31 - 1)),
    )


def _build(config, backend):
    """Parameters, optimizer and per-step gradients of ``config`` on ``backend``."""
    gen = torch.Generator().manual_seed(config["data_seed"])
    params = [torch.nn.Parameter(torch.randn(s, generator=gen).to(config["dtype"])) for s in config["shapes"]]
    split = min(config["split"], len(params))
    groups = [{"params": part} for part in (params[:split], params[split:]) if part]
    if len(groups) == 2:
        groups[1].update(lr=config["lr"] / 2, amsgrad=not config["amsgrad"])
    mask = {"none": None, "bernoulli": "bernoulli",
            "dense": {p: torch.rand(p.shape, generator=gen) < 0.5 for p in params[::2]}}[config["kind"]]
    opt = MaskedAdamW(groups, lr=config["lr"], betas=config["betas"], weight_decay=config["weight_decay"],
                      amsgrad=config["amsgrad"], maximize=config["maximize"], mask=mask,
                      reserve_p=1.0 if mask is None else config["reserve_p"],  # without a mask it would warn
                      masked=config["masked"], seed=config["seed"],
                      storage=config["storage"], backend=backend)
    grads = [[torch.randn(p.shape, generator=gen).to(p.dtype) for p in params] for _ in range(config["steps"])]
    return params, opt, grads, mask


def _run(config, backend):
    params, opt, grads, mask = _build(config, backend)
    start = [p.detach().clone() for p in params]
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = g
        opt.step()
    return params, opt, start, mask


def _check_invariants(config, params, opt, start, mask):
    for p, p0 in zip(params, start):
        assert torch.isfinite(p.detach().float()).all()
        assert int(opt.state[p]["step"]) == config["steps"]
        frozen = isinstance(mask, dict) and p in mask and config["masked"] in (None, "freeze")
        if frozen:
            assert torch.equal(p.detach()[~mask[p]], p0[~mask[p]])


def _check_backend_matches_reference(config, backend):
    ours, opt, start, mask = _run(config, backend)
    _check_invariants(config, ours, opt, start, mask)
    reference, _, _, _ = _run(config, "reference")
    ulp = ULP[config["dtype"]]
    for a, b in zip(ours, reference):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=ulp, atol=1e-6 if ulp else 0.0)


@settings(max_examples=150, **SETTINGS)
@given(config=configurations())
def test_native_matches_the_reference_on_any_configuration(lane_on_cpu, config):
    lane_on_cpu("native")
    _check_backend_matches_reference(config, "native")


@settings(max_examples=30, **SETTINGS)
@given(config=configurations())
def test_triton_matches_the_reference_on_any_configuration(lane_on_cpu, config):
    lane_on_cpu("triton")
    _check_backend_matches_reference(config, "triton")


@settings(max_examples=100, **SETTINGS)
@given(config=configurations())
def test_the_reference_keeps_the_invariants_and_round_trips_its_state(config):
    """A state dict saved after the run and loaded into a fresh optimizer continues identically."""
    params, opt, start, mask = _run(config, "reference")
    _check_invariants(config, params, opt, start, mask)
    twin_params, twin, _, _ = _build(config, "reference")
    with torch.no_grad():
        for a, b in zip(twin_params, params):
            a.copy_(b)
    twin.load_state_dict(opt.state_dict())
    gen = torch.Generator().manual_seed(config["data_seed"] + 1)
    for p, q in zip(params, twin_params):
        p.grad = q.grad = torch.randn(p.shape, generator=gen).to(p.dtype)
    opt.step()
    twin.step()
    for a, b in zip(params, twin_params):
        assert torch.equal(a, b)


def test_the_strategy_reaches_every_mask_kind_and_storage():
    """The drawn configurations cover what the properties claim (guards against a narrowed strategy)."""
    seen = set()

    @settings(max_examples=60, **SETTINGS)
    @given(config=configurations())
    def collect(config):
        seen.add((config["kind"], config["storage"]))

    collect()
    assert seen == {("none", "dense"), ("dense", "dense"), ("dense", "sparse"), ("bernoulli", "dense")}
