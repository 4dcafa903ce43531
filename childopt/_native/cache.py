"""The cache of JIT builds of childopt._C: its roots, the published builds in them, and cleaning it.

A build is published as ``<root>/childopt_C-<key16>/`` holding a ``manifest.json``; private build
directories (``.tmp-<key16>-<host>-<pid>-*``) and forced-rebuild leftovers (``.old-*``) beside them
are never read, only reported and cleaned.  The root is CHILDOPT_CACHE_DIR, else the XDG cache,
or a per-user directory in the temp dir when that cannot be written.
"""
from __future__ import annotations

import errno
import json
import os
import re
import shutil
import tempfile
import time
from pathlib import Path

from childopt._native import config as cfg
from childopt._native.env import hostname, lock_timeout, pid_alive, uid
from childopt._native.errors import ExtensionUnavailable, warn_once
from childopt._native.spec import BuildSpec, build_spec

MANIFEST = "manifest.json"


def cache_root() -> Path:
    """CHILDOPT_CACHE_DIR, else $XDG_CACHE_HOME/childopt, else ~/.cache/childopt."""
    env = os.environ.get("CHILDOPT_CACHE_DIR", "").strip()
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME", "").strip() or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(xdg) / "childopt"


def fallback_root() -> Path:
    """Where builds go when the cache root cannot be written: a per-user directory in the temp dir."""
    return Path(tempfile.gettempdir()) / f"childopt-{uid()}"


def _safe_fallback(path: Path) -> bool:
    """The per-user fallback must be ours and not writable by others (it is in a shared temp dir)."""
    try:
        st = path.lstat()
    except OSError:
        return False
    return path.is_dir() and not path.is_symlink() and st.st_uid == uid() and not st.st_mode & 0o022


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
            warn_once(("fallback", str(root)),
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


def age_of(path: Path) -> float:
    try:
        return max(0.0, time.time() - path.stat().st_mtime)
    except OSError:
        return 0.0


def size_of(path: Path) -> int:
    total = 0
    for p in path.rglob("*"):
        try:
            if p.is_file() and not p.is_symlink():
                total += p.stat().st_size
        except OSError:
            pass
    return total


def human_age(seconds: float) -> str:
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
        age = age_of(path)
        m = _TMP.match(path.name)
        if path.name.startswith(".old-"):
            out.append({"path": path, "age": age, "stale": True, "why": "set aside by a forced rebuild"})
        elif m and m.group(2) == hostname():
            pid = int(m.group(3))
            alive = pid_alive(pid) and pid != os.getpid()
            out.append({"path": path, "age": age, "stale": not alive,
                        "why": f"builder pid {pid} is {'running' if alive else 'gone'}"})
        else:
            out.append({"path": path, "age": age, "stale": age > timeout,
                        "why": f"builder on another host, last change {human_age(age)} ago"})
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
