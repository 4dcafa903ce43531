"""``python -m childopt``: the command line dispatches and ``info`` explains the backend choice."""
import subprocess
import sys

import pytest

from childopt.__main__ import main


def test_info_names_the_backend_auto_picks_and_why(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "childopt" in out and "torch" in out
    assert "cpu: reference (plain torch)" in out


def test_unknown_command_and_stray_arguments_are_rejected():
    with pytest.raises(SystemExit):
        main(["train"])
    with pytest.raises(SystemExit):
        main(["info", "--fast"])


def test_module_entry_point_runs():
    out = subprocess.run([sys.executable, "-m", "childopt", "--help"], capture_output=True, text=True, check=True)
    assert "bench" in out.stdout and "info" in out.stdout
