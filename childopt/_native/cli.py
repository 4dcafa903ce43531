"""The command line of childopt._C: python -m childopt doctor, build and clean.

``doctor`` reports everything building and loading the extension depends on (toolchain, torch,
GPUs, the cache, its builds and locks, stale lock files in torch's own extension cache);
``build`` prebuilds into the cache (Docker images, cluster warm-up); ``clean`` removes what this
machine would not use.
"""
from __future__ import annotations

import os
import re
import shutil
import sys
import time
from pathlib import Path

from childopt._native import config as cfg
from childopt._native.build import build, worker_env_path
from childopt._native.cache import (cache_root, clean, fallback_root, find_published, human_age, number_field,
                                    planned_root, published_builds, recorded_archs, search_roots, size_of, tmp_dirs)
from childopt._native.env import DEFAULT_LOCK_TIMEOUT, ENV_VARS, lock_timeout, setting_problems
from childopt._native.errors import ExtensionUnavailable, Unreadable
from childopt._native.loader import status
from childopt._native.lock import build_locks, torch_extension_locks, torch_extensions_root
from childopt._native.spec import build_spec, runtime, torch_cuda_home


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

    rt = runtime()
    _report_toolchain(rt)
    spec = _report_build(rt)
    state, detail = status()
    _print_kv("childopt._C", f"{state}: {detail}")
    _report_cache_root()
    current = find_published(spec) if spec else None
    try:
        stale_after = lock_timeout()
    except ExtensionUnavailable:
        stale_after = DEFAULT_LOCK_TIMEOUT  # reported below, with the other settings
    for root in search_roots():
        _report_builds(root, current)
        _report_build_locks(root)
        _report_private_dirs(root, stale_after)
    _report_torch_locks(ns.fix)
    problems = _report_environment()
    return 0 if state in ("loaded", "prebuilt", "cached", "needs a build") and not problems else 1


def _report_toolchain(rt: dict) -> None:
    """torch, the GPUs, nvcc, the C++ compiler and ninja: what a build needs."""
    import torch

    _print_kv("torch", f"{torch.__version__} (git {str(torch.version.git_version)[:12]}), CUDA {torch.version.cuda}, "
                       f"C++11 ABI {int(rt['cxx11_abi'])}, {rt['python']}, {rt['platform']}")
    if rt["gpus"]:
        for i, cap in enumerate(rt["gpus"]):
            _print_kv("GPU" if i == 0 else "", f"cuda:{i} {torch.cuda.get_device_name(i)}, sm_{cap[0]}{cap[1]}")
    else:
        _print_kv("GPU", "none visible" + ("" if torch.version.cuda else " (torch is a CPU build)"))
    cuda_home = torch_cuda_home() if torch.version.cuda else cfg.find_cuda_home()
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
    path = worker_env_path()
    ninja = shutil.which("ninja", path=path)
    _print_kv("ninja", f"{ninja}: {cfg.tool_version(ninja) if ninja else ''}" if ninja
              else "NOT FOUND: pip install ninja")


def _report_build(rt: dict):
    """The build this process would make (its BuildSpec, None when no build is possible)."""
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
        _print_kv("build", f"impossible: {exc}")
        return None
    return spec


def _report_cache_root() -> None:
    """The cache root: whether builds can go there (or where they go instead) and its file system."""
    root = cache_root()
    target, problem = planned_root()
    fs = _fs_type(root)
    if problem is None:
        usable = "writable"
    elif target is not None:
        usable = f"NOT USABLE: {problem}; builds go to {target} instead: set CHILDOPT_CACHE_DIR"
    else:
        usable = f"NOT USABLE: {problem}, nor is the fallback {fallback_root()}: set CHILDOPT_CACHE_DIR"
    _print_kv("cache root", f"{root} ({'exists' if root.exists() else 'not created yet'}, {usable}"
                            + (f", {fs}" if fs else "") + ")")
    if fs and fs.split(".")[0] in ("nfs", "nfs4", "cifs", "smb3", "lustre", "gpfs", "fuse", "beegfs"):
        _print_kv("", f"WARNING: {fs} is a network file system; flock may not work across nodes there. A "
                      "node-local CHILDOPT_CACHE_DIR is faster and safer (correctness does not depend on the lock).")


def _report_builds(root: Path, current: Path | None) -> None:
    """Each published build in ``root``: what it is for, or why it is untrusted."""
    builds = published_builds(root)
    print(f"published builds in {root}: {len(builds) or 'none'}")
    for directory, manifest, untrusted in builds:
        if isinstance(untrusted, Unreadable):
            print(f"  {directory.name}  UNREADABLE here: {untrusted.why}; left for its owner, this user builds in "
                  f"{fallback_root()}")
            continue
        if untrusted is not None:
            print(f"  {directory.name}  UNTRUSTED, never loaded: {untrusted.why}; python -m childopt clean removes it")
            continue
        inputs = manifest.get("inputs") if isinstance(manifest.get("inputs"), dict) else {}
        kind = f"CUDA {inputs.get('torch_cuda')} {';'.join(recorded_archs(manifest))}" \
            if inputs.get("with_cuda") else "CPU"
        mark = "  <- used here" if current is not None and directory == current else ""
        published_at = number_field(manifest.get("published_at"))
        age = human_age(time.time() - published_at) if published_at else "?"
        print(f"  {directory.name}  {kind}, torch {inputs.get('torch_version')}, "
              f"{size_of(directory) / 2**20:.1f} MiB, built {age} ago in {manifest.get('build_seconds', '?')} s" + mark)


