"""childopt._native.lock: the build lock times out loudly, names its holder, and is never deleted; a build that
gave up on it builds privately and still publishes."""
from __future__ import annotations

import json
import os
import time

from childopt._native import build, cache, lock, spec
from tests._native.helpers import BUILDING, env_for, fake_compile, hold_lock, python


def test_a_held_lock_is_waited_on_naming_its_holder_then_given_up(built_cache):
    out = built_cache.victim.output
    # The progress line names the holder (this test process), then the timeout is loud.
    assert "waiting for another process to build childopt._C" in out
    assert f"pid {os.getpid()} on" in out and "pytest holding the build lock" in out
    assert "gave up waiting for the build lock" in out and "Building privately" in out
    assert BUILDING in out


def test_a_build_that_gave_up_on_the_lock_is_private_and_published(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("CHILDOPT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("CHILDOPT_LOCK_TIMEOUT", "0.5")
    compiled = fake_compile(monkeypatch)
    target = spec.build_spec()
    fd = hold_lock(lock.lock_path(tmp_path / "cache", target), "pytest")
    try:
        with caplog.at_level("WARNING", logger="childopt"):
            directory, how = build.build(target)
    finally:
        os.close(fd)
    assert "gave up waiting for the build lock" in caplog.text and f"pid {os.getpid()}" in caplog.text
    assert directory == tmp_path / "cache" / target.dirname and how.startswith("built in")
    assert len(compiled) == 1 and not compiled[0].exists(), "the private directory was renamed into place"
    manifest = cache.verify_build(directory)
    assert manifest["key"] == target.key and manifest["lock"] == "not held"
    assert not list((tmp_path / "cache").glob(".tmp-*")) and not list(directory.glob("*.o"))


def test_the_lock_is_never_deleted_and_times_out(tmp_path, caplog):
    path = tmp_path / "locks" / "x.lock"
    fd = hold_lock(path, "pytest")
    try:
        start = time.monotonic()
        with caplog.at_level("WARNING", logger="childopt"), lock.BuildLock(path, 0.5, "x") as held:
            assert held is False
        assert time.monotonic() - start >= 0.5, "it waited the whole timeout"
        assert "waiting for another process to build x" in caplog.text and "gave up waiting" in caplog.text
        assert f"held by pid {os.getpid()}" in caplog.text
        assert lock.lock_state(path) is not None
    finally:
        os.close(fd)
    assert lock.lock_state(path) is None
    with lock.BuildLock(path, 0.5, "x") as held:
        assert held is True
        assert json.loads(path.read_text())["pid"] == os.getpid()
        assert f"pid {os.getpid()}" in lock.lock_state(path)
    assert path.exists() and lock.lock_state(path) is None


def test_a_lock_timeout_of_nan_is_refused_not_waited_on_for_ever(tmp_path):
    """No comparison with nan is true, so a wait bounded by it would never end: the build is refused at once."""
    target = spec.build_spec()
    fd = hold_lock(lock.lock_path(tmp_path / "cache", target), "pytest")
    try:
        result = python("import childopt._native as e; print('RESULT', *e.try_load())",
                        env_for(tmp_path / "cache", CHILDOPT_LOCK_TIMEOUT="nan"), timeout=120)
    finally:
        os.close(fd)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "RESULT None CHILDOPT_LOCK_TIMEOUT must be a finite number of seconds >= 0, got 'nan'" in result.stdout
    assert "waiting for another process" not in result.stderr and BUILDING not in result.stderr
