"""Per-head quantities against hand-computed values on the tiny BERT: update norms from state dicts and
from a SparseDelta, child-network shares from masks and from MaskedAdamW, Fisher importance; and clear
errors for masks, scores and state dicts that do not fit the model."""
import math

import pytest
import torch

from childopt import MaskedAdamW
from childopt.analysis.layout import HeadLayout
from childopt.analysis.quantities import (child_share, delta_norms, fisher_importance, optimizer_masks, total_norm,
                                          update_norms)
from childopt.deltas import SparseDelta
from childopt.fisher import FisherAccumulator
from tests.analysis.models import bert_name, tiny_bert, tiny_llama, zeros_like_params

ATTENTION = ("attention.self.query", "attention.self.key", "attention.self.value")


@pytest.fixture(scope="module")
def model():
    return tiny_bert()


@pytest.fixture(scope="module")
def layout(model):
    return HeadLayout.from_model(model)


def _layer_params(model, layout) -> dict:
    return {n: p.detach().clone() for n, p in model.named_parameters() if layout.place(n) is not None}


def one_head(model, layer: int, head: int) -> dict:
    """Bool masks of every parameter, True exactly at the entries of one head (head_dim 4)."""
    masks = {name: torch.zeros_like(p, dtype=torch.bool) for name, p in model.named_parameters()}
    rows = slice(4 * head, 4 * head + 4)
    for part in ATTENTION:
        masks[bert_name(layer, f"{part}.weight")][rows] = True
        masks[bert_name(layer, f"{part}.bias")][rows] = True
    masks[bert_name(layer, "attention.output.dense.weight")][:, rows] = True
    return masks


def test_the_update_norm_of_a_changed_head_is_exactly_its_delta(model, layout):
    base = _layer_params(model, layout)
    tuned = {n: t.clone() for n, t in base.items()}
    tuned[bert_name(1, "attention.self.query.weight")][4:8] += 0.5  # head 1 of layer 1: 4 rows x 8 columns
    tuned[bert_name(0, "attention.self.value.bias")][0:4] += torch.tensor([1.0, 2.0, 3.0, 4.0])  # head 0, layer 0
    tuned[bert_name(0, "output.LayerNorm.weight")][3] += 2.0  # layer 0's other part
    norms = update_norms(layout, base, tuned)
    # fp32 weights: the stored difference is (w + 0.5) - w rounded, so compare in fp32's precision
    torch.testing.assert_close(norms.heads, torch.tensor([[math.sqrt(30.0), 0.0], [0.0, math.sqrt(32 * 0.25)]],
                                                         dtype=torch.float64), rtol=1e-6, atol=0)
    torch.testing.assert_close(norms.other, torch.tensor([2.0, 0.0], dtype=torch.float64), rtol=1e-6, atol=0)
    assert total_norm(norms) == pytest.approx(math.sqrt(30 + 8 + 4), rel=1e-6)


def test_the_output_projection_moves_the_head_whose_columns_change(model, layout):
    base = _layer_params(model, layout)
    tuned = {n: t.clone() for n, t in base.items()}
    tuned[bert_name(1, "attention.output.dense.weight")][:, 0:4] -= 0.25  # head 0's columns: 8 x 4 entries
    norms = update_norms(layout, base, tuned)
    assert norms.heads[1, 0] == pytest.approx(math.sqrt(32 * 0.0625), rel=1e-6)
    assert norms.heads[1, 1] == 0 and norms.heads[0].eq(0).all() and norms.other.eq(0).all()


def test_a_sparse_delta_gives_the_state_dicts_norms(model, layout):
    base = _layer_params(model, layout)
    tuned = {n: t + 0.01 * torch.randn(t.shape, generator=torch.Generator().manual_seed(len(n)))
             for n, t in base.items()}
    expected = update_norms(layout, base, tuned)
    got = delta_norms(layout, SparseDelta.extract(base, tuned))
    torch.testing.assert_close(got.heads, expected.heads, rtol=1e-12, atol=0)
    torch.testing.assert_close(got.other, expected.other, rtol=1e-12, atol=0)


