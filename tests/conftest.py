"""Test configuration: Triton runs interpreted on CPU when no GPU is present.

``TRITON_INTERPRET=1`` must be set before any kernel module is imported, so it is set here, at
conftest import, before the tests import childopt.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from childopt import backends  # noqa: E402

BACKENDS = ("reference", "triton")


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


@pytest.fixture(params=LANES)
def lane(request):
    """(backend, device) pairs that can run here; Triton on CPU only when interpreted."""
    backend, device = request.param
    ok, why = backends.MODULES[backend].available(torch.device(device))
    if not ok:
        pytest.skip(why)
    return backend, device


@pytest.fixture(params=[pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=pytest.mark.cuda)])
def triton_device(request):
    """Devices the Triton kernels run on here (CPU only under the interpreter)."""
    ok, why = backends.MODULES["triton"].available(torch.device(request.param))
    if not ok:
        pytest.skip(why)
    return request.param
