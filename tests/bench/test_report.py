"""``python -m childopt bench``: end to end at a tiny size (so the main job cannot rot), over
several dtypes and thread counts, and on made-up measurements whose ratios, table cells and goals
are worked out by hand."""
import dataclasses
import json
import os

import pytest
import torch

from childopt import backends
from childopt.bench import measure, paired, step, sweep, train
from childopt.bench import report as report_module
from childopt.bench.llc import CacheSize
from childopt.bench.report import main, parse_args, plot
from tests.bench.helpers import BYTES_PER_ELEMENT, fake_row, fake_table

TINY = (1 / 24, 1)  # roberta_base_shapes(1/24, 1): ~0.2M parameters, a smoke run


def run_main(tmp_path, capsys, *options):
    """``main(["--quick", "--steps", "1", *options])`` writing JSON and markdown: (report, markdown, stdout)."""
    out, md = tmp_path / "bench.json", tmp_path / "bench.md"
    assert main(["--quick", "--steps", "1", "--json", str(out), "--markdown", str(md), *options]) == 0
    return json.loads(out.read_text()), md.read_text(), capsys.readouterr().out


def goal(report, *texts):
    """(value, met) of the one goal of ``report`` whose name contains every text (the paired goals
    only when a text asks for them)."""
    paired = any("paired" in text for text in texts)
    (found,) = [g for g in report["goals"]
                if all(text in g["goal"] for text in texts) and (paired or ", paired: " not in g["goal"])]
    return found["value"], found["met"]


@pytest.fixture
def tiny_run(monkeypatch):
    """The 24m list shrunk to ~0.2M elements, one warm-up step, a 1 MiB "cache" for the stream."""
    monkeypatch.setitem(step.SIZES, "24m", TINY)
    monkeypatch.setattr(measure, "WARMUP", 1)
    monkeypatch.setattr(sweep, "last_level_cache", lambda device: CacheSize(2**20, "a made-up cache"))


