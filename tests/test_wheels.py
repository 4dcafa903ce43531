"""Wheels (tools/build_wheels.py, setup.py's labels) and the runtime guard of an installed build.

The end-to-end test builds the ``+cpu`` wheel with the running torch, installs it into a fresh
virtual environment with nothing but torch and childopt's dependencies, and runs
tools/wheel_smoke.py there: the prebuilt childopt._C loads with no JIT build and its ops step
like the reference backend; then, with the installed build record altered to another torch,
the guard warns once at import and the optimizer falls back and stays correct.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

import childopt
from childopt._native import config as cfg

REPO = Path(__file__).resolve().parents[1]


def _load_tool(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


build_wheels = _load_tool("build_wheels")


@pytest.mark.parametrize("banner, release", [
    ("Cuda compilation tools, release 13.0, V13.0.88", (13, 0)),
    ("Cuda compilation tools, release 11.8, V11.8.89", (11, 8)),
    ("gcc (Debian 12.2.0-14) 12.2.0", None),
    (None, None),
])
def test_toolkit_release_is_read_from_the_nvcc_banner(banner, release):
    assert cfg.toolkit_release(banner) == release


def test_each_toolkit_has_an_explicit_arch_list_with_ptx_on_the_newest():
    assert cfg.aot_archs((11, 8)) == ("7.0", "7.5", "8.0", "8.6", "8.9", "9.0+PTX")
    assert cfg.aot_archs((12, 6)) == cfg.aot_archs((11, 8))            # Blackwell needs 12.8
    assert cfg.aot_archs((12, 8))[-3:] == ("9.0", "10.0", "12.0+PTX")
    assert cfg.aot_archs((13, 0)) == ("7.5", "8.0", "8.6", "8.9", "9.0", "10.0", "12.0+PTX")  # 13 dropped Volta
    with pytest.raises(ValueError, match="older than the oldest toolkit"):
        cfg.aot_archs((11, 7))


def test_the_local_nvcc_compiles_every_arch_of_its_list():
    home = cfg.find_cuda_home()
    if home is None:
        pytest.skip("no CUDA toolkit here (set CUDA_HOME)")
    nvcc = str(Path(home) / "bin" / "nvcc")
    release = cfg.toolkit_release(cfg.tool_version(nvcc))
    if release is None or release < (11, 8):
        pytest.skip(f"{nvcc} is not a toolkit childopt builds wheels with ({cfg.tool_version(nvcc)})")
    known = cfg.nvcc_archs(nvcc)
    assert known and {cfg.arch_id(a) for a in cfg.aot_archs(release)} <= known, sorted(known or ())


def test_nvcc_arch_names_keep_their_suffix():
    assert cfg.arch_id("9.0a+PTX") == "90a" and cfg.arch_id("12.0") == "120"


def test_wheel_labels_name_torchs_cuda_and_release():
    assert cfg.local_version({"torch_version": "2.11.0+cu130", "torch_cuda": "13.0"}, True) == "cu130torch2.11"
    assert cfg.local_version({"torch_version": "2.13.0+cpu", "torch_cuda": None}, False) == "cputorch2.13"
    # A CUDA torch without nvcc builds CPU kernels only; the module still needs that CUDA torch.
    assert cfg.local_version({"torch_version": "2.8.0", "torch_cuda": "12.8"}, False) == "cu128cpuonlytorch2.8"


def test_an_installed_build_fits_any_torch_of_its_release_only():
    record = {"torch_version": "2.11.0+cu130", "torch_git": "a" * 40, "torch_cuda": "13.0", "cxx11_abi": True,
              "python": cfg.python_tag(), "platform": cfg.platform_tag(), "with_cuda": True, "archs": ["9.0+PTX"]}
    patch = {**record, "torch_version": "2.11.1+cu130", "torch_git": "b" * 40, "gpus": [], "sources": None}
    assert cfg.check_record(record, patch, same_release=True) is None
    assert "built for torch 2.11.0" in cfg.check_record(record, patch)          # a JIT build needs the exact torch
    assert "built for torch 2.11.0" in cfg.check_record(record, {**patch, "torch_version": "2.12.0+cu130"},
                                                        same_release=True)
    assert "CUDA 13.0" in cfg.check_record(record, {**patch, "torch_cuda": "12.8"}, same_release=True)
    # Nightlies, pre-releases and source builds promise no ABI: only the exact torch fits.
    for version in ("2.11.0.dev20260101+cu130", "2.11.0a0+gitabc1234", "2.11.0rc1"):
        assert "built for torch" in cfg.check_record(record, {**patch, "torch_version": version}, same_release=True)
    assert "ROCm" in cfg.check_record(record, {**patch, "torch_hip": "6.4"}, same_release=True)


def test_the_guard_speaks_once_at_import_and_never_raises(tmp_path, monkeypatch, caplog):
    from childopt import _native
    from childopt._native import errors, loader

    monkeypatch.setattr(loader, "PREBUILT_DIR", tmp_path)
    monkeypatch.setattr(errors, "_warned", set())
    assert _native.check_installed_build() is None, "no record: nothing to say"
    (tmp_path / "_C.so").write_bytes(b"")
    rt = {**cfg.torch_facts(), "python": cfg.python_tag(), "platform": cfg.platform_tag()}
    (tmp_path / cfg.BUILD_INFO_FILE).write_text(json.dumps({**rt, "torch_version": "2.6.0", "file": "_C.so"}))
    with caplog.at_level("WARNING", logger="childopt"):
        message = _native.check_installed_build()
        assert _native.check_installed_build() == message
    assert "built for torch 2.6.0" in message and f"this is torch {torch.__version__}" in message
    assert loader.PREBUILT_FALLBACK in message and caplog.text.count("built for torch 2.6.0") == 1
    (tmp_path / cfg.BUILD_INFO_FILE).write_text(json.dumps({**rt, "file": "_C.so"}))
    assert _native.check_installed_build() is None, "a record for this torch fits (the GPU is checked at load)"
    (tmp_path / cfg.BUILD_INFO_FILE).write_text("{not json")
    assert "unreadable" in _native.check_installed_build()
    (tmp_path / cfg.BUILD_INFO_FILE).write_text("[1, 2]")
    assert "not a JSON object" in _native.check_installed_build()


def test_the_ci_matrix_covers_each_torch_release_for_cpu_and_its_cuda_versions():
    out = subprocess.run([sys.executable, str(REPO / "tools" / "build_wheels.py"), "--print-matrix"],
                         capture_output=True, text=True, timeout=60, check=True).stdout
    cells = json.loads(out)["include"]
    assert cells == build_wheels.matrix() and len({json.dumps(c, sort_keys=True) for c in cells}) == len(cells)
    for release, (cudas, pythons) in build_wheels.TORCH_RELEASES.items():
        assert {c["cuda"] for c in cells if c["torch"] == release} == {"cpu", *cudas}
        for cuda in cudas:
            assert cfg.aot_archs(tuple(int(x) for x in cuda.split("."))), cuda
    assert "12.1" not in {c["cuda"] for c in cells}, "no torch >= 2.6 was built with CUDA 12.1"
    # every gcc pin names a CUDA of the matrix
    assert set(build_wheels.HOST_GCC) <= {c["cuda"] for c in cells}
    per_cuda = build_wheels.matrix(per_cuda=True)       # pull requests: one cell per CUDA, its newest torch
    assert sorted(c["cuda"] for c in per_cuda) == sorted({c["cuda"] for c in cells}) and set(map(str, per_cuda)) <= \
        set(map(str, cells))
    assert next(c for c in per_cuda if c["cuda"] == "11.8")["torch"] == "2.7"


@pytest.mark.parametrize("argv, error", [
    ([], "--cuda is required"),
    (["--cuda", "12"], "neither cpu nor a CUDA version"),
    (["--cuda", "cpu", "--torch", "1.13"], "not in the known releases"),
])
def test_build_wheels_refuses_bad_arguments(argv, error, capsys):
    with pytest.raises(SystemExit) as exited:
        build_wheels.parse_args(argv)
    assert exited.value.code == 2  # argparse's usage error
    assert error in capsys.readouterr().err


def test_pip_toolkits_start_at_cuda_13():
    assert build_wheels.pip_toolkit_packages("13.0") == ["nvidia-cuda-nvcc==13.0.*", "nvidia-cuda-crt==13.0.*",
                                                         "nvidia-cuda-runtime==13.0.*", "nvidia-cuda-cccl==13.0.*",
                                                         "nvidia-nvvm==13.0.*"]
    with pytest.raises(SystemExit) as exited:
        build_wheels.pip_toolkit_packages("12.8")
    assert "ptxas but no nvcc" in exited.value.code  # a message as the code: printed, exit status 1


# ----------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_the_cpu_wheel_builds_installs_in_a_fresh_venv_and_runs(tmp_path):
    """tools/build_wheels.py --smoke builds the +cpu wheel and runs tools/wheel_smoke.py in a fresh venv; then,
    with the installed record naming another torch, the guard speaks once and the optimizer falls back.

    The fresh venv gets this torch (``torch==<its version>``) from CHILDOPT_TEST_TORCH_INDEX (default PyPI;
    CI machines also find the CPU build in pip's configured find-links)."""
    if torch.version.cuda:
        pytest.skip("this torch has CUDA: the +cpu wheel is built where torch is a CPU build (CI)")
    work, dist = tmp_path / "work", tmp_path / "dist"
    repair = ["--repair"] if importlib.util.find_spec("auditwheel") else []
    index = os.environ.get("CHILDOPT_TEST_TORCH_INDEX", build_wheels.PYPI)
    build = subprocess.run([sys.executable, str(REPO / "tools" / "build_wheels.py"), "--cuda", "cpu", "--in-this-env",
                            *repair, "--smoke", "--index", index, "--work", str(work), "--out", str(dist)],
                           capture_output=True, text=True, timeout=1800)
    assert build.returncode == 0, build.stdout + build.stderr[-6000:]
    (wheel,) = dist.glob("childopt-*.whl")
    label = cfg.local_version(cfg.torch_facts(), with_cuda=False)
    assert wheel.name.startswith(f"childopt-{childopt.__version__}+{label}-cp{sys.version_info[0]}{sys.version_info[1]}-")
    if repair:
        assert "manylinux" in wheel.name, wheel.name
    names = zipfile.ZipFile(wheel).namelist()
    assert not any(".libs/" in n for n in names), "auditwheel grafted a library torch provides"
    record = json.loads(zipfile.ZipFile(wheel).read(f"childopt/{cfg.BUILD_INFO_FILE}"))
    assert record["version"] == f"{childopt.__version__}+{label}" and record["torch_version"] == torch.__version__
    assert "loaded: prebuilt for torch" in build.stdout + build.stderr
    assert (build.stdout + build.stderr).count("ok: native matches") == 3

    venv = build_wheels.smoke_venv(work, wheel)
    python = venv / "bin" / "python"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CHILDOPT_", "PYTHON", "TRITON_"))}
    env["CHILDOPT_CACHE_DIR"] = str(tmp_path / "empty-cache")     # no JIT build to fall back on
    installed = subprocess.run([str(python), "-c", "import childopt, os; print(os.path.dirname(childopt.__file__))"],
                               capture_output=True, text=True, env=env, cwd=tmp_path, check=True).stdout.split()[-1]
    shown = subprocess.run([str(python), "-m", "childopt", "info"], capture_output=True, text=True, env=env,
                           cwd=tmp_path, timeout=300)
    assert shown.stdout.startswith(f"childopt {record['version']}\n"), shown.stdout + shown.stderr[-2000:]
    assert "native   childopt._C prebuilt:" in shown.stdout, shown.stdout
    (Path(installed) / cfg.BUILD_INFO_FILE).write_text(json.dumps({**record, "torch_version": "2.6.0+cpu"}))
    guarded = subprocess.run([str(python), str(REPO / "tools" / "wheel_smoke.py"), "--guard"], capture_output=True,
                             text=True, timeout=600, env=env, cwd=tmp_path)
    assert guarded.returncode == 0, guarded.stdout + guarded.stderr[-4000:]
    assert "guard: childopt: the prebuilt childopt._C does not fit: it was built for torch 2.6.0+cpu" in guarded.stdout
    assert "matches torch.optim.AdamW" in guarded.stdout
    assert not list((tmp_path / "empty-cache").glob("childopt_C-*")), "the fallback must not compile anything unasked"
