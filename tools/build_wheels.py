"""Build childopt wheels with childopt._C compiled ahead of time: one per (CUDA or cpu) x torch release x Python.

    python tools/build_wheels.py --cuda 12.8 13.0 --torch 2.10 --repair --smoke --out dist
    python tools/build_wheels.py --cuda cpu --in-this-env --out dist     # the running Python and torch (CI)
    python tools/build_wheels.py --print-matrix [--per-cuda]             # the CI matrix, as JSON

Each build gets a virtual environment (``build/wheels/venv-<label>-<python>``) holding torch of
that release for that CUDA (from download.pytorch.org/whl/<cuXYZ|cpu>), then runs
``pip wheel --no-build-isolation`` with CHILDOPT_BUILD_EXT=1 (setup.py), CUDA_HOME at that
CUDA's toolkit (setup.py then takes that toolkit's explicit arch list,
childopt._native.config.AOT_ARCHS_BY_TOOLKIT, unless CHILDOPT_CUDA_ARCHS says otherwise) and
MAX_JOBS bounded by memory.  The toolkit is
``/usr/local/cuda-<version>`` (``--toolkit system``) or assembled from NVIDIA's PyPI packages
(``--toolkit pip``: nvidia-cuda-nvcc and friends; CUDA 13 on, the first whose PyPI
package holds nvcc itself).  Every wheel is
checked: its file name carries the label (``+cu128torch2.10``, ``+cputorch2.13``) and its
``_build_info.json`` says what was built.  ``--repair`` runs auditwheel for a manylinux tag
without grafting libtorch, libc10, libcuda, libcudart or the OpenMP runtime: torch's own wheels
bring those.
``--smoke`` installs each wheel into a fresh environment with its torch and runs
tools/wheel_smoke.py there.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PYPI = "https://pypi.org/simple"

# torch releases childopt builds for (pyproject: torch>=2.6), with the CUDA versions of each
# release's wheels on download.pytorch.org and its Python versions.  Edit when torch releases.
# CUDA 12.1 is not here: no torch >= 2.6 was built with it.  2.12 lists only the CUDA of its PyPI
# wheels (13.0) and 2.13 none yet: their download.pytorch.org variants were not checked.
TORCH_RELEASES = {
    "2.6": (("11.8", "12.4", "12.6"), ("3.9", "3.10", "3.11", "3.12", "3.13")),
    "2.7": (("11.8", "12.6", "12.8"), ("3.9", "3.10", "3.11", "3.12", "3.13")),
    "2.8": (("12.6", "12.8"), ("3.9", "3.10", "3.11", "3.12", "3.13")),
    "2.9": (("12.6", "12.8", "13.0"), ("3.10", "3.11", "3.12", "3.13")),
    "2.10": (("12.6", "12.8", "13.0"), ("3.10", "3.11", "3.12", "3.13")),
    "2.11": (("12.6", "12.8", "13.0"), ("3.10", "3.11", "3.12", "3.13")),
    "2.12": (("13.0",), ("3.10", "3.11", "3.12", "3.13")),
    "2.13": ((), ("3.10", "3.11", "3.12", "3.13")),
}
# The newest gcc-toolset each older nvcc accepts as host compiler (CI builds in manylinux_2_28,
# whose default gcc is newer); the other toolkits take the default.
HOST_GCC = {"11.8": "11", "12.4": "13", "12.6": "13"}
# libraries a wheel must link but never carry: torch's wheels (and the driver) provide them.
# libgomp / libiomp5: the extension must bind to the OpenMP runtime torch has loaded (one thread
# pool, sized by torch.set_num_threads); a grafted copy would get another soname and a second pool.
AUDITWHEEL_EXCLUDES = ("libtorch*.so", "libc10*.so", "libcuda.so.*", "libcudart.so.*", "libgomp.so.*",
                       "libiomp5.so")


def _native_config():
    """childopt/_native/config.py by path (as setup.py loads it): this script runs where torch may be missing."""
    spec = importlib.util.spec_from_file_location("_childopt_native_config",
                                                  REPO / "childopt" / "_native" / "config.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


cfg = _native_config()


def say(message: str) -> None:
    print(f"build_wheels: {message}", file=sys.stderr, flush=True)


def run(cmd, **kw) -> subprocess.CompletedProcess:
    say("$ " + " ".join(map(str, cmd)))
    return subprocess.run([str(c) for c in cmd], check=True, **kw)


def index_label(cuda: str) -> str:
    """``cpu`` or ``cu128``: the download.pytorch.org index of ``cuda`` ("cpu" or "12.8")."""
    return cfg.cuda_label(None if cuda == "cpu" else cuda)


def matrix(per_cuda: bool = False) -> list[dict]:
    """Every (cuda, torch, python) cell, with its host gcc: CPU for each torch release, plus its CUDA versions.

    ``per_cuda``: one cell per CUDA version (and cpu), its newest torch and Python (pull requests).
    """
    cells = [{"cuda": cuda, "torch": torch, "python": python, "gcc": HOST_GCC.get(cuda, "")}
             for torch, (cudas, pythons) in TORCH_RELEASES.items()
             for cuda in ("cpu", *cudas) for python in pythons]
    if per_cuda:
        newest = {}
        for cell in cells:  # releases and Pythons are listed oldest first
            newest[cell["cuda"]] = cell
        cells = list(newest.values())
    return cells


# ----------------------------------------------------------------------------- CUDA toolkits


def pip_toolkit_packages(cuda: str) -> list[str]:
    """NVIDIA's PyPI packages that make up nvcc and the CUDA runtime headers of ``cuda`` (e.g. "13.0").

    Only CUDA 13's nvidia-cuda-nvcc holds the nvcc driver; nvidia-cuda-nvcc-cu11 / -cu12 ship
    ptxas alone (checked for 11.8, 12.6, 12.8, 12.9), so those versions need a system toolkit.
    """
    if int(cuda.split(".")[0]) < 13:
        raise SystemExit(f"CUDA {cuda}: PyPI's nvidia-cuda-nvcc-cu{cuda.split('.')[0]} has ptxas but no nvcc; "
                         f"install that toolkit (e.g. /usr/local/cuda-{cuda}) and pass --toolkit system")
    return [f"nvidia-cuda-{part}=={cuda}.*" for part in ("nvcc", "crt", "runtime", "cccl")] + [f"nvidia-nvvm=={cuda}.*"]


def pip_toolkit(cuda: str, work: Path) -> Path:
    """A CUDA_HOME (bin, nvvm, include, lib64) assembled from NVIDIA's PyPI packages, cached in ``work``."""
    home = work / f"toolkit-{index_label(cuda)}"
    if (home / "bin" / "nvcc").is_file():
        return home
    packages = pip_toolkit_packages(cuda)
    work.mkdir(parents=True, exist_ok=True)
    site = Path(tempfile.mkdtemp(prefix=f"toolkit-{index_label(cuda)}-", dir=work))
    run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", site, *packages])
    staging = Path(tempfile.mkdtemp(prefix=".home-", dir=work))
    # The packages split one toolkit over nvidia/<part>/{bin,include,lib,nvvm}; nvcc.profile
    # expects them under one root (TOP = bin/..), so they are merged into the CUDA_HOME layout.
    for part in sorted(p for p in (site / "nvidia").iterdir() if p.is_dir()):
        for name, target in (("bin", "bin"), ("include", "include"), ("lib", "lib64"), ("nvvm", "nvvm")):
            if (part / name).is_dir():
                shutil.copytree(part / name, staging / target, dirs_exist_ok=True)
    for library in (staging / "lib64").glob("libcudart.so.*"):
        (staging / "lib64" / "libcudart.so").symlink_to(library.name)
    shutil.rmtree(site)
    os.replace(staging, home)
    return home


