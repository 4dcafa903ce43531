"""MaskedAdamW against torch.optim.AdamW, masks, state round trips and bad input.

Tolerance against torch.optim.AdamW (fp32): rtol 1e-5, atol 1e-6 after 100 steps.  Both sides
use the same fp32 operation order (decay, lerp, v*beta2 + (1-beta2)*g*g, sqrt / bc2_sqrt + eps,
step_size * m / denom) with host float64 bias corrections; they differ only where torch's
vectorised CPU kernels fuse a multiply-add (one rounding instead of two), which we measured
at <= 2.4e-7 absolute on parameters of magnitude ~1-3 after 100 steps.
"""
import copy
import math
import io
import sys

import pytest
import torch

from childopt import Importance, MaskedAdamW
from tests.helpers import (MIXED_SHAPES, assert_all_equal, assert_steps_as_torch_adamw, clone_params, grads_at,
                           make_params, masks_for, snapshot, train)

TOL = dict(rtol=1e-5, atol=1e-6)


def _groups(params, named=False):
    half = len(params) // 2
    return [
        {"params": params[:half], "weight_decay": 0.1, "amsgrad": True},
        {"params": params[half:], "weight_decay": 0.0, "maximize": True, "lr": 3e-3},
    ]


def test_equals_torch_adamw_over_100_steps(lane):
    """Groups with and without weight decay, amsgrad and maximize, odd and empty tensors."""
    backend, device = lane
    ours = make_params(MIXED_SHAPES, device)
    theirs = clone_params(ours)
    opt = MaskedAdamW(_groups(ours), lr=1e-2, seed=0, backend=backend)
    ref = torch.optim.AdamW(_groups(theirs), lr=1e-2, foreach=False)
    train(opt, ours, 100)
    train(ref, theirs, 100)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, **TOL)
        for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
            if key in ref.state[b]:
                torch.testing.assert_close(opt.state[a][key], ref.state[b][key], **TOL)
        assert opt.state[a]["step"].item() == ref.state[b]["step"].item() == 100


def test_training_loop_with_module_closure_scheduler_and_zero_grad():
    def make():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))

    data = torch.randn(16, 6, generator=torch.Generator().manual_seed(1))
    target = torch.randn(16, 1, generator=torch.Generator().manual_seed(2))
    results = []
    for cls in (MaskedAdamW, torch.optim.AdamW):
        model = make()
        opt = cls(model.parameters(), lr=1e-2, weight_decay=0.05, **({"seed": 0} if cls is MaskedAdamW else {}))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1.0 / (1 + t))
        losses = []

        def closure():
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(model(data), target)
            loss.backward()
            return loss

        for _ in range(30):
            losses.append(opt.step(closure).item())
            sched.step()
        assert all(p.grad is not None for p in model.parameters())
        opt.zero_grad()
        assert all(p.grad is None for p in model.parameters())
        results.append((losses, [p.detach() for p in model.parameters()]))
    torch.testing.assert_close(results[0][0], results[1][0], **TOL)
    for a, b in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(a, b, **TOL)


def test_freeze_leaves_masked_entries_bit_identical_and_kept_entries_follow_adamw(lane):
    backend, device = lane
    ours = make_params(MIXED_SHAPES, device)
    theirs = clone_params(ours)
    opt = MaskedAdamW(ours, lr=1e-2, weight_decay=0.1, seed=0, backend=backend)
    ref = torch.optim.AdamW(theirs, lr=1e-2, weight_decay=0.1, foreach=False)
    train(opt, ours, 5)
    train(ref, theirs, 5)
    before = snapshot(opt, ours)
    masks = masks_for(ours)
    opt.set_mask(masks)
    assert opt.mask_kind == "dense"
    train(opt, ours, 20, start=5)
    train(ref, theirs, 20, start=5)
    after = snapshot(opt, ours)
    n = len(ours)
    for i, p in enumerate(ours):
        keep = masks[p]
        for j in (i, n + 2 * i, n + 2 * i + 1):  # p, exp_avg, exp_avg_sq
            assert torch.equal(after[j][~keep], before[j][~keep])
        # Kept entries see their own gradient only: AdamW is element-wise, so they match it.
        torch.testing.assert_close(p.detach()[keep], theirs[i].detach()[keep], **TOL)
        torch.testing.assert_close(opt.state[p]["exp_avg"][keep], ref.state[theirs[i]]["exp_avg"][keep], **TOL)


