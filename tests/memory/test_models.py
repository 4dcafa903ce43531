"""Presets, local configs and the errors for bad ones."""
import json

import pytest
import torch

from childopt.memory.models import PRESETS, architecture, build, layer_blocks

# Published parameter counts of the models the presets describe, with the head the planner uses.
# Encoders: the base model's count (pooler included) minus the pooler, plus the 2-label head:
# BERT's classifier (h*2+2) on top of its pooler; RoBERTa's head (dense h*h+h, out h*2+2) in place
# of its pooler.  roberta-base 124,645,632 - 590,592 + 592,130; bert-base-uncased 109,482,240 +
# 1,538; all-MiniLM-L6-v2 22,713,216 + 770.  LLaMA (untied LM head): open_llama_3b
# 2*32000*3200 + 26*(4*3200^2 + 3*3200*8640 + 2*3200) + 3200; Llama-2-7b 6,738,415,616.
PUBLISHED = {"roberta-base": 124_647_170, "bert-base": 109_483_778, "minilm-l6": 22_713_986,
             "llama-3b": 3_426_473_600, "llama-7b": 6_738_415_616}


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_have_the_published_parameter_counts(name):
    model = build(architecture(name), torch.float32)
    assert sum(p.numel() for p in model.parameters()) == PUBLISHED[name]
    assert all(p.device.type == "meta" for p in model.parameters())


def test_heads_follow_the_model_type():
    assert architecture("roberta-base").head == "classification"
    assert architecture("llama-7b").head == "causal-lm"
    assert architecture("roberta-base", head="causal-lm").head == "causal-lm"


def test_a_model_directory_with_a_config_json(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 32,
                                                      "num_hidden_layers": 2, "num_attention_heads": 2,
                                                      "intermediate_size": 64, "vocab_size": 100}))
    arch = architecture(str(tmp_path))
    assert arch.head == "causal-lm" and arch.config.hidden_size == 32
    assert len(layer_blocks(build(arch, torch.float32))) == 2


@pytest.mark.parametrize("content, message", [
    ("{not json", "not valid JSON"),
    (json.dumps({"hidden_size": 32}), "no 'model_type'"),
    (json.dumps({"model_type": "no-such-model"}), "no-such-model"),
])
def test_bad_configs_say_what_is_wrong(tmp_path, content, message):
    path = tmp_path / "config.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=message):
        architecture(str(path))


def test_unknown_preset_lists_the_presets():
    with pytest.raises(ValueError, match="preset .*roberta-base.*llama-7b"):
        architecture("gpt-5")


def test_unknown_head():
    with pytest.raises(ValueError, match="head must be"):
        architecture("roberta-base", head="regression")


def test_sizes_missing_from_the_file_are_refused_not_defaulted(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"model_type": "llama", "hidden_size": 64}))
    with pytest.raises(ValueError, match="lacks num_hidden_layers, vocab_size"):
        architecture(str(path))


def test_encoder_decoder_models_are_refused(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"model_type": "t5", "d_model": 64, "num_layers": 2, "vocab_size": 100}))
    with pytest.raises(ValueError, match="encoder-decoder"):
        architecture(str(path))
