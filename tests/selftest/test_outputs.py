"""``selftest --out DIR``: it removes only the files an earlier run's selftest.json lists, follows no
symbolic link, and refuses, before writing anything, an --out that holds something no selftest
wrote at a name it writes (a user's file, a folder, a link).

The runs here have a single, made-up lane step, so each takes milliseconds."""
import json
import re

import pytest

from childopt.selftest import cli, main, outputs, report
from childopt.selftest.verdict import PASSED, StepResult

USERS = {"bench.json": '{"my": "results"}\n', "bench.md": "# my bench notes\n", "build.log": "my make output\n",
         "sanitizer/asan-run.log": "my ASan log\n", "notes.txt": "kept\n"}
MEMCHECK_LOG = "sanitizer/memcheck-native-fisher_accumulate.log"


def fake_lane(ctx):
    ctx.log("lane").write_text("ran\n")
    (ctx.out / "lane.xml").write_text("<testsuites/>\n")
    return StepResult("lane", PASSED, "made up", log="lane.log")


@pytest.fixture
def one_lane(monkeypatch):
    monkeypatch.setattr(cli, "STEPS", (("lane", "a made-up lane", fake_lane),))


def write(folder, files: dict) -> None:
    for name, text in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)


def earlier_report(out, listed, command="python -m childopt selftest --cpu-only") -> None:
    (out / "selftest.json").write_text(json.dumps({"command": command, "finished": True, "outputs": listed}))


def refused(capsys, *argv) -> str:
    """The usage error of ``parse_args(argv)`` (exit 2)."""
    with pytest.raises(SystemExit) as exit_info:
        cli.parse_args(list(argv))
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def test_a_folder_no_selftest_wrote_keeps_the_users_own_files(tmp_path, one_lane, capsys):
    """``bench --json bench.json`` then ``selftest --out .``: nothing the user wrote goes."""
    write(tmp_path, USERS)
    (tmp_path / "build.log").chmod(0o444)
    assert main(["--cpu-only", "--out", str(tmp_path)]) == 0
    assert {name: (tmp_path / name).read_text() for name in USERS} == USERS


@pytest.mark.parametrize("name,text", [
    ("environment.log", "my env dump\n"),
    ("lane.xml", "<my-results/>\n"),
    ("selftest.json", '{"my": "report"}\n'),   # not a selftest report: no command of the selftest
    ("selftest.json", "not json\n"),
    ("selftest.md", "# my notes\n"),
])
def test_a_users_file_at_a_name_the_run_writes_is_refused_before_anything_is_written(tmp_path, capsys, name, text):
    write(tmp_path, {name: text})
    err = refused(capsys, "--cpu-only", "--out", str(tmp_path))
    assert re.search(f"--out {re.escape(str(tmp_path))}: '{re.escape(str(tmp_path / name))}' exists and no earlier "
                     "selftest run wrote it", err), err
    assert sorted(p.name for p in tmp_path.iterdir()) == [name] and (tmp_path / name).read_text() == text


def test_an_earlier_runs_listed_files_are_removed_and_nothing_else(tmp_path):
    """A reused --out: an earlier GPU run's bench.json, build.log, lane.xml and sanitizer logs must
    not sit beside a verdict that skipped those steps; what it does not list stays, as does a listed
    name no selftest writes."""
    listed = ["selftest.json", "selftest.md", "bench.json", "bench.md", "build.log", "lane.xml", "lane.log",
              "memcheck.log", MEMCHECK_LOG]
    write(tmp_path, {name: "from an earlier run\n" for name in listed[1:]})
    write(tmp_path, {"sanitizer/asan-run.log": "mine\n", "notes.txt": "mine\n", "cuda-tests.xml": "mine\n"})
    earlier_report(tmp_path, listed + ["notes.txt", "../outside.txt", str(tmp_path / "notes.txt")])
    (tmp_path.parent / "outside.txt").write_text("mine\n")
    ctx = cli.make_context(cli.parse_args(["--cpu-only", "--out", str(tmp_path)]))
    cli.clear_earlier_outputs(ctx)
    assert [name for name in listed[2:] if (tmp_path / name).exists()] == []
    assert all((tmp_path / name).read_text() == "mine\n"
               for name in ("sanitizer/asan-run.log", "notes.txt", "cuda-tests.xml", "../outside.txt"))


def test_a_report_that_lists_nothing_vouches_only_for_the_reports(tmp_path, capsys):
    """A selftest.json of an older version (no ``outputs``) proves only that the reports are its."""
    write(tmp_path, {"selftest.md": "# childopt selftest\n"})
    (tmp_path / "selftest.json").write_text(json.dumps({"command": "python -m childopt selftest"}))
    assert outputs.vouched(tmp_path) == ["selftest.json", "selftest.md"]
    cli.parse_args(["--cpu-only", "--out", str(tmp_path)])  # not refused
    write(tmp_path, {"lane.log": "whose?\n"})
    assert "lane.log' exists and the selftest.json there does not list it (an older childopt's report lists no " \
           "files)" in refused(capsys, "--cpu-only", "--out", str(tmp_path))


def test_the_reports_list_the_runs_files_so_the_next_run_removes_exactly_those(tmp_path, monkeypatch):
    def interrupted(ctx):
        fake_lane(ctx)
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "STEPS", (("lane", "a lane stopped by Ctrl-C", interrupted),))
    with pytest.raises(KeyboardInterrupt):
        main(["--cpu-only", "--out", str(tmp_path)])
    note = json.loads((tmp_path / "selftest.json").read_text())
    assert note["finished"] is False
    assert {"selftest.json", "selftest.md", "lane.log", "lane.xml"} <= set(note["outputs"])
    monkeypatch.setattr(cli, "STEPS", (("lane", "a made-up lane", fake_lane),))
    assert main(["--cpu-only", "--out", str(tmp_path)]) == 0  # the stopped run's files are its own: not refused
    assert (tmp_path / "lane.log").read_text() == "ran\n"  # replaced, not appended to
    done = json.loads((tmp_path / "selftest.json").read_text())
    files = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file())
    assert sorted(done["outputs"]) == files == ["lane.log", "lane.xml", "selftest.json", "selftest.md"]


