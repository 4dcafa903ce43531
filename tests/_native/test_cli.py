"""childopt._native.cli: python -m childopt build and doctor (clean is tested with the cache, test_cache.py)."""
from __future__ import annotations

import os
import re
import time

import torch

from tests._native.helpers import env_for, run


def test_build_then_doctor_report_the_build_and_the_held_lock(built_cache):
    out = built_cache.build.stdout
    assert f"key {built_cache.spec.key16}" in out and "built in" in out and built_cache.spec.dirname in out
    held = built_cache.doctor_held
    assert held.returncode == 0, held.stdout + held.stderr
    assert f"childopt._C  cached: {built_cache.cache / built_cache.spec.dirname}" in held.stdout
    assert "1 held" in held.stdout and f"pid {os.getpid()} on" in held.stdout
    again = run(["-m", "childopt", "doctor"], built_cache.env, timeout=120)
    assert again.returncode == 0, again.stdout + again.stderr
    for line in ("torch", "GPU", "nvcc", "C++ compiler", "ninja", "build", "cache root"):
        assert re.search(rf"^{re.escape(line)}\s", again.stdout, re.MULTILINE), (line, again.stdout)
    assert "0 held" in again.stdout
    assert f"{built_cache.spec.dirname}  CPU, torch {torch.__version__}" in again.stdout
    assert "<- used here" in again.stdout
    # A second build is a no-op.
    second = run(["-m", "childopt", "build"], built_cache.env, timeout=120)
    assert second.returncode == 0 and "already built" in second.stdout, second.stdout + second.stderr


def test_doctor_fix_removes_stale_torch_extension_locks_only(tmp_path):
    root = tmp_path / "torch_extensions"
    stale = root / "py311_cpu" / "fused_adam" / "lock"
    in_use = root / "py311_cpu" / "cpu_adam" / "lock"
    young = root / "transformer" / "lock"
    for path in (stale, in_use, young):
        path.parent.mkdir(parents=True)
        path.write_text("")
    old = time.time() - 7200
    os.utime(stale, (old, old))
    os.utime(in_use, (old, old))
    fd = os.open(in_use, os.O_RDONLY)  # a FileBaton holder keeps its lock file open while it builds
    try:
        env = env_for(tmp_path / "cache", TORCH_EXTENSIONS_DIR=root)
        report = run(["-m", "childopt", "doctor"], env, timeout=120)
        assert f"{root}: 3 lock file(s), 1 stale" in report.stdout, report.stdout + report.stderr
        assert "python -m childopt doctor --fix" in report.stdout and stale.exists()
        fixed = run(["-m", "childopt", "doctor", "--fix"], env, timeout=120)
        assert fixed.returncode == 0, fixed.stdout + fixed.stderr
        assert f"{stale}  STALE: no process has it open: its builder is gone, 2 h old -> removed" in fixed.stdout
        assert f"open by pid {os.getpid()}" in fixed.stdout
        assert not stale.exists() and in_use.exists() and young.exists()
    finally:
        os.close(fd)
