"""What the loader of childopt._C takes from its environment: the CHILDOPT_* settings and facts about this process.

Kept in one place so that the cache, the lock and the build agree on them: the host name and pid
written into lock files and private build directory names, the user id naming the per-user
fallback root, and the time this process started (CHILDOPT_FORCE_REBUILD ignores builds published
before it).
"""
from __future__ import annotations

import math
import os
import re
import socket
import time

from childopt._native.errors import ExtensionUnavailable

DEFAULT_LOCK_TIMEOUT = 900.0
DEFAULT_BUILD_TIMEOUT = 3600.0
# The variables python -m childopt doctor reports when set.
ENV_VARS = ("CHILDOPT_CACHE_DIR", "CHILDOPT_LOCK_TIMEOUT", "CHILDOPT_BUILD_TIMEOUT", "CHILDOPT_CUDA_ARCHS",
            "CHILDOPT_FORCE_REBUILD", "CHILDOPT_BACKEND", "MAX_JOBS", "TORCH_CUDA_ARCH_LIST", "CUDA_HOME", "CXX",
            "TORCH_EXTENSIONS_DIR")
PROCESS_START = time.time()


def _env_seconds(name: str, default: float) -> float:
    """The seconds set in environment variable ``name`` (``default`` when unset or blank).

    A value that is not a finite number >= 0 is refused with a message naming the variable:
    ``nan`` would make every wait endless (no comparison with it is ever true) and a typo
    must not silently become the default.
    """
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0:
        raise ExtensionUnavailable(f"{name} must be a finite number of seconds >= 0, got {text!r}")
    return value


def lock_timeout() -> float:
    """CHILDOPT_LOCK_TIMEOUT: seconds to wait for another process's build before building privately."""
    return _env_seconds("CHILDOPT_LOCK_TIMEOUT", DEFAULT_LOCK_TIMEOUT)


def build_timeout() -> float:
    """CHILDOPT_BUILD_TIMEOUT: seconds one build may take before it is killed."""
    return _env_seconds("CHILDOPT_BUILD_TIMEOUT", DEFAULT_BUILD_TIMEOUT)


def setting_problems() -> list[str]:
    """What is wrong with the CHILDOPT_* settings, one message each (python -m childopt doctor reports them)."""
    problems = []
    for setting in (lock_timeout, build_timeout):
        try:
            setting()
        except ExtensionUnavailable as exc:
            problems.append(str(exc))
    from childopt import backends  # here: childopt.backends imports childopt._native
    try:
        backends.requested("auto")
    except ValueError as exc:
        problems.append(f"{exc}; every optimizer left at backend='auto' raises this when built")
    return problems


def force_rebuild() -> bool:
    return os.environ.get("CHILDOPT_FORCE_REBUILD", "").strip().lower() in ("1", "true", "yes", "on")


def uid():
    return os.getuid() if hasattr(os, "getuid") else os.environ.get("USERNAME", "user")


def hostname() -> str:
    return re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname()) or "host"


def pid_alive(pid: int) -> bool:
    """Whether a process ``pid`` runs on this host; False for a value no process can have (a pid
    read from a lock or temporary file that the package did not write)."""
    if isinstance(pid, bool) or not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError, ValueError):
        return False
    except PermissionError:
        return True
    return True
