"""storage="sparse": only the selected entries are stepped and hold state.

Oracle: the same optimizer with storage="dense", masked="freeze" and the same mask.  The two run
the same element arithmetic (contiguous vs gathered entries), so parameters and moments must
be bit-identical on one backend.
"""
import copy
import io
import sys

import pytest
import torch

from childopt import MaskedAdamW
from childopt.bench.shapes import roberta_base_shapes
from tests.helpers import MIXED_SHAPES, assert_all_equal, clone_params, grads_at, make_params, masks_for, train


def _pair(params, backend="reference", **kwargs):
    masks = masks_for(params, density=0.3)
    dense_params = clone_params(params)
    dense_masks = {d: masks[p] for p, d in zip(params, dense_params)}
    sparse = MaskedAdamW(params, lr=1e-2, weight_decay=0.1, mask=masks, storage="sparse", seed=0,
                         backend=backend, **kwargs)
    dense = MaskedAdamW(dense_params, lr=1e-2, weight_decay=0.1, mask=dense_masks, masked="freeze", seed=0,
                        backend=backend, amsgrad=kwargs.get("amsgrad", False))
    return sparse, dense, dense_params, masks


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("amsgrad", [False, True])
def test_sparse_trajectory_equals_dense_freeze_bitwise_over_100_steps(lane, dtype, amsgrad):
    backend, device = lane
    params = make_params(MIXED_SHAPES + [(64, 33)], device, dtype=dtype)
    sparse, dense, dense_params, masks = _pair(params, backend, amsgrad=amsgrad)
    train(sparse, params, 100)
    train(dense, dense_params, 100)
    assert_all_equal([p.detach() for p in params], [p.detach() for p in dense_params])
    for p, d in zip(params, dense_params):
        idx = sparse.state[p]["indices"]
        assert idx.dtype == torch.int32 and sparse.state[p]["exp_avg"].shape == idx.shape
        for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq") if amsgrad else ("exp_avg", "exp_avg_sq"):
            assert torch.equal(sparse.state[p][key], dense.state[d][key].reshape(-1)[idx.long()])


def test_state_bytes_are_12_per_selected_entry_plus_4_per_parameter():
    params = make_params(MIXED_SHAPES)
    sparse, _, _, masks = _pair(params)
    train(sparse, params, 1)
    selected = sum(int(m.sum()) for m in masks.values())
    assert sparse.state_bytes() == 12 * selected + 4 * len(params)


def test_roberta_base_at_reserve_p_0_1_holds_at_most_1_25_state_bytes_per_parameter():
    """The issue's must-show figure, on the real 125M-parameter roberta-base shapes."""
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.zeros(s)) for s in roberta_base_shapes()]
    masks = {p: torch.rand(p.shape, generator=gen) < 0.1 for p in params}
    opt = MaskedAdamW(params, mask=masks, storage="sparse", seed=0)
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    numel = sum(p.numel() for p in params)
    per_param = opt.state_bytes() / numel
    selected = sum(int(m.sum()) for m in masks.values())
    assert opt.state_bytes() == 12 * selected + 4 * len(params)
    assert per_param <= 1.25, per_param


class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a = torch.nn.Linear(6, 16)
        self.b = torch.nn.Linear(16, 3)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


def _batches(n):
    gen = torch.Generator().manual_seed(3)
    return [torch.randn(8, 6, generator=gen) for _ in range(n)]


def test_compact_grads_free_dense_grads_accumulate_and_follow_dense_freeze():
    net, ref = _Net(), _Net()
    masks = {p: m for p, m in masks_for(list(net.parameters())[:2], density=0.25).items()}  # layer a only
    ref_masks = {r: masks[p] for p, r in zip(net.parameters(), ref.parameters()) if p in masks}
    opt = MaskedAdamW(net.parameters(), lr=1e-2, mask=masks, storage="sparse", compact_grads=True, seed=0)
    ref_opt = MaskedAdamW(ref.parameters(), lr=1e-2, mask=ref_masks, seed=0)
    for step in range(5):
        micro = _batches(3)
        for x in micro:  # gradient accumulation over three micro-batches
            net(x).square().mean().backward()
            ref(x).square().mean().backward()
        for p, r in zip(net.parameters(), ref.parameters()):
            if p in masks:
                assert p.grad is None  # the dense gradient was freed inside backward
                idx = opt.state[p]["indices"].long()
                assert torch.equal(opt.compact_gradients()[p], r.grad.reshape(-1)[idx])
            else:
                assert torch.equal(p.grad, r.grad)
        opt.step()
        ref_opt.step()
        opt.zero_grad()
        ref_opt.zero_grad()
        assert opt.compact_gradients() == {}
    assert_all_equal([p.detach() for p in net.parameters()], [r.detach() for r in ref.parameters()])


