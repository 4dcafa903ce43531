"""The cache of JIT builds of childopt._C: its roots, the published builds in them, their trust, and cleaning it.

A build is published as ``<root>/childopt_C-<key16>/`` holding its library and a ``manifest.json``
that records the library's size and sha256 (taken after the library was fsynced).  A published
build is loaded only after its library matches that checksum (verify_build); one that does not,
or whose manifest is corrupt, or that fails to load, is renamed to ``.bad-<name>-*`` (set_aside)
so that no process tries it again.  Private build directories (``.tmp-<key16>-<host>-<pid>-*``),
forced-rebuild and clean leftovers (``.old-*``) and set-aside builds (``.bad-*``) beside them are
never read, only reported and cleaned.  The root is CHILDOPT_CACHE_DIR, else the XDG cache, or a
per-user directory in the temp dir when that cannot be written; a relative path is made absolute.
"""
from __future__ import annotations

import errno
import functools
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from pathlib import Path

from childopt._native import config as cfg
from childopt._native.env import hostname, lock_timeout, pid_alive, uid
from childopt._native.errors import ExtensionUnavailable, Unreadable, Untrusted, warn_once
from childopt._native.spec import BuildSpec, build_spec

MANIFEST = "manifest.json"
# Written into a set-aside build: why it was set aside, when and by whom (doctor and clean show it).
SET_ASIDE_RECORD = "set_aside.json"
# Name prefixes of the directories beside published builds that no process ever loads.
LEFTOVER, SET_ASIDE = ".old-", ".bad-"


@functools.lru_cache(maxsize=None)
def _absolute(relative: str) -> Path:
    """A relative cache path made absolute once per process, against the working directory of its first use.

    The build worker runs in another directory, and a process that changes directory later must
    keep using the same cache.
    """
    return Path(os.path.abspath(relative))


def _as_root(text: str) -> Path:
    """A cache path from the environment, ``~`` expanded and made absolute."""
    path = os.path.expanduser(text)
    return Path(path) if os.path.isabs(path) else _absolute(path)


def cache_root() -> Path:
    """CHILDOPT_CACHE_DIR, else $XDG_CACHE_HOME/childopt, else ~/.cache/childopt, always absolute."""
    env = os.environ.get("CHILDOPT_CACHE_DIR", "").strip()
    if env:
        return _as_root(env)
    xdg = os.environ.get("XDG_CACHE_HOME", "").strip() or os.path.join(os.path.expanduser("~"), ".cache")
    return _as_root(xdg) / "childopt"


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


def writable_root(unusable: Unreadable | None = None) -> Path:
    """The cache root, or the per-user fallback with a warning; ExtensionUnavailable if neither can be written.

    ``unusable``: a build in the cache root this user cannot read, which blocks publishing there.
    """
    root = cache_root()
    first = PermissionError(errno.EACCES, f"{unusable.why}, so it cannot be published there") if unusable else None
    if first is None:
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


def root_problem(root: Path) -> str | None:
    """Why builds cannot be written under ``root``, found without creating anything; None if they can."""
    existing = root
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return f"{existing} is not a directory"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{existing} is not writable"
    return None


def planned_root() -> tuple[Path | None, str | None]:
    """(where a build would go, why that is not the cache root), as writable_root decides, without creating it."""
    root = cache_root()
    problem = root_problem(root)
    if problem is None:
        return root, None
    fallback = fallback_root()
    usable = fallback != root and root_problem(fallback) is None and (not fallback.exists() or _safe_fallback(fallback))
    return (fallback if usable else None), problem


