"""childopt._native.cache: finding published builds, the per-user fallback root, and cleaning the cache."""
from __future__ import annotations

import json
import os
import re
import shutil
import socket
import time

import pytest

from childopt import _native
from childopt._native import cache, spec
from childopt._native import config as cfg
from tests._native.helpers import clean_here, copy_published, read_only


def test_a_build_for_more_archs_serves_a_gpu_it_covers(tmp_path):
    """find_published: the exact key first, then a build of the same base key covering every visible GPU."""
    rt = {**spec.runtime(), "torch_cuda": "12.8", "nvcc": "/nonexistent/nvcc", "want_cuda": True}
    os.environ["CHILDOPT_CUDA_ARCHS"] = "8.0,9.0"
    try:
        wide = spec.build_spec(rt={**rt, "gpus": []})
    finally:
        del os.environ["CHILDOPT_CUDA_ARCHS"]
    directory = tmp_path / wide.dirname
    directory.mkdir()
    library = directory / f"{wide.module_name}.so"
    library.write_bytes(b"")
    (directory / cache.MANIFEST).write_text(json.dumps(
        {"key": wide.key, "base_key": wide.base_key, "inputs": wide.inputs, "library": library.name,
         "module": wide.module_name, "published_at": time.time(), "size": 0, "sha256": cache.file_sha256(library)}))
    assert cache.find_published(spec.build_spec(rt={**rt, "gpus": [(8, 6)]}), [tmp_path]) == directory  # sm_80 cubin
    assert cache.find_published(spec.build_spec(rt={**rt, "gpus": [(12, 0)]}), [tmp_path]) == directory  # PTX 9.0
    assert cache.find_published(spec.build_spec(rt={**rt, "gpus": [(7, 5)]}), [tmp_path]) is None
    # CHILDOPT_FORCE_REBUILD ignores builds published before the process started.
    assert cache.find_published(wide, [tmp_path], newer_than=time.time() + 1) is None


def test_an_unwritable_cache_falls_back_to_the_per_user_temp_dir(tmp_path, monkeypatch, caplog):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    # A path under a regular file can be created by nobody, root included (chmod does not stop root).
    monkeypatch.setenv("CHILDOPT_CACHE_DIR", str(blocker / "cache"))
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    with caplog.at_level("WARNING", logger="childopt"):
        root = cache.writable_root()
    assert root == tmp_path / "tmp" / f"childopt-{os.getuid()}" and (root / "locks").is_dir()
    assert f"cannot write the extension cache {blocker / 'cache'}" in caplog.text
    assert "CHILDOPT_CACHE_DIR" in caplog.text and str(root) in caplog.text
    assert oct(root.stat().st_mode & 0o777) == "0o700"
    monkeypatch.setattr("tempfile.tempdir", str(blocker))
    with pytest.raises(_native.ExtensionUnavailable,
                       match=r"cannot write the extension cache .*CHILDOPT_CACHE_DIR.*nor the fallback .*"
                             r"Set CHILDOPT_CACHE_DIR"):
        cache.writable_root()


def test_clean_removes_stale_and_unused_builds_but_not_the_current_one(built_cache, tmp_path, monkeypatch, capsys):
    cache_dir = tmp_path / "cache"
    shutil.copytree(built_cache.cache, cache_dir)
    current = cache_dir / built_cache.spec.dirname
    unused = cache_dir / f"{cfg.NAME}-{'0' * 16}"
    shutil.copytree(current, unused)
    manifest = json.loads((unused / cache.MANIFEST).read_text())
    (unused / cache.MANIFEST).write_text(json.dumps({**manifest, "key": "0" * 64}))
    host = re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname())
    dead = cache_dir / f".tmp-{'1' * 16}-{host}-{2**22 + 12345}-abcd1234"  # pid above pid_max: gone
    live = cache_dir / f".tmp-{'2' * 16}-{host}-{os.getppid()}-abcd1234"  # pytest's parent: running
    dead.mkdir()
    live.mkdir()
    (cache_dir / "logs").mkdir(exist_ok=True)
    (cache_dir / "logs" / "failed-x.log").write_text("x")
    code, out, err = clean_here(monkeypatch, capsys, cache_dir, "--dry-run")
    assert code == 0 and f"would remove {unused} (published build not used here)" in out and unused.exists(), out + err
    code, out, err = clean_here(monkeypatch, capsys, cache_dir)
    assert code == 0, out + err
    assert not unused.exists() and not dead.exists() and not (cache_dir / "logs" / "failed-x.log").exists()
    assert current.exists() and live.exists() and list((cache_dir / "locks").glob("*.lock"))
    code, out, err = clean_here(monkeypatch, capsys, cache_dir, "--all")
    assert code == 0 and f"removed {current} (published build (current))" in out, out + err
    assert not current.exists() and live.exists()
    assert list((cache_dir / "locks").glob("*.lock")), "lock files are never deleted"