def test_quick_bench_runs_every_row_and_writes_every_output(tmp_path, capsys, tiny_run):
    """Every step row and training kind is measured or skipped with a reason; the numbers are
    positive, the byte model is charged per element, the goals are ratios of the rows, and JSON,
    markdown and plot are written."""
    png = tmp_path / "bench.png"
    threads = torch.get_num_threads()
    report, summary, printed = run_main(tmp_path, capsys, "--device", "cpu", "--threads", "all", "--plot", str(png))
    (table,) = report["tables"]
    assert (table["size"], table["dtype"], table["threads"]) == ("24m", "float32", threads)
    assert {r["key"] for r in table["rows"]} | {r["key"] for r in table["skipped"]} == {s.key for s in step.ROWS}
    assert all(r["reason"] for r in table["skipped"] + report["training"]["skipped"])
    numel = report["meta"]["params"]["24m"]["numel"]
    assert table["stream"]["numel"] == max(numel, 2**20 // 4) and table["stream"]["threads"] == threads
    for row in table["rows"]:
        assert row["numel"] == numel and row["threads"] == threads, row
        assert min(row["it_s"], row["peak_gb"], row["gbps"], row["x_fused"], row["pct_stream"]) > 0, row
        assert row["pct_stream"] == pytest.approx(100 * row["gbps"] / table["stream"]["gbps"])
        assert row["compute_ms"] is None, row  # the made-up cache has no instance size: no in-cache lists
    by_key = {r["key"]: r for r in table["rows"]}
    for key, size in BYTES_PER_ELEMENT["float32"].items():
        assert by_key[key]["bytes_per_step"] == round(size * numel)
    training = report["training"]
    assert {r["key"] for r in training["rows"]} | {r["key"] for r in training["skipped"]} == set(train.KINDS)
    assert all(r["it_s"] > 0 and r["live_gb"] > r["held_gb"] > 0 and r["trained"] > 0 for r in training["rows"])
    assert goal(report, "ChildTuningAdamW", "the ChildTuning loop")[0] == pytest.approx(
        by_key["childtuning-f"]["it_s"] / by_key["childtuning-f-loop"]["it_s"])
    assert goal(report, "MaskedAdamW mask=None:", "share")[0] == pytest.approx(by_key["masked-none"]["pct_stream"])
    if threads > 1:
        assert goal(report, "1 thread", "masked-none") == (None, None)  # no 1-thread table in this run
    (pairs,) = report["paired"]
    assert (pairs["size"], pairs["dtype"], pairs["threads"], pairs["rounds"]) == ("24m", "float32", threads, 3)
    assert [r["key"] for r in pairs["rows"]] + [r["key"] for r in pairs["skipped"]] == ["adamw-fused", *paired.KEYS]
    assert pairs["baseline"] == "adamw-fused" and all(r["ms_per_step"] > 0 for r in pairs["rows"])
    bernoulli = next(r for r in pairs["rows"] if r["key"] == "masked-bernoulli")
    assert goal(report, "paired", "MaskedAdamW bernoulli", "torch fused")[0] == pytest.approx(bernoulli["x_fused"])
    assert "paired ratios, 24m list, float32" in printed
    assert "x torch-fused" in printed and "% of stream" in printed and "training step" in printed
    assert "a made-up cache" in printed and "live GB" in printed and "goals" in printed
    assert png.stat().st_size > 10_000
    assert "python -m childopt bench --quick --steps 1" in summary and report["meta"]["torch"] in summary


def test_one_table_per_dtype_and_thread_count_and_the_count_comes_back(tmp_path, capsys, tiny_run, monkeypatch):
    """``--dtype float32,bfloat16 --threads 1,all``: four tables, each at its count and dtype, bf16
    charged its own byte model; the thread count of the process is unchanged afterwards."""
    monkeypatch.setattr(step, "ROWS", tuple(s for s in step.ROWS if s.key in ("adamw-fused", "masked-none")))
    monkeypatch.setattr(train, "optional_rows", lambda *args, **kwargs: (None, [], []))
    start = torch.get_num_threads()
    report, _, printed = run_main(tmp_path, capsys, "--device", "cpu", "--dtype", "float32,bfloat16",
                                  "--threads", "1,all")
    assert torch.get_num_threads() == start
    counts = [1] if start == 1 else [1, start]
    assert [(t["threads"], t["dtype"]) for t in report["tables"]] == [
        (n, dtype) for n in counts for dtype in ("float32", "bfloat16")]
    numel = report["meta"]["params"]["24m"]["numel"]
    for table in report["tables"]:
        assert {r["threads"] for r in table["rows"]} == {table["stream"]["threads"]} == {table["threads"]}
        fused, masked = table["rows"]
        assert masked["bytes_per_step"] == round(BYTES_PER_ELEMENT[table["dtype"]]["masked-none"] * numel)
    assert report["meta"]["threads"] == {"all": start, "timed": counts}
    assert "1 thread" in printed and "bfloat16 parameters" in printed
    assert goal(report, "bfloat16", "masked-dense-freeze")[1] is None  # a row this run did not measure


def test_made_up_measurements_give_the_hand_computed_report(tmp_path, capsys, monkeypatch):
    """Stream 40 GB/s at 2 threads, 20 at 1.  2 threads: fused 100 it/s at 20 GB/s, dense freeze 96
    it/s at 36 GB/s (0.96x, 90%), the ChildTuning loop 3 it/s against ChildTuning-F's 90 (30x),
    sparse 5% 2.5 ms against freeze's 10.4 ms (0.24x).  1 thread: fused 50, freeze 51 (1.02x, 11 GB/s
    = 55%).  Training: Child-Tuning-D 9.8 it/s against 10 (0.98x), sparse live 3.2 GB against LoRA's 3.0."""
    two = fake_table([fake_row("adamw-fused", "torch AdamW", "fused", 100.0, 20.0),
                      fake_row("masked-none", "MaskedAdamW", "mask=None", 50.0, 10.0),
                      fake_row("masked-dense-freeze", "MaskedAdamW", "dense freeze", 96.0, 36.0),
                      fake_row("childtuning-f", "ChildTuningAdamW", "F", 90.0, 30.0),
                      fake_row("childtuning-f-loop", "ChildTuningReferenceAdamW", "F loop", 3.0, 1.0),
                      fake_row("masked-sparse-0.05", "MaskedAdamW", "sparse", 400.0, 2.0)], 40.0, threads=2)
    one = fake_table([fake_row("adamw-fused", "torch AdamW", "fused", 50.0, 10.0, threads=1),
                      fake_row("masked-dense-freeze", "MaskedAdamW", "dense freeze", 51.0, 11.0, threads=1)],
                     20.0, threads=1)
    trained = [train.TrainRow(key=k, optimizer="opt", mode=k, backend="b", it_s=it_s, ms_per_step=1e3 / it_s,
                              peak_gb=0.5, held_gb=gb / 2, live_gb=gb, saved_gb=gb / 4, trained=1e6, steps=1)
               for k, it_s, gb in (("adamw-fused", 10.0, 4.0), ("child-tuning-d", 9.8, 4.1),
                                   ("sparse-compact", 8.0, 3.2), ("lora-r8", 11.0, 3.0))]
    one.skipped.append(measure.skip_record("x", "X", "m", "why"))
    two = dataclasses.replace(two, other_cpu=0.01)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    monkeypatch.setattr(sweep, "run_tables", lambda *args, **kwargs: [one, two])
    pairs = paired.PairedTable("24m", "float32", 2, 21, "adamw-fused",
                               [paired.PairedRow("adamw-fused", "torch AdamW", "fused", "torch", 10.0, 1.0),
                                paired.PairedRow("masked-dense-freeze", "MaskedAdamW", "dense freeze", "b", 12.5, 0.8)],
                               [measure.skip_record("masked-none", "MaskedAdamW", "mask=None", "made up")],
                               other_cpu=0.3)
    monkeypatch.setattr(paired, "run_tables", lambda *args, **kwargs: [pairs])
    monkeypatch.setattr(report_module, "OtherLoad", _QuietLoad)
    monkeypatch.setattr(train, "optional_rows",
                        lambda *args, **kwargs: (train.Setup(None, 8, 64, "a made-up model"), trained, []))
    report, summary, printed = run_main(tmp_path, capsys, "--device", "cpu")
    compared = {(t["threads"], r["key"]): (r["x_fused"], r["pct_stream"]) for t in report["tables"] for r in t["rows"]}
    assert compared[(2, "masked-none")] == (0.5, 25.0) and compared[(2, "masked-dense-freeze")] == (0.96, 90.0)
    assert compared[(1, "masked-dense-freeze")] == (1.02, 55.0)
    lines = printed.splitlines()
    assert "optimizer step, 24m list: 24.3M float32 parameters in 139 tensors, 1 thread" in lines
    assert "optimizer step, 24m list: 24.3M float32 parameters in 139 tensors, 2 threads (all)" in lines
    assert sum(line.strip().startswith("in-place stream reference 40.0 GB/s: fake;") for line in lines) == 1
    (freeze,) = [line for line in lines if line.split()[:3] == ["MaskedAdamW", "dense", "freeze"]
                 and line.split()[-1] == "0.96x"]
    assert freeze.split()[-2] == "90%"  # made-up rows have no in-cache time, so no column for it
    (child_d,) = [line for line in lines if line.split()[:2] == ["opt", "child-tuning-d"]]
    assert child_d.split()[-1] == "0.98x"
    assert "skipped X m: why" in lines
    assert goal(report, "2 threads", "dense freeze:", "speed") == (pytest.approx(0.96), False)  # < 1.05
    assert goal(report, "2 threads", "dense freeze:", "share") == (pytest.approx(90.0), True)
    assert goal(report, "1 thread", "dense freeze:", "speed") == (pytest.approx(1.02), True)
    assert goal(report, "masked-bernoulli:", "torch fused") == (None, None)  # no such row
    assert goal(report, "ChildTuningAdamW F:", "the ChildTuning loop") == (pytest.approx(30.0), True)
    assert goal(report, "MaskedAdamW sparse:", "the dense freeze step") == (pytest.approx(96 / 400), True)
    assert goal(report, "Child-Tuning-D") == (pytest.approx(0.98), True)
    assert goal(report, "Child-Tuning-F") == (None, None)
    assert goal(report, "live GB") == (pytest.approx(3.2 / 3.0), True)
    assert goal(report, "paired", "2 threads", "dense freeze:") == (pytest.approx(0.8), False)
    assert goal(report, "paired", "2 threads", "masked-none:") == (None, None)  # skipped
    assert "skipped MaskedAdamW mask=None: made up" in lines
    (paired_freeze,) = [line for line in lines if line.split()[:3] == ["MaskedAdamW", "dense", "freeze"]
                        and line.split()[-1] == "0.80x"]
    assert paired_freeze.split()[-2] == "12.50"
    assert "issue #20" in printed
    assert all(line in summary for line in lines if not line.startswith("wrote "))
    assert [line.strip() for line in lines if line.startswith("  other processes")] == [
        "other processes' CPU use unknown (no /proc/stat, or under a second to count it in)",
        "other processes took 1% of the CPUs meanwhile",
        "other processes took 30% of the CPUs meanwhile: LOADED, these times are not this code's; rerun on a "
        "quiet machine",
        "other processes took 0% of the CPUs meanwhile"]  # the step tables, the paired table, training
    (warning,) = [line for line in lines if line.startswith("WARNING")]
    assert warning.startswith("WARNING: 1 of the 4 tables ran while other processes took more than 5% of the CPUs")
    assert [t["other_cpu"] for t in report["tables"]] == [None, 0.01] and report["paired"][0]["other_cpu"] == 0.3
    assert report["training"]["other_cpu"] == 0.0


class _QuietLoad:
    """OtherLoad on a machine with nothing else running."""

    share = 0.0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None


@pytest.mark.parametrize("argv,message", [
    (["--steps", "0"], "--steps must be >= 1, got 0"),
    (["--threads", "1,0"], "--threads: thread counts are positive integers or 'all', got '0'"),
    (["--dtype", "float32,float16"], "--dtype: 'float16' not among float32, bfloat16"),
    (["--size", "7m"], "--size: '7m' not among 24m, 125m"),
    (["--size", ""], "--size: '' not among 24m, 125m"),  # an unset shell variable: not the default
    (["--threads", ""], "--threads: thread counts are positive integers or 'all', got ''")])
def test_bad_options_are_refused_with_the_option_named(capsys, argv, message):
    with pytest.raises(SystemExit) as exited:
        parse_args(argv)
    assert exited.value.code == 2
    assert message in capsys.readouterr().err


def test_a_backend_that_cannot_run_on_the_device_is_refused_before_measuring(capsys, monkeypatch):
    """--backend triton (or CHILDOPT_BACKEND=triton) on CPU without TRITON_INTERPRET: every childopt
    row would fail, so it is a usage error, not a traceback after minutes of measuring."""
    monkeypatch.setattr(backends.triton, "available", lambda device: (False, "Triton kernels need CUDA tensors"))
    monkeypatch.setattr(sweep, "run_tables", lambda *a, **k: pytest.fail("measured before refusing the backend"))
    for argv, env, given in ((["--backend", "triton"], "", "--backend triton"),
                             ([], "triton", "CHILDOPT_BACKEND=triton")):
        monkeypatch.setenv("CHILDOPT_BACKEND", env)
        with pytest.raises(SystemExit) as exited:
            main(["--device", "cpu", *argv])
        assert exited.value.code == 2
        assert f"{given} cannot run on cpu tensors: Triton kernels need CUDA tensors" in capsys.readouterr().err


def test_a_bad_childopt_backend_is_refused_before_measuring(capsys, monkeypatch):
    monkeypatch.setenv("CHILDOPT_BACKEND", "Native")
    monkeypatch.setattr(sweep, "run_tables", lambda *a, **k: pytest.fail("measured before refusing the variable"))
    with pytest.raises(SystemExit) as exited:
        main(["--device", "cpu"])
    assert exited.value.code == 2
    assert "CHILDOPT_BACKEND must be one of ('auto', 'reference', 'triton', 'native'), got 'Native'" in \
        capsys.readouterr().err


def test_a_default_thread_count_past_the_limit_is_a_usage_error(capsys, monkeypatch):
    """'all' is torch's count at the start, which a process can have set past 8 per CPU."""
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 32)
    with pytest.raises(SystemExit) as exited:
        parse_args(["--device", "cpu"])
    assert exited.value.code == 2
    assert "--threads (default 1,all): thread count 32 is more than 16 (8 per CPU" in capsys.readouterr().err


