"""The importance refresh's level codes in C++ (csrc/cpu/level_codes.cpp) against the torch
definition, childopt.importance.level_codes on childopt.philox's words: bit for bit with every
Philox ISA this CPU has and at 1, 2 and 3 threads, on every level value and its neighbouring
floats (where the level index and the rounding turn), zero, subnormals and one.
"""
import pytest
import torch

from childopt import importance, philox
from tests.helpers import kernel_backend

# (numel, rng_base): a lone element, a partial last group at the top of the counter's low word,
# runs of several chunks split over the threads.
CASES = [(1, 0), (4 * 1024 + 3, 2**32 - 7), (300_001, 2**40 + 5)]
KEY, STREAM = 0x9E3779B97F4A7C15 + 3, importance.ROUNDING_STREAM


def probabilities(numel: int) -> torch.Tensor:
    """Keep probabilities over all 256 levels, led by the values where a code can turn."""
    levels = importance.level_probabilities().float()
    edges = torch.cat([levels, torch.nextafter(levels, torch.tensor(2.0)),
                       torch.nextafter(levels, torch.tensor(-1.0)).clamp_min(0.0),
                       torch.tensor([0.0, -0.0, 1.0, 1e-45, 1e-39, 2.0**-126, 2.0**-32, 0.03, 0.5])])
    p = torch.rand(numel, generator=torch.Generator().manual_seed(numel)).pow_(12)
    p[:min(numel, edges.numel())] = edges[:numel]
    return p


@pytest.mark.parametrize("count", [1, 2, 3])
@pytest.mark.parametrize("numel, rng_base", CASES)
def test_native_codes_are_the_torch_codes_bit_for_bit(native_module, isa, threads, count, numel, rng_base):
    threads(count)
    p = probabilities(numel)
    codes = torch.empty(numel, dtype=torch.uint8)
    native_module._level_codes(p, codes, rng_base, KEY, STREAM)
    expected = importance.level_codes(p, philox.random_words(numel, rng_base, KEY, STREAM, "cpu"))
    assert torch.equal(codes, expected), (codes != expected).nonzero()[:5].tolist()


def test_the_native_backend_draws_the_reference_backends_codes(native_module):
    """draw_codes through each backend's level_codes: the whole refresh path, piece by piece."""
    n, rng_base, seed, refresh = importance.PIECE + 4 * 3 + 1, 2**33 + 7, 12345, 4
    log_r = -torch.rand(n, generator=torch.Generator().manual_seed(0)) * 40
    log_r[::101] = -torch.inf
    drawn = [importance.draw_codes(log_r, 4.5, 0.0, rng_base, seed, refresh, kernel_backend(name).level_codes)
             for name in ("native", "reference")]
    assert torch.equal(*drawn)
    assert len(drawn[0].unique()) > 200  # the draw spans the levels (0 and 25-255), not a few codes


@pytest.mark.parametrize("p, codes, message", [
    (torch.rand(8, dtype=torch.float64), torch.empty(8, dtype=torch.uint8), "p must be a contiguous float32 CPU"),
    (torch.rand(8, 2)[:, 0], torch.empty(8, dtype=torch.uint8), "p must be a contiguous float32 CPU"),
    (torch.rand(8), torch.empty(9, dtype=torch.uint8), r"codes must be a contiguous uint8 CPU tensor of p's "
                                                        r"numel \(8\)"),
    (torch.rand(8), torch.empty(8, dtype=torch.int32), "codes must be a contiguous uint8 CPU tensor"),
])
def test_bad_tensors_are_named(native_module, p, codes, message):
    with pytest.raises(RuntimeError, match=message):
        native_module._level_codes(p, codes, 0, 1, 2)
