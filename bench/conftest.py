"""Skip the ``cuda``-marked benchmarks when torch sees no CUDA GPU."""
import pytest
import torch


def pytest_runtest_setup(item):
    if item.get_closest_marker("cuda") is not None and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
