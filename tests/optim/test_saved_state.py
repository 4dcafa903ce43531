"""load_state_dict refuses a bad state dict with the parameter named, before anything changes.

Each case corrupts one entry of a valid state dict (dense storage with a mask and amsgrad, or
sparse storage) and checks the error, then that the optimizer is exactly as before the refused
load (state, groups, mask kind, seed) and still loads the valid dict and steps.
"""
import copy
import math
import pickle
import warnings

import numpy as np
import pytest
import torch

from childopt import ChildTuningAdamW, MaskedAdamW
from tests.helpers import make_params, masks_for, train

SHAPES = [(6, 4), (9,)]


def _trained(storage):
    params = make_params(SHAPES)
    opt = MaskedAdamW(params, lr=1e-2, seed=11, amsgrad=storage == "dense", storage=storage,
                      mask=masks_for(params[:1]), backend="reference")
    train(opt, params, 2)
    return opt, params


def _drop_extras(state_dict):
    """Lose the ``"childopt"`` entry everywhere it is kept (the top and each group)."""
    state_dict.pop("childopt")
    for group in state_dict["param_groups"]:
        group.pop("childopt")


def _stamp_groups(state_dict, stamp):
    """Only the groups' copy of ``"childopt"`` left, with ``steps_total`` set to ``stamp`` (None: removed)."""
    state_dict.pop("childopt")
    for group in state_dict["param_groups"]:
        group["childopt"] = {k: v for k, v in group["childopt"].items() if k != "steps_total"}
        if stamp is not None:
            group["childopt"]["steps_total"] = stamp


def _set(key, value, param=0):
    def corrupt(sd):
        sd["state"][param][key] = value(sd["state"][param]) if callable(value) else value
    return corrupt


def _drop(key):
    def corrupt(sd):
        del sd["state"][0][key]
    return corrupt


def _extras(key, value):
    def corrupt(sd):
        sd["childopt"][key] = value
    return corrupt


