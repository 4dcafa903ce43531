"""``python -m childopt memory`` end to end on a local config, and its errors."""
import json

import pytest

from childopt.__main__ import main

pytestmark = pytest.mark.usefixtures("native_kernels")

CONFIG = {"model_type": "bert", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
          "intermediate_size": 128, "vocab_size": 1000, "max_position_embeddings": 64}


def test_plans_measures_plots_and_writes_json(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps(CONFIG))
    plot, record = tmp_path / "memory.png", tmp_path / "new" / "memory.json"  # its folder is made
    code = main(["memory", "--model", str(tmp_path), "--method", "full", "sparse-compact", "lora", "adamw-8bit",
                 "--batch-size", "2", "--seq-len", "32", "--measure", "--plot", str(plot), "--json", str(record)])
    out = capsys.readouterr().out
    assert code == 0
    assert "batch 2 x 32 tokens" in out and "planned/measured" in out
    assert "adamw-8bit *" in out and "bitsandbytes" in out  # modeled, and said so
    data = json.loads(record.read_text())
    plans = {p["method"]: p for p in data["plans"]}
    assert set(plans) == {"full", "sparse-compact", "lora", "adamw-8bit"}
    assert set(data["measured"]) == {"full", "sparse-compact", "lora"}  # 8-bit needs bitsandbytes on CUDA
    for name, measured in data["measured"].items():
        assert plans[name]["total"] == pytest.approx(measured["total"], rel=0.15)
    assert plans["lora"]["total"] < plans["full"]["total"]
    assert plot.stat().st_size > 10_000


@pytest.mark.parametrize("argv, message", [
    (["--model", "gpt-5"], "preset"),
    (["--model", "llama-7b", "--method", "sparse-compact", "--world-size", "8"],
     "--method sparse-compact cannot be planned with --world-size 8 (FSDP2): compact_grads=True"),
])
def test_errors_are_one_line_and_exit_2(argv, message, capsys):
    assert main(["memory", *argv]) == 2
    err = capsys.readouterr().err
    assert "error:" in err and message in err


def test_bad_numbers_are_refused_by_argparse(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["memory", "--model", "roberta-base", "--reserve-p", "1.5"])
    assert exc.value.code == 2
    assert "--reserve-p" in capsys.readouterr().err


def test_measure_with_a_world_size_is_refused_before_any_tracing(capsys):
    assert main(["memory", "--model", "llama-7b", "--measure", "--world-size", "2"]) == 2
    assert "--measure runs one CPU process" in capsys.readouterr().err


def test_an_output_it_could_not_write_is_refused_before_any_tracing(tmp_path, capsys, monkeypatch):
    from childopt.memory import cli

    monkeypatch.setattr(cli, "plan", lambda *a, **k: pytest.fail("traced before refusing --json"))
    with pytest.raises(SystemExit) as exc:
        main(["memory", "--model", "roberta-base", "--json", str(tmp_path)])
    assert exc.value.code == 2 and "--json: " in capsys.readouterr().err


def test_world_size_plans_by_default_every_method_fsdp2_runs(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps(CONFIG))
    assert main(["memory", "--model", str(tmp_path), "--batch-size", "2", "--seq-len", "16", "--world-size", "2"]) == 0
    rows = [line.split()[0] for line in capsys.readouterr().out.splitlines()[3:] if not line.startswith(" ")]
    assert rows == ["full", "ct-f", "ct-d", "sparse", "lora"]  # not importance: MaskedAdamW refuses DTensors


def test_methods_fsdp2_refuses_are_refused_before_any_tracing(capsys, monkeypatch):
    from childopt.memory import cli

    monkeypatch.setattr(cli, "plan", lambda *a, **k: pytest.fail("traced before refusing the method"))
    assert main(["memory", "--model", "llama-7b", "--method", "full", "adamw-8bit", "--world-size", "2"]) == 2
    err = capsys.readouterr().err
    assert "--method adamw-8bit cannot be planned with --world-size 2 (FSDP2): bitsandbytes" in err


def test_a_sequence_longer_than_the_position_table_names_the_flag(tmp_path, capsys, monkeypatch):
    from childopt.memory import cli

    (tmp_path / "config.json").write_text(json.dumps(CONFIG))
    monkeypatch.setattr(cli, "plan", lambda *a, **k: pytest.fail("traced before refusing --seq-len"))
    assert main(["memory", "--model", str(tmp_path), "--seq-len", "65"]) == 2
    assert "error: --seq-len 65 is longer than the model's learned position table (64 positions)" in \
        capsys.readouterr().err


@pytest.mark.parametrize("methods, lora", [(["full"], False), (["full", "lora"], True), (["lora", "full"], True)])
def test_title_counts_small_models_in_thousands_and_names_the_lora_rank_only_for_lora(tmp_path, capsys, methods,
                                                                                      lora):
    """The base model's parameters, whichever method comes first (not LoRA's adapters)."""
    import torch

    from childopt.memory.models import architecture, build

    (tmp_path / "config.json").write_text(json.dumps(CONFIG))
    n = sum(p.numel() for p in build(architecture(str(tmp_path)), torch.float32).parameters())
    assert main(["memory", "--model", str(tmp_path), "--method", *methods, "--batch-size", "1", "--seq-len", "8",
                 "--lora-rank", "4"]) == 0
    title = capsys.readouterr().out.splitlines()[0]
    assert f"({n / 1000:,.1f}K parameters)" in title
    assert ("LoRA rank 4" in title) == lora


