"""Building childopt._C into the cache: a build child process in a private directory, then an atomic publish.

``build`` takes the build lock, builds unless another process published the key meanwhile, and
publishes.  ``run_build`` runs childopt._native.worker in a child process group inside a private
``<root>/.tmp-*`` directory, bounded by CHILDOPT_BUILD_TIMEOUT (torch's own ninja call has none),
with TORCH_CUDA_ARCH_LIST and MAX_JOBS set in the child's environment only.  The library is
fsynced and its size and sha256 recorded in the manifest, which is written and fsynced before
``os.rename`` publishes the directory, so no reader sees half a build and a library damaged later
is never loaded; losing the rename race means using the winner's build.  An untrusted directory
under the build's name (a corrupt manifest, a damaged library) is set aside before building, so
the new build can be published.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from childopt._native import config as cfg
from childopt._native import worker
from childopt._native.cache import MANIFEST, file_sha256, lookup, set_aside_and_report, verify_build, writable_root
from childopt._native.env import PROCESS_START, build_timeout, hostname, lock_timeout
from childopt._native.errors import ExtensionUnavailable, Unreadable, Untrusted, warn_once
from childopt._native.lock import BuildLock, lock_path
from childopt._native.spec import BuildSpec

log = logging.getLogger("childopt")


def worker_env_path() -> str:
    """PATH for the build: ninja from the `ninja` wheel lives beside this Python (or in ninja.BIN_DIR),
    which is not on PATH when a virtual environment's python runs without activating it."""
    extra = [os.path.dirname(sys.executable)]
    try:
        import ninja  # noqa: PLC0415

        extra.append(ninja.BIN_DIR)
    except (ImportError, AttributeError):
        pass
    return os.pathsep.join(extra + [os.environ.get("PATH", "")])


