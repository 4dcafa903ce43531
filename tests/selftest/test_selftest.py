"""``python -m childopt selftest`` on CPU, as CI runs it: its outputs, its skips, how a failure shows.

``--cpu-only`` makes the run the same on a machine with a GPU (the GPU part needs minutes and is
the lane itself, tests/backends/test_cuda_lane.py, run by ``pytest -m cuda`` where a GPU is).
"""
import contextlib
import io
import json
import os
import re
import signal
import sys
import time

import pytest
import torch

from childopt import backends
from childopt.backends.contract import MaskKind
from childopt.selftest import cli, context, main, steps, target
from childopt.selftest.verdict import COLUMNS, KERNELS, PASSED, SKIPPED, StepResult
from tests.backends import test_cuda_lane

GPU_STEPS = ("build", "cuda-tests", "graph-capture", "memcheck", "racecheck", "benchmark")


def run(*argv) -> tuple[int, str]:
    """``main(argv)`` and what it printed."""
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        rc = main(list(argv))
    return rc, printed.getvalue()


@pytest.fixture(scope="module")
def cpu_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("selftest")
    rc, printed = run("--cpu-only", "--out", str(out))
    return rc, out, printed, json.loads((out / "selftest.json").read_text())


def test_the_cpu_part_passes_and_writes_json_markdown_and_logs(cpu_run):
    rc, out, _, report = cpu_run
    assert rc == 0 and report["exit_code"] == 0 and report["finished"] is True
    assert [s["name"] for s in report["steps"]] == [name for name, _, _ in cli.STEPS]
    for step in report["steps"]:
        assert step["status"] in ("passed", "failed", "skipped") and step["reason"], step
        if step["log"]:
            assert (out / step["log"]).is_file()
    assert report["environment"]["torch"] == torch.__version__
    steps_by_name = {s["name"]: s for s in report["steps"]}
    assert steps_by_name["environment"]["status"] == "passed" and steps_by_name["lane"]["status"] == "passed"
    assert steps_by_name["lane"]["details"]["failed"] == 0 and (out / "lane.xml").is_file()
    markdown = (out / "selftest.md").read_text()
    assert "## Verdict per kernel" in markdown and all(f"`{kernel}`" in markdown for kernel in KERNELS)


def test_every_gpu_step_is_skipped_with_a_reason_naming_the_missing_gpu(cpu_run):
    _, _, _, report = cpu_run
    skipped = {s["name"]: s["reason"] for s in report["steps"] if s["name"] in GPU_STEPS}
    assert set(skipped) == set(GPU_STEPS)
    for name, reason in skipped.items():
        assert next(s for s in report["steps"] if s["name"] == name)["status"] == "skipped"
        assert "GPU" in reason, (name, reason)
    assert report["gpu"] is False and "GPU" in report["no_gpu"]


def test_the_verdict_table_is_printed_and_the_cpu_lanes_fill_it(cpu_run):
    _, _, printed, report = cpu_run
    assert "verdict per kernel" in printed and "childopt selftest PASSED" in printed
    header = next(line for line in printed.splitlines() if line.startswith("kernel "))
    assert header.split()[1:] == [word for column in COLUMNS for word in column.split()]
    for kernel in KERNELS:
        assert any(line.startswith(kernel + " ") for line in printed.splitlines()), kernel
        for column, cell in report["verdict"][kernel].items():
            backend, device = column.split()
            if device == "cuda":
                assert cell["status"] == "skipped" and "GPU" in cell["reason"]
            else:
                runs_here = backends.MODULES[backend].available(torch.device("cpu"))[0]
                assert cell["status"] == ("passed" if runs_here else "skipped"), (kernel, column, cell)


FAILING_LANE = '''
import pytest


@pytest.fixture(autouse=True)
def verdict_cell(request):
    request.node.user_properties += [("kernel", "adamw_step/bernoulli"), ("backend", "native"), ("device", "cpu")]


def test_masks_are_bit_exact():
    assert 1 == 2, "injected failure"


def test_something_that_passes():
    pass
'''


