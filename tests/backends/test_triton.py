"""The Triton backend against the reference backend, on every mask kind and mixed shapes.

Masks (dense and Bernoulli) are integer decisions and must be bit-identical; parameter values
agree to rtol 1e-6 / atol 1e-7 after 5 steps (the same fp32 formula; only multiply-add
contraction can differ).  Under the interpreter on CPU they are usually bit-identical.
"""
import pytest
import torch

from childopt import MaskedAdamW, backends, philox
from childopt import sparse as sparse_mod
from childopt.backends.ops import StepScalars
from childopt.backends import triton as triton_backend
from childopt.kernels import masked_adamw
from tests.helpers import MIXED_SHAPES, clone_params, grads_at, make_params, masks_for, snapshot, train

ODD_SHAPES = MIXED_SHAPES + [(0, 4), (1031,), (5, 0)]


@pytest.fixture
def device(triton_device):
    return triton_device


def _run(params, backend, mask_kind, masked, steps=5, **kwargs):
    mask = {"none": None, "bernoulli": "bernoulli", "dense": masks_for(params)}[mask_kind]
    opt = MaskedAdamW(params, lr=1e-2, weight_decay=0.05, mask=mask, reserve_p=0.4, masked=masked, seed=31,
                      backend=backend, **kwargs)
    train(opt, params, steps)
    return snapshot(opt, params, ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mask_kind,masked", [("none", None), ("dense", "freeze"), ("dense", "zero_grad"),
                                              ("bernoulli", "zero_grad"), ("bernoulli", "freeze")])
@pytest.mark.parametrize("flags", [{}, {"amsgrad": True, "maximize": True}], ids=["plain", "amsgrad-maximize"])
def test_triton_matches_reference(device, dtype, mask_kind, masked, flags):
    params = make_params(ODD_SHAPES, device, dtype=dtype)
    ours = _run(params, "triton", mask_kind, masked, **flags)
    ref = _run(clone_params(make_params(ODD_SHAPES, device, dtype=dtype)), "reference", mask_kind, masked, **flags)
    for a, b in zip(ours, ref):
        if a.dtype == torch.float32:
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
        else:
            torch.testing.assert_close(a, b, rtol={torch.bfloat16: 2**-7, torch.float16: 2**-10}[a.dtype], atol=1e-6)


def _applied_bernoulli(device, backend):
    params = make_params(ODD_SHAPES, device)
    opt = MaskedAdamW(params, lr=0.0, betas=(0.0, 0.999), mask="bernoulli", reserve_p=0.3, seed=2**40 + 17)
    opt._backends[torch.device(device)] = backend
    for step in range(3):
        for p in params:
            p.grad = torch.ones_like(p)
        opt.step()
    return [opt.state[p]["exp_avg"] for p in params]


@pytest.mark.parametrize("block,iters", [(4, 1), (64, 3), (256, 1), (1024, 2)])
def test_bernoulli_masks_bit_identical_to_reference_for_any_block_size(device, block, iters):
    from childopt.backends import reference

    ours = _applied_bernoulli(device, triton_backend.Backend(block=block, iters=iters))
    ref = _applied_bernoulli(device, reference.Backend())
    for a, b in zip(ours, ref):
        assert torch.equal(a, b)


def test_one_launch_steps_a_whole_bucket(device, monkeypatch):
    calls = []
    original = masked_adamw.launch
    monkeypatch.setattr(masked_adamw, "launch", lambda *a, **k: (calls.append(1), original(*a, **k)))
    params = make_params([(3, 5)] * 40 + [(7,)] * 10, device)
    opt = MaskedAdamW(params, mask="bernoulli", reserve_p=0.5, seed=0, backend="triton")
    train(opt, params, 2)
    assert len(calls) == 2


