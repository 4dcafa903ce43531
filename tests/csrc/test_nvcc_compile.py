"""Compile-only check of every CUDA file in csrc/cuda with nvcc, for sm_80 and sm_90.

The .cu files include no torch header (only csrc/include and the CUDA runtime), so nvcc
compiles each alone.  Runs wherever nvcc exists (a CUDA toolkit, no GPU needed) and is skipped,
with the reason, where it does not.
"""
import shutil
import subprocess
from pathlib import Path

import pytest

from childopt import _build_config as cfg

CSRC = Path(__file__).resolve().parents[2] / "csrc"
CUDA_FILES = sorted((CSRC / "cuda").glob("*.cu"))
ARCHS = ("80", "90")


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


@pytest.mark.parametrize("source", CUDA_FILES, ids=[p.name for p in CUDA_FILES])
def test_cuda_file_compiles_for_sm80_and_sm90(source, tmp_path):
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in ARCHS]
    cmd = [NVCC, "-c", *cfg.nvcc_flags(with_cuda=True), "-I", str(CSRC / "include"), *gencode,
           str(source), "-o", str(tmp_path / (source.stem + ".o"))]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{' '.join(cmd)}\n{result.stdout}\n{result.stderr}"
    assert (tmp_path / (source.stem + ".o")).stat().st_size > 0
