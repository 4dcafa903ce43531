"""childopt.philox against Random123's known-answer vectors, Triton's own Philox, and statistics."""
import pytest
import torch
import triton
import triton.language as tl

from childopt import philox
from childopt.kernels.philox import philox4x32_10

# Random123 kat_vectors, philox4x32 with 10 rounds: (counter, key) -> output.
KNOWN_ANSWERS = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF, 0xFFFFFFFF), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


@pytest.mark.parametrize("counter,key,expected", KNOWN_ANSWERS)
def test_torch_philox_matches_random123(counter, key, expected):
    words = philox.philox4x32_10(*(torch.tensor([c]) for c in counter), *key)
    assert tuple(int(w) for w in words) == expected


@triton.jit
def _words_kernel(out, c0, c1, c2, c3, k0, k1, N: tl.constexpr, BUILTIN: tl.constexpr):
    i = tl.arange(0, N)
    a = tl.load(c0 + i).to(tl.uint32)
    b = tl.load(c1 + i).to(tl.uint32)
    c = tl.load(c2 + i).to(tl.uint32)
    d = tl.load(c3 + i).to(tl.uint32)
    if BUILTIN:
        seed = tl.load(k0).to(tl.uint64) | (tl.load(k1).to(tl.uint64) << 32)
        w0, w1, w2, w3 = tl.philox(seed, a, b, c, d)
    else:
        w0, w1, w2, w3 = philox4x32_10(a, b, c, d, tl.load(k0).to(tl.uint32), tl.load(k1).to(tl.uint32))
    for j, w in enumerate((w0, w1, w2, w3)):
        tl.store(out + j * N + i, w.to(tl.int64))


def _triton_words(counters, key, builtin):
    n = counters[0].numel()
    out = torch.empty(4 * n, dtype=torch.int64, device=counters[0].device)
    k = [torch.tensor([x], dtype=torch.int64, device=out.device) for x in key]
    _words_kernel[(1,)](out, *counters, *k, N=n, BUILTIN=builtin)
    return out.view(4, n)


@pytest.mark.parametrize("builtin", [False, True], ids=["childopt-triton", "triton-tl.philox"])
def test_triton_philox_matches_torch_reference(lane, builtin):
    """The kernel's Philox and Triton's own tl.philox (4x32 for uint32 counters) equal the torch one."""
    _, device = lane
    gen = torch.Generator().manual_seed(3)
    counters = [torch.randint(0, 2**32, (64,), generator=gen, dtype=torch.int64) for _ in range(4)]
    key = (0xDEADBEEF, 0x01234567)
    expected = torch.stack(philox.philox4x32_10(*counters, *key))
    got = _triton_words([c.to(device) for c in counters], key, builtin)
    assert torch.equal(got.cpu(), expected)


def test_keep_threshold_edges():
    assert philox.keep_threshold(0.5) == 2**31
    assert philox.keep_threshold(1e-30) == 1
    assert philox.keep_threshold(1 - 1e-12) == 2**32 - 1
    for bad in (0.0, 1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="reserve_p"):
            philox.keep_threshold(bad)


def test_bernoulli_keep_rate_within_statistical_bounds():
    n, p = 1 << 20, 0.3
    keep = philox.bernoulli_keep(n, rng_base=12345, seed=7, step=3, reserve_p=p, device="cpu")
    sigma = (p * (1 - p) / n) ** 0.5
    assert abs(keep.float().mean().item() - p) < 5 * sigma


def test_streams_differ_by_step_seed_and_offset():
    base = philox.random_words(4096, 0, seed=1, step=1, device="cpu")
    for other in (philox.random_words(4096, 0, seed=1, step=2, device="cpu"),
                  philox.random_words(4096, 0, seed=2, step=1, device="cpu"),
                  philox.random_words(4096, 1024, seed=1, step=1, device="cpu")):
        assert (base == other).float().mean() < 0.01


def test_words_are_a_function_of_global_index():
    """Element j of a tensor at rng_base b equals element 4b + j of one long stream."""
    whole = philox.random_words(64, 0, seed=9, step=5, device="cpu")
    part = philox.random_words(20, 6, seed=9, step=5, device="cpu")
    assert torch.equal(part, whole[24:44])
