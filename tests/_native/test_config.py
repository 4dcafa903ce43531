"""childopt._native.config: arch lists, arch coverage, the check of a build record, and loading it by path."""
from __future__ import annotations

import subprocess
import sys

import pytest

from childopt._native import config as cfg
from tests._native.helpers import REPO, build_record


def test_config_loads_by_path_without_torch_or_childopt():
    """setup.py and tools/build_wheels.py load it by path where torch may be missing."""
    code = ("import importlib.util, sys; "
            "s = importlib.util.spec_from_file_location('c', sys.argv[1]); m = importlib.util.module_from_spec(s); "
            "s.loader.exec_module(m); "
            "print(m.LOADER_VERSION, sorted(n for n in sys.modules if n.split('.')[0] in ('torch', 'childopt')))")
    out = subprocess.run([sys.executable, "-c", code, str(REPO / "childopt" / "_native" / "config.py")],
                         capture_output=True, text=True, timeout=60, check=True).stdout
    assert out.split() == [str(cfg.LOADER_VERSION), "[]"]


def test_arch_lists_are_normalised_with_ptx_on_the_highest():
    assert cfg.parse_archs("8.0, 86;sm_90 9.0a 10.0+PTX 120") == ["8.0", "8.6", "9.0", "9.0a", "10.0+PTX", "12.0"]
    assert cfg.finalize_archs(["9.0", "8.0", "8.0"]) == ("8.0", "9.0+PTX")
    assert cfg.finalize_archs(["8.6+PTX", "9.0"]) == ("8.6+PTX", "9.0")
    assert cfg.finalize_archs([]) == ()
    for bad in ("ampere", "8", "8.x"):
        with pytest.raises(ValueError, match="not a CUDA arch"):
            cfg.parse_archs(bad)


@pytest.mark.parametrize("archs, gpu, ok, how", [
    (["8.0"], (8, 0), True, "cubin for 8.0"),
    (["8.0"], (8, 6), True, "cubin for 8.0"),           # same major, lower minor: binary compatible
    (["8.6"], (8, 0), False, "no cubin"),               # never a higher minor
    (["8.0"], (9, 0), False, "no cubin"),               # never across majors without PTX
    (["8.0+PTX"], (9, 0), True, "PTX for 8.0"),         # PTX at or below the GPU's arch
    (["9.0+PTX"], (8, 0), False, "no cubin"),           # PTX above it does not run
    (["9.0a"], (9, 0), True, "cubin for 9.0a"),
    (["9.0a"], (10, 0), False, "no cubin"),             # an arch-specific target runs only on itself
    (["8.0", "9.0+PTX"], (12, 0), True, "PTX for 9.0"),
])
def test_arch_coverage(archs, gpu, ok, how):
    got, text = cfg.arch_covers(archs, gpu)
    assert got is ok and how in text


def test_build_records_are_checked_against_torch_cuda_abi_python_sources_and_gpus():
    record, rt = build_record()
    assert cfg.check_record(record, rt) is None
    assert "built for torch 2.0.0" in cfg.check_record({**record, "torch_version": "2.0.0"}, rt)
    assert "git" in cfg.check_record({**record, "torch_git": "f" * 40}, rt)
    assert "CUDA 12.8" in cfg.check_record({**record, "torch_cuda": "12.8"}, rt)
    assert "ABI" in cfg.check_record({**record, "cxx11_abi": not record["cxx11_abi"]}, rt)
    assert "Python cpython-310" in cfg.check_record({**record, "python": "cpython-310"}, rt)
    assert "csrc/ has changed" in cfg.check_record({**record, "sources": "0" * 64}, rt)
    cuda_rt = {**rt, "torch_cuda": "12.8", "gpus": [(9, 0)], "want_cuda": True}
    cuda = {**record, "torch_cuda": "12.8", "with_cuda": True}
    assert cfg.check_record({**cuda, "archs": ["8.0", "9.0"]}, cuda_rt) is None
    assert cfg.check_record({**cuda, "archs": ["8.0+PTX"]}, cuda_rt) is None
    assert "cuda:0 (sm_90) is not covered" in cfg.check_record({**cuda, "archs": ["8.0", "8.6"]}, cuda_rt)
    assert "sm_120" in cfg.check_record({**cuda, "archs": ["9.0a"]}, {**cuda_rt, "gpus": [(9, 0), (12, 0)]})
    assert "no CUDA kernels" in cfg.check_record({**record, "torch_cuda": "12.8"}, cuda_rt)
    assert cfg.check_record({**record, "torch_cuda": "12.8"}, {**cuda_rt, "want_cuda": False}) is None
