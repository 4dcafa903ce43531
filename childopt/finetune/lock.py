"""One ``python -m childopt finetune`` command per ``--output`` folder at a time.

Two commands of different settings on one folder would overwrite each other's run JSONs and
summaries, so a command holds ``fcntl.flock`` on ``<output>/.finetune.lock`` (a file never deleted)
from its checks of the folder to its summary.  A second command fails at once, naming the folder and
the pid and host written into the lock file, instead of waiting.  The kernel drops a flock when its
holder dies, so a lock file left by a killed command never blocks the next one.

Written beside childopt._native.lock rather than with its BuildLock: that lock waits and, when it
gives up or the file system has no flock, lets the caller build anyway (correctness there never
depends on it) under build-worded warnings, and its result does not tell a busy lock from a missing
flock.  This one refuses at once when busy.  It records and names its holder with that module's
:func:`~childopt._native.lock.write_holder` and :func:`~childopt._native.lock.lock_state`, so both
locks read alike.
"""
from __future__ import annotations

import errno
import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from childopt._native.lock import lock_state, write_holder

try:
    import fcntl
except ImportError:  # not POSIX: commands run without the lock (warned)
    fcntl = None

LOCK_NAME = ".finetune.lock"
_BUSY = (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES)


class OutputBusy(RuntimeError):
    """Another finetune command holds the ``--output`` folder."""


@contextmanager
def hold_output(folder: str, *, create: bool) -> Iterator[None]:
    """Hold the lock of ``folder`` for the block; made first when ``create`` (else a missing folder,
    which the command only reads and refuses, is left missing and unlocked).

    Raises:
        OutputBusy: another process holds the folder (the message names it, its pid and host).
        ValueError: the lock file cannot be opened (a folder at its name, no permission).
    """
    folder = Path(folder)
    if fcntl is None or not (create or folder.is_dir()):
        if fcntl is None:
            print(f"warning: no fcntl.flock on this platform; --output {folder} is not locked against another "
                  "finetune command", file=sys.stderr)
        yield
        return
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o666)
    except OSError as exc:  # a folder at its name, no permission: the command's error, not a traceback
        raise ValueError(f"--output {folder}: cannot open its lock file {path} ({exc.strerror or exc}); "
                         "remove what is at that name or pass another --output") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in _BUSY:
                holder = lock_state(path) or "holder unknown: it may have just finished"
                raise OutputBusy(f"--output {folder} is in use by another finetune command ({holder}); wait for it "
                                 "to finish or pass another --output") from None
            print(f"warning: the file system of {folder} has no flock ({exc}); --output is not locked against "
                  "another finetune command", file=sys.stderr)
        else:
            write_holder(fd)
        yield
    finally:
        os.close(fd)  # closing the only descriptor releases the flock