NAMED = "param_groups\\[0\\]\\['params'\\]\\[0\\] \\(shape \\(6, 4\\)\\)"
CORRUPTIONS = [
    ("dense", _set("exp_avg", lambda s: torch.full_like(s["exp_avg"], float("nan"))), ValueError,
     "'exp_avg' for .* has inf or NaN entries"),
    ("dense", _set("exp_avg_sq", lambda s: torch.full_like(s["exp_avg_sq"], float("inf"))), ValueError,
     "'exp_avg_sq' for .* has inf or NaN entries"),
    ("dense", lambda sd: sd.__setitem__("childopt", None), ValueError, "state_dict\\['childopt'\\] must be a dict"),
    ("dense", lambda sd: _stamp_groups(sd, float("nan")), ValueError, "'steps_total' .* is a finite number"),
    ("dense", lambda sd: _stamp_groups(sd, torch.tensor([1.0, 2.0])), ValueError, "'steps_total' .* is a finite number"),
    ("dense", lambda sd: _stamp_groups(sd, None), ValueError, "has no 'steps_total'"),
    # the "childopt" entry without its seed (hand-made or trimmed)
    ("dense", lambda sd: sd["childopt"].pop("seed"), ValueError, "state_dict\\['childopt'\\] has no 'seed'"),
    # state under ids no group lists: keys turned to strings (JSON), or a stray id
    ("dense", lambda sd: sd.__setitem__("state", {str(k): v for k, v in sd["state"].items()}), ValueError,
     "state_dict\\['state'\\] has entries under \\['0', '1'\\], which are not ids in the param groups"),
    ("dense", lambda sd: sd["state"].__setitem__(99, copy.deepcopy(sd["state"][0])), ValueError,
     "has entries under \\[99\\], which are not ids"),
    # a saved amsgrad state that lost its max_exp_avg_sq (as DCP loses a key the target's state lacks)
    ("dense", _drop("max_exp_avg_sq"), ValueError, (f"loaded param group 0 has amsgrad=True, but its saved state for "
     f"{NAMED} holds no 'max_exp_avg_sq': torch.distributed.checkpoint .* build the optimizer with amsgrad=True")),
    ("dense", _set("step", torch.tensor(-5.0)), ValueError, f"'step' for {NAMED} must be in \\[0.0, inf\\), got -5"),
    ("dense", _set("step", torch.tensor(math.nan)), ValueError, "'step' .* must be in \\[0.0, inf\\), got nan"),
    ("dense", _set("step", 2.5), ValueError, "'step' .* must be a whole number, got 2.5"),
    ("dense", _set("step", "3"), TypeError, "'step' .* must be a number, got str"),
    ("dense", _drop("exp_avg_sq"), ValueError, f"state for {NAMED} has a 'step' but no \\['exp_avg_sq'\\]"),
    ("dense", _drop("step"), ValueError, "has \\['exp_avg', 'exp_avg_sq', 'max_exp_avg_sq'\\] but no 'step'"),
    ("dense", _set("exp_avg_sq", lambda s: -s["exp_avg_sq"] - 1), ValueError, "'exp_avg_sq' .* negative or NaN"),
    ("dense", _set("max_exp_avg_sq", lambda s: s["max_exp_avg_sq"] * math.nan), ValueError, "negative or NaN"),
    ("dense", _set("exp_avg", lambda s: s["exp_avg"].t()), ValueError, "'exp_avg' .* has shape \\(4, 6\\), expected \\(6, 4\\)"),
    ("dense", _set("exp_avg", [0.0] * 24), TypeError, "'exp_avg' .* must be a floating-point tensor, got list"),
    ("dense", _set("exp_avg", lambda s: s["exp_avg"].long()), TypeError, "got a torch.int64 tensor"),
    ("dense", _set("exp_avg_sq", lambda s: s["exp_avg_sq"].to("meta")), ValueError, "'exp_avg_sq' .* on the meta device"),
    ("dense", _set("mask", lambda s: s["mask"].float()), TypeError, "has dtype torch.float32, expected torch.bool"),
    ("dense", lambda sd: sd["state"].__setitem__(1, [1, 2]), TypeError,
     "saved state for param_groups\\[0\\]\\['params'\\]\\[1\\] \\(shape \\(9,\\)\\) must be a dict"),
    ("dense", _extras("mask_kind", "none"), ValueError, "mask_kind is 'none', but its state for .* holds a mask"),
    ("dense", _extras("seed", -1), ValueError, "state_dict\\['childopt'\\]\\['seed'\\]: seed must be an int"),
    ("dense", _extras("importance_steps", -2), TypeError,
     "state_dict\\['childopt'\\]\\['importance_steps'\\] must be None or an int >= 0, got -2"),
    ("dense", lambda sd: sd["param_groups"][0].__setitem__("lr", math.inf), ValueError,
     "lr \\(loaded param group 0\\) must be in \\[0.0, inf\\), got inf"),
    ("dense", lambda sd: sd["param_groups"][0]["params"].pop(), ValueError, "loaded param group 0 has 1 parameters"),
    ("dense", lambda sd: sd["param_groups"].append(dict(sd["param_groups"][0])), ValueError, "has 2 param groups"),
    ("dense", lambda sd: _drop_extras(sd), ValueError, "holds a mask, but the state_dict has no 'childopt' entry"),
    ("dense", lambda sd: sd["param_groups"][0].__setitem__("fused", "yes"), TypeError, "loaded param group 0: fused must be"),
    ("sparse", lambda sd: _drop_extras(sd), ValueError, "holds indices, but the state_dict has no 'childopt' entry"),
    ("sparse", _set("indices", lambda s: s["indices"] + 100), ValueError, "indices must be strictly increasing and inside"),
    ("sparse", _set("indices", lambda s: s["indices"].tolist()), TypeError, "'indices' for .* must be a tensor, got list"),
    ("sparse", _set("exp_avg", lambda s: torch.zeros(5)), ValueError, "'exp_avg' .* has shape \\(5,\\), expected \\("),
    ("sparse", _extras("mask_kind", "bernoulli"), ValueError, "mask_kind is 'bernoulli', but .* holds indices"),
]


