"""``python -m childopt selftest``: run the steps in order, then write the outputs and the verdict.

A step that raises is reported as failed with its traceback in its log, and the steps after it
still run: one broken step must not hide what the others would have found.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import signal
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

from childopt.selftest import outputs, report, sanitizer, steps
from childopt.selftest.context import Context, no_gpu_reason
from childopt.selftest.verdict import COLUMNS, FAILED, SKIPPED, StepResult, verdict

STEPS = (
    ("environment", "GPU, driver, CUDA, torch, Triton, nvcc and compute-sanitizer versions", steps.environment),
    ("build", "childopt._C with CUDA kernels for this GPU", steps.build),
    ("lane", "tests/backends/test_cuda_lane.py (pytest)", steps.lane),
    ("cuda-tests", "the other cuda-marked tests (pytest -m cuda)", steps.cuda_tests),
    ("graph-capture", "opt.step() captured in a CUDA graph (the lane's graph tests)", steps.graph_capture),
    ("memcheck", "compute-sanitizer memcheck, every kernel of Triton and native",
     lambda ctx: sanitizer.sanitize(ctx, "memcheck")),
    ("racecheck", "compute-sanitizer racecheck, every kernel of Triton and native",
     lambda ctx: sanitizer.sanitize(ctx, "racecheck")),
    ("benchmark", "python -m childopt bench --quick", steps.benchmark),
)


def parse_args(argv) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m childopt selftest",
        description="Check childopt on this machine: build the CUDA extension for the GPU, run the CUDA test lane "
                    "(bit-exact Bernoulli masks, odd sizes, storage offsets, bf16, 2**31+ elements, CUDA graphs, "
                    "torch.compile), compute-sanitizer memcheck and racecheck, and the benchmark report; write JSON, "
                    "markdown and logs to an output folder and end with a verdict per kernel. Without a GPU it runs "
                    "the CPU part and says what it skipped. Exits 1 if anything failed.")
    parser.add_argument("--out", metavar="DIR", help="output folder (default: selftest-<date>-<time>)")
    parser.add_argument("--quick", action="store_true",
                        help="leave out the slow tests (tensors of 2**31+ elements, ~26 GB) and racecheck")
    parser.add_argument("--cpu-only", action="store_true",
                        help="run the CPU part only, as on a machine without a GPU (CI)")
    parser.add_argument("--tests", metavar="DIR",
                        help="the tests folder of a childopt checkout (default: tests/ beside the package)")
    args = parser.parse_args(argv)
    # A folder the user names must hold the lane: a typo must not pass as "tests not installed".
    if args.tests is not None and not (Path(args.tests) / steps.LANE_FILE).is_file():
        parser.error(f"--tests {args.tests}: no {steps.LANE_FILE} in it (pass the tests/ folder of a checkout)")
    if args.out is not None and not args.out.strip():
        parser.error("--out: the path is empty")
    out = Path(args.out or f"selftest-{datetime.datetime.now():%Y%m%d-%H%M%S}").expanduser().resolve()
    if out.exists() and not out.is_dir():
        parser.error(f"--out {args.out or out}: exists and is not a folder")
    # What an earlier run's selftest.json lists may be removed; anything else at a name this run
    # writes is refused here, before anything is written (see childopt.selftest.outputs).
    args.earlier = outputs.vouched(out) if out.is_dir() else []
    why = out.is_dir() and outputs.conflict(out, outputs.planned(not no_gpu_reason(args.cpu_only)), args.earlier)
    if why:
        parser.error(f"--out {args.out or out}: {why}; move it away or pick another --out")
    try:  # made here: a folder that cannot be made or written is a usage error, not a traceback
        out.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=out).close()
    except OSError as exc:
        parser.error(f"--out {args.out or out}: cannot make or write the folder {str(out)!r}: {exc.strerror or exc}")
    args.out = str(out)
    return args


def make_context(args: argparse.Namespace) -> Context:
    out = Path(args.out)
    no_gpu = no_gpu_reason(args.cpu_only)
    tests, no_tests = steps.find_tests(args.tests)
    return Context(out=out, quick=args.quick, gpu=not no_gpu, no_gpu=no_gpu,
                   hide_gpu=bool(no_gpu) and torch.cuda.is_available(), tests=tests, no_tests=no_tests)


def run_step(ctx: Context, name: str, step) -> StepResult:
    start = time.monotonic()
    try:
        result = step(ctx)
    except Exception as exc:  # reported as this step's failure; the remaining steps still run
        with open(ctx.log(name), "a") as f:
            f.write(traceback.format_exc())
        result = StepResult(name, FAILED, f"{type(exc).__name__}: {exc}", log=f"{name}.log")
    result.seconds = time.monotonic() - start
    return result


def default_reasons(ctx: Context) -> dict:
    """Why a verdict cell that no step gave evidence for was not checked."""
    lane = ctx.done.get("lane")
    lane_reason = "no lane test ran"
    if lane is not None and lane.status == SKIPPED:
        lane_reason = lane.reason
    elif lane is not None and "junit" not in lane.details:  # it failed before writing results (a crash)
        lane_reason = f"the lane wrote no results ({lane.reason})"
    return {column: (ctx.no_gpu or lane_reason) if column.endswith("cuda") else lane_reason for column in COLUMNS}


@contextlib.contextmanager
def sigterm_raises():
    """SIGTERM (``kill``, a CI timeout) raises SystemExit(143) in the block, so the running step's
    child process is killed (subprocess.run kills it on any exception) instead of left orphaned."""
    def stop(signum, frame):
        raise SystemExit(128 + signum)

    try:
        previous = signal.signal(signal.SIGTERM, stop)
    except ValueError:  # not the main thread: signals are not ours to handle
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv=None) -> int:
    """Run the selftest; 0 when nothing failed (skips are not failures), else 1."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    ctx = make_context(args)
    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    earlier = outputs.present(ctx.out, args.earlier)
    # The note lists the earlier run's files too, so a run stopped before they are gone still removes them.
    listed = list(dict.fromkeys(outputs.planned(ctx.gpu) + earlier))
    report.write_unfinished(ctx, argv, started, listed)  # an earlier run's report must not outlive this run's start
    try:
        clear_earlier_outputs(ctx, earlier)
    except OSError as exc:  # a read-only mount, a folder another user owns: one line, and how to go on
        print(f"childopt selftest: --out {ctx.out}: cannot remove {exc.filename}, which an earlier run wrote "
              f"({exc.strerror}); remove it by hand or pick another --out", file=sys.stderr)
        return 2
    with sigterm_raises():
        return run(ctx, argv, started)


