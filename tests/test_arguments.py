"""The argparse types and output checks shared by childopt's command lines."""
import argparse
import os
import sys
import threading

import pytest

from childopt.arguments import check_output_files, number, replacing, writable_path, write_output


def refused(outputs: dict, capsys, plots=()) -> str:
    """The usage error of ``check_output_files`` on ``outputs`` (it must exit with code 2)."""
    with pytest.raises(SystemExit) as exited:
        check_output_files(argparse.ArgumentParser(prog="prog"), outputs, plots)
    assert exited.value.code == 2
    return capsys.readouterr().err


def test_a_folder_or_a_path_under_a_file_is_refused_naming_the_option(tmp_path, capsys):
    (tmp_path / "a_file").write_text("")
    assert "--json: " in refused({"--json": str(tmp_path)}, capsys)
    assert "is a folder" in refused({"--out": str(tmp_path)}, capsys)
    err = refused({"--markdown": str(tmp_path / "a_file" / "run.md")}, capsys)
    assert "--markdown: " in err and "its folder cannot be made or written" in err



@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux's /proc")
def test_a_folder_that_takes_no_files_is_refused_whatever_its_permission_bits_say(capsys):
    """/proc looks writable to root by its bits (os.access), yet takes no new file: the check makes one."""
    err = refused({"--json": "/proc/childopt-no-such/run.json"}, capsys)
    assert "--json: " in err and "its folder cannot be made or written" in err


def test_the_folder_check_leaves_no_file_behind(tmp_path):
    check_output_files(argparse.ArgumentParser(prog="prog"), {"--json": str(tmp_path / "run.json")})
    assert list(tmp_path.iterdir()) == []

def test_a_path_ending_in_a_slash_is_refused_as_a_folder_to_be(tmp_path, capsys):
    """pathlib drops a trailing slash: ``--json out/`` would otherwise write a file named ``out``."""
    err = refused({"--json": str(tmp_path / "out") + "/"}, capsys)
    assert "--json: " in err and "ends in a slash" in err
    assert not (tmp_path / "out").exists()


def test_an_output_is_replaced_whole_or_left_as_it_was(tmp_path):
    target = tmp_path / "new" / "run.json"
    write_output(str(target), "first\n")
    assert target.read_text() == "first\n" and list(target.parent.iterdir()) == [target]
    plain = tmp_path / "plain"
    plain.write_text("")
    assert target.stat().st_mode & 0o777 == plain.stat().st_mode & 0o777  # not mkstemp's owner-only mode
    with pytest.raises(RuntimeError, match="stopped while writing"):
        with replacing(str(target)) as temporary:
            temporary.write_text("half")
            raise RuntimeError("stopped while writing")
    assert target.read_text() == "first\n" and list(target.parent.iterdir()) == [target]  # no temporary left
    with replacing(str(target)) as temporary:
        assert temporary.parent == target.parent and temporary.suffix == ".json"
        temporary.write_text("second\n")
    assert target.read_text() == "second\n"


def test_a_linked_output_replaces_the_file_it_names_and_keeps_its_permissions(tmp_path):
    target, link = tmp_path / "runs" / "run5.json", tmp_path / "latest.json"
    target.parent.mkdir()
    target.write_text("old\n")
    target.chmod(0o640)
    link.symlink_to(target)
    write_output(str(link), "new\n")
    assert link.is_symlink() and target.read_text() == "new\n"
    assert target.stat().st_mode & 0o777 == 0o640


def test_a_fifo_is_written_in_place_and_a_long_name_fits(tmp_path):
    fifo, received = tmp_path / "out.json", []
    os.mkfifo(fifo)
    reader = threading.Thread(target=lambda: received.append(fifo.read_text()))
    reader.start()
    write_output(str(fifo), "through\n")
    reader.join(timeout=30)
    assert received == ["through\n"] and fifo.is_fifo()
    long_name = tmp_path / ("a" * (os.pathconf(tmp_path, "PC_NAME_MAX") - 5) + ".json")
    write_output(str(long_name), "long\n")
    assert long_name.read_text() == "long\n"


def test_two_options_naming_one_file_are_refused(tmp_path, capsys):
    same = tmp_path / "run.txt"
    err = refused({"--json": str(same), "--markdown": str(tmp_path / "." / "run.txt")}, capsys)
    assert "--markdown: " in err and "also the file of --json" in err


