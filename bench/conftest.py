"""Benchmark fixtures: skip ``cuda`` cases without a GPU; one copy-bandwidth figure per run."""
import pytest
import torch

from childopt.bench import measure


def pytest_runtest_setup(item):
    if item.get_closest_marker("cuda") is not None and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")


@pytest.fixture(scope="session")
def copy_gbps():
    """``copy_gbps(numel, device)``: ``dst.copy_(src)`` bandwidth of that size, measured once per run."""
    cache = {}

    def copy_bandwidth(numel: int, device: torch.device) -> float:
        key = (numel, str(device))
        if key not in cache:
            cache[key] = measure.measure_copy_gbps(numel, device, warmup=measure.WARMUP, steps=10)
        return cache[key]

    return copy_bandwidth