def test_zero_grad_mode_equals_adamw_on_masked_gradients(lane):
    backend, device = lane
    ours = make_params(MIXED_SHAPES, device)
    theirs = clone_params(ours)
    masks = masks_for(ours)
    ref_masks = {t: masks[o] for o, t in zip(ours, theirs)}
    opt = MaskedAdamW(ours, lr=1e-2, mask=masks, masked="zero_grad", seed=0, backend=backend)
    ref = torch.optim.AdamW(theirs, lr=1e-2, foreach=False)

    def masked_grads(params, t):
        return [g * ref_masks[p] for p, g in zip(params, grads_at(params, t))]

    train(opt, ours, 50)
    train(ref, theirs, 50, grad_fn=masked_grads)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, **TOL)
        torch.testing.assert_close(opt.state[a]["exp_avg_sq"], ref.state[b]["exp_avg_sq"], **TOL)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_params_keep_fp32_state_and_follow_fp32_adamw_rounded_each_step(lane, dtype):
    """Oracle: torch AdamW on fp32 weights rounded to ``dtype`` after each of its own steps,
    never reset to ours, over 30 steps with weight decay 0.5 at lr 1e-2 (0.5% a step, 14% in
    all: a step that dropped or doubled the decay of half-precision weights is ~50 ulps off).

    Tolerance: 2 ulps of ``dtype``.  Both sides round the same fp32 result, but their fp32
    operation orders differ in the last bit, which can move a value across a rounding boundary
    in some step; later steps carry that one ulp along (the gradients do not depend on the weights).
    """
    backend, device = lane
    ours = make_params(MIXED_SHAPES, device, dtype=dtype)
    master = [torch.nn.Parameter(p.detach().float()) for p in ours]
    opt = MaskedAdamW(ours, lr=1e-2, weight_decay=0.5, seed=0, backend=backend)
    ref = torch.optim.AdamW(master, lr=1e-2, weight_decay=0.5, foreach=False)
    for t in range(30):
        for p, q, g in zip(ours, master, grads_at(ours, t)):
            p.grad, q.grad = g, g.float()
        opt.step()
        ref.step()
        with torch.no_grad():
            for q in master:
                q.copy_(q.to(dtype).float())
    ulp = {torch.bfloat16: 2**-7, torch.float16: 2**-10}[dtype]  # relative spacing at the top of a binade
    for p, q in zip(ours, master):
        assert p.dtype == dtype and opt.state[p]["exp_avg"].dtype == torch.float32
        torch.testing.assert_close(p.detach().float(), q.detach(), rtol=2 * ulp, atol=1e-6)
        torch.testing.assert_close(opt.state[p]["exp_avg"], ref.state[q]["exp_avg"], **TOL)
        torch.testing.assert_close(opt.state[p]["exp_avg_sq"], ref.state[q]["exp_avg_sq"], **TOL)


@pytest.mark.parametrize("amsgrad", [False, True])
def test_float64_params_keep_float64_state_and_follow_float64_adamw(amsgrad):
    """Oracle: torch AdamW in float64, which keeps float64 moments.  Tolerance: 1e-14 relative
    (a few float64 ulps: the two sides order the same float64 operations differently); a step
    through fp32 weights or moments is about 1e-8 off."""
    ours = make_params(MIXED_SHAPES, "cpu", dtype=torch.float64)
    theirs = clone_params(ours)
    opt = MaskedAdamW(ours, lr=1e-2, weight_decay=0.1, amsgrad=amsgrad, seed=0)
    ref = assert_steps_as_torch_adamw(opt, ours, theirs, 20, dict(rtol=1e-14, atol=1e-14), lr=1e-2,
                                      weight_decay=0.1, amsgrad=amsgrad)
    for a, b in zip(ours, theirs):
        assert opt.state[a]["exp_avg"].dtype == opt.state[a]["exp_avg_sq"].dtype == torch.float64
        torch.testing.assert_close(opt.state[a]["exp_avg_sq"], ref.state[b]["exp_avg_sq"], rtol=1e-14, atol=0.0)


