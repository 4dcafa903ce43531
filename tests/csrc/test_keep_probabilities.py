"""The keep probabilities of an importance refresh in C++ (csrc/cpu/keep_probabilities.cpp) against the
torch definitions, childopt.importance.probabilities and kept_sums: the same bits for the probabilities
and the same integers for the solve's sums, at every thread count, so the solve takes the same steps."""
import math

import pytest
import torch

from childopt import importance
from tests.helpers import kernel_backend, same_bits

SCALES = [(3.25, 0.05), (-7.7, 0.0), (0.0, 1e-3), (41.3, 0.02), (1e30, 0.1), (-1e30, 0.0), (-140.4, 0.0)]


def log_ratios(numel: int) -> torch.Tensor:
    """Log ratios down to -200 (past the subnormal range of p), every 97th a zero score's -inf."""
    log_r = -torch.rand(numel, generator=torch.Generator().manual_seed(numel)) * 200
    log_r[: numel // 2] /= 20  # half of them in the range a solve keeps
    log_r[::97] = -torch.inf
    log_r[5::1009] = torch.nan  # never made by a refresh; both definitions keep it NaN
    return log_r


@pytest.mark.parametrize("numel", [0, 1, 17, 32768 * 3 + 5, (1 << 20) + 3])
def test_native_probabilities_are_the_torch_bits_at_every_thread_count(native_module, threads, numel):
    log_r = log_ratios(numel)
    for log_c, p_min in SCALES:
        expected = importance.probabilities(log_r, log_c, p_min)
        whole, factor = importance.scale_parts(log_c)
        for count in (1, 2, 3):
            threads(count)
            p = torch.empty_like(log_r)
            native_module._keep_probabilities(log_r, p, whole, factor, p_min)
            assert same_bits(p, expected), (log_c, p_min, count)


@pytest.mark.parametrize("numel", [0, 1, 17, 32768 * 3 + 5, (1 << 20) + 3])
def test_native_sums_are_the_torch_sums_at_every_thread_count(native_module, threads, numel):
    log_r = log_ratios(numel).nan_to_num_(nan=-torch.inf)  # a NaN has no integer value
    for log_c, p_min in SCALES:
        expected = importance.kept_sums(log_r, log_c, p_min)
        if numel > 1000 and (log_c, p_min) == (3.25, 0.05):
            assert expected[1] > numel // 20 and expected[2] > numel // 5  # both clamps are hit
        for count in (1, 2, 3):
            threads(count)
            assert native_module._probability_sums(log_r, *importance.scale_parts(log_c), p_min) == expected
            assert importance.kept_sums(log_r, log_c, p_min) == expected, count  # torch's sum at each count too


def test_the_sum_in_units_is_the_float64_sum_to_a_unit_per_element():
    log_r = log_ratios(1 << 16).nan_to_num_(nan=-torch.inf)
    p = importance.probabilities(log_r, 3.25, 0.0)
    units = importance.kept_sums(log_r, 3.25, 0.0)[0]
    exact = float(p.double().sum()) * importance.SUM_UNITS
    assert exact - p.numel() <= units <= exact + 1  # less than a unit lost per element (+1: float64 rounds)


def test_the_native_backend_takes_the_torch_path_for_an_infinite_scale(native_module):
    native, log_r = kernel_backend("native"), log_ratios(1000)
    for log_c in (math.inf, -math.inf):
        assert torch.equal(native.probabilities(log_r, log_c, 0.1), importance.probabilities(log_r, log_c, 0.1))
        assert native.kept_sums(log_r, log_c, 0.1) == importance.kept_sums(log_r, log_c, 0.1)


def test_the_solve_through_the_native_backend_hits_the_reference_scale(native_module):
    gen = torch.Generator().manual_seed(3)
    logs = [torch.log2(torch.rand(n, generator=gen) ** 4) for n in (1000, (1 << 20) + 5, 77)]
    scales = [importance.solve_log_scale(logs, 0.3, 0.02, kernel_backend(name).kept_sums)
              for name in ("native", "reference")]
    assert scales[0] == scales[1]  # the same integer sums, so the same Newton steps


def test_bad_tensors_are_named(native_module):
    for log_r in (torch.rand(8, dtype=torch.float64), torch.rand(8, 2)[:, 0]):
        with pytest.raises(RuntimeError, match="log_r must be a contiguous float32 CPU tensor"):
            native_module._probability_sums(log_r, 0.0, 1.0, 0.1)
        with pytest.raises(RuntimeError, match="log_r must be a contiguous float32 CPU tensor"):
            native_module._keep_probabilities(log_r, torch.empty(8), 0.0, 1.0, 0.1)
    for p in (torch.empty(7), torch.empty(8, dtype=torch.float64), torch.empty(16)[::2]):
        with pytest.raises(RuntimeError, match="p must be a contiguous float32 CPU tensor of log_r's 8 elements"):
            native_module._keep_probabilities(torch.rand(8), p, 0.0, 1.0, 0.1)