def _fingerprint(opt):
    """Everything a load could change, deep-copied for comparison."""
    groups = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
    return copy.deepcopy((opt.state_dict()["state"], groups, opt.mask_kind, opt.seed))


def _equal(a, b):
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    return a == b


@pytest.mark.parametrize("storage,corrupt,error,match", CORRUPTIONS)
def test_a_bad_state_dict_is_refused_before_anything_changes(storage, corrupt, error, match):
    source, _ = _trained(storage)
    good = source.state_dict()
    bad = copy.deepcopy(good)
    corrupt(bad)
    target, params = _trained(storage)
    train(target, params, 1, start=5)  # differs from the saved state, so a partial load would show
    before = _fingerprint(target)
    with pytest.raises(error, match=match):
        target.load_state_dict(bad)
    assert _equal(_fingerprint(target), before)
    target.load_state_dict(good)
    train(target, params, 1, start=2)
    assert all(torch.isfinite(p).all() for p in params)


def test_a_valid_round_trip_still_loads_with_integer_and_tensor_steps():
    """torch saves ``step`` as a tensor; an int or a numpy integer (hand-written or older dicts) loads the same."""
    source, _ = _trained("dense")
    state_dict = source.state_dict()
    as_int, as_numpy = copy.deepcopy(state_dict), copy.deepcopy(state_dict)
    for a, b in zip(as_int["state"].values(), as_numpy["state"].values()):
        a["step"], b["step"] = int(a["step"]), np.int64(b["step"])
    for candidate in (state_dict, as_int, as_numpy):
        target, _ = _trained("dense")
        target.load_state_dict(candidate)
        assert all(target.state[p]["step"].item() == 2 for g in target.param_groups for p in g["params"])


def test_the_childopt_entry_survives_a_dict_of_only_state_and_groups():
    """torch.distributed.checkpoint's get_optimizer_state_dict keeps only these two: the groups'
    copy of ``"childopt"`` restores the mask kind and the Bernoulli seed, so the stream continues."""
    params = make_params(SHAPES)
    source = MaskedAdamW(params, lr=1e-2, mask="bernoulli", reserve_p=0.5, seed=11, backend="reference")
    train(source, params, 2)
    kept = copy.deepcopy({"state": source.state_dict()["state"], "param_groups": source.state_dict()["param_groups"]})
    # the released key set: a DCP load fails on a key of the target's groups that the checkpoint lacks
    assert set(kept["param_groups"][0]["childopt"]) == {"format", "mask_kind", "seed", "storage", "seed_drawn",
                                                        "importance_steps", "steps_total"}
    assert type(kept["param_groups"][0]["childopt"]["steps_total"]) is float
    resumed_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    resumed = MaskedAdamW(resumed_params, lr=1e-2, seed=99, backend="reference")
    resumed.load_state_dict(kept)
    assert resumed.seed == 11 and resumed.mask_kind == "bernoulli"
    assert all(g["childopt"] is None for g in resumed.param_groups)  # the key state_dict() fills
    train(source, params, 1, start=2)
    train(resumed, resumed_params, 1, start=2)
    assert all(torch.equal(a, b) for a, b in zip(params, resumed_params))


def test_groups_that_carry_different_childopt_entries_are_refused():
    opt, _ = _trained("dense")
    state_dict = opt.state_dict()
    del state_dict["childopt"]
    state_dict["param_groups"].append(dict(state_dict["param_groups"][0], childopt={"seed": 1}))
    with pytest.raises(ValueError, match="carry different 'childopt' entries"):
        opt.load_state_dict(state_dict)


def test_a_copy_that_torch_adamw_stepped_with_is_foreign():
    """torch's AdamW keeps unknown group keys, so a MaskedAdamW's group copy of ``"childopt"`` rides
    along; once AdamW has stepped, the stamp no longer matches and this optimizer's own settings stay,
    with a warning that says why (a dropped entry is never silent)."""
    params = make_params(SHAPES)
    source = MaskedAdamW(params, lr=1e-2, mask="bernoulli", reserve_p=0.5, seed=4, backend="reference")
    train(source, params, 2)
    adamw = torch.optim.AdamW(params, lr=1e-2)
    adamw.load_state_dict(source.state_dict())
    train(adamw, params, 1, start=2)
    target = MaskedAdamW(params, lr=1e-2, seed=77, backend="reference")
    with pytest.warns(UserWarning, match="'childopt' entry \\(mask_kind 'bernoulli', seed 4\\) was saved at fewer "
                      "steps than this state_dict holds: .* stepped it since"):
        target.load_state_dict(adamw.state_dict())
    assert (target.mask_kind, target.seed) == ("none", 77)
    assert all(target.state[p]["step"].item() == 3 for p in params)