def file_sha256(path: Path, sync: bool = False) -> str:
    """The sha256 of the file at ``path``; ``sync`` first flushes it to disk (a build about to be published)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        if sync:
            os.fsync(f.fileno())
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_manifest(directory: Path) -> dict | None:
    """The manifest of ``directory`` if it is a readable JSON object, else None; nothing is verified."""
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) else None


def inode_of(path: Path) -> int | None:
    """The inode of ``path``, None if it is gone: what set_aside checks to move only the directory it was given."""
    try:
        return path.stat().st_ino
    except OSError:
        return None


def verify_build(directory: Path) -> dict:
    """The manifest of the published build in ``directory``, once its library matches the recorded size and
    sha256; raises Untrusted with the reason otherwise (a corrupt manifest, a missing, truncated or
    overwritten library, or a manifest from before checksums were recorded).  Unreadable (never set aside)
    when this user may not read it: that is another user's build, not damage."""
    inode = inode_of(directory)
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
    except FileNotFoundError:
        raise Untrusted(directory, f"it has no {MANIFEST}", inode) from None
    except PermissionError as exc:
        raise Unreadable(directory, f"this user may not read its {MANIFEST} ({exc.strerror})", inode) from None
    except (OSError, ValueError) as exc:
        raise Untrusted(directory, f"its {MANIFEST} is unreadable or corrupt ({exc})", inode) from None
    if not isinstance(manifest, dict):
        raise Untrusted(directory, f"its {MANIFEST} is not a JSON object", inode)
    library, expected, size = manifest.get("library"), manifest.get("sha256"), manifest.get("size")
    if not isinstance(library, str) or not library or Path(library).name != library:
        raise Untrusted(directory, f"its {MANIFEST} names no library file in it (library={library!r})", inode)
    if not isinstance(expected, str) or not isinstance(size, int):
        raise Untrusted(directory, f"its {MANIFEST} records no size and sha256 of {library} (an older childopt "
                                   "published it, or it was altered)", inode)
    try:
        actual_size = (directory / library).stat().st_size
        if actual_size != size:
            raise Untrusted(directory, f"{library} is {actual_size} bytes, its manifest records {size}", inode)
        if file_sha256(directory / library) != expected:
            raise Untrusted(directory, f"{library} does not match the sha256 its manifest records", inode)
    except PermissionError as exc:
        raise Unreadable(directory, f"this user may not read {library} ({exc.strerror})", inode) from None
    except OSError as exc:
        raise Untrusted(directory, f"{library} cannot be read ({exc.strerror or exc})", inode) from None
    return manifest


def number_field(value) -> float:
    """A manifest's number field, 0 when it holds anything else (a manifest is read, never trusted, for its types)."""
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else 0.0


def recorded_archs(manifest: dict) -> list[str]:
    """The arch list a manifest records; [] when it is missing or not a list of names."""
    inputs = manifest.get("inputs")
    archs = inputs.get("archs") if isinstance(inputs, dict) else None
    return archs if isinstance(archs, list) and all(isinstance(a, str) for a in archs) else []


def _covers(archs: list[str], gpus: list) -> bool:
    """Whether ``archs`` cover every GPU; False for an arch name arch_covers cannot read."""
    try:
        return all(cfg.arch_covers(archs, tuple(cap))[0] for cap in gpus)
    except (ValueError, IndexError, TypeError):
        return False


def published_dirs(root: Path) -> list[Path]:
    try:
        return sorted(p for p in root.glob(f"{cfg.NAME}-*") if p.is_dir())
    except OSError:
        return []


def lookup(spec: BuildSpec, roots: list[Path] | None = None,
           newer_than: float | None = None) -> tuple[Path | None, list[Untrusted]]:
    """(the published build of ``spec`` this process may load, or None; the candidates it must not load).

    Candidates are the directory named for the key in each root, then (CUDA) the builds of the
    same base key whose archs cover every visible GPU; each is verified before it is trusted, and
    one under the key's name that holds another key is not trusted either (it would block the
    publish of a build).  ``newer_than`` (CHILDOPT_FORCE_REBUILD) skips builds published before it.
    """
    roots = roots if roots is not None else search_roots()
    untrusted: list[Untrusted] = []

    def trusted(directory: Path) -> dict | None:
        try:
            manifest = verify_build(directory)
        except Untrusted as exc:
            untrusted.append(exc)
            return None
        if newer_than is not None and number_field(manifest.get("published_at")) < newer_than:
            return None
        return manifest

    for root in roots:
        directory = root / spec.dirname
        if not directory.is_dir():
            if os.path.lexists(directory):  # a file there would make every build fail at its publish
                untrusted.append(Untrusted(directory, "it is not a directory", inode_of(directory)))
            continue
        manifest = trusted(directory)
        if manifest is not None and manifest.get("key") == spec.key:
            return directory, untrusted
        if manifest is not None:
            untrusted.append(Untrusted(directory, f"its manifest is for key {manifest.get('key')!r}, not {spec.key}",
                                       inode_of(directory)))
    if spec.with_cuda and spec.gpus:
        for root in roots:
            for directory in published_dirs(root):
                manifest = read_manifest(directory)
                if directory.name == spec.dirname or not manifest or manifest.get("base_key") != spec.base_key:
                    continue
                if _covers(recorded_archs(manifest), spec.gpus) and trusted(directory):
                    return directory, untrusted
    return None, untrusted


