"""The shared cold build of the tests of childopt._native, with the real CPU sources under csrc/.

Each cold build of the CPU extension takes one to two minutes on two cores, so the tests share
two of them: ``built_cache`` here (``python -m childopt build`` on a cold cache while this
process holds the build lock) and ``cold_start`` in test_build.py (a builder SIGKILLed
mid-compile, then three concurrent cold loaders).  The other tests load from those caches, use
copies of the sources that fail at once, or check the key and record logic in-process.
"""
from __future__ import annotations

import os
import time
from types import SimpleNamespace

import pytest

from childopt._native import spec
from tests._native.helpers import env_for, hold_lock, run


@pytest.fixture(scope="session")
def built_cache(tmp_path_factory):
    """``python -m childopt build`` on a cold cache while this process holds the build lock.

    The cache is named as the per-user fallback (``<TMPDIR>/childopt-<uid>``), so that tests
    with ``TMPDIR=base`` find it as the fallback.  ``doctor`` runs once while the lock is held.
    """
    base = tmp_path_factory.mktemp("ext")
    cache = base / f"childopt-{os.getuid()}"
    env = env_for(cache, CHILDOPT_LOCK_TIMEOUT=3)
    build_spec = spec.build_spec()
    fd = hold_lock(cache / "locks" / f"{build_spec.dirname}.lock", "pytest holding the build lock")
    try:
        start = time.monotonic()
        build = run(["-m", "childopt", "build"], env, cwd=base)
        seconds = time.monotonic() - start
        doctor_held = run(["-m", "childopt", "doctor"], env, timeout=120, cwd=base)
    finally:
        os.close(fd)
    assert build.returncode == 0, build.stdout + build.stderr
    return SimpleNamespace(base=base, cache=cache, spec=build_spec, build=build, seconds=seconds,
                           doctor_held=doctor_held, env=env)