def _report_build_locks(root: Path) -> None:
    """The build lock files in ``root`` and who holds each now."""
    locks = build_locks(root)
    held = [lk for lk in locks if lk["holder"]]
    print(f"build locks in {root / 'locks'}: {len(locks)} file(s), {len(held)} held")
    for lk in held:
        print(f"  {lk['path'].name} held by {lk['holder']}")


def _report_private_dirs(root: Path, stale_after: float) -> None:
    """Private build directories, leftovers and set-aside builds beside the published builds."""
    entries = tmp_dirs(root, stale_after)
    if entries:
        print(f"private, left-over and set-aside build directories in {root}: {len(entries)}")
    for entry in entries:
        print(f"  {entry['path'].name}  {'STALE' if entry['stale'] else 'active'} ({entry['why']}, "
              f"{human_age(entry['age'])} old)" + ("; python -m childopt clean removes it" if entry["stale"] else ""))


def _report_torch_locks(fix: bool) -> None:
    """Lock files of torch's own extension cache; with ``fix``, the stale ones are removed."""
    torch_locks = torch_extension_locks()
    stale = [lk for lk in torch_locks if lk["stale"]]
    print(f"torch extension cache {torch_extensions_root()}: {len(torch_locks)} lock file(s), {len(stale)} stale")
    for lk in torch_locks:
        action = ""
        if lk["stale"] and fix:
            try:
                lk["path"].unlink()
                action = " -> removed"
            except OSError as exc:
                action = f" -> could not remove: {exc}"
        elif lk["stale"]:
            action = " -> remove it with python -m childopt doctor --fix"
        print(f"  {lk['path']}  {'STALE' if lk['stale'] else 'kept'}: {lk['why']}, {human_age(lk['age'])} old{action}")


def _report_environment() -> list[str]:
    """The CHILDOPT_* and build variables that are set, and what is wrong with them (returned)."""
    env = [f"{var}={os.environ[var]}" for var in ENV_VARS if os.environ.get(var)]
    print(f"environment: {' '.join(env) if env else 'no CHILDOPT_* or build variables set'}")
    if os.environ.get("TORCH_CUDA_ARCH_LIST"):
        print("  TORCH_CUDA_ARCH_LIST is ignored for childopt._C: set CHILDOPT_CUDA_ARCHS to choose its archs")
    problems = setting_problems()
    for problem in problems:
        print(f"  INVALID: {problem}")
    return problems


def build_main(argv=None) -> int:
    """python -m childopt build [--archs 8.0,9.0] [--cpu] [--force]: prebuild into the cache."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m childopt build",
        description="Build childopt._C into the cache (CHILDOPT_CACHE_DIR, else ~/.cache/childopt) so that later "
                    "processes load it without compiling: for Docker images and cluster warm-up.")
    def archs_argument(text: str) -> str:
        """--archs as given, once it names CUDA archs: a bad list is a usage error (exit 2), not a failed build."""
        try:
            named = cfg.parse_archs(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
        if not named:
            raise argparse.ArgumentTypeError(f"{text!r} names no CUDA arch (expected e.g. 8.0,9.0)")
        return text

    parser.add_argument("--archs", type=archs_argument,
                        help="CUDA archs to build for, e.g. 8.0,9.0 (default: CHILDOPT_CUDA_ARCHS, else the visible "
                             "GPUs; +PTX is added to the highest)")
    parser.add_argument("--cpu", action="store_true", help="build the CPU kernels only")
    parser.add_argument("--force", action="store_true",
                        help="build again even if published (the old build is set aside, not deleted)")
    ns = parser.parse_args(argv)
    if ns.archs is not None and ns.cpu:
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
        description="Remove stale private build directories, set-aside and untrusted builds, failed-build logs and "
                    "published builds of childopt._C that this machine's torch and toolchain would not use. Lock "
                    "files are kept. Exits 1, naming each path, when something could not be removed.")
    parser.add_argument("--all", action="store_true", help="also remove the build that would be used here")
    parser.add_argument("--dry-run", action="store_true", help="only list what would be removed")
    ns = parser.parse_args(argv)
    try:
        removed, failed = clean(all_builds=ns.all, dry_run=ns.dry_run)
    except ExtensionUnavailable as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    verb = "would remove" if ns.dry_run else "removed"
    for path, why in removed:
        print(f"{verb} {path} ({why})")
    for path, why, error in failed:
        print(f"error: could not remove {path} ({why}): {error}", file=sys.stderr)
    if not removed and not failed:
        print(f"nothing to remove in {', '.join(map(str, search_roots()))}")
    return 1 if failed else 0
