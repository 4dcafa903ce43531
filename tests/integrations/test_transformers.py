"""childopt.integrations.transformers on a tiny BERT built from a config, through the real Trainer (CPU).

Checked: the weight-decay groups equal the Trainer's and the hyper-parameters come from
TrainingArguments; ChildTuning-D keeps exactly round(reserve_p * n) entries of the ``layer``
parameters and leaves the others bit-identical while everything else trains; ChildTuning-F
trains; the stock ``Trainer(optimizers=(opt, None))`` path; compact gradients through
ChildTuningTrainer follow the dense run bit for bit (so their buffers are cleared every step) and
are clipped by the optimizer; a resumed ChildTuning-D run takes its mask from the checkpoint's
optimizer state, without a Fisher pass, and ends bit for bit where the uninterrupted run does
(a checkpoint without optimizer state, or with one the Trainer skips for want of scheduler.pt,
runs the pass); and bad input (compact gradients outside ChildTuningTrainer, optimizer settings
the MaskedAdamW would ignore) fails with clear errors.  test_transformers_hooks.py: the
compact-gradient hooks live only while train() runs.
"""
import shutil
import sys

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")  # the Trainer needs it

from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainingArguments  # noqa: E402

from childopt import MaskedAdamW  # noqa: E402
from childopt.integrations.transformers import ChildTuningTrainer, child_tuning_optimizer  # noqa: E402

RESERVE_P = 0.3


def tiny_bert() -> BertForSequenceClassification:
    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=64, num_labels=2))


class RandomPairs(Dataset):
    """32 random sequences of 16 tokens with random binary labels."""

    def __init__(self, n: int = 32, length: int = 16):
        g = torch.Generator().manual_seed(1)
        self.input_ids = torch.randint(0, 100, (n, length), generator=g)
        self.labels = torch.randint(0, 2, (n,), generator=g)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return {"input_ids": self.input_ids[i], "attention_mask": torch.ones_like(self.input_ids[i]),
                "labels": self.labels[i]}


def training_args(tmp_path, **overrides) -> TrainingArguments:
    options = dict(output_dir=str(tmp_path), per_device_train_batch_size=8, max_steps=3, learning_rate=1e-3,
                   weight_decay=0.01, adam_beta1=0.8, adam_beta2=0.99, adam_epsilon=1e-7, report_to=[],
                   save_strategy="no", logging_strategy="no", use_cpu=True, disable_tqdm=True)
    return TrainingArguments(**{**options, **overrides})


def snapshot(model) -> dict:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def unwrap(optimizer):
    """The Trainer wraps the optimizer in accelerate's AcceleratedOptimizer."""
    return getattr(optimizer, "optimizer", optimizer)


def assert_child_tuning_d(model, optimizer, before):
    """Exact mask size over the ``layer`` parameters, masked-out entries frozen, the rest trained."""
    layer = {n: p for n, p in model.named_parameters() if "layer" in n}
    masks = {n: optimizer.state[p]["mask"] for n, p in layer.items()}
    assert sum(int(m.sum()) for m in masks.values()) == round(RESERVE_P * sum(p.numel() for p in layer.values()))
    for n, p in layer.items():
        assert torch.equal(p.detach()[~masks[n]], before[n][~masks[n]]), n
        assert (p.detach() != before[n])[masks[n]].all(), n
    for n, p in model.named_parameters():
        if "layer" not in n:
            assert "mask" not in optimizer.state[p], n
            assert not torch.equal(p.detach(), before[n]), n