def test_a_sanitizer_link_is_not_followed_when_removing(tmp_path, one_lane):
    """An earlier GPU run's sanitizer logs are listed; the folder is now a link to logs elsewhere."""
    elsewhere = tmp_path / "var-log"
    write(elsewhere, {"server.log": "a week of logs\n", MEMCHECK_LOG.split("/")[1]: "not the selftest's\n"})
    out = tmp_path / "out"
    out.mkdir()
    (out / "sanitizer").symlink_to(elsewhere)
    earlier_report(out, ["selftest.json", MEMCHECK_LOG])
    assert main(["--cpu-only", "--out", str(out)]) == 0
    assert sorted(p.name for p in elsewhere.iterdir()) == ["memcheck-native-fisher_accumulate.log", "server.log"]


def test_a_sanitizer_link_is_refused_where_the_run_writes_sanitizer_logs(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(cli, "no_gpu_reason", lambda cpu_only: "")  # a GPU run: the sanitizer steps write logs
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "sanitizer").symlink_to(tmp_path / "elsewhere")
    err = refused(capsys, "--out", str(tmp_path / "out"))
    assert f"'{tmp_path / 'out' / 'sanitizer'}' is a symbolic link" in err and "--out" in err


@pytest.mark.parametrize("name", ["selftest.md", "selftest.json", "lane.log"])
def test_an_output_that_is_a_symbolic_link_is_refused_and_its_target_kept(tmp_path, capsys, name):
    (tmp_path / "NOTES.md").write_text("my notes\n")
    out = tmp_path / "out"
    out.mkdir()
    if name != "selftest.json":  # listed by an earlier run: a link is still not its file
        earlier_report(out, ["selftest.json", "selftest.md", "lane.log"])
    (out / name).symlink_to(tmp_path / "NOTES.md")
    err = refused(capsys, "--cpu-only", "--out", str(out))
    assert f"--out {out}: '{out / name}' is a symbolic link (to '{tmp_path / 'NOTES.md'}')" in err
    assert (tmp_path / "NOTES.md").read_text() == "my notes\n" and (out / name).is_symlink()


def test_a_report_is_never_written_through_a_link(tmp_path):
    """Should a link appear after parse_args, the report replaces it: the file it names stays."""
    (tmp_path / "NOTES.md").write_text("my notes\n")
    (tmp_path / "selftest.md").symlink_to(tmp_path / "NOTES.md")
    report._write(tmp_path / "selftest.md", "the report\n")
    assert (tmp_path / "NOTES.md").read_text() == "my notes\n"
    assert not (tmp_path / "selftest.md").is_symlink() and (tmp_path / "selftest.md").read_text() == "the report\n"


@pytest.mark.parametrize("name", ["lane.xml", "selftest.json", "environment.log"])
def test_a_folder_named_like_an_output_is_a_usage_error_before_anything_is_written(tmp_path, capsys, name):
    (tmp_path / name).mkdir()
    err = refused(capsys, "--cpu-only", "--out", str(tmp_path))
    assert f"--out {tmp_path}: '{tmp_path / name}' is a folder" in err and "Traceback" not in err
    assert [p.name for p in tmp_path.iterdir()] == [name]


def test_every_step_log_is_a_name_the_run_may_write():
    assert {f"{name}.log" for name, _, _ in cli.STEPS} <= set(outputs.planned(gpu=True))


def test_remove_takes_only_regular_files_reached_through_no_link(tmp_path):
    """remove() guards on its own (clear_earlier_outputs hands it a report's list unfiltered): a
    listed name behind a linked folder, a link and a folder all stay."""
    elsewhere = tmp_path / "elsewhere"
    write(elsewhere, {MEMCHECK_LOG.split("/")[1]: "not the selftest's\n", "target.log": "kept\n"})
    out = tmp_path / "out"
    write(out, {"lane.log": "the selftest's\n"})
    (out / "sanitizer").symlink_to(elsewhere)
    (out / "lane.xml").symlink_to(elsewhere / "target.log")
    (out / "environment.log").mkdir()
    outputs.remove(out, [MEMCHECK_LOG, "lane.xml", "environment.log", "lane.log"])
    assert sorted(p.name for p in elsewhere.iterdir()) == [MEMCHECK_LOG.split("/")[1], "target.log"]
    assert (out / "lane.xml").is_symlink() and (out / "environment.log").is_dir()
    assert not (out / "lane.log").exists()


def test_an_unreadably_deep_report_vouches_for_nothing(tmp_path):
    (tmp_path / "selftest.json").write_text("[" * 200000)
    assert outputs.vouched(tmp_path) == []


def test_an_earlier_file_that_cannot_be_removed_is_one_error_line(tmp_path, one_lane, capsys, monkeypatch):
    """A read-only mount or another user's folder: exit 2 naming the file, no traceback."""
    write(tmp_path, {"lane.log": "from an earlier run\n"})
    earlier_report(tmp_path, ["selftest.json", "lane.log"])

    def refuse(out, names):
        raise PermissionError(13, "Permission denied", str(out / names[0]))

    monkeypatch.setattr(outputs, "remove", refuse)
    assert main(["--cpu-only", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert f"cannot remove {tmp_path / 'lane.log'}, which an earlier run wrote (Permission denied)" in err
    assert "Traceback" not in err