def find_published(spec: BuildSpec, roots: list[Path] | None = None, newer_than: float | None = None) -> Path | None:
    """The published build of ``spec`` that may be loaded here (see lookup), or None."""
    return lookup(spec, roots, newer_than)[0]


def _rename_beside(directory: Path, name: str) -> Path | None:
    """Rename ``directory`` to ``name`` in the same folder (atomic: no reader sees it half gone);
    the new path, or None if it was already gone.  OSError if it cannot be renamed."""
    target = directory.parent / name
    try:
        os.rename(directory, target)
    except FileNotFoundError:
        return None
    return target


def set_aside(bad: Untrusted) -> Path | None:
    """Rename the untrusted build ``bad`` to ``.bad-<name>-<host>-<pid>-<random>`` so no process loads it again,
    recording why inside it; the new path, or None when its name no longer holds the directory judged
    (another process set it aside, or published a good build since).  OSError if it cannot be renamed."""
    directory = Path(bad.directory)
    if isinstance(bad, Unreadable) or bad.inode is None or inode_of(directory) != bad.inode:
        return None
    target = _rename_beside(directory, f"{SET_ASIDE}{directory.name}-{hostname()}-{os.getpid()}-{os.urandom(4).hex()}")
    if target is None:
        return None
    record = {"why": bad.why, "set_aside_at": time.time(), "host": hostname(), "pid": os.getpid()}
    try:
        (target / SET_ASIDE_RECORD).write_text(json.dumps(record))
    except OSError:
        pass  # the name alone keeps it from being loaded
    return target


def set_aside_and_report(bad: Untrusted, then: str) -> bool:
    """Set ``bad`` aside and say so once per process (``then``: what happens next); False if it is still there.
    A build this user may not read is left for its owner, with a warning."""
    if isinstance(bad, Unreadable):
        warn_once(("unreadable", str(bad.directory)),
                  f"childopt: not loading {bad.directory}: {bad.why}; it is left in place (another user's build?); "
                  f"using this user's own build in {fallback_root()} ({then})")
        return False
    try:
        target = set_aside(bad)
    except OSError as exc:
        warn_once(("untrusted", str(bad.directory)),
                  f"childopt: not loading {bad.directory}: {bad.why}; it could not be set aside "
                  f"({exc.strerror or exc}), remove it (python -m childopt clean); {then}")
        return False
    if target is not None:
        warn_once(("untrusted", str(bad.directory)),
                  f"childopt: not loading {bad.directory}: {bad.why}; set aside as {target.name}; {then}")
    return True


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
# A leftover or a set-aside entry: .old- or .bad- (then any more of .old-, .bad-, rm- as asides nest)
# before a build's own name or a private directory's.  Only these are childopt's: the cache folder
# may be one the user shares (CHILDOPT_CACHE_DIR=/tmp), where a ".old-photos" is not a leftover.
_ASIDE = re.compile(rf"^\.(?:old-|bad-)(?:old-|bad-|rm-)*(?:tmp-[0-9a-f]{{16}}-|{re.escape(cfg.NAME)}-)")


def _childopt_made(name: str) -> bool:
    """Whether an entry of the cache folder has a name childopt gives its private, leftover or set-aside entries."""
    return bool(_TMP.match(name) or _ASIDE.match(name))


def _set_aside_why(path: Path) -> str:
    """Why the set-aside build ``path`` was set aside, from the record written into it."""
    try:
        why = json.loads((path / SET_ASIDE_RECORD).read_text()).get("why")
    except (OSError, ValueError, AttributeError):
        why = None
    return f"set aside, never loaded: {why or 'untrusted'}"


