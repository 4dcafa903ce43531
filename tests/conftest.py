"""Test configuration: Triton runs interpreted on CPU when no GPU is present.

``TRITON_INTERPRET=1`` must be set before any kernel module is imported, so it is set here, at
conftest import, before the tests import childopt.

The native lanes build childopt._C through the loader on first use (once per cache).  Where it
cannot be built they are skipped with the reason, unless ``CHILDOPT_REQUIRE_NATIVE=1`` (set by
CI) turns that into a failure, so a broken build can never pass as a skip.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from childopt import backends  # noqa: E402

BACKENDS = ("reference", "triton", "native")
KERNEL_BACKENDS = ("triton", "native")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


def _lane(backend, device):
    marks = [pytest.mark.cuda] if device == "cuda" else []
    return pytest.param((backend, device), id=f"{backend}-{device}", marks=marks)


LANES = [_lane(b, d) for d in ("cpu", "cuda") for b in BACKENDS]
KERNEL_LANES = [_lane(b, d) for d in ("cpu", "cuda") for b in KERNEL_BACKENDS]


def _runnable(backend, device):
    ok, why = backends.MODULES[backend].available(torch.device(device))
    if not ok:
        if backend == "native" and device == "cpu" and os.environ.get("CHILDOPT_REQUIRE_NATIVE") == "1":
            pytest.fail(f"CHILDOPT_REQUIRE_NATIVE=1 but the native backend cannot run: {why}")
        pytest.skip(why)
    return backend, device


@pytest.fixture(params=LANES)
def lane(request):
    """(backend, device) pairs that can run here; Triton on CPU only when interpreted."""
    return _runnable(*request.param)


@pytest.fixture(params=KERNEL_LANES)
def kernel_lane(request):
    """(backend, device) of the kernel backends (Triton, native) that can run here."""
    return _runnable(*request.param)


@pytest.fixture(params=[pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=pytest.mark.cuda)])
def triton_device(request):
    """Devices the Triton kernels run on here (CPU only under the interpreter)."""
    ok, why = backends.MODULES["triton"].available(torch.device(request.param))
    if not ok:
        pytest.skip(why)
    return request.param


@pytest.fixture(params=[pytest.param(name, marks=pytest.mark.cuda) for name in KERNEL_BACKENDS])
def cuda_backend(request):
    """A kernel backend (Triton, native) on CUDA, for checks that have no CPU counterpart."""
    ok, why = backends.MODULES[request.param].available(torch.device("cuda"))
    if not ok:
        pytest.skip(why)
    return request.param


@pytest.fixture
def lane_on_cpu():
    """``lane_on_cpu(backend)`` skips the test (or fails it, for native under CI) when ``backend``
    cannot run on CPU here."""
    return lambda backend: _runnable(backend, "cpu")
