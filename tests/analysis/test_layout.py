"""HeadLayout: which rows and columns of each attention parameter belong to which head, hand-counted on
a tiny BERT (2 heads of 4) and a tiny grouped-query LLaMA (4 query heads, 2 key/value heads of 3)."""
import re

import pytest
import torch
import transformers

from childopt.analysis.layout import KEY_VALUE, OTHER, OUTPUT, QUERY, HeadLayout
from childopt.analysis.quantities import fisher_importance
from tests.analysis.models import (BERT_CONFIG, LLAMA_CONFIG, bert_name, tiny_bart, tiny_bert, tiny_llama, tiny_opt,
                                   tiny_phi)


@pytest.fixture(scope="module")
def bert():
    return HeadLayout.from_model(tiny_bert())


@pytest.fixture(scope="module")
def llama():
    return HeadLayout.from_model(tiny_llama())


def test_counts_come_from_the_config(bert, llama):
    assert (bert.num_layers, bert.num_heads, bert.num_kv_heads, bert.head_dim) == (2, 2, 2, 4)
    assert (llama.num_layers, llama.num_heads, llama.num_kv_heads, llama.head_dim, llama.group) == (2, 4, 2, 3, 2)
    assert bert.family.label.startswith("BERT") and llama.family.label.startswith("LLaMA")


def test_parameters_are_placed_by_layer_and_role(bert, llama):
    assert bert.place(bert_name(1, "attention.self.query.weight")) == (1, QUERY)
    assert bert.place(bert_name(0, "attention.self.value.bias")) == (0, KEY_VALUE)
    assert bert.place(bert_name(0, "attention.output.dense.weight")) == (0, OUTPUT)
    assert bert.place(bert_name(0, "attention.output.dense.bias")) == (0, OTHER)
    assert bert.place(bert_name(1, "intermediate.dense.weight")) == (1, OTHER)
    assert bert.place("bert.embeddings.word_embeddings.weight") is None and bert.place("classifier.weight") is None
    assert llama.place("model.layers.1.self_attn.k_proj.weight") == (1, KEY_VALUE)
    assert llama.place("model.layers.0.self_attn.o_proj.weight") == (0, OUTPUT)
    assert llama.place("model.layers.0.mlp.down_proj.weight") == (0, OTHER)
    assert llama.place("lm_head.weight") is None


def _sums(layout, name, values):
    layer, heads, other = layout.head_sums(name, values)
    return layer, heads.tolist(), float(other)


def test_query_rows_are_split_head_major(bert):
    name = bert_name(1, "attention.self.query.weight")  # [8 rows = 2 heads x 4, 8 columns]
    values = torch.zeros(8, 8)
    values[4:8] = 1.0  # head 1's rows; rows 3..6 or columns 4..7 would give other sums
    assert _sums(bert, name, values) == (1, [0.0, 32.0], 0.0)
    bias = torch.arange(8.0)
    assert _sums(bert, bert_name(1, "attention.self.key.bias"), bias) == (1, [0 + 1 + 2 + 3, 4 + 5 + 6 + 7], 0.0)


def test_the_output_projection_is_split_by_columns(bert):
    values = torch.zeros(8, 8)
    values[:, 0:4] = 1.0  # head 0's columns: 8 rows x 4
    values[0, 4] = 5.0  # one entry of head 1's columns
    assert _sums(bert, bert_name(0, "attention.output.dense.weight"), values) == (0, [32.0, 5.0], 0.0)


def test_other_parameters_of_a_layer_go_to_its_other_part(bert):
    values = torch.full((16, 8), 0.5)
    assert _sums(bert, bert_name(1, "intermediate.dense.weight"), values) == (1, [0.0, 0.0], 64.0)
    assert bert.head_sums("classifier.weight", torch.ones(2, 8)) is None


def test_grouped_key_value_heads_are_shared_by_their_query_heads(llama):
    """k_proj has 2 heads of 3 rows; query heads 2 and 3 read key/value head 1 (repeat_kv), half each."""
    values = torch.zeros(6, 8)
    values[3:6] = 1.0  # key/value head 1: 3 rows x 8 = 24
    assert _sums(llama, "model.layers.1.self_attn.k_proj.weight", values) == (1, [0.0, 0.0, 12.0, 12.0], 0.0)
    query = torch.zeros(12, 8)
    query[3:6] = 1.0  # query head 1 (head_dim 3 from the config, not hidden / heads = 2)
    assert _sums(llama, "model.layers.0.self_attn.q_proj.weight", query) == (0, [0.0, 24.0, 0.0, 0.0], 0.0)
    output = torch.zeros(8, 12)
    output[:, 9:12] = 2.0  # query head 3's columns
    assert _sums(llama, "model.layers.0.self_attn.o_proj.weight", output) == (0, [0.0, 0.0, 0.0, 48.0], 0.0)


def test_reduce_sums_every_layer_parameter(bert):
    ones = {name: torch.ones(shape) for name, shape in bert.shapes.items()}
    heads, other = bert.reduce(ones.items())
    per_head = 3 * (4 * 8 + 4) + 8 * 4  # q, k, v rows with their biases, and the output projection's columns
    assert heads.tolist() == [[per_head, per_head]] * 2
    layer = sum(torch.Size(shape).numel() for name, shape in bert.shapes.items() if bert.place(name) is not None) / 2
    assert other.tolist() == [layer - 2 * per_head] * 2


def test_unknown_architectures_are_refused_with_the_known_names():
    config = transformers.GPT2Config(n_embd=8, n_layer=1, n_head=2)
    with pytest.raises(ValueError, match=r"unknown architecture.*encoder\.layer\.<i>\.attention\.self\.query\.weight"
                                         r".*'transformer\.h\.0\.attn\.c_attn\.weight'"):
        HeadLayout.from_config(config, {"transformer.h.0.attn.c_attn.weight": (8, 24)})


