"""The summary: a table row per method and a plot, each run's fastest epoch, every commit and version
named, and one configuration per directory."""
import json

import pytest

from childopt.finetune import plan, summary
from tests.finetune.smoke import load_record


def test_smoke_summary_has_a_row_per_method_and_a_plot(smoke):
    table = (smoke / summary.TABLE_NAME).read_text()
    for method in plan.METHODS:
        assert f"| RTE | {method} | 2e-05 | 1 |" in table
    assert (smoke / summary.PLOT_NAME).stat().st_size > 0


def test_summarize_refuses_mixed_configurations(smoke, tmp_path):
    for method, epochs in (("adamw", 3), ("ct-f", 4)):
        record = load_record(smoke, method)
        record["config"]["epochs"] = epochs
        (tmp_path / f"RTE-{method}-lr2e-05-seed1.json").write_text(json.dumps(record))
    with pytest.raises(ValueError, match="mixes configurations"):
        summary.summarize(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="no run JSONs"):
        summary.summarize(str(tmp_path / "empty"))


def test_each_method_is_reported_at_its_best_learning_rate():
    """Per (task, method) the lr with the best mean dev headline over seeds, whatever the others do."""
    def run(method, lr, seed, accuracy):
        return {"task": "RTE", "method": method, "seed": seed, "config": {"lr": lr}, "dev": {"accuracy": accuracy},
                "history": [{"epoch": 1.0, "it_s": 1.0}], "peak_gb": 1.0, "state_gb": 0.1}

    runs = [run("adamw", 1e-5, 1, 0.50), run("adamw", 1e-5, 2, 0.60), run("adamw", 5e-5, 1, 0.58),
            run("adamw", 5e-5, 2, 0.54), run("ct-i", 1e-5, 1, 0.70), run("ct-i", 5e-5, 1, 0.60)]
    rows = summary.summary_table(runs).splitlines()[2:]
    assert rows[0].startswith("| RTE | adamw | 5e-05 | 2 | 0.5600 ± 0.0283 |"), rows[0]
    assert rows[1].startswith("| RTE | ct-i | 1e-05 | 1 | 0.7000 |") and "| +0.1400 |" in rows[1], rows[1]


def test_the_table_reports_each_runs_fastest_epoch():
    """On a shared machine slow epochs time the neighbours: the table takes each run's fastest, mean over seeds."""
    history = [{"epoch": 0.0, "it_s": None}, {"epoch": 1.0, "it_s": 2.0}, {"epoch": 2.0, "it_s": 3.0},
               {"epoch": 3.0, "it_s": 1.0}]
    assert summary.fastest_epoch({"history": history}) == 3.0
    runs = [{"task": "RTE", "method": "adamw", "seed": seed, "config": {"lr": 2e-5}, "dev": {"accuracy": 0.5},
             "history": history[:k],
             "peak_gb": 1.0, "state_gb": 0.1, "it_s": 0.5} for seed, k in ((1, 4), (2, 2))]
    row = summary.summary_table(runs).splitlines()[-1]
    assert "| 2.50 |" in row, row


def test_the_description_names_every_commit_and_version_in_the_table(smoke):
    """A table built over several sessions must not credit all its runs to the first run's commit."""
    first = load_record(smoke, "adamw")
    first["env"]["git_commit"] = "a" * 40 + " + uncommitted changes"
    later = json.loads(json.dumps(first))
    later["env"].update(git_commit="f" * 40, torch="9.9.9")
    text = summary.describe([first, later, first])
    assert "childopt commit aaaaaaaaaa + uncommitted changes, ffffffffff." in text
    assert f"torch {first['env']['torch']}, 9.9.9," in text
