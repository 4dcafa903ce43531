"""torch.distributed.checkpoint resumes of MaskedAdamW in one process, against the uninterrupted run, bit for bit.

DCP fills only what the target optimizer already holds: the state keys of its parameters and, in
the flattened form (``flatten_optimizer_state_dict=True``), the keys of its live param groups.  So
the ``"childopt"`` entry (mask kind, Bernoulli seed) must ride in a key every live group has, and
a target that lacks a saved key (no mask, no amsgrad) must be refused, not trained without it.
"""
import zipfile
from pathlib import Path

import pytest
import torch

from childopt import ChildTuningAdamW, MaskedAdamW

dcp = pytest.importorskip("torch.distributed.checkpoint")
from torch.distributed.checkpoint import DefaultLoadPlanner  # noqa: E402
from torch.distributed.checkpoint.api import CheckpointException  # noqa: E402
from torch.distributed.checkpoint.state_dict import (  # noqa: E402
    StateDictOptions,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)

RELEASED = Path(__file__).resolve().parents[1] / "data" / "dcp" / "childopt-f7d63a5.zip"

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")  # one process, no process group


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Linear(5, 3))


FORMS = {"default": StateDictOptions(), "flattened": StateDictOptions(flatten_optimizer_state_dict=True),
         "full": StateDictOptions(full_state_dict=True)}


def _train(model, opt, start, stop):
    for t in range(start, stop):
        opt.zero_grad()
        x = torch.randn(4, 6, generator=torch.Generator().manual_seed(t))
        model(x).square().sum().backward()
        if t == 0:  # its step count lags: the saved parameters are at different steps
            model[1].bias.grad = None
        opt.step()


def _all_true(model):
    return {n: torch.ones_like(p, dtype=torch.bool) for n, p in model.named_parameters()}


def _masks(model):
    gen = torch.Generator().manual_seed(7)
    return {n: torch.rand(p.shape, generator=gen) < 0.4 for n, p in model.named_parameters()}


def _resume(build, path, form, freeze=False, steps=(3, 6)):
    """Train ``build(model)`` 3 steps, save with DCP (``form`` of FORMS), then run on and resume a fresh
    copy (built by ``build(model, True)``) from the save; return both (model, optimizer) pairs."""
    options = FORMS[form]
    model = _model()
    opt = build(model)
    _train(model, opt, 0, steps[0])
    dcp.save({"optim": get_optimizer_state_dict(model, opt, options=options)}, checkpoint_id=path)
    resumed = _model()
    resumed.load_state_dict(model.state_dict())
    if freeze:  # a tensor frozen on resume: DCP skips its state
        model[0].weight.requires_grad_(False)
        resumed[0].weight.requires_grad_(False)
    _train(model, opt, *steps)
    target = build(resumed, True)
    state = {"optim": get_optimizer_state_dict(resumed, target, options=options)}
    dcp.load(state, checkpoint_id=path)
    set_optimizer_state_dict(resumed, target, state["optim"], options=options)
    _train(resumed, target, *steps)
    return (model, opt), (resumed, target)


def _assert_bit_identical(run, resumed):
    (model, opt), (model2, opt2) = run, resumed
    for (name, p), q in zip(model.named_parameters(), model2.parameters()):
        assert torch.equal(p, q), name
        if p.requires_grad:
            for key, value in opt.state[p].items():
                assert torch.equal(value, opt2.state[q][key]), f"{name} {key}"
    assert (opt2.mask_kind, opt2.seed) == (opt.mask_kind, opt.seed)


@pytest.mark.parametrize("form", list(FORMS))
@pytest.mark.parametrize("into", ["other seed", "mask=None"])
@pytest.mark.parametrize("freeze", [False, True])
def test_a_bernoulli_run_resumes_with_its_seed(tmp_path, form, into, freeze):
    """The saved seed and mask kind win over the target's, in every form, and with a tensor frozen
    on resume (whose state DCP skips)."""
    def build(model, target=False):
        if target and into == "mask=None":
            return MaskedAdamW(model.named_parameters(), lr=1e-2)
        return MaskedAdamW(model.named_parameters(), lr=1e-2, mask="bernoulli", reserve_p=0.5, seed=4 if target else 3)

    _assert_bit_identical(*_resume(build, str(tmp_path), form, freeze))


