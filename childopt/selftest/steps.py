"""The selftest's steps but the sanitizer's: environment, build, lane, cuda-tests, graph-capture,
benchmark.  Each takes the :class:`~childopt.selftest.context.Context`, writes its log into the
output folder and returns a :class:`~childopt.selftest.verdict.StepResult`.

The test steps run ``python -m pytest`` in a child process and read pass, fail and skip per test
from its ``--junitxml`` file; the lane's tests name the verdict cell they check (kernel,
backend, device) as JUnit properties.
"""
from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

import torch

import childopt
from childopt.selftest.context import Context, find_sanitizer, run_logged, sanitizer_version
from childopt.selftest.verdict import (FAILED, KERNELS, PASSED, SKIPPED, Evidence, StepResult, TestCase,
                                       case_evidence, count, read_junit)

LANE_FILE = Path("backends") / "test_cuda_lane.py"
GRAPH_TEST = "test_a_cuda_graph_captures_the_step"
# Generous bounds: a step that runs past one is killed and reported as failed, the rest still run.
PYTEST_TIMEOUT_S = 1800
BUILD_TIMEOUT_S = 1800
BENCH_TIMEOUT_S = 1200
# The child processes call the package's own entry points, not ``python -m childopt``.
BUILD_CALL = "import sys; from childopt._native import build_main; sys.exit(build_main(sys.argv[1:]))"
BENCH_CALL = "import sys; from childopt.bench.report import main; sys.exit(main(sys.argv[1:]))"


def find_tests(given: str | None) -> tuple[Path | None, str]:
    """The tests folder (``--tests``, else ``tests/`` beside the package in a source checkout),
    or None and why: a wheel installs the package without its tests."""
    root = Path(given) if given else Path(childopt.__file__).resolve().parent.parent / "tests"
    if (root / LANE_FILE).is_file():
        return root.resolve(), ""
    return None, (f"{root / LANE_FILE} not found: the tests are not installed with childopt; run the selftest from a "
                  "source checkout (pip install -e .) or pass --tests DIR")


def environment(ctx: Context) -> StepResult:
    """Versions of everything the kernels and the build depend on, as JSON in environment.log."""
    from childopt import _native
    from childopt._native import config as cfg
    from childopt._native.spec import torch_cuda_home
    from childopt.bench import environment as bench_env

    device = torch.device("cuda" if ctx.gpu else "cpu")
    info = {"childopt": childopt.__version__, **bench_env.describe(device, {})}
    info.pop("args")
    if ctx.gpu:
        props = torch.cuda.get_device_properties(device)
        info.update(capability=f"{props.major}.{props.minor}", gpu_memory_gib=round(props.total_memory / 2**30, 1),
                    gpus=torch.cuda.device_count())
    nvcc = cfg.nvcc_path(torch_cuda_home()) if torch.version.cuda else None
    sanitizer = find_sanitizer()
    info.update(cpu_count=os.cpu_count(), nvcc=nvcc, nvcc_version=cfg.tool_version(nvcc) if nvcc else None,
                compute_sanitizer=sanitizer, compute_sanitizer_version=sanitizer_version(sanitizer),
                native="%s: %s" % _native.status(), tests=str(ctx.tests) if ctx.tests else ctx.no_tests)
    ctx.log("environment").write_text(json.dumps(info, indent=2) + "\n")
    where = f"{info['gpu_name']} (sm_{info['capability'].replace('.', '')}), driver {info['driver']}" if ctx.gpu \
        else info["device_name"]
    summary = (f"{where}; torch {info['torch']}, Triton {info['triton'] or 'not installed'}, "
               f"CUDA {info['cuda'] or 'none'}, nvcc {'found' if nvcc else 'not found'}, "
               f"compute-sanitizer {'found' if sanitizer else 'not found'}")
    return StepResult("environment", PASSED, summary, log="environment.log", details=info)


