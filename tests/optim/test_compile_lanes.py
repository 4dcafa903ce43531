"""A compiled step over FSDP2 shards that start inside a Philox group (non-zero rng lanes, a
Bernoulli mask) compiles, equals the eager step bit for bit and does not recompile per step.

Traced, the head/body split of childopt.optim.philox_lanes made AOT autograd guard on shape
symbols dynamo could not source ("sources must not be empty for symbol ..."), crashing the step.
The worker (tests/optim/compile_lanes_worker.py) runs one rank under torchrun (tests.helpers.torchrun).
"""
import os

import pytest
import torch

from tests.helpers import torchrun

pytestmark = pytest.mark.skipif(not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
                                reason="needs torch.distributed with gloo")
WORKER = os.path.join(os.path.dirname(__file__), "compile_lanes_worker.py")


@pytest.mark.parametrize("backend", ["reference", "native"])
def test_a_compiled_step_over_shards_inside_philox_groups_equals_eager(lane_on_cpu, backend):
    lane_on_cpu(backend)
    assert torchrun(1, WORKER, backend).split()[-2:] == ["equal", "True"]
