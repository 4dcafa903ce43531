"""What only the Triton backend has: block sizes, launch grouping, the plan cache, int64 offsets.

Agreement with the reference on every mask kind is tested for both kernel backends in
test_kernel_backends.py.
"""
import pytest
import torch

from childopt import MaskedAdamW, backends, philox
from childopt.backends import triton as triton_backend
from childopt.kernels import masked_adamw
from tests.helpers import MIXED_SHAPES, bernoulli_keep_at, clone_params, make_params, train

ODD_SHAPES = MIXED_SHAPES + [(0, 4), (1031,), (5, 0)]


@pytest.fixture
def device(triton_device):
    return triton_device


@pytest.mark.parametrize("block,iters", [(4, 1), (64, 3), (256, 1), (1024, 2)])
def test_bernoulli_masks_follow_the_philox_definition_for_any_block_size(device, block, iters):
    """With beta1 = 0 and unit gradients, exp_avg after step 3 is 1 / reserve_p (fp32) exactly
    where the Philox definition keeps an entry at step 3, and 0 elsewhere, whatever the blocks."""
    params, seed = make_params(ODD_SHAPES, device), 2**40 + 17
    opt = MaskedAdamW(params, lr=0.0, betas=(0.0, 0.999), mask="bernoulli", reserve_p=0.3, seed=seed)
    opt._backends[torch.device(device)] = triton_backend.Backend(block=block, iters=iters)
    train(opt, params, 3, grad_fn=lambda ps, t: [torch.ones_like(p) for p in ps])
    keep_at = bernoulli_keep_at(params, seed, 0.3)
    for i, p in enumerate(params):
        expected = torch.where(keep_at(i, 3), torch.tensor(1 / 0.3, device=device), 0.0)
        assert torch.equal(opt.state[p]["exp_avg"], expected)


def test_one_launch_steps_a_whole_bucket(device, monkeypatch):
    calls = []
    original = masked_adamw.launch
    monkeypatch.setattr(masked_adamw, "launch", lambda *a, **k: (calls.append(1), original(*a, **k)))
    params = make_params([(3, 5)] * 40 + [(7,)] * 10, device)
    opt = MaskedAdamW(params, mask="bernoulli", reserve_p=0.5, seed=0, backend="triton")
    train(opt, params, 2)
    assert len(calls) == 2


def test_plan_cache_survives_new_gradient_storage(device):
    params = make_params([(9,), (4, 4)], device)
    opt = MaskedAdamW(params, lr=1e-2, seed=0, backend="triton")
    ref_params = clone_params(params)
    ref = MaskedAdamW(ref_params, lr=1e-2, seed=0, backend="reference")
    for t in range(4):
        for ps in (params, ref_params):
            for p in ps:
                p.grad = torch.full_like(p, float(t + 1))
        opt.step()
        ref.step()
        assert len(triton_backend._plans) <= triton_backend._PLAN_CACHE_SIZE
    for a, b in zip(params, ref_params):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_one_tensor_launches_reuse_their_plan_at_any_address(device, monkeypatch):
    """A Fisher hook launches per parameter with a fresh gradient each batch: after the first
    batch no plan is built (no table copies to the device), and the scores stay exact."""
    from childopt.kernels import fisher_accumulate

    built = []
    make_plan = fisher_accumulate.make_plan
    monkeypatch.setattr(fisher_accumulate, "make_plan", lambda *a, **k: built.append(1) or make_plan(*a, **k))
    triton_backend._plans.clear()
    backend = backends.create("triton", torch.device(device))
    shapes = [(7, 5), (13,), (33,)]
    fisher = [torch.zeros(s, device=device) for s in shapes]
    expected = [torch.zeros(s, device=device) for s in shapes]
    for batch in range(3):
        grads = [torch.randn(s, device=device) for s in shapes]
        _ = [torch.empty(batch + 1, device=device) for _ in shapes]  # move later allocations
        for f, e, g in zip(fisher, expected, grads):
            backend.fisher_accumulate([f], [g], torch.ones(1, device=device))
            e += g * g
        if batch == 0:
            assert len(built) == len(shapes)
    assert len(built) == len(shapes)
    for f, e in zip(fisher, expected):
        torch.testing.assert_close(f, e, rtol=1e-6, atol=0)


def test_buckets_with_the_same_byte_layout_and_other_dtypes_get_their_own_plans(device):
    """Element offsets depend on the element size: an fp32 and a bf16 list at the same byte
    offsets must not share a plan (the fp32 one would step the wrong elements)."""
    from childopt.kernels import masked_adamw

    triton_backend._plans.clear()
    buf32, buf16 = torch.zeros(1024, device=device), torch.zeros(1024, dtype=torch.bfloat16, device=device)
    moments = [torch.zeros(4, device=device) for _ in range(2)]
    plans = []
    for params in ([buf16[0:4], buf16[256:260]], [buf32[0:4], buf32[128:132]]):
        lists = masked_adamw.launch_lists(params, params, moments, moments, None, None)
        plans.append(triton_backend._plan(masked_adamw, lists))
    assert plans[0] is not plans[1]
    assert plans[1].table[1, 0].item() == 128  # the second fp32 tensor starts 128 elements in


