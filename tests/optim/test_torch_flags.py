"""torch.optim.AdamW's implementation flags on MaskedAdamW and ChildTuningAdamW: accepted,
honoured or mapped onto backends as the docstring says, refused with the reason otherwise."""
import pickle

import pytest
import torch

from childopt import ChildTuningAdamW, MaskedAdamW, backends
from tests.helpers import assert_all_equal, make_params, snapshot, train


def test_fused_true_needs_a_kernel_backend_and_auto_never_settles_for_the_reference(monkeypatch):
    with pytest.raises(ValueError, match="fused=True needs a kernel backend"):
        MaskedAdamW(make_params([(3,)]), fused=True, backend="reference")
    monkeypatch.setattr(backends, "check_ready", lambda module, device: (module.NAME == "reference", "test"))
    with pytest.raises(RuntimeError, match="no backend can run on cpu: native: test; triton: .*reference: excluded"):
        MaskedAdamW(make_params([(3,)]), fused=True, seed=0)


def test_childopt_backend_cannot_turn_fused_true_into_the_reference(monkeypatch):
    monkeypatch.setenv("CHILDOPT_BACKEND", "reference")
    with pytest.raises(ValueError, match="CHILDOPT_BACKEND='reference' names a backend this optimizer excludes"):
        MaskedAdamW(make_params([(3,)]), fused=True, seed=0)
    assert MaskedAdamW(make_params([(3,)]), seed=0).backend_name() == "reference"  # without fused=True it holds


def test_fused_true_takes_native_on_cpu(lane_on_cpu):
    lane_on_cpu("native")
    opt = MaskedAdamW(make_params([(3,)]), fused=True, seed=0)
    assert opt.backend_name() == "native"
    opt.load_state_dict(opt.state_dict())  # the choice survives a load (torch calls __setstate__)
    assert opt._backend_exclude == ("reference",)


@pytest.mark.parametrize("flags", [{"foreach": False}, {"fused": False}])
def test_foreach_or_fused_false_select_the_one_tensor_at_a_time_reference(flags):
    assert MaskedAdamW(make_params([(3,)]), seed=0, **flags).backend_name() == "reference"
    with pytest.raises(ValueError, match="contradict backend='native'"):
        MaskedAdamW(make_params([(3,)]), seed=0, backend="native", **flags)


def test_foreach_true_changes_nothing():
    ours, theirs = make_params([(7, 5), (13,)]), make_params([(7, 5), (13,)])
    a = MaskedAdamW(ours, lr=1e-2, foreach=True, backend="reference", seed=0)
    b = MaskedAdamW(theirs, lr=1e-2, backend="reference", seed=0)
    train(a, ours, 3)
    train(b, theirs, 3)
    assert_all_equal(snapshot(a, ours), snapshot(b, theirs))


@pytest.mark.parametrize("cls", [MaskedAdamW, ChildTuningAdamW])
def test_bad_flags_are_clear_errors(cls):
    with pytest.raises(ValueError, match="differentiable=True is not supported"):
        cls(make_params([(3,)]), differentiable=True)
    with pytest.raises(ValueError, match="fused=True and foreach=True cannot be set together"):
        cls(make_params([(3,)]), fused=True, foreach=True)
    with pytest.raises(TypeError, match="capturable must be a bool"):
        cls(make_params([(3,)]), capturable="yes")


