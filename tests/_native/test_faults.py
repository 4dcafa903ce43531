"""Faults in the cache never crash or strand a process: a machine without a compiler loads the cache, another user's
build is not damage, a forked child never waits on its parent's threads, a truncated library is refused before it is
mapped, a race is not remembered, and settings that mean nothing here are only noted.  No test here compiles."""
from __future__ import annotations

import _decimal
import errno
import logging
import os
import stat

import pytest
import torch

from childopt import _native, backends
from childopt._native import build, cache, loader, spec
from childopt._native import config as cfg
from childopt._native.elf import elf_problem
from tests._native.helpers import env_for, fake_compile, library_of, python


def test_the_compiler_is_recorded_in_the_manifest_but_a_build_loads_without_it(tmp_path, monkeypatch):
    """Loading needs no compiler: a build published with one is found by a process that has none (nor a new one)."""
    monkeypatch.setenv("CHILDOPT_CACHE_DIR", str(tmp_path / "cache"))
    fake_compile(monkeypatch)
    with_cxx = spec.build_spec()
    directory, _ = build.build(with_cxx)
    assert cache.verify_build(directory)["inputs"]["cxx"] == cfg.tool_version(cfg.cxx_compiler()) is not None
    for compiler in ("/nonexistent/c++", "/nonexistent/g++-99"):
        monkeypatch.setenv("CXX", compiler)
        without = spec.build_spec()
        assert without.inputs["cxx"] is None
        assert cache.find_published(without) == directory


def test_auto_warns_once_when_it_passes_over_a_native_build_it_could_use(monkeypatch, caplog):
    monkeypatch.setattr(_native, "try_load", lambda build=True: (None, "not built yet for this torch"))
    monkeypatch.setattr(_native, "status", lambda: ("needs a build", "python -m childopt build compiles it"))
    backends._announced.clear()
    with caplog.at_level(logging.INFO, logger="childopt"):
        for _ in range(3):
            assert backends.create("auto", torch.device("cpu")).name == "reference"
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings
    assert "backend='auto' uses 'reference' for cpu tensors, not the native backend" in warnings[0]
    assert "not built yet for this torch" in warnings[0] and "python -m childopt build" in warnings[0]
    backends._announced.clear()
    caplog.clear()
    monkeypatch.setattr(_native, "status", lambda: ("unavailable", "no C++ compiler"))
    with caplog.at_level(logging.INFO, logger="childopt"):
        backends.create("auto", torch.device("cpu"))
    assert not [r for r in caplog.records if r.levelno == logging.WARNING], "nothing to gain: no warning"


def test_a_build_this_user_may_not_read_is_left_alone_and_built_privately(tmp_path, monkeypatch, caplog):
    """Another user's build in a shared cache (simulated: reading it raises EACCES, as for a non-root user without
    read permission) is not damage: it stays, and this user builds in the per-user fallback root."""
    shared = tmp_path / "shared"
    monkeypatch.setenv("CHILDOPT_CACHE_DIR", str(shared))
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    compiled = fake_compile(monkeypatch)
    target = spec.build_spec()
    old_umask = os.umask(0o077)
    try:
        theirs, _ = build.build(target)
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(theirs.stat().st_mode) == 0o755
    assert {p.name: stat.S_IMODE(p.stat().st_mode) for p in theirs.iterdir()} == \
        {cache.MANIFEST: 0o644, library_of(theirs).name: 0o644}, "readable by every user of the cache"

    real_sha256 = cache.file_sha256

    def sha256(path, sync=False):
        if shared in path.parents:
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_sha256(path, sync)

    monkeypatch.setattr(cache, "file_sha256", sha256)
    found, (unreadable,) = cache.lookup(target)
    assert found is None and unreadable.directory == theirs and "may not read" in unreadable.why
    with caplog.at_level("WARNING", logger="childopt"):
        assert loader._load_published(target, None, True)[0] is None
        mine, _ = build.build(target)
    assert theirs.is_dir() and not list(shared.glob(".bad-*")), "another user's good build is never set aside"
    assert mine == cache.fallback_root() / target.dirname and len(compiled) == 2
    assert cache.find_published(target) == mine
    assert "left in place" in caplog.text and str(cache.fallback_root()) in caplog.text
    assert theirs not in [path for path, _ in cache.cleanable()], "clean leaves another user's build alone"


