"""The training-step rows: each kind builds the optimizer it names, updates what it says, and measures."""
import pytest
import torch

from childopt import bench_train

pytest.importorskip("transformers")
CPU = torch.device("cpu")


def _one_step(kind):
    step, model, opt = bench_train.training_step(kind, CPU, backend="reference")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    step()
    return model, opt, before


def test_child_tuning_d_masks_the_encoder_layers_and_freezes_masked_out_entries():
    model, opt, before = _one_step("child-tuning-d")
    masks = {n: opt.state[p]["mask"] for n, p in model.named_parameters() if "mask" in opt.state[p]}
    assert masks and set(masks) == {n for n, _ in model.named_parameters() if ".layer." in n}
    for name, p in model.named_parameters():
        if name in masks:
            assert torch.equal(p[~masks[name]], before[name][~masks[name]]), name  # freeze: bit-identical
    kept = sum(m.sum().item() for m in masks.values()) / sum(m.numel() for m in masks.values())
    assert abs(kept - bench_train.CT_DENSITY) < 0.01
    assert not torch.equal(model.classifier.out_proj.weight, before["classifier.out_proj.weight"])  # no mask: trains


def test_sparse_compact_updates_only_the_selected_entries_of_every_parameter():
    model, opt, before = _one_step("sparse-compact")
    assert opt.storage == "sparse" and opt.compact_grads
    for name, p in model.named_parameters():
        changed = (p.detach() != before[name]).reshape(-1).nonzero().reshape(-1)
        selected = opt.state[p]["indices"].long()
        assert torch.isin(changed, selected).all(), name


def test_rows_measure_every_kind_that_can_run_here():
    rows, skipped = bench_train.run_rows(CPU, warmup=1, steps=1, backend="reference")
    assert {r.key for r in rows} | {s["key"] for s in skipped} == set(bench_train.KINDS)
    assert "adamw-8bit" in {s["key"] for s in skipped}  # bitsandbytes needs a GPU
    by_key = {r.key: r for r in rows}
    total = by_key["adamw-fused"].grad_params
    for row in rows:
        assert row.it_s > 0 and row.peak_gb > 0 and row.grad_params > 0
        assert row.backend == ("reference" if row.optimizer == "MaskedAdamW" else "torch")
    if "lora-r8" in by_key:
        assert by_key["lora-r8"].grad_params < total / 10
    assert "x fused" in bench_train.format_table(rows)


def test_an_unknown_kind_names_the_choices():
    with pytest.raises(ValueError, match="kind must be one of"):
        bench_train.build("sgd", torch.nn.Linear(2, 2))