def toolkit(cuda: str, kind: str, template: str, work: Path) -> Path:
    """CUDA_HOME of ``cuda``; its nvcc must report that release."""
    home = pip_toolkit(cuda, work) if kind == "pip" else Path(template.format(version=cuda))
    nvcc = home / "bin" / "nvcc"
    banner = cfg.tool_version(str(nvcc))
    release = cfg.toolkit_release(banner)
    if release is None or f"{release[0]}.{release[1]}" != cuda:
        raise SystemExit(f"{nvcc} is not CUDA {cuda} ({banner or 'does not run'}); pass --toolkit pip (CUDA 13 on) "
                         "or a --cuda-home template naming that toolkit")
    return home


# ----------------------------------------------------------------------------- environments


def python_for(version: str) -> str:
    """An interpreter of Python ``version``: pythonX.Y on PATH, or a manylinux image's /opt/python/cpXY-cpXY."""
    tag = "cp" + version.replace(".", "")
    for candidate in (shutil.which(f"python{version}"), f"/opt/python/{tag}-{tag}/bin/python"):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    raise SystemExit(f"no Python {version} found (python{version} on PATH or /opt/python/{tag}-{tag})")


def venv_with_torch(path: Path, python: str, torch_spec: str, cuda: str, index: str) -> Path:
    """A virtual environment at ``path`` holding ``torch_spec`` for ``cuda``; its interpreter."""
    interpreter = path / "bin" / "python"
    if not interpreter.exists():
        run([python, "-m", "venv", path])
    source = index.format(label=index_label(cuda))
    extra = [] if source == PYPI else ["--extra-index-url", PYPI]
    run([interpreter, "-m", "pip", "install", "--quiet", torch_spec, "--index-url", source, *extra])
    return interpreter


