"""The one cold build of the tests of childopt._native, of the real CPU sources under csrc/, and what happened on the
way.

A cold build of the CPU extension takes one to three minutes on two cores, so these tests share a
single one, ``built_cache``.  It must be its own, not the per-user cache the rest of the suite
builds into: it starts cold on purpose (a builder is killed in it and three loaders race for it,
which a warm cache cannot show) and it kills processes and holds locks, which no test may do in
a user's cache.  The other tests load from it, copy it before changing anything, use copies of
the sources that fail at once, or replace the compile with a fake one (``fake_compile``).
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest

from childopt._native import spec
from tests._native.helpers import BUILD_LIMIT, STEP, compilers_in, env_for, hold_lock, processes_in, run


def _start(args, env) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def _kill_once_compiling(victim: subprocess.Popen, cache) -> SimpleNamespace:
    """SIGKILL ``victim`` as soon as a compiler runs in its private build directory; what ran there before and after."""
    deadline = time.monotonic() + 300
    compiling, tmp = [], None
    while not compiling and time.monotonic() < deadline and victim.poll() is None:
        found = sorted(cache.glob(".tmp-*"))
        tmp = found[0] if found else None
        compiling = compilers_in(tmp) if tmp else []
        time.sleep(0.1)
    assert compiling, "no compiler ever ran in the builder's private directory"
    assert victim.poll() is None, "the build finished before it could be killed"
    os.kill(victim.pid, signal.SIGKILL)
    output = victim.communicate()[0]
    deadline = time.monotonic() + 60  # the worker's parent-death signal and watchdog end its process group
    while processes_in(tmp) and time.monotonic() < deadline:
        time.sleep(0.2)
    return SimpleNamespace(pid=victim.pid, output=output, tmp=tmp, compilers_before=compiling,
                           left_running=processes_in(tmp))


def _race(env, count: int) -> tuple[list[subprocess.Popen], list[str]]:
    """``count`` processes that each make a ``MaskedAdamW(..., backend="native")`` step, started at once."""
    loaders = [_start(["-c", STEP], env) for _ in range(count)]
    outputs = []
    try:
        outputs = [proc.communicate(timeout=BUILD_LIMIT)[0] for proc in loaders]
    finally:
        for proc in loaders:
            if proc.poll() is None:
                proc.kill()
    return loaders, outputs


@pytest.fixture(scope="session")
def built_cache(tmp_path_factory):
    """A cold cache, built once, as users get there.

    1. This process holds the build lock; ``doctor`` runs (it names the holder).
    2. ``python -m childopt build`` with CHILDOPT_LOCK_TIMEOUT=2 waits, names the holder, gives
       up and builds privately; it is SIGKILLed as soon as its compilers run.
    3. The lock is released and three processes that each make a native step start at once:
       one builds and publishes, the others wait for it and load its build.

    The cache is named as the per-user fallback (``<TMPDIR>/childopt-<uid>``), so that tests with
    ``TMPDIR=base`` find it as the fallback.
    """
    base = tmp_path_factory.mktemp("ext")
    cache = base / f"childopt-{os.getuid()}"
    target = spec.build_spec()
    fd = hold_lock(cache / "locks" / f"{target.dirname}.lock", "pytest holding the build lock")
    try:
        doctor_held = run(["-m", "childopt", "doctor"], env_for(cache), timeout=120, cwd=base)
        victim = _kill_once_compiling(_start(["-m", "childopt", "build"], env_for(cache, CHILDOPT_LOCK_TIMEOUT=2)),
                                      cache)
    finally:
        os.close(fd)
    env = env_for(cache, CHILDOPT_LOCK_TIMEOUT=BUILD_LIMIT)
    loaders, outputs = _race(env, 3)
    return SimpleNamespace(base=base, cache=cache, spec=target, doctor_held=doctor_held, victim=victim,
                           loaders=loaders, outputs=outputs, env=env)
