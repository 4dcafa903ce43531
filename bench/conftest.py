"""Benchmark fixtures: skip ``cuda`` cases without a GPU; one copy-bandwidth figure per run; the
smoke run.

With benchmarks disabled (``--benchmark-disable``, in addopts) every case runs once as a smoke
test of what it times, and the cases marked ``timing`` (more sizes and backends of a row that
another case already covers) are deselected; ``--benchmark-enable`` runs the whole grid.
"""
from pathlib import Path

import pytest
import torch

from childopt.bench import measure

HERE = Path(__file__).parent


def pytest_configure(config):
    config.addinivalue_line("markers", "timing: a case of the full benchmark grid only, deselected unless "
                                       "--benchmark-enable (its row is smoke-tested by another case)")


def pytest_collection_modifyitems(config, items):
    if not config.getoption("benchmark_disable") or config.getoption("benchmark_enable"):
        return
    kept, timing = [], []
    for item in items:
        (timing if item.path.parent == HERE and item.get_closest_marker("timing") else kept).append(item)
    if timing:
        config.hook.pytest_deselected(items=timing)
        items[:] = kept


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
