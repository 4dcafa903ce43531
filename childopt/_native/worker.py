"""The build child process of childopt._C, and the killing of a build's whole process tree.

childopt._native.build starts a fresh interpreter that runs this file by path (``runpy.run_path``),
not as part of the package, so the child never imports childopt: only the standard library at
import, then torch.utils.cpp_extension to build.  A compiler or ninja that hangs or is OOM-killed
thus cannot take the training process with it, and the child, ninja and the compilers die with
the parent (a process group of their own, ``PR_SET_PDEATHSIG`` and a watchdog thread).
``kill_build_group`` serves both sides: the worker ends its group when the parent goes, the parent
ends it after a build, whatever happened to the worker.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path


def _proc_table() -> dict:
    """pid -> (parent pid, process group) of every process, from /proc."""
    table = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat", "rb") as f:
                    data = f.read()
                fields = data[data.rindex(b")") + 2:].split()
                table[int(entry)] = (int(fields[1]), int(fields[2]))
            except (OSError, ValueError, IndexError):
                pass
    return table


def kill_build_group(pgid: int, protect=()) -> None:
    """SIGKILL a build's process group and every process it started.

    ninja runs each compile job in a process group of its own, so killing the build's group
    alone would leave the compilers running: the group's members are stopped first (so ninja
    starts nothing new), then every descendant and its group is killed.  Groups in ``protect``
    (the caller's) are never signalled as a whole.
    """
    import signal

    protect = set(protect)
    me = os.getpid()
    if not os.path.isdir("/proc"):
        if pgid not in protect:
            try:
                os.killpg(pgid, signal.SIGKILL)
            except OSError:
                pass
        return
    found, table = set(), {}
    for _ in range(2):  # freeze, then look again for anything started in between
        table = _proc_table()
        children: dict = {}
        for pid, (ppid, _) in table.items():
            children.setdefault(ppid, []).append(pid)
        todo = [pid for pid, (_, group) in table.items() if group == pgid]
        while todo:
            pid = todo.pop()
            if pid not in found:
                found.add(pid)
                todo += children.get(pid, [])
        for pid in found - {me}:
            try:
                os.kill(pid, signal.SIGSTOP)
            except OSError:
                pass
    groups = {table[pid][1] for pid in found if pid in table} - protect - {pgid}
    for pid in found - {me}:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    for group in groups:
        try:
            os.killpg(group, signal.SIGKILL)
        except OSError:
            pass
    if pgid not in protect:
        try:
            os.killpg(pgid, signal.SIGKILL)  # last: it may include the caller (the build worker)
        except OSError:
            pass


def _die_with_parent(parent: int) -> None:
    """End this worker, ninja and the compilers as soon as the parent is gone (or sends SIGTERM)."""
    import signal
    import threading
    import time

    try:
        parent_group = os.getpgid(parent)
    except OSError:
        parent_group = None

    def end(*_):
        if os.getpgrp() == os.getpid():  # started with start_new_session: the group is ours alone
            kill_build_group(os.getpgrp(), protect={parent_group} - {None})
        os._exit(1)

    signal.signal(signal.SIGTERM, end)
    try:  # Linux: SIGTERM when the parent dies
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM), 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:
        end()

    def watch():
        while True:
            time.sleep(1.0)
            if os.getppid() != parent:
                end()

    threading.Thread(target=watch, daemon=True, name="childopt-parent-watch").start()


def worker_main(argv: list[str]) -> None:
    """The build child process (run by path, without importing childopt): argv = [job.json, parent pid].

    Builds with torch.utils.cpp_extension.load into the job's private directory and imports the
    result, so a module that does not load is never published.
    """
    import time

    job = json.loads(Path(argv[0]).read_text())
    _die_with_parent(int(argv[1]))
    print(f"childopt build worker pid {os.getpid()}: {job['module']} in {job['build_dir']}", flush=True)
    for var in ("MAX_JOBS", "TORCH_CUDA_ARCH_LIST", "CXX", "CUDA_HOME", "PATH"):
        print(f"  {var}={os.environ.get(var, '')}", flush=True)
    start = time.monotonic()
    from torch.utils import cpp_extension

    try:
        cpp_extension.load(
            name=job["module"], sources=job["sources"], extra_cflags=job["cflags"], extra_ldflags=job["ldflags"],
            extra_cuda_cflags=job["cuda_cflags"] or None, extra_include_paths=job["include_dirs"],
            build_directory=job["build_dir"], with_cuda=job["with_cuda"], verbose=True, is_python_module=True)
    except Exception as exc:  # the compiler's own output is above, in this log
        print(f"childopt build worker: FAILED: {type(exc).__name__}: {str(exc)[:2000]}", flush=True)
        sys.exit(1)
    print(f"childopt build worker: built and imported {job['module']} in {time.monotonic() - start:.1f} s", flush=True)
