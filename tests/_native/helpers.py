"""What the tests of childopt._native share: subprocess runners with a private cache, and lock and process probes.

Everything that loads the extension runs in a subprocess: ``TORCH_LIBRARY(childopt)`` registers
once per process.
"""
from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

from childopt._native import cache, spec
from childopt._native import config as cfg

REPO = Path(__file__).resolve().parents[2]
BUILD_LIMIT = 600  # seconds for a subprocess that may compile; a build takes 1-2 min here
LOAD_BODY = "m = e.load(); assert callable(torch.ops.childopt.adamw_step); print('LOADED', m.__file__, flush=True)"
LOAD = "import torch, childopt._native as e; " + LOAD_BODY
# What a user does: the first native step loads (or builds) the extension.
STEP = ("import torch, childopt._native as e; from childopt import MaskedAdamW; p = torch.nn.Parameter(torch.ones(8)); "
        "opt = MaskedAdamW([p], lr=0.1, backend='native'); p.grad = torch.ones(8); opt.step(); "
        "assert (p.detach() < 1).all(); print('LOADED', e.loaded()[0].__file__, flush=True)")
BUILDING = "building the native extension childopt._C"


def env_for(cache_dir: Path, **extra) -> dict:
    """This environment without CHILDOPT_* and build variables, with CHILDOPT_CACHE_DIR=cache_dir."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("CHILDOPT_") and k not in ("TORCH_CUDA_ARCH_LIST", "MAX_JOBS")}
    env["CHILDOPT_CACHE_DIR"] = str(cache_dir)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    env.update({k: str(v) for k, v in extra.items()})
    return env


def run(args, env, timeout=BUILD_LIMIT, **kw):
    return subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, timeout=timeout, **kw)


def python(code: str, env, timeout=BUILD_LIMIT):
    return run(["-c", code], env, timeout=timeout)


def loaded_path(out: str) -> str:
    found = re.findall(r"^LOADED (\S+)$", out, re.MULTILINE)
    assert len(found) == 1, out
    return found[0]


def hold_lock(path: Path, command: str) -> int:
    """flock ``path`` from this process, writing holder info as the loader does."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    fcntl.flock(fd, fcntl.LOCK_EX)
    info = {"host": re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname()), "pid": os.getpid(),
            "started": time.time(), "command": command}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(info).encode(), 0)
    return fd


def processes_in(directory: Path) -> list[int]:
    """Processes whose working directory is ``directory`` (ninja and the compilers run there)."""
    return _processes_where(lambda cwd: cwd == str(directory))


def processes_under(directory: Path) -> list[int]:
    """Processes whose working directory is ``directory`` or below it."""
    return _processes_where(lambda cwd: cwd.startswith(str(directory)))


def _processes_where(match) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if match(os.readlink(entry / "cwd")):
                    pids.append(int(entry.name))
            except OSError:
                pass
    return pids


def published(cache_dir: Path) -> list[Path]:
    return sorted(p for p in cache_dir.glob(f"{cfg.NAME}-*") if (p / cache.MANIFEST).is_file())


def copy_package(tmp_path: Path) -> Path:
    """A package directory holding a copy of csrc/ (what childopt._native.spec.PACKAGE_DIR points at)."""
    package = tmp_path / "pkg"
    shutil.copytree(spec.csrc_dir(), package / "csrc", ignore=shutil.ignore_patterns("*.md"))
    return package


def build_record(**changes) -> tuple[dict, dict]:
    """(a build record of this torch, CPU only, with ``changes``; the runtime it was made from)."""
    rt = spec.runtime()
    record = cfg.key_inputs({k: rt[k] for k in ("torch_version", "torch_git", "torch_cuda", "torch_hip", "cxx11_abi")},
                            rt["sources"], False, (), None)
    record.update(changes)
    return record, rt
