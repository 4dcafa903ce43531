"""Which files a selftest run writes into ``--out``, and which an earlier run provably wrote there.

Every ``selftest.json`` (the "unfinished" note too) lists its run's files under ``outputs``. A new
run removes only the files that an earlier ``selftest.json`` lists, and only when that file reads
as a selftest report (its ``command``). It follows no symbolic link. It refuses, before writing
anything, an --out that holds something at a name it would write: a file that no earlier run
listed, a folder or a link. The user named that folder for the outputs, so they expect them
there. Writing over a file the selftest cannot prove it wrote would lose data, and putting the
outputs somewhere else would hide them.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

from childopt.selftest import sanitizer

MARKER = "python -m childopt selftest"  # how the ``command`` of every selftest.json starts
REPORT, MARKDOWN = "selftest.json", "selftest.md"
# Without a GPU, only the environment and lane steps write; the others skip before writing.
CPU_FILES = ("environment.log", "lane.log", "lane.xml")
GPU_FILES = ("build.log", "cuda-tests.log", "cuda-tests.xml", "graph-capture.log", "memcheck.log", "racecheck.log",
             "benchmark.log", "bench.json", "bench.md")


def planned(gpu: bool) -> list:
    """The files a run may write, relative to the output folder: the reports first."""
    names = [REPORT, MARKDOWN, *CPU_FILES]
    if gpu:
        names += [*GPU_FILES, *sanitizer.log_names("memcheck"), *sanitizer.log_names("racecheck")]
    return names


def vouched(out: Path) -> list:
    """The files that the earlier ``selftest.json`` in ``out`` lists, restricted to names a run can
    write; [] if that file is missing, is a link, or is not a selftest report. A report without the
    list (older versions) vouches only for the two reports."""
    path = out / REPORT
    if path.is_symlink() or not path.is_file():
        return []
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError):  # unreadable, not JSON, nested past the parser's depth
        return []
    command = data.get("command") if isinstance(data, dict) else None
    if not isinstance(command, str) or not (command == MARKER or command.startswith(MARKER + " ")):
        return []
    listed = data.get("outputs", [REPORT, MARKDOWN])
    known = set(planned(gpu=True))
    names = [name for name in listed if isinstance(name, str) and name in known] if isinstance(listed, list) else []
    return list(dict.fromkeys([REPORT, *names]))


def conflict(out: Path, names: list, earlier: list) -> Optional[str]:
    """Why the run cannot write ``names`` into ``out`` (it would write over something that
    ``earlier`` does not list, or through a link), or None."""
    for name in names:
        path = out / name
        folder = out
        for part in Path(name).parts[:-1]:
            folder = folder / part
            if folder.is_symlink():
                return f"{str(folder)!r} is a symbolic link; the selftest writes logs into a folder of that name " \
                       "and follows no links"
            if folder.exists() and not folder.is_dir():
                return f"{str(folder)!r} is not a folder; the selftest writes logs into a folder of that name"
        if path.is_symlink():
            return f"{str(path)!r} is a symbolic link (to {os.readlink(path)!r}); the selftest writes its own " \
                   "file there and follows no links"
        if path.is_dir():
            return f"{str(path)!r} is a folder; the selftest writes a file of that name"
        if path.exists() and not path.is_file():
            return f"{str(path)!r} is not a regular file; the selftest writes a file of that name"
        if path.exists() and name not in earlier:
            why = (f"the {REPORT} there does not list it (an older childopt's report lists no files)"
                   if REPORT in earlier else f"no earlier selftest run wrote it (no {REPORT} there lists it)")
            return f"{str(path)!r} exists and {why}; the selftest would write over it"
    return None


def _inside(out: Path, name: str) -> Optional[Path]:
    """``out / name`` when every folder on the way is a real folder (no link), else None."""
    folder = out
    for part in Path(name).parts[:-1]:
        folder = folder / part
        if folder.is_symlink() or not folder.is_dir():
            return None
    return out / name


def present(out: Path, names: list) -> list:
    """The ``names`` that are regular files in ``out`` (reached through no link)."""
    return [name for name in names if (path := _inside(out, name)) is not None and not path.is_symlink()
            and path.is_file()]


def remove(out: Path, names: list) -> None:
    """Remove the regular files ``names`` in ``out``; a link, a folder or a name reached through a link stays."""
    for name in present(out, names):
        (out / name).unlink(missing_ok=True)