@pytest.mark.parametrize("flags,error,match", [
    (dict(differentiable=True), ValueError, r"differentiable=True is not supported.*\(param group 0\)"),
    (dict(foreach=True, fused=True), ValueError, "cannot be set together"),
    (dict(fused="yes"), TypeError, r"fused must be None or a bool, got 'yes' \(param group 0\)"),
    (dict(foreach=False), ValueError, r"foreach=False \(param group 0\) differs from the optimizer's foreach=None"),
])
@pytest.mark.parametrize("cls", [MaskedAdamW, ChildTuningAdamW])
def test_a_group_s_flags_are_checked_as_the_constructor_s(cls, flags, error, match):
    """A group's differentiable would be ignored, and its foreach/fused could not pick a backend
    for that group alone (one backend serves every group): refused, from the constructor's group
    dicts and from add_param_group, which then leaves the optimizer as it was."""
    with pytest.raises(error, match=match):
        cls([dict(params=make_params([(3,)]), **flags)])
    opt = cls(make_params([(3,)]))
    with pytest.raises(error, match=match.replace("group 0", "group 1")):
        opt.add_param_group(dict(params=make_params([(3,)]), **flags))
    assert len(opt.param_groups) == 1


@pytest.mark.parametrize("option", [dict(amsgrad=True), dict(maximize=True), dict(masked="freeze")])
def test_child_tuning_refuses_a_group_option_the_published_arithmetic_lacks(option):
    (key, value), = option.items()
    with pytest.raises(ValueError, match=f"{key}={value!r} \\(param group 0\\): ChildTuningAdamW runs the published"):
        ChildTuningAdamW([dict(params=make_params([(3,)]), **option)], mode="ChildTuning-F", reserve_p=0.5)


def test_capturable_matches_the_eager_host_scalars():
    """Device-side (here CPU-tensor) scalars give the same parameters as host-built ones."""
    ours, theirs = make_params([(7, 5), (13,)]), make_params([(7, 5), (13,)])
    a = MaskedAdamW(ours, lr=1e-2, mask="bernoulli", reserve_p=0.5, seed=3, capturable=True, backend="reference")
    b = MaskedAdamW(theirs, lr=1e-2, mask="bernoulli", reserve_p=0.5, seed=3, backend="reference")
    train(a, ours, 4)
    train(b, theirs, 4)
    assert_all_equal(snapshot(a, ours), snapshot(b, theirs))


def test_an_optimizer_pickled_with_string_mask_kinds_unpickles():
    """childopt 0.1.0 pickled ``_mask_kind`` as a string and had no backend exclusions."""
    params = make_params([(5,)])
    opt = MaskedAdamW(params, mask="bernoulli", reserve_p=0.5, seed=1, backend="reference")
    state = opt.__getstate__()
    state["_mask_kind"] = "bernoulli"
    del state["_backend_exclude"]
    clone = MaskedAdamW.__new__(MaskedAdamW)
    clone.__setstate__(state)
    assert clone.mask_kind == "bernoulli" and clone._backend_exclude == ()
    assert pickle.loads(pickle.dumps(opt)).mask_kind == "bernoulli"


@pytest.mark.parametrize("flags,error", [({"capturable": "yes"}, TypeError), ({"differentiable": True}, ValueError),
                                         ({"fused": True, "foreach": True}, ValueError)])
def test_a_state_dict_with_bad_flags_is_refused_before_anything_changes(flags, error):
    params = make_params([(5,)])
    opt = MaskedAdamW(params, lr=1e-2, seed=0, backend="reference")
    train(opt, params, 1)
    saved = opt.state_dict()
    saved["param_groups"][0].update(flags, lr=0.5)
    with pytest.raises(error):
        opt.load_state_dict(saved)
    assert opt.param_groups[0]["lr"] == 1e-2 and opt.param_groups[0]["capturable"] is False


@pytest.mark.parametrize("cls", [MaskedAdamW, ChildTuningAdamW])
@pytest.mark.parametrize("flags,error,match", [
    (dict(differentiable=True), ValueError, r"differentiable=True is not supported.*\(param group 1\)"),
    (dict(fused=True), ValueError, r"fused=True \(param group 1\) differs from the optimizer's fused=None"),
    (dict(foreach="no"), TypeError, r"foreach must be None or a bool, got 'no' \(param group 1\)"),
])
def test_a_group_s_flags_edited_after_construction_are_refused_at_the_step(cls, flags, error, match):
    """step() checks a live group's flags as the constructor does: an edited differentiable or
    fused would otherwise be ignored.  Refused before any group is written."""
    params = make_params([(3,), (4,)])
    opt = cls([dict(params=params[:1]), dict(params=params[1:])])
    opt.param_groups[1].update(flags)
    before = [p.detach().clone() for p in params]
    with pytest.raises(error, match=match):
        train(opt, params, 1)
    assert_all_equal([p.detach() for p in params], before)