@pytest.mark.parametrize("storage", ["dense", "sparse"])
def test_a_zero_update_leaves_float64_weights_bit_identical(storage):
    """lr 0, and entries outside a zero_grad mask with no weight decay, do not move float64
    weights that fp32 cannot hold (1 + 1e-12 rounds to 1 in fp32)."""
    idle = torch.nn.Parameter(torch.full((6,), 1 + 1e-12, dtype=torch.float64))
    masked = torch.nn.Parameter(torch.full((6,), math.pi, dtype=torch.float64))
    before = [idle.detach().clone(), masked.detach().clone()]
    keep = torch.tensor([True, False, True, False, False, False])
    masked_mode = "freeze" if storage == "sparse" else "zero_grad"
    idle.grad = torch.ones_like(idle)
    MaskedAdamW([idle], lr=0.0, weight_decay=0.0).step()
    opt = MaskedAdamW([masked], lr=1e-3, weight_decay=0.0, mask={masked: keep}, masked=masked_mode, storage=storage)
    masked.grad = torch.ones_like(masked)
    opt.step()
    assert torch.equal(idle.detach(), before[0])
    assert torch.equal(masked.detach()[~keep], before[1][~keep])
    assert (masked.detach()[keep] < math.pi).all()


def test_non_contiguous_parameter_matches_adamw():
    ours = [torch.nn.Parameter(torch.randn(5, 7).t()), torch.nn.Parameter(torch.randn(4, 6)[:, ::2])]
    assert not any(p.is_contiguous() for p in ours)
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    assert_steps_as_torch_adamw(MaskedAdamW(ours, lr=1e-2, seed=0), ours, theirs, 10, lr=1e-2)


def _round_trip(state_dict):
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("kind", ["none", "dense", "bernoulli"])
def test_state_dict_round_trip_continues_the_same_trajectory(lane, kind):
    backend, device = lane
    params = make_params(MIXED_SHAPES, device)
    mask = {"none": None, "dense": masks_for(params), "bernoulli": "bernoulli"}[kind]
    opt = MaskedAdamW(params, lr=1e-2, mask=mask, reserve_p=0.5 if kind == "bernoulli" else 1.0, amsgrad=True,
                      seed=11, backend=backend)
    train(opt, params, 10)
    saved = _round_trip(copy.deepcopy(opt.state_dict()))
    resumed_params = clone_params(params)
    train(opt, params, 5, start=10)

    # A fresh optimizer with another seed and no mask: everything comes from the state dict.
    fresh = MaskedAdamW(resumed_params, lr=1e-2, amsgrad=True, seed=99, backend=backend)
    fresh.load_state_dict(saved)
    assert fresh.seed == 11 and fresh.mask_kind == kind
    train(fresh, resumed_params, 5, start=10)
    keys = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
    assert_all_equal(snapshot(fresh, resumed_params, keys), snapshot(opt, params, keys))
    for p in resumed_params:
        assert fresh.state[p]["exp_avg"].dtype == torch.float32
        if kind == "dense":
            assert fresh.state[p]["mask"].dtype == torch.bool


def test_loads_a_torch_adamw_state_dict_and_keeps_its_own_mask():
    params = make_params(MIXED_SHAPES)
    torch_opt = torch.optim.AdamW(params, lr=1e-2, foreach=False)
    train(torch_opt, params, 5)
    theirs = clone_params(params)
    ours = clone_params(params)
    ref = torch.optim.AdamW(theirs, lr=1e-2, foreach=False)
    ref.load_state_dict(torch_opt.state_dict())
    masks = masks_for(ours, density=0.5)
    opt = MaskedAdamW(ours, lr=1e-2, mask=masks, seed=0)
    opt.load_state_dict(torch_opt.state_dict())
    assert opt.mask_kind == "dense" and all("mask" in opt.state[p] for p in ours)
    before = [p.detach().clone() for p in ours]
    train(opt, ours, 5, start=5)
    train(ref, theirs, 5, start=5)
    for a, b, old in zip(ours, theirs, before):
        keep = masks[a]
        assert torch.equal(a.detach()[~keep], old[~keep])  # the kept mask still freezes
        torch.testing.assert_close(a.detach()[keep], b.detach()[keep], **TOL)  # resumed moments


