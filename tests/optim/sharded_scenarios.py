"""Optimizer runs that tests/optim/test_sharding.py compares across world sizes.

Each scenario builds the same parameters and feeds the same (already averaged) gradients for a
few steps, on plain tensors in one process (the oracle) or on DTensors sharded by rows in a
torchrun worker, with dense or sparse-index storage (tests/optim/sharded_worker.py).  The shapes give uneven shards, shards starting
inside a Philox group (row sizes 1, 5 and 6) and, at world sizes 2 and 3, empty ones.
"""
from __future__ import annotations

import torch

from childopt import ChildTuningAdamW, MaskedAdamW, sparse
from childopt.optim import sharding

SHAPES = {"w1": (7, 5), "b1": (7,), "w2": (3, 6), "b2": (3,), "tiny": (1, 3), "big": (33, 9)}
STEPS = 3


def full_params() -> dict:
    gen = torch.Generator().manual_seed(0)
    params = {name: torch.randn(shape, generator=gen) for name, shape in SHAPES.items()}
    params["bf16"] = torch.randn(10, 3, generator=gen).to(torch.bfloat16)
    return params


def full_grads(step: int) -> dict:
    gen = torch.Generator().manual_seed(1000 + step)
    return {name: torch.randn(p.shape, generator=gen).to(p.dtype) for name, p in full_params().items()}


def full_masks() -> dict:
    gen = torch.Generator().manual_seed(7)
    return {name: torch.rand(p.shape, generator=gen) < 0.4 for name, p in full_params().items()}


def _masked(mask, masked, **kwargs):
    def build(named, backend):
        return MaskedAdamW(named, lr=1e-2, weight_decay=0.1, mask=mask() if callable(mask) else mask,
                           masked=masked, seed=11, backend=backend, **kwargs)
    return build


def _childtuning(mode, **kwargs):
    def build(named, backend):
        opt = ChildTuningAdamW(named, lr=1e-2, weight_decay=0.01, mode=mode, seed=11, backend=backend, **kwargs)
        if mode == "ChildTuning-D":
            opt.set_gradient_mask(full_masks())
        return opt
    return build


def _remasked(named, backend):
    """Sparse storage through every change of layout before the scenario's steps: dense moments
    gathered onto a first mask, remapped onto a second, and scattered back to dense moments for
    the parameter the second mask leaves out (``b1``).  The warm-up gradient is the parameter
    itself, halved: a different value at every entry, computed on each rank's own shard."""
    opt = MaskedAdamW(named, lr=1e-2, weight_decay=0.1, seed=11, backend=backend, storage="sparse")
    first = full_masks()
    second = {name: ~mask for name, mask in first.items() if name != "b1"}
    for mask in (first, second):
        for _, p in named:
            p.grad = p.detach() * 0.5
        opt.step()
        opt.set_mask(mask)
    return opt


SCENARIOS = {
    "none": _masked(None, None),
    "dense-freeze": _masked(full_masks, "freeze"),
    "dense-zero_grad": _masked(full_masks, "zero_grad"),
    "bernoulli-zero_grad": _masked("bernoulli", "zero_grad", reserve_p=0.5),
    "bernoulli-freeze-amsgrad": _masked("bernoulli", "freeze", reserve_p=0.5, amsgrad=True),
    "bernoulli-capturable": _masked("bernoulli", "zero_grad", reserve_p=0.3, capturable=True),
    "childtuning-F": _childtuning("ChildTuning-F", reserve_p=0.4),
    "childtuning-D": _childtuning("ChildTuning-D"),
    "sparse": _masked(full_masks, "freeze", storage="sparse"),
    "sparse-amsgrad": _masked(full_masks, "freeze", storage="sparse", amsgrad=True),
    "sparse-remasked": _remasked,
}


def build(scenario: str, backend: str, to_param):
    """A module holding the scenario's parameters (``to_param`` of the full ones) and its optimizer."""
    module = torch.nn.Module()
    for name, value in full_params().items():
        module.register_parameter(name, torch.nn.Parameter(to_param(value)))
    return module, SCENARIOS[scenario](list(module.named_parameters()), backend)


def train(module, opt, to_grad, start: int = 0, steps: int = STEPS) -> None:
    """Steps ``start .. start + steps - 1`` with the full gradients passed through ``to_grad``."""
    params = dict(module.named_parameters())
    for step in range(start, start + steps):
        for name, grad in full_grads(step).items():
            params[name].grad = to_grad(grad)
        opt.step()


def collect(module, opt, to_full) -> dict:
    """Full parameters and moments by name (``to_full`` gathers a shard into a full tensor)."""
    result = {}
    for name, p in module.named_parameters():
        result[name] = to_full(p.detach())
        for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
            if key in opt.state[p]:
                result[f"{name}.{key}"] = to_full(dense_moment(opt.state[p], p, key))
    return result


def dense_moment(state: dict, p: torch.Tensor, key: str) -> torch.Tensor:
    """A moment in the parameter's shape (sparse storage keeps it at its indices: zero elsewhere);
    a DTensor parameter's as a DTensor of its placement."""
    if "indices" not in state:
        return state[key]
    dense = sparse.scatter(state[key], state["indices"], sharding.local(p).shape)
    return sharding.wrap_like(dense, p) if sharding.is_dtensor(p) else dense