def test_clip_grad_norm_equals_torch_on_masked_gradients():
    net, ref = _Net(), _Net()
    masks = masks_for(list(net.parameters())[:2], density=0.3)
    opt = MaskedAdamW(net.parameters(), lr=1e-2, mask=masks, storage="sparse", compact_grads=True, seed=0)
    x = _batches(1)[0]
    net(x).square().mean().backward()
    ref(x).square().mean().backward()
    ref_params = list(ref.parameters())
    for p, r in zip(net.parameters(), ref_params):
        if p in masks:
            r.grad.mul_(masks[p])
    expected_norm = torch.nn.utils.clip_grad_norm_(ref_params, max_norm=0.05)
    norm = opt.clip_grad_norm_(max_norm=0.05)
    torch.testing.assert_close(norm, expected_norm, rtol=1e-6, atol=0)
    assert norm > 0.05  # clipping really happened
    for p, r in zip(net.parameters(), ref_params):
        if p in masks:
            idx = opt.state[p]["indices"].long()
            torch.testing.assert_close(opt.compact_gradients()[p], r.grad.reshape(-1)[idx], rtol=1e-6, atol=0)
        else:
            torch.testing.assert_close(p.grad, r.grad, rtol=1e-6, atol=0)


def _round_trip(state_dict):
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def test_state_dict_stores_indices_and_compact_state_and_loads_into_a_fresh_optimizer():
    params = make_params(MIXED_SHAPES)
    opt, _, _, _ = _pair(params, amsgrad=True)
    train(opt, params, 10)
    saved = _round_trip(copy.deepcopy(opt.state_dict()))
    assert all(saved["state"][i]["exp_avg"].shape == saved["state"][i]["indices"].shape for i in saved["state"])
    resumed = clone_params(params)
    train(opt, params, 5, start=10)
    fresh = MaskedAdamW(resumed, lr=1e-2, weight_decay=0.1, storage="sparse", amsgrad=True, seed=5)
    fresh.load_state_dict(saved)
    train(fresh, resumed, 5, start=10)
    assert_all_equal([p.detach() for p in resumed], [p.detach() for p in params])
    assert fresh.state_bytes() == opt.state_bytes()
    with pytest.raises(ValueError, match="saved with storage='sparse'"):
        MaskedAdamW(clone_params(params), seed=0).load_state_dict(saved)


def test_set_mask_recompacts_state_by_the_documented_rule():
    p = make_params([(10,)])[0]
    opt = MaskedAdamW([p], lr=1e-2, mask={p: torch.arange(10) < 6}, storage="sparse", seed=0)
    train(opt, [p], 3)
    before = opt.state[p]["exp_avg"].clone()  # entries 0..5
    opt.set_mask({p: (torch.arange(10) >= 3) & (torch.arange(10) < 8)})  # entries 3..7
    assert torch.equal(opt.state[p]["indices"], torch.arange(3, 8, dtype=torch.int32))
    assert torch.equal(opt.state[p]["exp_avg"][:3], before[3:6])  # kept where both sets hold them
    assert torch.equal(opt.state[p]["exp_avg"][3:], torch.zeros(2))  # new entries start at zero
    assert opt.state[p]["step"].item() == 3
    compact = opt.state[p]["exp_avg"].clone()
    opt.set_mask(None)  # back to dense: zero off the old indices
    assert opt.state[p]["exp_avg"].shape == (10,) and "indices" not in opt.state[p]
    assert torch.equal(opt.state[p]["exp_avg"][3:8], compact) and not opt.state[p]["exp_avg"][:3].any()
    train(opt, [p], 1, start=3)
    opt.set_mask({p: torch.arange(10) % 2 == 0}, reset_state=True)  # restarts from zero, as on step 1
    assert set(opt.state[p]) == {"indices", "step", "exp_avg", "exp_avg_sq"} and opt.state[p]["step"].item() == 0
    assert opt.state[p]["exp_avg"].shape == (5,) and not opt.state[p]["exp_avg"].any()