def test_clean_removes_only_entries_childopt_named_in_a_shared_cache_folder(tmp_path, monkeypatch, capsys):
    """CHILDOPT_CACHE_DIR may be a folder the user shares (/tmp, a Docker volume): their '.old-photos',
    '.tmp-thesis' and '.bad-ideas.txt' are not leftovers, and a 'logs' link leads out of the cache;
    clean removes childopt's asides and private directories only, and nothing through the link."""
    cache_dir, outside = tmp_path / "cache", tmp_path / "elsewhere"
    cache_dir.mkdir()
    outside.mkdir()
    users = [cache_dir / ".old-photos", cache_dir / ".tmp-thesis", cache_dir / ".bad-ideas.txt",
             cache_dir / f".old-{cfg.NAME}", outside / "failed-nightly.log"]
    users[0].mkdir()
    (users[0] / "holiday.jpg").write_text("pixels")
    users[1].mkdir()
    for path in users[2:]:
        path.write_text("mine")
    os.utime(users[1], (time.time() - 2 * 86400,) * 2)  # stale, were it a build directory of another host
    (cache_dir / "logs").symlink_to(outside)
    host = re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname())
    ours = [cache_dir / name for name in (
        f".old-{cfg.NAME}-{'3' * 16}-{host}-1-ab12", f".bad-{cfg.NAME}-{'4' * 16}-{host}-1-cd",
        f".old-rm-tmp-{'5' * 16}-{host}-{2**22 + 1}-x_y-7", f".old-rm-{cfg.NAME}-{'6' * 16}-9",
        f".tmp-{'7' * 16}-{host}-{2**22 + 12345}-abcd1234")]
    for path in ours:
        path.mkdir()
    code, out, err = clean_here(monkeypatch, capsys, cache_dir, "--all")
    assert code == 0, out + err
    assert all(path.exists() for path in users), out
    assert not any(path.exists() for path in ours), out


@pytest.mark.parametrize("variable, below", [("CHILDOPT_CACHE_DIR", ""), ("XDG_CACHE_HOME", "childopt")])
def test_a_relative_cache_root_is_absolute_and_stays_put(tmp_path, monkeypatch, variable, below):
    """Made absolute against the working directory of its first use, so a later chdir does not move the cache."""
    monkeypatch.delenv("CHILDOPT_CACHE_DIR", raising=False)
    monkeypatch.setenv(variable, f"rel-{tmp_path.name}-{variable}")
    monkeypatch.chdir(tmp_path)
    root = cache.cache_root()
    assert root == tmp_path / f"rel-{tmp_path.name}-{variable}" / below and root.is_absolute()
    monkeypatch.chdir(tmp_path.parent)
    assert cache.cache_root() == root


def test_clean_reports_only_what_it_removed_and_fails_naming_the_rest(built_cache, tmp_path, monkeypatch, capsys):
    cache_dir = tmp_path / "cache"
    current = copy_published(built_cache, cache_dir)
    unused = cache_dir / f"{cfg.NAME}-{'0' * 16}"
    shutil.copytree(current, unused)
    log = cache_dir / "logs" / "failed-x.log"
    log.parent.mkdir()
    log.write_text("x")
    with read_only(cache_dir):
        code, out, err = clean_here(monkeypatch, capsys, cache_dir, "--all")
    assert code == 1 and "removed" not in out, out + err
    for path in (current, unused, log):
        assert path.exists() and f"error: could not remove {path} (" in err, err
    with read_only(log.parent):
        code, out, err = clean_here(monkeypatch, capsys, cache_dir, "--all")
    assert code == 1, out + err
    assert f"removed {current} (" in out and f"removed {unused} (" in out and str(log) not in out
    assert f"error: could not remove {log} (failed-build log): " in err
    assert not current.exists() and not unused.exists() and log.exists()
    code, out, err = clean_here(monkeypatch, capsys, cache_dir, "--all")
    assert code == 0 and f"removed {log} (failed-build log)" in out and not log.exists()