def test_a_failing_lane_test_fails_the_run_and_its_kernel(tmp_path):
    tests = tmp_path / "checkout" / "tests"
    (tests / "backends").mkdir(parents=True)
    (tests / steps.LANE_FILE).write_text(FAILING_LANE)
    rc, printed = run("--cpu-only", "--out", str(tmp_path / "out"), "--tests", str(tests))
    report = json.loads((tmp_path / "out" / "selftest.json").read_text())
    assert rc == 1 and report["exit_code"] == 1
    lane = next(s for s in report["steps"] if s["name"] == "lane")
    assert lane["status"] == "failed" and "injected failure" in lane["reason"]
    assert lane["details"]["failed"] == 1 and lane["details"]["passed"] == 1
    cell = report["verdict"]["adamw_step/bernoulli"]["native cpu"]
    assert cell["status"] == "failed" and "test_masks_are_bit_exact" in cell["reason"]
    assert report["verdict"]["adamw_step/none"]["native cpu"]["status"] == "skipped"
    assert "childopt selftest FAILED" in printed
    assert any(line.startswith("adamw_step/bernoulli") and "FAIL [" in line for line in printed.splitlines())


def test_without_the_tests_folder_the_test_steps_are_skipped_with_the_reason(tmp_path, monkeypatch):
    """An installed wheel has no tests/ beside the package."""
    monkeypatch.setattr(steps.childopt, "__file__", str(tmp_path / "site-packages" / "childopt" / "__init__.py"))
    rc, printed = run("--cpu-only", "--out", str(tmp_path / "out"))
    report = json.loads((tmp_path / "out" / "selftest.json").read_text())
    lane = next(s for s in report["steps"] if s["name"] == "lane")
    assert rc == 0 and lane["status"] == "skipped" and "not found" in lane["reason"]
    assert report["verdict"]["radix_histogram"]["native cpu"]["reason"] == lane["reason"]


@pytest.mark.parametrize("option,value,message", [
    ("--tests", "no-tests", "--tests .*no-tests: no backends/test_cuda_lane.py in it"),
    ("--out", "a-file", "--out .*a-file: exists and is not a folder"),
])
def test_a_wrong_folder_is_refused_before_anything_runs(tmp_path, capsys, option, value, message):
    """A typo in --tests must not pass as "tests not installed" (exit 0, nothing tested)."""
    (tmp_path / "a-file").write_text("")
    with pytest.raises(SystemExit) as exit_info:
        main(["--cpu-only", option, str(tmp_path / value)])
    assert exit_info.value.code == 2
    assert re.search(message, capsys.readouterr().err)


@pytest.mark.parametrize("value,message", [
    ("a-file/sub", "--out .*a-file/sub: cannot make or write the folder .*: Not a directory"),
    ("/proc/childopt-no-such/out", "--out /proc/childopt-no-such/out: cannot make or write the folder"),
    ("", "--out: the path is empty"),
])
def test_an_out_folder_that_cannot_be_made_is_a_usage_error_naming_it(tmp_path, capsys, value, message):
    """Not a traceback from mkdir after parsing; an empty --out is not the default folder."""
    (tmp_path / "a-file").write_text("")
    with pytest.raises(SystemExit) as exit_info:
        cli.parse_args(["--out", str(tmp_path / value) if value.startswith("a-file") else value])
    assert exit_info.value.code == 2
    assert re.search(message, capsys.readouterr().err)


def _context(tmp_path, tests=None, gpu=False) -> context.Context:
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    return context.Context(out=out, quick=True, gpu=gpu, no_gpu="" if gpu else "no GPU (test)", hide_gpu=False,
                           tests=tests, no_tests="" if tests else "no tests (test)")


def _junit(name: str) -> str:
    """A JUnit XML file in which ``name`` passed, checking adamw_step/none on native cpu."""
    return ('<testsuites><testsuite name="pytest"><testcase classname="lane" name="%s"><properties>'
            '<property name="kernel" value="adamw_step/none"/><property name="backend" value="native"/>'
            '<property name="device" value="cpu"/></properties></testcase></testsuite></testsuites>' % name)


def test_a_lane_that_dies_without_results_fails_and_an_earlier_runs_xml_is_not_read(tmp_path):
    """A kernel that segfaults kills pytest before it writes lane.xml: the lane.xml an earlier run
    left in --out must not turn into this run's passes."""
    tests = tmp_path / "checkout" / "tests"
    (tests / "backends").mkdir(parents=True)
    (tests / steps.LANE_FILE).write_text("import os, signal\n\n\ndef test_kernel():\n"
                                         "    os.kill(os.getpid(), signal.SIGSEGV)\n")
    ctx = _context(tmp_path, tests)
    (ctx.out / "lane.xml").write_text(_junit("test_kernel"))  # the earlier run's
    result = steps.lane(ctx)
    assert result.status == "failed" and "wrote no JUnit XML" in result.reason, result
    assert result.evidence == [] and not (ctx.out / "lane.xml").exists()
    ctx.done["lane"] = result
    assert "wrote no JUnit XML" in cli.default_reasons(ctx)["native cpu"]  # what the verdict's cells say


