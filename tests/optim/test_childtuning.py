"""ChildTuningAdamW against the published ChildTuning update, re-derived here from its formulas.

Oracle (Xu et al. 2021, ChildTuningOptimizer): g *= mask (D) or g *= Bernoulli(p) / p (F);
m = b1 m + (1-b1) g; v = b2 v + (1-b2) g^2; p -= lr * sqrt(1-b2^t)/(1-b1^t) * m / (sqrt(v) + eps);
p -= lr * wd * p.  Tolerance rtol 1e-5 / atol 1e-6 over 50 steps (fp32, same op order up to
fused multiply-adds, as in test_optim).
"""
import math

import pytest
import torch

from childopt import ChildTuningAdamW, philox
from tests.helpers import MIXED_SHAPES, clone_params, grads_at, make_params, masks_for, train

TOL = dict(rtol=1e-5, atol=1e-6)
HP = dict(lr=1e-2, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.01)


def published_childtuning(params, steps, *, keep_fn, lr, betas, eps, weight_decay, correct_bias=True):
    """The published update on plain tensors; ``keep_fn(i, p, t)`` gives the gradient multiplier."""
    beta1, beta2 = betas
    ps = [p.detach().clone() for p in params]
    ms = [torch.zeros_like(p) for p in ps]
    vs = [torch.zeros_like(p) for p in ps]
    for t in range(steps):
        for i, (p, g) in enumerate(zip(ps, grads_at(params, t))):
            step = t + 1
            g = g * keep_fn(i, p, step)
            ms[i] = ms[i] * beta1 + (1 - beta1) * g
            vs[i] = vs[i] * beta2 + (1 - beta2) * g * g
            step_size = lr * math.sqrt(1 - beta2**step) / (1 - beta1**step) if correct_bias else lr
            p -= step_size * ms[i] / (vs[i].sqrt() + eps)
            p -= lr * weight_decay * p
    return ps, ms, vs


def _rng_bases(params):
    bases, total = [], 0
    for p in params:
        bases.append(total)
        total += philox.rng_group_counts(p.numel())
    return bases


@pytest.mark.parametrize("correct_bias", [True, False])
def test_no_mode_equals_published_update(lane, correct_bias):
    backend, device = lane
    params = make_params(MIXED_SHAPES, device)
    opt = ChildTuningAdamW(clone_params(params), correct_bias=correct_bias, backend=backend, seed=0, **HP)
    expected = published_childtuning(params, 50, keep_fn=lambda i, p, t: 1.0, correct_bias=correct_bias, **HP)
    ours = [p for g in opt.param_groups for p in g["params"]]
    train(opt, ours, 50)
    for a, b in zip(ours, expected[0]):
        torch.testing.assert_close(a.detach(), b, **TOL)


def test_child_tuning_d_equals_published_update(lane):
    backend, device = lane
    params = make_params(MIXED_SHAPES, device)
    ours = clone_params(params)
    masks = {p: m for i, (p, m) in enumerate(masks_for(ours).items()) if i % 2 == 0}  # others train fully
    opt = ChildTuningAdamW(ours, mode="ChildTuning-D", backend=backend, seed=0, **HP)
    opt.set_gradient_mask(masks)
    mask_list = [masks.get(p, torch.ones_like(p, dtype=torch.bool)) for p in ours]
    expected, ms, _ = published_childtuning(params, 50, keep_fn=lambda i, p, t: mask_list[i], **HP)
    train(opt, ours, 50)
    for a, b, m, keep in zip(ours, expected, ms, mask_list):
        torch.testing.assert_close(a.detach(), b, **TOL)
        # Published behaviour: momentum of masked entries stays exactly zero; weight decay still acts.
        assert torch.equal(opt.state[a]["exp_avg"][~keep], torch.zeros_like(m[~keep]))


def test_child_tuning_f_equals_published_update_with_the_same_draws(lane):
    backend, device = lane
    params = make_params(MIXED_SHAPES, device)
    reserve_p = 0.35
    opt = ChildTuningAdamW(clone_params(params), mode="ChildTuning-F", reserve_p=reserve_p, backend=backend,
                           seed=2024, **HP)
    bases = _rng_bases(params)

    def keep_fn(i, p, step):
        keep = philox.bernoulli_keep(p.numel(), bases[i], 2024, step, reserve_p, p.device).view(p.shape)
        return keep.float() / reserve_p

    expected, _, _ = published_childtuning(params, 50, keep_fn=keep_fn, **HP)
    ours = [p for g in opt.param_groups for p in g["params"]]
    train(opt, ours, 50)
    for a, b in zip(ours, expected):
        torch.testing.assert_close(a.detach(), b, **TOL)


@pytest.mark.parametrize("reserve_p", [0.0, -0.5, 1.0001, 2])
def test_reserve_p_outside_unit_interval_raises(reserve_p):
    with pytest.raises(ValueError, match="reserve_p must be in"):
        ChildTuningAdamW(make_params([(3,)]), reserve_p=reserve_p, mode="ChildTuning-F")


