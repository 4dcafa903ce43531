"""Arguments and parameters refused with a clear error, and a step that refuses changes nothing.

Messages name the parameter (or group) and what was expected; torch.optim.AdamW is the oracle
for what a step after a refused one must give.
"""
import math
import pickle

import numpy as np
import pytest
import torch

from childopt import MaskedAdamW
from tests.helpers import assert_steps_as_torch_adamw, clone_params, make_params, train

TOL = dict(rtol=1e-5, atol=1e-6)


def _params():
    return make_params([(3, 2)])


@pytest.mark.parametrize("dtype", [torch.complex64, torch.complex128])
def test_complex_parameters_are_refused_at_construction_not_cast(dtype):
    p = torch.nn.Parameter(torch.randn(4, dtype=dtype))
    with pytest.raises(TypeError, match=f"param_groups\\[0\\]\\['params'\\]\\[0\\] .* has dtype {dtype}.*view_as_real"):
        MaskedAdamW([p], seed=0)


def test_a_complex_parameter_in_an_added_group_leaves_the_optimizer_as_it_was():
    opt = MaskedAdamW(_params(), seed=0)
    with pytest.raises(TypeError, match="param_groups\\[1\\].*complex64"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(2, dtype=torch.complex64))]})
    assert len(opt.param_groups) == 1


def test_the_real_view_of_a_complex_parameter_steps_as_torch_adamw_steps_the_complex_one():
    """The workaround the message names gives torch AdamW's complex update (it views as real too)."""
    z = torch.randn(5, dtype=torch.complex64, generator=torch.Generator().manual_seed(0))
    theirs = torch.nn.Parameter(z.clone())
    ours = torch.nn.Parameter(torch.view_as_real(z.clone()))
    opt = MaskedAdamW([ours], lr=1e-2, weight_decay=0.1, seed=0)
    ref = torch.optim.AdamW([theirs], lr=1e-2, weight_decay=0.1, foreach=False)
    gen = torch.Generator().manual_seed(1)
    for _ in range(5):
        g = torch.randn(5, dtype=torch.complex64, generator=gen)
        theirs.grad, ours.grad = g, torch.view_as_real(g).clone()
        opt.step()
        ref.step()
    torch.testing.assert_close(torch.view_as_complex(ours.detach()), theirs.detach(), **TOL)


def test_an_expanded_parameter_is_refused_at_construction():
    p = torch.nn.Parameter(torch.randn(3).expand(4, 3))
    with pytest.raises(RuntimeError, match="shape \\(4, 3\\)\\) has memory shared between its elements.*strides \\(0, 1\\)"):
        MaskedAdamW([p], seed=0)


def test_an_interleaved_view_without_overlap_is_accepted_and_steps_as_torch_adamw():
    """as_strided((2, 3), (3, 2)) has six distinct offsets the quick stride rule cannot prove apart."""
    ours = [torch.nn.Parameter(torch.randn(8).as_strided((2, 3), (3, 2)))]
    theirs = clone_params(ours)
    opt = MaskedAdamW(ours, lr=1e-2, seed=0)
    ref = torch.optim.AdamW(theirs, lr=1e-2, foreach=False)
    train(opt, ours, 3)
    train(ref, theirs, 3)
    torch.testing.assert_close(ours[0], theirs[0], **TOL)


def test_an_interleaved_view_that_overlaps_is_refused():
    p = torch.nn.Parameter(torch.randn(8).as_strided((2, 3), (2, 1)))  # offsets 0,1,2 and 2,3,4
    with pytest.raises(RuntimeError, match="memory shared between its elements"):
        MaskedAdamW([p], seed=0)


