"""load_state_dict as torch.optim's: its hooks, a torch AdamW state dict's missing group keys, pending gradients.

torch.optim.AdamW (or the same run without the load) is the oracle throughout.
"""
import copy

import pytest
import torch

from childopt import MaskedAdamW
from tests.helpers import make_params, train


def _swapped(optimizer, state_dict):
    """A pre-hook that adapts the loaded dict (torch's documented use): the two parameters' states
    trade places and the learning rate changes."""
    state_dict = dict(state_dict)
    state_dict["state"] = {0: state_dict["state"][1], 1: state_dict["state"][0]}
    state_dict["param_groups"] = [dict(g, lr=0.5) for g in state_dict["param_groups"]]
    return state_dict


def _zero_exp_avg(optimizer):
    for state in optimizer.state.values():
        state["exp_avg"].zero_()


def test_load_hooks_run_as_torch_optim_runs_them():
    """The pre-hook's result is what gets checked and restored; post-hooks run after the restore."""
    params = make_params([(4, 3), (4, 3)])
    source = MaskedAdamW(params, lr=1e-2)
    train(source, params, 3)
    saved = copy.deepcopy(source.state_dict())
    loaded = {}
    for cls in (torch.optim.AdamW, MaskedAdamW):
        fresh = [torch.nn.Parameter(p.detach().clone()) for p in params]
        opt = cls(fresh, lr=1e-2)
        opt.register_load_state_dict_pre_hook(_swapped)
        opt.register_load_state_dict_post_hook(_zero_exp_avg)
        opt.load_state_dict(copy.deepcopy(saved))
        loaded[cls] = opt
    theirs, ours = loaded[torch.optim.AdamW], loaded[MaskedAdamW]
    assert ours.param_groups[0]["lr"] == theirs.param_groups[0]["lr"] == 0.5
    for p, q in zip(theirs.param_groups[0]["params"], ours.param_groups[0]["params"]):
        assert theirs.state[p].keys() == ours.state[q].keys()
        for key, value in theirs.state[p].items():
            assert torch.equal(value, ours.state[q][key]), key
    assert torch.equal(ours.state[ours.param_groups[0]["params"][0]]["exp_avg_sq"], saved["state"][1]["exp_avg_sq"])
    assert not any(s["exp_avg"].any() for s in ours.state.values())


def test_state_dict_post_hooks_see_the_whole_dict_and_may_replace_it():
    """A hook that keeps a copy (a checkpoint callback) must get what state_dict() returns, the
    "childopt" entry with the seed included, and a dict it returns is the result, as in torch.optim."""
    params = make_params([(4, 3), (4, 3)])
    opt = MaskedAdamW(params, lr=1e-2, mask="bernoulli", reserve_p=0.5, seed=5)
    train(opt, params, 2)
    seen = []
    opt.register_state_dict_post_hook(lambda optimizer, state_dict: seen.append(copy.deepcopy(state_dict)))
    opt.register_state_dict_post_hook(lambda optimizer, state_dict: dict(state_dict, extra=1))
    result = opt.state_dict()
    assert seen[0]["childopt"]["seed"] == 5 and seen[0]["param_groups"][0]["childopt"]["seed"] == 5
    assert result["extra"] == 1 and result["childopt"] == seen[0]["childopt"]
    resumed = MaskedAdamW(make_params([(4, 3), (4, 3)]), lr=1e-2)
    resumed.load_state_dict(seen[0])
    assert (resumed.mask_kind, resumed.seed) == ("bernoulli", 5)


def test_a_torch_adamw_state_dict_keeps_the_groups_reserve_p_and_masked():
    """torch's groups have neither key: a head group exempted from the Bernoulli mask (reserve_p=1,
    masked='freeze') stays exempt, so its next step is torch AdamW's."""
    torch.manual_seed(0)
    body, head = torch.nn.Linear(8, 8), torch.nn.Linear(8, 2)
    adamw = torch.optim.AdamW([{"params": body.parameters()}, {"params": head.parameters()}], lr=1e-2)
    for _ in range(2):
        adamw.zero_grad()
        head(body(torch.randn(4, 8))).sum().backward()
        adamw.step()
    head2, body2 = copy.deepcopy(head), copy.deepcopy(body)
    opt = MaskedAdamW([{"params": body2.parameters()},
                       {"params": head2.parameters(), "reserve_p": 1.0, "masked": "freeze"}],
                      lr=1e-2, mask="bernoulli", reserve_p=0.3, seed=0)
    opt.load_state_dict(adamw.state_dict())
    assert (opt.param_groups[0]["reserve_p"], opt.param_groups[0]["masked"]) == (0.3, None)
    assert (opt.param_groups[1]["reserve_p"], opt.param_groups[1]["masked"]) == (1.0, "freeze")
    x = torch.randn(4, 8)
    for model, optimizer in (((body, head), adamw), ((body2, head2), opt)):
        optimizer.zero_grad()
        model[1](model[0](x)).sum().backward()
        optimizer.step()
    for p, q in zip(head.parameters(), head2.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6)


def test_a_load_between_backward_and_step_is_refused_and_keeps_the_compact_gradients():
    """The compact gradients of a backward not yet stepped would be dropped (the step would then
    update nothing): refused, and the step after it is the one without the load."""
    runs = []
    for attempt_load in (False, True):
        torch.manual_seed(0)
        lin = torch.nn.Linear(5, 4)
        mask = {n: torch.rand(p.shape) < 0.5 for n, p in lin.named_parameters()}
        opt = MaskedAdamW(lin.named_parameters(), lr=1e-1, mask=mask, storage="sparse", compact_grads=True)
        lin(torch.randn(3, 5)).sum().backward()
        opt.step()
        opt.zero_grad()
        saved = copy.deepcopy(opt.state_dict())
        lin(torch.randn(3, 5)).sum().backward()
        if attempt_load:
            with pytest.raises(RuntimeError, match=r"load_state_dict\(\) would drop the compact gradients of 2 "
                                                   "parameters not yet stepped"):
                opt.load_state_dict(saved)
        opt.step()
        runs.append([p.detach().clone() for p in lin.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*runs))