def test_a_torch_adamw_dict_with_an_added_group_loads_as_foreign():
    """torch's AdamW keeps the group copy of a loaded childopt dict, and a group added with
    add_param_group has none: that is a foreign dict (its state loads, with a warning), not a merge."""
    params, extra = make_params(SHAPES), make_params([(3, 2)])
    source = MaskedAdamW(params, lr=1e-2, mask="bernoulli", reserve_p=0.5, seed=4, backend="reference")
    train(source, params, 2)
    adamw = torch.optim.AdamW(params, lr=1e-2)
    adamw.load_state_dict(source.state_dict())
    adamw.add_param_group({"params": extra})
    train(adamw, params + extra, 1, start=2)
    target = MaskedAdamW([{"params": params}, {"params": extra}], lr=1e-2, seed=77, backend="reference")
    with pytest.warns(UserWarning, match="1 of the 2 param groups carry no 'childopt' entry: .* add_param_group"):
        target.load_state_dict(adamw.state_dict())
    assert (target.mask_kind, target.seed) == ("none", 77)
    for p in params + extra:
        assert torch.equal(target.state[p]["exp_avg"], adamw.state[p]["exp_avg"])


def test_a_copy_whose_state_lost_entries_is_still_its_own(recwarn):
    """A load that skips states (DCP skips a frozen parameter's) holds fewer steps than the stamp: the
    copy is this optimizer's own, so its mask kind and seed load (they were once dropped silently)."""
    params = make_params(SHAPES)
    source = MaskedAdamW(params, lr=1e-2, mask="bernoulli", reserve_p=0.5, seed=4, backend="reference")
    train(source, params, 2)
    saved = copy.deepcopy(source.state_dict())
    del saved["childopt"], saved["state"][1]
    target = MaskedAdamW(make_params(SHAPES), lr=1e-2, seed=77, backend="reference")
    target.load_state_dict(saved)
    assert (target.mask_kind, target.seed) == ("bernoulli", 4)
    assert not [w for w in recwarn if "load_state_dict" in str(w.message)]


@pytest.mark.parametrize("built", [{}, {"mask": "bernoulli", "reserve_p": 0.5}])
def test_a_dense_state_whose_masks_are_gone_is_refused_by_a_target_without_masks(built):
    """What torch.distributed.checkpoint hands an optimizer built with mask=None (or a drawn mask): a
    dense mask_kind and no mask left, since it fills only the keys the target holds.  Trained on, every
    entry would move: refused, naming the fix; the dict with its masks still loads."""
    source, _ = _trained("dense")
    lost = copy.deepcopy(source.state_dict())
    for entry in lost["state"].values():
        entry.pop("mask", None)
    target = MaskedAdamW(make_params(SHAPES), amsgrad=True, seed=3, **built)
    with pytest.raises(ValueError, match=f"mask_kind is 'dense', but its state holds no mask \\(this optimizer was "
                       f"built with a '{built.get('mask', 'none')}' one and holds none\\): "
                       "torch.distributed.checkpoint loads only "
                       "the state keys .* with a mask on the same parameters"):
        target.load_state_dict(lost)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a drawn mask replaced: the warning has its own test
        target.load_state_dict(source.state_dict())
    assert target.mask_kind == "dense"