def test_two_parameters_over_one_storage_are_refused():
    """Two Parameters over one tensor (tying written as nn.Parameter(other.weight)): the kernels
    step a bucket's tensors in parallel chunks, so their updates would race."""
    base = torch.randn(6)
    with pytest.raises(RuntimeError, match=r"\[0\] \(shape \(6,\)\) and .*\[1\] \(shape \(6,\)\) share memory"):
        MaskedAdamW([torch.nn.Parameter(base), torch.nn.Parameter(base)], seed=0)
    flat = torch.randn(10)
    with pytest.raises(RuntimeError, match="share memory"):  # crossing slices
        MaskedAdamW([torch.nn.Parameter(flat[:6]), torch.nn.Parameter(flat[4:])], seed=0)
    with pytest.raises(RuntimeError, match="share memory"):  # a bf16 view of an fp32 tensor's bytes
        MaskedAdamW([torch.nn.Parameter(flat), torch.nn.Parameter(flat.view(torch.bfloat16)[2:4])], seed=0)


def test_a_parameter_listed_twice_in_one_group_is_refused():
    p = torch.nn.Parameter(torch.randn(4))
    with pytest.warns(UserWarning, match="duplicate parameters"), pytest.raises(RuntimeError, match="listed twice"):
        MaskedAdamW([p, p], seed=0)


def test_disjoint_views_of_one_storage_step_as_torch_adamw():
    """Adjacent slices and interleaved columns of one tensor share a storage but no element."""
    def views():
        flat, grid = torch.randn(10), torch.randn(3, 4)
        return [torch.nn.Parameter(t) for t in (flat[:4], flat[4:], grid[:, ::2], grid[:, 1::2])]
    ours, theirs = views(), views()
    with torch.no_grad():
        for a, b in zip(ours, theirs):
            b.copy_(a)
    assert_steps_as_torch_adamw(MaskedAdamW(ours, lr=1e-2, seed=0), ours, theirs, 3, lr=1e-2)


def test_an_added_group_aliasing_an_earlier_parameter_is_refused_and_not_added():
    flat = torch.randn(8)
    opt = MaskedAdamW([torch.nn.Parameter(flat[:4])], seed=0)
    with pytest.raises(RuntimeError, match=r"param_groups\[0\]\['params'\]\[0\].*share memory"):
        opt.add_param_group({"params": [torch.nn.Parameter(flat[2:6])]})
    assert len(opt.param_groups) == 1
    opt.add_param_group({"params": [torch.nn.Parameter(flat[4:])]})
    assert len(opt.param_groups) == 2
    copy = pickle.loads(pickle.dumps(opt))  # its parameters are copies: sharing one storage again
    held = copy.param_groups[1]["params"][0]
    with pytest.raises(RuntimeError, match=r"param_groups\[1\]\['params'\]\[0\].*share memory"):
        copy.add_param_group({"params": [torch.nn.Parameter(held.detach()[1:])]})


def test_a_step_that_fails_on_a_later_tensor_changes_nothing(lane):
    """[transposed, expanded]: the expanded one (its data swapped in after construction) is refused
    before the transposed one is written, so step counts, moments and weights stay, and a retry
    after the fix applies the update once (torch AdamW on the same two tensors is the oracle)."""
    backend, device = lane
    ours = [torch.nn.Parameter(torch.randn(4, 3).t().to(device)), torch.nn.Parameter(torch.randn(4, 3).to(device))]
    theirs = clone_params(ours)
    opt = MaskedAdamW(ours, lr=1e-2, seed=0, backend=backend)
    ref = torch.optim.AdamW(theirs, lr=1e-2, foreach=False)
    train(opt, ours, 1)
    train(ref, theirs, 1)
    own_storage = ours[1].data
    ours[1].data = own_storage[:1].expand(4, 3)
    before = [p.detach().clone() for p in ours] + [opt.state[ours[0]][k].clone() for k in ("exp_avg", "exp_avg_sq")]
    for p, g in zip(ours, [torch.ones(3, 4, device=device), torch.ones(4, 3, device=device)]):
        p.grad = g
    with pytest.raises(RuntimeError, match="param_groups\\[0\\]\\['params'\\]\\[1\\].*memory shared"):
        opt.step()
    after = [p.detach() for p in ours] + [opt.state[ours[0]][k] for k in ("exp_avg", "exp_avg_sq")]
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    assert [opt.state[p]["step"].item() for p in ours] == [1, 1]
    ours[1].data = own_storage
    train(opt, ours, 2, start=1)
    train(ref, theirs, 2, start=1)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a.detach().cpu(), b.detach().cpu(), **TOL)


