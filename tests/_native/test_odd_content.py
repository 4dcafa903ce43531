"""Lock files and manifests hold whatever was written into them (another childopt version, a user, a crash): their
content is shown, never trusted, so it never breaks a load or doctor; a torch lock whose holder cannot be seen is
kept."""
from __future__ import annotations

import fcntl
import json
import os
import time

import pytest

from childopt._native import build, cache, cli, lock, spec
from childopt._native import config as cfg
from childopt._native.env import hostname
from tests._native.helpers import fake_compile

ODD = [b"[1]", b'"text"', b'{"started": null}', b'{"started": "yesterday"}', b'{"started": 1e300}',
       b'{"pid": "x", "host": [1], "command": {"a": 1}}', b"\xff\xfe not utf-8", b"[" * 100000,
       json.dumps({"pid": 2**31, "host": hostname()}).encode(), json.dumps({"pid": 2**80, "host": hostname()}).encode()]


@pytest.mark.parametrize("content", ODD, ids=range(len(ODD)))
def test_a_lock_held_with_odd_content_is_waited_on_and_reported(tmp_path, caplog, content):
    path = tmp_path / "locks" / "x.lock"
    path.parent.mkdir()
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.write(fd, content)
        holder = lock.lock_state(path)
        assert isinstance(holder, str) and holder, "held, by someone"
        assert [entry["holder"] for entry in lock.build_locks(tmp_path)] == [holder]
        with caplog.at_level("WARNING", logger="childopt"), lock.BuildLock(path, 0.3, "x") as held:
            assert held is False
        assert "gave up waiting for the build lock" in caplog.text
    finally:
        os.close(fd)


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_a_lock_wait_that_is_interrupted_closes_its_file(tmp_path, monkeypatch):
    path = tmp_path / "x.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    fcntl.flock(fd, fcntl.LOCK_EX)

    def interrupted(_):
        raise KeyboardInterrupt

    monkeypatch.setattr(lock.time, "sleep", interrupted)
    try:
        before = _open_fds()
        waiting = lock.BuildLock(path, 60, "x")
        with pytest.raises(KeyboardInterrupt):
            waiting.__enter__()
        assert _open_fds() == before and waiting.fd is None
    finally:
        os.close(fd)


def test_odd_manifest_fields_never_break_doctor_or_the_lookup(tmp_path, monkeypatch, capsys):
    """A manifest whose checksum matches but whose other fields have odd types (hand-edited, another version)."""
    root = tmp_path / "cache"
    monkeypatch.setenv("CHILDOPT_CACHE_DIR", str(root))
    fake_compile(monkeypatch)
    target = spec.build_spec()
    directory, _ = build.build(target)
    manifest = json.loads((directory / cache.MANIFEST).read_text())
    rt = {**spec.runtime(), "torch_cuda": "12.8", "nvcc": "/nonexistent/nvcc", "gpus": [(8, 0)]}
    cuda = spec.build_spec(archs="8.0", rt=rt)
    wide = root / f"{cfg.NAME}-{'f' * 16}"  # a CUDA build of the same base key, found by the arch search
    for odd in ({"inputs": "x"}, {"inputs": {"archs": 5, "with_cuda": True}}, {"inputs": {"archs": [8.0, None]}},
                {"published_at": "yesterday"}, {"published_at": None}, {"inputs": [], "base_key": cuda.base_key}):
        (directory / cache.MANIFEST).write_text(json.dumps({**manifest, **odd}))
        if wide.exists():
            wide.rename(tmp_path / f"old-{time.monotonic_ns()}")
        (root / "staging").mkdir()
        for name in (cache.MANIFEST, manifest["library"]):
            (root / "staging" / name).write_bytes((directory / name).read_bytes())
        json_odd = {**manifest, "base_key": cuda.base_key, **{k: v for k, v in odd.items() if k != "base_key"}}
        (root / "staging" / cache.MANIFEST).write_text(json.dumps(json_odd))
        (root / "staging").rename(wide)
        cli._report_builds(root, directory)
        assert f"{directory.name}  " in capsys.readouterr().out
        assert cache.find_published(cuda, [root]) is None
        recent = None if "published_at" in odd else directory  # an odd time stamp reads as 0: not recent
        assert cache.find_published(target, [root], newer_than=time.time() - 3600) == recent


def test_a_torch_lock_whose_owner_cannot_be_inspected_is_kept(tmp_path, monkeypatch):
    """Its holder is a process of the lock file's owner that this user may not inspect: nobody can tell that it is
    gone, so doctor --fix must keep it; processes of other users cannot hold it and do not count."""
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    path = tmp_path / "ext" / "lock"
    path.parent.mkdir()
    path.write_text("")
    old = time.time() - 2 * lock.TORCH_LOCK_STALE_AGE
    os.utime(path, (old, old))
    owner = path.stat().st_uid
    monkeypatch.setattr(lock, "_open_by", lambda paths: ({str(p): [] for p in paths}, [owner]))
    (entry,) = lock.torch_extension_locks()
    assert entry["stale"] is False and "state unknown" in entry["why"]
    monkeypatch.setattr(lock, "_open_by", lambda paths: ({str(p): [] for p in paths}, [owner + 1]))
    (entry,) = lock.torch_extension_locks()
    assert entry["stale"] is True and "its builder is gone" in entry["why"]
    cli._report_torch_locks(fix=True)
    assert not path.exists()