def test_an_output_it_could_not_write_stops_the_bench_before_it_measures(tmp_path, capsys, monkeypatch):
    """The output paths are checked when the options are parsed (childopt.arguments), not after the tables."""
    monkeypatch.setattr(sweep, "run_tables", lambda *a, **k: pytest.fail("measured before refusing --plot"))
    with pytest.raises(SystemExit):
        main(["--device", "cpu", "--json", str(tmp_path / "run.json"), "--plot", str(tmp_path)])
    assert "--plot: " in capsys.readouterr().err and not (tmp_path / "run.json").exists()


def test_missing_output_folders_are_made(tmp_path, capsys, monkeypatch):
    """Outputs in folders that do not exist yet are written there (the measurements made up)."""
    monkeypatch.setattr(sweep, "run_tables", lambda *a, **k: [])
    monkeypatch.setattr(paired, "run_tables", lambda *a, **k: [])
    monkeypatch.setattr(train, "optional_rows", lambda *a, **k: (None, [], []))
    out = tmp_path / "results" / "deep" / "run.json"
    md = tmp_path / "results" / "other" / "run.md"
    assert main(["--quick", "--steps", "1", "--device", "cpu", "--json", str(out), "--markdown", str(md)]) == 0
    assert json.loads(out.read_text())["tables"] == [] and md.read_text().startswith("#")


