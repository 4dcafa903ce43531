"""``python -m childopt bench`` end to end (one timed step per row), so the main job cannot rot."""
import json

import pytest

from childopt.bench import step, train
from childopt.bench.goals import format_goals, step_goals, training_goals
from childopt.bench.report import main, parse_args


def test_quick_bench_writes_every_row_the_training_rows_and_the_goals(tmp_path, capsys):
    out, png, md = tmp_path / "bench.json", tmp_path / "bench.png", tmp_path / "bench.md"
    argv = ["--quick", "--steps", "1", "--json", str(out), "--plot", str(png), "--markdown", str(md)]
    assert main(argv) == 0
    report = json.loads(out.read_text())
    keys = {spec.key for spec in step.ROWS}
    assert {row["key"] for row in report["rows"]} | {row["key"] for row in report["skipped"]} == keys
    for row in report["rows"]:
        assert row["it_s"] > 0 and row["peak_gb"] > 0 and row["gbps"] > 0
        spec = next(spec for spec in step.ROWS if spec.key == row["key"])
        assert row["bytes_per_step"] == round(row["numel"] * spec.bytes_per_element)
    assert report["meta"]["torch"] and report["copy_gbps"] > 0
    training = report["training"]
    assert {r["key"] for r in training["rows"]} | {r["key"] for r in training["skipped"]} == set(train.KINDS)
    assert all(r["it_s"] > 0 and r["peak_gb"] > 0 for r in training["rows"])
    by_key = {r["key"]: r for r in report["rows"]}
    goals = {g["goal"]: g for g in report["goals"]}
    loop = goals["ChildTuning-F: fused step vs the ChildTuning reference loop"]
    assert loop["value"] == pytest.approx(by_key["childtuning-f"]["it_s"] / by_key["childtuning-f-loop"]["it_s"])
    assert loop["met"] == (loop["value"] >= 10)
    trained = {r["key"]: r for r in training["rows"]}
    (memory,) = [g for g in report["goals"] if g["goal"].startswith("training peak GB")]
    assert memory["value"] == pytest.approx(trained["sparse-compact"]["peak_gb"] / trained["lora-r8"]["peak_gb"])
    expected = step_goals([step.Row(**r) for r in report["rows"]]) + \
        training_goals([train.TrainRow(**r) for r in training["rows"]])
    assert list(goals) == [g.goal for g in expected]
    printed = capsys.readouterr().out
    assert "x torch-" in printed and "training step" in printed and "goals" in printed
    assert png.stat().st_size > 10_000
    summary = md.read_text()
    assert f"python -m childopt bench {' '.join(argv)}" in summary and report["meta"]["torch"] in summary
    assert step.format_table([step.Row(**r) for r in report["rows"]], "torch-fused") in summary
    assert format_goals(expected) in summary


def test_bad_steps_are_refused_with_the_option_named(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--steps", "0"])
    assert "--steps must be >= 1" in capsys.readouterr().err