def test_plan_cache_survives_new_gradient_storage(device):
    params = make_params([(9,), (4, 4)], device)
    opt = MaskedAdamW(params, lr=1e-2, seed=0, backend="triton")
    ref_params = clone_params(params)
    ref = MaskedAdamW(ref_params, lr=1e-2, seed=0, backend="reference")
    for t in range(4):
        for ps in (params, ref_params):
            for p in ps:
                p.grad = torch.full_like(p, float(t + 1))
        opt.step()
        ref.step()
        assert len(opt._backends[torch.device(device)]._plans) <= 8
    for a, b in zip(params, ref_params):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_block_must_be_a_power_of_two(device):
    params = make_params([(4,)], device)
    lists = masked_adamw.launch_lists(params, params, params, params)
    with pytest.raises(ValueError, match="power of two"):
        masked_adamw.make_plan(lists, block=48)


@pytest.mark.cuda
def test_triton_matches_reference_at_real_sizes():
    shapes = [(50265, 768), (3072, 768), (768,), (768, 3072), (2, 768), (1,)]
    for mask_kind, masked in (("none", None), ("dense", "freeze"), ("bernoulli", "zero_grad")):
        ours = _run(make_params(shapes, "cuda"), "triton", mask_kind, masked, steps=3)
        ref = _run(make_params(shapes, "cuda"), "reference", mask_kind, masked, steps=3)
        for a, b in zip(ours, ref):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_registry_reports_why_triton_cannot_run():
    ok, why = triton_backend.available(torch.device("meta"))
    assert not ok and "CUDA" in why
    with pytest.raises(RuntimeError, match="backend 'triton' cannot run on meta"):
        backends.create("triton", torch.device("meta"))


@pytest.mark.cuda
@pytest.mark.slow
def test_tensor_past_2_31_elements_is_stepped_to_its_end():
    """int64 indexing: the last elements of a 2^31 + 1000 element bf16 tensor (~26 GB with state)."""
    n = 2**31 + 1000
    p = torch.nn.Parameter(torch.ones(n, dtype=torch.bfloat16, device="cuda"))
    p.grad = torch.ones_like(p)
    p.grad[-1000:] = 2.0
    opt = MaskedAdamW([p], lr=1e-2, mask="bernoulli", reserve_p=0.5, seed=4, backend="triton")
    opt.step()
    tail = slice(n - 1000, n)
    keep = philox.random_words(1000, (n - 1000) // 4, 4, 1, "cuda") < philox.keep_threshold(0.5)
    torch.testing.assert_close(opt.state[p]["exp_avg"][tail], torch.where(keep, 0.1 * 2.0 / 0.5, 0.0))
    # Kept entries move by ~lr; dropped ones only decay by 1 - 1e-4, which rounds back to 1 in bf16.
    assert bool((p.detach()[tail][keep] < 1).all()) and bool((p.detach()[tail][~keep] == 1).all())


@pytest.mark.parametrize("compact", [False, True], ids=["dense-grads", "compact-grads"])
def test_sparse_kernel_matches_reference(device, compact):
    """Gathered entries, empty index sets and odd sizes; compact or dense gradients.

    Same tolerance as the dense kernel against the reference (torch's CPU lerp fuses a
    multiply-add); bitwise equality with dense freeze is tested within each backend.
    """
    from childopt.backends import reference
    from childopt.backends.ops import SparseTensorLists

    def run(backend):
        params = make_params(ODD_SHAPES + [(3000,)], device)
        masks = masks_for(params, density=0.2)
        indices = [sparse_mod.indices_from_mask(masks[p]) for p in params]
        state = [torch.zeros(i.numel(), device=device) for i in indices for _ in range(3)]
        for t in range(3):
            grads = [g.reshape(-1)[i.long()] if compact else g for g, i in zip(grads_at(params, t), indices)]
            lists = SparseTensorLists(params, grads, indices, state[0::3], state[1::3], state[2::3], compact)
            with torch.no_grad():  # as inside optimizer.step()
                backend.sparse_adamw_step(lists, StepScalars(0.999, 0.1, 0.999, 0.001, 1e-8, 0.01, 0.5,
                                                             True, True, False))
        return [p.detach() for p in params] + state

    for a, b in zip(run(triton_backend.Backend(block=64, iters=2)), run(reference.Backend())):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