@pytest.mark.parametrize("form", list(FORMS))
def test_sparse_state_resumes_into_a_target_that_lists_its_parameters_in_another_order(tmp_path, form):
    """DCP pairs parameters by name, so a target built on the parameters in reverse order resumes
    sparse state bit for bit (a plain load_state_dict pairs by position and refuses that order),
    and its groups keep its own names in its own order."""
    def build(model, target=False):
        named = list(model.named_parameters())
        masks = _masks(model)
        return MaskedAdamW(named[::-1] if target else named, lr=1e-2, mask=masks, storage="sparse")

    run, resumed = _resume(build, str(tmp_path), form)
    _assert_bit_identical(run, resumed)
    names = [n for n, _ in resumed[0].named_parameters()][::-1]
    assert resumed[1].param_groups[0]["param_names"] == names


@pytest.mark.parametrize("form", list(FORMS))
def test_a_fixed_mask_resumes_into_a_placeholder_mask_and_a_target_without_one_is_refused(tmp_path, form):
    """A Child-Tuning-D mask: into an optimizer built with mask=None, DCP would load no mask (the
    target's state has no key for it) and every entry would train; that is refused with the way out,
    which (all-True masks, replaced by the saved ones) then resumes bit for bit."""
    def build(model, target=False, placeholder=True):
        if not target:
            return MaskedAdamW(model.named_parameters(), lr=1e-2, mask=_masks(model))
        return MaskedAdamW(model.named_parameters(), lr=1e-2, mask=_all_true(model) if placeholder else None)

    with pytest.raises(ValueError, match="mask_kind is 'dense', but its state holds no mask \\(this optimizer was "
                       "built with a 'none' one and holds none\\): torch.distributed.checkpoint .* with a mask on the "
                       "same parameters .* all-True"):
        _resume(lambda model, target=False: build(model, target, placeholder=False), str(tmp_path / "none"), form)
    run, resumed = _resume(build, str(tmp_path / "all-true"), form)
    _assert_bit_identical(run, resumed)
    assert all(torch.equal(resumed[1].state[q]["mask"], run[1].state[p]["mask"])
               for p, q in zip(run[0].parameters(), resumed[0].parameters()))


@pytest.mark.parametrize("form", list(FORMS))
def test_a_fixed_mask_into_an_empty_mask_dict_is_refused(tmp_path, form):
    """mask={} (and set_gradient_mask({}) for ChildTuning-D) makes a dense optimizer that holds no
    mask: DCP would load none into it, as into mask=None, and every entry would train."""
    def masked(model, target=False):
        return MaskedAdamW(model.named_parameters(), lr=1e-2, mask={} if target else _masks(model))

    def childtuning(model, target=False):
        opt = ChildTuningAdamW(model.named_parameters(), lr=1e-2, mode="ChildTuning-D", seed=1)
        opt.set_gradient_mask({} if target else _masks(model))
        return opt

    for name, build in (("masked", masked), ("childtuning", childtuning)):
        with pytest.raises(ValueError, match="holds no mask \\(this optimizer was built with a 'dense' one and "
                           "holds none\\)"):
            _resume(build, str(tmp_path / name), form)


