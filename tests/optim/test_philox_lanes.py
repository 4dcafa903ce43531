"""A shard that starts inside a Philox group draws what the full tensor draws at those entries.

Oracle: one step of the whole tensor (lane 0).  A shard is a slice ``[offset:]`` stepped on its
own with ``rng_base + offset // 4`` and lane ``offset % 4`` (what MaskedAdamW passes for a DTensor
shard, childopt.optim.sharding); its parameters and moments must equal the full step's slice
bit for bit, on every backend, for heads shorter than 4 - lane (tiny shards) included.
"""
import pytest
import torch

from childopt import backends
from childopt.backends.contract import MaskKind
from childopt.optim.functional import masked_adamw
from tests.helpers import kernel_backend

BASE, SEED, NUMEL = 5, 77, 23


def _step(tensors, steps, rng_base, lane, backend, *, freeze, amsgrad, count=3):
    params, exp_avgs, exp_avg_sqs, vmaxes = tensors
    for t in range(count):
        gen = torch.Generator().manual_seed(t)
        full_grad = torch.randn(NUMEL, generator=gen)
        grads = [full_grad[NUMEL - p.numel():].to(p.dtype).view_as(p) for p in params]
        masked_adamw(params, grads, exp_avgs, exp_avg_sqs, vmaxes if amsgrad else None, steps,
                     masks=[None] * len(params), indices=[None] * len(params), compact_grads=[False] * len(params),
                     rng_bases=[rng_base] * len(params), rng_lanes=[lane] * len(params),
                     backend=lambda device: backend, mask_kind=MaskKind.BERNOULLI, freeze=freeze, reserve_p=0.5,
                     seed=SEED, lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1, amsgrad=amsgrad,
                     maximize=False)


def _state(param):
    """[params], [exp_avgs], [exp_avg_sqs], [vmaxes] of one tensor."""
    return [[param]] + [[torch.zeros(param.shape, device=param.device)] for _ in range(3)]


def _backend(name, device):
    return kernel_backend(name) if name != "reference" else backends.create(name, torch.device(device))


@pytest.mark.parametrize("offset", [1, 2, 3, 5, 6, 7, 20, 21, 22])
@pytest.mark.parametrize("masked", ["freeze", "zero_grad"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_shard_steps_its_slice_of_the_full_tensor(lane, offset, masked, dtype):
    name, device = lane
    backend = _backend(name, device)
    full = torch.randn(NUMEL, generator=torch.Generator().manual_seed(3)).to(device=device, dtype=dtype)
    whole, shard = _state(full.clone()), _state(full[offset:].clone())
    whole_steps, shard_steps = [torch.zeros(())], [torch.zeros(())]
    kwargs = dict(freeze=masked == "freeze", amsgrad=True)
    _step(whole, whole_steps, BASE, 0, backend, **kwargs)
    _step(shard, shard_steps, BASE + offset // 4, offset % 4, backend, **kwargs)
    for (got,), (expected,) in zip(shard, whole):
        assert torch.equal(got, expected[offset:]), (name, offset)
    assert shard_steps[0].item() == whole_steps[0].item() == 3


def test_a_strided_shard_is_stepped_and_written_back(lane):
    backend = _backend(*lane)
    full = torch.randn(NUMEL, generator=torch.Generator().manual_seed(4)).to(lane[1])
    whole = _state(full.clone())
    storage = torch.zeros(2 * (NUMEL - 6), device=lane[1])
    strided = storage[::2]  # not contiguous: the split steps a copy and writes it back
    strided.copy_(full[6:])
    shard = _state(strided)
    _step(whole, [torch.zeros(())], BASE, 0, backend, freeze=False, amsgrad=False)
    _step(shard, [torch.zeros(())], BASE + 1, 2, backend, freeze=False, amsgrad=False)
    assert torch.equal(storage[::2], whole[0][0][6:])
    assert torch.equal(storage[1::2], torch.zeros(NUMEL - 6, device=lane[1]))
