"""The kernel backends (Triton, native) against the reference backend, and against a plain-torch
masked AdamW written here, on every mask kind.

Against the reference: masks (dense and Bernoulli) are integer decisions and must be
bit-identical; parameter values agree to rtol 1e-6 / atol 1e-7 after 5 steps (the same fp32
formula; only the reference's multiply-add contraction inside torch's CPU lerp differs).
bf16 / fp16 values may then round one unit of their last place apart.

Both sides of that comparison take their step scalars from the same front end
(childopt.optim.functional.step_scalar_rows), so a wrong scalar there would pass it; the oracle
tests below compute step size, bias corrections, decay and the 1 / reserve_p scale themselves.
The unmasked step is checked against torch.optim.AdamW on every lane in
tests/optim/test_masked_adamw.py::test_equals_torch_adamw_over_100_steps.
"""
import pytest
import torch

from childopt import Importance, MaskedAdamW, backends
from childopt import sparse as sparse_mod
from childopt.backends import SparseTensorLists, reference
from childopt.backends.contract import StepScalars
from tests.helpers import (MIXED_SHAPES, bernoulli_keep_at, clone_params, grads_at, kernel_backend, make_params,
                           masks_for, snapshot, train)

ODD_SHAPES = MIXED_SHAPES + [(0, 4), (1031,), (5, 0)]
LOW_PRECISION_RTOL = {torch.bfloat16: 2**-7, torch.float16: 2**-10}


def run_masked(params, backend, mask_kind, masked, steps=5, **kwargs):
    if mask_kind == "importance":  # running scores, redrawn every other step: the codes change within the run
        mask = Importance(refresh_every=2)
    else:
        mask = {"none": None, "bernoulli": "bernoulli", "dense": masks_for(params)}[mask_kind]
    opt = MaskedAdamW(params, lr=1e-2, weight_decay=0.05, mask=mask, reserve_p=0.4, masked=masked, seed=31,
                      backend=backend, **kwargs)
    train(opt, params, steps)
    return snapshot(opt, params, ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "importance"))


def assert_close_to_reference(ours, ref):
    for a, b in zip(ours, ref, strict=True):
        if a.dtype == torch.uint8:  # importance level codes: drawn from the moments, must agree exactly
            assert torch.equal(a, b)
        elif a.dtype == torch.float32:
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
        else:
            torch.testing.assert_close(a, b, rtol=LOW_PRECISION_RTOL[a.dtype], atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mask_kind,masked", [("none", None), ("dense", "freeze"), ("dense", "zero_grad"),
                                              ("bernoulli", "zero_grad"), ("bernoulli", "freeze"),
                                              ("importance", "zero_grad"), ("importance", "freeze")])
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


ORACLE_HP = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.05)
RESERVE_P, SEED = 0.4, 2**40 + 31


def plain_masked_adamw(params, keep_at, steps, freeze, grad_scale, amsgrad, maximize):
    """The oracle: torch's AdamW (decoupled decay, bias corrections) in plain fp32 torch math.

    ``keep_at(i, t)`` is the bool keep-mask of tensor ``i`` at step ``t`` (1-based).  Under
    freeze, dropped entries keep p, m, v (and vmax); otherwise their gradient is zero and the
    kept ones are multiplied by ``grad_scale``.  Returns the lists p, m, v, vmax.
    """
    lr, (beta1, beta2), eps, wd = (ORACLE_HP[k] for k in ("lr", "betas", "eps", "weight_decay"))
    p = [x.detach().float().clone() for x in params]
    m, v, vmax = ([torch.zeros_like(x) for x in p] for _ in range(3))
    for t in range(1, steps + 1):
        bias1, bias2 = 1 - beta1**t, 1 - beta2**t
        for i, g in enumerate(grads_at(params, t - 1)):
            keep = keep_at(i, t)
            g = -g if maximize else g
            if not freeze:
                g = torch.where(keep, g * grad_scale, 0.0)
            m_new = beta1 * m[i] + (1 - beta1) * g
            v_new = beta2 * v[i] + (1 - beta2) * g * g
            vmax_new = torch.maximum(vmax[i], v_new)
            denom = ((vmax_new if amsgrad else v_new) / bias2).sqrt() + eps
            p_new = p[i] * (1 - lr * wd) - lr / bias1 * m_new / denom
            for old, new in ((p, p_new), (m, m_new), (v, v_new), (vmax, vmax_new)):
                old[i] = torch.where(keep, new, old[i]) if freeze else new
    return p, m, v, vmax


@pytest.mark.parametrize("kind,masked,storage", [("dense", "freeze", "dense"), ("dense", "zero_grad", "dense"),
                                                 ("bernoulli", "freeze", "dense"),
                                                 ("bernoulli", "zero_grad", "dense"),
                                                 ("dense", "freeze", "sparse")],
                         ids=["dense-freeze", "dense-zero_grad", "bernoulli-freeze", "bernoulli-zero_grad",
                              "sparse-storage"])
@pytest.mark.parametrize("flags", [{}, {"amsgrad": True, "maximize": True}], ids=["plain", "amsgrad-maximize"])
def test_kernels_match_plain_torch_masked_adamw(kernel_lane, kind, masked, storage, flags):
    """adamw_step (dense storage) and sparse_adamw_step (sparse storage) through MaskedAdamW, 5
    steps, against :func:`plain_masked_adamw`: parameters and every moment.

    Tolerance rtol 1e-5 / atol 1e-6, as against torch.optim.AdamW in tests/optim: the oracle's
    m = beta1 * m + (1 - beta1) * g and sqrt(v / bc2) round differently from the kernels' lerp
    and sqrt(v) / sqrt(bc2), a few fp32 ulps per step (at most 3e-7 absolute measured here, on
    values up to ~3).  Wrong step scalars fail it: no bc2 correction, decay after the update
    instead of before, a step size 0.1% off, no 1 / reserve_p, a Philox step off by one.
    """
    backend, device = kernel_lane
    params = make_params(ODD_SHAPES, device)
    theirs = clone_params(params)
    masks = masks_for(params)
    mask = "bernoulli" if kind == "bernoulli" else masks
    opt = MaskedAdamW(params, **ORACLE_HP, mask=mask, reserve_p=RESERVE_P, masked=masked, storage=storage,
                      seed=SEED, backend=backend, **flags)
    train(opt, params, 5)
    keep_at = bernoulli_keep_at(theirs, SEED, RESERVE_P) if kind == "bernoulli" else lambda i, t: masks[params[i]]
    scale = 1 / RESERVE_P if kind == "bernoulli" and masked == "zero_grad" else 1.0
    expected = plain_masked_adamw(theirs, keep_at, 5, masked == "freeze", scale, flags.get("amsgrad", False),
                                  flags.get("maximize", False))
    keys = ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if flags else ())
    for i, p in enumerate(params):
        torch.testing.assert_close(p.detach(), expected[0][i], rtol=1e-5, atol=1e-6)
        for key, want in zip(keys, expected[1:]):  # sparse storage keeps the selected entries only
            want = want[i][masks[p]] if storage == "sparse" else want[i]
            torch.testing.assert_close(opt.state[p][key], want, rtol=1e-5, atol=1e-6)