def test_a_partial_load_keeps_the_checkpoints_mask_kind_and_seed(tmp_path):
    """A parameter that had no gradient before the save has no saved state: DCP loads only with
    allow_partial_load, and its init step leaves that parameter at step 1 with zero moments.  That
    fresh state does not make the checkpoint's own entry look stale: the Bernoulli stream goes on."""
    model = _model()
    opt = MaskedAdamW(model.named_parameters(), lr=1e-2, mask="bernoulli", reserve_p=0.5, seed=3)
    for t in range(3):
        opt.zero_grad()
        model(torch.randn(4, 6, generator=torch.Generator().manual_seed(t))).square().sum().backward()
        model[1].bias.grad = None  # an unused head: no state saved for it
        opt.step()
    dcp.save({"optim": get_optimizer_state_dict(model, opt)}, checkpoint_id=str(tmp_path))
    resumed = _model()
    target = MaskedAdamW(resumed.named_parameters(), lr=1e-2)
    state = {"optim": get_optimizer_state_dict(resumed, target)}
    dcp.load(state, checkpoint_id=str(tmp_path), planner=DefaultLoadPlanner(allow_partial_load=True))
    set_optimizer_state_dict(resumed, target, state["optim"])
    assert (target.mask_kind, target.seed) == ("bernoulli", 3)
    for p, q in zip(model.parameters(), resumed.parameters()):
        if p is not model[1].bias:
            assert torch.equal(opt.state[p]["exp_avg"], target.state[q]["exp_avg"])


def test_a_childtuning_d_run_resumes_through_set_gradient_mask(tmp_path):
    """ChildTuningAdamW(mode='ChildTuning-D') cannot step (so DCP cannot build its state) without a
    mask: the error names set_gradient_mask; with an all-True one the saved mask replaces it."""
    def build(model, target=False, placeholder=True):
        opt = ChildTuningAdamW(model.named_parameters(), lr=1e-2, mode="ChildTuning-D", seed=1)
        if placeholder:
            opt.set_gradient_mask(_all_true(model) if target else _masks(model))
        return opt

    with pytest.raises(RuntimeError, match="needs set_gradient_mask"):
        _resume(lambda model, target=False: build(model, target, placeholder=not target), str(tmp_path / "none"),
                "default")
    _assert_bit_identical(*_resume(build, str(tmp_path / "all-true"), "default"))


@pytest.mark.parametrize("form", list(FORMS))
def test_amsgrad_state_is_not_rebuilt_when_the_target_lacks_it(tmp_path, form):
    """Saved with amsgrad=True, resumed into amsgrad=False: DCP loads no max_exp_avg_sq, which the
    step would silently rebuild from exp_avg_sq; refused, and amsgrad=True resumes bit for bit."""
    def build(model, target=False, amsgrad=True):
        return MaskedAdamW(model.named_parameters(), lr=1e-2, amsgrad=amsgrad)

    with pytest.raises(ValueError, match="amsgrad=True, but its saved state for parameter '0.weight' holds no "
                       "'max_exp_avg_sq': .* build the optimizer with amsgrad=True"):
        _resume(lambda model, target=False: build(model, target, amsgrad=not target), str(tmp_path / "off"), form)
    _assert_bit_identical(*_resume(build, str(tmp_path / "on"), form))


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    """The checkpoint childopt as released at f7d63a5 saved (tests/data/dcp/README.txt), unpacked, and
    the parameters each of its runs reached 2 steps after the save."""
    root = tmp_path_factory.mktemp("released")
    with zipfile.ZipFile(RELEASED) as archive:
        archive.extractall(root)
    return str(root / "checkpoint"), torch.load(root / "expected.pt", weights_only=True)


def _resume_released(released, run, form, keep=True):
    """Load run ``run`` ("d" or "f") of the released checkpoint in ``form``; ``keep=False``: into a
    target without what it saved (a mask for d, amsgrad for f)."""
    model = _model()
    dcp.load({f"model_{run}": model.state_dict()}, checkpoint_id=released[0])
    if run == "d" and keep:
        opt = ChildTuningAdamW(model.named_parameters(), lr=1e-2, mode="ChildTuning-D", seed=5, backend="reference")
        opt.set_gradient_mask(_all_true(model))
    else:
        opt = MaskedAdamW(model.named_parameters(), lr=1e-2, amsgrad=run == "f" and keep, seed=99, backend="reference")
    state = {f"optim_{run}_{form}": get_optimizer_state_dict(model, opt, options=FORMS[form])}
    dcp.load(state, checkpoint_id=released[0])
    set_optimizer_state_dict(model, opt, state[f"optim_{run}_{form}"], options=FORMS[form])
    return model, opt


