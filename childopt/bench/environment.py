"""What benchmark numbers depend on, recorded beside them: the device, driver, torch/Triton/CUDA
and Python versions, the platform, the git commit, the time and the arguments of the run, and how
busy the machine was when it started (other processes on the cores slow the multi-threaded CPU
rows far more than the single-threaded ones).
"""
from __future__ import annotations

import datetime
import os
import platform
import shutil
import subprocess
from pathlib import Path
from typing import Optional

import torch


def triton_version() -> Optional[str]:
    """Triton's version, or None when it is not installed."""
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__


def cpu_name(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """The CPU model from /proc/cpuinfo (Linux) with its vendor, family, model and stepping, else
    what ``platform`` knows.  A VM's model name can hide the core generation ("AMD EPYC" is given
    for Zen 4 and Zen 5 alike, whose AVX-512 units differ), and the CPU figures depend on it."""
    try:
        fields = {}
        # errors="replace": a VM may put any bytes in its model name; a name is still wanted
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if not line.strip():
                if fields:
                    break  # the first processor's block is enough
                continue
            key, _, value = line.partition(":")
            fields[key.strip()] = value.strip()
    except OSError:
        fields = {}
    if not fields.get("model name"):
        return platform.processor() or platform.machine() or "unknown CPU"
    parts = [fields.get("vendor_id"), *(f"{key} {fields[key]}" for key in ("cpu family", "model", "stepping")
                                        if key in fields)]
    identity = ", ".join(part for part in parts if part)
    return f"{fields['model name']} ({identity})" if identity else fields["model name"]


def _command_output(argv: list[str], cwd: Optional[Path] = None) -> Optional[str]:
    """First line of a command's output, or None when it is missing or fails."""
    if shutil.which(argv[0]) is None:
        return None
    try:
        result = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=20, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    lines = result.stdout.strip().splitlines()
    return lines[0] if lines else None


def git_commit(folder: Path) -> Optional[str]:
    """The commit checked out at ``folder``, with " + uncommitted changes" when a tracked file differs
    from it (numbers measured on edited code are not that commit's); None outside git or without it."""
    commit = _command_output(["git", "rev-parse", "HEAD"], cwd=folder)
    if commit and _command_output(["git", "status", "--porcelain", "--untracked-files=no"], cwd=folder):
        return f"{commit} + uncommitted changes"
    return commit


def load_average() -> Optional[float]:
    """The 1-minute load average (runnable processes, all CPUs together), or None where unknown."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def describe(device: torch.device, args: dict) -> dict:
    """What the numbers depend on: hardware, driver, versions, commit, time and arguments."""
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    return {
        "device": str(device),
        "device_name": gpu or cpu_name(),
        "gpu_name": gpu,
        "driver": _command_output(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]),
        "torch": torch.__version__,
        "triton": triton_version(),
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "load_average": load_average(),
        "git_commit": git_commit(Path(__file__).resolve().parent),
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "args": args,
    }

