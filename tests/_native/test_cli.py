"""childopt._native.cli: python -m childopt build and doctor (clean is tested with the cache, test_cache.py)."""
from __future__ import annotations

import os
import re
import time

import pytest
import torch

from tests._native.helpers import env_for, run


def test_build_then_doctor_report_the_build_and_the_held_lock(built_cache):
    assert f"childopt._C: CPU kernels only, key {built_cache.spec.key16}" in built_cache.victim.output
    held = built_cache.doctor_held
    assert held.returncode == 0, held.stdout + held.stderr
    assert "childopt._C  needs a build" in held.stdout, "doctor ran before the build"
    assert "1 held" in held.stdout and f"pid {os.getpid()} on" in held.stdout
    again = run(["-m", "childopt", "doctor"], built_cache.env, timeout=120)
    assert again.returncode == 0, again.stdout + again.stderr
    assert f"childopt._C  cached: {built_cache.cache / built_cache.spec.dirname}" in again.stdout
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


def test_doctor_says_where_builds_go_when_the_cache_path_is_a_file(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    (tmp_path / "tmp").mkdir()
    report = run(["-m", "childopt", "doctor"], env_for(blocker, TMPDIR=tmp_path / "tmp"), timeout=120)
    assert report.returncode == 0, report.stdout + report.stderr
    fallback = tmp_path / "tmp" / f"childopt-{os.getuid()}"
    assert (f"cache root   {blocker} (exists, NOT USABLE: {blocker} is not a directory; builds go to {fallback} "
            "instead: set CHILDOPT_CACHE_DIR") in report.stdout, report.stdout
    assert f"python -m childopt build compiles it into {fallback}" in report.stdout


def test_doctor_reports_invalid_settings_instead_of_crashing(tmp_path):
    cache_dir = tmp_path / "cache"
    (cache_dir / f".tmp-{'3' * 16}-otherhost-1-abcd1234").mkdir(parents=True)  # judged by CHILDOPT_LOCK_TIMEOUT
    env = env_for(cache_dir, CHILDOPT_LOCK_TIMEOUT="soon", CHILDOPT_BUILD_TIMEOUT="nan", CHILDOPT_BACKEND="bogus")
    report = run(["-m", "childopt", "doctor"], env, timeout=120)
    assert report.returncode == 1 and "Traceback" not in report.stderr, report.stdout + report.stderr
    assert "INVALID: CHILDOPT_LOCK_TIMEOUT must be a finite number of seconds >= 0, got 'soon'" in report.stdout
    assert "INVALID: CHILDOPT_BUILD_TIMEOUT must be a finite number of seconds >= 0, got 'nan'" in report.stdout
    assert "INVALID: CHILDOPT_BACKEND must be one of" in report.stdout and "got 'bogus'" in report.stdout
    assert "otherhost" in report.stdout, "the cache is still reported"


@pytest.mark.parametrize("argv, message", [
    (["--archs", "foo"], "argument --archs: not a CUDA arch: 'foo'"),
    (["--archs", ""], "argument --archs: '' names no CUDA arch"),
    (["--archs", "", "--cpu"], "argument --archs: '' names no CUDA arch"),
    (["--archs", "8.0", "--cpu"], "--archs and --cpu exclude each other"),
])
def test_build_refuses_a_bad_arch_list_as_a_usage_error_before_building(argv, message, capsys):
    """Exit 2 with the usage line, as for any bad argument; an empty list with --cpu is not let through."""
    from childopt._native.cli import build_main

    with pytest.raises(SystemExit) as exited:
        build_main(argv)
    assert exited.value.code == 2 and message in capsys.readouterr().err
