"""childopt._native.lock: the build lock times out loudly, names its holder, and is never deleted."""
from __future__ import annotations

import json
import os
import time

from childopt._native import cache, lock
from tests._native.helpers import BUILDING, hold_lock, published


def test_a_held_lock_times_out_then_the_build_is_private_and_published(built_cache):
    out = built_cache.build.stdout + built_cache.build.stderr
    # The progress line names the holder (this test process), then the timeout is loud.
    assert "waiting for another process to build childopt._C" in out
    assert f"pid {os.getpid()} on" in out and "pytest holding the build lock" in out
    assert "gave up waiting for the build lock" in out and "Building privately" in out
    assert BUILDING in out
    builds = published(built_cache.cache)
    assert [p.name for p in builds] == [built_cache.spec.dirname]
    manifest = json.loads((builds[0] / cache.MANIFEST).read_text())
    assert manifest["key"] == built_cache.spec.key and manifest["lock"] == "not held"
    assert not list(built_cache.cache.glob(".tmp-*")), "the private build directory was renamed into place"
    assert not list(builds[0].glob("*.o")), "objects are dropped from a published build"


def test_the_lock_is_never_deleted_and_times_out(tmp_path, caplog):
    path = tmp_path / "locks" / "x.lock"
    fd = hold_lock(path, "pytest")
    try:
        start = time.monotonic()
        with caplog.at_level("WARNING", logger="childopt"), lock.BuildLock(path, 0.5, "x") as held:
            assert held is False
        assert 0.5 <= time.monotonic() - start < 5
        assert "waiting for another process to build x" in caplog.text and "gave up waiting" in caplog.text
        assert lock.lock_state(path) is not None
    finally:
        os.close(fd)
    assert lock.lock_state(path) is None
    with lock.BuildLock(path, 0.5, "x") as held:
        assert held is True
        assert json.loads(path.read_text())["pid"] == os.getpid()
        assert f"pid {os.getpid()}" in lock.lock_state(path)
    assert path.exists() and lock.lock_state(path) is None
