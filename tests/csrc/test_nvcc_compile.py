"""Compile-only check of every CUDA file in csrc/cuda with nvcc, for every arch a wheel built
with this toolkit carries (childopt._native.config.aot_archs), the PTX of the newest included.

The .cu files include no torch header (only csrc/include and the CUDA runtime), so nvcc
compiles each alone.  Runs wherever nvcc exists (a CUDA toolkit, no GPU needed) and is skipped,
with the reason, where it does not.
"""
import shutil
import subprocess
from pathlib import Path

import pytest

from childopt._native import config as cfg

CSRC = Path(__file__).resolve().parents[2] / "csrc"
CUDA_FILES = sorted((CSRC / "cuda").glob("*.cu"))


def _nvcc():
    home = cfg.find_cuda_home()
    if home:
        return str(Path(home) / "bin" / "nvcc")
    return shutil.which("nvcc")


NVCC = _nvcc()
pytestmark = pytest.mark.skipif(NVCC is None, reason="nvcc not found (no CUDA toolkit: set CUDA_HOME or put nvcc on "
                                                     "PATH to compile-check csrc/cuda)")


def test_there_are_cuda_files_to_check():
    assert CUDA_FILES, f"no .cu files under {CSRC / 'cuda'}"


def _gencode_flags() -> list[str]:
    """-gencode flags of the toolkit's ahead-of-time arch list: a cubin per arch, PTX for the +PTX one."""
    release = cfg.toolkit_release(cfg.tool_version(NVCC))
    if release is None or release < (11, 8):
        pytest.skip(f"{NVCC} is not a toolkit childopt builds wheels with ({cfg.tool_version(NVCC)})")
    flags = []
    for arch in cfg.aot_archs(release):
        sm = cfg.arch_id(arch)
        flags.append(f"-gencode=arch=compute_{sm},code=sm_{sm}")
        if arch.endswith("+PTX"):
            flags.append(f"-gencode=arch=compute_{sm},code=compute_{sm}")
    return flags


@pytest.mark.parametrize("source", CUDA_FILES, ids=[p.name for p in CUDA_FILES])
def test_cuda_file_compiles_for_every_arch_of_the_wheel(source, tmp_path):
    gencode = _gencode_flags()
    cmd = [NVCC, "-c", *cfg.nvcc_flags(with_cuda=True), "-I", str(CSRC / "include"), *gencode,
           str(source), "-o", str(tmp_path / (source.stem + ".o"))]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{' '.join(cmd)}\n{result.stdout}\n{result.stderr}"
    assert (tmp_path / (source.stem + ".o")).stat().st_size > 0


GLUE_FILES = sorted((CSRC / "cuda").glob("*.cpp")) + [CSRC / "bindings.cpp"]


@pytest.mark.parametrize("source", GLUE_FILES, ids=[p.name for p in GLUE_FILES])
def test_cuda_glue_compiles_against_torch_headers(source, tmp_path):
    """The torch side of the CUDA build (ops_cuda.cpp, bindings.cpp with CHILDOPT_WITH_CUDA),
    syntax-checked with the host compiler against the installed torch's headers and the
    toolkit's.  A CPU build of torch ships c10/cuda but not its generated CMake header; an
    empty stand-in supplies it (it only configures DLL export macros)."""
    import sysconfig

    from torch.utils import cpp_extension

    cuda_include = Path(NVCC).resolve().parents[1] / "include"
    if not (cuda_include / "cuda_runtime_api.h").is_file():
        pytest.skip(f"no CUDA runtime headers beside {NVCC}")
    shim = tmp_path / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h"
    shim.parent.mkdir(parents=True)
    shim.write_text("#pragma once\n")
    includes = [*cpp_extension.include_paths(), sysconfig.get_paths()["include"], str(cuda_include),
                str(CSRC / "include"), str(tmp_path)]
    cmd = [shutil.which("c++") or "g++", "-fsyntax-only", "-std=c++17", "-DCHILDOPT_WITH_CUDA",
           "-DTORCH_EXTENSION_NAME=childopt_C_check", *(f"-I{p}" for p in includes), str(source)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{' '.join(cmd)}\n{result.stderr[-4000:]}"
