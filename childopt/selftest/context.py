"""What every selftest step shares: the run's settings, child processes with logs, the CUDA tools.

Steps run their work in child processes (pytest, the extension build, compute-sanitizer, the
benchmark report) through :func:`run_logged`, so that a crash or a hang of a kernel ends the
child and not the selftest, each child gets an environment the step controls, and the log holds
the child's own output.
"""
from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

EXIT_SKIPPED = 77  # childopt.selftest.target's "cannot run here" (the skip status of automake's test harness)


@dataclass
class Context:
    """The settings of one selftest run and the results of the steps run so far.

    ``gpu``: whether the GPU steps run (``no_gpu`` says why not); ``hide_gpu``: a GPU is present
    but ``--cpu-only`` asked for the CPU part, so children must not see it; ``tests``: the tests
    folder of a source checkout, or None (``no_tests`` says why).
    """

    out: Path
    quick: bool
    gpu: bool
    no_gpu: str
    hide_gpu: bool
    tests: Optional[Path]
    no_tests: str
    done: dict = field(default_factory=dict)

    def log(self, name: str) -> Path:
        return self.out / f"{name}.log"

    def child_env(self, **extra: str) -> dict:
        """The environment of child processes.  On a GPU, without TRITON_INTERPRET (CUDA tensors
        need compiled Triton kernels); for the CPU part, Triton interpreted and, under
        ``--cpu-only``, no GPU visible, so it runs as on a machine without one."""
        env = {**os.environ, **extra}
        if self.gpu:
            env.pop("TRITON_INTERPRET", None)
        else:
            env["TRITON_INTERPRET"] = "1"
            if self.hide_gpu:
                env["CUDA_VISIBLE_DEVICES"] = ""
        return env


def run_logged(argv: list, log: Path, *, env: dict, timeout: float, cwd: Optional[Path] = None) -> Optional[int]:
    """Run ``argv`` with stdout and stderr appended to ``log`` (after the command line); its exit
    code, or None when it ran past ``timeout`` seconds and was killed."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as f:
        f.write(f"$ {shlex.join(str(a) for a in argv)}\n")
        f.flush()
        start = time.monotonic()
        try:
            rc = subprocess.run(argv, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=cwd, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            f.write(f"\n[selftest] killed after {timeout:.0f} s\n")
            return None
        f.write(f"\n[selftest] exit code {rc} after {time.monotonic() - start:.1f} s\n")
    return rc


def last_line(log: Path, skip: tuple = ("[selftest]",)) -> str:
    """The last non-empty line of ``log`` that starts with none of ``skip`` (by default: that the
    selftest did not write itself)."""
    lines = [line.strip() for line in log.read_text(errors="replace").splitlines()]
    lines = [line for line in lines if line and not line.startswith(skip)]
    return lines[-1] if lines else "(no output)"


def no_gpu_reason(cpu_only: bool) -> str:
    """Why the GPU steps do not run, or "" when they do."""
    if not torch.version.cuda:
        return f"no CUDA GPU: torch {torch.__version__} was built without CUDA"
    if not torch.cuda.is_available():
        return f"no CUDA GPU: torch {torch.__version__} (CUDA {torch.version.cuda}) sees no device"
    if cpu_only:
        return "--cpu-only: the GPU steps were not run (a CUDA GPU is present)"
    return ""


def find_sanitizer() -> Optional[str]:
    """compute-sanitizer on PATH, else in the CUDA toolkit torch builds extensions with."""
    found = shutil.which("compute-sanitizer")
    if found:
        return found
    from torch.utils.cpp_extension import CUDA_HOME

    candidate = os.path.join(CUDA_HOME, "bin", "compute-sanitizer") if CUDA_HOME else None
    return candidate if candidate and os.access(candidate, os.X_OK) else None


def sanitizer_version(exe: Optional[str]) -> Optional[str]:
    """The ``Version ...`` line of ``compute-sanitizer --version``.

    Written here rather than with childopt._native.config.tool_version, which takes the first
    line with a digit: compute-sanitizer prints its copyright years before its version.
    """
    if exe is None:
        return None
    try:
        out = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return next((line.strip() for line in out.splitlines() if line.strip().startswith("Version")), None)
