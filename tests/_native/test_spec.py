"""childopt._native.spec (with the settings of childopt._native.env): the build this process would make, and its key."""
from __future__ import annotations

import os
import re

import pytest
import torch

from childopt import _native
from childopt._native import cache, env, spec
from tests._native.helpers import copy_package


def test_the_key_changes_with_archs_torch_and_sources_but_not_with_mtimes(built_cache, monkeypatch, tmp_path):
    here = spec.build_spec()
    assert here.key == built_cache.spec.key and not here.with_cuda and here.archs == ()
    old_dir = built_cache.cache / here.dirname
    before = {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in old_dir.iterdir()}

    # Arch lists (a CUDA torch with nvcc, faked): new key, same base key, so a wider build can serve.
    rt = spec.runtime()
    cuda_rt = {**rt, "torch_cuda": "12.8", "nvcc": "/nonexistent/nvcc", "gpus": [(8, 0)], "want_cuda": True}
    a80 = spec.build_spec(rt=cuda_rt)
    a90 = spec.build_spec(rt={**cuda_rt, "gpus": [(9, 0)]})
    assert a80.with_cuda and a80.archs == ("8.0+PTX",) and a90.archs == ("9.0+PTX",)
    assert len({here.key, a80.key, a90.key}) == 3 and a80.base_key == a90.base_key != here.base_key
    monkeypatch.setenv("CHILDOPT_CUDA_ARCHS", "80,sm_90")
    both = spec.build_spec(rt=cuda_rt)
    assert both.archs == ("8.0", "9.0+PTX") and both.key not in (a80.key, a90.key)
    monkeypatch.delenv("CHILDOPT_CUDA_ARCHS")

    # torch version and git version.
    monkeypatch.setattr(torch, "__version__", "2.13.1+cpu")
    bumped = spec.build_spec()
    monkeypatch.undo()
    monkeypatch.setattr(torch.version, "git_version", "0" * 40)
    other_git = spec.build_spec()
    monkeypatch.undo()
    assert len({here.key, bumped.key, other_git.key}) == 3

    # One source byte; mtimes alone change nothing.
    package = copy_package(tmp_path)
    monkeypatch.setattr(spec, "PACKAGE_DIR", package)
    copy = spec.build_spec()
    assert copy.key == here.key
    for path in (package / "csrc").rglob("*"):
        os.utime(path, (1e9, 1e9))
    assert spec.build_spec().key == here.key
    target = package / "csrc" / "cpu" / "fisher_accumulate.cpp"
    target.write_bytes(target.read_bytes() + b"\n")
    edited = spec.build_spec()
    assert edited.key != here.key
    monkeypatch.undo()

    # None of them finds the published build, which nothing touched.
    for other in (a80, a90, both, bumped, other_git, edited):
        assert cache.find_published(other, [built_cache.cache]) is None
        assert not (built_cache.cache / other.dirname).exists()
    assert cache.find_published(here, [built_cache.cache]) == old_dir
    assert {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in old_dir.iterdir()} == before


@pytest.mark.parametrize("variable, read", [("CHILDOPT_LOCK_TIMEOUT", env.lock_timeout),
                                            ("CHILDOPT_BUILD_TIMEOUT", env.build_timeout)])
def test_timeouts_must_be_finite_numbers_of_seconds(monkeypatch, variable, read):
    for text in ("soon", "nan", "inf", "-1", "1e999"):
        monkeypatch.setenv(variable, text)
        with pytest.raises(_native.ExtensionUnavailable,
                           match=re.escape(f"{variable} must be a finite number of seconds >= 0, got {text!r}")):
            read()
        assert env.setting_problems() == [f"{variable} must be a finite number of seconds >= 0, got {text!r}"]
    monkeypatch.setenv(variable, " 2.5 ")
    assert read() == 2.5 and env.setting_problems() == []


def test_bad_environment_values_are_reported():
    with pytest.raises(_native.ExtensionUnavailable, match="cannot build CUDA kernels for 8.0: torch has no CUDA"):
        spec.build_spec(archs="8.0", rt={**spec.runtime(), "torch_cuda": None})
    with pytest.raises(_native.ExtensionUnavailable, match="--archs: not a CUDA arch"):
        spec.build_spec(archs="volta")
