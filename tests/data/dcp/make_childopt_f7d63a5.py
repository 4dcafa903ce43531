"""Write childopt-f7d63a5.zip: a torch.distributed.checkpoint saved by childopt as released at commit
f7d63a5, and the parameters that run reached 2 steps later without the save (tests/optim/test_dcp.py).

Run ``d``: ChildTuningAdamW(mode="ChildTuning-D") with a fixed dense mask; run ``f``: MaskedAdamW with a
Bernoulli mask (seed 3) and amsgrad; both on the reference backend.  After 3 steps, each model's state
is saved as ``model_<run>`` and its optimizer's in each get_optimizer_state_dict form as
``optim_<run>_<form>`` (default, flattened, full), in a gloo process of world size 1.  Made with
the old code on the path:

    git archive f7d63a5 | tar -x -C /tmp/old
    cd /tmp && PYTHONPATH=/tmp/old python <this file> <repo>/tests/data/dcp/childopt-f7d63a5.zip f7d63a5

The model and training loop are test_dcp.py's, copied rather than imported: this file records how the
fixture was made, and stays as it was when the test changes.
"""
import copy
import os
import sys
import tempfile
import zipfile

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_optimizer_state_dict,
)

from childopt import ChildTuningAdamW, MaskedAdamW

FORMS = {"default": StateDictOptions(), "flattened": StateDictOptions(flatten_optimizer_state_dict=True),
         "full": StateDictOptions(full_state_dict=True)}


def model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Linear(5, 3))


def train(net, opt, start, stop):
    for t in range(start, stop):
        opt.zero_grad()
        x = torch.randn(4, 6, generator=torch.Generator().manual_seed(t))
        net(x).square().sum().backward()
        if t == 0:  # its step count lags: the saved parameters are at different steps
            net[1].bias.grad = None
        opt.step()


def child_tuning_d(net):
    opt = ChildTuningAdamW(net.named_parameters(), lr=1e-2, mode="ChildTuning-D", seed=1, backend="reference")
    gen = torch.Generator().manual_seed(7)
    opt.set_gradient_mask({n: torch.rand(p.shape, generator=gen) < 0.4 for n, p in net.named_parameters()})
    return opt


def bernoulli(net):
    return MaskedAdamW(net.named_parameters(), lr=1e-2, mask="bernoulli", reserve_p=0.5, seed=3, amsgrad=True,
                       backend="reference")


def main(out, commit):
    with tempfile.TemporaryDirectory() as tmp:
        dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=0, world_size=1)
        saved, expected = {}, {"commit": commit}
        for run, build in (("d", child_tuning_d), ("f", bernoulli)):
            net = model()
            opt = build(net)
            train(net, opt, 0, 3)
            saved[f"model_{run}"] = copy.deepcopy(net.state_dict())
            for form, options in FORMS.items():
                saved[f"optim_{run}_{form}"] = copy.deepcopy(get_optimizer_state_dict(net, opt, options=options))
            train(net, opt, 3, 5)
            expected[run] = {n: p.detach().clone() for n, p in net.named_parameters()}
        dcp.save(saved, checkpoint_id=f"{tmp}/checkpoint")
        torch.save(expected, f"{tmp}/expected.pt")
        dist.destroy_process_group()
        with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as archive:
            for name in sorted(os.listdir(f"{tmp}/checkpoint")):
                archive.write(os.path.join(tmp, "checkpoint", name), f"checkpoint/{name}")
            archive.write(os.path.join(tmp, "expected.pt"), "expected.pt")


if __name__ == "__main__":
    main(*sys.argv[1:])
