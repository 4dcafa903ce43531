"""Paired ratios: every optimizer and torch fused AdamW step one parameter list in rotation."""
import dataclasses

import pytest
import torch

from childopt.bench import paired, step
from childopt.bench.measure import Unavailable
from childopt.bench.paired import PairedRow, PairedTable, step_in_rotation

TINY = (1 / 24, 1)  # roberta_base_shapes(1/24, 1): ~0.2M parameters


class FakeClock:
    """A clock that only moves when a fake step advances it."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_rotation_starts_each_round_one_optimizer_later_and_times_each_call():
    clock, calls = FakeClock(), []

    def stepper(key, seconds):
        def call():
            calls.append(key)
            clock.now += seconds
        return call

    times = step_in_rotation({"a": stepper("a", 1.0), "b": stepper("b", 2.0), "c": stepper("c", 4.0)}, 4, clock)
    assert calls == list("abc" "bca" "cab" "abc")
    assert times == {"a": [1.0] * 4, "b": [2.0] * 4, "c": [4.0] * 4}
    calls.clear()
    times = step_in_rotation({"a": stepper("a", 1.0), "b": stepper("b", 2.0)}, 2, clock, before=stepper("e", 8.0))
    assert calls == list("eaeb" "ebea")
    assert times == {"a": [1.0] * 2, "b": [2.0] * 2}  # the untimed call is in no step's time


@pytest.fixture
def tiny_list(monkeypatch):
    monkeypatch.setitem(step.SIZES, "24m", TINY)


def test_every_row_shares_the_parameters_and_gradients_and_leaves_the_gradients_alone(tiny_list, monkeypatch):
    """Each optimizer is built over the one list (so they share it), and the gradients are the same
    after all the steps (no row may scale or zero them in place)."""
    built, made = [], step.make_params

    def make_params(*args, **kwargs):
        params = made(*args, **kwargs)
        built.append((params, [p.grad.clone() for p in params]))
        return params

    monkeypatch.setattr(paired, "make_params", make_params)
    handed = []

    def recording(spec):
        return dataclasses.replace(spec, make=lambda ps, backend: handed.append(ps) or spec.make(ps, backend))

    monkeypatch.setattr(step, "ROWS", tuple(recording(spec) for spec in step.ROWS))
    table = paired.run_paired("24m", torch.float32, torch.device("cpu"), rounds=3, warmup=1, backend="auto")
    ((params, grads),) = built
    assert len(handed) == 1 + len(paired.KEYS) and all(ps is params for ps in handed)
    assert all(torch.equal(p.grad, g) for p, g in zip(params, grads))
    assert [r.key for r in table.rows] == ["adamw-fused", *paired.KEYS] and not table.skipped
    assert all(row.ms_per_step > 0 for row in table.rows)
    assert (table.size, table.dtype, table.threads, table.rounds, table.baseline) == (
        "24m", "float32", torch.get_num_threads(), 3, "adamw-fused")


def test_a_ratio_is_the_baselines_median_step_over_the_rows(tiny_list, monkeypatch):
    """Made-up step times: torch fused 10, 30, 20 ms (median 20), mask=None 5, 5, 40 ms (median 5)
    and every other row 25 ms: mask=None 4x, the others 0.8x, the baseline 1x."""
    made_up = {"adamw-fused": [0.010, 0.030, 0.020], "masked-none": [0.005, 0.005, 0.040]}

    def rotation(steps, rounds, before):
        assert isinstance(before, paired.CacheEvictor)
        return {key: made_up.get(key, [0.025] * rounds) for key in steps}

    monkeypatch.setattr(paired, "step_in_rotation", rotation)
    table = paired.run_paired("24m", torch.float32, torch.device("cpu"), rounds=3, warmup=1, backend="auto")
    ratios = {row.key: (row.ms_per_step, row.x_fused) for row in table.rows}
    assert ratios["adamw-fused"] == (pytest.approx(20.0), pytest.approx(1.0))
    assert ratios["masked-none"] == (pytest.approx(5.0), pytest.approx(4.0))
    assert ratios["masked-bernoulli"] == (pytest.approx(25.0), pytest.approx(0.8))


def _failing(key, error):
    """step.ROWS with the row ``key`` raising ``error`` when built."""
    def make(params, backend):
        raise error
    return tuple(dataclasses.replace(spec, make=make) if spec.key == key else spec for spec in step.ROWS)


def test_a_row_that_cannot_run_here_is_skipped_with_the_reason_and_the_others_run(tiny_list, monkeypatch):
    monkeypatch.setattr(step, "ROWS", _failing("masked-bernoulli", Unavailable("needs a made-up package")))
    table = paired.run_paired("24m", torch.float32, torch.device("cpu"), rounds=2, warmup=1, backend="auto")
    assert table.skipped == [{"key": "masked-bernoulli", "optimizer": "MaskedAdamW", "mode": "bernoulli p=0.3",
                              "reason": "needs a made-up package"}]
    assert [r.key for r in table.rows] == ["adamw-fused", *(k for k in paired.KEYS if k != "masked-bernoulli")]


def test_an_fp32_failure_is_raised_and_a_bf16_one_skipped(tiny_list, monkeypatch):
    monkeypatch.setattr(step, "ROWS", _failing("masked-none", TypeError("made-up failure")))
    with pytest.raises(TypeError, match="made-up failure"):
        paired.run_paired("24m", torch.float32, torch.device("cpu"), rounds=2, warmup=1, backend="auto")
    table = paired.run_paired("24m", torch.bfloat16, torch.device("cpu"), rounds=2, warmup=1, backend="auto")
    (skip,) = table.skipped
    assert skip["key"] == "masked-none"
    assert skip["reason"] == "fails with bfloat16 parameters: TypeError: made-up failure"


def test_without_a_fused_kernel_the_baseline_is_foreach(tiny_list, monkeypatch):
    monkeypatch.setattr(step, "ROWS", _failing("adamw-fused", Unavailable("no fused kernel here")))
    table = paired.run_paired("24m", torch.float32, torch.device("cpu"), rounds=2, warmup=1, backend="auto")
    assert table.baseline == "adamw-foreach" and table.rows[0].key == "adamw-foreach"
    assert "x torch-foreach" in paired.format_table(table)


def test_the_table_prints_each_row_with_its_ratio():
    rows = [PairedRow("adamw-fused", "torch AdamW", "fused", "torch", 10.0, 1.0),
            PairedRow("masked-bernoulli", "MaskedAdamW", "bernoulli p=0.3", "native", 12.5, 0.8)]
    table = PairedTable("24m", "float32", 2, 21, "adamw-fused", rows, [])
    lines = paired.format_table(table).splitlines()
    assert lines[0].split()[-1] == "torch-fused"
    assert lines[3].split()[:2] == ["MaskedAdamW", "bernoulli"] and lines[3].split()[-2:] == ["12.50", "0.80x"]
    heading = paired.heading(table, all_threads=2)
    assert "24m list, float32, 2 threads (all)" in heading and "21 rounds" in heading
    assert "torch AdamW fused's median step" in heading


def _failing_step(key, error):
    """step.ROWS with the row ``key``'s optimizer raising ``error`` from ``step()`` (it builds)."""
    def failing(spec):
        def make(params, backend):
            opt = spec.make(params, backend)

            def fail(*args, **kwargs):
                raise error

            opt.step = fail
            return opt
        return dataclasses.replace(spec, make=make)
    return tuple(failing(spec) if spec.key == key else spec for spec in step.ROWS)


