"""Finding, building and loading the native extension childopt._C (DESIGN.md, "Building and loading").

Order, once per process (the result, module or error, is cached: ``TORCH_LIBRARY(childopt)``
can be registered only once per process):

1. **Prebuilt** ``childopt._C`` (``CHILDOPT_BUILD_EXT=1`` at install): imported only if its
   ``_build_info.json`` matches the running torch (version and git version), torch's CUDA, the
   C++ ABI, Python, the platform and the installed sources, and its arch list covers every
   visible GPU (a cubin for the GPU's major version at or below its minor, or PTX at or below
   it).  Otherwise one warning says what mismatched and the JIT path takes over: never a
   crash, never a kernel built for another target.
2. **Cache**: ``<root>/childopt_C-<key16>/`` published with a ``manifest.json`` for exactly
   this key (or, for CUDA builds, a build of the same key for more archs) is imported without
   taking any lock.
3. **JIT build**: under ``fcntl.flock`` on ``<root>/locks/childopt_C-<key16>.lock`` (a file
   never deleted), waited on with ``CHILDOPT_LOCK_TIMEOUT`` and a progress line naming the
   holder; after the timeout the process builds anyway.  The build runs in a child process
   (``torch.utils.cpp_extension.load`` and ninja) inside ``<root>/.tmp-<key16>-<host>-<pid>-*``
   and is published by ``os.rename`` after its manifest is written and fsynced; losing the
   rename race means using the winner's build.

The key hashes everything a build depends on (childopt._build_config.key_inputs), so a changed
source, flag, torch, CUDA, compiler, arch list, Python or platform gives a new directory and
never touches an old one.  Correctness never depends on the lock: a builder killed at any
point leaves a ``.tmp-*`` directory nobody reads and a lock the kernel has released.

Why the build runs in a child process: a compiler or ninja that hangs or is OOM-killed cannot
take the training process with it, the parent bounds the build with ``CHILDOPT_BUILD_TIMEOUT``
(torch's own ninja call has no timeout), ``TORCH_CUDA_ARCH_LIST`` and ``MAX_JOBS`` are set in
the child's environment only, and the child and its compilers die with the parent (a process
group, ``PR_SET_PDEATHSIG`` and a watchdog), so a killed builder leaves no compiler running.
"""
from __future__ import annotations

import errno
import importlib.util
import json
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from childopt import _build_config as cfg

try:
    import fcntl
except ImportError:  # not POSIX: builds run without the lock (the atomic publish keeps them correct)
    fcntl = None

log = logging.getLogger("childopt")

PACKAGE_DIR = Path(__file__).resolve().parent
# Where a prebuilt childopt._C and its _build_info.json live (tests point this elsewhere).
PREBUILT_DIR = PACKAGE_DIR
DEFAULT_LOCK_TIMEOUT = 900.0
DEFAULT_BUILD_TIMEOUT = 3600.0
PROGRESS_EVERY = 15.0
# A lock file of torch's own JIT cache that no process has open and is this old is stale.
TORCH_LOCK_STALE_AGE = 600.0
MANIFEST = "manifest.json"
ENV_VARS = ("CHILDOPT_CACHE_DIR", "CHILDOPT_LOCK_TIMEOUT", "CHILDOPT_BUILD_TIMEOUT", "CHILDOPT_CUDA_ARCHS",
            "CHILDOPT_FORCE_REBUILD", "CHILDOPT_BACKEND", "MAX_JOBS", "TORCH_CUDA_ARCH_LIST", "CUDA_HOME", "CXX",
            "TORCH_EXTENSIONS_DIR")
_PROCESS_START = time.time()


class ExtensionUnavailable(RuntimeError):
    """childopt._C cannot be loaded here; the message says why (and where the build log is)."""


class NeedsBuild(ExtensionUnavailable):
    """childopt._C is not built for this torch and toolchain yet, and building was not allowed."""


# ----------------------------------------------------------------------------- environment


def _env_seconds(name: str, default: float) -> float:
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    try:
        value = float(text)
    except ValueError:
        raise ExtensionUnavailable(f"{name} must be a number of seconds, got {text!r}") from None
    if value < 0:
        raise ExtensionUnavailable(f"{name} must be >= 0, got {text!r}")
    return value


def lock_timeout() -> float:
    """CHILDOPT_LOCK_TIMEOUT: seconds to wait for another process's build before building privately."""
    return _env_seconds("CHILDOPT_LOCK_TIMEOUT", DEFAULT_LOCK_TIMEOUT)


def build_timeout() -> float:
    """CHILDOPT_BUILD_TIMEOUT: seconds one build may take before it is killed."""
    return _env_seconds("CHILDOPT_BUILD_TIMEOUT", DEFAULT_BUILD_TIMEOUT)


def _force_rebuild() -> bool:
    return os.environ.get("CHILDOPT_FORCE_REBUILD", "").strip().lower() in ("1", "true", "yes", "on")


def cache_root() -> Path:
    """CHILDOPT_CACHE_DIR, else $XDG_CACHE_HOME/childopt, else ~/.cache/childopt."""
    env = os.environ.get("CHILDOPT_CACHE_DIR", "").strip()
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME", "").strip() or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(xdg) / "childopt"


def fallback_root() -> Path:
    """Where builds go when the cache root cannot be written: a per-user directory in the temp dir."""
    return Path(tempfile.gettempdir()) / f"childopt-{_uid()}"


def _uid():
    return os.getuid() if hasattr(os, "getuid") else os.environ.get("USERNAME", "user")


def _hostname() -> str:
    return re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname()) or "host"


def _safe_fallback(path: Path) -> bool:
    """The per-user fallback must be ours and not writable by others (it is in a shared temp dir)."""
    try:
        st = path.lstat()
    except OSError:
        return False
    return path.is_dir() and not path.is_symlink() and st.st_uid == _uid() and not st.st_mode & 0o022


def search_roots() -> list[Path]:
    roots = [cache_root()]
    fallback = fallback_root()
    if fallback != roots[0] and _safe_fallback(fallback):
        roots.append(fallback)
    return roots


def _probe_writable(root: Path) -> None:
    root.mkdir(parents=True, exist_ok=True)
    (root / "locks").mkdir(exist_ok=True)
    fd, probe = tempfile.mkstemp(prefix=".probe-", dir=root)
    os.close(fd)
    os.unlink(probe)


