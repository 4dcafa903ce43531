"""Benchmark fixtures: skip ``cuda`` cases without a GPU; one in-place stream reference per size,
device and thread count per run; the smoke run.

With benchmarks disabled (``--benchmark-disable``, in addopts) every case runs once as a smoke
test of what it times, and the cases marked ``timing`` (more sizes, dtypes and backends of a row
that another case already covers) are deselected; ``--benchmark-enable`` runs the whole grid but
for the CPU cases on roberta-base's 125M elements, which are also marked ``slow`` (minutes on a
small CPU): ``-m slow --benchmark-enable`` runs them.
"""
from pathlib import Path

import pytest
import torch

from childopt.bench import measure, stream
from childopt.bench.evict import CacheEvictor
from childopt.bench.llc import last_level_cache

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
def stream_reference():
    """``stream_reference(numel, device)``: the :mod:`childopt.bench.stream` reference for a parameter
    list of ``numel`` elements at the current intra-op thread count, measured once per run."""
    caches, cache = {}, {}

    def reference(numel: int, device: torch.device) -> stream.StreamReference:
        llc = caches.setdefault(str(device), last_level_cache(device))
        key = (stream.stream_numel(llc.bytes, numel), str(device), torch.get_num_threads())
        if key not in cache:
            cache[key] = stream.measure_stream(device, warmup=measure.WARMUP, steps=10, min_numel=numel, llc=llc)
        return cache[key]

    return reference


@pytest.fixture(scope="session")
def cache_evictor():
    """``cache_evictor(device)``: one :class:`childopt.bench.evict.CacheEvictor` per device per run, so
    each timed step starts with the last-level cache evicted, as in the report."""
    evictors = {}

    def evictor(device: torch.device) -> CacheEvictor:
        if str(device) not in evictors:
            evictors[str(device)] = CacheEvictor(device)
        return evictors[str(device)]

    return evictor
