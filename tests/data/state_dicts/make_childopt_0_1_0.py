"""Save state dicts with childopt 0.1.0 as of commit b64ecd5 (before the optim package): the
optimizer after 3 steps, and the parameters after 2 more steps, for each storage and mask kind.

Made with the old code, from a checkout of that commit (tests/optim/test_checkpoint.py reads it):

    git worktree add /tmp/old b64ecd5
    cd /tmp/old && PYTHONPATH=/tmp/old python <this file> <repo>/tests/data/state_dicts/childopt-0.1.0-b64ecd5.pt b64ecd5
"""
import copy
import sys
import torch
import childopt
from childopt import MaskedAdamW, ChildTuningAdamW

def grads(step, shapes):
    gen = torch.Generator().manual_seed(1000 + step)
    return [torch.randn(s, generator=gen) for s in shapes]

shapes = [(7, 5), (13,), (33,)]
out = {"commit": sys.argv[2], "cases": {}}
for name, make in {
    "dense-none": lambda ps: MaskedAdamW(ps, lr=1e-2, weight_decay=0.1, backend="reference"),
    "dense-mask": lambda ps: MaskedAdamW(ps, lr=1e-2, weight_decay=0.1, backend="reference",
                                         mask={ps[0]: torch.arange(35).reshape(7, 5) % 3 == 0}),
    "bernoulli": lambda ps: MaskedAdamW(ps, lr=1e-2, weight_decay=0.1, backend="reference", mask="bernoulli",
                                        reserve_p=0.4, seed=2**40 + 7, amsgrad=True),
    "sparse": lambda ps: MaskedAdamW(ps, lr=1e-2, weight_decay=0.1, backend="reference", storage="sparse",
                                     mask={ps[1]: torch.arange(13) % 2 == 1}),
    "childtuning-f": lambda ps: ChildTuningAdamW(ps, lr=1e-2, weight_decay=0.1, reserve_p=0.3, mode="ChildTuning-F",
                                                 seed=11, backend="reference"),
}.items():
    gen = torch.Generator().manual_seed(5)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]
    opt = make(params)
    for t in range(3):
        for p, g in zip(params, grads(t, shapes)):
            p.grad = g
        opt.step()
    saved = {"state_dict": copy.deepcopy(opt.state_dict()), "params": [p.detach().clone() for p in params]}
    for t in range(3, 5):
        for p, g in zip(params, grads(t, shapes)):
            p.grad = g
        opt.step()
    saved["params_after_2_more"] = [p.detach().clone() for p in params]
    out["cases"][name] = saved
torch.save(out, sys.argv[1])
print("saved", list(out["cases"]))
