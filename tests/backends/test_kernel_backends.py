"""The kernel backends (Triton, native) against the reference backend, on every mask kind.

Masks (dense and Bernoulli) are integer decisions and must be bit-identical; parameter values
agree to rtol 1e-6 / atol 1e-7 after 5 steps (the same fp32 formula; only the reference's
multiply-add contraction inside torch's CPU lerp differs).  bf16 / fp16 values may then round
one unit of their last place apart.
"""
import pytest
import torch

from childopt import MaskedAdamW, backends
from childopt import sparse as sparse_mod
from childopt.backends import SparseTensorLists, reference
from childopt.backends.contract import StepScalars
from tests.helpers import (MIXED_SHAPES, clone_params, grads_at, kernel_backend, make_params, masks_for, snapshot,
                           train)

ODD_SHAPES = MIXED_SHAPES + [(0, 4), (1031,), (5, 0)]
LOW_PRECISION_RTOL = {torch.bfloat16: 2**-7, torch.float16: 2**-10}


def run_masked(params, backend, mask_kind, masked, steps=5, **kwargs):
    mask = {"none": None, "bernoulli": "bernoulli", "dense": masks_for(params)}[mask_kind]
    opt = MaskedAdamW(params, lr=1e-2, weight_decay=0.05, mask=mask, reserve_p=0.4, masked=masked, seed=31,
                      backend=backend, **kwargs)
    train(opt, params, steps)
    return snapshot(opt, params, ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"))


def assert_close_to_reference(ours, ref):
    for a, b in zip(ours, ref, strict=True):
        if a.dtype == torch.float32:
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
        else:
            torch.testing.assert_close(a, b, rtol=LOW_PRECISION_RTOL[a.dtype], atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mask_kind,masked", [("none", None), ("dense", "freeze"), ("dense", "zero_grad"),
                                              ("bernoulli", "zero_grad"), ("bernoulli", "freeze")])
@pytest.mark.parametrize("flags", [{}, {"amsgrad": True, "maximize": True}], ids=["plain", "amsgrad-maximize"])
def test_kernels_match_reference(kernel_lane, dtype, mask_kind, masked, flags):
    backend, device = kernel_lane
    ours = run_masked(make_params(ODD_SHAPES, device, dtype=dtype), backend, mask_kind, masked, **flags)
    ref = run_masked(clone_params(make_params(ODD_SHAPES, device, dtype=dtype)), "reference", mask_kind, masked,
                     **flags)
    assert_close_to_reference(ours, ref)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["triton", "native"])
def test_kernels_match_reference_at_real_sizes(backend):
    ok, why = backends.MODULES[backend].available(torch.device("cuda"))
    if not ok:
        pytest.skip(why)
    shapes = [(50265, 768), (3072, 768), (768,), (768, 3072), (2, 768), (1,)]
    for mask_kind, masked in (("none", None), ("dense", "freeze"), ("bernoulli", "zero_grad")):
        ours = run_masked(make_params(shapes, "cuda"), backend, mask_kind, masked, steps=3)
        ref = run_masked(make_params(shapes, "cuda"), "reference", mask_kind, masked, steps=3)
        for a, b in zip(ours, ref, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("compact", [False, True], ids=["dense-grads", "compact-grads"])
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
def test_sparse_kernels_match_reference(kernel_lane, compact, index_dtype):
    """Gathered entries, empty index sets and odd sizes; compact or dense gradients.

    Same tolerance as the dense step against the reference; bitwise equality with dense
    freeze is tested within each backend (tests/test_optim_sparse.py).
    """
    name, device = kernel_lane

    def run(backend):
        params = make_params(ODD_SHAPES + [(3000,)], device)
        masks = masks_for(params, density=0.2)
        indices = [sparse_mod.indices_from_mask(masks[p]).to(index_dtype) for p in params]
        state = [torch.zeros(i.numel(), device=device) for i in indices for _ in range(3)]
        for t in range(3):
            grads = [g.reshape(-1)[i.long()] if compact else g for g, i in zip(grads_at(params, t), indices)]
            lists = SparseTensorLists(params, grads, indices, state[0::3], state[1::3], state[2::3], compact)
            with torch.no_grad():  # as inside optimizer.step()
                backend.sparse_adamw_step(lists, StepScalars(
                    decay_before=0.999, decay_after=1.0, one_minus_beta1=0.1, beta2=0.999, one_minus_beta2=0.001,
                    eps=1e-8, step_size=0.01, bc2_sqrt=0.5, grad_scale=1.0, grad_sign=-1.0, lerp_from_start=1.0,
                    step=t + 1, rng_base=0).rows(len(params)))
        return [p.detach() for p in params] + state

    for a, b in zip(run(kernel_backend(name)), run(reference.Backend()), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
