"""childopt.integrations.transformers on a tiny BERT built from a config, through the real Trainer (CPU).

Checked: the weight-decay groups equal the Trainer's and the hyper-parameters come from
TrainingArguments; ChildTuning-D keeps exactly round(reserve_p * n) entries of the ``layer``
parameters and leaves the others bit-identical while everything else trains; ChildTuning-F
trains; the stock ``Trainer(optimizers=(opt, None))`` path; compact gradients through
ChildTuningTrainer follow the dense run bit for bit (so their buffers are cleared every step) and
are clipped by the optimizer; and bad input (compact gradients outside ChildTuningTrainer
included) fails with clear errors.
"""
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
    for reserve_p in (0.0, 1.5, float("nan"), True, "0.3"):
        with pytest.raises(ValueError, match="reserve_p must be"):
            child_tuning_optimizer(model, args, mode="ChildTuning-F", reserve_p=reserve_p)
    with pytest.raises(TypeError, match="Fisher options apply to ChildTuning-D"):
        child_tuning_optimizer(model, args, mode="ChildTuning-F", reserve_p=RESERVE_P, storge="sparse")
    with pytest.raises(ValueError, match="needs ChildTuningTrainer"):
        child_tuning_optimizer(model, args, mode="ChildTuning-D", reserve_p=RESERVE_P, train_dataloader=loader,
                               storage="sparse", compact_grads=True)
    with pytest.raises(ValueError, match="fp16"):
        ChildTuningTrainer(model=model, args=training_args(tmp_path, fp16=True), train_dataset=RandomPairs(),
                           child_tuning_mode="ChildTuning-D", reserve_p=RESERVE_P, storage="sparse",
                           compact_grads=True).create_optimizer()


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