def test_a_param_without_mask_trains_fully_next_to_sparse_ones():
    params = make_params([(5, 4), (7,)])
    mask = {params[0]: torch.rand(5, 4, generator=torch.Generator().manual_seed(1)) < 0.5}
    opt = MaskedAdamW(params, lr=1e-2, mask=mask, storage="sparse", seed=0)
    ref_params = clone_params(params)
    ref = torch.optim.AdamW(ref_params[1:], lr=1e-2, foreach=False)
    train(opt, params, 5)
    train(ref, ref_params[1:], 5, grad_fn=lambda ps, t: grads_at(params, t)[1:])
    torch.testing.assert_close(params[1], ref_params[1], rtol=1e-5, atol=1e-6)
    assert opt.state[params[1]]["exp_avg"].shape == (7,)


def _optimizer(**kwargs):
    return MaskedAdamW(make_params([(4, 3)]), seed=0, **kwargs)


def _sparse_state_with_bad_indices():
    params = make_params([(4, 3)])
    opt = MaskedAdamW(params, mask={params[0]: torch.ones(4, 3, dtype=torch.bool)}, storage="sparse", seed=0)
    saved = copy.deepcopy(opt.state_dict())
    saved["state"][0]["indices"] = torch.tensor([0, 5, 12], dtype=torch.int32)  # 12 is past a 4x3 tensor
    return lambda: MaskedAdamW(clone_params(params), storage="sparse", seed=0).load_state_dict(saved)


@pytest.mark.parametrize("make,error,match", [
    (lambda: _optimizer(storage="sparse", mask="bernoulli", reserve_p=0.5), ValueError, "needs a fixed mask"),
    (lambda: _optimizer(compact_grads=True), ValueError, "compact_grads=True needs storage='sparse'"),
    (lambda: _optimizer(storage="sparse", masked="zero_grad"), ValueError, "masked='zero_grad' .*storage='sparse'"),
    (lambda: _optimizer(storage="compressed"), ValueError, "storage must be one of"),
    (_sparse_state_with_bad_indices(), ValueError, "indices must be strictly increasing and inside \\[0, 12\\)"),
])
def test_bad_sparse_configuration_raises(make, error, match):
    with pytest.raises(error, match=match):
        make()


def test_sparse_training_exports_a_delta_that_reproduces_the_model_exactly(tmp_path):
    """Freeze semantics leave every unselected weight untouched, so (indices, values) is the whole change."""
    from childopt import SparseDelta

    model = _Net()
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    names = [n for n, _ in model.named_parameters()]
    masks = {n: torch.rand(p.shape, generator=torch.Generator().manual_seed(i)) < 0.2
             for i, (n, p) in enumerate(model.named_parameters())}
    opt = MaskedAdamW(model.named_parameters(), lr=1e-2, mask=masks, storage="sparse", compact_grads=True, seed=0)
    for x in _batches(10):
        model(x).square().mean().backward()
        opt.step()
        opt.zero_grad()
    delta = SparseDelta.extract(base, model.state_dict(), indices=opt.sparse_indices())
    assert set(opt.sparse_indices()) == set(names)
    delta.save(tmp_path / "delta.safetensors")
    fresh = _Net()
    SparseDelta.load(tmp_path / "delta.safetensors").apply_to(fresh)
    for (name, a), b in zip(fresh.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), name
    assert delta.num_entries == sum(int(m.sum()) for m in masks.values())