EDITS = [
    ("lr", math.nan, ValueError, "lr \\(param group 0\\) must be in \\[0.0, inf\\), got nan"),
    ("lr", math.inf, ValueError, "lr \\(param group 0\\) must be in"),
    ("weight_decay", -0.1, ValueError, "weight_decay \\(param group 0\\) must be in"),
    ("eps", 0.0 - 1, ValueError, "eps \\(param group 0\\) must be in"),
    ("betas", (0.9, 1.0), ValueError, "betas\\[1\\] \\(param group 0\\) must be in"),
    ("betas", 0.9, ValueError, "betas \\(param group 0\\) must be a pair"),
    ("masked", "bogus", ValueError, "masked \\(param group 0\\) must be one of"),
    ("reserve_p", 0.0, ValueError, "reserve_p \\(param group 0\\) must be in \\(0.0, 1.0\\]"),
    ("amsgrad", 1, TypeError, "amsgrad \\(param group 0\\) must be a bool"),
    ("lr", torch.ones(2), TypeError, "lr \\(param group 0\\) must be a number or a one-element real tensor"),
]


@pytest.mark.parametrize("key,value,error,match", EDITS)
def test_hyper_parameters_edited_after_construction_are_checked_at_the_next_step(key, value, error, match):
    params = _params()
    opt = MaskedAdamW(params, lr=1e-2, seed=0)
    train(opt, params, 1)
    before = params[0].detach().clone()
    opt.param_groups[0][key] = value
    with pytest.raises(error, match=match):
        train(opt, params, 1, start=1)
    assert torch.equal(params[0].detach(), before) and opt.state[params[0]]["step"].item() == 1


def test_numpy_hyper_parameters_edited_in_a_group_step_as_in_torch():
    """Schedulers and configs hand over numpy scalars; torch AdamW steps with them, so must we."""
    ours = _params()
    theirs = clone_params(ours)
    opt = MaskedAdamW(ours, seed=0)
    ref = torch.optim.AdamW(theirs, foreach=False)
    for o in (opt, ref):
        o.param_groups[0].update(lr=np.float32(0.01), weight_decay=np.float64(0.1), eps=np.float32(1e-8))
    train(opt, ours, 3)
    train(ref, theirs, 3)
    torch.testing.assert_close(ours[0], theirs[0], **TOL)


@pytest.mark.parametrize("hyper", ["lr", "weight_decay", "eps"])
def test_infinite_hyper_parameters_are_refused_at_construction(hyper):
    with pytest.raises(ValueError, match=f"{hyper} must be in \\[0.0, inf\\), got inf"):
        MaskedAdamW(_params(), **{hyper: math.inf})


@pytest.mark.parametrize("seed", [np.int64(7), np.uint32(7), torch.tensor(7), torch.tensor([7], dtype=torch.int32)])
def test_integer_seeds_of_any_kind_give_the_same_bernoulli_stream(seed):
    runs = []
    for s in (7, seed):
        params = make_params([(64,)])
        opt = MaskedAdamW(params, lr=1e-2, mask="bernoulli", reserve_p=0.5, seed=s)
        train(opt, params, 2)
        assert opt.seed == 7 and type(opt.seed) is int
        runs.append(params[0].detach())
    assert torch.equal(*runs)


