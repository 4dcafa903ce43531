"""ChildTuningTrainer's compact-gradient hooks live only while ``train()`` runs (CPU, tiny BERT).

After ``train()`` returns or raises, a plain backward on the model leaves the full dense ``.grad``
of a twin model that never met the Trainer (the hooks would slice and free it); a later
``train()`` puts the hooks back (the compact buffers fill, the dense ``.grad`` stays None before
each step) and ends bit for bit where the same calls with dense gradients end.
"""
import pytest
import torch
from torch.utils.data import DataLoader

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from transformers import TrainerCallback  # noqa: E402

from tests.integrations.test_transformers import (  # noqa: E402
    RESERVE_P, ChildTuningTrainer, RandomPairs, snapshot, tiny_bert, training_args, unwrap)


class SeesGradients(TrainerCallback):
    """Before each optimizer step: (compact buffers held, sparse parameters, of them with a dense .grad)."""

    def __init__(self):
        self.seen = []

    def on_pre_optimizer_step(self, args, state, control, *, optimizer, **kwargs):
        optimizer = unwrap(optimizer)
        sparse = [p for p, s in optimizer.state.items() if "indices" in s]
        self.seen.append((len(optimizer.compact_gradients()), len(sparse), sum(p.grad is not None for p in sparse)))


class FailsOnce(TrainerCallback):
    """Raises at the end of the first micro-batch: mid-accumulation, with gradients not yet stepped."""

    def __init__(self):
        self.failed = False

    def on_substep_end(self, args, state, control, **kwargs):
        if not self.failed:
            self.failed = True
            raise RuntimeError("interrupted")


def assert_plain_backward_is_dense(model):
    """A backward outside the Trainer gives every parameter the .grad a never-hooked twin gets."""
    twin = tiny_bert()
    twin.load_state_dict(model.state_dict())
    batch = next(iter(DataLoader(RandomPairs(), batch_size=8)))
    for m in (model, twin):
        m.eval()  # no dropout: the two backwards see one function
        m.zero_grad()
        m(**batch)["loss"].backward()
    want = dict(twin.named_parameters())
    for n, p in model.named_parameters():
        assert p.grad is not None and torch.equal(p.grad, want[n].grad), n
    model.zero_grad()


def train_twice(tmp_path, interrupt, **options):
    """train() (interrupted mid-accumulation or not), a plain backward, train() again: (model, what the
    optimizer saw in the second call)."""
    seen, fails = SeesGradients(), FailsOnce()
    args = training_args(tmp_path, per_device_train_batch_size=4, gradient_accumulation_steps=2, max_grad_norm=1.0)
    trainer = ChildTuningTrainer(model=tiny_bert(), args=args, train_dataset=RandomPairs(),
                                 child_tuning_mode="ChildTuning-D", reserve_p=RESERVE_P, **options,
                                 callbacks=[seen] + ([fails] if interrupt else []))
    if interrupt:
        with pytest.raises(RuntimeError, match="interrupted"):
            trainer.train()
    else:
        trainer.train()
    assert_plain_backward_is_dense(trainer.model)
    seen.seen.clear()
    trainer.train()
    assert_plain_backward_is_dense(trainer.model)
    return trainer.model, seen.seen


@pytest.mark.parametrize("interrupt", [False, True], ids=["returned", "raised"])
def test_hooks_are_removed_when_train_ends_and_put_back_by_the_next_train(tmp_path, interrupt):
    compact, seen = train_twice(tmp_path, interrupt, storage="sparse", compact_grads=True)
    assert len(seen) == 3 and all(held == sparse > 0 and dense == 0 for held, sparse, dense in seen)
    dense, _ = train_twice(tmp_path, interrupt)
    want = snapshot(dense)
    assert all(torch.equal(p, want[n]) for n, p in snapshot(compact).items())
