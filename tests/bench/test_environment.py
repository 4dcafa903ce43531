"""The environment a report records: the CPU's identity beside its model name."""
import platform
import shutil
import subprocess

import pytest
import torch

from childopt.bench import environment
from childopt.bench.environment import cpu_name

CPUINFO = """processor\t: 0
vendor_id\t: AuthenticAMD
cpu family\t: 26
model\t\t: 2
model name\t: AMD EPYC
stepping\t: 1

processor\t: 1
vendor_id\t: GenuineIntel
cpu family\t: 6
model name\t: Another CPU
"""


def test_cpu_name_gives_the_first_processors_vendor_family_model_and_stepping(tmp_path):
    path = tmp_path / "cpuinfo"
    path.write_text(CPUINFO)
    assert cpu_name(path) == "AMD EPYC (AuthenticAMD, cpu family 26, model 2, stepping 1)"


def test_cpu_name_without_the_identity_fields_is_the_model_name(tmp_path):
    path = tmp_path / "cpuinfo"
    path.write_text("processor\t: 0\nmodel name\t: Some ARM core\n")
    assert cpu_name(path) == "Some ARM core"


def test_cpu_name_without_cpuinfo_falls_back_to_platform(tmp_path, monkeypatch):
    monkeypatch.setattr(platform, "processor", lambda: "")
    monkeypatch.setattr(platform, "machine", lambda: "x86_64")
    assert cpu_name(tmp_path / "missing") == "x86_64"


def test_cpu_name_survives_bytes_that_are_not_utf8_and_a_leading_blank_line(tmp_path):
    path = tmp_path / "cpuinfo"
    path.write_bytes(b"\nprocessor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: EPYC \xe9\xff\n")
    assert cpu_name(path) == "EPYC \ufffd\ufffd (AuthenticAMD)"


def test_an_empty_model_name_falls_back_to_platform(tmp_path, monkeypatch):
    monkeypatch.setattr(platform, "processor", lambda: "")
    monkeypatch.setattr(platform, "machine", lambda: "x86_64")
    path = tmp_path / "cpuinfo"
    path.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t:\n")
    assert cpu_name(path) == "x86_64"


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_the_recorded_commit_says_when_tracked_files_were_edited(tmp_path, monkeypatch):
    """Numbers measured on edited code are not the commit's; an untracked file (an output) changes nothing."""
    def git(*args):
        return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=tmp_path, check=True,
                              capture_output=True, text=True).stdout.strip()

    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "code.py").write_text("x = 1\n")
    git("init", "-q")
    git("add", ".")
    git("commit", "-q", "-m", "first")
    head = git("rev-parse", "HEAD")
    monkeypatch.setattr(environment, "__file__", str(tmp_path / "pkg" / "environment.py"))
    (tmp_path / "bench.json").write_text("{}")
    assert environment.describe(torch.device("cpu"), {})["git_commit"] == head
    (tmp_path / "pkg" / "code.py").write_text("x = 2\n")
    assert environment.describe(torch.device("cpu"), {})["git_commit"] == f"{head} + uncommitted changes"
    monkeypatch.setattr(environment, "__file__", str(tmp_path.parent / "environment.py"))  # no checkout there
    assert environment.describe(torch.device("cpu"), {})["git_commit"] is None