@pytest.mark.parametrize("seed,error,match", [
    (2.7, TypeError, "seed must be an int in \\[0, 2\\*\\*64\\), got float 2.7"),
    (np.float64(3.0), TypeError, "got float64"),
    (torch.tensor(3.0), TypeError, "got a tensor of shape \\(\\) and dtype torch.float32"),
    (torch.tensor([1, 2]), TypeError, "got a tensor of shape \\(2,\\)"),
    (True, ValueError, "seed must be an int"),
    (2**64, ValueError, "seed must be an int in \\[0, 2\\*\\*64\\)"),
])
def test_seeds_that_are_not_integers_are_refused(seed, error, match):
    with pytest.raises(error, match=match):
        MaskedAdamW(_params(), mask="bernoulli", reserve_p=0.5, seed=seed)


def test_a_mask_on_the_meta_device_is_refused_with_what_to_do():
    params = _params()
    with pytest.raises(ValueError, match="mask for param_groups.* is on the meta device, which holds no values"):
        MaskedAdamW(params, mask={params[0]: torch.ones(3, 2, dtype=torch.bool, device="meta")})


def test_fake_parameters_are_not_judged_by_their_missing_memory():
    """Under FakeTensorMode (the memory planner's trace) every data pointer is 0: not a shared storage."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        params = [torch.nn.Parameter(torch.zeros(4)), torch.nn.Parameter(torch.zeros(3))]
        assert len(MaskedAdamW(params, lr=1e-2, seed=0).param_groups[0]["params"]) == 2


def test_a_parameter_appended_to_a_group_list_in_place_is_refused_by_name():
    """A list that grew, or had a tensor swapped in, names the stray tensor instead of failing on a
    bare KeyError."""
    params = make_params([(3,), (4,)])
    opt = MaskedAdamW(params[:1], seed=0, backend="reference")
    train(opt, params[:1], 1)
    opt.param_groups[0]["params"].append(params[1])
    with pytest.raises(RuntimeError, match=r"param group 0 holds a tensor of shape \(4,\) that was not given"):
        train(opt, params, 1)
    opt.param_groups[0]["params"][:] = params[1:]
    with pytest.raises(RuntimeError, match=r"param group 0 holds a tensor of shape \(4,\) that was not given"):
        train(opt, params[1:], 1)


@pytest.mark.parametrize("shape", [(2, 5), (9,)], ids=["fewer elements", "same count"])
@pytest.mark.parametrize("mask,storage", [(None, "dense"), ("dense", "dense"), ("dense", "sparse")])
def test_a_parameter_resized_behind_the_optimizer_fails_the_step_before_anything_moves(mask, storage, shape):
    """``b.data = <another shape>`` no longer fits b's moments, mask or sparse indices (the native
    sparse step wrote past a shrunk tensor): the step refuses it, naming b, before the first group
    is written (it used to step group 0, then fail in a kernel or not at all)."""
    a, b = make_params([(5,), (3, 3)])
    masks = {b: torch.rand(3, 3, generator=torch.Generator().manual_seed(0)) < 0.5} if mask else None
    opt = MaskedAdamW([{"params": [a]}, {"params": [b]}], seed=0, backend="reference", mask=masks, storage=storage)
    train(opt, [a, b], 1)
    b.data = torch.randn(shape)
    before = a.detach().clone()
    with pytest.raises(RuntimeError, match=rf"with shape \(3, 3\); its .data now has shape \({shape[0]},"):
        train(opt, [a, b], 1)
    assert torch.equal(a, before)


@pytest.mark.parametrize("eps", [0.0, torch.tensor(0.0)], ids=["number", "tensor"])
@pytest.mark.parametrize("mask", ["bernoulli", "dense"])
def test_eps_zero_with_zero_grad_masks_is_refused_instead_of_writing_nan(mask, eps):
    """A masked-out entry under zero_grad has zero moments; eps=0 makes its update 0/0."""
    params = make_params([(8, 8)])
    masks = {params[0]: torch.arange(64).reshape(8, 8) % 3 == 0} if mask == "dense" else mask
    opt = MaskedAdamW(params, eps=eps, mask=masks, masked="zero_grad", reserve_p=0.5, seed=0, backend="reference")
    before = params[0].detach().clone()
    with pytest.raises(ValueError, match=r"eps=0 \(param group 0\) with masked='zero_grad' and a mask"):
        train(opt, params, 1)
    assert torch.equal(params[0], before)


def test_eps_zero_in_a_group_that_masks_nothing_steps_as_torch_adamw():
    """reserve_p=1.0 exempts a group from a Bernoulli mask: nothing there is masked, so eps=0 is
    torch AdamW's business, as without a mask."""
    ours, theirs = make_params([(8, 8)]), make_params([(8, 8)])
    opt = MaskedAdamW([{"params": ours, "reserve_p": 1.0}], eps=0.0, mask="bernoulli", reserve_p=0.3, seed=0,
                      backend="reference")
    assert_steps_as_torch_adamw(opt, ours, theirs, 3, eps=0.0)