def torch_of(interpreter: Path | str) -> dict:
    """torch's version and CUDA in ``interpreter``'s environment."""
    code = "import json, torch; print(json.dumps({'version': torch.__version__, 'cuda': torch.version.cuda}))"
    out = subprocess.run([str(interpreter), "-c", code], check=True, capture_output=True, text=True).stdout
    return json.loads(out.splitlines()[-1])


# ----------------------------------------------------------------------------- one wheel


def wheel_record(wheel: Path) -> dict:
    """The _build_info.json inside ``wheel`` (SystemExit when it is missing: then no module was built)."""
    with zipfile.ZipFile(wheel) as z:
        try:
            return json.loads(z.read(f"childopt/{cfg.BUILD_INFO_FILE}"))
        except KeyError:
            raise SystemExit(f"{wheel.name} has no childopt/{cfg.BUILD_INFO_FILE}: childopt._C was not built") from None


def repair(wheel: Path, out: Path, interpreter: Path | str, plat: str, work: Path) -> Path:
    """auditwheel repair to the manylinux tag ``plat``, grafting nothing that torch or the driver provides."""
    torch_lib = subprocess.run([str(interpreter), "-c", "import torch, os; print(os.path.dirname(torch.__file__))"],
                               check=True, capture_output=True, text=True).stdout.strip() + "/lib"
    env = {**os.environ, "LD_LIBRARY_PATH": os.pathsep.join(filter(None, [torch_lib, os.environ.get("LD_LIBRARY_PATH")]))}
    excludes = [arg for name in AUDITWHEEL_EXCLUDES for arg in ("--exclude", name)]
    repaired_dir = Path(tempfile.mkdtemp(prefix="repaired-", dir=work))
    run([sys.executable, "-m", "auditwheel", "repair", "--plat", plat, *excludes, "-w", repaired_dir, wheel], env=env)
    (repaired,) = repaired_dir.glob("*.whl")
    final = out / repaired.name
    shutil.move(repaired, final)
    shutil.rmtree(repaired_dir)
    return final