def test_add_param_group_trains_the_new_group():
    first, second = make_params([(4, 3)]), make_params([(5,)], seed=3)
    opt = MaskedAdamW(first, lr=1e-2, seed=0)
    opt.add_param_group({"params": second, "weight_decay": 0.0})
    ref = torch.optim.AdamW(clone_params(first), lr=1e-2, foreach=False)
    ref.add_param_group({"params": clone_params(second), "weight_decay": 0.0})
    train(opt, first + second, 10)
    train(ref, [p for g in ref.param_groups for p in g["params"]], 10)
    for a, b in zip(first + second, [p for g in ref.param_groups for p in g["params"]]):
        torch.testing.assert_close(a, b, **TOL)
    with pytest.raises(ValueError, match="reserve_p .*param group 2"):
        opt.add_param_group({"params": make_params([(2,)]), "reserve_p": 0.0})
    assert len(opt.param_groups) == 2


def test_grad_scaler_unscales_and_skips_steps_with_inf():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    opt = MaskedAdamW(model.parameters(), lr=1e-2, seed=0)
    ref_model = copy.deepcopy(model)
    ref = torch.optim.AdamW(ref_model.parameters(), lr=1e-2, foreach=False)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    x = torch.randn(8, 4)
    for m, o in ((model, opt), (ref_model, ref)):
        o.zero_grad()
        scaler.scale(m(x).square().mean()).backward() if o is opt else m(x).square().mean().backward()
        scaler.step(o) if o is opt else o.step()
    scaler.update()
    for a, b in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(a, b, **TOL)

    before = snapshot(opt, list(model.parameters()))
    opt.zero_grad()
    scaler.scale(model(x).square().mean()).backward()
    model.weight.grad[0, 0] = float("inf")
    scaler.step(opt)
    scaler.update()
    assert_all_equal(snapshot(opt, list(model.parameters())), before)
    assert scaler.get_scale() == 512.0


def test_named_parameters_and_masks_by_name():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    mask = {"0.weight": torch.zeros(4, 3, dtype=torch.bool)}
    opt = MaskedAdamW(model.named_parameters(), lr=1e-1, mask=mask, seed=0)
    before = model[0].weight.detach().clone()
    second_before = model[1].weight.detach().clone()
    model(torch.randn(5, 3)).sum().backward()
    opt.step()
    assert torch.equal(model[0].weight, before)
    assert not torch.equal(model[1].weight, second_before)
    with pytest.raises(ValueError, match="'0.bias'.*shape \\(3,\\).*\\(4,\\)"):
        opt.set_mask({"0.bias": torch.ones(3, dtype=torch.bool)})
    with pytest.raises(ValueError, match="'nope'.*not a parameter"):
        opt.set_mask({"nope": torch.ones(3, dtype=torch.bool)})


def test_set_mask_keeps_state_by_default_and_reset_state_restarts_changed_params():
    params = make_params([(6,), (4,)])
    opt = MaskedAdamW(params, lr=1e-2, seed=0)
    train(opt, params, 3)
    opt.set_mask({params[0]: torch.ones(6, dtype=torch.bool)})
    assert opt.state[params[0]]["step"].item() == 3
    opt.set_mask({params[0]: torch.ones(6, dtype=torch.bool)}, reset_state=True)
    assert opt.state[params[0]]["step"].item() == 3  # same mask: nothing changed
    new = torch.tensor([True, False] * 3)
    opt.set_mask({params[0]: new}, reset_state=True)
    assert opt.state[params[0]]["step"].item() == 0 and not opt.state[params[0]]["exp_avg"].any()
    assert opt.state[params[1]]["step"].item() == 3
    opt.set_mask(None, reset_state=True)
    assert opt.mask_kind == "none" and all("mask" not in opt.state[p] for p in params)
    assert all(not opt.state[p] for p in params)  # no mask and no state: initialised at the next step


def _sparse_grad_optimizer():
    emb = torch.nn.Embedding(10, 3, sparse=True)
    opt = MaskedAdamW(emb.parameters(), seed=0)
    emb(torch.tensor([1, 2])).sum().backward()
    return opt


def _params():
    return make_params([(3, 2)])