def test_eps_zero_without_a_mask_steps_as_torch_adamw():
    ours, theirs = make_params([(8, 8)]), make_params([(8, 8)])
    opt = MaskedAdamW(ours, eps=0.0, masked="zero_grad", seed=0, backend="reference")
    assert_steps_as_torch_adamw(opt, ours, theirs, 3, eps=0.0)


@pytest.mark.parametrize("call,error,match", [
    (lambda opt: opt.clip_grad_norm_(-1.0), ValueError, r"max_norm must be in \[0.0, inf\], got -1.0"),
    (lambda opt: opt.clip_grad_norm_(float("nan")), ValueError, "max_norm must be in"),
    (lambda opt: opt.clip_grad_norm_("1.0"), TypeError, "max_norm must be a number, got str"),
    (lambda opt: opt.clip_grad_norm_(1.0, error_if_nonfinite="no"), TypeError, "error_if_nonfinite must be a bool"),
    (lambda opt: opt.zero_grad(set_to_none="False"), TypeError, "set_to_none must be a bool, got 'False'"),
])
def test_gradient_helpers_refuse_arguments_that_would_change_the_gradients_wrongly(call, error, match):
    """A negative max_norm flips every gradient (a step uphill), NaN makes them NaN, and a truthy
    string set_to_none drops gradients the user meant to keep: refused, gradients untouched."""
    params = make_params([(4,)])
    opt = MaskedAdamW(params, lr=1e-2)
    params[0].grad = torch.ones(4)
    with pytest.raises(error, match=match):
        call(opt)
    assert torch.equal(params[0].grad, torch.ones(4))


def _groups_with_a_shared_name():
    """Two groups from two submodules' named_parameters(): both hold a '0.weight'."""
    encoder, decoder = torch.nn.Sequential(torch.nn.Linear(4, 4)), torch.nn.Sequential(torch.nn.Linear(4, 4))
    return encoder, decoder, [{"params": list(encoder.named_parameters())},
                              {"params": list(decoder.named_parameters()), "lr": 1e-4}]


def test_a_name_two_parameters_share_is_refused_where_it_would_pick_one():
    """A mask, or importance scores, keyed by a shared name would land on one parameter while the
    other trains fully; sparse_indices() would return one of the two.  Keyed by the parameters,
    the same groups work."""
    encoder, decoder, groups = _groups_with_a_shared_name()
    with pytest.raises(ValueError, match=r"mask has an entry for '0.weight', a name that several parameters"):
        MaskedAdamW(groups, lr=1e-2, mask={"0.weight": torch.zeros(4, 4, dtype=torch.bool)})
    opt = MaskedAdamW(groups, lr=1e-2)
    with pytest.raises(ValueError, match=r"mask has an entry for '0.bias', a name that several parameters"):
        opt.set_mask({"0.bias": torch.zeros(4, dtype=torch.bool)})
    keep = {encoder[0].weight: torch.ones(4, 4, dtype=torch.bool), decoder[0].weight: torch.eye(4, dtype=torch.bool)}
    sparse = MaskedAdamW(groups, lr=1e-2, mask=keep, storage="sparse")
    with pytest.raises(ValueError, match=r"sparse_indices\(\): '0.weight' is a name that several parameters"):
        sparse.sparse_indices()