def test_a_delta_of_a_partly_masked_model_names_the_dense_tensors_or_stores_them():
    """As fisher_mask's defaults leave the head unmasked: the dense-trained tensors are outside the
    sparse indices; extract refuses to lose them, and outside='store' rebuilds the model exactly."""
    from childopt import SparseDelta

    model = _Net()
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    named = list(model.named_parameters())
    masked, dense = named[:2], named[2:]
    masks = {n: torch.rand(p.shape, generator=torch.Generator().manual_seed(i)) < 0.2
             for i, (n, p) in enumerate(masked)}
    opt = MaskedAdamW(model.named_parameters(), lr=1e-2, mask=masks, storage="sparse", seed=0)
    for x in _batches(3):
        model(x).square().mean().backward()
        opt.step()
        opt.zero_grad()
    with pytest.raises(ValueError, match=f"outside the given indices: {dense[0][0]!r}"):
        SparseDelta.extract(base, model.state_dict(), indices=opt.sparse_indices())
    delta = SparseDelta.extract(base, model.state_dict(), indices=opt.sparse_indices(), outside="store")
    fresh = _Net()
    delta.apply_to(fresh)
    for (name, a), b in zip(fresh.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), name
    assert {n for n, _ in dense} <= set(delta.entries)

def _compact_optimizer(net: torch.nn.Module) -> MaskedAdamW:
    masks = masks_for(list(net.parameters())[:2], density=0.25)  # layer a only
    return MaskedAdamW(net.parameters(), lr=1e-2, mask=masks, storage="sparse", compact_grads=True, seed=0)


def _step(net: torch.nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor) -> None:
    net(x).sum().backward()
    opt.step()
    opt.zero_grad()


def test_a_rebuilt_compact_optimizer_takes_the_gradients_from_one_still_alive():
    """Rebuilt and loaded while the old one is still referenced (a Trainer holds it): the new one
    steps as a rebuilt optimizer on a model the old never hooked, and the old refuses to step."""
    net, ref = _Net(), _Net()
    x, y = _batches(2)
    old, ref_old = _compact_optimizer(net), _compact_optimizer(ref)
    _step(net, old, x)
    _step(ref, ref_old, x)
    saved = old.state_dict()
    new, ref_new = _compact_optimizer(net), _compact_optimizer(ref)
    new.load_state_dict(saved)
    ref_new.load_state_dict(ref_old.state_dict())
    del ref_old  # the oracle's old optimizer is gone, so nothing could interfere
    _step(net, new, y)
    _step(ref, ref_new, y)
    assert_all_equal(list(net.parameters()), list(ref.parameters()))
    net(x).sum().backward()
    with pytest.raises(RuntimeError, match="gradients of .* go to another optimizer built with compact_grads=True"):
        old.step()
    new.zero_grad()
    released = MaskedAdamW(net.parameters(), mask=masks_for(list(net.parameters())[:2], density=0.25),
                           storage="sparse", seed=0)  # steps from .grad, which new's hook takes
    net(x).sum().backward()
    with pytest.raises(RuntimeError, match="call its release_gradients\\(\\) to step this one"):
        released.step()
    new.zero_grad()
    new.release_gradients()  # the hook is gone: the old optimizer steps from dense .grad again
    _step(net, old, x)
    assert all(p.grad is None for p in net.parameters())


def test_loading_leaves_one_gradient_hook_per_parameter():
    """torch's load_state_dict rebuilds the compact buffers' owner: the old hooks are removed, not
    left behind doing nothing (torch's private hook dict is read: no public API counts them)."""
    net = _Net()
    opt = _compact_optimizer(net)
    _step(net, opt, _batches(1)[0])
    for _ in range(3):
        opt.load_state_dict(opt.state_dict())
    assert [len(p._post_accumulate_grad_hooks or {}) for p in net.parameters()] == [1, 1, 0, 0]
    opt.release_gradients()
    assert [len(p._post_accumulate_grad_hooks or {}) for p in net.parameters()] == [0, 0, 0, 0]


def test_released_gradients_reach_another_optimizer_and_the_step_reads_dense_grads():
    """After release_gradients, torch's AdamW on the same model steps every parameter (the hooks took
    the masked layer's gradients before), and the released optimizer steps from .grad exactly as one
    built with compact_grads=False."""
    net, ref = _Net(), _Net()
    x, y = _batches(2)
    opt = _compact_optimizer(net)
    net(x).sum().backward()
    with pytest.raises(RuntimeError, match="would drop the compact gradients of 2 parameters not yet stepped"):
        opt.release_gradients()
    opt.step()
    opt.zero_grad(set_to_none=False)  # zeroed buffers hold nothing to lose
    opt.release_gradients()
    ref_opt = MaskedAdamW(ref.parameters(), lr=1e-2, mask=masks_for(list(ref.parameters())[:2], density=0.25),
                          storage="sparse", seed=0)
    _step(ref, ref_opt, x)
    _step(net, opt, y)
    _step(ref, ref_opt, y)
    assert_all_equal(list(net.parameters()), list(ref.parameters()))
    torch_adamw, ref_adamw = torch.optim.AdamW(net.parameters()), torch.optim.AdamW(ref.parameters())
    _step(net, torch_adamw, x)
    _step(ref, ref_adamw, x)
    assert_all_equal(list(net.parameters()), list(ref.parameters()))


