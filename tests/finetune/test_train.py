"""One run of every method on real GLUE rows: sane JSON fields, fixed masks that leave masked-out
weights bit-identical to the pretrained ones, sparse storage on ct-d's trajectory with less state,
and a run that repeats per seed, with or without its heads report."""
import pytest

from childopt import backends
from childopt.finetune import cli, plan, train
from tests.finetune.smoke import SMOKE, load_record


@pytest.mark.parametrize("method", plan.METHODS)
def test_smoke_run_writes_a_json_with_sane_fields(smoke, method):
    record = load_record(smoke, method)
    assert (record["task"], record["method"], record["seed"], record["steps"]) == ("RTE", method, 1, 3)
    assert record["config"]["max_steps"] == 3 and record["config"]["reserve_p"] == 0.3
    assert record["data"] == {"train_rows": 24, "dev_rows": 20, "steps_per_epoch": 3}  # --train-size 24
    assert [h["step"] for h in record["history"]] == [0, 3]
    assert 0 <= record["dev"]["accuracy"] <= 1 and record["history"][-1]["train_loss"] > 0
    assert record["it_s"] > 0 and 0 < record["peak_gb"] < 64 and record["state_gb"] > 0
    assert record["backend"] == "torch" if method in ("adamw", "lora") else record["backend"] in backends.MODULES
    assert record["env"]["torch"] and record["env"]["transformers"] and "git_commit" in record["env"]


@pytest.mark.parametrize("method", plan.MASK_METHODS)
def test_fixed_masks_leave_masked_out_weights_bit_identical(smoke, method):
    mask = load_record(smoke, method)["mask"]
    assert mask["frozen_changed"] == 0
    assert mask["kept_fraction"] == pytest.approx(0.3, abs=1e-6)
    assert mask["masked_params"] > 10_000_000  # the encoder layers ("layer" in the name)


def test_sparse_storage_follows_ct_d_with_less_state(smoke):
    dense, sparse = load_record(smoke, "ct-d"), load_record(smoke, "sparse")
    assert [h["train_loss"] for h in sparse["history"]] == [h["train_loss"] for h in dense["history"]]
    assert sparse["dev"] == dense["dev"]
    assert sparse["state_gb"] < dense["state_gb"]


def test_training_subsets_are_drawn_with_the_seed():
    rows = list(range(100))
    first = train.training_subset(rows, 30, seed=1)
    assert first == train.training_subset(rows, 30, seed=1) and first == sorted(set(first)) and len(first) == 30
    assert first != train.training_subset(rows, 30, seed=2)
    assert train.training_subset(rows, None, seed=1) is rows


@pytest.mark.parametrize("method", ["ct-f", "lora"])
def test_a_run_is_deterministic_per_seed(smoke, tmp_path, method):
    """The same seed in this process (one run is not spawned) repeats the child process's run, which wrote
    a heads report: the report's Fisher pass changes nothing, not even LoRA's initialisation."""
    assert cli.main([*SMOKE, "--method", method, "--output", str(tmp_path)]) == 0
    again, first = load_record(tmp_path, method), load_record(smoke, method)
    assert again["history"][-1]["train_loss"] == first["history"][-1]["train_loss"]
    assert again["dev"] == first["dev"]