def build_wheel(cuda: str, interpreter: Path | str, cuda_home: Path | None, out: Path, plat: str | None,
                work: Path) -> Path:
    """Build, check and (with ``plat``) repair one wheel with ``interpreter``'s torch; returns its path."""
    torch = torch_of(interpreter)
    if (cuda == "cpu") != (torch["cuda"] is None) or (cuda != "cpu" and torch["cuda"] != cuda):
        raise SystemExit(f"asked for {index_label(cuda)}, but {interpreter} has torch {torch['version']} "
                         f"(CUDA {torch['cuda']})")
    env = {**os.environ, "CHILDOPT_BUILD_EXT": "1"}
    env.pop("CHILDOPT_LOCAL_VERSION", None)
    with_cuda = cuda_home is not None
    if with_cuda:
        env.update(CUDA_HOME=str(cuda_home), PATH=f"{cuda_home / 'bin'}{os.pathsep}{env.get('PATH', '')}")
    env["MAX_JOBS"] = env.get("MAX_JOBS") or str(cfg.max_jobs(with_cuda))
    label = cfg.local_version({"torch_version": torch["version"], "torch_cuda": torch["cuda"]}, with_cuda)
    say(f"building the +{label} wheel (MAX_JOBS={env['MAX_JOBS']})")
    work.mkdir(parents=True, exist_ok=True)
    raw = Path(tempfile.mkdtemp(prefix="raw-", dir=work))
    # setuptools builds in REPO/build: objects of another torch or CUDA must not be reused.
    for stale in (REPO / "build").glob("*"):
        if stale.name.startswith(("lib", "temp", "bdist")):
            shutil.rmtree(stale)
    run([interpreter, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "-w", raw, REPO], env=env)
    (wheel,) = raw.glob("childopt-*.whl")
    if f"+{label}-" not in wheel.name:
        raise SystemExit(f"{wheel.name} does not carry the label +{label}")
    record = wheel_record(wheel)
    if bool(record.get("with_cuda")) != with_cuda:
        raise SystemExit(f"{wheel.name}: with_cuda={record.get('with_cuda')} in its build record, expected {with_cuda}")
    out.mkdir(parents=True, exist_ok=True)
    if plat:
        final = repair(wheel, out, interpreter, plat, work)
    else:
        final = out / wheel.name
        shutil.move(wheel, final)
    shutil.rmtree(raw, ignore_errors=True)
    say(f"built {final.name}: torch {record['torch_version']}, "
        + (f"CUDA {record['torch_cuda']} for {';'.join(record['archs'])}" if with_cuda else "CPU kernels"))
    return final


def smoke_venv(work: Path, wheel: Path) -> Path:
    """Where --smoke installs ``wheel``."""
    return work / f"smoke-{wheel.name[:-len('.whl')]}"


def smoke(wheel: Path, python: str, index: str, work: Path) -> Path:
    """Install ``wheel`` into a fresh environment with the torch it was built for; run tools/wheel_smoke.py there."""
    record = wheel_record(wheel)
    path = smoke_venv(work, wheel)
    shutil.rmtree(path, ignore_errors=True)
    cuda = record["torch_cuda"] or "cpu"
    # The public version: PyPI's torch says 2.11.0+cu130 at run time but 2.11.0 in its metadata.
    public = record["torch_version"].split("+")[0]
    interpreter = venv_with_torch(path, python, f"torch=={public}", cuda, index)
    got = torch_of(interpreter)
    if got["cuda"] != record["torch_cuda"]:
        raise SystemExit(f"the smoke venv got torch {got['version']} (CUDA {got['cuda']}) from {index}, but "
                         f"{wheel.name} needs CUDA {record['torch_cuda']}; pass an --index serving that build")
    run([interpreter, "-m", "pip", "install", "--quiet", wheel, "--extra-index-url", PYPI])
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CHILDOPT_", "PYTHON", "TRITON_"))}
    env["CHILDOPT_CACHE_DIR"] = str(path / "empty-cache")  # the prebuilt module must serve, no JIT build
    run([interpreter, REPO / "tools" / "wheel_smoke.py"], env=env, cwd=path)
    return interpreter


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cuda", nargs="+", default=[], metavar="VERSION", help="cpu and/or CUDA versions (12.8 ...)")
    parser.add_argument("--torch", nargs="+", default=[], metavar="A.B", help="torch releases (default: all known)")
    parser.add_argument("--python", nargs="+", default=[f"{sys.version_info[0]}.{sys.version_info[1]}"],
                        metavar="X.Y", help="Python versions (default: this one)")
    parser.add_argument("--in-this-env", action="store_true",
                        help="build with this interpreter and its installed torch instead of new environments")
    parser.add_argument("--toolkit", choices=("system", "pip"), default="system",
                        help="where each CUDA's nvcc comes from (default: system, see --cuda-home)")
    parser.add_argument("--cuda-home", default="/usr/local/cuda-{version}", metavar="TEMPLATE",
                        help="CUDA_HOME of each version for --toolkit system (default: /usr/local/cuda-{version})")
    parser.add_argument("--index", default="https://download.pytorch.org/whl/{label}", metavar="URL",
                        help="torch's wheel index; {label} becomes cpu, cu128, ... (default: download.pytorch.org). "
                             f"{PYPI} serves each release's default CUDA (2.11: 13.0)")
    parser.add_argument("--repair", nargs="?", const="auto", metavar="PLAT",
                        help="auditwheel repair to PLAT (default: auto, the most compatible tag the wheel allows; "
                             "CI builds in manylinux_2_28 and asks for manylinux_2_28_x86_64)")
    parser.add_argument("--smoke", action="store_true",
                        help="install each wheel into a fresh environment and run tools/wheel_smoke.py there")
    parser.add_argument("--out", type=Path, default=REPO / "dist", help="where the wheels go (default: dist/)")
    parser.add_argument("--work", type=Path, default=REPO / "build" / "wheels",
                        help="build environments, toolkits and smoke environments (default: build/wheels)")
    parser.add_argument("--print-matrix", action="store_true", help="print the CI matrix as JSON and exit")
    parser.add_argument("--per-cuda", action="store_true", help="with --print-matrix: one cell per CUDA version")
    args = parser.parse_args(argv)
    if not args.print_matrix and not args.cuda:
        parser.error("--cuda is required: cpu and/or CUDA versions, e.g. --cuda cpu 12.8")
    for cuda in args.cuda:
        if cuda != "cpu" and cfg.toolkit_release(f"release {cuda}") is None:
            parser.error(f"--cuda: {cuda!r} is neither cpu nor a CUDA version like 12.8")
    unknown = [t for t in args.torch if t not in TORCH_RELEASES]
    if unknown and not args.in_this_env:
        parser.error(f"--torch: {', '.join(unknown)} not in the known releases ({', '.join(TORCH_RELEASES)})")
    return args