def test_unhooked_gradients_are_dense_and_hooked_again_compact_with_one_trajectory():
    """hook_gradients(False) leaves dense .grad (a plain backward sees every gradient) and the step
    reads them; hook_gradients() takes them compact again: the same parameters as an optimizer that
    kept its hooks throughout (one backend: bit for bit), and one hook per masked parameter."""
    net, ref = _Net(), _Net()
    x, y, z = _batches(3)
    opt, ref_opt = _compact_optimizer(net), _compact_optimizer(ref)
    _step(net, opt, x)
    _step(ref, ref_opt, x)
    with pytest.raises(TypeError, match="hook_gradients\\(on=...\\) must be a bool, got 'no'"):
        opt.hook_gradients("no")
    net(y).sum().backward()  # compact gradients waiting for a step are not dropped silently
    with pytest.raises(RuntimeError, match="hook_gradients\\(on=False\\) would drop the compact gradients of 2"):
        opt.hook_gradients(on=False)
    opt.zero_grad()
    opt.hook_gradients(on=False)
    assert [len(p._post_accumulate_grad_hooks or {}) for p in net.parameters()] == [0, 0, 0, 0]
    net(y).sum().backward()
    assert all(p.grad is not None for p in net.parameters())
    opt.step()
    opt.zero_grad()
    _step(ref, ref_opt, y)
    opt.hook_gradients()
    assert [len(p._post_accumulate_grad_hooks or {}) for p in net.parameters()] == [1, 1, 0, 0]
    net(z).sum().backward()
    assert [p.grad is None for p in net.parameters()] == [True, True, False, False]
    opt.step()
    opt.zero_grad()
    _step(ref, ref_opt, z)
    assert_all_equal(list(net.parameters()), list(ref.parameters()))


def test_a_torch_optimizer_refuses_parameters_whose_gradients_a_hook_takes():
    """torch's optimizers skip a parameter whose .grad is None: one that a live compact-gradient
    hook frees in backward is refused instead; parameters no hook takes step as usual."""
    net = _Net()
    opt = _compact_optimizer(net)  # hooks layer a
    net(_batches(1)[0]).sum().backward()
    head = net.b.weight.detach().clone()
    torch.optim.SGD(net.b.parameters(), lr=0.1).step()
    assert not torch.equal(head, net.b.weight)
    with pytest.raises(RuntimeError, match=r"AdamW would skip a parameter of shape \(16, 6\).*release_gradients"):
        torch.optim.AdamW(net.parameters()).step()
    opt.zero_grad()
    net.a.weight.requires_grad_(False)  # frozen after it was hooked: no gradient to skip
    torch.optim.SGD([net.a.weight], lr=0.1).step()
    net.a.weight.requires_grad_(True)
    opt.release_gradients()
    net(_batches(1)[0]).sum().backward()
    torch.optim.AdamW(net.parameters()).step()  # dense .grad everywhere again


def test_compact_gradients_left_from_a_step_warn_when_added_to():
    net = _Net()
    opt = MaskedAdamW(net.parameters(), mask=masks_for(list(net.parameters())[:2]), storage="sparse",
                      compact_grads=True, seed=0)
    x = _batches(1)[0]
    net(x).sum().backward()
    opt.step()
    net.zero_grad()  # clears .grad only, not the compact buffers
    with pytest.warns(UserWarning, match="call optimizer.zero_grad\\(\\) between steps") as caught:
        net(x).sum().backward()
    assert (caught[0].filename, caught[0].lineno) == (__file__, sys._getframe().f_lineno - 1)  # not torch's
    opt.zero_grad()
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        net(x).sum().backward()
        opt.step()