def test_a_mask_of_exactly_one_head_has_share_one_there_and_zero_elsewhere(model, layout):
    share = child_share(layout, one_head(model, layer=0, head=1))
    assert share.heads.tolist() == [[0.0, 1.0], [0.0, 0.0]]
    assert share.other.tolist() == [0.0, 0.0]


def test_parameters_without_a_mask_count_as_trained_fully(model, layout):
    masks = {bert_name(1, "attention.self.query.weight"): torch.zeros(8, 8, dtype=torch.bool)}
    share = child_share(layout, masks)
    per_head = 3 * (4 * 8 + 4) + 8 * 4
    assert share.heads[1].tolist() == [1 - 32 / per_head] * 2  # the query weight: 32 of each head's entries out
    assert share.heads[0].tolist() == [1.0, 1.0] and share.other.tolist() == [1.0, 1.0]


@pytest.mark.parametrize("storage", ["dense", "sparse"])
def test_the_share_of_a_masked_adamw_is_that_of_its_masks(model, layout, storage):
    masks = one_head(model, layer=1, head=0)
    opt = MaskedAdamW(model.named_parameters(), lr=1e-3, mask=masks, storage=storage)
    assert set(optimizer_masks(opt)) == set(masks)
    assert child_share(layout, opt).heads.tolist() == [[0.0, 0.0], [1.0, 0.0]]


@pytest.mark.parametrize("frozen", ["left out of the optimizer", "held but not requiring grad"])
def test_an_optimizer_s_share_counts_only_what_it_trains(frozen):
    """Layer 0 frozen: share 0 there, not 1; a held parameter without a mask still counts as fully kept."""
    model = tiny_bert()
    layout = HeadLayout.from_model(model)
    for name, param in model.named_parameters():
        param.requires_grad_(".layer.0." not in name)
    masks = {name: mask for name, mask in one_head(model, layer=1, head=0).items() if ".layer.1." in name}
    del masks[bert_name(1, "output.LayerNorm.weight")]  # held without a mask: its 8 entries train fully
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad or frozen.startswith("held")]
    share = child_share(layout, MaskedAdamW(named, lr=1e-3, mask=masks))
    other_entries = 8 + 8 + 8 + 16 * 8 + 16 + 8 * 16 + 8 + 8 + 8  # layer 1 outside the heads (hand-counted)
    assert share.heads.tolist() == [[0.0, 0.0], [1.0, 0.0]]
    assert share.other.tolist() == [0.0, 8 / other_entries]


def test_a_mask_that_changes_every_step_has_no_share(model, layout):
    opt = MaskedAdamW(model.named_parameters(), lr=1e-3, mask="bernoulli", reserve_p=0.3)
    with pytest.raises(ValueError, match="mask is 'bernoulli'; a child-network share needs a fixed mask"):
        child_share(layout, opt)


def test_an_optimizer_without_a_mask_has_the_share_of_what_it_trains():
    """mask=None trains every entry it holds: share 1, but 0 in layer 0, which does not require grad."""
    model = tiny_bert()
    for name, param in model.named_parameters():
        param.requires_grad_(".layer.0." not in name)
    share = child_share(HeadLayout.from_model(model), MaskedAdamW(model.named_parameters(), lr=1e-3, mask=None))
    assert share.heads.tolist() == [[0.0, 0.0], [1.0, 1.0]] and share.other.tolist() == [0.0, 1.0]


def test_fisher_importance_sums_the_scores_of_each_heads_entries(model, layout):
    scores = {name: mask.float() * 2.0 for name, mask in one_head(model, layer=1, head=1).items()}
    importance = fisher_importance(layout, scores)
    per_head = 3 * (4 * 8 + 4) + 8 * 4
    assert importance.heads.tolist() == [[0.0, 0.0], [0.0, 2.0 * per_head]]
    assert importance.other.tolist() == [0.0, 0.0]


