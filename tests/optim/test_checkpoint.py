"""State dicts saved before the optimizer became a package (childopt 0.1.0 at b64ecd5, written by
tests/data/state_dicts/make_childopt_0_1_0.py) load, and training continues exactly as the old
code continued it: same masks, same Bernoulli stream, same parameters bit for bit."""
from pathlib import Path

import pytest
import torch

from childopt import ChildTuningAdamW, MaskedAdamW

SAVED = Path(__file__).resolve().parents[1] / "data" / "state_dicts" / "childopt-0.1.0-b64ecd5.pt"
SHAPES = [(7, 5), (13,), (33,)]
BUILD = {
    "dense-none": lambda ps: MaskedAdamW(ps, lr=1e-2, weight_decay=0.1, backend="reference"),
    "dense-mask": lambda ps: MaskedAdamW(ps, lr=1e-2, weight_decay=0.1, backend="reference"),
    "bernoulli": lambda ps: MaskedAdamW(ps, lr=1e-2, weight_decay=0.1, backend="reference", mask="bernoulli",
                                        reserve_p=0.4, amsgrad=True),
    "sparse": lambda ps: MaskedAdamW(ps, lr=1e-2, weight_decay=0.1, backend="reference", storage="sparse"),
    "childtuning-f": lambda ps: ChildTuningAdamW(ps, lr=1e-2, weight_decay=0.1, reserve_p=0.3,
                                                 mode="ChildTuning-F", backend="reference"),
}


def _grads(step):
    gen = torch.Generator().manual_seed(1000 + step)
    return [torch.randn(s, generator=gen) for s in SHAPES]


@pytest.mark.parametrize("case", list(BUILD))
def test_an_old_format_state_dict_loads_and_continues_as_the_old_code_did(case):
    saved = torch.load(SAVED, weights_only=True)["cases"][case]
    params = [torch.nn.Parameter(p.clone()) for p in saved["params"]]
    opt = BUILD[case](params)
    opt.load_state_dict(saved["state_dict"])
    assert opt.mask_kind == saved["state_dict"]["childopt"]["mask_kind"]
    assert opt.seed == saved["state_dict"]["childopt"]["seed"]
    for t in range(3, 5):
        for p, g in zip(params, _grads(t)):
            p.grad = g
        opt.step()
    # Bitwise on the CPU that saved them; elsewhere torch's own CPU math (the reference backend's
    # lerp, the host pow/sqrt of the step scalars) may round an element one ulp apart (seen on an
    # AVX-512 Xeon: 1-2 elements, 1.1e-7 relative).  A lost mask, seed or moment moves entries by
    # about lr = 1e-2, five orders above this tolerance.
    for p, want in zip(params, saved["params_after_2_more"], strict=True):
        torch.testing.assert_close(p.detach(), want, rtol=2.5e-7, atol=0)
    assert "foreach" in opt.param_groups[0] and opt.param_groups[0]["capturable"] is False


def test_a_state_dict_saved_with_no_seed_loads_and_steps_alike():
    """Before an optimizer without a drawn mask got a seed at construction, its state dict (and its
    pickle) held ``seed: None``: it loads, keeps a seed of its own, and steps as the saving one."""
    import pickle

    from tests.helpers import make_params, train

    params, copies = make_params(SHAPES), make_params(SHAPES)
    opt = MaskedAdamW(params, lr=1e-2, weight_decay=0.1, backend="reference")
    train(opt, params, 2)
    saved = opt.state_dict()
    saved["childopt"]["seed"] = None
    for p, q in zip(copies, params):
        p.data.copy_(q.data)
    loaded = MaskedAdamW(copies, lr=1e-2, weight_decay=0.1, backend="reference")
    loaded.load_state_dict(saved)
    assert isinstance(loaded.seed, int)
    state = opt.__getstate__()
    state["seed"] = None
    unpickled = pickle.loads(pickle.dumps(opt))
    unpickled.__setstate__(state)
    assert isinstance(unpickled.seed, int)
    train(opt, params, 2, start=2)
    train(loaded, copies, 2, start=2)
    for p, q in zip(copies, params):
        assert torch.equal(p, q)