def test_a_state_saved_with_an_empty_mask_dict_loads_as_one_without_a_mask():
    """mask={} (dense, no parameter masked) trains every entry and saves the kind 'none': it loads into
    mask={} and mask=None alike.  Saved as 'dense' (before that), its state looks like one whose masks a
    DCP load lost: refused, naming how to load it."""
    params = make_params(SHAPES)
    source = MaskedAdamW(params, lr=1e-2, mask={}, seed=3)
    train(source, params, 2)
    saved = source.state_dict()
    assert saved["childopt"]["mask_kind"] == "none"
    for built, kind in (({}, "dense"), (None, "none")):  # each keeps its own way of training every entry
        target = MaskedAdamW(make_params(SHAPES), lr=1e-2, mask=built)
        target.load_state_dict(saved)
        assert (target.mask_kind, target.seed) == (kind, 3)
    earlier = copy.deepcopy(saved)
    earlier["childopt"]["mask_kind"] = "dense"
    with pytest.raises(ValueError, match="A plain load_state_dict of a state dict that an earlier childopt saved "
                       "with mask=\\{\\} \\(no mask at all, every entry trained\\): set its 'childopt' entry's "
                       "mask_kind to 'none'"):
        MaskedAdamW(make_params(SHAPES), lr=1e-2, mask={}).load_state_dict(earlier)


def test_a_childtuning_d_run_with_an_empty_mask_resumes_and_steps():
    """set_gradient_mask({}) trains every entry in ChildTuning-D; its state (saved as 'none') loads
    into the same set-up, which still steps, as the uninterrupted run does."""
    params = make_params(SHAPES)
    source = ChildTuningAdamW(params, lr=1e-2, mode="ChildTuning-D", seed=3, backend="reference")
    source.set_gradient_mask({})
    train(source, params, 2)
    saved = copy.deepcopy(source.state_dict())
    copies = [torch.nn.Parameter(p.detach().clone()) for p in params]
    target = ChildTuningAdamW(copies, lr=1e-2, mode="ChildTuning-D", seed=3, backend="reference")
    target.set_gradient_mask({})
    target.load_state_dict(saved)
    train(source, params, 1, start=2)
    train(target, copies, 1, start=2)
    assert all(torch.equal(p, q) for p, q in zip(params, copies))


def test_pickling_before_the_first_step_keeps_a_drawn_seed_drawn():
    """A drawn seed is replaced by rank 0's at the first step; a copy must still know it was drawn."""
    opt = MaskedAdamW(make_params(SHAPES), mask="bernoulli", reserve_p=0.5, backend="reference")
    for clone in (copy.deepcopy(opt), pickle.loads(pickle.dumps(opt))):
        assert clone._seed_drawn and clone.seed == opt.seed
    loaded = MaskedAdamW(make_params(SHAPES), seed=5, backend="reference")
    loaded.load_state_dict(opt.state_dict())
    assert loaded._seed_drawn and loaded.seed == opt.seed


@pytest.mark.parametrize("storage", ["dense", "sparse"])
def test_a_loaded_mask_that_replaces_the_built_one_warns_and_none_takes_it_silently(storage, recwarn):
    """The saved mask wins: over another kind, other masks of the same kind, or a mask on a parameter
    built to train fully, with a warning at the user's line; an optimizer built with mask=None or
    an empty dict takes it without one (the resume path)."""
    source, _ = _trained(storage)
    saved = source.state_dict()
    params = make_params(SHAPES)
    if storage == "dense":
        drawn = MaskedAdamW(params, reserve_p=0.5, mask="bernoulli", seed=3)
        with pytest.warns(UserWarning, match="built with a 'bernoulli' mask and the state_dict holds a 'dense' one"):
            drawn.load_state_dict(saved)
        assert drawn.mask_kind == "dense"
    other = MaskedAdamW(params, mask=masks_for(params[:1], seed=9), storage=storage, seed=3)
    with pytest.warns(UserWarning, match="saved masks of 1 parameters .* differ from those") as caught:
        other.load_state_dict(saved)
    assert caught[0].filename == __file__
    both = make_params(SHAPES)
    masks_both = MaskedAdamW(both, lr=1e-2, mask=masks_for(both), storage=storage, seed=11)  # params[0]'s mask too
    train(masks_both, both, 1)
    with pytest.warns(UserWarning, match=r"saved masks of 1 parameters \(param_groups\[0\]\['params'\]\[1\]"):
        MaskedAdamW(params, mask=masks_for(params[:1]), storage=storage, seed=3).load_state_dict(
            masks_both.state_dict())  # a parameter built to train fully comes back masked
    same = MaskedAdamW(params, mask=masks_for(params[:1]), storage=storage, seed=3)
    unmasked = MaskedAdamW(params, storage=storage, seed=3)
    empty = MaskedAdamW(params, mask={}, storage=storage, seed=3)
    recwarn.clear()
    same.load_state_dict(saved)
    unmasked.load_state_dict(saved)
    empty.load_state_dict(saved)
    assert not [w for w in recwarn if "load_state_dict" in str(w.message)]
    key = "mask" if storage == "dense" else "indices"
    assert torch.equal(unmasked.state[params[0]][key], source.state[source.param_groups[0]["params"][0]][key])