BAD_INPUTS = [
    (lambda: MaskedAdamW(_params(), reserve_p=0.0), ValueError, "reserve_p must be in \\(0.0, 1.0\\], got 0.0"),
    (lambda: MaskedAdamW(_params(), reserve_p=1.5), ValueError, "reserve_p must be in"),
    (lambda: MaskedAdamW([{"params": _params(), "reserve_p": -1}]), ValueError, "reserve_p \\(param group 0\\)"),
    (lambda: MaskedAdamW(_params(), masked="drop"), ValueError, "masked must be one of"),
    (lambda: MaskedAdamW(_params(), backend="cuda-magic"), ValueError, "backend must be one of"),
    (lambda: MaskedAdamW(_params(), mask="random"), ValueError, "mask must be None, 'bernoulli', 'importance', an Importance or a dict"),
    (lambda: MaskedAdamW(_params(), mask=[1]), TypeError, "mask must be None"),
    (lambda: MaskedAdamW(_params(), lr=-1.0), ValueError, "lr must be in"),
    (lambda: MaskedAdamW(_params(), betas=(0.9, 1.0)), ValueError, "betas\\[1\\] must be in"),
    (lambda: MaskedAdamW(_params(), seed=-3), ValueError, "seed must be an int"),
    (lambda: MaskedAdamW(_params(), amsgrad="yes"), TypeError, "amsgrad must be a bool"),
    (lambda: (lambda p: MaskedAdamW(p, mask={p[0]: torch.ones(2, 3, dtype=torch.bool)}))(_params()),
     ValueError, "mask for param_groups\\[0\\]\\['params'\\]\\[0\\] \\(shape \\(3, 2\\)\\) has shape \\(2, 3\\)"),
    (lambda: (lambda p: MaskedAdamW(p, mask={p[0]: torch.ones(3, 2)}))(_params()),
     TypeError, "has dtype torch.float32, expected torch.bool"),
    (lambda: MaskedAdamW(_params(), mask={torch.zeros(3, 2): torch.ones(3, 2, dtype=torch.bool)}),
     ValueError, "tensor of shape \\(3, 2\\) that is not a parameter of this optimizer"),
    (lambda: MaskedAdamW(_params(), mask={"w": torch.ones(3, 2, dtype=torch.bool)}),
     ValueError, "'w', which is not a parameter.*named_parameters"),
    (lambda: _sparse_grad_optimizer().step(), RuntimeError, "does not support sparse gradients \\(param_groups"),
]


@pytest.mark.parametrize("make,error,match", BAD_INPUTS)
def test_bad_input_raises_a_clear_error(make, error, match):
    with pytest.raises(error, match=match):
        make()


def test_deepcopy_and_pickle_keep_the_mask_stream():
    import pickle

    from childopt import ChildTuningAdamW

    params = make_params([(40,)])
    opt = ChildTuningAdamW(params, mode="ChildTuning-F", reserve_p=0.5, seed=3, sync_seed=False)
    train(opt, params, 2)
    clones = [copy.deepcopy(opt), pickle.loads(pickle.dumps(opt))]
    train(opt, params, 2, start=2)
    for clone in clones:
        clone_params_ = [p for g in clone.param_groups for p in g["params"]]
        assert (clone.mode, clone.seed, clone.mask_kind, clone.sync_seed) == ("ChildTuning-F", 3, "bernoulli", False)
        train(clone, clone_params_, 2, start=2)
        assert torch.equal(clone_params_[0], params[0])


def test_a_mask_initialises_the_state_of_trained_parameters_only():
    """DCP needs the state complete once any exists; a frozen parameter gets none (8 B per element saved)."""
    trained, frozen = make_params([(6,), (1000,)])
    frozen.requires_grad_(False)
    opt = MaskedAdamW([trained, frozen], mask={trained: torch.ones(6, dtype=torch.bool)}, seed=0)
    assert opt.state[trained]["step"].item() == 0 and opt.state[trained]["exp_avg"].shape == (6,)
    assert not opt.state[frozen]
    assert opt.state_bytes() == 6 + 4 + 2 * 6 * 4  # mask, step, two fp32 moments


def test_sync_seed_must_be_a_bool():
    with pytest.raises(TypeError, match="sync_seed must be a bool, got 'no'"):
        MaskedAdamW(make_params([(3,)]), sync_seed="no")


def test_params_swapped_after_construction_are_refused_at_the_step():
    """DeepSpeed ZeRO-1/2 replace a group's params by flat partitions no mask can address."""
    params = make_params([(6,)])
    opt = MaskedAdamW(params, mask={params[0]: torch.ones(6, dtype=torch.bool)}, seed=0)
    flat = torch.nn.Parameter(torch.zeros(6))
    flat.grad = torch.ones(6)
    opt.param_groups[0]["params"] = [flat]
    with pytest.raises(RuntimeError, match="param group 0 holds a tensor of shape \\(6,\\) that was not given.*"
                                           "DeepSpeed ZeRO.*FSDP2"):
        opt.step()


