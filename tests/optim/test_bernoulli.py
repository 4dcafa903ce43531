"""Child-Tuning-F masks through MaskedAdamW: rate, 1/p scaling, stream identity and freeze.

With ``betas=(0, .)`` and a gradient of ones, ``exp_avg`` after one step is exactly the
applied gradient, ``keep / reserve_p``: the mask can be read back bit for bit.
"""
import copy
import pickle

import pytest
import torch

from childopt import ChildTuningAdamW, MaskedAdamW, philox
from tests.helpers import make_params, train


def applied_gradient(params, *, reserve_p, seed, steps=1, backend="reference", masked=None):
    opt = MaskedAdamW(params, lr=0.0, betas=(0.0, 0.999), mask="bernoulli", reserve_p=reserve_p, masked=masked,
                      seed=seed, backend=backend)
    train(opt, params, steps, grad_fn=lambda ps, t: [torch.ones_like(p) for p in ps])
    return [opt.state[p]["exp_avg"].clone() for p in params]


def test_keep_rate_and_inverse_p_scaling(lane):
    backend, device = lane
    reserve_p = 0.3
    (applied,) = applied_gradient(make_params([(256, 257)], device), reserve_p=reserve_p, seed=5, backend=backend)
    values = set(applied.unique().tolist())
    assert values == {0.0, torch.tensor(1 / reserve_p, dtype=torch.float32).item()}
    n = applied.numel()
    rate = (applied != 0).float().mean().item()
    assert abs(rate - reserve_p) < 5 * (reserve_p * (1 - reserve_p) / n) ** 0.5
    expected = philox.bernoulli_keep(n, 0, 5, 1, reserve_p, device).view(applied.shape)
    assert torch.equal(applied != 0, expected)


def test_masks_change_every_step_and_follow_the_seed():
    a = applied_gradient(make_params([(4096,)]), reserve_p=0.5, seed=1, steps=1)[0]
    b = applied_gradient(make_params([(4096,)]), reserve_p=0.5, seed=1, steps=2)[0]
    c = applied_gradient(make_params([(4096,)]), reserve_p=0.5, seed=1, steps=1)[0]
    assert torch.equal(a, c)
    assert (a != b).float().mean() > 0.3
    torch.manual_seed(123)
    s1 = MaskedAdamW(make_params([(2,)]), mask="bernoulli", reserve_p=0.5).seed
    torch.manual_seed(123)
    s2 = MaskedAdamW(make_params([(2,)]), mask="bernoulli", reserve_p=0.5).seed
    assert s1 == s2


@pytest.mark.parametrize("make", [
    lambda ps: MaskedAdamW(ps, lr=1e-2),
    lambda ps: MaskedAdamW(ps, lr=1e-2, mask={ps[0]: torch.tensor([True, False, True])}),
    lambda ps: ChildTuningAdamW(ps, lr=1e-2),
], ids=["no mask", "fixed mask", "ChildTuning no mode"])
def test_an_optimizer_without_a_drawn_mask_leaves_torch_s_random_stream_alone(make):
    """Swapping torch's AdamW for one without a drawn mask must not change the user's dropout or
    shuffling: the oracle is the generator's state, unchanged by construction, steps and a state
    dict round trip.  The seed is still the generator's next draw, as with a Bernoulli mask."""
    params = make_params([(3,)])
    before = torch.get_rng_state()
    expected = int(torch.randint(0, 2**63 - 1, ()).item())
    torch.set_rng_state(before)
    opt = make(params)
    train(opt, params, 2)
    restored = make(make_params([(3,)]))
    restored.seed += 1  # built with nothing drawn between, it would hold the same seed without the load
    restored.load_state_dict(opt.state_dict())
    assert torch.equal(torch.get_rng_state(), before)
    assert opt.seed == restored.seed == expected


def test_seed_none_is_drawn_on_the_cpu_whatever_the_default_device():
    params = make_params([(3,)])
    before = torch.get_rng_state()
    with torch.device("meta"):
        opt = MaskedAdamW(params, lr=1e-2)
    assert isinstance(opt.seed, int) and torch.equal(torch.get_rng_state(), before)


def test_a_bernoulli_mask_set_later_draws_alike_in_every_copy():
    """A copy (deepcopy, pickle, state dict) of an optimizer built without a mask draws the same
    Bernoulli masks as the original once each is given one."""
    params = make_params([(64,)])
    opt = MaskedAdamW(params, lr=1e-2)
    copies = [opt, copy.deepcopy(opt), pickle.loads(pickle.dumps(opt))]
    loaded = MaskedAdamW(params, lr=1e-2)
    loaded.seed += 1  # built with nothing drawn between, it would hold the same seed without the load
    loaded.load_state_dict(opt.state_dict())
    for each in [*copies, loaded]:
        each.set_mask("bernoulli")
    assert len({each.seed for each in [*copies, loaded]}) == 1


def test_freeze_with_bernoulli_leaves_dropped_entries_untouched(lane):
    backend, device = lane
    params = make_params([(64, 3)], device)
    before = params[0].detach().clone()
    opt = MaskedAdamW(params, lr=1e-2, mask="bernoulli", reserve_p=0.25, masked="freeze", seed=8, backend=backend)
    train(opt, params, 1)
    keep = philox.bernoulli_keep(params[0].numel(), 0, 8, 1, 0.25, device).view(before.shape)
    assert torch.equal(params[0].detach()[~keep], before[~keep])
    assert torch.equal(opt.state[params[0]]["exp_avg_sq"][~keep], torch.zeros(int((~keep).sum()), device=device))
    assert bool((params[0].detach()[keep] != before[keep]).all())


def test_reserve_p_one_in_a_group_turns_the_mask_off_for_it():
    params = make_params([(50,), (50,)])
    groups = [{"params": params[:1]}, {"params": params[1:], "reserve_p": 1.0}]
    opt = MaskedAdamW(groups, lr=0.0, betas=(0.0, 0.999), mask="bernoulli", reserve_p=0.5, seed=3)
    train(opt, params, 1, grad_fn=lambda ps, t: [torch.ones_like(p) for p in ps])
    assert torch.equal(opt.state[params[1]]["exp_avg"], torch.ones(50))
    assert (opt.state[params[0]]["exp_avg"] == 0).any()


@pytest.mark.parametrize("reserve_p", [0.1, 0.7])
def test_parameter_order_defines_the_stream(reserve_p):
    """A tensor's stream starts at the 4-aligned global index after the tensors before it."""
    whole = applied_gradient(make_params([(66,)]), reserve_p=reserve_p, seed=77)[0]
    parts = applied_gradient(make_params([(18,), (46,)]), reserve_p=reserve_p, seed=77)
    assert torch.equal(parts[0], whole[:18])
    assert torch.equal(parts[1], whole[20:])  # 18 elements occupy 5 groups of 4
