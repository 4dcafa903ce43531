"""Loading childopt._C once per process: a prebuilt module whose record fits, else a published JIT build, else a build.

The outcome, module or error, is kept for the process (``TORCH_LIBRARY(childopt)`` registers once
per process).  ``status`` says what a load would do without doing it; ``check_installed_build`` is
the guard ``import childopt`` runs on an installed prebuilt module (no load, no GPU query).
"""
from __future__ import annotations

import importlib.util
import json
import logging
import sys
import threading
from pathlib import Path

from childopt._native import config as cfg
from childopt._native.build import build
from childopt._native.cache import cache_root, find_published, read_manifest
from childopt._native.env import PROCESS_START, force_rebuild
from childopt._native.errors import ExtensionUnavailable, NeedsBuild, warn_once
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


def _import(library: Path, name: str):
    """Import the extension module at ``library``; the op schemas it implements are defined first."""
    from childopt.backends import contract  # noqa: F401  (childopt._C registers implementations only)

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
    found = find_published(spec, newer_than=PROCESS_START if force else None)
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
        if not force_rebuild():
            library, why = check_prebuilt(rt)
            if library is not None:
                return "prebuilt", f"{library} ({why})"
            prebuilt_note = f"; {why}" if prebuilt_record() is not None else ""
        else:
            prebuilt_note = "; CHILDOPT_FORCE_REBUILD is set"
        spec = build_spec(rt=rt)
        found = find_published(spec, newer_than=PROCESS_START if force_rebuild() else None)
        if found is not None:
            return "cached", f"{found} ({spec.describe()}){prebuilt_note}"
        if cfg.tool_version(cfg.cxx_compiler()) is None:
            return "unavailable", f"not built, and no C++ compiler ({cfg.cxx_compiler()}) to build it{prebuilt_note}"
        return "needs a build", (f"{spec.describe()}, key {spec.key16}: backend='native' or python -m childopt "
                                 f"build compiles it into {cache_root()}{prebuilt_note}")
    except ExtensionUnavailable as exc:
        return "unavailable", str(exc)
