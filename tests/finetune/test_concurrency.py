"""Finetune commands against each other and their own processes: one command per --output folder at a time
(a second fails at once naming the holder; a killed holder blocks nothing), and a run spawned into a child
process stops when the command that spawned it is killed."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from childopt._native.env import hostname
from childopt.finetune import cli, lock
from tests.finetune.test_checks import tiny_argv

ROOT = Path(__file__).parents[2]
# Holds the lock of the folder sys.argv[1] as a finetune command does, says so, and waits to be killed.
HOLDER = ("import sys, time\nfrom childopt.finetune.lock import hold_output\n"
          "with hold_output(sys.argv[1], create=True):\n    print('held', flush=True)\n    time.sleep(120)\n")


def _python(*args, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, *args], cwd=ROOT, **kwargs)


def test_a_second_command_on_a_held_folder_fails_at_once_and_a_killed_holder_blocks_nothing(models, tmp_path,
                                                                                           capsys):
    output = tmp_path / "out"
    holder = _python("-c", HOLDER, str(output), stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        start = time.monotonic()
        assert cli.main(tiny_argv(models, output)) == 2
        assert time.monotonic() - start < 15  # refused, not waited for
        err = capsys.readouterr().err
        assert f"error: --output {output} is in use by another finetune command (pid {holder.pid} on {hostname()}" \
            in err, err
        assert not list(output.glob("*.json")) and not (output / "table.md").exists()
    finally:
        holder.kill()
        holder.wait()
    assert json.loads((output / lock.LOCK_NAME).read_text())["pid"] == holder.pid  # its lock file stays behind
    assert cli.main(tiny_argv(models, output)) == 0
    assert [path.name for path in output.glob("*.json")] == ["RTE-adamw-lr2e-05-seed1.json"]


def test_summarize_holds_the_folder_too_and_leaves_a_missing_one_missing(tmp_path, capsys):
    with lock.hold_output(str(tmp_path), create=True):
        assert cli.main(["--summarize", "--output", str(tmp_path)]) == 2
        err = capsys.readouterr().err
        assert f"--output {tmp_path} is in use by another finetune command (pid {os.getpid()}" in err
    assert cli.main(["--summarize", "--output", str(tmp_path / "nowhere")]) == 2
    assert not (tmp_path / "nowhere").exists()


def _epoch_line_in(log: Path, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if "] epoch " in log.read_text():
            return True
        time.sleep(0.1)
    return False


def test_a_run_in_a_child_process_stops_when_its_command_is_killed(models, tmp_path):
    """Two learning rates: each run trains in a spawned child; SIGKILL the command while the first trains."""
    psutil = pytest.importorskip("psutil")  # installed with accelerate, a test dependency
    argv = tiny_argv(models, tmp_path / "out", "--lr", "1e-5", "2e-5", "--epochs", "100000", "--max-steps", "100000")
    log = tmp_path / "log"  # a file, not a pipe: closing a pipe would end an orphan by SIGPIPE and hide it
    with log.open("w") as sink:
        command = _python("-m", "childopt", "finetune", *argv, stdout=sink, stderr=subprocess.STDOUT)
    children = []
    try:
        assert _epoch_line_in(log, timeout=60), log.read_text()
        children = [child for child in psutil.Process(command.pid).children()
                    if "resource_tracker" not in " ".join(child.cmdline())]
        assert len(children) == 1, children
        os.kill(command.pid, signal.SIGKILL)
        command.wait()
        gone, alive = psutil.wait_procs(children, timeout=5)
        assert not alive or all(child.status() == psutil.STATUS_ZOMBIE for child in alive), log.read_text()
        assert "the finetune command that started this run is gone; stopping it" in log.read_text()
    finally:
        command.kill()
        for child in children:
            if child.is_running() and child.status() != psutil.STATUS_ZOMBIE:
                child.kill()


def test_a_folder_at_the_lock_file_s_name_is_a_clear_error(tmp_path, capsys):
    (tmp_path / lock.LOCK_NAME).mkdir()
    assert cli.main(["--summarize", "--output", str(tmp_path)]) == 2
    assert f"cannot open its lock file {tmp_path / lock.LOCK_NAME} (Is a directory)" in capsys.readouterr().err
