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
    (b"\x9a\xff{}", r"config.json is not UTF-8 text"),
    (json.dumps({"hidden_size": 32}), "no 'model_type'"),
    (json.dumps({"model_type": "no-such-model"}), "no-such-model"),
])
def test_bad_configs_say_what_is_wrong(tmp_path, content, message):
    path = tmp_path / "config.json"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
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


LLAMA = {"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2, "intermediate_size": 96, "vocab_size": 500, "max_position_embeddings": 64}


@pytest.mark.parametrize("content, message", [
    (None, "holds a JSON NoneType, not an object"),
    ("model_type", "holds a JSON str, not an object"),
    (dict(LLAMA, num_attention_heads=5), "hidden size \\(64\\) is not a multiple of the number of attention heads"),
    (dict(LLAMA, hidden_size="64"), "'hidden_size' expected int"),
    (dict(LLAMA, vocab_size=0), "vocab_size must be a positive int, got 0"),
    (dict(LLAMA, num_key_value_heads=3), "num_attention_heads \\(4\\) is not a multiple of num_key_value_heads"),
    ({"model_type": "gpt2", "n_embd": 64, "n_layer": 2, "n_head": 0, "vocab_size": 100}, "n_head must be a positive"),
])
def test_bad_config_values_are_value_errors_naming_the_file_and_field(tmp_path, content, message):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(content))
    with pytest.raises(ValueError, match=message) as exc:
        architecture(str(path))
    assert str(path) in str(exc.value)


@pytest.mark.parametrize("missing", ["intermediate_size", "num_attention_heads"])
def test_missing_mlp_and_head_sizes_are_refused_not_defaulted(tmp_path, missing):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({k: v for k, v in LLAMA.items() if k != missing}))
    with pytest.raises(ValueError, match=f"lacks {missing}, which the planner needs"):
        architecture(str(path))


def test_sizes_a_model_type_derives_are_not_required(tmp_path):
    """GPT-2 has no intermediate_size (its MLP is 4 x n_embd) and names its heads n_head."""
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"model_type": "gpt2", "n_embd": 32, "n_layer": 2, "n_head": 4, "vocab_size": 100}))
    model = build(architecture(str(path)), torch.float32)
    assert model.transformer.h[0].mlp.c_fc.weight.shape == (32, 4 * 32)


def _position_models() -> dict:
    import transformers

    return {  # 16 positions each: OPT and BioGPT offset their table by 2; RoBERTa by its padding index + 1
        "opt": transformers.OPTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, ffn_dim=64,
                                      vocab_size=100, max_position_embeddings=16, word_embed_proj_dim=32),
        "biogpt": transformers.BioGptConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                            intermediate_size=64, vocab_size=100, max_position_embeddings=16),
        "roberta": transformers.RobertaConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                              intermediate_size=64, vocab_size=100, max_position_embeddings=18,
                                              type_vocab_size=1, pad_token_id=1),
        # a word embedding of as many rows as positions: GPT-2 still has its table, Mistral has none (rotary)
        "gpt2": transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=16, n_positions=16, bos_token_id=0,
                                        eos_token_id=0),
        "mistral": transformers.MistralConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                              num_key_value_heads=1, intermediate_size=64, vocab_size=16,
                                              max_position_embeddings=16, pad_token_id=2),
    }


@pytest.mark.parametrize("name", ["opt", "biogpt", "roberta", "gpt2", "mistral"])
def test_check_length_refuses_exactly_the_lengths_the_real_model_cannot_run(name):
    from childopt.memory.models import Architecture, check_length
    from childopt.memory.planner import Setting, inputs_for

    config = _position_models()[name]
    arch = Architecture(config, "classification" if name == "roberta" else "causal-lm", name)
    model = build(arch, torch.float32, "cpu")
    for seq_len in (16, 17):
        try:
            model(**inputs_for(arch, Setting(batch_size=1, seq_len=seq_len)))
            runs = True
        except (IndexError, RuntimeError):  # an index past a position table or RoBERTa's token-type buffer
            runs = False
        try:
            check_length(model, config, seq_len)
            refused = False
        except ValueError as exc:
            assert "(16 positions)" in str(exc)
            refused = True
        assert refused == (not runs), seq_len