def test_groups_and_hyperparameters_follow_training_arguments(tmp_path):
    model, args = tiny_bert(), training_args(tmp_path)
    optimizer = child_tuning_optimizer(model, args, mode="ChildTuning-F", reserve_p=RESERVE_P, seed=3)
    decay, no_decay = optimizer.param_groups
    assert set(decay["param_names"]) == set(Trainer(model=model, args=args).get_decay_parameter_names(model))
    layer_norm = {f"{mn}.{pn}" for mn, m in model.named_modules() if isinstance(m, nn.LayerNorm)
                  for pn, _ in m.named_parameters()}
    biases = {n for n, _ in model.named_parameters() if n.endswith(".bias")}
    assert set(no_decay["param_names"]) == layer_norm | biases
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.01, 0.0)
    for group in (decay, no_decay):
        assert group["lr"] == 1e-3 and group["betas"] == (0.8, 0.99) and group["eps"] == 1e-7
        assert group["reserve_p"] == RESERVE_P
    assert optimizer.state_dict()["childopt"]["mask_kind"] == "bernoulli" and optimizer.seed == 3


def train_child_tuning(tmp_path, mode):
    """A tiny BERT trained for a few steps by ChildTuningTrainer: (model, its MaskedAdamW, weights before)."""
    model = tiny_bert()
    before = snapshot(model)
    trainer = ChildTuningTrainer(model=model, args=training_args(tmp_path), train_dataset=RandomPairs(),
                                 child_tuning_mode=mode, reserve_p=RESERVE_P)
    trainer.train()
    optimizer = unwrap(trainer.optimizer)
    assert isinstance(optimizer, MaskedAdamW)
    return model, optimizer, before


def test_childtuning_d_through_trainer(tmp_path):
    model, optimizer, before = train_child_tuning(tmp_path, "ChildTuning-D")
    assert all(float(optimizer.state[p]["step"]) == 3 for p in model.parameters())
    assert_child_tuning_d(model, optimizer, before)


def test_childtuning_f_through_trainer(tmp_path):
    model, optimizer, before = train_child_tuning(tmp_path, "ChildTuning-F")
    assert optimizer.state_dict()["childopt"]["mask_kind"] == "bernoulli"
    decay, no_decay = optimizer.param_groups
    for n, p in zip(decay["param_names"], decay["params"]):
        assert not torch.equal(p.detach(), before[n]), n  # decayed every step, kept or not ("zero_grad")
    # Without decay an entry moves once it was kept in one of the 3 steps: p = 1 - (1 - reserve_p)^3
    # (802 entries: standard deviation 0.017).
    moved = torch.cat([(p.detach() != before[n]).flatten()
                       for n, p in zip(no_decay["param_names"], no_decay["params"])])
    assert abs(moved.float().mean().item() - (1 - (1 - RESERVE_P) ** 3)) < 0.07


def test_optimizer_passed_to_stock_trainer(tmp_path):
    model, dataset = tiny_bert(), RandomPairs()
    before = snapshot(model)
    model.eval()
    optimizer = child_tuning_optimizer(model, training_args(tmp_path), mode="ChildTuning-D", reserve_p=RESERVE_P,
                                       train_dataloader=DataLoader(dataset, batch_size=8, shuffle=True),
                                       progress=False)
    assert not model.training  # Fisher ran in train mode; the mode is restored
    trainer = Trainer(model=model, args=training_args(tmp_path), train_dataset=dataset, optimizers=(optimizer, None))
    trainer.train()
    assert unwrap(trainer.optimizer) is optimizer
    assert_child_tuning_d(model, optimizer, before)


def _train_d(tmp_path, max_grad_norm=0.0, **options):
    model = tiny_bert()
    trainer = ChildTuningTrainer(model=model, args=training_args(tmp_path, max_grad_norm=max_grad_norm),
                                 train_dataset=RandomPairs(), child_tuning_mode="ChildTuning-D",
                                 reserve_p=RESERVE_P, **options)
    trainer.train()
    return model