def test_a_fused_baseline_failing_on_bf16_gives_way_to_foreach_and_on_fp32_is_raised(tiny_list, monkeypatch):
    """As the step tables do: torch fused failing on bf16 parameters is skipped with the reason and
    foreach is the baseline; the same failure on fp32 is a bug and is raised."""
    monkeypatch.setattr(step, "ROWS", _failing_step("adamw-fused", RuntimeError("made-up bf16 failure")))
    table = paired.run_paired("24m", torch.bfloat16, torch.device("cpu"), rounds=2, warmup=1, backend="auto")
    assert table.baseline == "adamw-foreach" and table.rows[0].key == "adamw-foreach"
    assert [s["key"] for s in table.skipped] == ["adamw-fused"]
    assert "made-up bf16 failure" in table.skipped[0]["reason"]
    with pytest.raises(RuntimeError, match="made-up bf16 failure"):
        paired.run_paired("24m", torch.float32, torch.device("cpu"), rounds=2, warmup=1, backend="auto")


def test_without_any_baseline_the_table_says_why(tiny_list, monkeypatch):
    monkeypatch.setattr(step, "ROWS", _failing("adamw-fused", Unavailable("no fused kernel")))
    monkeypatch.setattr(step, "ROWS", _failing("adamw-foreach", Unavailable("no foreach either")))
    with pytest.raises(Unavailable, match="adamw-fused: no fused kernel; adamw-foreach: no foreach either"):
        paired.run_paired("24m", torch.float32, torch.device("cpu"), rounds=2, warmup=1, backend="auto")
