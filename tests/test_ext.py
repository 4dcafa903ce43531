"""childopt._ext, the loader of childopt._C, with the real CPU sources under csrc/.

Each cold build of the CPU extension takes one to two minutes on two cores, so the tests share
two of them: ``built_cache`` (``python -m childopt build`` on a cold cache while this process
holds the build lock) and ``cold_start`` (a builder SIGKILLed mid-compile, then three
concurrent cold loaders).  The other tests load from those caches, use copies of the sources
that fail at once, or check the key and record logic in-process.  Everything that loads the
extension runs in a subprocess: ``TORCH_LIBRARY(childopt)`` registers once per process.
"""
from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import childopt
from childopt import _build_config as cfg
from childopt import _ext

REPO = Path(__file__).resolve().parents[1]
BUILD_LIMIT = 600  # seconds for a subprocess that may compile; a build takes 1-2 min here
LOAD_BODY = "m = e.load(); assert callable(torch.ops.childopt.adamw_step); print('LOADED', m.__file__, flush=True)"
LOAD = "import torch, childopt._ext as e; " + LOAD_BODY
# What a user does: the first native step loads (or builds) the extension.
STEP = ("import torch, childopt._ext as e; from childopt import MaskedAdamW; p = torch.nn.Parameter(torch.ones(8)); "
        "opt = MaskedAdamW([p], lr=0.1, backend='native'); p.grad = torch.ones(8); opt.step(); "
        "assert (p.detach() < 1).all(); print('LOADED', e.loaded()[0].__file__, flush=True)")
BUILDING = "building the native extension childopt._C"


def _env(cache: Path, **extra) -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("CHILDOPT_") and k not in ("TORCH_CUDA_ARCH_LIST", "MAX_JOBS")}
    env["CHILDOPT_CACHE_DIR"] = str(cache)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    env.update({k: str(v) for k, v in extra.items()})
    return env


def _run(args, env, timeout=BUILD_LIMIT, **kw):
    return subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, timeout=timeout, **kw)


def _python(code: str, env, timeout=BUILD_LIMIT):
    return _run(["-c", code], env, timeout=timeout)


def _loaded_path(out: str) -> str:
    found = re.findall(r"^LOADED (\S+)$", out, re.MULTILINE)
    assert len(found) == 1, out
    return found[0]


def _hold_lock(path: Path, command: str) -> int:
    """flock ``path`` from this process, writing holder info as the loader does."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    fcntl.flock(fd, fcntl.LOCK_EX)
    info = {"host": re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname()), "pid": os.getpid(),
            "started": time.time(), "command": command}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(info).encode(), 0)
    return fd


def _processes_in(directory: Path) -> list[int]:
    """Processes whose working directory is ``directory`` (ninja and the compilers run there)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.readlink(entry / "cwd") == str(directory):
                    pids.append(int(entry.name))
            except OSError:
                pass
    return pids


def _published(cache: Path) -> list[Path]:
    return sorted(p for p in cache.glob(f"{cfg.NAME}-*") if (p / _ext.MANIFEST).is_file())


@pytest.fixture(scope="session")
def built_cache(tmp_path_factory):
    """``python -m childopt build`` on a cold cache while this process holds the build lock.

    The cache is named as the per-user fallback (``<TMPDIR>/childopt-<uid>``), so that tests
    with ``TMPDIR=base`` find it as the fallback.  ``doctor`` runs once while the lock is held.
    """
    base = tmp_path_factory.mktemp("ext")
    cache = base / f"childopt-{os.getuid()}"
    env = _env(cache, CHILDOPT_LOCK_TIMEOUT=3)
    spec = _ext.build_spec()
    fd = _hold_lock(cache / "locks" / f"{spec.dirname}.lock", "pytest holding the build lock")
    try:
        start = time.monotonic()
        build = _run(["-m", "childopt", "build"], env, cwd=base)
        seconds = time.monotonic() - start
        doctor_held = _run(["-m", "childopt", "doctor"], env, timeout=120, cwd=base)
    finally:
        os.close(fd)
    assert build.returncode == 0, build.stdout + build.stderr
    return SimpleNamespace(base=base, cache=cache, spec=spec, build=build, seconds=seconds, doctor_held=doctor_held,
                           env=env)