def tmp_dirs(root: Path, stale_after: float | None = None) -> list[dict]:
    """Private build directories (.tmp-*), leftovers (.old-*) and set-aside builds (.bad-*), with whether
    they are stale.  A private directory of another host is stale after ``stale_after`` seconds
    without change (default CHILDOPT_LOCK_TIMEOUT)."""
    out = []
    try:
        entries = sorted(p for p in root.iterdir() if _childopt_made(p.name)
                         and (p.is_dir() or p.name.startswith(SET_ASIDE)))  # a file can be set aside too
    except OSError:
        return out
    timeout = lock_timeout() if stale_after is None else stale_after
    for path in entries:
        age = age_of(path)
        m = _TMP.match(path.name)
        if path.name.startswith(SET_ASIDE):
            out.append({"path": path, "age": age, "stale": True, "why": _set_aside_why(path)})
        elif path.name.startswith(LEFTOVER):
            out.append({"path": path, "age": age, "stale": True, "why": "set aside by a forced rebuild or a clean"})
        elif m and m.group(2) == hostname():
            pid = int(m.group(3))
            alive = pid_alive(pid) and pid != os.getpid()
            out.append({"path": path, "age": age, "stale": not alive,
                        "why": f"builder pid {pid} is {'running' if alive else 'gone'}"})
        else:
            out.append({"path": path, "age": age, "stale": age > timeout,
                        "why": f"builder on another host, last change {human_age(age)} ago"})
    return out


def published_builds(root: Path) -> list[tuple[Path, dict | None, Untrusted | None]]:
    """(directory, manifest or None, why it is not trusted (Untrusted or Unreadable) or None) of every published
    build in ``root``."""
    out = []
    for directory in published_dirs(root):
        try:
            out.append((directory, verify_build(directory), None))
        except Untrusted as exc:
            out.append((directory, read_manifest(directory), exc))
    return out


def cleanable(all_builds: bool = False) -> list[tuple[Path, str]]:
    """What clean removes, and why: stale private directories, leftovers, set-aside and untrusted builds,
    failed-build logs, and published builds this process would not use (all of them with ``all_builds``)."""
    found = []
    current = None
    if not all_builds:
        try:
            current = find_published(build_spec())
        except ExtensionUnavailable as exc:
            raise ExtensionUnavailable(f"cannot tell which build is current ({exc}); use --all to remove every "
                                       "build") from exc
    for root in search_roots():
        found += [(entry["path"], f"stale build directory ({entry['why']})") for entry in tmp_dirs(root)
                  if entry["stale"]]
        for directory, _, untrusted in published_builds(root):
            if isinstance(untrusted, Unreadable):
                continue  # another user's build: theirs to clean
            if untrusted is not None:
                found.append((directory, f"untrusted published build: {untrusted.why}"))
            elif current is None or directory != current:
                found.append((directory, "published build" + (" (current)" if all_builds else " not used here")))
        logs = root / "logs"
        try:  # a link named logs leads out of the cache: what it points at is not childopt's to remove
            if not logs.is_symlink():
                found += [(p, "failed-build log") for p in sorted(logs.glob("failed-*.log")) if not p.is_symlink()]
        except OSError:
            pass
    return found


def remove(path: Path) -> str | None:
    """Remove a file or directory of the cache; None once it is gone, else why it is not.

    A directory is first renamed aside (``.old-rm-*``), so no reader ever sees half of it under
    its name; one that cannot be renamed is left whole.
    """
    if not path.is_dir() or path.is_symlink():
        try:
            path.unlink()
        except FileNotFoundError:
            return None
        except OSError as exc:
            return exc.strerror or str(exc)
        return None
    try:
        doomed = _rename_beside(path, f"{LEFTOVER}rm-{path.name.lstrip('.')}-{os.getpid()}")
    except OSError as exc:
        return f"cannot move it aside to remove it: {exc.strerror or exc}"
    if doomed is None:
        return None
    shutil.rmtree(doomed, ignore_errors=True)
    return f"moved to {doomed}, but it could not be removed entirely" if doomed.exists() else None


def clean(all_builds: bool = False,
          dry_run: bool = False) -> tuple[list[tuple[Path, str]], list[tuple[Path, str, str]]]:
    """Remove what ``cleanable`` finds (nothing with ``dry_run``); returns (removed or, with ``dry_run``, what
    would be: [(path, why)], failed: [(path, why, error)]).  Lock files stay: they are never deleted."""
    found = cleanable(all_builds)
    if dry_run:
        return found, []
    removed, failed = [], []
    for path, why in found:
        error = remove(path)
        if error is None:
            removed.append((path, why))
        else:
            failed.append((path, why, error))
    return removed, failed