def test_graph_capture_reads_only_the_results_of_this_runs_lane(tmp_path):
    ctx = _context(tmp_path, gpu=True)
    (ctx.out / "lane.xml").write_text(_junit(steps.GRAPH_TEST))  # an earlier run's
    ctx.done["lane"] = StepResult("lane", SKIPPED, "pytest is not installed")
    result = steps.graph_capture(ctx)
    assert result.status == SKIPPED and "the lane wrote no results (pytest is not installed)" in result.reason


def _one_step(monkeypatch, step):
    monkeypatch.setattr(cli, "STEPS", (("only", "a made-up step", step),))


def test_an_earlier_report_is_replaced_when_a_run_starts_so_an_interrupted_run_shows_unfinished(tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "selftest.json").write_text(json.dumps({"command": "python -m childopt selftest", "started": "earlier",
                                                   "exit_code": 0}))
    (out / "selftest.md").write_text("childopt selftest PASSED\n")

    def interrupted(ctx):
        raise KeyboardInterrupt  # Ctrl-C in the middle of a step

    _one_step(monkeypatch, interrupted)
    with pytest.raises(KeyboardInterrupt):
        run("--cpu-only", "--out", str(out))
    report = json.loads((out / "selftest.json").read_text())
    assert report["started"] != "earlier" and report["finished"] is False and report["exit_code"] is None
    markdown = (out / "selftest.md").read_text()
    assert "unfinished" in markdown and "PASSED" not in markdown


CHILD = ("import os, signal, sys, time; open(sys.argv[1], 'w').write(str(os.getpid())); "
         "os.kill(os.getppid(), signal.SIGTERM); time.sleep(30)")


def test_sigterm_stops_the_run_and_kills_the_running_child(tmp_path, monkeypatch):
    """``kill PID`` (a CI timeout) must not leave the step's child running with no parent."""
    pid_file = tmp_path / "child.pid"

    def child_sends_sigterm(ctx):
        rc = context.run_logged([sys.executable, "-c", CHILD, str(pid_file)], ctx.log("only"), env=dict(os.environ),
                                timeout=60)
        return StepResult("only", PASSED, f"the child exited with {rc}")

    _one_step(monkeypatch, child_sends_sigterm)
    previous = signal.signal(signal.SIGTERM, lambda *args: None)  # should the selftest not handle it: not pytest's end
    start = time.monotonic()
    try:
        with pytest.raises(SystemExit) as exit_info:
            run("--cpu-only", "--out", str(tmp_path / "out"))
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert exit_info.value.code == 128 + signal.SIGTERM and time.monotonic() - start < 20
    with pytest.raises(ProcessLookupError):
        os.kill(int(pid_file.read_text()), 0)
    assert json.loads((tmp_path / "out" / "selftest.json").read_text())["finished"] is False


def test_the_graph_step_reads_a_test_the_lane_has():
    assert callable(getattr(test_cuda_lane, steps.GRAPH_TEST))


def test_every_mask_kind_of_adamw_step_has_a_verdict_row():
    """Each kind is its own path through every kernel (importance: the level codes)."""
    assert {f"adamw_step/{kind.label}" for kind in MaskKind} <= set(KERNELS)


@pytest.mark.parametrize("kernel", KERNELS)
def test_the_sanitizer_program_steps_each_kernel(lane_on_cpu, kernel):
    lane_on_cpu("native")
    assert target.main(["--backend", "native", "--kernel", kernel, "--device", "cpu"]) == 0


def test_the_sanitizer_program_skips_a_backend_that_cannot_run(monkeypatch, capsys):
    monkeypatch.setattr(backends, "check_ready", lambda module, device: (False, "not built"))
    assert target.main(["--backend", "native", "--kernel", "fisher_accumulate"]) == target.EXIT_SKIPPED
    assert "native cannot run on cuda: not built" in capsys.readouterr().err


def test_the_report_lists_every_file_the_cpu_part_wrote(cpu_run):
    """The list the next run removes (tests/selftest/test_outputs.py): every file of this run, no other."""
    _, out, _, report = cpu_run
    assert sorted(report["outputs"]) == sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