def test_a_zero3_partitioned_parameter_is_refused():
    param = torch.nn.Parameter(torch.zeros(4))
    param.ds_id = 7  # what DeepSpeed ZeRO-3 sets on the parameters it partitions
    with pytest.raises(TypeError, match="partitioned by DeepSpeed ZeRO-3.*FSDP2"):
        MaskedAdamW([param])


@pytest.mark.parametrize("mask", ["bernoulli", "importance", Importance(temperature=0.5)], ids=str)
def test_a_drawn_mask_that_keeps_everything_warns_where_it_is_made(mask):
    with pytest.warns(UserWarning, match="reserve_p=1.0 in every group keeps every entry") as caught:
        MaskedAdamW(make_params([(3,)]), mask=mask, seed=0)
    assert caught[0].filename == __file__
    opt = MaskedAdamW(make_params([(3,)]), seed=0)
    with pytest.warns(UserWarning, match="keeps every entry") as caught:
        opt.set_mask(mask)
    assert (caught[0].filename, caught[0].lineno) == (__file__, sys._getframe().f_lineno - 1)  # the set_mask line


def test_reserve_p_without_a_mask_warns_that_it_does_nothing():
    params = make_params([(3,), (2,)])
    with pytest.warns(UserWarning, match="reserve_p=0.3 has no effect without a mask.*mask='bernoulli'") as caught:
        MaskedAdamW([{"params": params[:1]}, {"params": params[1:], "reserve_p": 0.3}], seed=0)
    assert caught[0].filename == __file__


@pytest.mark.parametrize("kwargs", [dict(mask="bernoulli", reserve_p=0.3), dict(mask="importance", reserve_p=0.3),
                                    dict(mask=None), dict(mask={}, reserve_p=1.0)], ids=str)
def test_settings_that_do_what_they_say_do_not_warn(kwargs, recwarn):
    MaskedAdamW(make_params([(3,)]), seed=0, **kwargs)
    assert not [w for w in recwarn if "reserve_p" in str(w.message)]



def test_tensor_hyper_parameters_work_as_in_torch(lane):
    backend, device = lane
    ours = make_params(MIXED_SHAPES, device)
    theirs = clone_params(ours)
    hp = dict(lr=torch.tensor(1e-2), betas=(torch.tensor(0.9), torch.tensor(0.99)), weight_decay=0.05)
    opt = MaskedAdamW(ours, eps=torch.tensor(1e-8), seed=0, backend=backend, **hp)
    ref = torch.optim.AdamW(theirs, foreach=False, **hp)
    train(opt, ours, 5)
    train(ref, theirs, 5)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, **TOL)


def test_a_tensor_off_16_byte_alignment_gets_its_own_bucket(monkeypatch):
    """One misaligned view (storage offset 1) must not share a launch with aligned tensors: the
    kernels vectorise a list only when every tensor is aligned.  The result stays torch AdamW's."""
    buffer = torch.randn(41)
    ours = [torch.nn.Parameter(torch.randn(16)), torch.nn.Parameter(buffer[1:41]), torch.nn.Parameter(torch.randn(8))]
    theirs = clone_params(ours)
    opt = MaskedAdamW(ours, lr=1e-2, seed=0, backend="reference")
    ref = torch.optim.AdamW(theirs, lr=1e-2, foreach=False)
    backend = opt._backend(torch.device("cpu"))
    launches = []
    step = backend.adamw_step
    monkeypatch.setattr(backend, "adamw_step", lambda tensors, *a: launches.append(
        [t.numel() for t in tensors.params]) or step(tensors, *a))
    train(opt, ours, 2)
    train(ref, theirs, 2)
    assert sorted(launches) == [[16, 8], [16, 8], [40], [40]]
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, **TOL)


def test_a_failed_step_does_not_advance_step_counts(monkeypatch):
    params = make_params([(4,)])
    opt = MaskedAdamW(params, lr=1e-2, seed=0)
    train(opt, params, 1)
    backend = opt._backend(torch.device("cpu"))
    monkeypatch.setattr(backend, "adamw_step", lambda *a: (_ for _ in ()).throw(RuntimeError("kernel failed")))
    with pytest.raises(RuntimeError, match="kernel failed"):
        train(opt, params, 1, start=1)
    assert opt.state[params[0]]["step"].item() == 1


