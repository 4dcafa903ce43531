"""State dicts saved before the optimizer became a package (childopt 0.1.0 at b64ecd5, written by
tests/data/state_dicts/make_childopt_0_1_0.py) load, and training continues exactly as the old
code continued it: same masks, same Bernoulli stream, same parameters bit for bit."""
from pathlib import Path

import pytest
import torch

from childopt import ChildTuningAdamW, MaskedAdamW
from tests.helpers import assert_all_equal

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
    assert_all_equal([p.detach() for p in params], saved["params_after_2_more"])
    assert "foreach" in opt.param_groups[0] and opt.param_groups[0]["capturable"] is False