def test_a_mask_cast_by_a_torch_optimizer_is_refused_with_where_it_went():
    """torch.optim.AdamW's load_state_dict casts a childopt mask to float32; loading its state
    dict back names that cause instead of only the dtype."""
    params = make_params([(5, 3)])
    opt = MaskedAdamW(params, lr=1e-2, mask=masks_for(params, 0.5))
    train(opt, params, 1)
    torch_adamw = torch.optim.AdamW(params, lr=1e-2)
    torch_adamw.load_state_dict(opt.state_dict())
    with pytest.raises(TypeError, match="float32, expected torch.bool: a torch optimizer's load_state_dict casts"):
        MaskedAdamW(params, lr=1e-2).load_state_dict(torch_adamw.state_dict())


def _named_sparse(order, prefix=""):
    """A sparse-storage MaskedAdamW over an (6, 8) and an (8, 6) weight, listed in ``order``."""
    gen = torch.Generator().manual_seed(0)
    named = {"up.weight": torch.nn.Parameter(torch.randn(6, 8, generator=gen)),
             "down.weight": torch.nn.Parameter(torch.randn(8, 6, generator=gen))}
    masks = {prefix + name: torch.rand(p.shape, generator=gen) < 0.3 for name, p in named.items()}
    return MaskedAdamW([(prefix + name, named[name]) for name in order], lr=1e-2, mask=masks, storage="sparse")


def _stepped_state_dict(opt) -> dict:
    for p in [p for g in opt.param_groups for p in g["params"]]:
        p.grad = torch.ones_like(p)
    opt.step()
    return opt.state_dict()


def test_sparse_state_of_a_reordered_parameter_list_is_refused():
    """Sparse state keeps flat indices, not the shape they were selected in: a resumed script that
    lists (6, 8) and (8, 6) weights the other way round would pair each with the other's indices
    and moments, silently.  With named parameters the move shows, and is refused; listed in the
    saved order it loads."""
    saved = _stepped_state_dict(_named_sparse(["up.weight", "down.weight"]))
    swapped = _named_sparse(["down.weight", "up.weight"])
    with pytest.raises(ValueError, match=r"pairs its saved 'up.weight' with this optimizer's 'down.weight', and lists"):
        swapped.load_state_dict(saved)
    assert all(float(s["step"]) == 0 for s in swapped.state.values())
    _named_sparse(["up.weight", "down.weight"]).load_state_dict(saved)


def test_renamed_parameters_in_the_saved_order_load_and_keep_their_live_names():
    """Saved from a compiled model (names under '_orig_mod.'), resumed on the plain one: the same
    parameters in the same order load, and the groups keep the live names, which set_mask and
    sparse_indices() look parameters up by (torch's load would take the saved ones)."""
    saved = _stepped_state_dict(_named_sparse(["up.weight", "down.weight"], prefix="_orig_mod."))
    resumed = _named_sparse(["up.weight", "down.weight"])
    resumed.load_state_dict(saved)
    assert resumed.param_groups[0]["param_names"] == ["up.weight", "down.weight"]
    assert sorted(resumed.sparse_indices()) == ["down.weight", "up.weight"]
    assert all(float(s["step"]) == 1 for s in resumed.state.values())
