"""The training-step rows: each kind builds the optimizer it names, updates what it says, and measures."""
import pytest
import torch

from childopt.bench import live, train

pytest.importorskip("transformers")
CPU = torch.device("cpu")


def _one_step(kind):
    step, model, opt, _ = train.training_step(kind, CPU, backend="reference")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    step()
    return model, opt, before


def test_child_tuning_d_masks_the_encoder_layers_and_freezes_masked_out_entries():
    model, opt, before = _one_step("child-tuning-d")
    masks = {n: opt.state[p]["mask"] for n, p in model.named_parameters() if "mask" in opt.state[p]}
    layers = model.config.num_hidden_layers
    assert len(masks) == 16 * layers  # q, k, v, attention output, 2 LayerNorms, 2 dense: weight and bias each
    assert all(n.startswith("roberta.encoder.layer.") for n in masks)
    for name, p in model.named_parameters():
        if name in masks:
            assert torch.equal(p[~masks[name]], before[name][~masks[name]]), name  # freeze: bit-identical
            assert not torch.equal(p[masks[name]], before[name][masks[name]]), name
    kept = sum(m.sum().item() for m in masks.values()) / sum(m.numel() for m in masks.values())
    assert abs(kept - train.CT_DENSITY) < 0.01
    for unmasked in ("roberta.embeddings.word_embeddings.weight", "classifier.out_proj.weight"):
        p = dict(model.named_parameters())[unmasked]
        assert not torch.equal(p, before[unmasked]), unmasked  # no mask: trains


def test_sparse_compact_updates_only_and_all_of_the_selected_entries():
    model, opt, before = _one_step("sparse-compact")
    assert opt.storage == "sparse" and opt.compact_grads
    updated = selected_total = 0
    for name, p in model.named_parameters():
        changed = (p.detach() != before[name]).reshape(-1)
        selected = torch.zeros_like(changed)
        selected[opt.state[p]["indices"].long()] = True
        assert not changed[~selected].any(), name
        if "embeddings" not in name:  # embeddings: only the rows the batch uses get a gradient
            updated, selected_total = updated + changed[selected].sum().item(), selected_total + selected.sum().item()
    assert updated > 0.99 * selected_total  # the compact gradients reached the step


def test_trained_entries_count_what_each_optimizer_can_update():
    rows = {}
    for kind in ("adamw-fused", "child-tuning-d", "child-tuning-f", "sparse-compact"):
        _, model, opt, _ = train.training_step(kind, CPU, backend="reference")
        rows[kind] = train.trained_entries(model, opt)
    numel = sum(p.numel() for p in model.parameters())
    layers = sum(p.numel() for n, p in model.named_parameters() if ".layer." in n)
    assert rows["adamw-fused"] == numel
    assert rows["child-tuning-f"] == pytest.approx(train.CT_DENSITY * numel)
    assert rows["child-tuning-d"] == pytest.approx(numel - layers + train.CT_DENSITY * layers, rel=0.01)
    assert rows["sparse-compact"] == pytest.approx(train.SPARSE_DENSITY * numel, rel=0.02)


def test_rows_measure_every_kind_that_can_run_here():
    pytest.importorskip("peft")
    rows, skipped = train.run_rows(CPU, warmup=1, steps=1, backend="reference")
    assert [r.key for r in rows] == [k for k in train.KINDS if k != "adamw-8bit"]
    assert [s["key"] for s in skipped] == ["adamw-8bit"]  # bitsandbytes needs a GPU
    by_key = {r.key: r for r in rows}
    for row in rows:
        assert row.it_s > 0 and row.peak_gb > 0 and row.trained > 0
        assert row.backend == ("reference" if row.optimizer == "MaskedAdamW" else "torch")
    assert by_key["lora-r8"].trained < by_key["adamw-fused"].trained / 10
    assert "x fused" in train.format_table(rows) and "live GB" in train.format_table(rows)
    assert_live_memory_tells_the_methods_apart(by_key)


def assert_live_memory_tells_the_methods_apart(by_key):
    """Against the bytes each method must hold, counted from a model of the same config: full
    fine-tuning holds fp32 parameters, exp_avg and exp_avg_sq (12 B per parameter) when a step
    starts and all gradients (4 B more) by the end of backward; sparse storage holds the
    parameters and 12 B per selected entry; LoRA little beyond the parameters.  Live bytes
    order LoRA < sparse + compact gradients < full fine-tuning."""
    model = train.transformers_module().RobertaForSequenceClassification(train.setup_for(CPU).config)
    numel = sum(p.numel() for p in model.parameters())
    full, sparse, lora = (by_key[k] for k in ("adamw-fused", "sparse-compact", "lora-r8"))
    assert full.held_gb * 1e9 >= 12 * numel
    assert (full.live_gb - full.held_gb) * 1e9 >= 4 * numel
    assert sparse.held_gb * 1e9 == pytest.approx(4 * numel + 12 * sparse.trained, rel=0.01)
    assert 4 * numel <= lora.held_gb * 1e9 < 5 * numel
    assert lora.live_gb < sparse.live_gb < full.live_gb
    assert_saved_bytes_are_what_autograd_saves(by_key)


def _bytes_autograd_saves(kind) -> int:
    """The oracle: distinct storages (parameters left out) that autograd's pack hook sees in one
    forward of ``kind``'s seeded model and batch."""
    training = train.training_step(kind, CPU, backend="reference")
    params = {live.storage_key(p) for p in training.model.parameters()}
    saved = {}

    def pack(tensor):
        if live.storage_key(tensor) not in params:
            saved[live.storage_key(tensor)] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        training.forward()
    return sum(saved.values())


def assert_saved_bytes_are_what_autograd_saves(by_key):
    """``saved_gb`` covers every tensor autograd saves (plus the forward's temporaries live at its
    end, up to 30% here); sparse storage trains entries of every weight, so it saves what full
    fine-tuning saves, and LoRA's frozen weights save less; the saved bytes are part of the step's
    peak increase."""
    for key in ("adamw-fused", "sparse-compact", "lora-r8"):
        oracle, row = _bytes_autograd_saves(key), by_key[key]
        assert oracle <= row.saved_gb * 1e9 <= 1.3 * oracle, key
        assert row.saved_gb <= row.live_gb - row.held_gb, key
    full, sparse, lora = (by_key[k] for k in ("adamw-fused", "sparse-compact", "lora-r8"))
    assert sparse.saved_gb == full.saved_gb
    assert lora.saved_gb < 0.9 * full.saved_gb


def test_a_failing_optimizer_is_raised_not_skipped(monkeypatch):
    """A row whose optimizer raises is a bug the report must not hide as a skipped row (the goals
    would read n/a and bench exit 0); only Unavailable is a skip."""
    def broken(self, closure=None):
        raise TypeError("a bug in step")

    monkeypatch.setattr(train, "KINDS", {"child-tuning-f": train.KINDS["child-tuning-f"]})
    monkeypatch.setattr(train.MaskedAdamW, "step", broken)
    with pytest.raises(TypeError, match="a bug in step"):
        train.run_rows(CPU, warmup=1, steps=1, backend="reference")


def test_an_unknown_kind_names_the_choices():
    with pytest.raises(ValueError, match="kind must be one of"):
        train.build("sgd", torch.nn.Linear(2, 2))
