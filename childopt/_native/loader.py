"""Loading childopt._C once per process: a prebuilt module whose record fits, else a published JIT build, else a build.

The outcome, module or error, is kept for the process (``TORCH_LIBRARY(childopt)`` registers once
per process).  A published build is imported only after its library matches the checksum in
its manifest; one that does not, or whose manifest is corrupt, or that fails to load, is set
aside (childopt._native.cache.set_aside), reported once, and built again when building is
allowed (``backend="auto"`` then takes another backend): a damaged library is never mapped into
the process.  ``status`` says what a load would do without doing it; ``check_installed_build``
is the guard ``import childopt`` runs on an installed prebuilt module (no load, no GPU query).
"""
from __future__ import annotations

import importlib.util
import json
import logging
import os
import sys
import threading
from pathlib import Path

from childopt._native import config as cfg
from childopt._native.build import build
from childopt._native.cache import inode_of, lookup, planned_root, set_aside_and_report, verify_build
from childopt._native.env import PROCESS_START, force_rebuild
from childopt._native.elf import elf_problem
from childopt._native.errors import ExtensionUnavailable, NeedsBuild, Retry, Unreadable, Untrusted, warn_once
from childopt._native.spec import PACKAGE_DIR, build_spec, csrc_dir, runtime

log = logging.getLogger("childopt")

# Where a prebuilt childopt._C and its _build_info.json live (tests point this elsewhere).
PREBUILT_DIR = PACKAGE_DIR


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
    warn_once(("prebuilt",), message)
    return message


_lock = threading.RLock()
_state: dict = {"module": None, "how": "", "error": None}


def _after_fork_in_child() -> None:
    """A new lock in a forked child: the parent's may be held by a thread (building) that the child does not have.

    The state needs no reset: it is only ever written whole, under the lock, by a load that
    finished; the child loads (or waits on the build lock file) for itself.
    """
    global _lock
    _lock = threading.RLock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _import(library: Path, name: str):
    """Import the extension module at ``library``; the op schemas it implements are defined first."""
    from childopt.backends import contract  # noqa: F401  (childopt._C registers implementations only)

    problem = elf_problem(library)  # before dlopen: mapping a truncated library is a SIGBUS, not an error
    if problem is not None:
        raise ExtensionUnavailable(f"{library} is not loaded: {problem}")
    spec = importlib.util.spec_from_file_location(name, library)
    if spec is None or spec.loader is None:
        raise ExtensionUnavailable(f"cannot import {library}")
    try:
        module = importlib.util.module_from_spec(spec)  # dlopen happens here, for an extension module
        spec.loader.exec_module(module)
    except (ImportError, OSError) as exc:
        raise ExtensionUnavailable(f"{library} does not load: {exc}") from exc
    sys.modules.setdefault(name, module)
    return module


def _import_published(directory: Path):
    """Import the published build in ``directory`` after verifying it; Untrusted if it fails the check or
    does not load (Retry if it was removed meanwhile)."""
    try:
        manifest = verify_build(directory)
    except Untrusted:
        if not directory.exists():
            raise Retry(f"{directory} was removed while loading it; try again") from None
        raise
    inode = inode_of(directory)
    if inode is None:
        raise Retry(f"{directory} was removed while loading it; try again")
    try:
        return _import(directory / manifest["library"], str(manifest.get("module")))
    except ExtensionUnavailable as exc:
        raise Untrusted(directory, f"it does not load: {exc}", inode) from exc


def _then(allow_build: bool) -> str:
    """What happens after an untrusted build is set aside, in the words of its one warning."""
    if allow_build:
        return "building it again"
    return "backend='auto' uses another backend until backend='native' or python -m childopt build builds it again"


def _load_published(spec, newer_than: float | None, allow_build: bool):
    """(module, how) from a trusted published build of ``spec``, or (None, what was set aside)."""
    found, untrusted = lookup(spec, newer_than=newer_than)
    for bad in untrusted:
        set_aside_and_report(bad, _then(allow_build))
    notes = [f"{bad.directory} is untrusted ({bad.why})" for bad in untrusted]
    if found is not None:
        try:
            return _import_published(found), f"JIT build {found}"
        except Untrusted as bad:
            set_aside_and_report(bad, _then(allow_build))
            notes.append(f"{bad.directory} is untrusted ({bad.why})")
    return None, "; ".join(notes)


def _find_or_build(allow_build: bool):
    force = force_rebuild()
    csrc = csrc_dir()
    rt = runtime(csrc)
    if force:
        warn_once(("force",), "childopt: CHILDOPT_FORCE_REBUILD is set: ignoring the prebuilt childopt._C and "
                              "builds published before this process started")
    else:
        library, why = check_prebuilt(rt)
        if library is not None:
            try:
                name = str(prebuilt_record().get("module") or cfg.PREBUILT_MODULE)
                return _import(library, name), why
            except ExtensionUnavailable as exc:
                warn_once(("prebuilt",), f"childopt: the prebuilt childopt._C does not load ({exc}); "
                                         "using a JIT build instead")
        elif prebuilt_record() is not None:
            warn_once(("prebuilt",), f"childopt: {why}; {PREBUILT_FALLBACK}")
    spec = build_spec(rt=rt)
    module, how = _load_published(spec, PROCESS_START if force else None, allow_build)
    if module is not None:
        return module, how
    if not allow_build:
        raise NeedsBuild(f"not built yet for this torch and toolchain ({spec.describe()})" + (f"; {how}" if how else "")
                         + "; backend='native' builds it, or run python -m childopt build")
    directory, how = build(spec, force=force)
    try:
        return _import_published(directory), f"JIT {how}"
    except Untrusted as bad:
        set_aside_and_report(bad, "not building it again in this process")
        raise ExtensionUnavailable(f"the new build of childopt._C {bad}") from bad


def _load(allow_build: bool):
    with _lock:
        if _state["module"] is not None:
            return _state["module"], _state["how"]
        if _state["error"] is not None:
            raise _state["error"]
        try:
            module, how = _find_or_build(allow_build)
        except (NeedsBuild, Retry):  # not remembered: a build, or the next try, may succeed
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
        if not force_rebuild():
            library, why = check_prebuilt(rt)
            if library is not None:
                return "prebuilt", f"{library} ({why})"
            notes = f"; {why}" if prebuilt_record() is not None else ""
        else:
            notes = "; CHILDOPT_FORCE_REBUILD is set"
        spec = build_spec(rt=rt)
        found, untrusted = lookup(spec, newer_than=PROCESS_START if force_rebuild() else None)
        if found is not None:
            return "cached", f"{found} ({spec.describe()}){notes}"
        for bad in untrusted:
            notes += f"; {bad.directory} is " + (f"unreadable here ({bad.why})" if isinstance(bad, Unreadable)
                                                 else f"untrusted ({bad.why}): the next load sets it aside")
        if cfg.tool_version(cfg.cxx_compiler()) is None:
            return "unavailable", f"not built, and no C++ compiler ({cfg.cxx_compiler()}) to build it{notes}"
        root, _ = planned_root()
        if root is None:
            return "unavailable", f"not built, and no writable cache to build it in{notes}"
        return "needs a build", (f"{spec.describe()}, key {spec.key16}: backend='native' or python -m childopt "
                                 f"build compiles it into {root}{notes}")
    except ExtensionUnavailable as exc:
        return "unavailable", str(exc)
