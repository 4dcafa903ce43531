"""childopt._C's step-count increment (csrc/cpu/step_counts.cpp) against torch._foreach_add_,
the op it stands in for in the eager CPU step: the same values, the same version bumps, and
nothing changed for a count it does not take."""
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from childopt import MaskedAdamW


@pytest.fixture
def native_module(lane_on_cpu):
    lane_on_cpu("native")
    from childopt import _native

    return _native.load()


def _counts(values):
    return [torch.tensor(v, dtype=torch.float32) for v in values]


def test_advance_matches_foreach_add(native_module):
    values = [0.0, 1.0, 41.0, 2.0**24 - 1, 2.0**24, 3.0e9]  # the last two: +1 rounds away in float32, in both
    ours, torch_counts = _counts(values), _counts(values)
    versions = [c._version for c in ours]

    assert native_module._advance_step_counts(ours) is True
    torch._foreach_add_(torch_counts, 1.0)

    assert [c.item() for c in ours] == [c.item() for c in torch_counts]
    assert [c._version for c in ours] == [v + 1 for v in versions]


def test_empty_list_is_done(native_module):
    assert native_module._advance_step_counts([]) is True


@pytest.mark.parametrize("odd_one", ["float64", "one-dim", "requires_grad", "inference", "fake"])
def test_refuses_what_it_does_not_take_and_changes_nothing(native_module, odd_one):
    counts = _counts([3.0, 4.0])
    if odd_one == "float64":
        odd = torch.tensor(5.0, dtype=torch.float64)
    elif odd_one == "one-dim":
        odd = torch.tensor([5.0])
    elif odd_one == "requires_grad":
        odd = torch.tensor(5.0, requires_grad=True)
    elif odd_one == "inference":
        with torch.inference_mode():
            odd = torch.tensor(5.0)
    else:
        odd = FakeTensorMode().from_tensor(torch.tensor(5.0))
    mixed = counts[:1] + [odd] + counts[1:]

    assert native_module._advance_step_counts(mixed) is False
    assert [c.item() for c in counts] == [3.0, 4.0]
    if odd_one != "fake":
        assert odd.item() == 5.0


def test_optimizer_steps_count_without_torch_foreach_add(native_module, monkeypatch):
    """The eager native CPU step takes the one-call path, and its counts still reach n."""
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s)) for s in [(7, 5), (33,), (4, 4, 4)]]
    opt = MaskedAdamW(params, lr=1e-2, backend="native")

    def refuse(*args, **kwargs):
        raise AssertionError("torch._foreach_add_ called for plain CPU step counts")

    monkeypatch.setattr(torch, "_foreach_add_", refuse)
    for _ in range(3):
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
    assert [opt.state[p]["step"].item() for p in params] == [3.0, 3.0, 3.0]