def test_compact_gradients_through_trainer(tmp_path, monkeypatch):
    dense = snapshot(_train_d(tmp_path))
    compact = snapshot(_train_d(tmp_path, storage="sparse", compact_grads=True))
    assert all(torch.equal(compact[n], dense[n]) for n in dense)  # buffers cleared between steps

    clipped = []
    clip = MaskedAdamW.clip_grad_norm_

    def spy(self, max_norm, *args, **kwargs):
        clipped.append(max_norm)
        return clip(self, max_norm, *args, **kwargs)

    monkeypatch.setattr(MaskedAdamW, "clip_grad_norm_", spy)
    _train_d(tmp_path, storage="sparse", compact_grads=True, max_grad_norm=0.5)
    assert clipped == [0.5] * 3


def test_bad_input(tmp_path):
    model, args = tiny_bert(), training_args(tmp_path)
    loader = DataLoader(RandomPairs(), batch_size=8)
    with pytest.raises(ValueError, match="mode must be one of"):
        child_tuning_optimizer(model, args, mode="ChildTuning-d", reserve_p=RESERVE_P, train_dataloader=loader)
    with pytest.raises(ValueError, match="mode must be one of"):
        ChildTuningTrainer(model=model, args=args, train_dataset=RandomPairs(), child_tuning_mode="D",
                           reserve_p=RESERVE_P)
    with pytest.raises(ValueError, match="needs train_dataloader"):
        child_tuning_optimizer(model, args, mode="ChildTuning-D", reserve_p=RESERVE_P)
    for reserve_p in (0.0, 1.5, float("nan")):
        with pytest.raises(ValueError, match="reserve_p .* must be in \\(0.0, 1.0\\]"):
            child_tuning_optimizer(model, args, mode="ChildTuning-F", reserve_p=reserve_p)
    for reserve_p in (True, "0.3"):
        with pytest.raises(TypeError, match="reserve_p .* must be a number"):
            child_tuning_optimizer(model, args, mode="ChildTuning-F", reserve_p=reserve_p)
    opt = child_tuning_optimizer(model, args, mode="ChildTuning-F", reserve_p=torch.tensor(0.5))
    assert all(type(g["reserve_p"]) is float and g["reserve_p"] == 0.5 for g in opt.param_groups)
    with pytest.raises(TypeError, match="Fisher options\\s+apply to ChildTuning-D"):
        child_tuning_optimizer(model, args, mode="ChildTuning-F", reserve_p=RESERVE_P, storge="sparse")
    with pytest.raises(ValueError, match="needs ChildTuningTrainer"):
        child_tuning_optimizer(model, args, mode="ChildTuning-D", reserve_p=RESERVE_P, train_dataloader=loader,
                               storage="sparse", compact_grads=True)
    with pytest.raises(ValueError, match="fp16"):
        ChildTuningTrainer(model=model, args=training_args(tmp_path, fp16=True), train_dataset=RandomPairs(),
                           child_tuning_mode="ChildTuning-D", reserve_p=RESERVE_P, storage="sparse",
                           compact_grads=True).create_optimizer()


class CountingLoader:
    """A DataLoader that counts the batches taken from it: a Fisher pass would take some."""

    def __init__(self, loader):
        self.loader, self.taken = loader, 0

    def __iter__(self):
        for batch in self.loader:
            self.taken += 1
            yield batch

    def __len__(self):
        return len(self.loader)


@pytest.mark.parametrize("options, error, match", [
    (dict(storage="spares"), ValueError, "storage must be one of"),
    (dict(compact_grads=True), ValueError, "compact_grads=True needs storage='sparse'"),
    (dict(compact_grads="yes", storage="sparse"), TypeError, "compact_grads must be a bool"),
])
def test_storage_options_are_checked_before_the_fisher_pass(tmp_path, options, error, match):
    """Checked when the trainer is built, and by child_tuning_optimizer before it reads a batch
    (which refuses compact gradients of its own: see test_bad_input)."""
    model, args = tiny_bert(), training_args(tmp_path)
    with pytest.raises(error, match=match):
        ChildTuningTrainer(model=model, args=args, train_dataset=RandomPairs(), child_tuning_mode="ChildTuning-D",
                           reserve_p=RESERVE_P, **options)
    if "compact_grads" not in options:
        loader = CountingLoader(DataLoader(RandomPairs(), batch_size=8))
        with pytest.raises(error, match=match):
            child_tuning_optimizer(model, args, mode="ChildTuning-D", reserve_p=RESERVE_P, train_dataloader=loader,
                                   **options)
        assert loader.taken == 0


