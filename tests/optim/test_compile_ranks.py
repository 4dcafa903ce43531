"""A compiled training step with a Bernoulli mask under torch.distributed (2 ranks, gloo): the
ranks agree on the seed outside the compiled graph, so the step runs as the eager one does, bit
for bit (the worker, tests/optim/compile_ranks_worker.py, runs under a timeout: tests.helpers.torchrun)."""
import os
import re

import pytest
import torch

from tests.helpers import torchrun

pytestmark = pytest.mark.skipif(not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
                                reason="needs torch.distributed with gloo")


def test_a_compiled_step_agrees_on_the_seed_and_steps_as_eager():
    out = torchrun(2, os.path.join(os.path.dirname(__file__), "compile_ranks_worker.py"))
    for variant in ("drawn", "given", "reload"):
        found = re.search(rf"{variant}: compiled equals eager on every rank: (\w+); one seed on every rank: (\w+); "
                          r"graph breaks: (\d+)", out)
        assert found, out
        assert found.group(1) == "True" and found.group(2) == "True", out
        # torch's optimizers break twice around step() (tests/optim/test_compile.py); the agreement once more
        assert int(found.group(3)) <= 3, out