def planned(args) -> list[tuple[str, str, str]]:
    """The (cuda, torch release, python) builds asked for, saying which combinations do not exist."""
    cells = []
    for cuda in args.cuda:
        for torch_release in args.torch or list(TORCH_RELEASES):
            cudas, pythons = TORCH_RELEASES[torch_release]
            if cuda != "cpu" and cuda not in cudas:
                say(f"skipping {index_label(cuda)} x torch {torch_release}: torch {torch_release} has no CUDA {cuda} "
                    "build")
                continue
            for python in args.python:
                if python not in pythons:
                    say(f"skipping Python {python} x torch {torch_release}: not a Python torch {torch_release} "
                        "supports")
                    continue
                cells.append((cuda, torch_release, python))
    return cells


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.print_matrix:
        print(json.dumps({"include": matrix(args.per_cuda)}))
        return 0
    homes: dict = {}

    def home_of(cuda: str) -> Path | None:
        if cuda != "cpu" and cuda not in homes:
            homes[cuda] = toolkit(cuda, args.toolkit, args.cuda_home, args.work)
        return homes.get(cuda)

    # (cuda, torch release, python); torch release None: this interpreter and its torch.
    this_python = f"{sys.version_info[0]}.{sys.version_info[1]}"
    jobs = [(cuda, None, this_python) for cuda in args.cuda] if args.in_this_env else planned(args)
    built = []
    for cuda, torch_release, python in jobs:
        if torch_release is None:
            interpreter, base = sys.executable, sys.executable
        else:
            base = python_for(python)
            env = args.work / f"venv-{index_label(cuda)}torch{torch_release}-py{python}"
            interpreter = venv_with_torch(env, base, f"torch=={torch_release}.*", cuda, args.index)
            run([interpreter, "-m", "pip", "install", "--quiet", "setuptools>=64", "wheel", "ninja"])
        wheel = build_wheel(cuda, interpreter, home_of(cuda), args.out, args.repair, args.work)
        if args.smoke:
            smoke(wheel, base, args.index, args.work)
        built.append(wheel)
    for wheel in built:
        print(wheel)
    return 0


if __name__ == "__main__":
    sys.exit(main())
