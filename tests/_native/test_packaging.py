"""How setup.py and pip use childopt._native: the ahead-of-time build only when asked, and the sources and the
whole package in every wheel."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

import childopt
from childopt._native import config as cfg
from childopt._native import spec
from tests._native.helpers import REPO, env_for


def test_setup_py_builds_the_extension_only_when_asked(tmp_path):
    """setup.py's wiring without compiling: setuptools.setup is replaced by a recorder."""
    code = ("import json, os, sys, setuptools; seen = {}; setuptools.setup = lambda **kw: seen.update(kw); "
            "import runpy; runpy.run_path('setup.py', run_name='__main__'); "
            "ext = seen.get('ext_modules', [None])[0]; "
            "print(json.dumps({'torch': 'torch' in sys.modules, 'ext': ext and [ext.name, ext.sources, "
            "ext.extra_compile_args, ext.include_dirs, ext.extra_link_args], 'cmd': sorted(seen.get('cmdclass', {})), "
            "'max_jobs': os.environ.get('MAX_JOBS'), 'version': seen.get('version')}))")
    env = env_for(tmp_path / "cache")
    plain = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120, cwd=REPO)
    assert plain.returncode == 0, plain.stderr
    assert json.loads(plain.stdout.splitlines()[-1]) == {"torch": False, "ext": None, "cmd": [], "max_jobs": None,
                                                         "version": childopt.__version__}
    aot = subprocess.run([sys.executable, "-c", code], env={**env, "CHILDOPT_BUILD_EXT": "1"}, capture_output=True,
                         text=True, timeout=120, cwd=REPO)
    assert aot.returncode == 0, aot.stderr
    seen = json.loads(aot.stdout.splitlines()[-1])
    name, sources, args, includes, link_args = seen["ext"]
    with_cuda = bool(torch.version.cuda) and cfg.nvcc_path(spec.torch_cuda_home()) is not None
    assert name == "childopt._C" and seen["cmd"] == ["build_ext"] and int(seen["max_jobs"]) >= 1
    assert sources == [p.relative_to(REPO).as_posix() for p in cfg.source_files(REPO / "csrc", with_cuda)]
    openmp = cfg.torch_facts()["openmp"]  # torch's OpenMP runtime: the kernels use its threads
    assert args == {"cxx": cfg.cxx_flags(with_cuda, openmp), "nvcc": cfg.nvcc_flags(with_cuda)}
    assert link_args == cfg.ld_flags(openmp)
    assert str(REPO / "csrc" / "include") in includes
    assert ("CPU kernels only" in aot.stderr) is not with_cuda
    assert seen["version"] == f"{childopt.__version__}+{cfg.local_version(cfg.torch_facts(), with_cuda)}"
    labelled = subprocess.run([sys.executable, "-c", code], env={**env, "CHILDOPT_BUILD_EXT": "1",
                                                               "CHILDOPT_LOCAL_VERSION": ""},
                              capture_output=True, text=True, timeout=120, cwd=REPO)
    assert json.loads(labelled.stdout.splitlines()[-1])["version"] == childopt.__version__, "an empty label: none"


def test_a_regular_install_ships_the_sources(tmp_path):
    """A wheel (what `pip install .` installs) carries csrc/ as childopt/csrc, so it can JIT-build."""
    pytest.importorskip("setuptools")
    source = tmp_path / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.so", "_build_info.json", "build", "*.egg-info")
    for name in ("childopt", "csrc"):
        shutil.copytree(REPO / name, source / name, ignore=ignore)
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy(REPO / name, source / name)
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                             "-w", str(tmp_path / "dist"), str(source)],
                            capture_output=True, text=True, timeout=300, env={**os.environ, "CHILDOPT_BUILD_EXT": "0"})
    if result.returncode != 0 and "bdist_wheel" in result.stdout + result.stderr:
        pytest.skip("no wheel support in this environment's setuptools")
    assert result.returncode == 0, result.stdout + result.stderr
    import zipfile

    (wheel,) = (tmp_path / "dist").glob("childopt-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {f"childopt/csrc/{p.relative_to(REPO / 'csrc').as_posix()}" for p in cfg.hashed_files(REPO / "csrc")}
    assert expected and expected <= names, sorted(expected - names)
    package = {f"childopt/_native/{p.name}" for p in (REPO / "childopt" / "_native").glob("*.py")}
    assert {"childopt/_native/__init__.py", "childopt/_native/config.py", "childopt/_native/worker.py"} <= package
    assert package <= names, sorted(package - names)
    assert not any(n.endswith((".so", "_build_info.json")) for n in names), "a plain wheel is pure Python"
