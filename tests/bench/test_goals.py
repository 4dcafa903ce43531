"""The goal ratios against hand-computed values from made-up rows."""
import pytest

from childopt.bench.goals import format_goals, step_goals, training_goals
from childopt.bench.step import Row
from childopt.bench.train import TrainRow


def _row(key, it_s, pct_copy_bw=90.0):
    return Row(key=key, optimizer="opt", mode=key, backend="b", it_s=it_s, ms_per_step=1e3 / it_s, peak_gb=1.0,
               state_gb=0.5, bytes_per_step=1, gbps=1.0, numel=1, steps=1, pct_copy_bw=pct_copy_bw)


def _train(key, it_s, peak_gb):
    return TrainRow(key=key, optimizer="opt", mode=key, backend="b", it_s=it_s, ms_per_step=1e3 / it_s,
                    peak_gb=peak_gb, trained=1.0, steps=1)


def _goal(goals, text):
    (goal,) = [g for g in goals if text in g.goal]
    return goal


def test_step_goals_are_the_ratios_of_their_rows():
    rows = [_row("adamw-fused", 100.0), _row("masked-none", 50.0), _row("masked-dense-freeze", 96.0, 86.0),
            _row("masked-dense-zero_grad", 94.0, 84.0), _row("masked-bernoulli", 95.0),
            _row("childtuning-f", 90.0), _row("childtuning-f-loop", 10.0), _row("masked-sparse-0.05", 400.0)]
    goals = step_goals(rows)
    freeze = _goal(goals, "dense-freeze: speed")
    assert freeze.value == pytest.approx(0.96) and freeze.met
    assert _goal(goals, "dense-freeze: share").value == 86.0 and _goal(goals, "dense-freeze: share").met
    zero = _goal(goals, "zero_grad: speed")
    assert zero.value == pytest.approx(0.94) and zero.met is False
    assert _goal(goals, "zero_grad: share").met is False
    assert _goal(goals, "masked-bernoulli: speed").met  # 0.95 meets ">= 0.95" exactly
    loop = _goal(goals, "reference loop")
    assert loop.value == pytest.approx(9.0) and loop.met is False
    sparse = _goal(goals, "sparse 5%")  # 2.5 ms against 20 ms
    assert sparse.value == pytest.approx(0.125) and sparse.at_most and sparse.met


def test_a_goal_without_its_rows_says_which_is_missing():
    goals = step_goals([_row("masked-dense-freeze", 96.0)])
    speed = _goal(goals, "dense-freeze: speed")
    assert speed.value is None and speed.met is None and "adamw-fused" in speed.detail
    assert "n/a" in format_goals(goals)


def test_training_goals_compare_it_s_and_peak_memory():
    rows = [_train("adamw-fused", 10.0, 4.0), _train("child-tuning-d", 9.8, 4.1), _train("child-tuning-f", 9.6, 4.1),
            _train("sparse-compact", 8.0, 3.2), _train("lora-r8", 11.0, 3.0)]
    goals = training_goals(rows)
    assert _goal(goals, "Child-Tuning-D").value == pytest.approx(0.98) and _goal(goals, "Child-Tuning-D").met
    assert _goal(goals, "Child-Tuning-F").value == pytest.approx(0.96) and not _goal(goals, "Child-Tuning-F").met
    memory = _goal(goals, "peak GB")
    assert memory.value == pytest.approx(3.2 / 3.0) and memory.met
    table = format_goals(goals)
    assert "0.98x" in table and ">= 0.97x" in table and "<= 1.10x" in table and "NO" in table
