"""The step-scalar rows of childopt.optim.functional: the host arithmetic of the eager CPU step
against the float64 tensor ops every other step takes (the oracle: the same formula on tensors,
as compiled and capturable steps run it), and where the host path may run at all."""
import math

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.overrides import TorchFunctionMode

from childopt.backends.contract import COLUMN
from childopt.optim import functional

# Columns with a power of beta in them: torch's vectorised pow and the C library's may differ in
# the last float64 bit there (never after the rounding to fp32 every backend applies).
POW_COLUMNS = [COLUMN["step_size"], COLUMN["bc2_sqrt"]]


@pytest.fixture
def native_loaded(lane_on_cpu):
    lane_on_cpu("native")
    from childopt import _native

    return _native.load()


def _rows(counts, rng_bases, host: bool, monkeypatch, **hyper):
    taken = []
    real_host_rows = functional._host_rows
    monkeypatch.setattr(functional, "_host_rows", lambda *a, **k: taken.append(True) or real_host_rows(*a, **k))
    if not host:
        monkeypatch.setattr(functional, "_host_counts", lambda *a, **k: None)
    steps = [torch.tensor(c, dtype=torch.float32) for c in counts]
    rows = functional.step_scalar_rows(steps, rng_bases, device="cpu", **hyper)
    monkeypatch.undo()
    assert taken == ([True] if host else [])
    return rows


@pytest.mark.parametrize("rule", functional.RULES)
@pytest.mark.parametrize("counts", [[5.0] * 7, [0.0, 3.0, 3.0, 1e6, 0.0, 2.0**24, 41.0]], ids=["equal", "mixed"])
@pytest.mark.parametrize("betas,maximize,grad_scale", [((0.9, 0.999), False, 1.0), ((0.3, 0.98), True, 1 / 0.3)])
def test_host_rows_equal_the_tensor_rows(native_loaded, monkeypatch, rule, counts, betas, maximize, grad_scale):
    hyper = dict(lr=3e-4, betas=betas, eps=1e-8, weight_decay=0.01, maximize=maximize, grad_scale=grad_scale,
                 rule=rule)
    rng_bases = [k * 2**33 + 7 for k in range(len(counts))]  # past 2**32, exact in float64
    host = _rows(counts, rng_bases, True, monkeypatch, **hyper)
    tensor = _rows(counts, rng_bases, False, monkeypatch, **hyper)
    assert host.dtype == tensor.dtype == torch.float64 and host.shape == tensor.shape == (len(counts), len(COLUMN))
    assert torch.equal(host.float(), tensor.float())
    others = [c for c in range(len(COLUMN)) if c not in POW_COLUMNS]
    assert torch.equal(host[:, others], tensor[:, others])
    ulp = torch.finfo(torch.float64).eps * tensor[:, POW_COLUMNS].abs()
    assert ((host[:, POW_COLUMNS] - tensor[:, POW_COLUMNS]).abs() <= ulp).all()
    assert host[:, COLUMN["step"]].tolist() == [c + 1 for c in counts]
    assert host[:, COLUMN["rng_base"]].tolist() == [float(b) for b in rng_bases]


def test_a_count_past_float32s_integers_is_the_count_the_tensor_holds(native_loaded, monkeypatch):
    """2**24 + 1 is stored as 2**24 in the float32 count: both paths step from what is stored."""
    hyper = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, maximize=False, grad_scale=1.0,
                 rule="adamw")
    host = _rows([2.0**24 + 1], [0], True, monkeypatch, **hyper)
    assert host[0, COLUMN["step"]].item() == 2.0**24 + 1  # the stored 2**24, plus this step


class _Watching(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


HYPER = (1e-3, 0.9, 0.999, 1e-8, 0.01, 1.0)  # lr, beta1, beta2, eps, weight_decay, grad_scale


@pytest.mark.parametrize("case", ["tensor lr", "tensor beta2", "tensor eps", "tensor weight_decay",
                                  "tensor rng bases", "device cuda", "torch function mode", "fake counts",
                                  "float64 count"])
def test_the_host_path_is_not_taken_where_something_must_see_the_ops(native_loaded, case):
    steps, bases, device = [torch.tensor(2.0), torch.tensor(2.0)], [0, 64], "cpu"
    hyper = list(HYPER)
    if case.startswith("tensor") and case != "tensor rng bases":
        where = ["lr", "beta1", "beta2", "eps", "weight_decay"].index(case.split()[1])
        hyper[where] = torch.tensor(hyper[where])
    elif case == "tensor rng bases":
        bases = [torch.tensor(0.0, dtype=torch.float64), torch.tensor(64.0, dtype=torch.float64)]
    elif case == "device cuda":
        device = torch.device("cuda")
    elif case == "float64 count":
        steps[1] = torch.tensor(2.0, dtype=torch.float64)
    if case == "torch function mode":
        with _Watching():
            assert functional._host_counts(steps, bases, device, tuple(hyper)) is None
    elif case == "fake counts":
        with FakeTensorMode() as mode:
            fake = [mode.from_tensor(s) for s in steps]
            assert functional._host_counts(fake, bases, device, tuple(hyper)) is None
    else:
        assert functional._host_counts(steps, bases, device, tuple(hyper)) is None
    assert functional._host_counts([torch.tensor(2.0)] * 2, [0, 64], "cpu", HYPER) == [2.0, 2.0]


def test_tensor_hyper_parameters_give_the_rows_numbers_give(native_loaded, monkeypatch):
    """A one-element tensor beta, eps or weight decay (torch.optim.AdamW takes them) keeps the
    tensor path, whose rows equal those of the same values as numbers."""
    numbers = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01, maximize=False, grad_scale=1.0,
                   rule="adamw")
    tensors = dict(numbers, betas=(0.9, torch.tensor(0.999, dtype=torch.float64)),
                   eps=torch.tensor(1e-8, dtype=torch.float64), weight_decay=torch.tensor(0.01, dtype=torch.float64))
    by_numbers = _rows([3.0, 3.0], [0, 64], False, monkeypatch, **numbers)
    monkeypatch.setattr(functional, "_host_rows", lambda *a, **k: pytest.fail("host rows for tensor hyper-parameters"))
    by_tensors = functional.step_scalar_rows([torch.tensor(3.0)] * 2, [0, 64], device="cpu", **tensors)
    assert torch.equal(by_numbers, by_tensors)


