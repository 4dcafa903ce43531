"""Install childopt.  Metadata lives in pyproject.toml.

A plain install is pure Python and fast: the Triton kernels compile at first use, and the
native extension childopt._C is built on demand by childopt._ext (JIT, into a cache) from the
C++/CUDA sources installed as childopt/csrc.

``CHILDOPT_BUILD_EXT=1`` builds childopt._C here, ahead of time, against the installed torch
(so pass ``--no-build-isolation``: an isolated build environment would bring another torch):

    CHILDOPT_BUILD_EXT=1 pip install --no-build-isolation .

It builds CUDA kernels when torch has CUDA and nvcc is found (CUDA_HOME), for
CHILDOPT_CUDA_ARCHS if set, else the visible GPUs, else a default list (+PTX on the highest);
CPU kernels only otherwise.  Beside the module it writes ``childopt/_build_info.json`` (torch
version and git version, torch's CUDA, archs, C++ ABI, compilers, Python, platform, the source
digest and the build key): at run time the module is used only when that record matches, and
the JIT loader takes over with one message when it does not.
"""
import importlib.util
import json
import os
import sys
import time
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent


def _build_config():
    """childopt/_build_config.py loaded by path: flags, sources and keys shared with the JIT loader."""
    spec = importlib.util.spec_from_file_location("_childopt_build_config", ROOT / "childopt" / "_build_config.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _say(message):
    print(f"childopt setup.py: {message}", file=sys.stderr, flush=True)


def _nvcc_archs(nvcc):
    """The archs this nvcc can compile for ("80", "90", ...), or None if it cannot say."""
    import re
    import subprocess

    try:
        out = subprocess.run([nvcc, "--list-gpu-arch"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    found = set(re.findall(r"compute_(\d+)", out))
    return found or None


def _arch_list(cfg, torch, nvcc):
    """CHILDOPT_CUDA_ARCHS, else the visible GPUs, else DEFAULT_AOT_ARCHS limited to what nvcc supports."""
    env = os.environ.get("CHILDOPT_CUDA_ARCHS", "").strip()
    if env:
        return cfg.finalize_archs(cfg.parse_archs(env)), "CHILDOPT_CUDA_ARCHS"
    if torch.cuda.is_available() and torch.cuda.device_count():
        caps = {torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())}
        return cfg.finalize_archs(f"{major}.{minor}" for major, minor in caps), "the visible GPUs"
    known = _nvcc_archs(nvcc)
    archs = [a for a in cfg.DEFAULT_AOT_ARCHS if known is None or a.replace(".", "") in known]
    return cfg.finalize_archs(archs), "the default list (no GPU visible; set CHILDOPT_CUDA_ARCHS to choose)"


def _extension_kwargs():
    cfg = _build_config()
    try:
        import torch
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
    if with_cuda:
        archs, source = _arch_list(cfg, torch, nvcc)
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

    nvcc_version = cfg.tool_version(nvcc) if with_cuda else None
    inputs = cfg.key_inputs(facts, cfg.source_digest(csrc), with_cuda, archs, nvcc_version)
    key, base_key = cfg.keys(inputs)
    sources = [p.relative_to(ROOT).as_posix() for p in cfg.source_files(csrc, with_cuda)]
    extension = (CUDAExtension if with_cuda else CppExtension)(
        cfg.PREBUILT_MODULE, sources,
        include_dirs=[str(d) for d in cfg.include_dirs(csrc)],
        extra_compile_args={"cxx": cfg.cxx_flags(with_cuda), "nvcc": cfg.nvcc_flags(with_cuda)},
    )

    class BuildExt(BuildExtension):
        """torch's BuildExtension, then the build record beside the module."""

        def run(self):
            super().run()
            library = Path(self.get_ext_fullpath(cfg.PREBUILT_MODULE))
            record = {**inputs, "key": key, "base_key": base_key, "module": cfg.PREBUILT_MODULE,
                      "file": library.name, "built_at": time.time(), "builder": "setup.py"}
            (library.parent / cfg.BUILD_INFO_FILE).write_text(json.dumps(record, indent=1) + "\n")
            _say(f"wrote {library.parent / cfg.BUILD_INFO_FILE} (key {key[:16]})")

    return {"ext_modules": [extension], "cmdclass": {"build_ext": BuildExt.with_options(use_ninja=True)}}


if os.environ.get("CHILDOPT_BUILD_EXT", "").strip().lower() in ("1", "true", "yes", "on"):
    setup(**_extension_kwargs())
else:
    setup()
