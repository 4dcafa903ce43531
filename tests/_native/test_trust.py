"""The loader never loads a published build it cannot trust: a damaged library, a corrupt manifest, a manifest without a
checksum, or a module that does not load is set aside (``.bad-*``) with one message, and the process goes on: auto
takes another backend, native builds again, doctor and clean list it."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from childopt._native import build, cache, lock, spec
from tests._native.helpers import (BUILD_LIMIT, BUILDING, STEP, clean_here, copy_published, damage, env_for,
                                   fake_compile, hold_lock, library_of, loaded_path, run)

# What a user does with the default backend: build an optimizer and step; then whether the library was mapped.
AUTO_STEP = ("import sys, torch; from childopt import MaskedAdamW; p = torch.nn.Parameter(torch.ones(8)); "
             "opt = MaskedAdamW([p], lr=0.1); p.grad = torch.ones(8); opt.step(); assert (p.detach() < 1).all(); "
             "print('BACKEND', opt.backend_name(), 'MAPPED', sys.argv[1] in open('/proc/self/maps').read())")
WHY = {"truncated": "bytes, its manifest records", "overwritten": "does not match the sha256 its manifest records",
       "manifest": "manifest.json is unreadable or corrupt"}


def _untrusted_warnings(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "childopt: not loading" in line]


def _set_aside(root, directory, why: str):
    """The one set-aside copy of ``directory`` in ``root``, checked to record ``why``."""
    (aside,) = root.glob(f".bad-{directory.name}-*")
    assert not directory.exists()
    assert why in json.loads((aside / cache.SET_ASIDE_RECORD).read_text())["why"]
    return aside


@pytest.mark.parametrize("how", ["truncated", "overwritten", "manifest"])
def test_auto_never_loads_a_damaged_build_and_falls_back_with_one_message(built_cache, tmp_path, how):
    root = tmp_path / "cache"
    directory = copy_published(built_cache, root)
    library = library_of(directory).name
    damage(directory, how)
    result = run(["-c", AUTO_STEP, library], env_for(root), timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "BACKEND reference MAPPED False" in result.stdout, "the damaged library was never mapped"
    (warning,) = _untrusted_warnings(result.stderr)
    assert str(directory) in warning and WHY[how] in warning and "set aside as .bad-" in warning
    assert "backend='auto' uses another backend until backend='native' or python -m childopt build" in warning
    assert BUILDING not in result.stderr, "auto never compiles"
    _set_aside(root, directory, WHY[how])


@pytest.mark.parametrize("how", ["truncated", "overwritten"])
def test_info_survives_a_damaged_build(built_cache, tmp_path, how):
    root = tmp_path / "cache"
    directory = copy_published(built_cache, root)
    library = library_of(directory).name
    damage(directory, how)
    result = run(["-m", "childopt", "info"], env_for(root), timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "native   childopt._C needs a build" in result.stdout
    assert f"{directory} is untrusted ({library} " in result.stdout
    assert "cpu: reference" in result.stdout
    assert len(_untrusted_warnings(result.stderr)) == 1, result.stderr
    _set_aside(root, directory, WHY[how])


def test_doctor_and_clean_list_untrusted_and_set_aside_builds(built_cache, tmp_path, monkeypatch, capsys):
    root = tmp_path / "cache"
    directory = copy_published(built_cache, root)
    library = library_of(directory).name
    damage(directory, "overwritten")
    doctor = run(["-m", "childopt", "doctor"], env_for(root), timeout=120)
    assert doctor.returncode == 0, doctor.stdout + doctor.stderr
    assert f"{directory.name}  UNTRUSTED, never loaded: {library} {WHY['overwritten']}" in doctor.stdout
    assert "<- used here" not in doctor.stdout and "childopt._C  needs a build" in doctor.stdout
    code, out, _ = clean_here(monkeypatch, capsys, root, "--dry-run")
    assert code == 0 and f"would remove {directory} (untrusted published build: {library} " in out, out
    assert directory.exists(), "doctor and a dry run change nothing"

    found, (untrusted,) = cache.lookup(built_cache.spec, [root])  # what the next load does first
    assert found is None and cache.set_aside(untrusted) is not None
    aside = _set_aside(root, directory, WHY["overwritten"])
    doctor = run(["-m", "childopt", "doctor"], env_for(root), timeout=120)
    assert f"{aside.name}  STALE (set aside, never loaded: {library} {WHY['overwritten']}" in doctor.stdout, \
        doctor.stdout
    code, out, _ = clean_here(monkeypatch, capsys, root, "--dry-run")
    assert code == 0 and f"would remove {aside} (" in out and aside.exists(), out


def test_native_sets_a_damaged_build_aside_and_builds_it_again(built_cache, tmp_path):
    """The rebuild is stood in for by this process, which holds the build lock and publishes a good copy once the
    loader waits for it: the loader went on to build instead of loading the damaged library."""
    root = tmp_path / "cache"
    directory = copy_published(built_cache, root)
    damage(directory, "truncated")
    fd = hold_lock(lock.lock_path(root, built_cache.spec), "pytest standing in for the rebuild")
    proc = subprocess.Popen([sys.executable, "-c", STEP], env=env_for(root, CHILDOPT_LOCK_TIMEOUT=BUILD_LIMIT),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        before = []
        for line in proc.stderr:
            before.append(line)
            if "waiting for another process to build" in line:
                break
        assert before and "waiting for another process" in before[-1], "".join(before)
        shutil.copytree(built_cache.cache / built_cache.spec.dirname, root / "staging")
        os.rename(root / "staging", directory)
        os.close(fd)
        fd = None
        out, err = proc.communicate(timeout=120)
    finally:
        if fd is not None:
            os.close(fd)
        if proc.poll() is None:
            proc.kill()
    err = "".join(before) + err
    assert proc.returncode == 0, out + err
    (warning,) = _untrusted_warnings(err)
    assert WHY["truncated"] in warning and warning.endswith("building it again")
    assert loaded_path(out).startswith(str(directory) + os.sep) and BUILDING not in err
    (aside,) = root.glob(".bad-*")
    assert WHY["truncated"] in json.loads((aside / cache.SET_ASIDE_RECORD).read_text())["why"]


def test_a_build_that_does_not_load_is_set_aside(tmp_path, monkeypatch):
    """A library that matches its checksum but is no shared object: the load fails, it is set aside, auto goes on."""
    root = tmp_path / "cache"
    monkeypatch.setenv("CHILDOPT_CACHE_DIR", str(root))
    fake_compile(monkeypatch)
    directory, _ = build.build(spec.build_spec())
    result = run(["-c", AUTO_STEP, library_of(directory).name], env_for(root), timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "BACKEND reference MAPPED False" in result.stdout
    (warning,) = _untrusted_warnings(result.stderr)
    assert "it does not load" in warning and "set aside as .bad-" in warning
    _set_aside(root, directory, "it does not load")


def test_a_corrupt_manifest_is_set_aside_and_the_build_published_again(tmp_path, monkeypatch, caplog):
    root = tmp_path / "cache"
    monkeypatch.setenv("CHILDOPT_CACHE_DIR", str(root))
    compiled = fake_compile(monkeypatch)
    target = spec.build_spec()
    first, _ = build.build(target)
    damage(first, "manifest")
    with caplog.at_level("WARNING", logger="childopt"):
        again, how = build.build(target)
    assert again == first and how.startswith("built in") and len(compiled) == 2
    assert cache.verify_build(again)["key"] == target.key
    (warning,) = [r.getMessage() for r in caplog.records if "not loading" in r.getMessage()]
    assert WHY["manifest"] in warning and warning.endswith("building it again")
    (aside,) = root.glob(".bad-*")
    assert WHY["manifest"] in json.loads((aside / cache.SET_ASIDE_RECORD).read_text())["why"]


def test_a_build_published_without_a_checksum_is_not_trusted(tmp_path, monkeypatch):
    """Builds published before checksums were recorded have another key (config.LOADER_VERSION); one under this
    key without a checksum cannot be told from a damaged one, so it is rebuilt rather than trusted."""
    monkeypatch.setenv("CHILDOPT_CACHE_DIR", str(tmp_path / "cache"))
    fake_compile(monkeypatch)
    target = spec.build_spec()
    directory, _ = build.build(target)
    assert cache.lookup(target, [tmp_path / "cache"]) == (directory, [])
    manifest = json.loads((directory / cache.MANIFEST).read_text())
    del manifest["sha256"], manifest["size"]
    (directory / cache.MANIFEST).write_text(json.dumps(manifest))
    found, (untrusted,) = cache.lookup(target, [tmp_path / "cache"])
    assert found is None and untrusted.directory == directory
    assert untrusted.why.startswith(f"its manifest.json records no size and sha256 of {manifest['library']}")