def build(ctx: Context) -> StepResult:
    """childopt._C with CUDA kernels for the visible GPU (childopt._native sets TORCH_CUDA_ARCH_LIST
    for the build from its arch list: the visible GPUs', or CHILDOPT_CUDA_ARCHS)."""
    if not ctx.gpu:
        return StepResult("build", SKIPPED, ctx.no_gpu)
    from childopt._native import config as cfg
    from childopt._native.errors import ExtensionUnavailable
    from childopt._native.spec import build_spec

    try:
        spec = build_spec()
    except ExtensionUnavailable as exc:
        return StepResult("build", FAILED, str(exc), evidence=_native_cuda_failure(str(exc)))
    if not spec.with_cuda:
        return StepResult("build", SKIPPED, f"no CUDA kernels can be built here: {spec.note}")
    capability = torch.cuda.get_device_capability()
    covers, how = cfg.arch_covers(spec.archs, capability)
    details = {"archs": list(spec.archs), "key": spec.key16, "capability": "%d.%d" % capability}
    if not covers:
        reason = f"the build's archs do not run on this GPU: {how} (CHILDOPT_CUDA_ARCHS chooses them)"
        return StepResult("build", FAILED, reason, details=details, evidence=_native_cuda_failure(reason))
    rc = run_logged([sys.executable, "-c", BUILD_CALL], ctx.log("build"), env=ctx.child_env(), timeout=BUILD_TIMEOUT_S)
    if rc != 0:
        reason = "timed out" if rc is None else f"python -m childopt build exited with {rc}"
        return StepResult("build", FAILED, f"{reason} (see build.log)", log="build.log", details=details,
                          evidence=_native_cuda_failure(f"the build failed: {reason}"))
    return StepResult("build", PASSED, f"childopt._C for {';'.join(spec.archs)} ({how})", log="build.log",
                      details=details)


def _native_cuda_failure(reason: str) -> list[Evidence]:
    return [Evidence(kernel, "native cuda", FAILED, reason, "build") for kernel in KERNELS]


def _cannot_test(ctx: Context) -> str:
    """Why the test steps cannot run here, or ""."""
    if ctx.tests is None:
        return ctx.no_tests
    if importlib.util.find_spec("pytest") is None:
        return "pytest is not installed (pip install -e '.[test]' in the checkout)"
    return ""


def run_pytest(ctx: Context, name: str, args: list) -> StepResult:
    """``python -m pytest ARGS`` in the checkout, its log and JUnit XML in the output folder."""
    xml = ctx.out / f"{name}.xml"
    xml.unlink(missing_ok=True)  # an earlier run's results must not pass for this run's
    argv = [sys.executable, "-m", "pytest", *args, f"--junitxml={xml}", "-p", "no:cacheprovider", "-q", "-rfEs"]
    rc = run_logged(argv, ctx.log(name), env=ctx.child_env(), cwd=ctx.tests.parent, timeout=PYTEST_TIMEOUT_S)
    log = f"{name}.log"
    if rc is None:
        return StepResult(name, FAILED, f"pytest ran past {PYTEST_TIMEOUT_S} s and was killed (see {log})", log=log)
    if not xml.is_file():
        return StepResult(name, FAILED, f"pytest exited with {rc} and wrote no JUnit XML (see {log})", log=log)
    cases = read_junit(xml)
    counts = count(cases)
    failures = [f"{c.name}: {c.message}" for c in cases if c.status == FAILED]
    details = {"junit": xml.name, "exit_code": rc, **counts, "failures": failures}
    summary = f"{counts[PASSED]} passed, {counts[FAILED]} failed, {counts[SKIPPED]} skipped"
    evidence = case_evidence(cases, name)
    if rc not in (0, 5) or failures:
        reason = f"{summary}; first: {failures[0]}" if failures else f"{summary}; pytest exited with {rc}"
        return StepResult(name, FAILED, reason, log=log, details=details, evidence=evidence)
    if not counts[PASSED]:
        return StepResult(name, SKIPPED, f"no test ran ({summary})", log=log, details=details, evidence=evidence)
    return StepResult(name, PASSED, summary, log=log, details=details, evidence=evidence)


