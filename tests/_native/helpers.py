"""What the tests of childopt._native share: subprocess runners with a private cache, lock and process probes, and
ways to damage a cache (a fake compile, a damaged library, a read-only cache).

Everything that loads the extension runs in a subprocess: ``TORCH_LIBRARY(childopt)`` registers
once per process.
"""
from __future__ import annotations

import contextlib
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

import pytest

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


def env_for(cache_dir: Path | str | None, **extra) -> dict:
    """This environment without CHILDOPT_* and build variables, with CHILDOPT_CACHE_DIR=cache_dir (unset if None)."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("CHILDOPT_") and k not in ("TORCH_CUDA_ARCH_LIST", "MAX_JOBS")}
    if cache_dir is not None:
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


def compilers_in(directory: Path) -> list[int]:
    """ninja and compiler processes working in ``directory`` (the build worker itself does not count)."""
    def compiling(pid: int) -> bool:
        try:
            return Path(f"/proc/{pid}/comm").read_text().strip() in ("ninja", "cc1plus", "c++", "g++", "cc", "ld")
        except OSError:
            return False

    return [pid for pid in processes_in(directory) if compiling(pid)]


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


def clean_here(monkeypatch, capsys, cache_dir: Path, *args: str) -> tuple[int, str, str]:
    """``python -m childopt clean ARGS`` on ``cache_dir``, run in this process, where no per-user fallback root of
    this machine is seen: (exit code, stdout, stderr)."""
    from childopt.__main__ import main

    monkeypatch.setenv("CHILDOPT_CACHE_DIR", str(cache_dir))
    for name in ("CHILDOPT_LOCK_TIMEOUT", "CHILDOPT_CUDA_ARCHS", "CHILDOPT_FORCE_REBUILD"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr("tempfile.tempdir", str(cache_dir.parent / "no-fallback-here"))
    capsys.readouterr()
    code = main(["clean", *args])
    out, err = capsys.readouterr()
    return code, out, err


def fake_compile(monkeypatch, library: bytes = b"\x7fELF not really a library") -> list[Path]:
    """Replace the compile of childopt._native.build with one that writes ``library`` at once; the private
    directories it was given are returned (filled as builds run)."""
    from childopt._native import build

    calls = []

    def run_build(target, tmp, root):
        calls.append(tmp)
        (tmp / f"{target.module_name}.so").write_bytes(library)
        return 0.0

    monkeypatch.setattr(build, "run_build", run_build)
    return calls


def copy_published(built_cache, root: Path) -> Path:
    """A copy of the published build of ``built_cache`` in a new cache ``root``; its directory."""
    target = root / built_cache.spec.dirname
    shutil.copytree(built_cache.cache / built_cache.spec.dirname, target)
    return target


def library_of(directory: Path) -> Path:
    return directory / json.loads((directory / cache.MANIFEST).read_text())["library"]


def damage(directory: Path, how: str) -> None:
    """Damage a published build as a full disk, a crash or a stray write leaves it: ``truncated`` (the library cut
    to 40 %), ``overwritten`` (4 KiB in its middle inverted, same size) or ``manifest`` (a manifest cut short)."""
    if how == "manifest":
        manifest = directory / cache.MANIFEST
        manifest.write_text(manifest.read_text()[:40])
        return
    library = library_of(directory)
    size = library.stat().st_size
    if how == "truncated":
        os.truncate(library, size * 2 // 5)
    elif how == "overwritten":
        with open(library, "r+b") as f:
            f.seek(size // 2)
            chunk = f.read(4096)
            f.seek(size // 2)
            f.write(bytes(b ^ 0xFF for b in chunk))
    else:
        raise ValueError(f"how must be truncated, overwritten or manifest, got {how!r}")


@contextlib.contextmanager
def read_only(path: Path):
    """``path`` and every directory under it cannot be changed, even by root, while the block runs.

    Permission bits for a normal user; the immutable attribute (chattr +i) for root, whom
    permission bits do not stop.  Skips the test where neither can be had.
    """
    dirs = [path, *(p for p in path.rglob("*") if p.is_dir() and not p.is_symlink())]
    if os.geteuid() != 0:
        modes = {p: p.stat().st_mode for p in dirs}
        for p in dirs:
            p.chmod(modes[p] & ~0o222)
        try:
            yield
        finally:
            for p in dirs:
                p.chmod(modes[p])
        return
    if shutil.which("chattr") is None:
        pytest.skip("running as root, and there is no chattr to make the cache immutable")
    made = subprocess.run(["chattr", "+i", *map(str, dirs)], capture_output=True, text=True)
    if made.returncode != 0:
        subprocess.run(["chattr", "-i", *map(str, dirs)], capture_output=True)
        pytest.skip(f"running as root and chattr +i is not possible here: {made.stderr.strip()}")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", *map(str, dirs)], check=True)
