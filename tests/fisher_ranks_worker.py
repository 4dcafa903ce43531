"""A torchrun worker (gloo, CPU) for tests/test_fisher.py: Fisher scores summed over DDP ranks.

Usage: ``torchrun --nproc_per_node N tests/fisher_ranks_worker.py``.  Each rank scores its own
batches through a DistributedDataParallel model (fisher_scores' across_ranks defaults on there)
and selects a mask; rank 0 checks the scores against one process scoring every rank's batches
and that every rank selected the same mask, that an unwrapped model with across_ranks=True scores
alike, and that one scored per rank warns; it prints what it found.
"""
from __future__ import annotations

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
    gen = torch.Generator().manual_seed(100 + rank)
    return [(torch.randn(4, 5, generator=gen), torch.randint(0, 2, (4,), generator=gen)) for _ in range(3)]


def _loss(model, batch):
    x, y = batch
    return torch.nn.functional.cross_entropy(model(x), y)


def main() -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
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
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
