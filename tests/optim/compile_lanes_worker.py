"""A compiled training step on a one-rank FSDP2 model with a Bernoulli MaskedAdamW whose shards start
inside Philox groups; prints ``equal <bool>`` (compiled vs eager parameters, bit for bit).

usage: torchrun --nproc-per-node 1 compile_lanes_worker.py BACKEND (tests/optim/test_compile_lanes.py)

One rank keeps it fast; its shards start at element 0, so each parameter is given a
non-zero lane by hand, as a rank whose shard starts inside a group would have (the lanes' draws
against a single process's are tested in tests/optim/test_philox_lanes.py).  After two warm-up
steps (the second compiles again because the state now exists) further steps must not recompile.
"""
import sys
import warnings

import torch
import torch._dynamo
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from childopt import MaskedAdamW

WARM, STEPS = 2, 4


def _train(compiled: bool, mesh, backend: str) -> list:
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(10, 7), torch.nn.Tanh(), torch.nn.Linear(7, 5))
    for layer in (model[0], model[2], model):
        fully_shard(layer, mesh=mesh)
    opt = MaskedAdamW(list(model.named_parameters()), lr=1e-2, mask="bernoulli", reserve_p=0.5, seed=3,
                      sync_seed=False, backend=backend)
    opt._rng_lanes = {p: 1 + i % 3 for i, p in enumerate(opt._rng_lanes)}

    def step(x, y):
        loss = (model(x) - y).square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad()

    fn = torch.compile(step) if compiled else step
    for s in range(STEPS):
        gen = torch.Generator().manual_seed(s)
        with torch._dynamo.config.patch(error_on_recompile=compiled and s >= WARM):
            fn(torch.randn(4, 10, generator=gen), torch.randn(4, 5, generator=gen))
    return [p.full_tensor() for p in model.parameters()]


def main() -> None:
    warnings.filterwarnings("ignore")
    dist.init_process_group("gloo")
    try:
        mesh = init_device_mesh("cpu", (1,))
        eager, compiled = _train(False, mesh, sys.argv[1]), _train(True, mesh, sys.argv[1])
        print("equal", all(torch.equal(a, b) for a, b in zip(eager, compiled)), flush=True)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
