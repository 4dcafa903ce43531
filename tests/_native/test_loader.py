"""childopt._native.loader (and the package's names): the prebuilt module only when its record fits, a published
build without the lock, and clear reasons when nothing can be loaded."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from childopt import _native
from childopt._native import cache, loader
from childopt._native import config as cfg
from tests._native.helpers import (BUILDING, LOAD, LOAD_BODY, build_record, env_for, hold_lock, loaded_path,
                                   python)


def test_the_package_exports_what_callers_use():
    names = {"load", "try_load", "loaded", "status", "prebuilt_record", "check_installed_build", "doctor_main",
             "build_main", "clean_main", "ExtensionUnavailable", "NeedsBuild"}
    assert set(_native.__all__) == names and all(hasattr(_native, name) for name in names)
    assert issubclass(_native.NeedsBuild, _native.ExtensionUnavailable)
    assert _native.loaded() == loader.loaded() and _native.status() == loader.status()


def test_a_published_build_loads_without_the_lock(built_cache, tmp_path):
    """The fast path takes no lock: a held lock costs nothing once the build is published."""
    spec = built_cache.spec
    fd = hold_lock(built_cache.cache / "locks" / f"{spec.dirname}.lock", "pytest again")
    try:
        result = python(LOAD, env_for(built_cache.cache, CHILDOPT_LOCK_TIMEOUT=600), timeout=120)
    finally:
        os.close(fd)
    assert result.returncode == 0, result.stdout + result.stderr
    assert loaded_path(result.stdout).startswith(str(built_cache.cache / spec.dirname))
    assert "waiting" not in result.stderr and BUILDING not in result.stderr


def _fake_prebuilt(directory: Path, record: dict, library: Path | None = None) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    name = record["file"]
    if library is None:
        (directory / name).write_bytes(b"not a library")
    else:
        shutil.copyfile(library, directory / name)
    (directory / cfg.BUILD_INFO_FILE).write_text(json.dumps(record))


def _with_prebuilt_dir(directory: Path, code: str) -> str:
    return ("import childopt._native as e, childopt._native.loader as loader; from pathlib import Path; "
            f"loader.PREBUILT_DIR = Path({str(directory)!r}); {code}")


def test_a_prebuilt_for_another_torch_gives_one_warning_and_the_jit_build(built_cache, tmp_path):
    record, _ = build_record(torch_version="2.0.0+cpu")
    _fake_prebuilt(tmp_path / "prebuilt", {**record, "module": "childopt._C", "file": "_C.so"})
    code = _with_prebuilt_dir(tmp_path / "prebuilt", "import torch; " + LOAD_BODY)
    result = python(code, built_cache.env, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    warnings = [line for line in result.stderr.splitlines() if "prebuilt" in line]
    assert len(warnings) == 1, result.stderr
    assert "it was built for torch 2.0.0+cpu" in warnings[0] and f"this is torch {torch.__version__}" in warnings[0]
    assert loader.PREBUILT_FALLBACK in warnings[0]
    assert loaded_path(result.stdout).startswith(str(built_cache.cache / built_cache.spec.dirname))


def test_a_matching_prebuilt_is_used_without_the_cache(built_cache, tmp_path):
    manifest = json.loads((built_cache.cache / built_cache.spec.dirname / cache.MANIFEST).read_text())
    record = {**manifest["inputs"], "module": manifest["module"], "file": manifest["library"]}
    _fake_prebuilt(tmp_path / "prebuilt", record, built_cache.cache / built_cache.spec.dirname / manifest["library"])
    empty = tmp_path / "empty-cache"
    code = _with_prebuilt_dir(tmp_path / "prebuilt", "import torch; " + LOAD_BODY + "; print('HOW', e.loaded()[1])")
    result = python(code, env_for(empty), timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert loaded_path(result.stdout).startswith(str(tmp_path / "prebuilt"))
    assert "HOW prebuilt for torch" in result.stdout and "prebuilt" not in result.stderr
    assert not empty.exists(), "nothing was built or cached"


def test_loading_with_an_unwritable_cache(built_cache, tmp_path):
    """End to end: no cache anywhere -> a clear error at once; the fallback holding a build -> it loads."""
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    # tempfile skips a TMPDIR it cannot use, so the child points tempfile.tempdir at the file itself.
    code = (f"import tempfile; tempfile.tempdir = {str(blocker)!r}; import childopt._native as e; "
            "m, why = e.try_load(); print('RESULT', m, why)")
    result = python(code, env_for(blocker / "cache"), timeout=120)
    assert result.returncode == 0, result.stderr
    assert f"RESULT None cannot write the extension cache {blocker / 'cache'}" in result.stdout
    assert "CHILDOPT_CACHE_DIR" in result.stdout and BUILDING not in result.stderr
    fallback = python(LOAD, env_for(blocker / "cache", TMPDIR=built_cache.base), timeout=120)
    assert fallback.returncode == 0, fallback.stdout + fallback.stderr
    assert loaded_path(fallback.stdout).startswith(str(built_cache.cache))