def test_options_that_childtuning_f_would_ignore_are_refused(tmp_path):
    model, args = tiny_bert(), training_args(tmp_path)
    make = dict(model=model, args=args, train_dataset=RandomPairs(), child_tuning_mode="ChildTuning-F",
                reserve_p=RESERVE_P)
    with pytest.raises(TypeError, match="unexpected max_fisher_batches with mode='ChildTuning-F'"):
        ChildTuningTrainer(**make, max_fisher_batches=2)
    with pytest.raises(TypeError, match="unexpected include with mode='ChildTuning-F'"):
        ChildTuningTrainer(**make, fisher_kwargs={"include": "layer"})
    with pytest.raises(ValueError, match="storage='sparse' needs ChildTuning-D's fixed mask"):
        ChildTuningTrainer(**make, storage="sparse")
    with pytest.raises(TypeError, match="unexpected max_batches with mode='ChildTuning-F'"):
        child_tuning_optimizer(model, args, mode="ChildTuning-F", reserve_p=RESERVE_P, max_batches=2)


@pytest.mark.parametrize("optim", ["adafactor", "sgd", "adamw_torch_8bit", "adamw_torch_4bit", "adamw_anyprecision"])
def test_an_optimizer_choice_the_trainer_would_not_use_is_refused(tmp_path, optim):
    """Another optimizer, or an AdamW with quantised or other-precision state, would silently become
    MaskedAdamW's fp32 AdamW."""
    with pytest.raises(ValueError, match=f"TrainingArguments\\(optim='{optim}'\\): ChildTuningTrainer trains with"):
        ChildTuningTrainer(model=tiny_bert(), args=training_args(tmp_path, optim=optim), train_dataset=RandomPairs(),
                           child_tuning_mode="ChildTuning-F", reserve_p=RESERVE_P)
    ChildTuningTrainer(model=tiny_bert(), args=training_args(tmp_path, optim="adamw_torch"),
                       train_dataset=RandomPairs(), child_tuning_mode="ChildTuning-F", reserve_p=RESERVE_P)


def test_optimizer_settings_the_masked_adamw_would_ignore_are_refused(tmp_path):
    model = tiny_bert()
    make = dict(model=model, train_dataset=RandomPairs(), child_tuning_mode="ChildTuning-F", reserve_p=RESERVE_P)
    with pytest.raises(ValueError, match=r"TrainingArguments\(optim_args='amsgrad=True'\) would be ignored"):
        ChildTuningTrainer(args=training_args(tmp_path, optim_args="amsgrad=True"), **make)
    given = [dict(optimizers=(torch.optim.SGD(model.parameters(), lr=0.1), None)),
             dict(optimizer_cls_and_kwargs=(torch.optim.SGD, {"lr": 0.1}))]
    for options in given:
        with pytest.raises(ValueError, match="ChildTuningTrainer builds its own MaskedAdamW"):
            ChildTuningTrainer(args=training_args(tmp_path), **make, **options)


@pytest.mark.parametrize("world_size", [1, 2])
def test_childtuning_d_sums_the_fisher_scores_over_the_ranks_of_a_distributed_run(tmp_path, monkeypatch, world_size):
    """Each rank's Trainer scores its own share of the data: several ranks sum their scores, so every
    rank selects one mask (tests/fisher_ranks_worker.py checks the sum itself on two ranks)."""
    import childopt.integrations.transformers as integration

    asked = []
    monkeypatch.setattr(integration, "fisher_mask", lambda *a, **k: asked.append(k) or {})
    monkeypatch.setattr(TrainingArguments, "world_size", property(lambda self: world_size))
    child_tuning_optimizer(tiny_bert(), training_args(tmp_path), mode="ChildTuning-D", reserve_p=0.3,
                           train_dataloader=DataLoader(RandomPairs(4), batch_size=2))
    assert asked[0]["across_ranks"] is (world_size > 1)


