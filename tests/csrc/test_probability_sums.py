"""The importance solve's pass in C++ (csrc/cpu/probability_sums.cpp) against the torch definition,
childopt.importance.probability_sums: equal counts, the float64 sum to 1e-12 (summed in another
order), and the same bits at 1, 2 and 3 threads (fixed blocks added in order)."""
import pytest
import torch

from childopt import importance
from tests.helpers import kernel_backend

FLOOR = float(torch.tensor(0.05, dtype=torch.float32))  # the fp32 value clamp_ writes


@pytest.mark.parametrize("numel", [0, 1, 17, 32768 * 3 + 5, (1 << 20) + 3])
def test_native_sums_are_the_torch_sums_at_every_thread_count(native_module, threads, numel):
    log_r = -torch.rand(numel, generator=torch.Generator().manual_seed(numel)) * 12
    log_r[::97] = -torch.inf
    p = importance.probabilities(log_r, 3.25, 0.05)
    expected = importance.probability_sums(p, FLOOR)
    if numel > 1000:
        assert expected[1] > numel // 5 and expected[2] > numel // 5  # both clamps are hit
    results = []
    for count in (1, 2, 3):
        threads(count)
        results.append(native_module._probability_sums(p, FLOOR))
    assert results[0] == results[1] == results[2]
    total, ones, floors = results[0]
    assert (ones, floors) == expected[1:]
    assert total == pytest.approx(expected[0], rel=1e-12, abs=0.0)


def test_the_solve_through_the_native_backend_hits_the_reference_scale(native_module):
    gen = torch.Generator().manual_seed(3)
    logs = [torch.log2(torch.rand(n, generator=gen) ** 4) for n in (1000, (1 << 20) + 5, 77)]
    scales = [importance.solve_log_scale(logs, 0.3, 0.02, kernel_backend(name).probability_sums)
              for name in ("native", "reference")]
    assert scales[0] == pytest.approx(scales[1], rel=1e-12)


def test_bad_tensors_are_named(native_module):
    for p in (torch.rand(8, dtype=torch.float64), torch.rand(8, 2)[:, 0]):
        with pytest.raises(RuntimeError, match="p must be a contiguous float32 CPU tensor"):
            native_module._probability_sums(p, 0.1)