def test_options_parse_into_lists():
    args = parse_args(["--size", "24m,125m", "--dtype", "bfloat16", "--threads", "all,1"])
    assert args.sizes == ["24m", "125m"] and args.dtypes == ["bfloat16"]
    assert args.thread_counts == list(dict.fromkeys([torch.get_num_threads(), 1]))
    defaults = parse_args(["--device", "cpu"])
    assert (defaults.sizes, defaults.dtypes) == (None, ["float32"])
    assert defaults.thread_counts == list(dict.fromkeys([1, torch.get_num_threads()]))  # 1,all


def test_the_plot_draws_each_paired_table_as_ratios_with_a_line_at_one(tmp_path, monkeypatch):
    """A step table, then a paired table whose bars are its ratios (1.0 for the baseline, 0.8 for a
    row at 12.5 ms against 10) and whose right-hand bars are the median ms."""
    from matplotlib.figure import Figure

    saved = []
    monkeypatch.setattr(Figure, "savefig", lambda fig, path, **kwargs: saved.append(fig))
    table = fake_table([fake_row("adamw-fused", "torch AdamW", "fused", 100.0, 20.0)])
    pairs = paired.PairedTable("24m", "float32", 2, 21, "adamw-fused",
                               [paired.PairedRow("adamw-fused", "torch AdamW", "fused", "torch", 10.0, 1.0),
                                paired.PairedRow("masked-bernoulli", "MaskedAdamW", "bernoulli", "b", 12.5, 0.8)], [])
    plot([table], [pairs], [], str(tmp_path / "bench.png"), "title", ["step", "paired"])
    (fig,) = saved
    ratio_ax, ms_ax = fig.axes[2:4]
    assert ratio_ax.get_title(loc="left") == "paired"
    assert [bar.get_width() for bar in ratio_ax.patches] == [1.0, 0.8]
    assert [bar.get_width() for bar in ms_ax.patches] == [10.0, 12.5]
    assert [line.get_xdata()[0] for line in ratio_ax.get_lines()] == [1.0]