def test_grad_scaler_with_compact_gradients_is_refused_not_mis_stepped():
    net = _Net()
    opt = MaskedAdamW(net.parameters(), mask=masks_for(list(net.parameters())[:2]), storage="sparse",
                      compact_grads=True, seed=0)
    scaler = torch.amp.GradScaler("cpu")
    scaler.scale(net(_batches(1)[0]).sum()).backward()
    before = [p.detach().clone() for p in net.parameters()]
    with pytest.raises(RuntimeError, match="cannot run under torch.amp.GradScaler"):
        scaler.step(opt)
    assert_all_equal([p.detach() for p in net.parameters()], before)


def test_set_mask_between_backward_and_step_with_compact_gradients_raises():
    net = _Net()
    first = list(net.parameters())[0]
    opt = MaskedAdamW(net.parameters(), mask={first: torch.zeros_like(first, dtype=torch.bool).index_fill_(1, torch.tensor([0]), True)},
                      storage="sparse", compact_grads=True, seed=0)
    net(_batches(1)[0]).sum().backward()
    with pytest.raises(RuntimeError, match="compact gradient for its old indices"):
        opt.set_mask({first: torch.ones_like(first, dtype=torch.bool)})
    opt.step()
    opt.zero_grad()
    opt.set_mask({first: torch.ones_like(first, dtype=torch.bool)})  # fine once the gradient is consumed
    assert opt.state[first]["indices"].numel() == first.numel()


def test_frozen_parameters_with_a_mask_get_no_compact_hook():
    net = _Net()
    net.a.bias.requires_grad_(False)
    masks = masks_for(list(net.parameters()))
    opt = MaskedAdamW(net.parameters(), lr=1e-2, mask=masks, storage="sparse", compact_grads=True, seed=0)
    bias = net.a.bias.detach().clone()
    net(_batches(1)[0]).sum().backward()
    opt.step()
    assert torch.equal(net.a.bias, bias) and net.a.bias not in opt.compact_gradients()


def test_fisher_after_a_compact_gradient_optimizer_explains_the_conflict():
    from childopt.fisher import FisherAccumulator

    net = _Net()
    opt = MaskedAdamW(net.parameters(), mask=masks_for(list(net.parameters())), storage="sparse",
                      compact_grads=True, seed=0)  # kept alive: its hooks hold it only weakly
    with FisherAccumulator(net) as _, pytest.raises(RuntimeError, match="freed by an earlier hook"):
        net(_batches(1)[0]).sum().backward()
    assert opt.compact_gradients()


def test_a_dropped_compact_gradient_optimizer_is_freed_without_the_cycle_collector():
    import gc
    import weakref

    net = _Net()
    opt = MaskedAdamW(net.parameters(), mask=masks_for(list(net.parameters())), storage="sparse",
                      compact_grads=True, seed=0)
    net(_batches(1)[0]).sum().backward()
    opt.step()
    gone = weakref.ref(opt)
    gc.disable()
    try:
        del opt
        assert gone() is None  # freed by reference counting: its state goes with it (benchmarks rely on that)
    finally:
        gc.enable()
    net(_batches(1)[0]).sum().backward()  # the parameters' hooks outlive it harmlessly
    assert all(p.grad is not None for p in net.parameters())


def _after_compact_backward():
    """An optimizer with compact gradients after one backward, and the first parameter."""
    net = _Net()
    opt = MaskedAdamW(net.parameters(), mask=masks_for(list(net.parameters())), storage="sparse",
                      compact_grads=True, seed=0)
    net(_batches(1)[0]).sum().backward()
    return opt, next(net.parameters())


def test_a_dense_grad_beside_a_compact_one_is_refused_naming_the_ddp_way():
    """What DDP does to a compact_grads model: it writes the dense .grad after backward freed it."""
    opt, first = _after_compact_backward()
    first.grad = torch.zeros_like(first)
    with pytest.raises(RuntimeError,
                       match=r"both a \.grad \(torch\.strided\) and a compact gradient.*all_reduce_gradients"):
        opt.step()


def test_a_sparse_grad_beside_a_compact_one_is_named_by_its_layout():
    opt, first = _after_compact_backward()
    first.grad = torch.zeros_like(first).to_sparse()
    with pytest.raises(RuntimeError, match=r"both a \.grad \(torch\.sparse_coo\) and a compact gradient"):
        opt.step()
