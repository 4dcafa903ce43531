"""``python -m childopt finetune``: clear errors for bad arguments, a missing model or bad data, and the dispatch."""
import pytest

from childopt.finetune import cli
from tests.finetune.smoke import FIXTURE, SMOKE


def test_missing_model_directory_says_what_to_pass(tmp_path, capsys):
    assert cli.main([*SMOKE, "--model", str(tmp_path / "nowhere"), "--output", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "--model" in err and "no config.json" in err and "local Hugging Face model directory" in err


def test_missing_data_directory_says_what_to_pass(tmp_path, capsys):
    args = [*SMOKE, "--output", str(tmp_path / "out")]
    args[args.index("--data-dir") + 1] = str(tmp_path)
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert f"--data-dir {tmp_path}" in err and "RTE/train.tsv" in err and "DIR/RTE/dev.tsv" in err


def test_malformed_data_is_reported_with_file_and_line_before_training(tmp_path, capsys):
    for split in ("train", "dev"):
        (tmp_path / "RTE").mkdir(exist_ok=True)
        text = (FIXTURE / "RTE" / f"{split}.tsv").read_text()
        (tmp_path / "RTE" / f"{split}.tsv").write_text(text.replace("\tentailment\n", "\tyes\n", 1))
    args = [*SMOKE, "--output", str(tmp_path / "out")]
    args[args.index("--data-dir") + 1] = str(tmp_path)
    assert cli.main(args) == 2
    assert f"error: {tmp_path / 'RTE' / 'train.tsv'}:" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def refused(argv, capsys) -> str:
    """What ``parse_args(argv)`` writes to stderr as it exits with argparse's usage-error status 2."""
    with pytest.raises(SystemExit) as exited:
        cli.parse_args(argv)
    assert exited.value.code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["--reserve-p", "0"], "--reserve-p: expected a value in (0.0, 1.0], got 0"),
    (["--epochs", "two"], "--epochs: expected an integer, got 'two'"),
    (["--task", "QNLI"], "--task: unknown GLUE task 'QNLI'"),
    (["--method", "sgd"], "--method: invalid choice: 'sgd'"),
])
def test_bad_arguments_are_named(args, message, capsys):
    assert message in refused([*SMOKE, *args], capsys)


def test_task_and_data_dir_are_required_unless_summarizing(capsys):
    assert "--task is required" in refused(["--data-dir", "x"], capsys)
    assert "--data-dir is required" in refused(["--task", "RTE"], capsys)
    assert cli.parse_args(["--summarize", "--output", "x"]).summarize


def test_python_m_childopt_dispatches_to_finetune(smoke, capsys):
    from childopt.__main__ import main

    assert main(["finetune", "--summarize", "--output", str(smoke)]) == 0
    assert "| RTE | sparse | 2e-05 | 1 |" in capsys.readouterr().out