def test_fisher_accumulator_scores_split_without_loss(model, layout):
    """Heads and other parts add up to the layers' total score of a real Fisher pass."""
    gen = torch.Generator().manual_seed(3)
    batch = {"input_ids": torch.randint(0, 20, (4, 6), generator=gen), "labels": torch.tensor([0, 1, 1, 0])}
    with FisherAccumulator(model, include="layer", free_grads=True) as acc:
        model(**batch).loss.backward()
    importance = fisher_importance(layout, acc.scores())
    total = sum(float(s.double().sum()) for s in acc.scores().values())
    assert float(importance.heads.sum() + importance.other.sum()) == pytest.approx(total, rel=1e-12)
    assert bool((importance.heads > 0).all())


def test_masks_of_the_wrong_shape_name_the_parameter_and_the_expected_shape(model, layout):
    name = bert_name(0, "attention.self.key.weight")
    with pytest.raises(ValueError, match=rf"'{name}': the mask has shape \(8, 4\), expected \(8, 8\)"):
        child_share(layout, {name: torch.ones(8, 4, dtype=torch.bool)})
    with pytest.raises(ValueError, match=rf"'{name}': the mask must be a bool tensor, got torch.float32"):
        child_share(layout, {name: torch.ones(8, 8)})
    with pytest.raises(ValueError, match=r"'encoder\.layer\.0\.attention\.self\.key\.weight' is not a parameter of "
                                         r"the model \(expected names like encoder\.layer\.<i>"):
        child_share(layout, {"encoder.layer.0.attention.self.key.weight": torch.ones(8, 8, dtype=torch.bool)})
    with pytest.raises(ValueError, match=rf"'{name}': the Fisher scores has shape \(4, 8\), expected \(8, 8\)"):
        fisher_importance(layout, {name: torch.ones(4, 8)})


def test_a_state_dict_of_another_architecture_is_refused_by_name(model, layout):
    base = _layer_params(model, layout)
    query = bert_name(0, "attention.self.query.weight")
    with pytest.raises(ValueError, match=rf"the fine-tuned state dict has no '{query}' \(expected a tensor of "
                                         r"shape \(8, 8\)\); is it of another architecture"):
        update_norms(layout, base, tiny_llama().state_dict())
    wider = tiny_bert(hidden_size=12, num_attention_heads=3).state_dict()
    with pytest.raises(ValueError, match=rf"'{query}': the fine-tuned state dict has shape \(12, 12\), expected "
                                         r"\(8, 8\) \(the base model's\)"):
        update_norms(layout, base, wider)
    deeper = tiny_bert(num_hidden_layers=3).state_dict()
    with pytest.raises(ValueError, match=r"has 'bert\.encoder\.layer\.2\.[a-z.]+', which the base model lacks"):
        update_norms(layout, base, deeper)
    delta = SparseDelta.extract({"w": torch.zeros(3)}, {"w": torch.ones(3)})
    with pytest.raises(ValueError, match=r"'w' is not a parameter of the model"):
        delta_norms(layout, delta)


def test_an_unmerged_lora_state_dict_is_refused_with_a_hint(model, layout):
    base = _layer_params(model, layout)
    tuned = {name.replace("query.weight", "query.base_layer.weight"): t for name, t in zeros_like_params(model).items()}
    with pytest.raises(ValueError, match=r"has no '.*query\.weight'.*a LoRA model not merged"):
        update_norms(layout, base, tuned)


def test_a_held_frozen_parameter_with_a_mask_counts_nothing(model, layout):
    """A parameter that does not require grad is never stepped, whatever mask it holds."""
    masks = one_head(model, layer=1, head=0)
    frozen = bert_name(1, "attention.self.query.weight")
    dict(model.named_parameters())[frozen].requires_grad_(False)
    share = child_share(layout, MaskedAdamW(model.named_parameters(), lr=1e-3, mask=masks))
    assert share.heads[1, 0] < 1.0
    assert 0.0 < share.heads[1, 0]
