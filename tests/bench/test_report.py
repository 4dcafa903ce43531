"""``python -m childopt bench``: end to end at a tiny size (so the main job cannot rot), and on
made-up measurements whose ratios, table cells and goals are worked out by hand."""
import json

import pytest

from childopt.bench import measure, step, train
from childopt.bench.report import main, parse_args
from tests.bench.helpers import BYTES_PER_ELEMENT, fake_row


def run_main(tmp_path, capsys, *options):
    """``main(["--quick", "--steps", "1", *options])`` writing JSON and markdown: (report, markdown, stdout)."""
    out, md = tmp_path / "bench.json", tmp_path / "bench.md"
    assert main(["--quick", "--steps", "1", "--json", str(out), "--markdown", str(md), *options]) == 0
    return json.loads(out.read_text()), md.read_text(), capsys.readouterr().out


def goal(report, text):
    """(value, met) of the one goal of ``report`` whose name contains ``text``."""
    (found,) = [g for g in report["goals"] if text in g["goal"]]
    return found["value"], found["met"]


def test_quick_bench_runs_every_row_and_writes_every_output(tmp_path, capsys, monkeypatch):
    """Every step row and training kind is measured or skipped with a reason; the numbers are
    positive, the byte model is charged per element, and JSON, markdown and plot are written."""
    monkeypatch.setitem(step.SIZES, ("cpu", True), (1 / 24, 1, 1))  # ~0.2M parameters: a smoke run
    monkeypatch.setattr(measure, "WARMUP", 1)
    png = tmp_path / "bench.png"
    report, summary, printed = run_main(tmp_path, capsys, "--device", "cpu", "--plot", str(png))
    assert {r["key"] for r in report["rows"]} | {r["key"] for r in report["skipped"]} == {s.key for s in step.ROWS}
    assert all(r["reason"] for r in report["skipped"] + report["training"]["skipped"])
    numel = report["meta"]["params"]["numel"]
    for row in report["rows"]:
        assert row["numel"] == numel and min(row["it_s"], row["peak_gb"], row["gbps"], row["x_fused"]) > 0, row
    by_key = {r["key"]: r for r in report["rows"]}
    for key, size in BYTES_PER_ELEMENT.items():
        assert by_key[key]["bytes_per_step"] == round(size * numel)
    training = report["training"]
    assert {r["key"] for r in training["rows"]} | {r["key"] for r in training["skipped"]} == set(train.KINDS)
    assert all(r["it_s"] > 0 and r["peak_gb"] > 0 and r["trained"] > 0 for r in training["rows"])
    goals = {g["goal"]: g for g in report["goals"]}
    loop = goals["ChildTuning-F: fused step vs the ChildTuning reference loop"]
    assert loop["value"] == pytest.approx(by_key["childtuning-f"]["it_s"] / by_key["childtuning-f-loop"]["it_s"])
    assert "x torch-fused" in printed and "training step" in printed and "goals" in printed
    assert png.stat().st_size > 10_000
    assert "python -m childopt bench --quick --steps 1" in summary and report["meta"]["torch"] in summary


def test_made_up_measurements_give_the_hand_computed_report(tmp_path, capsys, monkeypatch):
    """Copy bandwidth 40 GB/s; fused 100 it/s at 20 GB/s, dense freeze 96 it/s at 36 GB/s (0.96x,
    90%), the ChildTuning loop 10 it/s against 90 (9x), sparse 5% 2.5 ms against 20 ms (0.125x);
    training: Child-Tuning-D 9.8 it/s against 10 (0.98x), sparse peak 3.2 GB against LoRA's 3.0."""
    rows = [fake_row("adamw-fused", "torch AdamW", "fused", 100.0, 20.0),
            fake_row("masked-none", "MaskedAdamW", "mask=None", 50.0, 10.0),
            fake_row("masked-dense-freeze", "MaskedAdamW", "dense freeze", 96.0, 36.0),
            fake_row("childtuning-f", "ChildTuningAdamW", "F", 90.0, 30.0),
            fake_row("childtuning-f-loop", "ChildTuningReferenceAdamW", "F loop", 10.0, 1.0),
            fake_row("masked-sparse-0.05", "MaskedAdamW", "sparse", 400.0, 2.0)]
    trained = [train.TrainRow(key=k, optimizer="opt", mode=k, backend="b", it_s=it_s, ms_per_step=1e3 / it_s,
                              peak_gb=gb, trained=1e6, steps=1)
               for k, it_s, gb in (("adamw-fused", 10.0, 4.0), ("child-tuning-d", 9.8, 4.1),
                                   ("sparse-compact", 8.0, 3.2), ("lora-r8", 11.0, 3.0))]
    monkeypatch.setattr(measure, "measure_copy_gbps", lambda *args, **kwargs: 40.0)
    monkeypatch.setattr(step, "run_rows", lambda *args, **kwargs: (rows, [measure.skip_record("x", "X", "m", "why")]))
    monkeypatch.setattr(train, "optional_rows",
                        lambda *args, **kwargs: (train.Setup(None, 8, 64, "a made-up model"), trained, []))
    report, summary, printed = run_main(tmp_path, capsys, "--device", "cpu")
    compared = {r["key"]: (r["x_fused"], r["pct_copy_bw"]) for r in report["rows"]}
    assert compared["masked-none"] == (0.5, 25.0) and compared["masked-dense-freeze"] == (0.96, 90.0)
    lines = printed.splitlines()
    assert "copy bandwidth: 40.0 GB/s (dst.copy_(src), fp32, 8 B per element)" in lines
    (freeze,) = [line for line in lines if line.split()[:3] == ["MaskedAdamW", "dense", "freeze"]]
    assert freeze.split()[-2:] == ["90%", "0.96x"]
    (child_d,) = [line for line in lines if line.split()[:2] == ["opt", "child-tuning-d"]]
    assert child_d.split()[-1] == "0.98x"
    assert "skipped X m: why" in lines
    assert goal(report, "dense freeze: speed") == (pytest.approx(0.96), True)
    assert goal(report, "dense freeze: share") == (pytest.approx(90.0), True)
    assert goal(report, "masked-bernoulli: speed") == (None, None)  # no such row
    assert goal(report, "reference loop") == (pytest.approx(9.0), False)
    assert goal(report, "sparse 5%") == (pytest.approx(0.125), True)
    assert goal(report, "Child-Tuning-D") == (pytest.approx(0.98), True)
    assert goal(report, "Child-Tuning-F") == (None, None)
    assert goal(report, "peak GB") == (pytest.approx(3.2 / 3.0), True)
    assert all(line in summary for line in lines if not line.startswith("wrote "))


def test_bad_steps_are_refused_with_the_option_named(capsys):
    with pytest.raises(SystemExit) as exited:
        parse_args(["--steps", "0"])
    assert exited.value.code == 2
    assert "--steps must be >= 1, got 0" in capsys.readouterr().err
