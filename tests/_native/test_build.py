"""childopt._native.build and childopt._native.worker: a build runs in a child process that never imports childopt,
dies with its parent and its time limit, names its log when it fails, and is published once however many
processes want it."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from childopt._native import build, spec, worker
from tests._native.helpers import (BUILD_LIMIT, BUILDING, LOAD, STEP, copy_package, env_for, loaded_path, processes_in,
                                   processes_under, published, python)


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


@pytest.fixture(scope="module")
def cold_start(tmp_path_factory):
    """A builder SIGKILLed mid-compile on a cold cache, then three processes that each make a
    ``MaskedAdamW(..., backend="native")`` step, started at once."""
    cache = tmp_path_factory.mktemp("cold") / "cache"
    env = env_for(cache, CHILDOPT_LOCK_TIMEOUT=BUILD_LIMIT)
    victim = subprocess.Popen([sys.executable, "-c", LOAD], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 180
    ninja_file = None
    while ninja_file is None and time.monotonic() < deadline and victim.poll() is None:
        found = list(cache.glob(".tmp-*/build.ninja"))
        ninja_file = found[0] if found else None
        time.sleep(0.1)
    assert ninja_file is not None, "the builder never wrote build.ninja"
    time.sleep(3)  # well into compiling (a translation unit takes tens of seconds)
    assert victim.poll() is None, "the build finished before it could be killed"
    killed_tmp = ninja_file.parent
    compilers_before = processes_in(killed_tmp)
    os.kill(victim.pid, signal.SIGKILL)
    victim.communicate()
    time.sleep(2)  # the worker's parent-death signal and watchdog end its process group
    left_running = processes_in(killed_tmp)

    start = time.monotonic()
    loaders = [subprocess.Popen([sys.executable, "-c", STEP], env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True) for _ in range(3)]
    outputs = []
    for proc in loaders:
        try:
            outputs.append(proc.communicate(timeout=BUILD_LIMIT)[0])
        except subprocess.TimeoutExpired:
            for p in loaders:
                p.kill()
            raise
    return SimpleNamespace(cache=cache, killed_tmp=killed_tmp, compilers_before=compilers_before,
                           left_running=left_running, loaders=loaders, outputs=outputs,
                           seconds=time.monotonic() - start)


def test_a_builder_killed_mid_compile_never_blocks_the_next_load(cold_start):
    assert cold_start.compilers_before, "ninja or a compiler was running in the private build directory"
    assert cold_start.left_running == [], "the killed builder's compilers must die with it"
    for proc, out in zip(cold_start.loaders, cold_start.outputs):
        assert proc.returncode == 0, out
    # One cold build on two cores, not a wait on anything the dead builder left.
    assert cold_start.seconds < 420
    assert cold_start.killed_tmp.exists(), "the dead builder's directory is left for clean, never reused"
    assert all(str(cold_start.killed_tmp) not in loaded_path(out) for out in cold_start.outputs)


def test_concurrent_cold_loaders_compile_once_and_load_the_same_build(cold_start):
    builds = sum(out.count(BUILDING) for out in cold_start.outputs)
    assert builds == 1, "\n---\n".join(cold_start.outputs)
    paths = {loaded_path(out) for out in cold_start.outputs}
    builds = published(cold_start.cache)
    assert len(builds) == 1 and len(paths) == 1
    assert paths.pop().startswith(str(builds[0]) + os.sep)
    assert [p for p in cold_start.cache.glob(".tmp-*")] == [cold_start.killed_tmp]


def _broken_package(tmp_path: Path) -> Path:
    """A copy of csrc/ whose every translation unit fails at its first line (a missing header is fatal at once)."""
    package = copy_package(tmp_path)
    for source in (package / "csrc").rglob("*.cpp"):
        source.write_text('#include "childopt_test_broken_on_purpose.h"\n' + source.read_text())
    return package


def test_a_failed_build_names_its_log_and_is_not_retried_in_the_process(tmp_path):
    package = _broken_package(tmp_path)
    cache = tmp_path / "cache"
    code = ("import childopt._native as e, childopt._native.spec as s; from pathlib import Path; "
            f"s.PACKAGE_DIR = Path({str(package)!r}); "
            "a = e.try_load(); b = e.try_load(); print('FIRST', a[0], a[1]); print('SAME', a[1] == b[1])")
    result = python(code, env_for(cache), timeout=300)
    assert result.returncode == 0, result.stderr
    assert "FIRST None building childopt._C failed" in result.stdout and "SAME True" in result.stdout
    assert "FAILED:" in result.stdout and "childopt_test_broken_on_purpose.h" in result.stdout  # the compiler's error
    assert result.stderr.count(BUILDING) == 1
    logs = list((cache / "logs").glob("failed-*.log"))
    assert len(logs) == 1 and str(logs[0]) in result.stdout and "broken_on_purpose" in logs[0].read_text()
    assert not list(cache.glob(".tmp-*")) and not published(cache)


def test_a_build_past_its_time_limit_is_killed_with_its_compilers(tmp_path):
    cache = tmp_path / "cache"
    code = ("import childopt._native as e; m, why = e.try_load(); print('RESULT', m, why)")
    start = time.monotonic()
    result = python(code, env_for(cache, CHILDOPT_BUILD_TIMEOUT=4), timeout=300)
    assert result.returncode == 0, result.stderr
    assert time.monotonic() - start < 60
    assert "RESULT None building childopt._C took longer than CHILDOPT_BUILD_TIMEOUT=4 s" in result.stdout
    assert not list(cache.glob(".tmp-*")) and not published(cache)
    time.sleep(0.5)
    assert not processes_under(cache), "no compiler outlives the killed build"