def test_a_held_lock_times_out_then_the_build_is_private_and_published(built_cache):
    out = built_cache.build.stdout + built_cache.build.stderr
    # The progress line names the holder (this test process), then the timeout is loud.
    assert "waiting for another process to build childopt._C" in out
    assert f"pid {os.getpid()} on" in out and "pytest holding the build lock" in out
    assert "gave up waiting for the build lock" in out and "Building privately" in out
    assert BUILDING in out
    published = _published(built_cache.cache)
    assert [p.name for p in published] == [built_cache.spec.dirname]
    manifest = json.loads((published[0] / _ext.MANIFEST).read_text())
    assert manifest["key"] == built_cache.spec.key and manifest["lock"] == "not held"
    assert not list(built_cache.cache.glob(".tmp-*")), "the private build directory was renamed into place"
    assert not list(published[0].glob("*.o")), "objects are dropped from a published build"


def test_build_then_doctor_report_the_build_and_the_held_lock(built_cache):
    out = built_cache.build.stdout
    assert f"key {built_cache.spec.key16}" in out and "built in" in out and built_cache.spec.dirname in out
    held = built_cache.doctor_held
    assert held.returncode == 0, held.stdout + held.stderr
    assert f"childopt._C  cached: {built_cache.cache / built_cache.spec.dirname}" in held.stdout
    assert "1 held" in held.stdout and f"pid {os.getpid()} on" in held.stdout
    again = _run(["-m", "childopt", "doctor"], built_cache.env, timeout=120)
    assert again.returncode == 0, again.stdout + again.stderr
    for line in ("torch", "GPU", "nvcc", "C++ compiler", "ninja", "build", "cache root"):
        assert re.search(rf"^{re.escape(line)}\s", again.stdout, re.MULTILINE), (line, again.stdout)
    assert "0 held" in again.stdout
    assert f"{built_cache.spec.dirname}  CPU, torch {torch.__version__}" in again.stdout
    assert "<- used here" in again.stdout
    # A second build is a no-op.
    second = _run(["-m", "childopt", "build"], built_cache.env, timeout=120)
    assert second.returncode == 0 and "already built" in second.stdout, second.stdout + second.stderr


def test_a_published_build_loads_without_the_lock(built_cache, tmp_path):
    """The fast path takes no lock: a held lock costs nothing once the build is published."""
    spec = built_cache.spec
    fd = _hold_lock(built_cache.cache / "locks" / f"{spec.dirname}.lock", "pytest again")
    try:
        start = time.monotonic()
        result = _python(LOAD, _env(built_cache.cache, CHILDOPT_LOCK_TIMEOUT=600), timeout=120)
        seconds = time.monotonic() - start
    finally:
        os.close(fd)
    assert result.returncode == 0, result.stdout + result.stderr
    assert _loaded_path(result.stdout).startswith(str(built_cache.cache / spec.dirname))
    assert "waiting" not in result.stderr and BUILDING not in result.stderr
    assert seconds < 60