@pytest.mark.parametrize("form", list(FORMS))
@pytest.mark.parametrize("run", ["d", "f"])
def test_a_checkpoint_of_the_released_code_resumes_as_its_run_went_on(released, run, form):
    """The groups' "childopt" keys are those it saved, so dcp.load fills them in every form (the
    flattened one too, which the released code itself resumed without its seed): the Child-Tuning-D
    mask replaces the all-True one, the Bernoulli seed the target's."""
    model, opt = _resume_released(released, run, form)
    assert (opt.mask_kind, opt.seed) == {"d": ("dense", 1), "f": ("bernoulli", 3)}[run]
    _train(model, opt, 3, 5)
    for name, p in model.named_parameters():  # bitwise here; an ulp apart on another CPU (test_checkpoint.py)
        torch.testing.assert_close(p.detach(), released[1][run][name], rtol=2.5e-7, atol=0)


@pytest.mark.parametrize("form", list(FORMS))
def test_a_released_checkpoint_into_a_target_that_would_lose_a_saved_key_is_refused(released, form):
    """What the released code saved tells the loss: a dense mask_kind with no mask left, an amsgrad
    group with no max_exp_avg_sq."""
    with pytest.raises(ValueError, match="mask_kind is 'dense', but its state holds no mask"):
        _resume_released(released, "d", form, keep=False)
    with pytest.raises(ValueError, match="amsgrad=True, but its saved state for parameter '0.weight' holds no "
                       "'max_exp_avg_sq'"):
        _resume_released(released, "f", form, keep=False)


@pytest.mark.parametrize("form", ["default", "flattened"])
@pytest.mark.parametrize("mask", [None, "bernoulli", "dense"])
def test_a_checkpoint_without_the_childopt_keys_loads_partially_as_a_torch_adamw_state_dict(tmp_path, form, mask):
    """A torch.optim.AdamW checkpoint lacks the "childopt" group keys (and reserve_p, masked): dcp.load
    stops at the first; with allow_partial_load they keep the target's values, and it resumes as a
    plain load_state_dict of AdamW's state dict does (the target's mask kind, masks, seed, reserve_p)."""
    model = _model()
    adamw = torch.optim.AdamW(model.parameters(), lr=1e-2)
    _train(model, adamw, 0, 3)
    dcp.save({"optim": get_optimizer_state_dict(model, adamw, options=FORMS[form])}, checkpoint_id=str(tmp_path))
    runs = []
    for through_dcp in (False, True):
        resumed = _model()
        resumed.load_state_dict(model.state_dict())
        opt = MaskedAdamW(resumed.named_parameters(), lr=1e-2, mask=_masks(resumed) if mask == "dense" else mask,
                          reserve_p=0.5 if mask else 1.0, seed=5)
        if through_dcp:
            state = {"optim": get_optimizer_state_dict(resumed, opt, options=FORMS[form])}
            with pytest.raises(CheckpointException, match="Missing key in checkpoint state_dict: optim\\."):
                dcp.load(state, checkpoint_id=str(tmp_path))
            dcp.load(state, checkpoint_id=str(tmp_path), planner=DefaultLoadPlanner(allow_partial_load=True))
            with pytest.warns(UserWarning, match="a partial torch.distributed.checkpoint load kept this optimizer's "
                              "own entry; it loads as a torch.optim.AdamW state dict"):
                set_optimizer_state_dict(resumed, opt, state["optim"], options=FORMS[form])
        else:
            opt.load_state_dict(adamw.state_dict())
        assert (opt.mask_kind, opt.seed, opt.param_groups[0]["reserve_p"]) == (mask or "none", 5, 0.5 if mask else 1.0)
        _train(resumed, opt, 3, 5)
        runs.append(resumed)
    assert all(torch.equal(p, q) for p, q in zip(*(run.parameters() for run in runs)))