def writable_root() -> Path:
    """The cache root, or the per-user fallback with a warning; ExtensionUnavailable if neither can be written."""
    root = cache_root()
    try:
        _probe_writable(root)
        return root
    except OSError as exc:
        first = exc
    fallback = fallback_root()
    where = "CHILDOPT_CACHE_DIR" if os.environ.get("CHILDOPT_CACHE_DIR", "").strip() else "the default cache root"
    if fallback != root:
        try:
            fallback.mkdir(mode=0o700, parents=True, exist_ok=True)
            if not _safe_fallback(fallback):
                raise PermissionError(errno.EPERM, "not owned by this user or writable by others", str(fallback))
            _probe_writable(fallback)
            _warn_once(("fallback", str(root)),
                       f"childopt: cannot write the extension cache {root} ({where}: {first.strerror or first}); "
                       f"building in {fallback} instead. Set CHILDOPT_CACHE_DIR to a writable directory to keep "
                       "builds.")
            return fallback
        except OSError as exc:
            second = f"; nor the fallback {fallback} ({exc.strerror or exc})"
    else:
        second = ""
    raise ExtensionUnavailable(
        f"cannot write the extension cache {root} ({where}: {first.strerror or first}){second}. "
        "Set CHILDOPT_CACHE_DIR to a writable directory.")


_warned: set = set()


