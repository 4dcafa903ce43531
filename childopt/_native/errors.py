"""How the loader of childopt._C reports trouble: the exceptions callers catch, and warnings said once.

Every part of the loader raises ExtensionUnavailable with the reason (NeedsBuild when only a build
is missing and building was not allowed, Untrusted for a published build that must not be
loaded, Unreadable for one this user may not read, Retry for a race worth retrying), so callers
such as the native backend can fall back and say why; a warning about the same thing (a fallback
cache root, an ignored arch list, a prebuilt module that does not fit) is logged once per process,
however often it is hit.
"""
from __future__ import annotations

import logging

log = logging.getLogger("childopt")


class ExtensionUnavailable(RuntimeError):
    """childopt._C cannot be loaded here; the message says why (and where the build log is)."""


class NeedsBuild(ExtensionUnavailable):
    """childopt._C is not built for this torch and toolchain yet, and building was not allowed."""


class Untrusted(ExtensionUnavailable):
    """A directory under a published build's name that must never be loaded, and why.

    ``inode`` is the directory's inode when the verdict was made: it is set aside only if the
    name still holds that directory, never a good build another process published since.
    """

    def __init__(self, directory, why: str, inode: int | None):
        super().__init__(f"{directory}: {why}")
        self.directory, self.why, self.inode = directory, why, inode


class Unreadable(Untrusted):
    """A published build this user may not read (another user's, published with a strict umask).

    Not damage: it is never set aside (that would take a good build from its owner); this
    process uses or builds its own copy in the per-user fallback root instead.
    """


class Retry(ExtensionUnavailable):
    """A race with another process (a build removed while it was being loaded): trying again may work, so the
    loader does not remember it for the process."""


_warned: set = set()


def warn_once(key, message: str) -> None:
    """Log ``message`` as a warning the first time ``key`` is seen in this process."""
    if key not in _warned:
        _warned.add(key)
        log.warning(message)