@pytest.fixture(scope="module")
def cold_start(tmp_path_factory):
    """A builder SIGKILLed mid-compile on a cold cache, then three processes that each make a
    ``MaskedAdamW(..., backend="native")`` step, started at once."""
    cache = tmp_path_factory.mktemp("cold") / "cache"
    env = _env(cache, CHILDOPT_LOCK_TIMEOUT=BUILD_LIMIT)
    victim = subprocess.Popen([sys.executable, "-c", LOAD], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 180
    ninja_file = None
    while ninja_file is None and time.monotonic() < deadline and victim.poll() is None:
        found = list(cache.glob(".tmp-*/build.ninja"))
        ninja_file = found[0] if found else None
        time.sleep(0.1)
    assert ninja_file is not None, "the builder never wrote build.ninja"
    time.sleep(3)  # well into compiling (a translation unit takes tens of seconds)
    assert victim.poll() is None, "the build finished before it could be killed"
    killed_tmp = ninja_file.parent
    compilers_before = _processes_in(killed_tmp)
    os.kill(victim.pid, signal.SIGKILL)
    victim.communicate()
    time.sleep(2)  # the worker's parent-death signal and watchdog end its process group
    left_running = _processes_in(killed_tmp)

    start = time.monotonic()
    loaders = [subprocess.Popen([sys.executable, "-c", STEP], env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True) for _ in range(3)]
    outputs = []
    for proc in loaders:
        try:
            outputs.append(proc.communicate(timeout=BUILD_LIMIT)[0])
        except subprocess.TimeoutExpired:
            for p in loaders:
                p.kill()
            raise
    return SimpleNamespace(cache=cache, killed_tmp=killed_tmp, compilers_before=compilers_before,
                           left_running=left_running, loaders=loaders, outputs=outputs,
                           seconds=time.monotonic() - start)


def test_a_builder_killed_mid_compile_never_blocks_the_next_load(cold_start):
    assert cold_start.compilers_before, "ninja or a compiler was running in the private build directory"
    assert cold_start.left_running == [], "the killed builder's compilers must die with it"
    for proc, out in zip(cold_start.loaders, cold_start.outputs):
        assert proc.returncode == 0, out
    # One cold build on two cores, not a wait on anything the dead builder left.
    assert cold_start.seconds < 420
    assert cold_start.killed_tmp.exists(), "the dead builder's directory is left for clean, never reused"
    assert all(str(cold_start.killed_tmp) not in _loaded_path(out) for out in cold_start.outputs)


def test_concurrent_cold_loaders_compile_once_and_load_the_same_build(cold_start):
    builds = sum(out.count(BUILDING) for out in cold_start.outputs)
    assert builds == 1, "\n---\n".join(cold_start.outputs)
    paths = {_loaded_path(out) for out in cold_start.outputs}
    published = _published(cold_start.cache)
    assert len(published) == 1 and len(paths) == 1
    assert paths.pop().startswith(str(published[0]) + os.sep)
    assert [p for p in cold_start.cache.glob(".tmp-*")] == [cold_start.killed_tmp]


# ----------------------------------------------------------------------------- keys


def _copy_package(tmp_path: Path) -> Path:
    """A package directory holding a copy of csrc/ (what _ext.PACKAGE_DIR points at)."""
    package = tmp_path / "pkg"
    shutil.copytree(_ext.csrc_dir(), package / "csrc", ignore=shutil.ignore_patterns("*.md"))
    return package


def test_the_key_changes_with_archs_torch_and_sources_but_not_with_mtimes(built_cache, monkeypatch, tmp_path):
    spec = _ext.build_spec()
    assert spec.key == built_cache.spec.key and not spec.with_cuda and spec.archs == ()
    old_dir = built_cache.cache / spec.dirname
    before = {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in old_dir.iterdir()}

    # Arch lists (a CUDA torch with nvcc, faked): new key, same base key, so a wider build can serve.
    rt = _ext.runtime()
    cuda_rt = {**rt, "torch_cuda": "12.8", "nvcc": "/nonexistent/nvcc", "gpus": [(8, 0)], "want_cuda": True}
    a80 = _ext.build_spec(rt=cuda_rt)
    a90 = _ext.build_spec(rt={**cuda_rt, "gpus": [(9, 0)]})
    assert a80.with_cuda and a80.archs == ("8.0+PTX",) and a90.archs == ("9.0+PTX",)
    assert len({spec.key, a80.key, a90.key}) == 3 and a80.base_key == a90.base_key != spec.base_key
    monkeypatch.setenv("CHILDOPT_CUDA_ARCHS", "80,sm_90")
    both = _ext.build_spec(rt=cuda_rt)
    assert both.archs == ("8.0", "9.0+PTX") and both.key not in (a80.key, a90.key)
    monkeypatch.delenv("CHILDOPT_CUDA_ARCHS")

    # torch version and git version.
    monkeypatch.setattr(torch, "__version__", "2.13.1+cpu")
    bumped = _ext.build_spec()
    monkeypatch.undo()
    monkeypatch.setattr(torch.version, "git_version", "0" * 40)
    other_git = _ext.build_spec()
    monkeypatch.undo()
    assert len({spec.key, bumped.key, other_git.key}) == 3

    # One source byte; mtimes alone change nothing.
    package = _copy_package(tmp_path)
    monkeypatch.setattr(_ext, "PACKAGE_DIR", package)
    copy = _ext.build_spec()
    assert copy.key == spec.key
    for path in (package / "csrc").rglob("*"):
        os.utime(path, (1e9, 1e9))
    assert _ext.build_spec().key == spec.key
    target = package / "csrc" / "cpu" / "fisher_accumulate.cpp"
    target.write_bytes(target.read_bytes() + b"\n")
    edited = _ext.build_spec()
    assert edited.key != spec.key
    monkeypatch.undo()

    # None of them finds the published build, which nothing touched.
    for other in (a80, a90, both, bumped, other_git, edited):
        assert _ext.find_published(other, [built_cache.cache]) is None
        assert not (built_cache.cache / other.dirname).exists()
    assert _ext.find_published(spec, [built_cache.cache]) == old_dir
    assert {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in old_dir.iterdir()} == before


def test_a_build_for_more_archs_serves_a_gpu_it_covers(tmp_path):
    """find_published: the exact key first, then a build of the same base key covering every visible GPU."""
    rt = {**_ext.runtime(), "torch_cuda": "12.8", "nvcc": "/nonexistent/nvcc", "want_cuda": True}
    os.environ["CHILDOPT_CUDA_ARCHS"] = "8.0,9.0"
    try:
        wide = _ext.build_spec(rt={**rt, "gpus": []})
    finally:
        del os.environ["CHILDOPT_CUDA_ARCHS"]
    directory = tmp_path / wide.dirname
    directory.mkdir()
    (directory / f"{wide.module_name}.so").write_bytes(b"")
    (directory / _ext.MANIFEST).write_text(json.dumps(
        {"key": wide.key, "base_key": wide.base_key, "inputs": wide.inputs, "library": f"{wide.module_name}.so",
         "module": wide.module_name, "published_at": time.time()}))
    assert _ext.find_published(_ext.build_spec(rt={**rt, "gpus": [(8, 6)]}), [tmp_path]) == directory  # sm_80 cubin
    assert _ext.find_published(_ext.build_spec(rt={**rt, "gpus": [(12, 0)]}), [tmp_path]) == directory  # PTX 9.0
    assert _ext.find_published(_ext.build_spec(rt={**rt, "gpus": [(7, 5)]}), [tmp_path]) is None
    # CHILDOPT_FORCE_REBUILD ignores builds published before the process started.
    assert _ext.find_published(wide, [tmp_path], newer_than=time.time() + 1) is None


# ----------------------------------------------------------------------------- archs and records


def test_arch_lists_are_normalised_with_ptx_on_the_highest():
    assert cfg.parse_archs("8.0, 86;sm_90 9.0a 10.0+PTX 120") == ["8.0", "8.6", "9.0", "9.0a", "10.0+PTX", "12.0"]
    assert cfg.finalize_archs(["9.0", "8.0", "8.0"]) == ("8.0", "9.0+PTX")
    assert cfg.finalize_archs(["8.6+PTX", "9.0"]) == ("8.6+PTX", "9.0")
    assert cfg.finalize_archs([]) == ()
    for bad in ("ampere", "8", "8.x"):
        with pytest.raises(ValueError, match="not a CUDA arch"):
            cfg.parse_archs(bad)


@pytest.mark.parametrize("archs, gpu, ok, how", [
    (["8.0"], (8, 0), True, "cubin for 8.0"),
    (["8.0"], (8, 6), True, "cubin for 8.0"),           # same major, lower minor: binary compatible
    (["8.6"], (8, 0), False, "no cubin"),               # never a higher minor
    (["8.0"], (9, 0), False, "no cubin"),               # never across majors without PTX
    (["8.0+PTX"], (9, 0), True, "PTX for 8.0"),         # PTX at or below the GPU's arch
    (["9.0+PTX"], (8, 0), False, "no cubin"),           # PTX above it does not run
    (["9.0a"], (9, 0), True, "cubin for 9.0a"),
    (["9.0a"], (10, 0), False, "no cubin"),             # an arch-specific target runs only on itself
    (["8.0", "9.0+PTX"], (12, 0), True, "PTX for 9.0"),
])
def test_arch_coverage(archs, gpu, ok, how):
    got, text = cfg.arch_covers(archs, gpu)
    assert got is ok and how in text


def _record(**changes):
    rt = _ext.runtime()
    record = cfg.key_inputs({k: rt[k] for k in ("torch_version", "torch_git", "torch_cuda", "torch_hip", "cxx11_abi")},
                            rt["sources"], False, (), None)
    record.update(changes)
    return record, rt


def test_build_records_are_checked_against_torch_cuda_abi_python_sources_and_gpus():
    record, rt = _record()
    assert cfg.check_record(record, rt) is None
    assert "built for torch 2.0.0" in cfg.check_record({**record, "torch_version": "2.0.0"}, rt)
    assert "git" in cfg.check_record({**record, "torch_git": "f" * 40}, rt)
    assert "CUDA 12.8" in cfg.check_record({**record, "torch_cuda": "12.8"}, rt)
    assert "ABI" in cfg.check_record({**record, "cxx11_abi": not record["cxx11_abi"]}, rt)
    assert "Python cpython-310" in cfg.check_record({**record, "python": "cpython-310"}, rt)
    assert "csrc/ has changed" in cfg.check_record({**record, "sources": "0" * 64}, rt)
    cuda_rt = {**rt, "torch_cuda": "12.8", "gpus": [(9, 0)], "want_cuda": True}
    cuda = {**record, "torch_cuda": "12.8", "with_cuda": True}
    assert cfg.check_record({**cuda, "archs": ["8.0", "9.0"]}, cuda_rt) is None
    assert cfg.check_record({**cuda, "archs": ["8.0+PTX"]}, cuda_rt) is None
    assert "cuda:0 (sm_90) is not covered" in cfg.check_record({**cuda, "archs": ["8.0", "8.6"]}, cuda_rt)
    assert "sm_120" in cfg.check_record({**cuda, "archs": ["9.0a"]}, {**cuda_rt, "gpus": [(9, 0), (12, 0)]})
    assert "no CUDA kernels" in cfg.check_record({**record, "torch_cuda": "12.8"}, cuda_rt)
    assert cfg.check_record({**record, "torch_cuda": "12.8"}, {**cuda_rt, "want_cuda": False}) is None


def _fake_prebuilt(directory: Path, record: dict, library: Path | None = None) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    name = record["file"]
    if library is None:
        (directory / name).write_bytes(b"not a library")
    else:
        shutil.copyfile(library, directory / name)
    (directory / cfg.BUILD_INFO_FILE).write_text(json.dumps(record))


def _with_prebuilt_dir(directory: Path, code: str) -> str:
    return f"import childopt._ext as e; from pathlib import Path; e.PREBUILT_DIR = Path({str(directory)!r}); {code}"


def test_a_prebuilt_for_another_torch_gives_one_warning_and_the_jit_build(built_cache, tmp_path):
    record, _ = _record(torch_version="2.0.0+cpu")
    _fake_prebuilt(tmp_path / "prebuilt", {**record, "module": "childopt._C", "file": "_C.so"})
    code = _with_prebuilt_dir(tmp_path / "prebuilt", "import torch; " + LOAD_BODY)
    result = _python(code, built_cache.env, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    warnings = [line for line in result.stderr.splitlines() if "prebuilt" in line]
    assert len(warnings) == 1, result.stderr
    assert "it was built for torch 2.0.0+cpu" in warnings[0] and f"this is torch {torch.__version__}" in warnings[0]
    assert _ext.PREBUILT_FALLBACK in warnings[0]
    assert _loaded_path(result.stdout).startswith(str(built_cache.cache / built_cache.spec.dirname))


def test_a_matching_prebuilt_is_used_without_the_cache(built_cache, tmp_path):
    manifest = json.loads((built_cache.cache / built_cache.spec.dirname / _ext.MANIFEST).read_text())
    record = {**manifest["inputs"], "module": manifest["module"], "file": manifest["library"]}
    _fake_prebuilt(tmp_path / "prebuilt", record, built_cache.cache / built_cache.spec.dirname / manifest["library"])
    empty = tmp_path / "empty-cache"
    code = _with_prebuilt_dir(tmp_path / "prebuilt", "import torch; " + LOAD_BODY + "; print('HOW', e.loaded()[1])")
    result = _python(code, _env(empty), timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert _loaded_path(result.stdout).startswith(str(tmp_path / "prebuilt"))
    assert "HOW prebuilt for torch" in result.stdout and "prebuilt" not in result.stderr
    assert not empty.exists(), "nothing was built or cached"


# ----------------------------------------------------------------------------- failures


def test_an_unwritable_cache_falls_back_to_the_per_user_temp_dir(tmp_path, monkeypatch, caplog):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    # A path under a regular file can be created by nobody, root included (chmod does not stop root).
    monkeypatch.setenv("CHILDOPT_CACHE_DIR", str(blocker / "cache"))
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    with caplog.at_level("WARNING", logger="childopt"):
        root = _ext.writable_root()
    assert root == tmp_path / "tmp" / f"childopt-{os.getuid()}" and (root / "locks").is_dir()
    assert f"cannot write the extension cache {blocker / 'cache'}" in caplog.text
    assert "CHILDOPT_CACHE_DIR" in caplog.text and str(root) in caplog.text
    assert oct(root.stat().st_mode & 0o777) == "0o700"
    monkeypatch.setattr("tempfile.tempdir", str(blocker))
    with pytest.raises(_ext.ExtensionUnavailable, match=r"cannot write the extension cache .*CHILDOPT_CACHE_DIR.*"
                                                          r"nor the fallback .*Set CHILDOPT_CACHE_DIR"):
        _ext.writable_root()


def test_loading_with_an_unwritable_cache(built_cache, tmp_path):
    """End to end: no cache anywhere -> a clear error at once; the fallback holding a build -> it loads."""
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    # tempfile skips a TMPDIR it cannot use, so the child points tempfile.tempdir at the file itself.
    code = (f"import tempfile; tempfile.tempdir = {str(blocker)!r}; import childopt._ext as e; "
            "m, why = e.try_load(); print('RESULT', m, why)")
    result = _python(code, _env(blocker / "cache"), timeout=120)
    assert result.returncode == 0, result.stderr
    assert f"RESULT None cannot write the extension cache {blocker / 'cache'}" in result.stdout
    assert "CHILDOPT_CACHE_DIR" in result.stdout and BUILDING not in result.stderr
    fallback = _python(LOAD, _env(blocker / "cache", TMPDIR=built_cache.base), timeout=120)
    assert fallback.returncode == 0, fallback.stdout + fallback.stderr
    assert _loaded_path(fallback.stdout).startswith(str(built_cache.cache))


def _broken_package(tmp_path: Path) -> Path:
    """A copy of csrc/ whose every translation unit fails at its first line (a missing header is fatal at once)."""
    package = _copy_package(tmp_path)
    for source in (package / "csrc").rglob("*.cpp"):
        source.write_text('#include "childopt_test_broken_on_purpose.h"\n' + source.read_text())
    return package


def test_a_failed_build_names_its_log_and_is_not_retried_in_the_process(tmp_path):
    package = _broken_package(tmp_path)
    cache = tmp_path / "cache"
    code = (f"import childopt._ext as e; from pathlib import Path; e.PACKAGE_DIR = Path({str(package)!r}); "
            "a = e.try_load(); b = e.try_load(); print('FIRST', a[0], a[1]); print('SAME', a[1] == b[1])")
    result = _python(code, _env(cache), timeout=300)
    assert result.returncode == 0, result.stderr
    assert "FIRST None building childopt._C failed" in result.stdout and "SAME True" in result.stdout
    assert "FAILED:" in result.stdout and "childopt_test_broken_on_purpose.h" in result.stdout  # the compiler's error
    assert result.stderr.count(BUILDING) == 1
    logs = list((cache / "logs").glob("failed-*.log"))
    assert len(logs) == 1 and str(logs[0]) in result.stdout and "broken_on_purpose" in logs[0].read_text()
    assert not list(cache.glob(".tmp-*")) and not _published(cache)


def test_a_build_past_its_time_limit_is_killed_with_its_compilers(tmp_path):
    cache = tmp_path / "cache"
    code = ("import childopt._ext as e; m, why = e.try_load(); print('RESULT', m, why)")
    start = time.monotonic()
    result = _python(code, _env(cache, CHILDOPT_BUILD_TIMEOUT=4), timeout=300)
    assert result.returncode == 0, result.stderr
    assert time.monotonic() - start < 60
    assert "RESULT None building childopt._C took longer than CHILDOPT_BUILD_TIMEOUT=4 s" in result.stdout
    assert not list(cache.glob(".tmp-*")) and not _published(cache)
    time.sleep(0.5)
    assert not [pid for pid in _processes_in_prefix(cache)], "no compiler outlives the killed build"


def _processes_in_prefix(directory: Path) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.readlink(entry / "cwd").startswith(str(directory)):
                    pids.append(int(entry.name))
            except OSError:
                pass
    return pids


def test_bad_environment_values_are_reported():
    os.environ["CHILDOPT_LOCK_TIMEOUT"] = "soon"
    try:
        with pytest.raises(_ext.ExtensionUnavailable, match="CHILDOPT_LOCK_TIMEOUT must be a number"):
            _ext.lock_timeout()
    finally:
        del os.environ["CHILDOPT_LOCK_TIMEOUT"]
    with pytest.raises(_ext.ExtensionUnavailable, match="cannot build CUDA kernels for 8.0: torch has no CUDA"):
        _ext.build_spec(archs="8.0", rt={**_ext.runtime(), "torch_cuda": None})
    with pytest.raises(_ext.ExtensionUnavailable, match="--archs: not a CUDA arch"):
        _ext.build_spec(archs="volta")


def test_the_lock_is_never_deleted_and_times_out(tmp_path, caplog):
    path = tmp_path / "locks" / "x.lock"
    fd = _hold_lock(path, "pytest")
    try:
        start = time.monotonic()
        with caplog.at_level("WARNING", logger="childopt"), _ext.BuildLock(path, 0.5, "x") as held:
            assert held is False
        assert 0.5 <= time.monotonic() - start < 5
        assert "waiting for another process to build x" in caplog.text and "gave up waiting" in caplog.text
        assert _ext.lock_state(path) is not None
    finally:
        os.close(fd)
    assert _ext.lock_state(path) is None
    with _ext.BuildLock(path, 0.5, "x") as held:
        assert held is True
        assert json.loads(path.read_text())["pid"] == os.getpid()
        assert f"pid {os.getpid()}" in _ext.lock_state(path)
    assert path.exists() and _ext.lock_state(path) is None


# ----------------------------------------------------------------------------- clean and doctor


def test_clean_removes_stale_and_unused_builds_but_not_the_current_one(built_cache, tmp_path):
    cache = tmp_path / "cache"
    shutil.copytree(built_cache.cache, cache)
    current = cache / built_cache.spec.dirname
    unused = cache / f"{cfg.NAME}-{'0' * 16}"
    shutil.copytree(current, unused)
    manifest = json.loads((unused / _ext.MANIFEST).read_text())
    (unused / _ext.MANIFEST).write_text(json.dumps({**manifest, "key": "0" * 64}))
    host = re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname())
    dead = cache / f".tmp-{'1' * 16}-{host}-{2**22 + 12345}-abcd1234"  # pid above pid_max: gone
    live = cache / f".tmp-{'2' * 16}-{host}-{os.getpid()}-abcd1234"
    dead.mkdir()
    live.mkdir()
    (cache / "logs").mkdir(exist_ok=True)
    (cache / "logs" / "failed-x.log").write_text("x")
    env = _env(cache)
    dry = _run(["-m", "childopt", "clean", "--dry-run"], env, timeout=120)
    assert dry.returncode == 0 and "would remove" in dry.stdout and unused.exists(), dry.stdout + dry.stderr
    result = _run(["-m", "childopt", "clean"], env, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert not unused.exists() and not dead.exists() and not (cache / "logs" / "failed-x.log").exists()
    assert current.exists() and live.exists() and list((cache / "locks").glob("*.lock"))
    everything = _run(["-m", "childopt", "clean", "--all"], env, timeout=120)
    assert everything.returncode == 0 and not current.exists() and live.exists()
    assert list((cache / "locks").glob("*.lock")), "lock files are never deleted"


def test_doctor_fix_removes_stale_torch_extension_locks_only(tmp_path):
    root = tmp_path / "torch_extensions"
    stale = root / "py311_cpu" / "fused_adam" / "lock"
    in_use = root / "py311_cpu" / "cpu_adam" / "lock"
    young = root / "transformer" / "lock"
    for path in (stale, in_use, young):
        path.parent.mkdir(parents=True)
        path.write_text("")
    old = time.time() - 7200
    os.utime(stale, (old, old))
    os.utime(in_use, (old, old))
    fd = os.open(in_use, os.O_RDONLY)  # a FileBaton holder keeps its lock file open while it builds
    try:
        env = _env(tmp_path / "cache", TORCH_EXTENSIONS_DIR=root)
        report = _run(["-m", "childopt", "doctor"], env, timeout=120)
        assert f"{root}: 3 lock file(s), 1 stale" in report.stdout, report.stdout + report.stderr
        assert "python -m childopt doctor --fix" in report.stdout and stale.exists()
        fixed = _run(["-m", "childopt", "doctor", "--fix"], env, timeout=120)
        assert fixed.returncode == 0, fixed.stdout + fixed.stderr
        assert f"{stale}  STALE: no process has it open: its builder is gone, 2 h old -> removed" in fixed.stdout
        assert f"open by pid {os.getpid()}" in fixed.stdout
        assert not stale.exists() and in_use.exists() and young.exists()
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------- packaging


def test_setup_py_builds_the_extension_only_when_asked(tmp_path):
    """setup.py's wiring without compiling: setuptools.setup is replaced by a recorder."""
    code = ("import json, os, sys, setuptools; seen = {}; setuptools.setup = lambda **kw: seen.update(kw); "
            "import runpy; runpy.run_path('setup.py', run_name='__main__'); "
            "ext = seen.get('ext_modules', [None])[0]; "
            "print(json.dumps({'torch': 'torch' in sys.modules, 'ext': ext and [ext.name, ext.sources, "
            "ext.extra_compile_args, ext.include_dirs], 'cmd': sorted(seen.get('cmdclass', {})), "
            "'max_jobs': os.environ.get('MAX_JOBS'), 'version': seen.get('version')}))")
    env = _env(tmp_path / "cache")
    plain = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120, cwd=REPO)
    assert plain.returncode == 0, plain.stderr
    assert json.loads(plain.stdout.splitlines()[-1]) == {"torch": False, "ext": None, "cmd": [], "max_jobs": None,
                                                         "version": childopt.__version__}
    aot = subprocess.run([sys.executable, "-c", code], env={**env, "CHILDOPT_BUILD_EXT": "1"}, capture_output=True,
                         text=True, timeout=120, cwd=REPO)
    assert aot.returncode == 0, aot.stderr
    seen = json.loads(aot.stdout.splitlines()[-1])
    name, sources, args, includes = seen["ext"]
    with_cuda = bool(torch.version.cuda) and cfg.nvcc_path(_ext._torch_cuda_home()) is not None
    assert name == "childopt._C" and seen["cmd"] == ["build_ext"] and int(seen["max_jobs"]) >= 1
    assert sources == [p.relative_to(REPO).as_posix() for p in cfg.source_files(REPO / "csrc", with_cuda)]
    assert args == {"cxx": cfg.cxx_flags(with_cuda), "nvcc": cfg.nvcc_flags(with_cuda)}
    assert str(REPO / "csrc" / "include") in includes
    assert ("CPU kernels only" in aot.stderr) is not with_cuda
    assert seen["version"] == f"{childopt.__version__}+{cfg.local_version(cfg.torch_facts(), with_cuda)}"
    labelled = subprocess.run([sys.executable, "-c", code], env={**env, "CHILDOPT_BUILD_EXT": "1",
                                                               "CHILDOPT_LOCAL_VERSION": ""},
                              capture_output=True, text=True, timeout=120, cwd=REPO)
    assert json.loads(labelled.stdout.splitlines()[-1])["version"] == childopt.__version__, "an empty label: none"


def test_a_regular_install_ships_the_sources(tmp_path):
    """A wheel (what `pip install .` installs) carries csrc/ as childopt/csrc, so it can JIT-build."""
    pytest.importorskip("setuptools")
    source = tmp_path / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.so", "_build_info.json", "build", "*.egg-info")
    for name in ("childopt", "kernels", "csrc"):
        shutil.copytree(REPO / name, source / name, ignore=ignore)
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy(REPO / name, source / name)
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                             "-w", str(tmp_path / "dist"), str(source)],
                            capture_output=True, text=True, timeout=300, env={**os.environ, "CHILDOPT_BUILD_EXT": "0"})
    if result.returncode != 0 and "bdist_wheel" in result.stdout + result.stderr:
        pytest.skip("no wheel support in this environment's setuptools")
    assert result.returncode == 0, result.stdout + result.stderr
    import zipfile

    (wheel,) = (tmp_path / "dist").glob("childopt-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {f"childopt/csrc/{p.relative_to(REPO / 'csrc').as_posix()}" for p in cfg.hashed_files(REPO / "csrc")}
    assert expected and expected <= names, sorted(expected - names)
    assert "childopt/_build_config.py" in names and "childopt/_ext.py" in names
    assert not any(n.endswith((".so", "_build_info.json")) for n in names), "a plain wheel is pure Python"
