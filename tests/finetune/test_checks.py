"""What ``python -m childopt finetune`` refuses before anything trains (a model folder without tokenizer or
weights, a --max-length beyond its positions, an --output folder of another configuration or that is a file,
numbers that are not finite, options --summarize would ignore), run names unique per learning rate, the
output folder's JSONs read with their file named, and ct-d on a model without "layer" in its names."""
import json
import re
import shutil

import pytest
import torch

from childopt.finetune import cli, heads, plan, summary
from tests.finetune.smoke import FIXTURE
from tests.finetune.test_cli import refused
from tests.finetune.tiny import POSITIONS

TINY = ["--task", "RTE", "--data-dir", str(FIXTURE), "--method", "adamw", "--train-size", "8", "--batch-size", "8",
        "--max-steps", "1", "--epochs", "1", "--max-length", "32"]


@pytest.fixture(scope="module")
def trained(models, tmp_path_factory):
    """An output folder holding one tiny adamw run on RTE (--epochs 1), trained in this process."""
    output = tmp_path_factory.mktemp("tiny-run")
    assert cli.main([*TINY, "--model", str(models["bert"]), "--output", str(output)]) == 0
    return output


def tiny_argv(models, output, *extra, model="bert") -> list:
    return [*TINY, "--model", str(models[model]), "--output", str(output), *extra]


@pytest.mark.parametrize("model, message", [
    ("notok", "its tokenizer has no vocabulary beyond its 5 special tokens"),
    ("noweights", "no weights there (one of model.safetensors"),
])
def test_a_model_folder_without_tokenizer_or_weights_is_refused_before_training(models, tmp_path, capsys, model,
                                                                                 message):
    """transformers builds an empty tokenizer silently: the run would train on [UNK] alone and exit 0."""
    assert cli.main(tiny_argv(models, tmp_path / "out", model=model)) == 2
    err = capsys.readouterr().err
    assert f"--model {models[model]}: {message}" in err, err
    assert not (tmp_path / "out").exists()


def test_a_max_length_beyond_the_models_positions_is_refused_before_training(models, tmp_path, capsys):
    assert cli.main(tiny_argv(models, tmp_path / "out", "--max-length", str(POSITIONS + 1))) == 2
    assert f"--max-length {POSITIONS + 1}: the model at {models['bert']} takes at most {POSITIONS} tokens" \
        in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_learning_rates_that_print_alike_get_runs_and_heads_reports_of_their_own(models, tmp_path):
    runs = plan.plan(cli.parse_args(tiny_argv(models, tmp_path, "--lr", "0.001", "0.0010000001", "2e-5")))
    assert [run.name for run in runs] == ["RTE-adamw-lr0.001-seed1", "RTE-adamw-lr0.0010000001-seed1",
                                          "RTE-adamw-lr2e-05-seed1"]  # ordinary values keep their names
    assert len({heads.report_dir(run) for run in runs}) == 3
    assert plan.format_lr(1.234567e-5) == "1.234567e-05" and plan.format_lr(3e-4) == "0.0003"


def test_a_folder_of_another_configuration_is_refused_before_training(models, trained, tmp_path, capsys):
    output = tmp_path / "out"
    shutil.copytree(trained, output)
    argv = tiny_argv(models, output, "--epochs", "2")
    argv[argv.index("--task") + 1] = "MRPC"
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "RTE-adamw-lr2e-05-seed1.json holds a run with another configuration (epochs: 1 there, 2 now)" in err, err
    assert sorted(path.name for path in output.glob("*.json")) == ["RTE-adamw-lr2e-05-seed1.json"]
    assert cli.main(tiny_argv(models, output, "--lr", "1e-4")) == 0  # another --lr is the folder's grid
    assert len(summary.load_records(str(output))) == 2