def test_a_named_backend_that_cannot_run_fails_at_construction():
    with pytest.raises(RuntimeError, match="backend 'triton' cannot run on meta"):
        MaskedAdamW([torch.nn.Parameter(torch.empty(3, device="meta"))], backend="triton", seed=0)


def test_a_group_whose_backend_cannot_run_is_not_added():
    """The refused group leaves no trace: groups and the Philox numbering are as before."""
    params = make_params([(3,)])
    opt = MaskedAdamW(params, backend="triton", seed=0)
    numbered = opt._rng_groups
    with pytest.raises(RuntimeError, match="backend 'triton' cannot run on meta"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.empty(3, device="meta"))]})
    assert len(opt.param_groups) == 1 and opt._rng_groups == numbered


@pytest.mark.parametrize("norm_type", [2.0, 1.0, 0.5, 0.0, math.inf, -1.0])
def test_clip_grad_norm_of_a_fixed_mask_is_torch_s_on_the_kept_entries(norm_type):
    """The norm is torch's ``get_total_norm`` of ``grad[mask]``, bit for bit, and every gradient
    entry is scaled (as ChildTuning's trainer does), after any edit of the mask: in place, through
    ``.data`` (which torch does not version), and a mask made under ``inference_mode``."""
    params = make_params([(6, 5), (7,), (4, 3)], seed=3)
    masks = masks_for(params[:2], density=0.4)
    opt = MaskedAdamW(params, lr=1e-3, mask=masks)

    def clip_against_torch():
        for i, p in enumerate(params):
            p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(i)) * 3
        kept = [p.grad[opt.state[p]["mask"]] if p in masks else p.grad for p in params]
        expected = torch.nn.utils.get_total_norm(kept, norm_type)
        expected_grads = [p.grad * torch.clamp(0.5 / (expected + 1e-6), max=1.0) for p in params]
        norm = opt.clip_grad_norm_(max_norm=0.5, norm_type=norm_type)
        assert torch.equal(norm, expected) or (norm.isnan() and expected.isnan())
        for p, g in zip(params, expected_grads):
            assert torch.equal(p.grad, g)

    clip_against_torch()
    mask = opt.state[params[0]]["mask"]
    mask[0, :3] = ~mask[0, :3]  # in place
    clip_against_torch()
    mask.data[1:3] = True  # not versioned by torch
    clip_against_torch()
    with torch.inference_mode():
        opt.state[params[1]]["mask"] = torch.rand(7, generator=torch.Generator().manual_seed(9)) < 0.5
    clip_against_torch()


@pytest.mark.parametrize("storage", ["dense", "sparse"])
@pytest.mark.parametrize("norm_type", [math.inf, 2.0])
def test_clip_grad_norm_skips_a_tensor_its_mask_keeps_nothing_of(storage, norm_type):
    """A global mask at a small reserve_p often keeps nothing of a bias: it adds nothing to the
    norm (torch's inf norm refuses an empty tensor), and its gradient is still scaled."""
    params = make_params([(6, 5), (7,)], seed=3)
    masks = {params[0]: torch.arange(30).reshape(6, 5) % 4 == 0, params[1]: torch.zeros(7, dtype=torch.bool)}
    opt = MaskedAdamW(params, lr=1e-3, mask=masks, storage=storage, seed=0, backend="reference")
    for i, p in enumerate(params):
        p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(i)) * 3
    expected = torch.nn.utils.get_total_norm([params[0].grad[masks[params[0]]]], norm_type)
    scaled = [p.grad * torch.clamp(0.5 / (expected + 1e-6), max=1.0) for p in params]
    assert torch.equal(opt.clip_grad_norm_(max_norm=0.5, norm_type=norm_type), expected)
    assert all(torch.equal(p.grad, g) for p, g in zip(params, scaled))


def test_set_mask_takes_reset_state_as_a_bool_only():
    opt = MaskedAdamW(make_params([(3,)]), seed=0)
    with pytest.raises(TypeError, match="reset_state must be a bool, got 'yes'"):
        opt.set_mask(None, reset_state="yes")