def test_correct_bias_must_be_a_bool_in_a_group_too():
    """A truthy string would run the bias-corrected update the user turned off."""
    with pytest.raises(TypeError, match=r"correct_bias \(param group 1\) must be a bool, got 'False'"):
        ChildTuningAdamW([{"params": make_params([(3,)])}, {"params": make_params([(2,)]), "correct_bias": "False"}])
    params = make_params([(3,), (2,)])
    opt = ChildTuningAdamW([{"params": params[:1]}, {"params": params[1:]}])
    opt.param_groups[1]["correct_bias"] = 1
    before = params[0].detach().clone()
    with pytest.raises(TypeError, match=r"correct_bias \(param group 1\) must be a bool, got 1"):
        train(opt, params, 1)
    assert torch.equal(params[0], before)  # refused before group 0 was stepped


def test_mode_errors():
    with pytest.raises(ValueError, match="mode must be one of"):
        ChildTuningAdamW(make_params([(3,)]), mode="ChildTuning-X")
    opt = ChildTuningAdamW(make_params([(3,)]), mode="ChildTuning-D")
    train_params = [p for g in opt.param_groups for p in g["params"]]
    with pytest.raises(RuntimeError, match="needs set_gradient_mask"):
        train(opt, train_params, 1)
    f_opt = ChildTuningAdamW(make_params([(3,)]), mode="ChildTuning-F", reserve_p=0.5)
    with pytest.raises(ValueError, match="applies to mode='ChildTuning-D'"):
        f_opt.set_gradient_mask({})



def test_a_state_dict_from_another_mode_is_refused():
    f_opt = ChildTuningAdamW(make_params([(3,)]), mode="ChildTuning-F", reserve_p=0.5, seed=0)
    plain = ChildTuningAdamW(make_params([(3,)]))
    with pytest.raises(ValueError, match="'bernoulli' mask, which mode=None cannot use"):
        plain.load_state_dict(f_opt.state_dict())


@pytest.mark.parametrize("mode,mask", [("ChildTuning-F", "dict"), ("ChildTuning-F", None), (None, "bernoulli"),
                                       (None, "importance"), ("ChildTuning-D", "bernoulli")])
def test_set_mask_refuses_a_mask_kind_the_mode_cannot_run(mode, mask):
    """set_mask takes only the kinds the mode's published arithmetic uses, as load_state_dict
    does, so an optimizer never holds a state its own kind of optimizer refuses to load."""
    params = make_params([(8,)])
    opt = ChildTuningAdamW(params, mode=mode, reserve_p=0.3, seed=0)
    given = {params[0]: torch.arange(8) < 4} if mask == "dict" else mask
    label = {"dict": "dense", None: "none"}.get(mask, mask)
    with pytest.raises(ValueError, match=f"set_mask got a '{label}' mask, which mode={mode!r} cannot use"):
        opt.set_mask(given)
    assert opt.mask_kind == ("bernoulli" if mode == "ChildTuning-F" else "none")

def _stepped_f_state_dict() -> dict:
    params = make_params([(3,)])
    f_opt = ChildTuningAdamW(params, mode="ChildTuning-F", reserve_p=0.5, seed=0)
    train(f_opt, params, 2)
    return f_opt.state_dict()


def test_the_mode_check_reads_the_state_dict_that_torchs_pre_hooks_return():
    """torch runs load pre-hooks on the state dict before anything else looks at it; a hook that
    converts a Child-Tuning-F checkpoint for mode=None makes it loadable, and one that turns a
    loadable dict into another mode's is refused, with nothing written."""
    def as_unmasked(optimizer, state_dict):
        return dict(state_dict, childopt=dict(state_dict["childopt"], mask_kind="none"))

    plain = ChildTuningAdamW(make_params([(3,)]))
    plain.register_load_state_dict_pre_hook(as_unmasked)
    saved = _stepped_f_state_dict()
    plain.load_state_dict(saved)
    assert plain.mask_kind == "none"
    assert torch.equal(plain.state[plain.param_groups[0]["params"][0]]["exp_avg"],
                       next(iter(saved["state"].values()))["exp_avg"])

    def as_bernoulli(optimizer, state_dict):
        return dict(state_dict, childopt=dict(state_dict["childopt"], mask_kind="bernoulli"))

    target = ChildTuningAdamW(make_params([(3,)]))
    target.register_load_state_dict_pre_hook(as_bernoulli)
    unmasked = ChildTuningAdamW(make_params([(3,)]))
    train(unmasked, unmasked.param_groups[0]["params"], 1)
    with pytest.raises(ValueError, match="'bernoulli' mask, which mode=None cannot use"):
        target.load_state_dict(unmasked.state_dict())
    assert target.state_dict()["state"] == {} and target.mask_kind == "none"
