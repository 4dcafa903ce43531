"""childopt.bench.distributed under torchrun: its rows exist and meet issue #16's memory and byte goals.

Timing is reported, never asserted; the state per rank and the bytes are counts, so they are.
"""
import json

import pytest
import torch

from tests.helpers import torchrun

pytestmark = pytest.mark.skipif(not torch.distributed.is_gloo_available(), reason="needs gloo")


def test_two_ranks_hold_half_the_state_and_the_hook_sends_reserve_p_of_the_bytes(tmp_path):
    out = tmp_path / "rows.json"
    stdout = torchrun(2, "-m", "childopt.bench.distributed", "--steps", "1", "--warmup", "0", "--json", str(out))
    report = json.loads(out.read_text())
    assert {row["mode"] for row in report["rows"]} == {"dense 0.3 freeze", "bernoulli 0.3", "sparse 0.3"}
    for row in report["rows"]:
        assert len(row["state_bytes_per_rank"]) == 2 and row["sharded_step_ms"] > 0
        assert max(row["state_bytes_per_rank"]) <= 1.01 * row["one_process_state_bytes"] / 2  # the goal
        assert set(row["one_process_step_ms"]) == {"1", "2"}
    ddp = report["ddp"]
    assert ddp["ratio"] <= ddp["reserve_p"] * 1.01 and ddp["child_hook_bytes"] > 0
    assert "| dense 0.3 freeze | 2 |" in stdout


def test_bad_arguments_are_refused_before_a_process_group_naming_the_command(tmp_path, capsys):
    from childopt.bench import distributed

    for argv, expected in ((["--steps", "0"], "--steps must be >= 1"),
                           (["--json", str(tmp_path) + "/"], "ends in a slash")):
        with pytest.raises(SystemExit) as exited:
            distributed.main(argv)
        err = capsys.readouterr().err
        assert exited.value.code == 2 and expected in err
        assert err.startswith("usage: torchrun --nproc_per_node N -m childopt.bench.distributed")
