"""A torchrun worker (gloo, CPU) for tests/optim/test_compile_ranks.py: a compiled step with a
Bernoulli mask under torch.distributed agrees on the seed as an eager step does.

Usage: ``torchrun --nproc_per_node N tests/optim/compile_ranks_worker.py``.  Each rank seeds torch's
generator differently, so a drawn seed differs between ranks until they agree on rank 0's.  For a
drawn seed, a given one, and a run loaded from a state dict (which agrees again), rank 0 prints
whether the compiled run's parameters and seed equal the eager run's on every rank, bit for bit,
and the graph breaks of the compiled run.
"""
from __future__ import annotations

import os
import sys
import warnings

import torch
import torch._dynamo
import torch.distributed as dist
from torch._dynamo.utils import counters

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

from childopt import MaskedAdamW  # noqa: E402

STEPS = 3


def _run(variant: str, compiled: bool) -> tuple:
    """The parameter and seed after STEPS steps, and the graph breaks taken."""
    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(100 + dist.get_rank())  # a drawn seed differs between the ranks
    p = torch.nn.Parameter(torch.linspace(-1, 1, 37))
    grad = torch.linspace(0.5, -0.5, 37)
    opt = MaskedAdamW([p], lr=0.1, mask="bernoulli", reserve_p=0.5, seed=3 if variant == "given" else None,
                      backend="reference")

    def step():
        p.grad = grad.clone()
        opt.step()

    if variant == "reload":  # a resumed run: one eager step, then the loaded seed is agreed again
        step()
        opt.load_state_dict(opt.state_dict())
    fn = torch.compile(step) if compiled else step
    for _ in range(STEPS - (variant == "reload")):
        fn()
    return p.detach().clone(), opt.seed, sum(counters["graph_break"].values())


def _gathered(value) -> list:
    values = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


def main() -> None:
    warnings.filterwarnings("ignore")
    dist.init_process_group("gloo")
    for variant in ("drawn", "given", "reload"):
        eager, eager_seed, _ = _run(variant, compiled=False)
        compiled, seed, breaks = _run(variant, compiled=True)
        same = _gathered(torch.equal(compiled, eager) and seed == eager_seed)
        ranks_agree = len({s for s in _gathered(seed)}) == 1
        if dist.get_rank() == 0:
            print(f"{variant}: compiled equals eager on every rank: {all(same)}; one seed on every rank: "
                  f"{ranks_agree}; graph breaks: {breaks}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
