"""The build lock of childopt._C, and the stale lock files of torch's own JIT extension cache.

A build holds ``fcntl.flock`` on ``<root>/locks/childopt_C-<key16>.lock`` (a file never deleted),
so concurrent cold loaders compile once; a waiter gives up after CHILDOPT_LOCK_TIMEOUT and builds
privately, since correctness never depends on the lock (the publish is an atomic rename).  torch's
cpp_extension cache locks with O_EXCL marker files instead, which a killed builder leaves behind
for ever: python -m childopt doctor finds them (and --fix removes them).
"""
from __future__ import annotations

import errno
import json
import logging
import os
import sys
import time
from pathlib import Path

from childopt._native.cache import age_of, human_age
from childopt._native.env import hostname, pid_alive
from childopt._native.spec import BuildSpec

try:
    import fcntl
except ImportError:  # not POSIX: builds run without the lock (the atomic publish keeps them correct)
    fcntl = None

log = logging.getLogger("childopt")

PROGRESS_EVERY = 15.0
# A lock file of torch's own JIT cache that no process has open and is this old is stale.
TORCH_LOCK_STALE_AGE = 600.0


def _since(started) -> str:
    """When the holder took the lock, from its ``started`` field; "" for anything but a plausible time stamp."""
    if not isinstance(started, (int, float)) or isinstance(started, bool) or not 0 < started <= time.time() + 86400:
        return ""
    return f", since {time.strftime('%H:%M:%S', time.localtime(started))} ({time.time() - started:.0f} s ago)"


def _holder_text(path: Path) -> str:
    """Who holds a build lock, from what the holder wrote into it.

    The file is anyone's to write (another childopt version, a user, a crash mid-write), so its
    content is only shown, never trusted: anything but a JSON object makes the holder unknown.
    """
    try:
        info = json.loads(path.read_text(errors="replace") or "{}")
    except (OSError, ValueError, RecursionError):
        info = {}
    if not isinstance(info, dict) or info.get("pid") is None and info.get("host") is None:
        return "holder unknown"
    pid = info.get("pid")
    alive = ""
    if info.get("host") == hostname() and isinstance(pid, int) and not isinstance(pid, bool) and 0 < pid \
            and not pid_alive(pid):
        alive = ", that process is gone (a child it forked still holds the lock)"
    return (f"pid {str(pid)[:20]} on {str(info.get('host'))[:100]}{_since(info.get('started'))}, "
            f"command {str(info.get('command', '?'))[:300]!r}{alive}")


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
        try:
            return self._wait()
        except BaseException:  # an interrupt while waiting: nothing is held, so __exit__ will not run
            self._close()
            raise

    def _wait(self) -> bool:
        """Poll for the lock until it is ours (True) or the timeout passes (False)."""
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
        try:
            write_holder(self.fd)
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


def write_holder(fd: int) -> None:
    """Record who holds the lock open on ``fd`` (host, pid, start time, command), as
    :func:`lock_state` reads it; raises OSError where it cannot be written."""
    info = {"host": hostname(), "pid": os.getpid(), "started": time.time(),
            "command": " ".join(getattr(sys, "orig_argv", sys.argv))[:300]}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(info).encode(), 0)


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


def build_locks(root: Path) -> list[dict]:
    """The lock files under <root>/locks and who holds each now."""
    try:
        files = sorted((root / "locks").glob("*.lock"))
    except OSError:
        files = []
    return [{"path": p, "holder": lock_state(p), "age": age_of(p)} for p in files]


def _open_by(paths: list[Path]) -> tuple[dict, list[int] | None]:
    """Which processes have each of ``paths`` open (via /proc/*/fd), and the user ids of the processes whose
    descriptors could not be read (None without /proc)."""
    wanted = {os.path.realpath(p): str(p) for p in paths}
    found: dict = {str(p): [] for p in paths}
    unreadable: list[int] = []
    proc = Path("/proc")
    if not proc.is_dir():
        return found, None
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fds = list((entry / "fd").iterdir())
        except (PermissionError, FileNotFoundError, ProcessLookupError):
            try:
                unreadable.append(entry.stat().st_uid)
            except OSError:
                pass  # it exited meanwhile
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
    directory cannot be seen in /proc).  FileBaton's holder is the process that created the
    file, so it runs as the file's owner: when a process of that user could not be inspected
    (another user's lock, without the privilege to read its descriptors) nobody can tell, and
    the lock is kept.  Such a lock makes every later torch JIT load of that
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
        age = age_of(path)
        pids = users[str(path)]
        try:
            hidden = sum(owner == path.stat().st_uid for owner in unreadable or [])
        except OSError:
            hidden = 0
        stale = not pids and unreadable is not None and not hidden and age >= TORCH_LOCK_STALE_AGE
        if pids:
            why = f"open by pid {', '.join(map(str, pids))}: a build is running"
        elif unreadable is None:
            why = "no /proc to check"
        elif hidden:
            why = (f"{hidden} process(es) of its owner could not be inspected and one may have it open: state "
                   "unknown, kept")
        elif age < TORCH_LOCK_STALE_AGE:
            why = f"no process has it open, but it is only {human_age(age)} old"
        else:
            why = "no process has it open: its builder is gone"
        out.append({"path": path, "age": age, "stale": stale, "why": why, "pids": pids})
    return out
