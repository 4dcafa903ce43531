"""The memcheck and racecheck steps: compute-sanitizer over every kernel of Triton and native.

Each (backend, kernel) runs in its own process (childopt.selftest.target), so an error is
attributed to one cell of the verdict, not to a whole backend.  The runs are independent and
mostly wait on the instrumented GPU, so a few run at once.  Before them a probe (one torch
operation under the tool) tells whether compute-sanitizer can check this GPU at all: in some
sandboxes it refuses the device, which is a fact about the machine, reported as a skip.
"""
from __future__ import annotations

import os
import re
import sys
from concurrent.futures import ThreadPoolExecutor

from childopt.selftest.context import EXIT_SKIPPED, Context, find_sanitizer, last_line, run_logged
from childopt.selftest.verdict import FAILED, KERNEL_BACKENDS, KERNELS, PASSED, SKIPPED, Evidence, StepResult

FOLDER = "sanitizer"  # the logs' folder in the output folder
ERRORS_FOUND = 86  # --error-exitcode: distinct from Python's 1 and 2 and from EXIT_SKIPPED
RUN_TIMEOUT_S = 900
PROBE = "import torch; torch.ones(8, device='cuda').add_(1); torch.cuda.synchronize()"
_SUMMARY = re.compile(r"(ERROR SUMMARY|RACECHECK SUMMARY):.*")
# The program's own last words, not the tool's (its lines start with "=========").
PROGRAM_LINES = ("[selftest]", "=========")


def _argv(exe: str, tool: str, program: list) -> list:
    return [exe, "--tool", tool, "--error-exitcode", str(ERRORS_FOUND), "--print-limit", "20", sys.executable,
            *program]


def log_name(tool: str, backend: str, kernel: str) -> str:
    """The log of one run, relative to the output folder."""
    return f"{FOLDER}/{tool}-{backend}-{kernel.replace('/', '-')}.log"


def log_names(tool: str) -> list:
    """Every log ``tool`` may write, relative to the output folder: the probe's and one per run."""
    return [f"{FOLDER}/{tool}-probe.log"] + [log_name(tool, b, k) for b in KERNEL_BACKENDS for k in KERNELS]


def _workers() -> int:
    return max(1, min(8, (os.cpu_count() or 2) // 2))


def check(ctx: Context, exe: str, tool: str, backend: str, kernel: str) -> Evidence:
    """One sanitizer run of one kernel of one backend."""
    log = ctx.out / log_name(tool, backend, kernel)
    rel = log.relative_to(ctx.out)
    program = ["-m", "childopt.selftest.target", "--backend", backend, "--kernel", kernel]
    rc = run_logged(_argv(exe, tool, program), log, timeout=RUN_TIMEOUT_S,
                    env=ctx.child_env(PYTORCH_NO_CUDA_MEMORY_CACHING="1"))
    if rc == 0:
        return Evidence(kernel, f"{backend} cuda", PASSED, f"{tool}: no errors", tool)
    if rc == EXIT_SKIPPED:
        reason = last_line(log, PROGRAM_LINES).removeprefix("skipped: ")
        return Evidence(kernel, f"{backend} cuda", SKIPPED, reason, tool)
    if rc == ERRORS_FOUND:
        found = _SUMMARY.search(log.read_text(errors="replace"))
        reason = f"{tool} found errors ({found.group(0) if found else 'see the log'}; {rel})"
    elif rc is None:
        reason = f"{tool}: ran past {RUN_TIMEOUT_S} s ({rel})"
    else:
        reason = f"{tool}: the program exited with {rc}: {last_line(log, PROGRAM_LINES)} ({rel})"
    return Evidence(kernel, f"{backend} cuda", FAILED, reason, tool)


def sanitize(ctx: Context, tool: str) -> StepResult:
    """Run ``tool`` over every (backend, kernel); the step fails if any run found errors."""
    if not ctx.gpu:
        return StepResult(tool, SKIPPED, ctx.no_gpu)
    if tool == "racecheck" and ctx.quick:
        return StepResult(tool, SKIPPED, "--quick runs memcheck only")
    exe = find_sanitizer()
    if exe is None:
        return StepResult(tool, SKIPPED, "compute-sanitizer not found (on PATH or in CUDA_HOME/bin): the CUDA "
                                         "toolkit here does not have it")
    probe_log = ctx.out / log_names(tool)[0]
    rc = run_logged(_argv(exe, tool, ["-c", PROBE]), probe_log, env=ctx.child_env(), timeout=RUN_TIMEOUT_S)
    if rc != 0:
        return StepResult(tool, SKIPPED, f"compute-sanitizer cannot check this GPU here (a probe exited with {rc}: "
                                         f"{last_line(probe_log)})", log=str(probe_log.relative_to(ctx.out)))
    jobs = [(backend, kernel) for backend in KERNEL_BACKENDS for kernel in KERNELS]
    with ThreadPoolExecutor(max_workers=_workers()) as pool:
        evidence = list(pool.map(lambda job: check(ctx, exe, tool, *job), jobs))
    by_status = {status: [e for e in evidence if e.status == status] for status in (PASSED, FAILED, SKIPPED)}
    summary = ", ".join(f"{len(found)} {status}" for status, found in by_status.items())
    lines = [f"{e.column:12} {e.kernel:22} {e.status:8} {e.reason}" for e in evidence]
    ctx.log(tool).write_text(f"{tool} of {len(jobs)} kernel runs (logs in sanitizer/): {summary}\n" +
                             "\n".join(lines) + "\n")
    details = {"compute_sanitizer": exe, "runs": [vars(e) for e in evidence]}
    if by_status[FAILED]:
        first = by_status[FAILED][0]
        return StepResult(tool, FAILED, f"{summary}; first: {first.column} {first.kernel}: {first.reason}",
                          log=f"{tool}.log", details=details, evidence=evidence)
    status = PASSED if by_status[PASSED] else SKIPPED
    reason = summary if status == PASSED else f"{summary}: {by_status[SKIPPED][0].reason}"
    return StepResult(tool, status, reason, log=f"{tool}.log", details=details, evidence=evidence)
