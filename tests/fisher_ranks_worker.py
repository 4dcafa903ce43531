"""A torchrun worker (gloo, CPU) for tests/test_fisher.py: Fisher scores summed over DDP ranks.

Usage: ``torchrun --nproc_per_node N tests/fisher_ranks_worker.py``.  Each rank scores its own
batches, a different number on each rank, through a DistributedDataParallel model (fisher_scores'
across_ranks defaults on there) and selects a mask; rank 0 checks the scores against one process
scoring every rank's batches and that every rank selected the same mask, that an unwrapped model
with across_ranks=True scores alike, and that one scored per rank warns.  It also checks that the
sample estimator runs through DDP on a model with a buffer, that a compiled DDP model scores
alike, and that training through the wrapper after a Fisher pass keeps the replicas equal, for a
static graph scored before its first step and after a forward one rank left without backward
too; it prints what it found.
"""
from __future__ import annotations

import datetime
import gc
import os
import sys
import warnings

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from childopt.fisher import fisher_mask, fisher_scores  # noqa: E402


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 2))


def _batches(rank: int) -> list:
    """Rank r's own batches: 3 + r of them (uneven counts: a per-batch collective would hang)."""
    gen = torch.Generator().manual_seed(100 + rank)
    return [(torch.randn(4, 5, generator=gen), torch.randint(0, 2, (4,), generator=gen)) for _ in range(3 + rank)]


def _loss(model, batch):
    x, y = batch
    return torch.nn.functional.cross_entropy(model(x), y)


def _replicas_equal_after_training(ddp: torch.nn.parallel.DistributedDataParallel, rank: int) -> bool:
    """Two SGD steps through the wrapper on each rank's own batches leave every replica the same."""
    sgd = torch.optim.SGD(ddp.parameters(), lr=0.1)
    for batch in _batches(rank)[:2]:
        _loss(ddp, batch).backward()
        sgd.step()
        sgd.zero_grad()
    flat = torch.cat([p.detach().reshape(-1) for p in ddp.parameters()])
    gathered = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, flat)
    return all(torch.equal(g, gathered[0]) for g in gathered)


def _reducer_left_alone(rank: int, options: dict) -> tuple:
    """Models whose reducer a Fisher pass through the wrapper must not touch: a static graph scored
    before its first step (the reducer records that step's gradients from every backward), and a
    model through which rank 0 alone ran a forward without its backward (a logged loss: the
    reducer waits for that backward's hooks).  Both train on with equal replicas afterwards."""
    static = torch.nn.parallel.DistributedDataParallel(_model(), static_graph=True)
    fisher_scores(static, _batches(rank), **options)
    fisher_scores(static, _batches(rank), estimator="sample", **options)
    dangling = torch.nn.parallel.DistributedDataParallel(_model())
    if rank == 0:
        _loss(dangling, _batches(rank)[0])
    fisher_scores(dangling, _batches(rank), **options)
    return _replicas_equal_after_training(static, rank), _replicas_equal_after_training(dangling, rank)


def main() -> None:
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    _check(dist.get_rank(), dist.get_world_size())
    # Free the DDP models (their reference cycles need the collector) before the group goes: one
    # alive at destroy_process_group aborted a rank at exit ("terminate called without an active
    # exception") in 5 of 16 runs of a plain DDP script on this CPU, and in none of 12 once collected.
    gc.collect()
    dist.destroy_process_group()


def _check(rank: int, world: int) -> None:
    ddp = torch.nn.parallel.DistributedDataParallel(_model())
    options = dict(loss_fn=_loss, include=None, progress=False)
    scores = fisher_scores(ddp, _batches(rank), **options)
    masks = fisher_mask(ddp, _batches(rank), 0.3, **options)
    unwrapped = fisher_scores(_model(), _batches(rank), across_ranks=True, **options)
    same_unwrapped = all(torch.equal(unwrapped[n], scores[f"module.{n}"]) for n in unwrapped)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fisher_scores(_model(), _batches(rank), **options)  # per rank, as before DDP wraps the model
    warned = any("Pass across_ranks=True" in str(w.message) for w in caught)
    in_step = _replicas_equal_after_training(ddp, rank)
    buffered = _model()
    buffered.register_buffer("scale", torch.ones(1))  # DDP syncs buffers in forward: not inside vmap
    sampled = fisher_scores(torch.nn.parallel.DistributedDataParallel(buffered), _batches(rank),
                            estimator="sample", **options)
    sampled_alike = fisher_scores(_model(), _batches(rank), estimator="sample", across_ranks=True, **options)
    same_sampled = all(torch.equal(sampled_alike[n], sampled[f"module.{n}"]) for n in sampled_alike)
    static_in_step, dangling_in_step = _reducer_left_alone(rank, options)
    compiled = fisher_scores(torch.compile(torch.nn.parallel.DistributedDataParallel(_model()), backend="eager"),
                             _batches(rank), **options)
    same_compiled = all(torch.equal(compiled[f"_orig_mod.{n}"], s) for n, s in scores.items())
    flat = torch.cat([masks[n].reshape(-1) for n in sorted(masks)]).to(torch.uint8)
    gathered = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(gathered, flat)
    if rank == 0:
        alone = fisher_scores(_model(), [b for r in range(world) for b in _batches(r)], **options)
        worst = max(float(((scores[f"module.{n}"] - s).abs() / s.abs().clamp(min=1e-12)).max())
                    for n, s in alone.items())
        print(f"scores vs one process over every rank's batches: max relative difference {worst:.3e}")
        print(f"masks equal on all {world} ranks: {all(torch.equal(g, gathered[0]) for g in gathered)}")
        print(f"kept {int(flat.sum())} of {flat.numel()}")
        print(f"an unwrapped model with across_ranks=True scores alike: {same_unwrapped}")
        print(f"an unwrapped model scored per rank warns: {warned}")
        print(f"replicas equal after training through the wrapper: {in_step}")
        print(f"the sample estimator through DDP, with a buffer, scores alike: {same_sampled}")
        print(f"static_graph scored before its first step, replicas equal after training: {static_in_step}")
        print(f"a forward left without backward on one rank, replicas equal after training: {dangling_in_step}")
        print(f"a compiled DDP model sums over the ranks and scores alike: {same_compiled}")


if __name__ == "__main__":
    main()