PHI3 = {"model_type": "phi3", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "intermediate_size": 96, "vocab_size": 500, "max_position_embeddings": 64,
        "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}  # peft has no default LoRA targets for phi3


def _stub_plans(monkeypatch, arch, setting) -> list:
    """cli.plan answering with one real plan renamed; the names it was asked for."""
    import dataclasses

    from childopt.memory import cli, plan

    full, asked = plan(arch, "full", setting), []
    monkeypatch.setattr(cli, "plan", lambda a, name, s: asked.append(name) or dataclasses.replace(full, method=name))
    return asked


def test_lora_without_peft_defaults_is_left_out_of_the_default_methods_with_a_note(tmp_path, capsys, monkeypatch):
    import peft

    from childopt.memory import METHODS, Setting
    from childopt.memory.models import architecture, build

    (tmp_path / "config.json").write_text(json.dumps(PHI3))
    arch = architecture(str(tmp_path))
    with pytest.raises(ValueError):  # the oracle: peft itself refuses the model without target_modules
        peft.get_peft_model(build(arch, __import__("torch").float32), peft.LoraConfig(r=8, task_type="CAUSAL_LM"))
    asked = _stub_plans(monkeypatch, arch, Setting(batch_size=1, seq_len=8))
    assert main(["memory", "--model", str(tmp_path), "--batch-size", "1", "--seq-len", "8"]) == 0
    captured = capsys.readouterr()
    assert asked == [name for name in METHODS if name != "lora"]
    assert "note: lora left out: method 'lora': peft" in captured.err and "'phi3'" in captured.err
    assert "vs full" in captured.out


def test_lora_without_peft_defaults_named_by_method_is_refused_before_any_tracing(tmp_path, capsys, monkeypatch):
    from childopt.memory import cli

    (tmp_path / "config.json").write_text(json.dumps(PHI3))
    monkeypatch.setattr(cli, "plan", lambda *a, **k: pytest.fail("traced before refusing lora"))
    assert main(["memory", "--model", str(tmp_path), "--method", "full", "lora"]) == 2
    err = capsys.readouterr().err
    assert "error: method 'lora': peft" in err and "leave lora out of --method" in err


def test_measure_is_refused_when_the_plan_is_above_the_available_memory(tmp_path, capsys, monkeypatch):
    from childopt.memory import Setting, plan, validate
    from childopt.memory.models import architecture

    (tmp_path / "config.json").write_text(json.dumps(CONFIG))
    planned = plan(architecture(str(tmp_path)), "full", Setting(batch_size=2, seq_len=16)).total
    monkeypatch.setattr(validate, "available_memory", lambda: (planned - 1, "a test"))
    monkeypatch.setattr(validate, "measure", lambda *a, **k: pytest.fail("measured above the available memory"))
    assert main(["memory", "--model", str(tmp_path), "--method", "full", "adamw-8bit", "--batch-size", "2",
                 "--seq-len", "16", "--measure"]) == 2
    captured = capsys.readouterr()
    assert [line.split()[0] for line in captured.out.splitlines()[3:5]] == ["full", "adamw-8bit"]  # plans kept
    assert (f"error: --measure would allocate {planned / 1e6:,.3f} MB (the planned peak of full) but "
            f"{(planned - 1) / 1e6:,.3f} MB is available (a test)") in captured.err


def test_a_failed_measurement_leaves_the_plans_printed(tmp_path, capsys, monkeypatch):
    from childopt.memory import validate

    def fail(*args, **kwargs):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory")

    (tmp_path / "config.json").write_text(json.dumps(CONFIG))
    monkeypatch.setattr(validate, "measure", fail)
    assert main(["memory", "--model", str(tmp_path), "--method", "full", "--batch-size", "2", "--seq-len", "16",
                 "--measure"]) == 2
    captured = capsys.readouterr()
    assert captured.out.splitlines()[3].split()[0] == "full"
    assert "error: DefaultCPUAllocator: can't allocate memory" in captured.err


def test_available_memory_is_the_kernels_mem_available(monkeypatch):
    """psutil's reading, and without psutil /proc/meminfo's, against MemAvailable read here."""
    import sys

    from childopt.memory.validate import available_memory

    try:
        with open("/proc/meminfo") as f:
            expected = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except OSError:
        pytest.skip("no /proc/meminfo")
    readings = [available_memory()]
    monkeypatch.setitem(sys.modules, "psutil", None)  # import psutil fails
    readings.append(available_memory())
    assert readings[1][1] == "MemAvailable in /proc/meminfo"
    for found, _ in readings:
        assert found == pytest.approx(expected, rel=0.1)  # other processes allocate between the readings


@pytest.mark.parametrize("content, message", [
    (None, "holds a JSON NoneType"),
    (dict(CONFIG, hidden_size="64"), "'hidden_size' expected int"),
    (dict(CONFIG, vocab_size=0), "vocab_size must be a positive int"),
])
def test_bad_config_files_are_one_error_line_not_a_traceback(tmp_path, capsys, content, message):
    (tmp_path / "config.json").write_text(json.dumps(content))
    assert main(["memory", "--model", str(tmp_path), "--method", "full"]) == 2  # no exception escapes
    err = capsys.readouterr().err
    assert f"error: model: {tmp_path / 'config.json'}" in err and message in err