def test_the_training_memory_panel_tells_the_methods_apart_by_held_live_and_saved_bytes(tmp_path, monkeypatch):
    """On CPU the peak RSS (~1.1 GB) is about the same for every row; held, live and saved bytes
    (~5-20 MB, a real --quick run's) tell full fine-tuning, sparse storage and LoRA apart, so
    they get an axis of their own, in MB with 3 significant digits, and peak GB another."""
    from matplotlib.figure import Figure

    saved = []
    monkeypatch.setattr(Figure, "savefig", lambda fig, path, **kwargs: saved.append(fig))
    measured = {"adamw-fused": (0.0078, 0.0196, 0.0098), "sparse-compact": (0.0063, 0.0157, 0.0079),
                "lora-r8": (0.0048, 0.0121, 0.0061)}  # held, live, saved GB
    rows = [train.TrainRow(key, "opt", key, "native", 2.0, 500.0, 1.133, held, live, kept, 1.0, 1)
            for key, (held, live, kept) in measured.items()]
    plot([], [], rows, str(tmp_path / "bench.png"), "title", ["training"])
    (fig,) = saved
    legends = {text.get_text(): ax for ax in fig.axes if ax.get_legend() for text in ax.get_legend().get_texts()}
    assert set(legends) == {"held MB", "live MB", "saved MB"}
    bytes_ax = legends["live MB"]
    assert [t.get_text() for t in bytes_ax.texts] == ["7.80", "6.30", "4.80", "19.6", "15.7", "12.1",
                                                      "9.80", "7.90", "6.10"]
    assert max(bar.get_width() for bar in bytes_ax.patches) == pytest.approx(19.6)  # no peak bar on this axis
    (peak_ax,) = [ax for ax in fig.axes if ax.get_xlabel().startswith("peak GB")]
    assert [bar.get_width() for bar in peak_ax.patches] == [1.133] * 3