@pytest.mark.parametrize("option", [dict(amsgrad=True), dict(maximize=True), dict(masked="freeze")])
def test_child_tuning_refuses_a_group_option_edited_in_after_construction(option):
    """What the constructor refuses (the published arithmetic has no amsgrad, maximize or freeze)
    is refused at the step too, instead of changing the update."""
    params = make_params([(3,)])
    opt = ChildTuningAdamW(params, mode="ChildTuning-F", reserve_p=0.5)
    opt.param_groups[0].update(option)
    (key, value), = option.items()
    with pytest.raises(ValueError, match=f"{key}={value!r} \\(param group 0\\): ChildTuningAdamW runs the published"):
        train(opt, params, 1)


def test_a_torch_fused_adamw_state_dict_loads_and_the_groups_keep_this_optimizer_s_flags():
    """foreach/fused picked the backend when the optimizer was built: torch's fused=True loads
    (the move from torch's fused AdamW), and the group then says what runs (fused=None)."""
    params = make_params([(5,)])
    source = torch.optim.AdamW(make_params([(5,)]), lr=1e-2, fused=True)
    train(source, source.param_groups[0]["params"], 2)
    opt = MaskedAdamW(params, lr=1e-2, backend="reference")
    opt.load_state_dict(source.state_dict())
    assert opt.param_groups[0]["fused"] is None and opt.param_groups[0]["foreach"] is None
    train(opt, params, 1)


@pytest.mark.parametrize("source", ["masked-dict", "torch-amsgrad"])
def test_child_tuning_refuses_a_state_dict_whose_groups_its_arithmetic_lacks(source):
    """A MaskedAdamW(mask=...) checkpoint saves masked=None (freeze), torch's AdamW(amsgrad=True)
    amsgrad=True: ChildTuningAdamW's constructor refuses both, so its load does, changing nothing."""
    donor_params = make_params([(6,)])
    if source == "masked-dict":
        donor = MaskedAdamW(donor_params, lr=1e-2, mask={donor_params[0]: torch.arange(6) % 2 == 0})
        match = r"masked=None \(loaded param group 0\): ChildTuningAdamW runs the published"
    else:
        donor = torch.optim.AdamW(donor_params, lr=1e-2, amsgrad=True)
        match = r"amsgrad=True \(loaded param group 0\): ChildTuningAdamW runs the published"
    train(donor, donor_params, 2)
    params = make_params([(6,)])
    opt = ChildTuningAdamW(params, lr=1e-3, mode="ChildTuning-D")
    opt.set_gradient_mask({params[0]: torch.ones(6, dtype=torch.bool)})
    with pytest.raises(ValueError, match=match):
        opt.load_state_dict(donor.state_dict())
    assert opt.param_groups[0]["lr"] == 1e-3 and float(opt.state[params[0]]["step"]) == 0


def test_an_optimizer_pickled_with_a_loaded_fused_flag_in_its_groups_unpickles_and_steps():
    """A load before this release kept a torch fused AdamW state dict's fused=True in the groups,
    which the step now refuses as an edit: unpickling gives the groups the optimizer's own flags."""
    params = make_params([(5,)])
    opt = MaskedAdamW(params, lr=1e-2, backend="reference")
    opt.param_groups[0]["fused"] = True
    clone = pickle.loads(pickle.dumps(opt))
    assert clone.param_groups[0]["fused"] is None
    train(clone, clone.param_groups[0]["params"], 1)
