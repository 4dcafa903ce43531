"""Fixtures of the tests of the C++ CPU kernels: the loaded extension, a forced Philox ISA, a thread count."""
import pytest
import torch

ISAS = {"scalar": 0, "avx2": 1, "avx512": 2}


@pytest.fixture
def native_module(lane_on_cpu):
    lane_on_cpu("native")
    from childopt import _native

    return _native.load()


@pytest.fixture(params=list(ISAS))
def isa(request, native_module):
    """Draws with one ISA for the test (skipped where this CPU lacks it), then restores the default."""
    before = native_module._philox_isa()
    try:
        native_module._set_philox_isa(ISAS[request.param])
    except RuntimeError:
        pytest.skip(f"this CPU cannot run {request.param}")
    yield request.param
    native_module._set_philox_isa(before)


@pytest.fixture
def threads():
    """Sets torch's intra-op thread count for the test; restores it afterwards."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)
