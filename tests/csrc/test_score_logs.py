"""The log2 of importance scores in C++ (csrc/cpu/score_logs.cpp) against its torch definition,
childopt.portable_math.log2: the same bits on every kind of fp32 input, at 1, 2 and 3 threads."""
import pytest
import torch

from childopt import importance, portable_math
from tests.helpers import kernel_backend, same_bits


def scores(numel: int) -> torch.Tensor:
    """Random fp32 bit patterns (subnormals, infinities, NaNs and negatives among them), zeros, and
    the range of real scores."""
    gen = torch.Generator().manual_seed(numel)
    x = torch.randint(-2**31, 2**31 - 1, (numel,), generator=gen, dtype=torch.int64).int().view(torch.float32)
    x[1::3] = torch.rand(len(x[1::3]), generator=gen) * 1e-6
    x[::5] = 0.0
    return x


@pytest.mark.parametrize("numel", [0, 1, 15, 32768 * 3 + 5, (1 << 20) + 3])
def test_native_log2_is_the_torch_definition_at_every_thread_count(native_module, threads, numel):
    x = scores(numel)
    expected = portable_math.log2(x)
    for count in (1, 2, 3):
        threads(count)
        out = torch.empty_like(x)
        native_module._portable_log2(x, out)
        assert same_bits(out, expected), count


@pytest.mark.parametrize("numel", [1, 15, 32768 * 3 + 5])
def test_native_log2_at_level_probabilities_is_the_torch_definition(native_module, threads, numel):
    """A zero-grad group's running scores: log2(x * level(code)), every code 0..255 among them."""
    x = scores(numel).abs()
    codes = torch.arange(numel, dtype=torch.int64).remainder(256).to(torch.uint8)
    codes = codes[torch.randperm(numel, generator=torch.Generator().manual_seed(1))]
    expected = importance.score_logs(x, codes)
    for count in (1, 3):
        threads(count)
        out = torch.empty_like(x)
        native_module._portable_log2(x, out, codes)
        assert same_bits(out, expected), count
    assert same_bits(kernel_backend("native").score_logs(x.view(-1, 1), codes.view(-1, 1)), expected)


def test_the_native_backend_keeps_float64_scores_in_float64(native_module):
    score = torch.tensor([1e-300, 0.0, 3.0, 1e300], dtype=torch.float64)
    logs = kernel_backend("native").score_logs(score)
    assert logs.dtype == torch.float64 and torch.equal(logs, portable_math.log2(score))
    assert same_bits(kernel_backend("native").score_logs(score.float().view(2, 2)), portable_math.log2(score.float()))
    half = score.to(torch.bfloat16)  # another dtype takes the torch definition, on fp32 values
    assert same_bits(kernel_backend("native").score_logs(half), portable_math.log2(half.float()))


def test_bad_tensors_are_named(native_module):
    for x in (torch.rand(8, dtype=torch.float64), torch.rand(8, 2)[:, 0]):
        with pytest.raises(RuntimeError, match="x must be a contiguous float32 CPU tensor"):
            native_module._portable_log2(x, torch.empty(8))
    for out in (torch.empty(7), torch.empty(8, dtype=torch.float64)):
        with pytest.raises(RuntimeError, match="out must be a contiguous float32 CPU tensor of x's 8 elements"):
            native_module._portable_log2(torch.rand(8), out)
    for codes in (torch.zeros(7, dtype=torch.uint8), torch.zeros(8, dtype=torch.int32)):
        with pytest.raises(RuntimeError, match="codes must be None or a contiguous uint8 CPU tensor of x's 8 elements"):
            native_module._portable_log2(torch.rand(8), torch.empty(8), codes)