def run(scenario: str, backend: str, steps: int = STEPS) -> dict:
    """The oracle: ``scenario`` on plain tensors in this process."""
    module, opt = build(scenario, backend, lambda t: t.clone())
    train(module, opt, lambda g: g, steps=steps)
    return collect(module, opt, lambda t: t.clone())


def clip(module, opt, to_grad, to_full, max_norm: float = 0.5) -> dict:
    """``opt.clip_grad_norm_`` of the step-0 gradients: the total norm and the clipped gradients."""
    params = dict(module.named_parameters())
    for name, grad in full_grads(0).items():
        params[name].grad = to_grad(grad)
    total = opt.clip_grad_norm_(max_norm)
    return {"total": total.clone(), **{name: to_full(p.grad) for name, p in params.items()}}


def clipped(scenario: str, backend: str) -> dict:
    """The oracle of :func:`clip` on plain tensors."""
    module, opt = build(scenario, backend, lambda t: t.clone())
    return clip(module, opt, lambda g: g, lambda t: t.clone())


SCOPES = ("global", "layer", "tensor")


def full_scores() -> dict:
    """Scores with many ties (few distinct values), named by layer, fp32 and one float64."""
    gen = torch.Generator().manual_seed(5)
    scores = {f"layer.{i % 3}.{name}": torch.randint(0, 6, shape, generator=gen).float()
              for i, (name, shape) in enumerate(SHAPES.items())}
    scores["head.weight"] = torch.rand(4, 3, generator=gen, dtype=torch.float64)
    return scores


def selections(to_score, to_full) -> dict:
    """select_mask and sample_mask of :func:`full_scores` in every scope, as full masks."""
    from childopt.masks import sample_mask, select_mask

    scores = {name: to_score(t) for name, t in full_scores().items()}
    out = {}
    for scope in SCOPES:
        for name, mask in select_mask(scores, 0.37, scope=scope, backend="reference").items():
            out["select", scope, name] = to_full(mask)
        for name, mask in sample_mask(scores, 0.37, temperature=0.5, seed=3, scope=scope,
                                      backend="reference").items():
            out["sample", scope, name] = to_full(mask)
    return out


def fisher_masks(wrap, to_full, across_ranks=None) -> dict:
    """fisher_mask (ChildTuning-D defaults: clip 1.0, global scope) of a small model, as full masks,
    and its scores (``("scores", name)``) from fisher_scores with ``across_ranks``.

    The loss is scaled so every gradient norm exceeds the clip: the per-tensor clip factors,
    reduced over the shards, then shape the scores.

    ``wrap(model)`` shards it (FSDP2's fully_shard) or leaves it; every rank sees the same batches,
    so FSDP2's averaged gradients equal one process's wherever the average of equal values is exact.
    """
    from childopt.fisher import fisher_mask, fisher_scores

    def model():
        torch.manual_seed(0)
        module = torch.nn.Sequential(torch.nn.Linear(6, 10), torch.nn.Tanh(), torch.nn.Linear(10, 3))
        wrap(module)
        return module

    gen = torch.Generator().manual_seed(9)
    batches = [(torch.randn(4, 6, generator=gen), torch.randint(0, 3, (4,), generator=gen)) for _ in range(3)]
    options = dict(include=None, progress=False, backend="reference",
                   loss_fn=lambda m, batch: 40 * torch.nn.functional.cross_entropy(m(batch[0]), batch[1]))
    out = {name: to_full(mask) for name, mask in fisher_mask(model(), batches, 0.4, **options).items()}
    scores = fisher_scores(model(), batches, across_ranks=across_ranks, **options)
    out.update({("scores", name): to_full(score) for name, score in scores.items()})
    return out


class _Branches(torch.nn.Module):
    """A trunk and two heads; a batch goes through one head (as a MoE expert or an optional head)."""

    def __init__(self):
        super().__init__()
        self.trunk, self.a, self.b = torch.nn.Linear(6, 8), torch.nn.Linear(8, 3), torch.nn.Linear(8, 3)

    def forward(self, x, head):
        return getattr(self, head)(self.trunk(x)).sum()


def fisher_passes(wrap, to_full) -> dict:
    """FisherAccumulator over three passes, the third through the other head: passes counted and scores."""
    from childopt.fisher import FisherAccumulator

    torch.manual_seed(0)
    model = _Branches()
    wrap(model)
    gen = torch.Generator().manual_seed(2)
    with FisherAccumulator(model, include=r"^(a|b)\.", backend="reference") as fisher:
        for head in ("a", "a", "b"):
            model(torch.randn(4, 6, generator=gen), head).backward()
            model.zero_grad()
    report = {"num_seen": fisher.num_seen, **{name: to_full(score) for name, score in fisher.scores().items()}}
    try:  # torch.autograd.grad gets no gradient for sharded parameters: refused, not scored as zeros
        fisher.accumulate_loss(model(torch.randn(4, 6, generator=gen), "a"))
        report["accumulate_loss_refused"] = False
    except RuntimeError as error:
        report["accumulate_loss_refused"] = "FSDP2 (DTensor)" in str(error)
    return report