def _worker_env(spec: BuildSpec) -> dict:
    env = dict(os.environ)
    env["PATH"] = worker_env_path()
    preset_jobs = env.get("MAX_JOBS", "").strip()
    if not preset_jobs.isdigit() or int(preset_jobs) < 1:  # ninja -j 0 is unlimited: every core, all the memory
        env["MAX_JOBS"] = str(cfg.max_jobs(spec.with_cuda))
        if preset_jobs:
            warn_once(("max_jobs", preset_jobs),
                      f"childopt: ignoring MAX_JOBS={preset_jobs!r} (not a number of jobs >= 1); building with "
                      f"MAX_JOBS={env['MAX_JOBS']}")
    preset = env.pop("TORCH_CUDA_ARCH_LIST", None)
    if spec.with_cuda:
        env["TORCH_CUDA_ARCH_LIST"] = ";".join(spec.archs)
        if preset is not None and preset != env["TORCH_CUDA_ARCH_LIST"]:
            warn_once(("arch_list", preset),
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


def _save_failed_log(root: Path, spec: BuildSpec, log_file: Path) -> str:
    """Where the log of a failed build is kept, or why it is not: the private directory holding it is removed."""
    logs = root / "logs"
    target = logs / f"failed-{spec.dirname}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
    try:
        logs.mkdir(exist_ok=True)
        shutil.copyfile(log_file, target)
        return str(target)
    except OSError as exc:
        return f"not kept ({target} could not be written: {exc.strerror or exc})"


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
    worker.kill_build_group(pgid, protect={os.getpgrp()})


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
        "cflags": spec.inputs["cxx_flags"],
        "ldflags": spec.inputs["ld_flags"],
        "cuda_cflags": cfg.nvcc_flags(spec.with_cuda),
        "with_cuda": spec.with_cuda,
        "build_dir": str(tmp),
    }
    (tmp / "build_job.json").write_text(json.dumps(job, indent=1))
    log_file = tmp / "build.log"
    code = "import runpy, sys; runpy.run_path(sys.argv[1])['worker_main'](sys.argv[2:])"
    cmd = [sys.executable, "-c", code, worker.__file__, str(tmp / "build_job.json"), str(os.getpid())]
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
    """Record the build in ``tmp``: the library is fsynced and its size and sha256 written into the manifest,
    which is fsynced too, so a reader of the published build can tell a damaged library from it."""
    library = f"{spec.module_name}.so"
    if not (tmp / library).is_file():
        raise ExtensionUnavailable(f"the build finished without producing {tmp / library}")
    manifest = {
        "key": spec.key, "base_key": spec.base_key, "module": spec.module_name, "library": library,
        "size": (tmp / library).stat().st_size, "sha256": file_sha256(tmp / library, sync=True),
        "inputs": spec.inputs, "published_at": time.time(), "build_seconds": round(seconds, 1),
        "host": hostname(), "pid": os.getpid(), "lock": lock,
    }
    for obj in tmp.glob("*.o"):  # never rebuilt in place, so the objects are dead weight (large for CUDA)
        obj.unlink()
    path = tmp / MANIFEST
    with open(path, "w") as f:
        json.dump(manifest, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    # mkdtemp made the directory 0700 and a strict umask the files 0600: a published build is read by every
    # user of a shared cache, whatever the umask of the one who built it.
    for item in tmp.iterdir():
        if item.is_file() and not item.is_symlink():
            os.chmod(item, 0o644)
    os.chmod(tmp, 0o755)
    _fsync_dir(tmp)


def _publish(tmp: Path, final: Path, force: bool) -> Path:
    """Atomically rename ``tmp`` to ``final``; a forced rebuild first moves the old build aside (never deletes it)."""
    if force and final.exists():
        aside = final.parent / f".old-{final.name}-{hostname()}-{os.getpid()}-{os.urandom(4).hex()}"
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
    try:
        verify_build(final)
    except Untrusted as exc:
        raise ExtensionUnavailable(f"{exc}; it was published by another process and is not loaded "
                                   "(python -m childopt clean removes it)") from None
    return final


def _clear_the_name(root: Path, spec: BuildSpec, newer_than: float | None) -> Path | None:
    """The build of ``spec`` already published in ``root``, else None once no untrusted directory holds its name.

    Runs under the build lock: an untrusted build (or a file) under the name is set aside (a corrupt
    manifest would otherwise make the publish of every new build fail, after the whole build).
    Raises Unreadable when a build this user may not read holds the name: it is not ours to move.
    """
    found, untrusted = lookup(spec, [root], newer_than)
    if found is not None:
        return found
    for bad in untrusted:
        if Path(bad.directory) != root / spec.dirname:
            continue
        if isinstance(bad, Unreadable):
            raise bad
        if not set_aside_and_report(bad, "building it again"):
            raise ExtensionUnavailable(f"cannot build childopt._C into {root}: {bad.directory} holds an untrusted "
                                       f"build ({bad.why}) that cannot be moved aside; remove it")
    return None


def build(spec: BuildSpec, force: bool = False) -> tuple[Path, str]:
    """Build ``spec`` unless it is published; returns (published directory, what happened).

    In the per-user fallback root when another user's build that this user may not read holds the
    name in the cache root (a shared cache): it is left alone.
    """
    try:
        return _build_in(writable_root(), spec, force)
    except Unreadable as exc:
        return _build_in(writable_root(unusable=exc), spec, force)


def _build_in(root: Path, spec: BuildSpec, force: bool) -> tuple[Path, str]:
    """``build`` in the cache root ``root``."""
    newer_than = PROCESS_START if force else None
    with BuildLock(lock_path(root, spec), lock_timeout(), f"childopt._C ({spec.dirname})") as held:
        found = _clear_the_name(root, spec, newer_than)
        if found is not None:
            return found, f"built by another process: {found}"
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{spec.key16}-{hostname()}-{os.getpid()}-", dir=root))
        try:
            seconds = run_build(spec, tmp, root)
            _write_manifest(tmp, spec, seconds, "held" if held else "not held")
            final = _publish(tmp, root / spec.dirname, force)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    log.info("childopt: built childopt._C in %.0f s: %s", seconds, final)
    return final, f"built in {seconds:.0f} s: {final}"