def lane(ctx: Context) -> StepResult:
    """tests/backends/test_cuda_lane.py: its CPU lanes always, its CUDA lanes on a GPU (the slow
    2**31-element tensors unless --quick)."""
    why = _cannot_test(ctx)
    if why:
        return StepResult("lane", SKIPPED, why)
    marks = "not cuda" if not ctx.gpu else "not slow" if ctx.quick else "slow or not slow"
    return run_pytest(ctx, "lane", [str(ctx.tests / LANE_FILE), "-m", marks])


def cuda_tests(ctx: Context) -> StepResult:
    """Every other ``cuda``-marked test of the checkout (``pytest -m cuda``)."""
    if not ctx.gpu:
        return StepResult("cuda-tests", SKIPPED, ctx.no_gpu)
    why = _cannot_test(ctx)
    if why:
        return StepResult("cuda-tests", SKIPPED, why)
    marks = "cuda and not slow" if ctx.quick else "cuda"
    return run_pytest(ctx, "cuda-tests", [str(ctx.tests), "-m", marks, f"--ignore={ctx.tests / LANE_FILE}"])


def graph_capture(ctx: Context) -> StepResult:
    """The lane's CUDA-graph tests (``opt.step()`` captured, replays against eager steps), on their own line."""
    if not ctx.gpu:
        return StepResult("graph-capture", SKIPPED, ctx.no_gpu)
    lane_result = ctx.done["lane"]
    if "junit" not in lane_result.details:  # only what the lane of this run wrote
        return StepResult("graph-capture", SKIPPED, f"the lane wrote no results ({lane_result.reason})")
    xml = ctx.out / lane_result.details["junit"]
    cases: list[TestCase] = [c for c in read_junit(xml) if c.name.split("[")[0] == GRAPH_TEST]
    counts = count(cases)
    summary = f"{GRAPH_TEST}: {counts[PASSED]} passed, {counts[FAILED]} failed, {counts[SKIPPED]} skipped"
    if not cases:
        return StepResult("graph-capture", FAILED, f"the lane has no {GRAPH_TEST}", log="lane.log")
    if counts[FAILED]:
        first = next(c for c in cases if c.status == FAILED)
        return StepResult("graph-capture", FAILED, f"{summary}; first: {first.name}: {first.message}", log="lane.log")
    if not counts[PASSED]:
        return StepResult("graph-capture", SKIPPED, f"{summary}: {cases[0].message}", log="lane.log")
    return StepResult("graph-capture", PASSED, summary, log="lane.log")


def benchmark(ctx: Context) -> StepResult:
    """``python -m childopt bench --quick`` with its JSON and markdown in the output folder."""
    if not ctx.gpu:
        return StepResult("benchmark", SKIPPED, f"{ctx.no_gpu}; the report times GPU kernels, and its --quick run "
                                               "takes minutes on a CPU (python -m childopt bench --quick runs it)")
    outputs = {"json": "bench.json", "markdown": "bench.md"}
    argv = [sys.executable, "-c", BENCH_CALL, "--quick", "--json", str(ctx.out / outputs["json"]),
            "--markdown", str(ctx.out / outputs["markdown"])]
    rc = run_logged(argv, ctx.log("benchmark"), env=ctx.child_env(), timeout=BENCH_TIMEOUT_S)
    if rc != 0:
        reason = f"ran past {BENCH_TIMEOUT_S} s" if rc is None else f"exited with {rc}"
        return StepResult("benchmark", FAILED, f"python -m childopt bench --quick {reason} (see benchmark.log)",
                          log="benchmark.log")
    return StepResult("benchmark", PASSED, "report in bench.json and bench.md", log="benchmark.log", details=outputs)