def _warn_once(key, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        log.warning(message)


# ----------------------------------------------------------------------------- what would be built


def csrc_dir() -> Path | None:
    """The C++ sources: childopt/csrc when installed, ../csrc in a source checkout."""
    return cfg.find_csrc(PACKAGE_DIR)


def _torch_cuda_home() -> str | None:
    from torch.utils.cpp_extension import CUDA_HOME

    return CUDA_HOME


def _gpu_capabilities() -> list[tuple[int, int]]:
    """Compute capabilities of the visible GPUs (nvidia-smi in a forked child where CUDA cannot start)."""
    import torch

    if not torch.version.cuda or not torch.cuda.is_available():
        return []
    if torch.cuda._is_in_bad_fork():
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=compute_cap", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=30).stdout
            return [tuple(int(x) for x in line.strip().split(".")) for line in out.splitlines() if line.strip()]
        except (OSError, subprocess.SubprocessError, ValueError):
            return []
    return [tuple(torch.cuda.get_device_capability(i)) for i in range(torch.cuda.device_count())]


def runtime(csrc: Path | None = None, probe: bool = True) -> dict:
    """The running torch, Python, platform, GPUs and nvcc, as build records are checked against.

    ``probe=False`` (import time) leaves out what is costly or must not happen yet: no GPU query
    (it starts CUDA), no nvcc lookup, no source digest.
    """
    facts = cfg.torch_facts()
    base = {**facts, "python": cfg.python_tag(), "platform": cfg.platform_tag()}
    if not probe:
        return {**base, "sources": None, "gpus": [], "nvcc": None, "want_cuda": False}
    gpus = _gpu_capabilities()
    nvcc = None
    if facts["torch_cuda"] and not facts["torch_hip"]:
        nvcc = cfg.nvcc_path(_torch_cuda_home())
    csrc = csrc if csrc is not None else csrc_dir()
    return {**base, "sources": cfg.source_digest(csrc) if csrc else None, "gpus": gpus, "nvcc": nvcc,
            "want_cuda": bool(gpus and nvcc)}


def _clamp_to_torch(cap: tuple[int, int]) -> str:
    """The GPU's arch, clamped to the newest arch this torch was built for (as torch does)."""
    import torch

    sms = [int(re.sub(r"[^0-9]", "", a.split("_")[1])) for a in torch.cuda.get_arch_list() if a.startswith("sm_")]
    if sms:
        top = max(sms)
        cap = min(tuple(cap), (top // 10, top % 10))
    return f"{cap[0]}.{cap[1]}"


@dataclass
class BuildSpec:
    """One build: where its sources are, CPU or CUDA, the arch list, and its key."""

    csrc: Path
    with_cuda: bool
    archs: tuple
    inputs: dict
    key: str
    base_key: str
    gpus: list = field(default_factory=list)
    nvcc: str | None = None
    note: str = ""

    @property
    def key16(self) -> str:
        return self.key[:16]

    @property
    def module_name(self) -> str:
        return f"{cfg.NAME}_{self.key[:12]}"

    @property
    def dirname(self) -> str:
        return f"{cfg.NAME}-{self.key16}"

    def describe(self) -> str:
        if not self.with_cuda:
            return "CPU kernels only"
        return f"CPU and CUDA {self.inputs['torch_cuda']} kernels for {';'.join(self.archs)}"


def build_spec(archs: str | None = None, cpu: bool = False, rt: dict | None = None) -> BuildSpec:
    """The build this process would make: CUDA when torch has CUDA, a GPU (or an arch list) and nvcc.

    ``archs`` (``python -m childopt build --archs``) or CHILDOPT_CUDA_ARCHS choose the arch list;
    otherwise it is the visible GPUs' archs with ``+PTX`` on the highest.  ``cpu`` forces a
    CPU-only build.
    """
    csrc = csrc_dir()
    if csrc is None:
        raise ExtensionUnavailable(
            f"the C++ sources of childopt._C are not installed (no csrc/ in {PACKAGE_DIR} or beside it); "
            "reinstall childopt from a source distribution or a checkout")
    rt = rt if rt is not None else runtime(csrc)
    has_cuda_torch = bool(rt["torch_cuda"]) and not rt["torch_hip"]
    env_archs = os.environ.get("CHILDOPT_CUDA_ARCHS", "").strip()
    with_cuda, chosen, note = False, (), ""
    if cpu:
        note = "CPU-only build asked for"
    elif archs is not None or env_archs:
        source = "--archs" if archs is not None else "CHILDOPT_CUDA_ARCHS"
        try:
            parsed = cfg.parse_archs(archs if archs is not None else env_archs)
        except ValueError as exc:
            raise ExtensionUnavailable(f"{source}: {exc}") from None
        if not parsed:
            raise ExtensionUnavailable(f"{source} names no CUDA arch")
        if not has_cuda_torch or not rt["nvcc"]:
            why = "torch has no CUDA" if not has_cuda_torch else "nvcc was not found (set CUDA_HOME)"
            if archs is not None:
                raise ExtensionUnavailable(f"cannot build CUDA kernels for {archs}: {why}")
            note = f"CHILDOPT_CUDA_ARCHS={env_archs} ignored: {why}; building CPU kernels only"
            _warn_once(("archs", note), f"childopt: {note}")
        else:
            with_cuda, chosen = True, cfg.finalize_archs(parsed)
    elif has_cuda_torch and rt["gpus"]:
        if rt["nvcc"]:
            with_cuda, chosen = True, cfg.finalize_archs(_clamp_to_torch(c) for c in rt["gpus"])
        else:
            note = ("torch has CUDA and a GPU is visible, but nvcc was not found (set CUDA_HOME): childopt._C is "
                    "built with CPU kernels only, and CUDA tensors use the Triton backend")
            _warn_once(("nonvcc",), f"childopt: {note}")
    nvcc_version = cfg.tool_version(rt["nvcc"]) if with_cuda else None
    torch_part = {k: rt[k] for k in ("torch_version", "torch_git", "torch_cuda", "torch_hip", "cxx11_abi")}
    inputs = cfg.key_inputs(torch_part, rt["sources"], with_cuda, chosen, nvcc_version)
    key, base_key = cfg.keys(inputs)
    return BuildSpec(csrc=csrc, with_cuda=with_cuda, archs=tuple(inputs["archs"]), inputs=inputs, key=key,
                     base_key=base_key, gpus=list(rt["gpus"]), nvcc=rt["nvcc"] if with_cuda else None, note=note)


# ----------------------------------------------------------------------------- prebuilt childopt._C


def prebuilt_record(package_dir: Path | None = None) -> dict | None:
    """The ``_build_info.json`` written by setup.py beside childopt._C, or None."""
    path = (package_dir or PREBUILT_DIR) / cfg.BUILD_INFO_FILE
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        return {"unreadable": f"{path}: {exc}"}
    return record if isinstance(record, dict) else {"unreadable": f"{path}: not a JSON object"}


def check_prebuilt(rt: dict, package_dir: Path | None = None) -> tuple[Path | None, str]:
    """(library to import, why) if the prebuilt module may be used here, else (None, why not).

    This is the runtime guard of an installed build: torch version and git version, torch's
    CUDA, the C++ ABI, Python, platform and sources must match, and every visible GPU must be
    covered by its arch list; a CPU-only prebuilt does not count where a CUDA build is possible.
    """
    package_dir = package_dir or PREBUILT_DIR
    record = prebuilt_record(package_dir)
    if record is None:
        return None, "no prebuilt childopt._C (installed without CHILDOPT_BUILD_EXT=1)"
    if "unreadable" in record:
        return None, f"the prebuilt childopt._C's build record is unreadable ({record['unreadable']})"
    library = package_dir / str(record.get("file", ""))
    if not record.get("file") or not library.is_file():
        return None, f"the prebuilt childopt._C named by {cfg.BUILD_INFO_FILE} is missing ({library})"
    why = cfg.check_record(record, rt, same_release=True)
    if why is not None:
        return None, f"the prebuilt childopt._C does not fit: {why}"
    kind = f"CUDA {record.get('torch_cuda')} for {';'.join(record.get('archs') or [])}" if record.get("with_cuda") \
        else "CPU"
    return library, f"prebuilt for torch {record.get('torch_version')}, {kind}"


# What happens instead of a prebuilt module that does not fit: the same words at import and at load.
PREBUILT_FALLBACK = ("using a JIT build for this torch instead (backend='native' or python -m childopt build "
                     "compiles it; until then backend='auto' takes Triton, then the reference backend)")


def check_installed_build() -> str | None:
    """At ``import childopt``: one warning if the installed childopt._C was built for another torch,
    CUDA, C++ ABI, Python or platform; returns that message (None when it fits or there is none).

    Nothing is loaded and no GPU is queried (that would start CUDA at import, which breaks
    fork-based workers): the arch list is checked against the GPUs when the module is first
    loaded.  Never raises: a broken record must not break ``import childopt``.
    """
    try:
        if prebuilt_record() is None:
            return None
        library, why = check_prebuilt(runtime(probe=False))
    except Exception as exc:  # noqa: BLE001 - the guard must never break the import
        log.debug("childopt: checking the prebuilt childopt._C failed: %s", exc)
        return None
    if library is not None:
        return None
    message = f"childopt: {why}; {PREBUILT_FALLBACK}"
    _warn_once(("prebuilt",), message)
    return message


# ----------------------------------------------------------------------------- published builds


def read_manifest(directory: Path) -> dict | None:
    """The manifest of a published build directory, if it is complete (manifest and library present)."""
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or not (directory / str(manifest.get("library", ""))).is_file():
        return None
    return manifest


def published_dirs(root: Path) -> list[Path]:
    try:
        return sorted(p for p in root.glob(f"{cfg.NAME}-*") if p.is_dir())
    except OSError:
        return []


def find_published(spec: BuildSpec, roots: list[Path] | None = None, newer_than: float | None = None) -> Path | None:
    """A published build for ``spec``: its own key first, then (CUDA) one of the same base key whose archs
    cover every visible GPU.  ``newer_than`` (CHILDOPT_FORCE_REBUILD) ignores builds published before it."""
    roots = roots if roots is not None else search_roots()

    def fresh(manifest):
        return newer_than is None or manifest.get("published_at", 0) >= newer_than

    for root in roots:
        directory = root / spec.dirname
        manifest = read_manifest(directory)
        if manifest and manifest.get("key") == spec.key and fresh(manifest):
            return directory
    if spec.with_cuda and spec.gpus:
        for root in roots:
            for directory in published_dirs(root):
                manifest = read_manifest(directory)
                if not manifest or manifest.get("base_key") != spec.base_key or not fresh(manifest):
                    continue
                archs = manifest.get("inputs", {}).get("archs", [])
                if all(cfg.arch_covers(archs, tuple(cap))[0] for cap in spec.gpus):
                    return directory
    return None


# ----------------------------------------------------------------------------- the build lock


def _holder_text(path: Path) -> str:
    """Who holds a build lock, from what the holder wrote into it."""
    try:
        info = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        info = {}
    if not info:
        return "holder unknown"
    started = info.get("started", 0)
    alive = ""
    if info.get("host") == _hostname() and isinstance(info.get("pid"), int) and not _pid_alive(info["pid"]):
        alive = ", that process is gone (a child it forked still holds the lock)"
    return (f"pid {info.get('pid')} on {info.get('host')}, since {time.strftime('%H:%M:%S', time.localtime(started))} "
            f"({time.time() - started:.0f} s ago), command {info.get('command', '?')!r}{alive}")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class BuildLock:
    """``fcntl.flock`` on a lock file that is never deleted, waited on with a timeout.

    Written by hand rather than with ``filelock``: the holder writes who it is into the file
    after acquiring it, a waiter prints that every PROGRESS_EVERY seconds, and the behaviour
    does not change with the installed filelock version (some delete the file on release, which
    splits waiters across inodes and breaks on NFS; 4.x silently falls back to a marker-file
    lock where flock is missing, which is exactly the stale-lock hang this loader avoids).
    ``with BuildLock(...) as held``: held is False after the timeout or where the file system
    has no flock; the caller then builds anyway (the atomic publish keeps that correct).
    """

    def __init__(self, path: Path, timeout: float, what: str):
        self.path, self.timeout, self.what = path, timeout, what
        self.fd: int | None = None
        self.held = False

    def __enter__(self) -> bool:
        if fcntl is None:
            return False
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o666)
        except OSError as exc:
            log.warning("childopt: cannot open the build lock %s (%s); building without it", self.path, exc)
            return False
        start = time.monotonic()
        next_note = start
        while True:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                self.held = True
                self._write_holder()
                return True
            except OSError as exc:
                if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    log.warning("childopt: the file system of %s does not support flock (%s); building without "
                                "the lock", self.path, exc)
                    self._close()
                    return False
            now = time.monotonic()
            waited = now - start
            if waited >= self.timeout:
                log.warning(
                    "childopt: gave up waiting for the build lock %s after %.0f s (CHILDOPT_LOCK_TIMEOUT=%g); "
                    "held by %s. Building privately; whichever build finishes first is published.",
                    self.path, waited, self.timeout, _holder_text(self.path))
                self._close()
                return False
            if now >= next_note:
                log.warning("childopt: waiting for another process to build %s (held by %s); waited %.0f s of "
                            "CHILDOPT_LOCK_TIMEOUT=%g s", self.what, _holder_text(self.path), waited, self.timeout)
                next_note = now + PROGRESS_EVERY
            time.sleep(max(0.01, min(0.2, self.timeout - waited)))

    def _write_holder(self) -> None:
        info = {"host": _hostname(), "pid": os.getpid(), "started": time.time(),
                "command": " ".join(getattr(sys, "orig_argv", sys.argv))[:300]}
        try:
            os.ftruncate(self.fd, 0)
            os.pwrite(self.fd, json.dumps(info).encode(), 0)
        except OSError:
            pass

    def _close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the last descriptor releases the flock
            self.fd = None
        self.held = False

    def __exit__(self, *exc) -> None:
        if self.held:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_UN)
            except OSError:
                pass
        self._close()


def lock_path(root: Path, spec: BuildSpec) -> Path:
    return root / "locks" / f"{spec.dirname}.lock"


def lock_state(path: Path) -> str | None:
    """The holder of a build lock if some process holds it now, else None (probes with LOCK_NB)."""
    if fcntl is None:
        return None
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return _holder_text(path)
        return None
    finally:
        os.close(fd)
    return None


# ----------------------------------------------------------------------------- building


def _worker_env(spec: BuildSpec) -> dict:
    env = dict(os.environ)
    env["PATH"] = _worker_env_path()
    if not env.get("MAX_JOBS", "").strip().isdigit():
        env["MAX_JOBS"] = str(cfg.max_jobs(spec.with_cuda))
    preset = env.pop("TORCH_CUDA_ARCH_LIST", None)
    if spec.with_cuda:
        env["TORCH_CUDA_ARCH_LIST"] = ";".join(spec.archs)
        if preset is not None and preset != env["TORCH_CUDA_ARCH_LIST"]:
            _warn_once(("arch_list", preset),
                       f"childopt: ignoring TORCH_CUDA_ARCH_LIST={preset!r} for childopt._C (building for "
                       f"{env['TORCH_CUDA_ARCH_LIST']}); set CHILDOPT_CUDA_ARCHS to choose its archs")
    return env


def _check_toolchain(spec: BuildSpec, env: dict) -> None:
    cxx = cfg.cxx_compiler()
    if cfg.tool_version(cxx) is None:
        raise ExtensionUnavailable(
            f"no C++ compiler: {cxx!r} (from $CXX, else c++) does not run; install g++ or set CXX")
    if shutil.which("ninja", path=env.get("PATH")) is None:
        raise ExtensionUnavailable("ninja was not found (torch.utils.cpp_extension needs it): pip install ninja")


def _save_failed_log(root: Path, spec: BuildSpec, log_file: Path) -> Path:
    logs = root / "logs"
    target = logs / f"failed-{spec.dirname}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
    try:
        logs.mkdir(exist_ok=True)
        shutil.copyfile(log_file, target)
        return target
    except OSError:
        return log_file


def _log_excerpt(path: Path, lines: int = 25) -> str:
    """The first compiler errors of a build log (from ninja's first FAILED line), else its tail."""
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    for i, line in enumerate(text):
        if line.startswith("FAILED:"):
            return "\n".join(text[i:i + lines])
    return "\n".join(text[-lines:])


def _kill_group(pgid: int) -> None:
    """The build worker's group and everything it started (ninja's jobs have groups of their own)."""
    cfg.kill_build_group(pgid, protect={os.getpgrp()})


def _wait_exited(proc: subprocess.Popen, timeout: float) -> bool:
    """Wait up to ``timeout`` for ``proc`` to exit, without reaping it: its process group id then
    cannot be reused before we kill what is left in the group."""
    try:
        if os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
            return True
    except (AttributeError, ChildProcessError):  # no waitid here, or already reaped
        try:
            proc.wait(timeout=timeout)
            return True
        except subprocess.TimeoutExpired:
            return False
    time.sleep(timeout)
    return False


def run_build(spec: BuildSpec, tmp: Path, root: Path) -> float:
    """Compile ``spec`` into ``tmp`` in a child process group; returns the seconds it took."""
    env = _worker_env(spec)
    _check_toolchain(spec, env)
    job = {
        "module": spec.module_name,
        "sources": [str(p) for p in cfg.source_files(spec.csrc, spec.with_cuda)],
        "include_dirs": [str(p) for p in cfg.include_dirs(spec.csrc)],
        "cflags": cfg.cxx_flags(spec.with_cuda),
        "cuda_cflags": cfg.nvcc_flags(spec.with_cuda),
        "with_cuda": spec.with_cuda,
        "build_dir": str(tmp),
    }
    (tmp / "build_job.json").write_text(json.dumps(job, indent=1))
    log_file = tmp / "build.log"
    code = "import runpy, sys; runpy.run_path(sys.argv[1])['worker_main'](sys.argv[2:])"
    cmd = [sys.executable, "-c", code, cfg.__file__, str(tmp / "build_job.json"), str(os.getpid())]
    log.warning("childopt: building the native extension childopt._C (%s; MAX_JOBS=%s) in %s; this takes a "
                "minute or more, once per torch and toolchain; log: %s", spec.describe(), env["MAX_JOBS"], tmp,
                log_file)
    limit = build_timeout()
    start = time.monotonic()
    with open(log_file, "wb") as out:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env,
                                cwd=tmp, start_new_session=True)
    try:
        next_note = start + 60
        while not _wait_exited(proc, 0.2):
            now = time.monotonic()
            if now - start > limit:
                _kill_group(proc.pid)
                proc.wait()
                saved = _save_failed_log(root, spec, log_file)
                raise ExtensionUnavailable(
                    f"building childopt._C took longer than CHILDOPT_BUILD_TIMEOUT={limit:g} s and was killed; "
                    f"log: {saved}")
            if now >= next_note:
                log.info("childopt: still building childopt._C (%.0f s)", now - start)
                next_note = now + 60
    finally:
        _kill_group(proc.pid)  # the worker's ninja and compilers, whatever happened to the worker
        proc.wait()
    seconds = time.monotonic() - start
    if proc.returncode != 0:
        saved = _save_failed_log(root, spec, log_file)
        raise ExtensionUnavailable(
            f"building childopt._C failed (exit status {proc.returncode}); full log: {saved}\n{_log_excerpt(log_file)}")
    return seconds


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_manifest(tmp: Path, spec: BuildSpec, seconds: float, lock: str) -> None:
    library = f"{spec.module_name}.so"
    if not (tmp / library).is_file():
        raise ExtensionUnavailable(f"the build finished without producing {tmp / library}")
    manifest = {
        "key": spec.key, "base_key": spec.base_key, "module": spec.module_name, "library": library,
        "inputs": spec.inputs, "published_at": time.time(), "build_seconds": round(seconds, 1),
        "host": _hostname(), "pid": os.getpid(), "lock": lock,
    }
    for obj in tmp.glob("*.o"):  # never rebuilt in place, so the objects are dead weight (large for CUDA)
        obj.unlink()
    os.chmod(tmp, 0o755)  # mkdtemp made it 0700; a published build is read by every user of the cache
    path = tmp / MANIFEST
    with open(path, "w") as f:
        json.dump(manifest, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    _fsync_dir(tmp)


def _publish(tmp: Path, final: Path, force: bool) -> Path:
    """Atomically rename ``tmp`` to ``final``; a forced rebuild first moves the old build aside (never deletes it)."""
    if force and final.exists():
        aside = final.parent / f".old-{final.name}-{_hostname()}-{os.getpid()}-{os.urandom(4).hex()}"
        try:
            os.rename(final, aside)
        except FileNotFoundError:
            pass
    try:
        os.rename(tmp, final)
    except OSError as exc:
        if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
            raise
        shutil.rmtree(tmp, ignore_errors=True)  # lost the race: another process published the same key
        log.info("childopt: %s was published by another process first; using it", final)
    _fsync_dir(final.parent)
    if read_manifest(final) is None:
        raise ExtensionUnavailable(f"{final} exists but holds no complete build; remove it (python -m childopt clean)")
    return final


def build(spec: BuildSpec, force: bool = False) -> tuple[Path, str]:
    """Build ``spec`` unless it is published; returns (published directory, what happened)."""
    root = writable_root()
    newer_than = _PROCESS_START if force else None
    with BuildLock(lock_path(root, spec), lock_timeout(), f"childopt._C ({spec.dirname})") as held:
        found = find_published(spec, [root], newer_than)
        if found is not None:
            return found, f"built by another process: {found}"
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{spec.key16}-{_hostname()}-{os.getpid()}-", dir=root))
        try:
            seconds = run_build(spec, tmp, root)
            _write_manifest(tmp, spec, seconds, "held" if held else "not held")
            final = _publish(tmp, root / spec.dirname, force)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    log.info("childopt: built childopt._C in %.0f s: %s", seconds, final)
    return final, f"built in {seconds:.0f} s: {final}"


# ----------------------------------------------------------------------------- loading

_lock = threading.RLock()
_state: dict = {"module": None, "how": "", "error": None}


def _import(library: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, library)
    if spec is None or spec.loader is None:
        raise ExtensionUnavailable(f"cannot import {library}")
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except (ImportError, OSError) as exc:
        raise ExtensionUnavailable(f"{library} does not load: {exc}") from exc
    sys.modules.setdefault(name, module)
    return module


def _import_published(directory: Path):
    manifest = read_manifest(directory)
    if manifest is None:
        raise ExtensionUnavailable(f"{directory} was removed while loading it; try again")
    try:
        return _import(directory / manifest["library"], manifest["module"])
    except ExtensionUnavailable as exc:
        raise ExtensionUnavailable(f"{exc} (remove the build with python -m childopt clean --all)") from exc


def _find_or_build(allow_build: bool):
    force = _force_rebuild()
    csrc = csrc_dir()
    rt = runtime(csrc)
    if force:
        _warn_once(("force",), "childopt: CHILDOPT_FORCE_REBUILD is set: ignoring the prebuilt childopt._C and "
                               "builds published before this process started")
    else:
        library, why = check_prebuilt(rt)
        if library is not None:
            try:
                name = str(prebuilt_record().get("module") or cfg.PREBUILT_MODULE)
                return _import(library, name), why
            except ExtensionUnavailable as exc:
                _warn_once(("prebuilt",), f"childopt: the prebuilt childopt._C does not load ({exc}); "
                                          "using a JIT build instead")
        elif prebuilt_record() is not None:
            _warn_once(("prebuilt",), f"childopt: {why}; {PREBUILT_FALLBACK}")
    spec = build_spec(rt=rt)
    found = find_published(spec, newer_than=_PROCESS_START if force else None)
    if found is not None:
        return _import_published(found), f"JIT build {found}"
    if not allow_build:
        raise NeedsBuild(f"not built yet for this torch and toolchain ({spec.describe()}); "
                         "backend='native' builds it, or run python -m childopt build")
    directory, how = build(spec, force=force)
    return _import_published(directory), f"JIT {how}"


def _load(allow_build: bool):
    with _lock:
        if _state["module"] is not None:
            return _state["module"], _state["how"]
        if _state["error"] is not None:
            raise _state["error"]
        try:
            module, how = _find_or_build(allow_build)
        except NeedsBuild:
            raise
        except ExtensionUnavailable as exc:
            _state["error"] = exc
            raise
        except Exception as exc:  # anything unexpected still reaches the caller as "unavailable, because"
            err = ExtensionUnavailable(f"loading childopt._C failed: {type(exc).__name__}: {exc}")
            err.__cause__ = exc
            _state["error"] = err
            raise err from exc
        _state["module"], _state["how"] = module, how
        return module, how


def load():
    """The extension module (its import registers torch.ops.childopt.*), built if needed; cached per process.

    Raises ExtensionUnavailable with the reason: no compiler, no sources, an unwritable cache,
    a failed build (with the log's path and tail), ...
    """
    return _load(True)[0]


def try_load(build: bool = True):
    """(module, how it was found) or (None, why not); never raises.  ``build=False`` never compiles."""
    try:
        return _load(build)
    except ExtensionUnavailable as exc:
        return None, str(exc)
    except Exception as exc:  # noqa: BLE001 - never raises, by contract
        return None, f"{type(exc).__name__}: {exc}"


def loaded() -> tuple[object | None, str]:
    """What this process has loaded (without loading anything)."""
    return _state["module"], _state["how"]


def status() -> tuple[str, str]:
    """(state, detail) without building or importing: loaded, prebuilt, cached, needs a build, unavailable."""
    if _state["module"] is not None:
        return "loaded", _state["how"]
    try:
        rt = runtime()
        if not _force_rebuild():
            library, why = check_prebuilt(rt)
            if library is not None:
                return "prebuilt", f"{library} ({why})"
            prebuilt_note = f"; {why}" if prebuilt_record() is not None else ""
        else:
            prebuilt_note = "; CHILDOPT_FORCE_REBUILD is set"
        spec = build_spec(rt=rt)
        found = find_published(spec, newer_than=_PROCESS_START if _force_rebuild() else None)
        if found is not None:
            return "cached", f"{found} ({spec.describe()}){prebuilt_note}"
        if cfg.tool_version(cfg.cxx_compiler()) is None:
            return "unavailable", f"not built, and no C++ compiler ({cfg.cxx_compiler()}) to build it{prebuilt_note}"
        return "needs a build", (f"{spec.describe()}, key {spec.key16}: backend='native' or python -m childopt "
                                 f"build compiles it into {cache_root()}{prebuilt_note}")
    except ExtensionUnavailable as exc:
        return "unavailable", str(exc)


# ----------------------------------------------------------------------------- cache inspection


def _age(path: Path) -> float:
    try:
        return max(0.0, time.time() - path.stat().st_mtime)
    except OSError:
        return 0.0


def _size(path: Path) -> int:
    total = 0
    for p in path.rglob("*"):
        try:
            if p.is_file() and not p.is_symlink():
                total += p.stat().st_size
        except OSError:
            pass
    return total


def _human_age(seconds: float) -> str:
    for unit, div in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= div:
            return f"{seconds / div:.0f} {unit}"
    return f"{seconds:.0f} s"


_TMP = re.compile(r"^\.tmp-([0-9a-f]{16})-(.+)-(\d+)-[^-]+$")


def tmp_dirs(root: Path) -> list[dict]:
    """Private build directories (.tmp-*) and forced-rebuild leftovers (.old-*), with whether they are stale."""
    out = []
    try:
        entries = sorted(p for p in root.iterdir() if p.name.startswith((".tmp-", ".old-")) and p.is_dir())
    except OSError:
        return out
    timeout = lock_timeout()
    for path in entries:
        age = _age(path)
        m = _TMP.match(path.name)
        if path.name.startswith(".old-"):
            out.append({"path": path, "age": age, "stale": True, "why": "set aside by a forced rebuild"})
        elif m and m.group(2) == _hostname():
            pid = int(m.group(3))
            alive = _pid_alive(pid) and pid != os.getpid()
            out.append({"path": path, "age": age, "stale": not alive,
                        "why": f"builder pid {pid} is {'running' if alive else 'gone'}"})
        else:
            out.append({"path": path, "age": age, "stale": age > timeout,
                        "why": f"builder on another host, last change {_human_age(age)} ago"})
    return out


def build_locks(root: Path) -> list[dict]:
    """The lock files under <root>/locks and who holds each now."""
    try:
        files = sorted((root / "locks").glob("*.lock"))
    except OSError:
        files = []
    return [{"path": p, "holder": lock_state(p), "age": _age(p)} for p in files]


def _open_by(paths: list[Path]) -> tuple[dict, int]:
    """Which processes have each of ``paths`` open (via /proc/*/fd), and how many processes could not be read."""
    wanted = {os.path.realpath(p): str(p) for p in paths}
    found: dict = {str(p): [] for p in paths}
    unreadable = 0
    proc = Path("/proc")
    if not proc.is_dir():
        return found, -1
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fds = list((entry / "fd").iterdir())
        except (PermissionError, FileNotFoundError, ProcessLookupError):
            unreadable += entry.exists()
            continue
        for fd in fds:
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target in wanted:
                found[wanted[target]].append(int(entry.name))
    return found, unreadable


def torch_extensions_root() -> Path:
    """torch.utils.cpp_extension's JIT root: $TORCH_EXTENSIONS_DIR, else ~/.cache/torch_extensions."""
    env = os.environ.get("TORCH_EXTENSIONS_DIR")
    if env:
        return Path(env)
    from torch.utils.cpp_extension import get_default_build_root

    return Path(get_default_build_root())


def torch_extension_locks() -> list[dict]:
    """``lock`` files of torch's own JIT cache (FileBaton: an O_EXCL marker, no pid inside).

    Its owner is gone when no process has the file open (the builder keeps it open while it
    builds) and it is older than TORCH_LOCK_STALE_AGE (a process on another host sharing the
    directory cannot be seen in /proc).  Such a lock makes every later torch JIT load of that
    extension wait forever.
    """
    root = torch_extensions_root()
    files = []
    for pattern in ("*/lock", "*/*/lock"):
        try:
            files += [p for p in root.glob(pattern) if p.is_file()]
        except OSError:
            pass
    files = sorted(set(files))
    users, unreadable = _open_by(files)
    out = []
    for path in files:
        age = _age(path)
        pids = users[str(path)]
        stale = not pids and age >= TORCH_LOCK_STALE_AGE
        if pids:
            why = f"open by pid {', '.join(map(str, pids))}: a build is running"
        elif unreadable < 0:
            why = "no /proc to check"
        elif age < TORCH_LOCK_STALE_AGE:
            why = f"no process has it open, but it is only {_human_age(age)} old"
        else:
            why = "no process has it open: its builder is gone"
        out.append({"path": path, "age": age, "stale": stale, "why": why, "pids": pids})
    return out


def clean(all_builds: bool = False, dry_run: bool = False) -> list[tuple[Path, str]]:
    """Remove stale private build directories, failed-build logs and published builds this process would not
    use (all published builds with ``all_builds``).  Lock files stay: they are never deleted."""
    removed = []
    current = None
    if not all_builds:
        try:
            current = find_published(build_spec())
        except ExtensionUnavailable as exc:
            raise ExtensionUnavailable(f"cannot tell which build is current ({exc}); use --all to remove every "
                                       "build") from exc
    for root in search_roots():
        for entry in tmp_dirs(root):
            if entry["stale"]:
                removed.append((entry["path"], f"stale build directory ({entry['why']})"))
        for directory in published_dirs(root):
            if current is not None and directory == current:
                continue
            removed.append((directory, "published build" + (" (current)" if all_builds else " not used here")))
        try:
            removed += [(p, "failed-build log") for p in sorted((root / "logs").glob("failed-*.log"))]
        except OSError:
            pass
    if not dry_run:
        for path, _ in removed:
            if path.is_dir():
                # Move aside first so no reader ever sees half a directory under a published name.
                doomed = path.parent / f".old-rm-{path.name.lstrip('.')}-{os.getpid()}"
                try:
                    os.rename(path, doomed)
                    shutil.rmtree(doomed, ignore_errors=True)
                except OSError:
                    shutil.rmtree(path, ignore_errors=True)
            else:
                try:
                    path.unlink()
                except OSError:
                    pass
    return removed


def _fs_type(path: Path) -> str | None:
    """The file system type of ``path`` from /proc/mounts (longest mount-point prefix)."""
    try:
        real = os.path.realpath(path if path.exists() else path.parent)
        best, kind = "", None
        with open("/proc/mounts") as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 3:
                    mount = parts[1].replace("\\040", " ")
                    if (real == mount or real.startswith(mount.rstrip("/") + "/")) and len(mount) >= len(best):
                        best, kind = mount, parts[2]
        return kind
    except OSError:
        return None


# ----------------------------------------------------------------------------- command line


def _print_kv(name: str, value: str) -> None:
    print(f"{name:13}{value}")


def doctor_main(argv=None) -> int:
    """python -m childopt doctor [--fix]: toolchain, torch, CUDA, GPUs, cache, builds, locks."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m childopt doctor",
        description="Check what building and loading childopt._C needs, the build cache, its locks, and stale "
                    "'lock' files in torch's own extension cache.")
    parser.add_argument("--fix", action="store_true",
                        help="remove stale 'lock' files of torch's extension cache whose owner is gone")
    ns = parser.parse_args(argv)

    import torch

    rt = runtime()
    _print_kv("torch", f"{torch.__version__} (git {str(torch.version.git_version)[:12]}), CUDA {torch.version.cuda}, "
                       f"C++11 ABI {int(rt['cxx11_abi'])}, {rt['python']}, {rt['platform']}")
    if rt["gpus"]:
        for i, cap in enumerate(rt["gpus"]):
            _print_kv("GPU" if i == 0 else "", f"cuda:{i} {torch.cuda.get_device_name(i)}, sm_{cap[0]}{cap[1]}")
    else:
        _print_kv("GPU", "none visible" + ("" if torch.version.cuda else " (torch is a CPU build)"))
    cuda_home = _torch_cuda_home() if torch.version.cuda else cfg.find_cuda_home()
    nvcc = cfg.nvcc_path(cuda_home)
    if nvcc:
        version = cfg.tool_version(nvcc) or "does not run"
        note = ""
        m = re.search(r"release (\d+)\.(\d+)", version)
        if not torch.version.cuda:
            note = " (unused: torch has no CUDA)"
        elif m and m.group(1) != str(torch.version.cuda).split(".")[0]:
            note = f" (WARNING: torch was built with CUDA {torch.version.cuda}; a different major version fails)"
        _print_kv("nvcc", f"{nvcc}: {version}{note}")
    else:
        _print_kv("nvcc", "not found" + (" (set CUDA_HOME to build CUDA kernels)" if torch.version.cuda else ""))
    cxx = cfg.cxx_compiler()
    cxx_version = cfg.tool_version(cxx) or "NOT FOUND: install g++ or set CXX"
    _print_kv("C++ compiler", f"{shutil.which(cxx) or cxx}: {cxx_version}")
    path = _worker_env_path()
    ninja = shutil.which("ninja", path=path)
    _print_kv("ninja", f"{ninja}: {cfg.tool_version(ninja) if ninja else ''}" if ninja
              else "NOT FOUND: pip install ninja")
    jobs = os.environ.get("MAX_JOBS")
    try:
        spec = build_spec(rt=rt)
        mem = cfg.mem_available()
        jobs_text = f"MAX_JOBS={jobs} (set)" if jobs else (
            f"MAX_JOBS={cfg.max_jobs(spec.with_cuda)} ({cfg.cpu_count()} CPUs"
            + (f", {mem / 2**30:.1f} GiB available)" if mem else ")"))
        _print_kv("build", f"{spec.describe()}, key {spec.key16}, {jobs_text}")
        if spec.note:
            _print_kv("", spec.note)
    except ExtensionUnavailable as exc:
        spec = None
        _print_kv("build", f"impossible: {exc}")
    state, detail = status()
    _print_kv("childopt._C", f"{state}: {detail}")
    root = cache_root()
    writable = os.access(root, os.W_OK) if root.exists() else os.access(root.parent if root.parent.exists()
                                                                         else Path("/"), os.W_OK)
    fs = _fs_type(root)
    shared = fs and fs.split(".")[0] in ("nfs", "nfs4", "cifs", "smb3", "lustre", "gpfs", "fuse", "beegfs")
    _print_kv("cache root", f"{root} ({'exists' if root.exists() else 'not created yet'}, "
                            f"{'writable' if writable else 'NOT WRITABLE: set CHILDOPT_CACHE_DIR'}"
                            + (f", {fs}" if fs else "") + ")")
    if shared:
        _print_kv("", f"WARNING: {fs} is a network file system; flock may not work across nodes there. A "
                      "node-local CHILDOPT_CACHE_DIR is faster and safer (correctness does not depend on the lock).")
    current = find_published(spec) if spec else None
    for root in search_roots():
        builds = published_dirs(root)
        print(f"published builds in {root}: {len(builds) or 'none'}")
        for directory in builds:
            manifest = read_manifest(directory)
            if manifest is None:
                print(f"  {directory.name}  INCOMPLETE (no manifest or library): python -m childopt clean --all")
                continue
            inputs = manifest.get("inputs", {})
            kind = f"CUDA {inputs.get('torch_cuda')} {';'.join(inputs.get('archs') or [])}" \
                if inputs.get("with_cuda") else "CPU"
            mark = "  <- used here" if current is not None and directory == current else ""
            age = _human_age(time.time() - manifest.get("published_at", 0))
            print(f"  {directory.name}  {kind}, torch {inputs.get('torch_version')}, "
                  f"{_size(directory) / 2**20:.1f} MiB, built {age} ago in {manifest.get('build_seconds', '?')} s"
                  + mark)
        locks = build_locks(root)
        held = [lk for lk in locks if lk["holder"]]
        print(f"build locks in {root / 'locks'}: {len(locks)} file(s), {len(held)} held")
        for lk in held:
            print(f"  {lk['path'].name} held by {lk['holder']}")
        tmps = tmp_dirs(root)
        if tmps:
            print(f"private build directories in {root}: {len(tmps)}")
            for entry in tmps:
                print(f"  {entry['path'].name}  {'STALE' if entry['stale'] else 'active'} ({entry['why']}, "
                      f"{_human_age(entry['age'])} old)" + ("; python -m childopt clean removes it"
                                                           if entry["stale"] else ""))
    torch_root = torch_extensions_root()
    torch_locks = torch_extension_locks()
    stale = [lk for lk in torch_locks if lk["stale"]]
    print(f"torch extension cache {torch_root}: {len(torch_locks)} lock file(s), {len(stale)} stale")
    for lk in torch_locks:
        action = ""
        if lk["stale"] and ns.fix:
            try:
                lk["path"].unlink()
                action = " -> removed"
            except OSError as exc:
                action = f" -> could not remove: {exc}"
        elif lk["stale"]:
            action = " -> remove it with python -m childopt doctor --fix"
        print(f"  {lk['path']}  {'STALE' if lk['stale'] else 'kept'}: {lk['why']}, "
              f"{_human_age(lk['age'])} old{action}")
    env = [f"{var}={os.environ[var]}" for var in ENV_VARS if os.environ.get(var)]
    print(f"environment: {' '.join(env) if env else 'no CHILDOPT_* or build variables set'}")
    if os.environ.get("TORCH_CUDA_ARCH_LIST"):
        print("  TORCH_CUDA_ARCH_LIST is ignored for childopt._C: set CHILDOPT_CUDA_ARCHS to choose its archs")
    return 0 if state in ("loaded", "prebuilt", "cached", "needs a build") else 1


def _worker_env_path() -> str:
    """PATH for the build: ninja from the `ninja` wheel lives beside this Python (or in ninja.BIN_DIR),
    which is not on PATH when a virtual environment's python runs without activating it."""
    extra = [os.path.dirname(sys.executable)]
    try:
        import ninja  # noqa: PLC0415

        extra.append(ninja.BIN_DIR)
    except (ImportError, AttributeError):
        pass
    return os.pathsep.join(extra + [os.environ.get("PATH", "")])


def build_main(argv=None) -> int:
    """python -m childopt build [--archs 8.0,9.0] [--cpu] [--force]: prebuild into the cache."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m childopt build",
        description="Build childopt._C into the cache (CHILDOPT_CACHE_DIR, else ~/.cache/childopt) so that later "
                    "processes load it without compiling: for Docker images and cluster warm-up.")
    parser.add_argument("--archs", help="CUDA archs to build for, e.g. 8.0,9.0 (default: CHILDOPT_CUDA_ARCHS, else "
                                        "the visible GPUs; +PTX is added to the highest)")
    parser.add_argument("--cpu", action="store_true", help="build the CPU kernels only")
    parser.add_argument("--force", action="store_true",
                        help="build again even if published (the old build is set aside, not deleted)")
    ns = parser.parse_args(argv)
    if ns.archs and ns.cpu:
        parser.error("--archs and --cpu exclude each other")
    try:
        spec = build_spec(archs=ns.archs, cpu=ns.cpu)
        print(f"childopt._C: {spec.describe()}, key {spec.key16}")
        found = None if ns.force else find_published(spec)
        if found is not None:
            print(f"already built: {found}")
            return 0
        directory, how = build(spec, force=ns.force)
    except ExtensionUnavailable as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(how)
    return 0


def clean_main(argv=None) -> int:
    """python -m childopt clean [--all] [--dry-run]."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m childopt clean",
        description="Remove stale private build directories, failed-build logs and published builds of childopt._C "
                    "that this machine's torch and toolchain would not use. Lock files are kept.")
    parser.add_argument("--all", action="store_true", help="also remove the build that would be used here")
    parser.add_argument("--dry-run", action="store_true", help="only list what would be removed")
    ns = parser.parse_args(argv)
    try:
        removed = clean(all_builds=ns.all, dry_run=ns.dry_run)
    except ExtensionUnavailable as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    verb = "would remove" if ns.dry_run else "removed"
    for path, why in removed:
        print(f"{verb} {path} ({why})")
    if not removed:
        print(f"nothing to remove in {', '.join(map(str, search_roots()))}")
    return 0
