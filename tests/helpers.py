"""Shared test helpers: deterministic parameters, gradients and training loops."""
import math
import os
import subprocess
import sys

import pytest
import torch

from childopt import philox

MIXED_SHAPES = [(7, 5), (13,), (0,), (3, 4, 5), (1,), (33,), (2, 1, 3)]


def kernel_backend(name):
    """A kernel backend instance; Triton with small blocks so a few thousand elements span several."""
    from childopt import backends

    if name == "triton":
        return backends.MODULES[name].Backend(block=64, iters=2)
    return backends.MODULES[name].Backend()


def make_params(shapes, device="cpu", dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=gen).to(device=device, dtype=dtype)) for s in shapes]


def clone_params(params):
    return [torch.nn.Parameter(p.detach().clone()) for p in params]


def grads_at(params, step, seed=1):
    """Fresh gradient tensors for ``step`` (new allocations every step, as autograd gives)."""
    gen = torch.Generator().manual_seed(seed * 100_003 + step)
    return [torch.randn(p.shape, generator=gen).to(device=p.device, dtype=p.dtype) for p in params]


def train(opt, params, steps, start=0, grad_fn=grads_at):
    for t in range(start, start + steps):
        for p, g in zip(params, grad_fn(params, t)):
            p.grad = g
        opt.step()


def assert_steps_as_torch_adamw(opt, ours, theirs, steps, tol=None, **torch_options):
    """Train ``opt`` on ``ours`` and torch's one-tensor-at-a-time AdamW (``torch_options``) on
    ``theirs`` with the same gradients, and compare the weights (default tolerance: fp32's
    rtol 1e-5 / atol 1e-6, for operation orders that differ in the last bit)."""
    ref = torch.optim.AdamW(theirs, foreach=False, **torch_options)
    train(opt, ours, steps)
    train(ref, theirs, steps)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, **(tol or dict(rtol=1e-5, atol=1e-6)))
    return ref


def masks_for(params, density=0.4, seed=5):
    gen = torch.Generator().manual_seed(seed)
    return {p: (torch.rand(p.shape, generator=gen) < density).to(p.device) for p in params}


def snapshot(opt, params, keys=("exp_avg", "exp_avg_sq")):
    """Copies of params and the named state of each, for bitwise comparisons."""
    return [p.detach().clone() for p in params] + [
        opt.state[p][k].clone() for p in params for k in keys if k in opt.state[p]
    ]


def assert_all_equal(xs, ys):
    assert len(xs) == len(ys)
    for x, y in zip(xs, ys):
        assert torch.equal(x, y)


def bernoulli_keep_at(params, seed, reserve_p):
    """The Philox definition of the Bernoulli masks: tensor ``i`` owns the 4-element counter groups
    after those of the tensors before it (childopt.philox, checked in tests/test_philox.py);
    ``keep_at(i, t)`` is its bool mask at step ``t`` (1-based)."""
    bases = [0]
    for p in params:
        bases.append(bases[-1] + math.ceil(p.numel() / 4))
    return lambda i, t: philox.bernoulli_keep(params[i].numel(), bases[i], seed, t, reserve_p,
                                              params[i].device).reshape(params[i].shape)


def capture_step(opt, warmup=3):
    """``opt.step()`` warmed up ``warmup`` times on a side stream (as CUDA graph capture needs),
    then captured once; returns the graph (its replay is one more step)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            opt.step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt.step()
    return graph


TORCHRUN_TIMEOUT_S = 300


def torchrun(world: int, *args: str) -> str:
    """Run ``args`` (a script or ``-m module`` and its arguments) under torchrun on CPU; its stdout.

    A subprocess under a timeout, so a hung collective fails the test instead of stalling CI; a
    non-zero exit fails it with the end of stderr.
    """
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}", *args]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=TORCHRUN_TIMEOUT_S,
                              env={**os.environ, "OMP_NUM_THREADS": "1"}, start_new_session=True)
    except subprocess.TimeoutExpired as timeout:
        pytest.fail(f"{world} ranks hung for {TORCHRUN_TIMEOUT_S} s:\n{(timeout.stderr or b'')[-4000:]}")
    assert done.returncode == 0, f"{world} ranks failed:\n{done.stderr[-6000:]}"
    return done.stdout


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """fp32 tensors equal bit for bit, any NaN equal to any NaN."""
    return bool(((a.view(torch.int32) == b.view(torch.int32)) | (a.isnan() & b.isnan())).all())
