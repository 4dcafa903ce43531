"""The speed baseline must compute what ChildTuningAdamW computes, or the comparison is unfair."""
import pytest
import torch

from childopt import ChildTuningAdamW
from childopt.bench.baselines import ChildTuningReferenceAdamW
from tests.helpers import MIXED_SHAPES, clone_params, make_params, masks_for, train


@pytest.mark.parametrize("mode", [None, "ChildTuning-D"])
def test_loop_baseline_matches_child_tuning_adamw(mode):
    ours, theirs = make_params(MIXED_SHAPES), make_params(MIXED_SHAPES)
    hp = dict(lr=1e-2, weight_decay=0.01, mode=mode)
    opt, loop = ChildTuningAdamW(ours, seed=0, **hp), ChildTuningReferenceAdamW(theirs, **hp)
    if mode:
        masks = masks_for(ours)
        opt.set_gradient_mask(masks)
        loop.set_gradient_mask({t: masks[o] for o, t in zip(ours, theirs)})
    train(opt, ours, 20)
    train(loop, theirs, 20)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_loop_baseline_child_tuning_f_keeps_about_reserve_p_scaled_by_its_inverse():
    params = make_params([(200, 100)])
    loop = ChildTuningReferenceAdamW(params, lr=0.0, betas=(0.0, 0.999), mode="ChildTuning-F", reserve_p=0.3)
    train(loop, params, 1, grad_fn=lambda ps, t: [torch.ones_like(p) for p in ps])
    applied = params[0].grad
    assert abs((applied != 0).float().mean().item() - 0.3) < 0.02
    kept = applied[applied != 0]
    torch.testing.assert_close(kept, torch.full_like(kept, 1 / 0.3))
    with pytest.raises(ValueError, match="reserve_p"):
        ChildTuningReferenceAdamW(clone_params(params), reserve_p=0.0)
