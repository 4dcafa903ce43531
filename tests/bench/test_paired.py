"""Paired ratios: every optimizer and torch fused AdamW step one parameter list in rotation."""
import dataclasses

import pytest
import torch

from childopt.bench import paired, step
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


@pytest.fixture
def tiny_list(monkeypatch):
    monkeypatch.setitem(step.SIZES, "24m", TINY)


def test_every_row_shares_the_parameters_and_gradients_and_leaves_the_gradients_alone(tiny_list, monkeypatch):
    """Each optimizer is built over the one list (so they share it), the gradients are the same
    after all the steps (no row may scale or zero them in place), and each ratio is the baseline's
    median over the row's."""
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
    assert [r.key for r in table.rows] + [s["key"] for s in table.skipped] == list(paired.KEYS)
    assert not table.skipped
    for row in table.rows:
        assert row.ms_per_step > 0 and row.x_fused == pytest.approx(table.baseline_ms / row.ms_per_step)
    assert (table.size, table.dtype, table.threads, table.rounds) == ("24m", "float32", torch.get_num_threads(), 3)


def test_the_table_prints_each_row_with_its_ratio():
    rows = [PairedRow("masked-bernoulli", "MaskedAdamW", "bernoulli p=0.3", "native", 12.5, 0.8)]
    table = PairedTable("24m", "float32", 2, 21, 10.0, rows, [])
    printed = paired.format_table(table)
    assert "MaskedAdamW" in printed and "12.50" in printed and "0.80x" in printed
    heading = paired.heading(table, all_threads=2)
    assert "24m list, float32, 2 threads (all)" in heading and "21 rounds" in heading and "10.00 ms" in heading
