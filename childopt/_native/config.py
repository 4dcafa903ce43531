"""How childopt._C is built: the one place that setup.py and the JIT loader (childopt._native) share.

This module imports nothing outside the standard library at import time and nothing of childopt,
so setup.py and tools/build_wheels.py can load it by path (``importlib.util.spec_from_file_location``)
in a build environment without torch.  It holds the compiler flags, the source list, the build key,
the CUDA arch helpers, the toolchain probes and the check of a build record (``_build_info.json``
or a cache manifest) against the running torch and GPUs.  Functions that need torch import it when
called.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

# Bump when the way a build is made or recorded changes: every key changes with it.
# 2: manifests record the library's size and sha256; builds published before are not trusted.
LOADER_VERSION = 2
# Base name of a JIT build: module childopt_C_<key12>, directory childopt_C-<key16>.
NAME = "childopt_C"
# The ahead-of-time build (setup.py, CHILDOPT_BUILD_EXT=1) and the record written beside it.
PREBUILT_MODULE = "childopt._C"
BUILD_INFO_FILE = "_build_info.json"

# -fopenmp (added by cxx_flags when torch's ATen parallel backend is OpenMP): at::parallel_for is
# header code that runs serially unless the extension itself is compiled with OpenMP.
# -fno-trapping-math lets GCC if-convert the kernels' selects (frozen / dropped entries) so the
# element loops vectorise; no result changes, the kernels never rely on floating-point traps.
# No -std: torch's cpp_extension passes the standard its headers need (C++17, C++20 from torch 2.13);
# csrc is C++17 and compiles under either.
CXX_FLAGS = ["-O3", "-fno-math-errno", "-fno-trapping-math", "-ffp-contract=off", "-fopenmp-simd"]
NVCC_FLAGS = ["-O3", "--fmad=false", "-lineinfo", "--expt-relaxed-constexpr"]
CUDA_DEFINE = "-DCHILDOPT_WITH_CUDA"
# Files under csrc/ that make up the build: every one of them is hashed into the key.
SOURCE_SUFFIXES = (".cpp", ".cu", ".h", ".cuh")
# Memory one compiler job may need: MAX_JOBS is bounded by MemAvailable / this.
CXX_JOB_BYTES = int(1.5 * 2**30)
NVCC_JOB_BYTES = 4 * 2**30
# The arch list of an ahead-of-time build (wheels; setup.py without CHILDOPT_CUDA_ARCHS), by the
# oldest toolkit that compiles it: what torch's own wheels of that CUDA cover, from Volta (Turing
# on CUDA 13, which dropped sm_70/72) to the newest x86-64 GPU arch the toolkit knows (not sm_110,
# Jetson Thor, an aarch64 part), with PTX for the newest so later GPUs can JIT it.  Never the
# build machine's GPU: a wheel must run on the others too.
AOT_ARCHS_BY_TOOLKIT = (
    ((13, 0), ("7.5", "8.0", "8.6", "8.9", "9.0", "10.0", "12.0")),
    ((12, 8), ("7.0", "7.5", "8.0", "8.6", "8.9", "9.0", "10.0", "12.0")),
    ((11, 8), ("7.0", "7.5", "8.0", "8.6", "8.9", "9.0")),
)


# ----------------------------------------------------------------------------- sources


def find_csrc(package_dir: Path) -> Path | None:
    """The csrc/ directory for the childopt package at ``package_dir``.

    An installed package carries it as ``childopt/csrc`` (package data); a source checkout
    (editable install, or PYTHONPATH pointing at the checkout) has it beside the package.
    """
    for candidate in (package_dir / "csrc", package_dir.parent / "csrc"):
        if (candidate / "bindings.cpp").is_file():
            return candidate
    return None


def source_files(csrc: Path, with_cuda: bool) -> list[Path]:
    """The translation units of a build: bindings.cpp and cpu/*.cpp, plus cuda/*.cu and cuda/*.cpp."""
    files = [csrc / "bindings.cpp", *sorted((csrc / "cpu").glob("*.cpp"))]
    if with_cuda:
        files += sorted((csrc / "cuda").glob("*.cu")) + sorted((csrc / "cuda").glob("*.cpp"))
    return files


def include_dirs(csrc: Path) -> list[Path]:
    return [csrc / "include"]


def hashed_files(csrc: Path) -> list[Path]:
    """Every source and header under csrc/, in a stable order."""
    return sorted((p for p in csrc.rglob("*") if p.is_file() and p.suffix in SOURCE_SUFFIXES),
                  key=lambda p: p.relative_to(csrc).as_posix())


def source_digest(csrc: Path) -> str:
    """sha256 over the relative path and bytes of every source and header: mtimes play no part."""
    h = hashlib.sha256()
    for path in hashed_files(csrc):
        data = path.read_bytes()
        rel = path.relative_to(csrc).as_posix().encode()
        h.update(b"%d:%s:%d:" % (len(rel), rel, len(data)))
        h.update(data)
    return h.hexdigest()


def cxx_flags(with_cuda: bool, openmp: str | None = None) -> list[str]:
    """Host compiler flags; ``openmp``: torch's OpenMP runtime (torch_facts), or None."""
    return CXX_FLAGS + (["-fopenmp"] if openmp else []) + ([CUDA_DEFINE] if with_cuda else [])


def ld_flags(openmp: str | None) -> list[str]:
    """Link flags that bind the extension to the OpenMP runtime torch already loaded.

    GNU libgomp: ``-fopenmp`` links ``libgomp.so.1``, the soname of the copy torch's wheel
    ships, so the process keeps one OpenMP runtime and one thread pool that
    ``torch.set_num_threads`` sizes.  Intel's libiomp5 (conda builds of torch) is linked from
    torch's lib directory instead; it serves the GOMP entry points that -fopenmp compiles to.
    """
    if openmp == "gomp":
        return ["-fopenmp"]
    if openmp == "iomp5":
        import torch

        return [f"-L{Path(torch.__file__).parent / 'lib'}", "-liomp5"]
    return []


def torch_openmp(torch) -> str | None:
    """The OpenMP runtime behind torch's at::parallel_for on Linux: "gomp", "iomp5", or None.

    None when ATen's parallel backend is not OpenMP (its native thread pool lives in libtorch,
    so extensions need no flag) or off Linux, where the kernels stay serial for now.
    """
    if not sys.platform.startswith("linux") or "ATen parallel backend: OpenMP" not in torch.__config__.parallel_info():
        return None
    return "iomp5" if any((Path(torch.__file__).parent / "lib").glob("libiomp5*")) else "gomp"


def nvcc_flags(with_cuda: bool) -> list[str]:
    return NVCC_FLAGS + [CUDA_DEFINE] if with_cuda else []


# ----------------------------------------------------------------------------- CUDA archs

_ARCH = re.compile(r"^(?:sm_|compute_)?(\d+)(?:\.(\d+))?([af]?)(\+ptx)?$", re.IGNORECASE)


def _arch_tuple(arch: str) -> tuple[int, int, str]:
    base = arch.split("+")[0]
    suffix = base[-1] if base[-1] in "af" else ""
    major, minor = base.rstrip("af").split(".")
    return int(major), int(minor), suffix


def parse_archs(text: str) -> list[str]:
    """Normalise an arch list: ``"8.0,9.0"``, ``"80 90"``, ``"sm_80;9.0a;8.6+PTX"`` -> ``["8.0", "9.0a", "8.6+PTX"]``.

    Raises ValueError on a word that is not an arch.
    """
    out = []
    for word in re.split(r"[,;\s]+", text.strip()):
        if not word:
            continue
        m = _ARCH.match(word)
        if not m:
            raise ValueError(f"not a CUDA arch: {word!r} (expected e.g. 8.0, 86, sm_90, 9.0a, 9.0+PTX)")
        major, minor, suffix, ptx = m.groups()
        if minor is None:  # "86" -> 8.6, "100" -> 10.0, "120" -> 12.0
            if len(major) < 2:
                raise ValueError(f"not a CUDA arch: {word!r} (expected e.g. 8.0, 86, sm_90)")
            major, minor = major[:-1], major[-1]
        out.append(f"{int(major)}.{int(minor)}{suffix.lower()}" + ("+PTX" if ptx else ""))
    return out


def finalize_archs(archs) -> tuple[str, ...]:
    """Sorted, without duplicates, with ``+PTX`` on the highest arch (so newer GPUs can JIT it)."""
    archs = list(archs)
    ptx = {a.split("+")[0] for a in archs if a.endswith("+PTX")}
    bases = sorted({a.split("+")[0] for a in archs}, key=_arch_tuple)
    if not bases:
        return ()
    if not ptx:
        ptx = {bases[-1]}
    return tuple(b + ("+PTX" if b in ptx else "") for b in bases)


def toolkit_release(nvcc_banner: str | None) -> tuple[int, int] | None:
    """(major, minor) from nvcc's banner ("... release 12.8, V12.8.93"), or None."""
    m = re.search(r"release (\d+)\.(\d+)", nvcc_banner or "")
    return (int(m.group(1)), int(m.group(2))) if m else None


def aot_archs(release: tuple[int, int]) -> tuple[str, ...]:
    """The explicit arch list (``+PTX`` on the newest) of an ahead-of-time build with CUDA ``release``."""
    for oldest, archs in AOT_ARCHS_BY_TOOLKIT:
        if tuple(release) >= oldest:
            return finalize_archs(archs)
    raise ValueError(f"CUDA {release[0]}.{release[1]} is older than the oldest toolkit childopt builds with "
                     f"({'.'.join(map(str, AOT_ARCHS_BY_TOOLKIT[-1][0]))})")


def torch_release(version: str | None) -> str | None:
    """``"2.11"`` from ``"2.11.0+cu130"``: the torch a wheel's label names."""
    m = re.match(r"(\d+)\.(\d+)", version or "")
    return f"{m.group(1)}.{m.group(2)}" if m else None


def is_final_release(version: str | None) -> bool:
    """``2.11.1`` or ``2.11.1+cu130``; not a nightly (``.dev``), a pre-release or a source build (``a0+git``)."""
    return bool(re.fullmatch(r"\d+\.\d+\.\d+(\+[A-Za-z0-9.]+)?", version or ""))


def cuda_label(torch_cuda: str | None) -> str:
    """``cu128`` for CUDA 12.8 (download.pytorch.org's index names), ``cpu`` for none."""
    return f"cu{torch_cuda.replace('.', '')}" if torch_cuda else "cpu"


def local_version(facts: dict, with_cuda: bool) -> str:
    """A wheel's local version label: ``cu130torch2.11`` (torch's CUDA, not nvcc's), ``cputorch2.13``,
    or ``cu128cpuonlytorch2.8`` (CPU kernels for a CUDA torch: nvcc was missing).

    The torch part is there because childopt._C links libtorch's C++ ABI, which holds within a
    torch release, not across releases.
    """
    device = cuda_label(facts["torch_cuda"]) + ("" if with_cuda or not facts["torch_cuda"] else "cpuonly")
    return f"{device}torch{torch_release(facts['torch_version'])}"


def nvcc_archs(nvcc: str) -> set[str] | None:
    """The archs ``nvcc --list-gpu-arch`` names (``"80"``, ``"90a"``, ...), or None if it cannot say."""
    try:
        out = subprocess.run([nvcc, "--list-gpu-arch"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return set(re.findall(r"compute_(\d+[a-z]?)", out)) or None


def arch_id(arch: str) -> str:
    """``"90a"`` from ``"9.0a"`` or ``"9.0a+PTX"``: the form nvcc's compute_/sm_ names use."""
    return arch.split("+")[0].replace(".", "")


def arch_covers(archs, capability: tuple[int, int]) -> tuple[bool, str]:
    """Whether a build for ``archs`` runs on a GPU of ``capability``, and how.

    A cubin for X.y runs on X.z with z >= y (not across majors; an ``a`` arch only on itself);
    PTX for an arch at or below the GPU's is JIT-compiled by the driver at first launch.
    """
    major, minor = capability
    cubins, ptx = [], []
    for arch in archs:
        a_major, a_minor, suffix = _arch_tuple(arch)
        if suffix == "a":
            if (a_major, a_minor) == (major, minor):
                cubins.append(arch)
            continue
        if a_major == major and a_minor <= minor:
            cubins.append(arch)
        if arch.endswith("+PTX") and (a_major, a_minor) <= (major, minor):
            ptx.append(arch)
    if cubins:
        return True, f"cubin for {cubins[-1].split('+')[0]}"
    if ptx:
        return True, f"PTX for {ptx[-1].split('+')[0]}, JIT-compiled by the driver"
    return False, f"no cubin or PTX in [{', '.join(archs)}] runs on sm_{major}{minor}"


# ----------------------------------------------------------------------------- toolchain


def cxx_compiler() -> str:
    """The C++ compiler torch.utils.cpp_extension uses on Linux: $CXX, else c++."""
    return os.environ.get("CXX") or "c++"


@lru_cache(maxsize=None)
def tool_version(command: str, flag: str = "--version") -> str | None:
    """The version banner of ``command`` (first line with a digit), or None if it does not run."""
    exe = shutil.which(command)
    if exe is None:
        return None
    try:
        out = subprocess.run([exe, flag], capture_output=True, text=True, timeout=60,
                             env={**os.environ, "LC_ALL": "C"}).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    lines = [line.strip() for line in out.splitlines() if line.strip()]
    # nvcc prints its release near the end: "Cuda compilation tools, release 13.0, V13.0.88".
    for line in lines:
        if "release" in line and "compilation tools" in line:
            return line
    for line in lines:
        if re.search(r"\d", line):
            return line
    return lines[0] if lines else None


def nvcc_path(cuda_home: str | None) -> str | None:
    """nvcc under ``cuda_home`` (as torch found it), else on PATH."""
    if cuda_home:
        candidate = os.path.join(cuda_home, "bin", "nvcc")
        if os.access(candidate, os.X_OK):
            return candidate
    return shutil.which("nvcc")


def find_cuda_home() -> str | None:
    """A CUDA toolkit with nvcc, for tools without torch: $CUDA_HOME/$CUDA_PATH, nvcc on PATH, /usr/local/cuda."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:  # may be a wrapper script outside the toolkit; the toolkit has include/cuda_runtime.h
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    candidates.append("/usr/local/cuda")
    for home in candidates:
        if home and os.access(os.path.join(home, "bin", "nvcc"), os.X_OK) \
                and os.path.isfile(os.path.join(home, "include", "cuda_runtime.h")):
            return home
    return None


def python_tag() -> str:
    return f"{sys.implementation.cache_tag}{getattr(sys, 'abiflags', '')}"


def platform_tag() -> str:
    return f"{sys.platform}-{platform.machine()}"


def mem_available() -> int | None:
    """MemAvailable from /proc/meminfo in bytes (None where there is no /proc)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def max_jobs(with_cuda: bool) -> int:
    """Parallel compile jobs: the CPUs we may use, bounded by free memory (1.5 GB per C++ job, 4 GB per nvcc job)."""
    jobs = cpu_count()
    mem = mem_available()
    if mem is not None:
        jobs = min(jobs, mem // (NVCC_JOB_BYTES if with_cuda else CXX_JOB_BYTES))
    return max(1, int(jobs))


# ----------------------------------------------------------------------------- keys and records


def torch_facts() -> dict:
    """What a build depends on in the running torch (imports torch)."""
    import torch

    return {
        "torch_version": str(torch.__version__),
        "torch_git": str(torch.version.git_version),
        "torch_cuda": torch.version.cuda,
        "torch_hip": getattr(torch.version, "hip", None),
        "cxx11_abi": bool(torch._C._GLIBCXX_USE_CXX11_ABI),
        "openmp": torch_openmp(torch),
    }


def key_inputs(torch: dict, digest: str, with_cuda: bool, archs, nvcc_version: str | None) -> dict:
    """Everything a build depends on (docs/design.md, "Building and loading childopt._C")."""
    return {
        "loader_version": LOADER_VERSION,
        "sources": digest,
        "cxx_flags": cxx_flags(with_cuda, torch.get("openmp")),
        "ld_flags": ld_flags(torch.get("openmp")),
        "nvcc_flags": nvcc_flags(with_cuda),
        **torch,
        "cxx": tool_version(cxx_compiler()),
        "nvcc": nvcc_version if with_cuda else None,
        "with_cuda": bool(with_cuda),
        "archs": list(finalize_archs(archs)) if with_cuda else [],
        "python": python_tag(),
        "platform": platform_tag(),
    }


def digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


# Inputs recorded in a build's manifest but kept out of its key.  The C++ compiler's version: loading a
# build needs no compiler (a machine or container without one must still load the cache), and the
# extension's ABI is fixed by what the key holds (torch and its _GLIBCXX_USE_CXX11_ABI, Python,
# platform, flags); torch's own JIT cache does not key on it either.  A compiler update thus keeps
# the build (python -m childopt build --force makes a new one), rather than stranding backend="auto"
# on the reference backend until something compiles again.
RECORDED_ONLY = ("cxx",)


def keys(inputs: dict) -> tuple[str, str]:
    """(key, base_key): the base key leaves out the arch list, so a build for more archs can serve.
    Neither holds RECORDED_ONLY."""
    keyed = {k: v for k, v in inputs.items() if k not in RECORDED_ONLY}
    return digest(keyed), digest({k: v for k, v in keyed.items() if k != "archs"})


def check_record(record: dict, runtime: dict, *, same_release: bool = False) -> str | None:
    """Why a build described by ``record`` must not be loaded here, or None if it may.

    ``record`` is a ``_build_info.json`` or a cache manifest (its ``inputs``); ``runtime`` has
    the running torch's facts (torch_facts), ``python``, ``platform``, ``sources`` (the digest
    of the csrc/ that would be built now, or None), ``gpus`` (capabilities of the visible GPUs)
    and ``want_cuda`` (this machine would build CUDA kernels: a GPU, a CUDA torch and nvcc).
    ``same_release`` accepts another final release of the recorded torch release (2.11.0 for
    2.11.1): what an installed wheel's ``torch2.11`` label promises.  Nightlies, pre-releases
    and source builds promise no ABI, so they, and JIT builds, need the exact torch.
    """
    def differs(field):
        return record.get(field) != runtime.get(field)

    built, running = record.get("torch_version"), runtime.get("torch_version")
    if same_release and is_final_release(built) and is_final_release(running):
        torch_differs = torch_release(built) != torch_release(running)
    else:
        torch_differs = differs("torch_version") or differs("torch_git")
    if torch_differs:
        return (f"it was built for torch {record.get('torch_version')} (git {str(record.get('torch_git'))[:12]}), "
                f"this is torch {runtime.get('torch_version')} (git {str(runtime.get('torch_git'))[:12]})")
    if differs("torch_hip"):
        return (f"it was built for torch with ROCm {record.get('torch_hip')}, "
                f"this torch has ROCm {runtime.get('torch_hip')}")
    if differs("torch_cuda"):
        return (f"it was built for torch with CUDA {record.get('torch_cuda')}, "
                f"this torch has CUDA {runtime.get('torch_cuda')}")
    if differs("cxx11_abi"):
        abi = int(bool(record.get("cxx11_abi")))
        return f"it was built with _GLIBCXX_USE_CXX11_ABI={abi}, torch uses the other ABI"
    if differs("python"):
        return f"it was built for Python {record.get('python')}, this is {runtime.get('python')}"
    if differs("platform"):
        return f"it was built for {record.get('platform')}, this is {runtime.get('platform')}"
    if runtime.get("sources") is not None and differs("sources"):
        return "csrc/ has changed since it was built"
    if record.get("with_cuda"):
        for index, cap in enumerate(runtime.get("gpus") or []):
            ok, how = arch_covers(record.get("archs") or [], tuple(cap))
            if not ok:
                return f"GPU cuda:{index} (sm_{cap[0]}{cap[1]}) is not covered: {how}"
    elif runtime.get("want_cuda"):
        return "it has no CUDA kernels, and this machine has a GPU and nvcc to build them"
    return None