def test_an_output_that_is_a_file_is_refused(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("hello")
    err = refused([*TINY, "--output", str(tmp_path / "notes.txt")], capsys)
    assert f"--output {tmp_path / 'notes.txt'} is a file; pass a folder" in err


@pytest.mark.parametrize("flag, value", [("--lr", "inf"), ("--weight-decay", "inf"), ("--max-grad-norm", "inf"),
                                         ("--lr", "nan")])
def test_numbers_that_are_not_finite_are_refused_naming_the_flag(flag, value, capsys):
    assert f"argument {flag}: expected a value in" in refused([*TINY, flag, value], capsys)


def test_an_unreadable_run_json_is_named_and_other_json_files_are_left_alone(trained, tmp_path, capsys):
    shutil.copytree(trained, tmp_path, dirs_exist_ok=True)
    (tmp_path / "hparams-seed1.json").write_text('{"note": 1}')
    assert cli.main(["--summarize", "--output", str(tmp_path)]) == 0
    capsys.readouterr()
    run = tmp_path / "RTE-adamw-lr2e-05-seed1.json"
    text = run.read_text()
    run.write_text(text[:len(text) // 2])
    assert cli.main(["--summarize", "--output", str(tmp_path)]) == 2
    assert f"error: {run}: not a readable run JSON (" in capsys.readouterr().err
    run.unlink()
    (tmp_path / "RTE-adamw-lr1e-05-seed1.json").write_text(text)
    with pytest.raises(ValueError, match="holds run RTE-adamw-lr2e-05-seed1, not the run its name says; rename it"):
        summary.load_records(str(tmp_path))
    (tmp_path / "RTE-adamw-lr1e-05-seed1.json").unlink()
    (tmp_path / "RTE-adamw-seed1.json").write_text(text)  # named as before the lr grid (bench/results/glue)
    assert [record["seed"] for record in summary.load_records(str(tmp_path))] == [1]
    run.write_text(text)
    with pytest.raises(ValueError, match="RTE-adamw-seed1.json hold the same run RTE-adamw-lr2e-05-seed1; delete one"):
        summary.load_records(str(tmp_path))
    (tmp_path / "RTE-adamw-lr1e-05-seed1.json").write_text(json.dumps({"task": "RTE"}))
    with pytest.raises(ValueError, match=r"RTE-adamw-lr1e-05-seed1.json: not a run JSON \(no method, seed, config"):
        summary.load_records(str(tmp_path))


def test_a_run_named_as_before_the_lr_grid_is_done_at_its_lr(models, trained, tmp_path, capsys):
    """bench/results/glue names its JSONs <TASK>-<method>-seed<seed>.json: they resume, not rerun beside."""
    shutil.copy(trained / "RTE-adamw-lr2e-05-seed1.json", tmp_path / "RTE-adamw-seed1.json")
    assert cli.main(tiny_argv(models, tmp_path)) == 0
    assert "[RTE-adamw-lr2e-05-seed1] done already" in capsys.readouterr().out
    assert sorted(path.name for path in tmp_path.glob("*.json")) == ["RTE-adamw-seed1.json"]


def test_ct_d_masks_the_blocks_of_a_model_without_layer_in_its_names(models, tmp_path):
    """GPT-2 names its blocks transformer.h.N: ct-d masks those instead of failing in the Fisher pass."""
    argv = tiny_argv(models, tmp_path, model="gpt2")
    argv[argv.index("--method") + 1] = "ct-d"
    assert cli.main(argv) == 0
    mask = json.loads((tmp_path / "RTE-ct-d-lr2e-05-seed1.json").read_text())["mask"]
    assert mask["include"] == plan.MASK_INCLUDES[1] and mask["masked_params"] > 0 and mask["frozen_changed"] == 0


def test_a_model_whose_names_no_mask_pattern_matches_is_refused_for_ct_d(models, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(plan, "MASK_INCLUDES", ("no-such-name",))
    argv = tiny_argv(models, tmp_path / "out", "--method", "adamw", "sparse")
    assert cli.main(argv) == 2
    assert f"--model {models['bert']}: no parameter name matches 'no-such-name'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    assert plan.plan(cli.parse_args(tiny_argv(models, tmp_path / "out")))  # adamw alone needs no mask


def test_summarize_and_compare_heads_refuse_the_options_they_would_ignore(capsys):
    err = refused(["--summarize", "--task", "MRPC", "--method", "ct-d", "--lr", "5", "--output", "x"], capsys)
    assert "--summarize takes only --output; --task, --method, --lr would be ignored" in err
    assert "--compare-heads takes only --task, --seeds, --output; --model would be ignored" in refused(
        ["--compare-heads", "--task", "RTE", "--model", "m"], capsys)
    assert cli.parse_args(["--compare-heads", "--task", "RTE", "--seeds", "2", "--output", "x"]).seeds == [2]


def test_compare_heads_on_an_empty_folder_says_there_is_nothing_to_compare(tmp_path, capsys):
    assert cli.main(["--compare-heads", "--task", "RTE", "--output", str(tmp_path)]) == 2
    assert "no run JSONs (<TASK>-<method>-lr<lr>-seed<seed>.json) to compare heads of" in capsys.readouterr().err


def test_report_heads_on_a_model_of_unknown_head_layout_is_refused_before_training(models, tmp_path, capsys):
    """GPT-2's fused c_attn is no layout childopt.analysis splits into heads: refused, not a traceback mid-run."""
    assert cli.main(tiny_argv(models, tmp_path / "out", "--report-heads", model="gpt2")) == 2
    err = capsys.readouterr().err
    assert f"error: --report-heads: no heads report for the model at {models['gpt2']}: unknown architecture" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("names, layers", [
    (["bert.embeddings.LayerNorm.weight", "bert.encoder.layer.0.attention.self.query.weight"], [1]),
    (["model.embed_tokens.weight", "model.layers.0.input_layernorm.weight", "model.layers.0.mlp.up_proj.weight"],
     [1, 2]),
    (["transformer.h.0.input_layernorm.weight", "transformer.h.0.self_attention.query_key_value.weight",
      "transformer.ln_f.weight"], [0, 1]),  # Bloom / Falcon: no layers.N, but norms named *_layernorm
    (["transformer.wte.weight", "transformer.h.0.attn.c_attn.weight"], [1]),  # GPT-2
    (["encoder.block.0.layer.0.SelfAttention.q.weight", "shared.weight"], [0]),  # T5
])
def test_the_mask_pattern_names_the_transformer_blocks(names, layers):
    include = plan.mask_include(names)
    assert [i for i, name in enumerate(names) if re.search(include, name)] == layers


@pytest.mark.parametrize("corrupt", [
    lambda record: record["config"].update(lr=None),
    lambda record: record["config"].update(lr="abc"),
    lambda record: record["config"].update(lr=float("nan")),
    lambda record: record.update(dev=5),
    lambda record: record.update(history="x"),
])
def test_a_run_json_with_fields_of_the_wrong_type_is_named(trained, tmp_path, corrupt):
    """Not counted as done and then crashing the summary: named as not a run JSON."""
    shutil.copytree(trained, tmp_path, dirs_exist_ok=True)
    run = tmp_path / "RTE-adamw-lr2e-05-seed1.json"
    record = json.loads(run.read_text())
    corrupt(record)
    run.write_text(json.dumps(record))
    with pytest.raises(ValueError, match=r"RTE-adamw-lr2e-05-seed1.json: not a run JSON \(no well-typed"):
        summary.load_records(str(tmp_path))


def test_a_run_json_nested_too_deep_to_read_is_named(trained, tmp_path):
    shutil.copytree(trained, tmp_path, dirs_exist_ok=True)
    (tmp_path / "RTE-adamw-lr2e-05-seed1.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ValueError, match="RTE-adamw-lr2e-05-seed1.json: not a readable run JSON"):
        summary.load_records(str(tmp_path))


def _truncate(path):
    path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])


def _as_bin(folder):
    """The folder's weights as pytorch_model.bin (torch.save of the state dict) instead of model.safetensors."""
    from safetensors.torch import load_file

    torch.save(load_file(folder / "model.safetensors"), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()


def _missing_shard(folder):
    (folder / "model.safetensors").unlink()
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {"bert.pooler.dense.bias": "model-00001-of-00002.safetensors"}}))


@pytest.mark.parametrize("damage, name, problem", [
    (lambda folder: _truncate(folder / "model.safetensors"), "model.safetensors",
     "is not a readable safetensors file (Error while deserializing header"),
    (lambda folder: (_as_bin(folder), _truncate(folder / "pytorch_model.bin")), "pytorch_model.bin",
     "is a truncated or corrupt torch file"),
    (lambda folder: (_as_bin(folder), (folder / "pytorch_model.bin").write_bytes(b"garbage" * 100)),
     "pytorch_model.bin", "is not a torch file"),
    (_missing_shard, "model-00001-of-00002.safetensors", "is missing"),
])
def test_corrupt_or_truncated_weights_are_refused_naming_the_file_before_training(models, tmp_path, capsys, damage,
                                                                                 name, problem):
    """Not a traceback out of from_pretrained once the run starts."""
    folder = shutil.copytree(models["bert"], tmp_path / "model")
    damage(folder)
    argv = [*TINY, "--model", str(folder), "--output", str(tmp_path / "out")]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert f"error: --model {folder}: the weights file {name} {problem}" in err, err
    assert not (tmp_path / "out").exists()


def test_whole_torch_weights_pass_the_check_and_load(models, tmp_path):
    from transformers import AutoModelForSequenceClassification

    folder = shutil.copytree(models["bert"], tmp_path / "model")
    _as_bin(folder)
    plan.check_weights(folder)
    loaded = AutoModelForSequenceClassification.from_pretrained(folder, local_files_only=True)
    assert loaded.bert.pooler.dense.bias.shape == (16,)