def test_a_forked_child_does_not_wait_on_the_loader_lock_of_a_parent_thread(tmp_path):
    """A thread holds the loader's lock (as while it builds) when the process forks (a DataLoader worker)."""
    code = ("import os, threading, childopt._native as e, childopt._native.loader as loader\n"
            "held, done = threading.Event(), threading.Event()\n"
            "def builder():\n"
            "    with loader._lock:\n"
            "        held.set(); done.wait()\n"
            "t = threading.Thread(target=builder); t.start(); held.wait()\n"
            "pid = os.fork()\n"
            "if pid == 0:\n"
            "    print('CHILD', e.try_load(build=False)[1], flush=True); os._exit(0)\n"
            "os.waitpid(pid, 0); done.set(); t.join(); print('PARENT DONE')\n")
    result = python(code, env_for(tmp_path / "cache"), timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "CHILD not built yet" in result.stdout and "PARENT DONE" in result.stdout


def test_a_race_is_not_remembered_for_the_process(tmp_path, monkeypatch):
    """A build removed between lookup and import (a clean in another process) says "try again": and trying again
    works, rather than repeating that error for the life of the process."""
    monkeypatch.setenv("CHILDOPT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(loader, "_state", {"module": None, "how": "", "error": None})
    fake_compile(monkeypatch)
    directory, _ = build.build(spec.build_spec())
    real_lookup = loader.lookup

    def racing_lookup(*args, **kwargs):
        found, untrusted = real_lookup(*args, **kwargs)
        if found is not None:
            os.rename(found, tmp_path / "removed")
        return found, untrusted

    monkeypatch.setattr(loader, "lookup", racing_lookup)
    first = loader.try_load(build=False)
    assert first[0] is None and "was removed while loading it; try again" in first[1]
    second = loader.try_load(build=False)
    assert second[0] is None and second[1].startswith("not built yet"), second
    assert loader._state["error"] is None


def test_a_truncated_library_is_refused_before_it_is_mapped(tmp_path, monkeypatch):
    """A library cut short (here a real extension module, 20 % of it) whose checksum matches its manifest: mapping it
    would kill the process with SIGBUS; it is refused, set aside, and auto goes on."""
    whole = _decimal.__file__
    cut = open(whole, "rb").read()[:os.path.getsize(whole) // 5]
    assert elf_problem(whole) is None and elf_problem(torch._C.__file__) is None
    monkeypatch.setenv("CHILDOPT_CACHE_DIR", str(tmp_path / "cache"))
    fake_compile(monkeypatch, library=cut)
    directory, _ = build.build(spec.build_spec())
    assert elf_problem(library_of(directory)).startswith("it is cut short")
    result = python("import childopt._native as e; print('RESULT', *e.try_load(build=False))",
                    env_for(tmp_path / "cache"), timeout=120)
    assert result.returncode == 0, f"rc {result.returncode}: " + result.stdout + result.stderr
    assert "RESULT None not built yet" in result.stdout and "it is cut short" in result.stdout
    assert "set aside as .bad-" in result.stderr and not directory.exists()


def test_an_arch_list_means_nothing_to_a_cpu_torch_and_is_checked_for_a_cuda_one(monkeypatch):
    monkeypatch.setenv("CHILDOPT_CUDA_ARCHS", "8.O")
    rt = spec.runtime()
    cpu = spec.build_spec(rt={**rt, "torch_cuda": None})
    assert not cpu.with_cuda and cpu.note.startswith("CHILDOPT_CUDA_ARCHS=8.O ignored: torch has no CUDA")
    with pytest.raises(_native.ExtensionUnavailable, match="^CHILDOPT_CUDA_ARCHS: "):
        spec.build_spec(rt={**rt, "torch_cuda": "12.8", "nvcc": "/nonexistent/nvcc"})


def test_a_file_under_the_build_name_is_set_aside_before_building(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    monkeypatch.setenv("CHILDOPT_CACHE_DIR", str(root))
    fake_compile(monkeypatch)
    target = spec.build_spec()
    root.mkdir()
    (root / target.dirname).write_text("a stray file")
    directory, how = build.build(target)
    assert how.startswith("built in") and cache.verify_build(directory)["key"] == target.key
    (aside,) = root.glob(f".bad-{target.dirname}-*")
    assert aside.read_text() == "a stray file"
    assert aside in [entry["path"] for entry in cache.tmp_dirs(root)], "clean lists it"


def test_max_jobs_zero_is_not_unlimited(monkeypatch, caplog):
    monkeypatch.setenv("MAX_JOBS", "0")
    with caplog.at_level("WARNING", logger="childopt"):
        jobs = build._worker_env(spec.build_spec(cpu=True))["MAX_JOBS"]
    assert jobs == str(cfg.max_jobs(False)) and int(jobs) >= 1
    assert "ignoring MAX_JOBS='0'" in caplog.text


def test_a_failed_build_log_that_cannot_be_kept_is_not_named_as_kept(tmp_path):
    log_file = tmp_path / "build.log"
    log_file.write_text("FAILED: x.o\n")
    blocker = tmp_path / "root"
    blocker.write_text("")  # logs/ cannot be made under a file
    saved = build._save_failed_log(blocker, spec.build_spec(cpu=True), log_file)
    assert saved.startswith("not kept (") and str(log_file) not in saved