def test_shapes_that_do_not_split_into_the_configs_heads_are_named():
    config = transformers.BertConfig(**BERT_CONFIG)
    query = bert_name(0, "attention.self.query.weight")
    with pytest.raises(ValueError, match=rf"'{query}' \(the model\): expected 8 rows \(num_attention_heads x "
                                         r"head_dim 4\), got shape \(6, 8\)"):
        HeadLayout.from_config(config, {query: (6, 8)})
    output = bert_name(0, "attention.output.dense.weight")
    with pytest.raises(ValueError, match=rf"'{output}' \(the model\): expected a matrix of 8 columns"):
        HeadLayout.from_config(config, {query: (8, 8), output: (8, 6)})
    with pytest.raises(ValueError, match=r"in layer 2, but the config has num_hidden_layers=2"):
        HeadLayout.from_config(config, {bert_name(2, "attention.self.query.weight"): (8, 8)})


def test_configs_without_head_counts_and_lora_wrapped_models_are_refused():
    query = bert_name(0, "attention.self.query.weight")
    with pytest.raises(ValueError, match="num_attention_heads must be an int >= 1, got None"):
        HeadLayout.from_config(object(), {query: (8, 8)})
    with pytest.raises(ValueError, match=r"LoRA-wrapped model; merge it first"):
        HeadLayout.from_config(transformers.BertConfig(**BERT_CONFIG),
                               {query: (8, 8), bert_name(0, "attention.self.query.base_layer.weight"): (8, 8)})


@pytest.mark.parametrize("build, output", [(tiny_opt, "out_proj"), (tiny_phi, "dense")])
def test_opt_and_phi_output_projections_are_split_by_the_head_they_read(build, output):
    """Head 1's value rows zeroed: the output projection's columns that then read only zeros are head 1's."""
    model = build().eval()
    layout = HeadLayout.from_model(model)
    name = next(n for n, _ in model.named_parameters() if n.endswith(f"layers.0.self_attn.{output}.weight"))
    attention = model.get_submodule(name.rsplit(".", 2)[0])
    with torch.no_grad():
        attention.v_proj.weight[4:8] = 0.0
        attention.v_proj.bias[4:8] = 0.0
    inputs = []
    getattr(attention, output).register_forward_hook(lambda module, args, result: inputs.append(args[0]))
    model(torch.tensor([[3, 4, 5, 6]]))
    values = torch.zeros(layout.shapes[name])
    values[:, inputs[0].flatten(0, -2).abs().sum(0) == 0] = 1.0  # 8 rows x head 1's 4 columns
    assert _sums(layout, name, values) == (0, [0.0, 32.0], 0.0)
    ones = fisher_importance(layout, {n: torch.ones(p.shape) for n, p in model.named_parameters()})
    assert ones.heads.tolist() == [[3 * (4 * 8 + 4) + 8 * 4] * 2] * 2  # q, k, v rows with biases, output columns


def test_a_layer_without_a_known_output_projection_is_refused_naming_it():
    shapes = {name.replace("o_proj", "proj_out"): tuple(p.shape) for name, p in tiny_llama().named_parameters()}
    with pytest.raises(ValueError, match=r"'model\.layers\.0\.self_attn\.q_proj\.weight': layer 0's attention needs "
                                         r"key/value projections and one output projection \(self_attn\.o_proj.*"
                                         r"output projections \[\].*'model\.layers\.0\.self_attn\.proj_out\.weight'"):
        HeadLayout.from_config(transformers.LlamaConfig(**LLAMA_CONFIG), shapes)


@pytest.mark.parametrize("decoder_layers", [2, 3])
def test_an_encoder_decoder_is_refused_naming_both_stacks(decoder_layers):
    """Encoder layer i and decoder layer i are not one layer, and a deeper decoder is not a num_hidden_layers error."""
    with pytest.raises(ValueError, match=r"in 2 stacks of layers \('model\.encoder\.layers', 'model\.decoder\.layers'"):
        HeadLayout.from_model(tiny_bart(decoder_layers=decoder_layers))


def test_a_cross_attention_is_refused_naming_it():
    with pytest.raises(ValueError, match=r"'model\.decoder\.layers\.0\.encoder_attn\.k_proj\.weight' is a projection "
                                         r"of a second attention"):
        HeadLayout.from_model(tiny_bart(transformers.BartForCausalLM))


@pytest.mark.parametrize("how", ["truncated", "shared"])
def test_a_model_with_fewer_layers_than_its_config_is_refused(how):
    """A BERT cut to its first layer (as distillation does, config unchanged), or whose layer 1 is layer 0."""
    model = tiny_bert()
    if how == "truncated":
        model.bert.encoder.layer = model.bert.encoder.layer[:1]
    else:
        model.bert.encoder.layer[1] = model.bert.encoder.layer[0]
    with pytest.raises(ValueError, match=r"layer 1 has no attention query projection .*num_hidden_layers=2: the model "
                                         r"has fewer layers than its config, or shares one layer's module"):
        HeadLayout.from_model(model)


def test_head_sums_refuse_values_of_another_shape_or_parameter(llama):
    name = "model.layers.0.self_attn.k_proj.weight"  # (6, 8)
    for shape in ((8, 6), (5, 8)):
        with pytest.raises(ValueError, match=rf"'{name}': the values have shape {re.escape(str(shape))}, expected "
                                             r"\(6, 8\)"):
            llama.head_sums(name, torch.ones(shape))
    with pytest.raises(ValueError, match=r"'model\.layers\.5\.self_attn\.q_proj\.weight' is not a parameter"):
        llama.reduce([("model.layers.5.self_attn.q_proj.weight", torch.ones(12, 8))])