class BatchNormClassifier(nn.Module):
    """Embedding, BatchNorm and a head: running statistics that any extra train-mode forward moves."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embeddings = nn.EmbeddingBag(100, 16)
        self.layer = nn.Sequential(nn.Linear(16, 16), nn.BatchNorm1d(16), nn.ReLU())
        self.head = nn.Linear(16, 2)

    def forward(self, input_ids, attention_mask=None, labels=None):
        logits = self.head(self.layer(self.embeddings(input_ids)))
        return {"loss": nn.functional.cross_entropy(logits, labels), "logits": logits}


def assert_bitwise_equal(a, b, where="state"):
    """Nested dicts, lists and tuples of tensors and plain values, equal bit for bit."""
    if isinstance(a, torch.Tensor):
        same = isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
        assert same, f"{where} differs"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for key in a:
            assert_bitwise_equal(a[key], b[key], f"{where}[{key!r}]")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_bitwise_equal(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def count_fisher_passes(monkeypatch) -> list:
    """Make the integration record each Fisher pass it runs; returns the (growing) record."""
    import childopt.integrations.transformers as integration

    calls = []
    fisher_mask = integration.fisher_mask
    monkeypatch.setattr(integration, "fisher_mask", lambda *a, **k: calls.append(1) or fisher_mask(*a, **k))
    return calls


def checkpointed_trainer(output_dir, model=None, save_only_model=False, reserve_p=RESERVE_P,
                         **options) -> ChildTuningTrainer:
    """ChildTuning-D for 4 steps, saving a checkpoint every 2 (with optimizer state unless save_only_model)."""
    args = training_args(output_dir, max_steps=4, save_strategy="steps", save_steps=2, seed=5,
                         save_only_model=save_only_model)
    return ChildTuningTrainer(model=tiny_bert() if model is None else model, args=args,
                              train_dataset=RandomPairs(), child_tuning_mode="ChildTuning-D", reserve_p=reserve_p,
                              **options)


@pytest.mark.parametrize("storage, compact_grads, make_model", [("dense", False, tiny_bert),
                                                                ("sparse", True, tiny_bert),
                                                                ("dense", False, BatchNormClassifier)],
                         ids=["dense", "sparse-compact", "batchnorm"])
def test_resumed_childtuning_d_takes_its_mask_from_the_checkpoint(tmp_path, monkeypatch, recwarn, storage,
                                                                  compact_grads, make_model):
    """The Trainer builds the optimizer before loading the checkpoint: a Fisher pass there would be
    wasted (the load replaces its mask) and its train-mode forwards would move BatchNorm statistics."""
    passes = count_fisher_passes(monkeypatch)
    options = dict(storage=storage, compact_grads=compact_grads)
    whole = checkpointed_trainer(tmp_path / "whole", make_model(), **options)
    whole.train()
    assert len(passes) == 1
    resumed = checkpointed_trainer(tmp_path / "resumed", make_model(), **options)
    resumed.train(resume_from_checkpoint=str(tmp_path / "whole" / "checkpoint-2"))
    assert len(passes) == 1  # no second pass
    assert not [w for w in recwarn if "has no effect without a mask" in str(w.message)]
    optimizer = unwrap(resumed.optimizer)
    assert optimizer.mask_kind == "dense" and optimizer.compact_grads is compact_grads
    assert_bitwise_equal(dict(resumed.model.state_dict()), dict(whole.model.state_dict()), "model")
    assert_bitwise_equal(optimizer.state_dict(), unwrap(whole.optimizer).state_dict(), "optimizer")


def test_resume_without_optimizer_state_runs_the_fisher_pass(tmp_path, monkeypatch):
    """save_only_model=True saves no optimizer state: the mask comes from a Fisher pass again.
    resume_from_checkpoint=True (the last checkpoint) with optimizer state skips it."""
    passes = count_fisher_passes(monkeypatch)
    checkpointed_trainer(tmp_path / "model_only", save_only_model=True).train()
    resumed = checkpointed_trainer(tmp_path / "model_only", save_only_model=True)
    resumed.train(resume_from_checkpoint=True)
    assert len(passes) == 2
    assert any("mask" in s for s in unwrap(resumed.optimizer).state.values())
    checkpointed_trainer(tmp_path / "full").train()
    checkpointed_trainer(tmp_path / "full").train(resume_from_checkpoint=True)
    assert len(passes) == 3


def test_resume_fails_before_any_fisher_pass_or_step_without_the_saved_mask(tmp_path, monkeypatch):
    """A storage mismatch is reported without a wasted pass; a load that leaves no mask refuses to
    train, and the maskless optimizer is dropped (the next train() runs the Fisher pass)."""
    passes = count_fisher_passes(monkeypatch)
    checkpointed_trainer(tmp_path).train()
    checkpoint = str(tmp_path / "checkpoint-2")
    with pytest.raises(ValueError, match="saved with storage='dense'"):
        checkpointed_trainer(tmp_path / "sparse", storage="sparse").train(resume_from_checkpoint=checkpoint)
    assert len(passes) == 1

    monkeypatch.setattr(Trainer, "_load_optimizer_and_scheduler", lambda self, checkpoint: None)
    trainer = checkpointed_trainer(tmp_path / "unloaded")
    with pytest.raises(RuntimeError, match="left the optimizer without one"):
        trainer.train(resume_from_checkpoint=checkpoint)
    assert trainer.optimizer is None and len(passes) == 1
    trainer.train()
    states = unwrap(trainer.optimizer).state.values()
    assert len(passes) == 2 and any("mask" in s for s in states) and all(float(s["step"]) == 4 for s in states)


def test_resuming_with_another_reserve_p_warns_that_the_checkpoint_mask_is_kept(tmp_path, monkeypatch):
    """The resumed run keeps the checkpoint's mask (selected at 0.3): asking for 0.05 says so, at the
    line that calls train()."""
    passes = count_fisher_passes(monkeypatch)
    checkpointed_trainer(tmp_path).train()
    resumed = checkpointed_trainer(tmp_path / "resumed", reserve_p=0.05)
    with pytest.warns(UserWarning, match=r"keeps its mask, selected at reserve_p=0.3, not reserve_p=0.05") as caught:
        resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    assert (caught[0].filename, caught[0].lineno) == (__file__, sys._getframe().f_lineno - 1)
    assert len(passes) == 1


def test_optimizer_state_is_taken_only_beside_the_scheduler_state(tmp_path, monkeypatch):
    """The Trainer loads optimizer.pt only when scheduler.pt is there too: without it the resumed
    optimizer starts afresh (2 steps, not 4), so its mask comes from a Fisher pass."""
    passes = count_fisher_passes(monkeypatch)
    checkpointed_trainer(tmp_path / "whole").train()
    checkpoint = tmp_path / "whole" / "checkpoint-2"
    no_scheduler = tmp_path / "no_scheduler"
    shutil.copytree(checkpoint, no_scheduler)
    (no_scheduler / "scheduler.pt").unlink()
    assert (no_scheduler / "optimizer.pt").is_file()
    for source, fisher_passes, steps in ((no_scheduler, 2, 2), (checkpoint, 2, 4)):
        resumed = checkpointed_trainer(tmp_path / source.name / "resumed")
        resumed.train(resume_from_checkpoint=str(source))
        states = unwrap(resumed.optimizer).state.values()
        assert len(passes) == fisher_passes and any("mask" in s for s in states), source.name
        assert all(float(s["step"]) == steps for s in states), source.name