@pytest.mark.parametrize("block,iters", [(64, 1), (64, 5), (128, 64), (None, None)],
                         ids=["64x1", "64x5", "128x64", "default"])
def test_histogram_counts_are_exact_however_chunks_split_the_scores(device, block, iters):
    """A program counts up to block * iters scores (a runtime loop over full blocks, then a tensor's
    partial last block) and flushes only its non-zero bins: the three passes of a selection must
    count exactly what the reference counts, for tensors spanning several chunks, ending inside a
    block or on a chunk edge, shorter than a block, and empty."""
    from childopt.backends import reference
    from childopt.kernels import radix_histogram

    b, chunk = block or 1024, (block or 1024) * (iters or radix_histogram.DEFAULT_ITERS)
    gen = torch.Generator().manual_seed(5)
    sizes = [2 * chunk + 2 * b + 17, chunk, b - 1, 1, 0, 3 * b]
    # few distinct values (ties in every bin), both zeros, negatives and infinities
    scores = [(torch.randint(-40, 40, (n,), generator=gen).float() / 8).to(device) for n in sizes]
    scores[0][:6] = torch.tensor([0.0, -0.0, float("inf"), float("-inf"), -0.0, 1e-40])
    scopes = [0, 1, 0, 2, 1, 2]
    keys = torch.stack([reference.score_keys(scores[i])[3] for i in (0, 1, 5)])  # one score of each scope
    backend = triton_backend.Backend(block=block, iters=iters)
    for shift, bits, pre in ((21, 11, torch.zeros_like(keys)), (10, 11, keys >> 21), (0, 10, keys >> 10)):
        got = backend.radix_histogram(scores, scopes, pre, shift, bits, 3)
        want = reference.Backend().radix_histogram(scores, scopes, pre, shift, bits, 3)
        assert torch.equal(got, want) and int(want.sum()) > 0
    assert int(got.sum()) < sum(sizes)  # the last pass counted only each scope's prefix


def test_histogram_programs_count_64_blocks_each():
    """The histogram plan gives each program 64 blocks (65,536 scores at the default block), so its
    flush of up to 2048 bins is amortised: 2^20 + 1 scores take 17 programs, not 257 as the step's 4."""
    from childopt.kernels import radix_histogram

    triton_backend._plans.clear()
    plan = triton_backend._plan(radix_histogram, {"scores": [torch.zeros(2**20 + 1)]}, (0,))
    assert (plan.block, plan.iters, plan.chunk_tensor.numel()) == (1024, 64, 17)
    assert plan.chunk_start[-1].item() == 2**20


def test_block_must_be_a_power_of_two(device):
    params = make_params([(4,)], device)
    lists = masked_adamw.launch_lists(params, params, params, params)
    with pytest.raises(ValueError, match="power of two"):
        masked_adamw.make_plan(lists, block=48)


def test_registry_reports_why_triton_cannot_run():
    ok, why = triton_backend.available(torch.device("meta"))
    assert not ok and "CUDA" in why
    with pytest.raises(RuntimeError, match="backend 'triton' cannot run on meta"):
        backends.create("triton", torch.device("meta"))


@pytest.mark.cuda
def test_launches_run_on_the_tensors_device_whatever_the_current_device():
    """A bucket on cuda:1 while cuda:0 is current: the launch follows the tensors (device guard)."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    params = make_params([(1031,), (7, 5)], "cuda:1")
    ref_params = clone_params(params)
    opt = MaskedAdamW(params, lr=1e-2, mask="bernoulli", reserve_p=0.5, seed=3, backend="triton")
    ref = MaskedAdamW(ref_params, lr=1e-2, mask="bernoulli", reserve_p=0.5, seed=3, backend="reference")
    with torch.cuda.device(0):
        train(opt, params, 2)
        train(ref, ref_params, 2)
    for a, b in zip(params, ref_params):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.cuda
@pytest.mark.slow
def test_tensor_past_2_31_elements_is_stepped_to_its_end():
    """int64 indexing: the last elements of a 2^31 + 1000 element bf16 tensor (~26 GB with state)."""
    n = 2**31 + 1000
    p = torch.nn.Parameter(torch.ones(n, dtype=torch.bfloat16, device="cuda"))
    p.grad = torch.ones_like(p)
    p.grad[-1000:] = 2.0
    opt = MaskedAdamW([p], lr=1e-2, mask="bernoulli", reserve_p=0.5, seed=4, backend="triton")
    opt.step()
    tail = slice(n - 1000, n)
    keep = philox.random_words(1000, (n - 1000) // 4, 4, 1, "cuda") < philox.keep_threshold(0.5)
    torch.testing.assert_close(opt.state[p]["exp_avg"][tail], torch.where(keep, 0.1 * 2.0 / 0.5, 0.0))
    # Kept entries move by ~lr; dropped ones only decay by 1 - 1e-4, which rounds back to 1 in bf16.
    assert bool((p.detach()[tail][keep] < 1).all()) and bool((p.detach()[tail][~keep] == 1).all())
