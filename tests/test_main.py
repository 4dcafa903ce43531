"""``python -m childopt``: the command line dispatches and ``info`` explains the backend choice."""
import subprocess
import sys

import pytest
import torch

from childopt import _native
from childopt.__main__ import main


def test_info_names_the_backend_auto_picks_and_why(capsys, monkeypatch):
    monkeypatch.setattr(_native, "try_load", lambda build=True: (None, "not built yet"))
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "childopt" in out and "torch" in out
    assert "cpu: reference (plain torch)" in out


def test_info_reports_a_bad_childopt_backend_in_one_line(capsys, monkeypatch):
    """No traceback: one line names the value and what it does; info reports problems and exits 0."""
    monkeypatch.setenv("CHILDOPT_BACKEND", "bogus")
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    [line] = [line for line in out.splitlines() if "bogus" in line]
    assert line.startswith("backend=auto picks nothing: CHILDOPT_BACKEND must be one of ('auto', 'reference', "
                           "'triton', 'native'), got 'bogus'; every optimizer left at backend='auto' raises this")
    assert "  cpu:" not in out  # no per-device choice: there is none


def test_info_follows_a_valid_childopt_backend(capsys, monkeypatch):
    monkeypatch.setenv("CHILDOPT_BACKEND", "reference")
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "backend=auto picks (CHILDOPT_BACKEND=reference overrides it)\n  cpu: reference (plain torch)" in out


def test_info_under_childopt_backend_native_reports_it_without_building_it(capsys, monkeypatch):
    """The backend the variable names is checked as auto's pick is: never by compiling it."""
    asked = []
    monkeypatch.setattr(_native, "try_load", lambda build=True: asked.append(build) or (None, "not built yet"))
    monkeypatch.setenv("CHILDOPT_BACKEND", "native")
    assert main(["info"]) == 0
    assert True not in asked, "info asked for a build"
    assert ("  cpu: native (CHILDOPT_BACKEND=native), not ready without a build: childopt._C is not available "
            "(not built yet)") in capsys.readouterr().out


def test_info_says_the_variable_is_why_a_ready_backend_is_not_used(capsys, monkeypatch):
    monkeypatch.setattr(_native, "try_load", lambda build=True: (object(), "a cached build"))
    monkeypatch.setenv("CHILDOPT_BACKEND", "reference")
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "      not native: runs here, but CHILDOPT_BACKEND=reference overrides auto's pick" in out


def test_unknown_command_and_stray_arguments_are_rejected(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train"])
    assert exit_info.value.code == 2 and "invalid choice: 'train'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["info", "--fast"])
    assert exit_info.value.code == 2 and "info takes no arguments, got --fast" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["info", "--help"])
    assert exit_info.value.code == 0 and "the backend auto picks per device" in capsys.readouterr().out


def test_module_entry_point_runs():
    out = subprocess.run([sys.executable, "-m", "childopt", "--help"], capture_output=True, text=True, check=True)
    assert "bench" in out.stdout and "info" in out.stdout
    assert all(command in out.stdout for command in ("doctor", "build", "clean"))


def test_info_reports_the_native_extension_without_building_it(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("CHILDOPT_CACHE_DIR", str(tmp_path / "cache"))
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    if _native.loaded()[0] is None:
        assert "native   childopt._C needs a build" in out and "python -m childopt build" in out
        assert "not native: childopt._C is not available (not built yet" in out
    else:  # an earlier test of this process loaded it
        assert "native   childopt._C loaded" in out
    assert not (tmp_path / "cache").exists(), "info never builds"


@pytest.mark.parametrize("command", ["doctor", "build", "clean"])
def test_native_extension_commands_have_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert f"python -m childopt {command}" in capsys.readouterr().out


def test_build_rejects_conflicting_and_impossible_targets(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("CHILDOPT_CACHE_DIR", str(tmp_path / "cache"))
    with pytest.raises(SystemExit) as exit_info:
        main(["build", "--cpu", "--archs", "8.0"])
    assert exit_info.value.code == 2 and "--archs and --cpu exclude each other" in capsys.readouterr().err
    if not torch.version.cuda:
        assert main(["build", "--archs", "8.0"]) == 1
        assert "cannot build CUDA kernels for 8.0: torch has no CUDA" in capsys.readouterr().err
    assert not (tmp_path / "cache").exists()