def test_without_the_native_module_the_rows_are_tensor_ops(monkeypatch):
    monkeypatch.setattr(functional._native, "loaded", lambda: (None, "not built"))
    assert functional._host_counts([torch.tensor(2.0)], [0], "cpu", HYPER) is None


def test_a_nan_count_gives_nan_rows_as_the_tensor_ops_do(native_loaded, monkeypatch):
    """A corrupted count must not crash the host path: its rows are NaN where the formula uses it."""
    hyper = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01, maximize=False, grad_scale=1.0,
                 rule="adamw")
    counts = [math.nan, 4.0, math.nan]
    host = _rows(counts, [0, 64, 128], True, monkeypatch, **hyper)
    tensor = _rows(counts, [0, 64, 128], False, monkeypatch, **hyper)
    assert torch.equal(host.isnan(), tensor.isnan()) and host.isnan()[:, COLUMN["step"]].tolist() == [True, False, True]
    assert torch.equal(host[1].float(), tensor[1].float())


def test_numpy_float32_hyper_parameters_compute_in_float64_on_both_paths(native_loaded, monkeypatch):
    """An LR scheduler's lambda may return np.float32; numpy keeps float32 arithmetic for it, which
    made the host rows differ from the tensor ops (and so eager from compiled steps)."""
    np = pytest.importorskip("numpy")
    for rule in functional.RULES:
        hyper = dict(lr=np.float32(1e-3), betas=(np.float32(0.9), 0.999), eps=np.float32(1e-8),
                     weight_decay=np.float16(0.01), maximize=False, grad_scale=1.0, rule=rule)
        counts = [float(c) for c in range(0, 200, 3)]
        host = _rows(counts, list(range(len(counts))), True, monkeypatch, **hyper)
        tensor = _rows(counts, list(range(len(counts))), False, monkeypatch, **hyper)
        assert torch.equal(host.float(), tensor.float()), rule
        as_floats = _rows(counts, list(range(len(counts))), True, monkeypatch,
                          **{**hyper, "lr": float(hyper["lr"]), "betas": (float(np.float32(0.9)), 0.999),
                             "eps": float(hyper["eps"]), "weight_decay": float(hyper["weight_decay"])})
        assert torch.equal(host, as_floats)


@pytest.mark.parametrize("shape", [(1,), (1, 1)])
@pytest.mark.parametrize("capturable_rows", [False, True], ids=["host counts", "tensor ops"])
def test_a_one_element_lr_or_eps_of_any_shape_is_spread_over_the_bucket(native_loaded, monkeypatch, capturable_rows,
                                                                        shape):
    """torch.optim.AdamW takes lr=torch.tensor([1e-3]) or [[1e-3]]; their columns (decay, and the
    uncorrected rule's step size) must spread over the bucket, not fail the stack or broadcast it."""
    for rule in functional.RULES:
        hyper = dict(betas=(0.9, 0.999), weight_decay=0.01, maximize=False, grad_scale=1.0, rule=rule)
        steps = [torch.tensor(2.0)] * 3
        tensors = dict(lr=torch.full(shape, 1e-3), eps=torch.full(shape, 1e-8, dtype=torch.float64))
        if capturable_rows:
            rows = functional.step_scalar_rows(steps, [torch.tensor(float(b), dtype=torch.float64) for b in (0, 8, 16)],
                                               device="cpu", **tensors, **hyper)
        else:
            rows = functional.step_scalar_rows(steps, [0, 8, 16], device="cpu", **tensors, **hyper)
        by_number = _rows([2.0] * 3, [0, 8, 16], False, monkeypatch, lr=torch.tensor(1e-3).item(), eps=1e-8, **hyper)
        assert rows.shape == (3, len(COLUMN)) and torch.equal(rows.float(), by_number.float()), rule
