"""childopt._native.build and childopt._native.worker: a build runs in a child process that never imports childopt,
dies with its parent and its time limit, names its log when it fails, and is published once however many
processes want it."""
from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from childopt._native import build, cache, spec, worker
from tests._native.helpers import (BUILDING, copy_package, env_for, loaded_path, processes_under, published,
                                   python, run)


def test_the_worker_is_this_file_run_by_path_without_importing_childopt(tmp_path, monkeypatch):
    """run_build launches childopt/_native/worker.py by path; run so, it imports neither childopt nor torch."""
    target = spec.build_spec()
    launched, real_popen = [], subprocess.Popen

    class Launched(Exception):
        pass

    def popen(cmd, *args, **kw):
        if list(cmd[:2]) != [sys.executable, "-c"]:
            return real_popen(cmd, *args, **kw)
        launched.append(cmd)
        raise Launched

    monkeypatch.setattr(subprocess, "Popen", popen)
    with pytest.raises(Launched):
        build.run_build(target, tmp_path, tmp_path)
    monkeypatch.undo()
    (cmd,) = launched
    assert Path(cmd[3]) == Path(worker.__file__) == Path(build.__file__).with_name("worker.py")
    prefix, call = cmd[2].split("['worker_main']")
    assert prefix == "import runpy, sys; runpy.run_path(sys.argv[1])" and call == "(sys.argv[2:])"
    probe = prefix + "; print(sorted(m for m in sys.modules if m.split('.')[0] in ('childopt', 'torch')))"
    out = subprocess.run([sys.executable, "-c", probe, cmd[3]], capture_output=True, text=True, timeout=60,
                         cwd=tmp_path, check=True).stdout
    assert out.strip() == "[]"


def _who_waited(out: str) -> set:
    """The pids a loader's progress lines name as the holder of the build lock it waited for."""
    return {int(pid) for pid in re.findall(r"waiting for another process to build .*?\(held by pid (\d+) on", out)}


def test_a_builder_killed_mid_compile_never_blocks_the_next_load(built_cache):
    victim = built_cache.victim
    assert victim.compilers_before, "ninja or a compiler was running in the private build directory"
    assert victim.left_running == [], "the killed builder's compilers must die with it"
    for proc, out in zip(built_cache.loaders, built_cache.outputs):
        assert proc.returncode == 0, out
    # Nobody waited on anything the dead builder left: every wait named a live loader, none timed out.
    loader_pids = {proc.pid for proc in built_cache.loaders}
    for out in built_cache.outputs:
        assert _who_waited(out) <= loader_pids and "gave up waiting" not in out, out
    assert victim.tmp.exists(), "the dead builder's directory is left for clean, never reused"
    assert all(str(victim.tmp) not in loaded_path(out) for out in built_cache.outputs)


def test_concurrent_cold_loaders_compile_once_and_load_the_same_build(built_cache):
    builders = [proc.pid for proc, out in zip(built_cache.loaders, built_cache.outputs) if BUILDING in out]
    assert len(builders) == 1, "\n---\n".join(built_cache.outputs)
    waited = [_who_waited(out) for out in built_cache.outputs if BUILDING not in out]
    assert len(waited) == 2 and all(holders == {builders[0]} for holders in waited), "\n---\n".join(
        built_cache.outputs)
    paths = {loaded_path(out) for out in built_cache.outputs}
    builds = published(built_cache.cache)
    assert len(builds) == 1 and len(paths) == 1
    assert paths.pop().startswith(str(builds[0]) + os.sep)
    assert list(built_cache.cache.glob(".tmp-*")) == [built_cache.victim.tmp]
    manifest = json.loads((builds[0] / cache.MANIFEST).read_text())
    library = builds[0] / manifest["library"]
    assert manifest["lock"] == "held" and manifest["size"] == library.stat().st_size
    assert manifest["sha256"] == hashlib.sha256(library.read_bytes()).hexdigest()


def _broken_package(tmp_path: Path) -> Path:
    """A copy of csrc/ whose every translation unit fails at its first line (a missing header is fatal at once)."""
    package = copy_package(tmp_path)
    for source in (package / "csrc").rglob("*.cpp"):
        source.write_text('#include "childopt_test_broken_on_purpose.h"\n' + source.read_text())
    return package


def _load_broken(tmp_path: Path, env: dict) -> subprocess.CompletedProcess:
    """try_load twice, from ``tmp_path``, with csrc/ replaced by a copy that fails to compile at once."""
    package = _broken_package(tmp_path)
    code = ("import childopt._native as e, childopt._native.spec as s; from pathlib import Path; "
            f"s.PACKAGE_DIR = Path({str(package)!r}); "
            "a = e.try_load(); b = e.try_load(); print('FIRST', a[0], a[1]); print('SAME', a[1] == b[1])")
    return run(["-c", code], env, timeout=300, cwd=tmp_path)


def test_a_failed_build_names_its_log_and_is_not_retried_in_the_process(tmp_path):
    """With a relative CHILDOPT_CACHE_DIR, too: it is made absolute, so the worker (which runs in the private
    build directory) finds its job and the compiler runs."""
    result = _load_broken(tmp_path, env_for("cache"))
    cache_dir = tmp_path / "cache"
    assert result.returncode == 0, result.stderr
    assert "FIRST None building childopt._C failed" in result.stdout and "SAME True" in result.stdout
    assert "FAILED:" in result.stdout and "childopt_test_broken_on_purpose.h" in result.stdout  # the compiler's error
    assert result.stderr.count(BUILDING) == 1
    logs = list((cache_dir / "logs").glob("failed-*.log"))
    assert len(logs) == 1 and str(logs[0]) in result.stdout and "broken_on_purpose" in logs[0].read_text()
    assert not list(cache_dir.glob(".tmp-*")) and not published(cache_dir)


def test_a_build_past_its_time_limit_is_killed_with_its_compilers(tmp_path):
    cache_dir = tmp_path / "cache"
    code = ("import childopt._native as e; m, why = e.try_load(); print('RESULT', m, why)")
    result = python(code, env_for(cache_dir, CHILDOPT_BUILD_TIMEOUT=4), timeout=300)
    assert result.returncode == 0, result.stderr
    assert "RESULT None building childopt._C took longer than CHILDOPT_BUILD_TIMEOUT=4 s" in result.stdout
    (log,) = (cache_dir / "logs").glob("failed-*.log")
    assert "childopt build worker pid" in log.read_text(), "the worker was running"
    assert "built and imported" not in log.read_text(), "it was killed before it finished"
    assert not list(cache_dir.glob(".tmp-*")) and not published(cache_dir)
    deadline = time.monotonic() + 60  # SIGKILLed processes vanish from /proc once reaped
    while processes_under(cache_dir) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not processes_under(cache_dir), "no compiler outlives the killed build"
