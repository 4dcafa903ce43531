"""The planner plans MaskedAdamW on its fused kernels (backend native, built once if needed)."""
import pytest


@pytest.fixture
def native_kernels(lane_on_cpu):
    """Skip (fail under CHILDOPT_REQUIRE_NATIVE=1) when childopt._C cannot run on this CPU."""
    lane_on_cpu("native")