def test_an_output_in_the_folder_another_output_names_is_refused(tmp_path, capsys):
    """--json R --markdown R/summary.md: both are files, so one could only fail after the run."""
    folder, inner = str(tmp_path / "R"), str(tmp_path / "R" / "summary.md")
    for outputs, named in (({"--json": folder, "--markdown": inner}, "--markdown: "),
                           ({"--json": inner, "--markdown": folder}, "--markdown: ")):
        err = refused(outputs, capsys)
        assert named in err and "--json's" in err and "one would be the other's folder" in err
    assert list(tmp_path.iterdir()) == []


def test_a_plot_needs_a_suffix_matplotlib_writes(tmp_path, capsys):
    assert "does not end in a format matplotlib writes" in refused({"--plot": str(tmp_path / "chart")}, capsys,
                                                                   plots=("--plot",))
    assert ".png" in refused({"--plot": str(tmp_path / "chart.jsonl")}, capsys, plots=("--plot",))
    check_output_files(argparse.ArgumentParser(), {"--plot": str(tmp_path / "chart.SVG")}, plots=("--plot",))
    check_output_files(argparse.ArgumentParser(), {"--json": str(tmp_path / "chart")})  # not a plot: any name


def test_a_plot_without_matplotlib_is_refused(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # importing it raises ImportError
    err = refused({"--plot": str(tmp_path / "chart.png")}, capsys, plots=("--plot",))
    assert "--plot needs matplotlib: pip install matplotlib" in err


def test_paths_in_folders_still_to_be_made_pass_and_get_their_folders(tmp_path):
    nested = tmp_path / "results" / "deep" / "run.json"
    check_output_files(argparse.ArgumentParser(), {"--json": str(nested), "--plot": None})
    assert not nested.parent.exists()  # checking makes nothing
    assert writable_path(str(nested)) == nested and nested.parent.is_dir()


def test_a_home_path_is_expanded_and_its_folders_made_there(tmp_path, monkeypatch):
    """``--json=~/runs/x.json`` reaches argparse unexpanded: it goes to the home folder, not ./~."""
    monkeypatch.setenv("HOME", str(tmp_path))
    check_output_files(argparse.ArgumentParser(), {"--json": "~/runs/x.json"})
    assert writable_path("~/runs/x.json") == tmp_path / "runs" / "x.json" and (tmp_path / "runs").is_dir()


def test_empty_paths_broken_links_and_link_loops_are_refused_not_raised(tmp_path, capsys):
    assert "--json: the path is empty" in refused({"--json": ""}, capsys)
    (tmp_path / "gone").symlink_to(tmp_path / "nowhere")
    assert "broken symbolic link" in refused({"--json": str(tmp_path / "gone" / "x.json")}, capsys)
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    assert "--markdown: cannot write" in refused({"--markdown": str(tmp_path / "loop" / "x.md")}, capsys)
    assert "--json: cannot write" in refused({"--json": str(tmp_path / ("x" * 300))}, capsys)
    assert "longer than" in refused({"--json": str(tmp_path / "a" / ("x" * 300) / "b.json")}, capsys)
    assert not (tmp_path / "a").exists()
    (tmp_path / "dangling.json").symlink_to(tmp_path / "nowhere" / "x.json")
    assert "broken symbolic link" in refused({"--json": str(tmp_path / "dangling.json")}, capsys)
    assert "NUL" in refused({"--json": str(tmp_path / "x\0.json")}, capsys)


def test_one_file_under_two_names_is_refused(tmp_path, capsys):
    (tmp_path / "run.json").write_text("")
    (tmp_path / "linked.json").hardlink_to(tmp_path / "run.json")
    err = refused({"--json": str(tmp_path / "run.json"), "--markdown": str(tmp_path / "linked.json")}, capsys)
    assert "also the file of --json" in err


def test_a_plot_format_that_needs_latex_is_refused(tmp_path, capsys):
    assert "does not end in a format" in refused({"--plot": str(tmp_path / "chart.pgf")}, capsys, plots=("--plot",))


def test_number_names_its_range():
    parse = number(int, 0)
    assert parse("3") == 3
    with pytest.raises(argparse.ArgumentTypeError, match=r"expected a value in \(0, inf\), got 0"):
        parse("0")


@pytest.mark.parametrize("text", ["inf", "Infinity", "nan", "-inf"])
def test_number_refuses_what_is_not_finite(text):
    """A learning rate, a weight decay or a clip norm of inf is no setting: it trains to NaN or crashes."""
    assert number(float, 0.0, low_open=False)("1e300") == 1e300
    with pytest.raises(argparse.ArgumentTypeError, match=rf"expected a value in \[0.0, inf\), got {text}"):
        number(float, 0.0, low_open=False)(text)
