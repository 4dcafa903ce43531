"""Install childopt.  Metadata lives in pyproject.toml; the version comes from here.

A plain install is pure Python and fast: the Triton kernels compile at first use, and the
native extension childopt._C is built on demand by childopt._native (JIT, into a cache) from the
C++/CUDA sources installed as childopt/csrc.

``CHILDOPT_BUILD_EXT=1`` builds childopt._C here, ahead of time, against the installed torch
(so pass ``--no-build-isolation``: an isolated build environment would bring another torch):

    CHILDOPT_BUILD_EXT=1 pip install --no-build-isolation .
    CHILDOPT_BUILD_EXT=1 pip wheel --no-build-isolation --no-deps -w dist .   # tools/build_wheels.py does this

It builds CUDA kernels when torch has CUDA and nvcc is found (CUDA_HOME), for
CHILDOPT_CUDA_ARCHS if set, else the explicit list of the toolkit's release
(childopt._native.config.AOT_ARCHS_BY_TOOLKIT, +PTX on the newest; never just the build
machine's GPU); CPU kernels only otherwise.  The version gets a local label naming what the
module was built for, ``0.1.0+cu130torch2.11`` or ``0.1.0+cputorch2.13``
(``CHILDOPT_LOCAL_VERSION`` overrides it; empty for none).  Beside the module it writes
``childopt/_build_info.json`` (torch version and git version, torch's CUDA, archs, C++ ABI,
compilers, Python, platform, the source digest and the build key), which travels in the wheel:
at run time the module is used only when that record matches, and the JIT loader takes over
with one message when it does not.
"""
import importlib.util
import json
import os
import sys
import time
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent


def _native_config():
    """childopt/_native/config.py loaded by path: flags, sources and keys shared with the JIT loader."""
    spec = importlib.util.spec_from_file_location("_childopt_native_config",
                                                  ROOT / "childopt" / "_native" / "config.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _say(message):
    print(f"childopt setup.py: {message}", file=sys.stderr, flush=True)


def _arch_list(cfg, nvcc, nvcc_version):
    """CHILDOPT_CUDA_ARCHS, else the explicit list of this toolkit's release; each arch checked against nvcc."""
    env = os.environ.get("CHILDOPT_CUDA_ARCHS", "").strip()
    if env:
        archs, source = cfg.finalize_archs(cfg.parse_archs(env)), "CHILDOPT_CUDA_ARCHS"
    else:
        release = cfg.toolkit_release(nvcc_version)
        if release is None:
            raise SystemExit(f"cannot tell the CUDA release of {nvcc} ({nvcc_version!r}); set CHILDOPT_CUDA_ARCHS")
        archs, source = cfg.aot_archs(release), f"the list for CUDA {release[0]}.{release[1]}"
    known = cfg.nvcc_archs(nvcc)
    missing = [a for a in archs if known is not None and cfg.arch_id(a) not in known]
    if missing:
        raise SystemExit(f"{nvcc} ({nvcc_version}) cannot compile for {', '.join(missing)} (from {source}); "
                         "set CHILDOPT_CUDA_ARCHS to a list it supports")
    return archs, source


def _version(cfg, facts=None, with_cuda=False):
    """childopt.__version__, with the local label of the module built (none for a pure-Python install)."""
    import re

    base = re.search(r'^__version__ = "([^"]+)"', (ROOT / "childopt" / "__init__.py").read_text(), re.M).group(1)
    label = os.environ.get("CHILDOPT_LOCAL_VERSION")
    if label is None:
        label = cfg.local_version(facts, with_cuda) if facts else ""
    return f"{base}+{label}" if label.strip() else base


def _extension_kwargs():
    cfg = _native_config()
    try:
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError as exc:
        raise SystemExit(
            f"CHILDOPT_BUILD_EXT=1 builds childopt._C against the installed torch, which cannot be imported ({exc}). "
            "Install torch first, then: CHILDOPT_BUILD_EXT=1 pip install --no-build-isolation .") from exc

    csrc = ROOT / "csrc"
    facts = cfg.torch_facts()
    nvcc = cfg.nvcc_path(CUDA_HOME) if facts["torch_cuda"] and not facts["torch_hip"] else None
    with_cuda = nvcc is not None
    archs, source = (), ""
    nvcc_version = cfg.tool_version(nvcc) if with_cuda else None
    if with_cuda:
        archs, source = _arch_list(cfg, nvcc, nvcc_version)
        # Set for this build only (this process): torch turns it into the -gencode flags.
        preset = os.environ.get("TORCH_CUDA_ARCH_LIST")
        if preset and preset != ";".join(archs):
            _say(f"ignoring TORCH_CUDA_ARCH_LIST={preset!r}; set CHILDOPT_CUDA_ARCHS to choose the archs")
        os.environ["TORCH_CUDA_ARCH_LIST"] = ";".join(archs)
        _say(f"building childopt._C with CUDA {facts['torch_cuda']} kernels for {';'.join(archs)} (from {source})")
    elif facts["torch_cuda"]:
        _say("torch has CUDA but nvcc was not found (set CUDA_HOME): building childopt._C with CPU kernels only")
    else:
        _say("torch has no CUDA: building childopt._C with CPU kernels only")
    if not os.environ.get("MAX_JOBS", "").strip().isdigit():
        os.environ["MAX_JOBS"] = str(cfg.max_jobs(with_cuda))
        _say(f"MAX_JOBS={os.environ['MAX_JOBS']} (from the CPUs and the available memory)")

    inputs = cfg.key_inputs(facts, cfg.source_digest(csrc), with_cuda, archs, nvcc_version)
    key, base_key = cfg.keys(inputs)
    sources = [p.relative_to(ROOT).as_posix() for p in cfg.source_files(csrc, with_cuda)]
    extension = (CUDAExtension if with_cuda else CppExtension)(
        cfg.PREBUILT_MODULE, sources,
        include_dirs=[str(d) for d in cfg.include_dirs(csrc)],
        extra_compile_args={"cxx": inputs["cxx_flags"], "nvcc": cfg.nvcc_flags(with_cuda)},
        extra_link_args=inputs["ld_flags"],
    )

    version = _version(cfg, facts, with_cuda)
    _say(f"version {version}")

    class BuildExt(BuildExtension):
        """torch's BuildExtension, then the build record beside the module."""

        def run(self):
            super().run()
            library = Path(self.get_ext_fullpath(cfg.PREBUILT_MODULE))
            record = {**inputs, "version": version, "key": key, "base_key": base_key, "module": cfg.PREBUILT_MODULE,
                      "file": library.name, "built_at": time.time(), "builder": "setup.py"}
            (library.parent / cfg.BUILD_INFO_FILE).write_text(json.dumps(record, indent=1) + "\n")
            _say(f"wrote {library.parent / cfg.BUILD_INFO_FILE} (key {key[:16]})")

    return {"version": version, "ext_modules": [extension],
            "cmdclass": {"build_ext": BuildExt.with_options(use_ninja=True)}}


if os.environ.get("CHILDOPT_BUILD_EXT", "").strip().lower() in ("1", "true", "yes", "on"):
    setup(**_extension_kwargs())
else:
    setup(version=_version(_native_config()))