def clear_earlier_outputs(ctx: Context, earlier=None) -> None:
    """Remove the files an earlier run wrote into the output folder (``earlier``, by default those
    its selftest.json lists), but the reports, and nothing else there: a step this run skips or
    fails must not leave an earlier run's file beside its verdict."""
    earlier = outputs.vouched(ctx.out) if earlier is None else earlier
    outputs.remove(ctx.out, [name for name in earlier if name not in (outputs.REPORT, outputs.MARKDOWN)])


def run(ctx: Context, argv: list, started: str) -> int:
    """The steps, the verdict and the outputs of :func:`main`."""
    clock = time.monotonic()
    print(f"childopt selftest into {ctx.out}" + (f" ({ctx.no_gpu}: running the CPU part)" if ctx.no_gpu else ""),
          flush=True)
    results = []
    for i, (name, title, step) in enumerate(STEPS, start=1):
        print(f"[{i}/{len(STEPS)}] {name}: {title} ...", flush=True)
        result = run_step(ctx, name, step)
        ctx.done[name] = result
        results.append(result)
        print(f"      {result.status} in {result.seconds:.1f} s" + (f": {result.reason}" if result.reason else ""),
              flush=True)
    table = verdict([e for r in results for e in r.evidence], default_reasons(ctx))
    failed = any(r.status == FAILED for r in results) or any(c.status == FAILED for row in table.values()
                                                             for c in row.values())
    exit_code = 1 if failed else 0
    seconds = time.monotonic() - clock
    report.write(ctx, argv, started, seconds, results, table, exit_code)
    print(report.screen(ctx, results, table, exit_code, seconds))
    return exit_code
