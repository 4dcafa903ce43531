"""What a selftest run leaves behind: ``selftest.json``, ``selftest.md`` and the closing screen.

The JSON holds the environment, every step (status, reason, seconds, log, details) and the
verdict per kernel; the markdown says the same for people; the screen is the steps one line
each and the verdict table, so it fits one terminal page.
"""
from __future__ import annotations

import json
import shlex
from pathlib import Path

from childopt.arguments import write_output
from childopt.selftest import outputs
from childopt.selftest.context import Context
from childopt.selftest.verdict import FAILED, render_markdown, render_text, table_json

SCREEN_WIDTH = 100


def headline(results: list, exit_code: int, seconds: float) -> str:
    failed = [r.name for r in results if r.status == FAILED]
    word = "FAILED" if exit_code else "PASSED"
    counts = ", ".join(f"{sum(r.status == s for r in results)} {s}" for s in ("passed", "failed", "skipped"))
    return f"childopt selftest {word}: {counts} steps in {seconds:.0f} s" + (f" (failed: {', '.join(failed)})"
                                                                            if failed else "")


def _command(argv: list) -> str:
    return " ".join(["python -m childopt selftest", *map(shlex.quote, argv)])


def _write(path: Path, text: str) -> None:
    """``text`` into ``path``; a symbolic link there (parse_args refuses one) is replaced, never written through."""
    if path.is_symlink():
        path.unlink()
    write_output(path, text)


def write_unfinished(ctx: Context, argv: list, started: str, listed: list) -> None:
    """selftest.json and selftest.md saying the run started and has not finished, written when it
    starts: a run interrupted (Ctrl-C, SIGTERM, a crash) leaves them, not an earlier run's report.
    ``listed``: the files the run may write (and those it removes), for the next run to remove."""
    note = "the run has not finished: still running, or interrupted (Ctrl-C, SIGTERM, a crash)"
    data = {"command": _command(argv), "started": started, "finished": False, "exit_code": None, "note": note,
            "outputs": listed}
    _write(ctx.out / outputs.REPORT, json.dumps(data, indent=2) + "\n")
    _write(ctx.out / outputs.MARKDOWN, f"# childopt selftest: unfinished, started {started}\n\n"
                                       f"`{data['command']}`: {note}; the step logs hold what it did.\n")


def write(ctx: Context, argv: list, started: str, seconds: float, results: list, table: dict, exit_code: int) -> None:
    """selftest.json and selftest.md in the output folder (each replaced whole)."""
    environment = next((r.details for r in results if r.name == "environment"), {})
    data = {"command": _command(argv), "started": started, "finished": True,
            "seconds": round(seconds, 1), "exit_code": exit_code, "gpu": ctx.gpu, "no_gpu": ctx.no_gpu or None,
            "quick": ctx.quick, "tests": str(ctx.tests) if ctx.tests else None, "environment": environment,
            "steps": [r.as_json() for r in results], "verdict": table_json(table),
            "outputs": list(dict.fromkeys([outputs.REPORT, outputs.MARKDOWN,
                                           *outputs.present(ctx.out, outputs.planned(ctx.gpu))]))}
    _write(ctx.out / outputs.REPORT, json.dumps(data, indent=2) + "\n")
    _write(ctx.out / outputs.MARKDOWN, markdown(data, results, table, exit_code, seconds))


def markdown(data: dict, results: list, table: dict, exit_code: int, seconds: float) -> str:
    env = {key: "none" if value is None else value for key, value in data["environment"].items()}
    where = data["environment"].get("gpu_name") or env.get("device_name", "?")
    lines = [f"# childopt selftest: {where}, {data['started'][:10]}", "",
             f"`{data['command']}` at commit `{env.get('git_commit')}`: torch {env.get('torch')}, "
             f"Triton {env.get('triton')}, CUDA {env.get('cuda')}, driver {env.get('driver')}, "
             f"nvcc {env.get('nvcc_version')}, compute-sanitizer {env.get('compute_sanitizer_version')}, "
             f"Python {env.get('python')}, {env.get('platform')}.", "",
             f"**{headline(results, exit_code, seconds)}**", "", "## Steps", "",
             "| step | status | seconds | log | what |", "|---|---|---|---|---|"]
    lines += [f"| {r.name} | {r.status} | {r.seconds:.1f} | {r.log or ''} | {r.reason.replace('|', '/')} |"
              for r in results]
    lines += ["", "## Verdict per kernel", "",
              "Each cell: the lane's tests of that kernel on that backend and device (against the reference "
              "backend and childopt.philox) and, on CUDA, compute-sanitizer's memcheck and racecheck runs.", "",
              render_markdown(table)]
    failures = [(r.name, f) for r in results for f in r.details.get("failures", [])]
    if failures:
        lines += ["", "## Failed tests", ""] + [f"- {step}: `{failure}`" for step, failure in failures]
    return "\n".join(lines) + "\n"


def screen(ctx: Context, results: list, table: dict, exit_code: int, seconds: float) -> str:
    """The closing screen: a line per step, the verdict table, where the outputs are."""
    lines = ["", headline(results, exit_code, seconds)]
    for r in results:
        line = f"  {r.name:14} {r.status:8} {r.seconds:6.1f} s  {r.reason}"
        lines.append(line if len(line) <= SCREEN_WIDTH else line[:SCREEN_WIDTH - 3] + "...")
    lines += ["", "verdict per kernel (against the reference backend and childopt.philox):",
              render_text(table, SCREEN_WIDTH), "",
              f"outputs in {ctx.out}: selftest.json, selftest.md and the step logs"]
    return "\n".join(lines)
