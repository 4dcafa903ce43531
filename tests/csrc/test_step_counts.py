"""childopt._C's step-count increment and read (csrc/cpu/step_counts.cpp) against
torch._foreach_add_ and ``.item()``, what they stand in for in the eager CPU step: the same values,
the same version bumps, and nothing read or changed for a count they do not take or while
something must observe the ops."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from childopt import MaskedAdamW
from childopt.optim.functional import advance_steps


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
    assert native_module._step_counts([]) == []


def test_read_gives_what_item_gives(native_module):
    values = [0.0, 1.0, 41.0, 2.0**24, 3.0e9]
    counts = _counts(values)
    versions = [c._version for c in counts]
    assert native_module._step_counts(counts) == [c.item() for c in counts] == values
    assert [c._version for c in counts] == versions  # a read bumps nothing


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

    assert native_module._step_counts(mixed) is None
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


class _Seen(TorchDispatchMode):
    """Records the aten ops dispatched under it."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


class _SeenFunctions(TorchFunctionMode):
    """Records the torch functions called under it."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.names.append(getattr(func, "__name__", str(func)))
        return func(*args, **(kwargs or {}))


class _Overriding(torch.Tensor):
    """A subclass with the keys of a plain tensor whose __torch_function__ sees every call."""

    calls: list = []

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        cls.calls.append(getattr(func, "__name__", str(func)))
        return super().__torch_function__(func, types, args, kwargs or {})


def test_a_dispatch_mode_sees_the_add(native_module):
    counts = _counts([1.0, 2.0])
    with _Seen() as mode:
        assert native_module._step_counts(counts) is None
        assert native_module._advance_step_counts(counts) is False
        advance_steps(counts)
    assert any("_foreach_add_" in op for op in mode.ops)
    assert [c.item() for c in counts] == [2.0, 3.0]


def test_a_torch_function_mode_sees_the_add(native_module):
    counts = _counts([1.0])
    with _SeenFunctions() as mode:
        advance_steps(counts)
    assert "_foreach_add_" in mode.names
    assert counts[0].item() == 2.0


def test_a_torch_function_subclass_is_refused(native_module):
    count = torch.tensor(4.0).as_subclass(_Overriding)
    assert native_module._step_counts([torch.tensor(1.0), count]) is None
    assert native_module._advance_step_counts([torch.tensor(1.0), count]) is False
    _Overriding.calls.clear()
    advance_steps([count])
    assert "_foreach_add_" in _Overriding.calls
    assert count.item() == 5.0


@pytest.mark.parametrize("first_call", ["inference_mode", "fake_tensors"])
def test_a_first_call_under_a_mode_leaves_later_steps_native(native_module, first_call):
    """The memory planner steps under FakeTensorMode, a user may step under inference_mode; neither
    that step nor a later real one may fail or lose the native path (a key set cached from the
    first call once did both)."""
    first = ("with torch.inference_mode():\n"
             "    assert m._advance_step_counts([torch.zeros(())]) is False\n") if first_call == "inference_mode" else ""
    script = (
        "import torch, childopt._native as n\n"
        "from torch._subclasses.fake_tensor import FakeTensorMode\n"
        "m = n.load()\n"
        + first +
        "with FakeTensorMode() as mode:\n"
        "    fake = [mode.from_tensor(torch.zeros(()))]\n"
        "    assert m._advance_step_counts(fake) is False\n"
        "    assert m._advance_step_counts([torch.zeros(())]) is False\n"
        "real = [torch.zeros(())]\n"
        "assert m._advance_step_counts(real) is True and real[0].item() == 1.0\n"
        "from childopt.memory import Setting, plan\n"
        "from tests.memory.configs import SMALL\n"
        "plan(SMALL['bert'](), 'ct-d', Setting(batch_size=1, seq_len=8))\n"
        "print('ok')\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).resolve().parents[2])
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().endswith("ok")


def test_a_torchscript_trace_records_the_add(native_module):
    def step_then_double(count):
        advance_steps([count])
        return count * 2

    traced = torch.jit.trace(step_then_double, torch.tensor(1.0))
    graph = str(traced.graph)
    assert "aten::_foreach_add_" in graph or "aten::add_" in graph  # the trace records foreach per tensor
    count = torch.tensor(1.0)
    assert traced(count).item() == 4.0
    assert count.item() == 2.0
