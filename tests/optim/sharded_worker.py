"""A torchrun worker (gloo, CPU) that runs tests/optim/sharded_scenarios.py on DTensor shards.

Usage: ``torchrun --nproc_per_node N tests/optim/sharded_worker.py OUT BACKENDS [save|load]``.
Rank 0 writes ``OUT/ws{N}.pt``: full results of every scenario on every backend, the seeds
the ranks agreed on, and every rank's error for each bad input; ``save`` writes distributed
checkpoints after the scenario's steps, ``load`` resumes from them for one more step.
"""
from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_optimizer_state_dict,
                                                     set_optimizer_state_dict)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

from childopt import MaskedAdamW  # noqa: E402
from tests.optim import sharded_scenarios as scenarios  # noqa: E402

CHECKPOINTED = ("dense-freeze", "bernoulli-freeze-amsgrad", "childtuning-F", "sparse-amsgrad")


def main(out: str, backends: list, phase: str) -> None:
    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    world, rank = dist.get_world_size(), dist.get_rank()

    def shard(t):
        return distribute_tensor(t, mesh, [Shard(0)], src_data_rank=None)  # every rank holds the full tensor

    def full(t):
        return t.full_tensor() if isinstance(t, DTensor) else t.clone()

    report = {"results": {}, "resumed": {}, "clipped": {}, "from_plain": {}, "full_state": {}}
    for backend in backends:
        for name in scenarios.SCENARIOS:
            module, opt = scenarios.build(name, backend, shard)
            scenarios.train(module, opt, shard)
            report["results"][name, backend] = scenarios.collect(module, opt, full)
            report["clipped"][name, backend] = scenarios.clip(*scenarios.build(name, backend, shard), shard, full)
            if name == "sparse-amsgrad":  # gathered as Accelerate and HF save FSDP2 optimizers
                report["full_state"][backend] = get_optimizer_state_dict(
                    module, opt, options=StateDictOptions(full_state_dict=True))["state"]
            if name in CHECKPOINTED and phase == "save":
                dcp.save(get_optimizer_state_dict(module, opt), checkpoint_id=os.path.join(out, f"{name}-{backend}"))
        for name in CHECKPOINTED:  # a full state dict from one process (torch.save), loaded into shards
            plain_module, plain_opt = scenarios.build(name, backend, lambda t: t.clone())
            scenarios.train(plain_module, plain_opt, lambda g: g)
            module, opt = scenarios.build(name, backend, shard)
            scenarios.train(module, opt, shard)
            opt = scenarios.SCENARIOS[name](list(module.named_parameters()), backend)
            opt.load_state_dict(plain_opt.state_dict())
            scenarios.train(module, opt, shard, start=scenarios.STEPS, steps=1)
            report["from_plain"][name, backend] = scenarios.collect(module, opt, full)
        for name in CHECKPOINTED if phase == "load" else ():
            module, opt = scenarios.build(name, backend, shard)
            scenarios.train(module, opt, shard)  # the parameters as the saving run left them
            opt = scenarios.SCENARIOS[name](list(module.named_parameters()), backend)
            opt.zero_grad()  # DCP then initialises the fresh optimizer's state with a zero-lr step
            state = get_optimizer_state_dict(module, opt)
            dcp.load(state, checkpoint_id=os.path.join(out, f"{name}-{backend}"))
            set_optimizer_state_dict(module, opt, state)
            scenarios.train(module, opt, shard, start=scenarios.STEPS, steps=1)
            report["resumed"][name, backend] = scenarios.collect(module, opt, full)
    report["sparse_round_trip_collectives"] = _collectives_of_a_sparse_round_trip(shard)
    report["selections"] = scenarios.selections(shard, full)
    report["fisher"] = scenarios.fisher_masks(lambda model: fully_shard(model, mesh=mesh), full, across_ranks=True)
    report["fisher_passes"] = scenarios.fisher_passes(lambda model: fully_shard(model, mesh=mesh), full)
    report["ddp"] = _ddp_runs()
    report["seeds"] = _agreed_seeds(shard)
    report["errors"] = _bad_inputs(mesh, shard)
    if rank == 0:
        torch.save(report, os.path.join(out, f"ws{world}.pt"))
    dist.barrier()
    dist.destroy_process_group()


def _collectives_of_a_sparse_round_trip(shard) -> dict:
    """The collectives (by op) while sparse storage saves and loads its global form: its own all-gathers
    of counts and all_to_all_single of each rank's share, and no DTensor op (which could gather a whole
    parameter)."""
    from torch.distributed.tensor.debug import CommDebugMode

    p = torch.nn.Parameter(shard(torch.randn(40, 8)))
    opt = MaskedAdamW([p], mask={p: torch.rand(40, 8, generator=torch.Generator().manual_seed(0)) < 0.3},
                      storage="sparse", backend="reference")
    with CommDebugMode() as comm:
        opt.load_state_dict(opt.state_dict())
    return {str(op): count for op, count in comm.get_comm_counts().items()}


def _ddp_runs() -> dict:
    """Child-Tuning-D under DDP, each rank on its own batches: the child-network hook and DDP's
    default all-reduce, each rank's parameters and moments, and the hook's byte counts."""
    from torch.nn.parallel import DistributedDataParallel

    from childopt.ddp import all_reduce_gradients, register_child_network_hook

    runs = {}
    for hook in ("child", "default", "compact"):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(6, 40), torch.nn.Tanh(), torch.nn.Linear(40, 3))
        gen = torch.Generator().manual_seed(3)
        masks = {"0.weight": torch.rand(40, 6, generator=gen) < 0.3, "2.weight": torch.rand(3, 40, generator=gen) < 0.3}
        storage = dict(storage="sparse", compact_grads=True) if hook == "compact" else {}
        opt = MaskedAdamW(model.named_parameters(), lr=1e-2, mask=masks, seed=1, backend="reference", **storage)
        wrapped = model if hook == "compact" else DistributedDataParallel(model)  # compact: no DDP
        state = register_child_network_hook(wrapped, opt) if hook == "child" else None
        sent = 0
        data = torch.Generator().manual_seed(100 + dist.get_rank())  # each rank its own batches
        for _ in range(3):
            x, y = torch.randn(8, 6, generator=data), torch.randint(0, 3, (8,), generator=data)
            torch.nn.functional.cross_entropy(wrapped(x), y).backward()
            if hook == "compact":
                sent += all_reduce_gradients(opt)
            opt.step()
            opt.zero_grad()
        mine = {name: p.detach().clone() for name, p in model.named_parameters()}
        mine.update({f"{name}.exp_avg_sq": scenarios.dense_moment(opt.state[p], p, "exp_avg_sq").clone()
                     for name, p in model.named_parameters()})
        every = [None] * dist.get_world_size()
        dist.all_gather_object(every, mine)
        runs[hook] = {"ranks": every, "masks": masks,
                      "bytes": (state.bytes_sent, state.dense_bytes) if state else sent}
    return runs


def _agreed_seeds(shard) -> list:
    """seed=None on ranks whose torch generators differ: every rank must end with rank 0's seed."""
    torch.manual_seed(1234 + dist.get_rank())
    params = [torch.nn.Parameter(shard(torch.zeros(64)))]
    opt = MaskedAdamW(params, mask="bernoulli", reserve_p=0.5, backend="reference")
    params[0].grad = shard(torch.ones(64))
    opt.step()
    seeds = [None] * dist.get_world_size()
    dist.all_gather_object(seeds, opt.seed)
    if dist.get_rank() == 0:  # an optimizer only rank 0 steps: with sync_seed=False it waits for nobody
        local = [torch.nn.Parameter(torch.zeros(8))]
        alone = MaskedAdamW(local, mask="bernoulli", reserve_p=0.5, seed=99, sync_seed=False, backend="reference")
        local[0].grad = torch.ones(8)
        alone.step()
        seeds.append(alone.seed)
    dist.barrier()
    return seeds


def _bad_inputs(mesh, shard) -> dict:
    """Each bad input's error on every rank (``None`` where a rank raised nothing)."""
    from torch.distributed.tensor import Replicate

    cases = {
        "mask of the wrong global shape": lambda: _with_param(shard, lambda p: MaskedAdamW(
            [p], mask={p: torch.ones(5, 2, dtype=torch.bool)})),
        "Shard(1) placement": lambda: MaskedAdamW(
            [torch.nn.Parameter(distribute_tensor(torch.zeros(6, 4), mesh, [Shard(1)], src_data_rank=None))]),
        "plain gradient on a DTensor": lambda: _step_with(shard(torch.zeros(6, 2)), torch.ones(6, 2)),
        "DTensor gradient on a plain parameter": lambda: _step_with(torch.zeros(6, 2), shard(torch.ones(6, 2))),
        "replicated gradient on a sharded parameter": lambda: _step_with(
            shard(torch.zeros(6, 2)), distribute_tensor(torch.ones(6, 2), mesh, [Replicate()], src_data_rank=None)),
        "seed differing between ranks": lambda: _step_with(shard(torch.zeros(8)), shard(torch.ones(8)),
                                                           mask="bernoulli", reserve_p=0.5,
                                                           seed=5 + dist.get_rank()),
        "ZeRO-style replaced params": _replaced_params,
        "compact gradients of a sharded parameter": lambda: _with_param(shard, lambda p: MaskedAdamW(
            [p], mask={p: torch.ones(6, 2, dtype=torch.bool)}, storage="sparse", compact_grads=True)),
        "sparse storage on a 2-D mesh": lambda: _sparse_on_2d_mesh(),
        "saved sparse indices bad on the last rank only": lambda: _bad_saved_piece(shard, "indices", 10**6),
        "a saved second moment negative on the last rank only": lambda: _bad_saved_piece(shard, "exp_avg_sq", -1.0),
        "child-network hook on a Bernoulli mask": _hook_on_bernoulli,
        "child-network hook on masks that differ between ranks": _hook_on_rank_masks,
        "all_reduce_gradients with gradients on other parameters": _gradients_on_rank_params,
    }
    errors = {}
    for case, call in cases.items():
        try:
            call()
            mine = None
        except Exception as error:  # noqa: BLE001 - the test inspects which error each rank raised
            mine = (type(error).__name__, str(error))
        every = [None] * dist.get_world_size()
        dist.all_gather_object(every, mine)
        errors[case] = every
    return errors


def _with_param(shard, make):
    return make(torch.nn.Parameter(shard(torch.zeros(6, 2))))


def _step_with(param, grad, **kwargs):
    p = torch.nn.Parameter(param)
    opt = MaskedAdamW([p], backend="reference", **kwargs)
    p.grad = grad
    opt.step()


def _sparse_on_2d_mesh():
    """HSDP's placement (replicated over one mesh dimension, rows sharded over the other)."""
    from torch.distributed.tensor import Replicate

    mesh = init_device_mesh("cpu", (1, dist.get_world_size()), mesh_dim_names=("replicate", "shard"))
    p = torch.nn.Parameter(distribute_tensor(torch.zeros(6, 2), mesh, [Replicate(), Shard(0)], src_data_rank=None))
    MaskedAdamW([p], mask={p: torch.ones(6, 2, dtype=torch.bool)}, storage="sparse")


def _bad_saved_piece(shard, key: str, value) -> None:
    """A sparse state dict whose piece of ``key`` on the last rank alone holds ``value``: every rank must
    refuse it (a rank that loaded, or waited in the exchange, would leave the replicas apart)."""
    p = torch.nn.Parameter(shard(torch.zeros(12, 2)))
    mask = torch.zeros(12, 2, dtype=torch.bool)
    mask[::2] = True  # entries in every rank's rows and in every rank's piece of the global order
    opt = MaskedAdamW([p], mask={p: mask}, storage="sparse", backend="reference")
    saved = opt.state_dict()
    if dist.get_rank() == dist.get_world_size() - 1:
        saved["state"][0][key].to_local()[-1] = value
    opt.load_state_dict(saved)


def _hook_on_bernoulli():
    from torch.nn.parallel import DistributedDataParallel

    from childopt.ddp import register_child_network_hook

    model = torch.nn.Linear(3, 2)
    register_child_network_hook(DistributedDataParallel(model), MaskedAdamW(model.parameters(), mask="bernoulli",
                                                                          reserve_p=0.5, seed=1))


def _hook_on_rank_masks():
    from torch.nn.parallel import DistributedDataParallel

    from childopt.ddp import register_child_network_hook

    model = torch.nn.Linear(4, 3)
    mask = {"weight": torch.arange(12).view(3, 4) % (2 + dist.get_rank()) == 0}  # a different mask per rank
    register_child_network_hook(DistributedDataParallel(model),
                                MaskedAdamW(model.named_parameters(), mask=mask, seed=1, backend="reference"))


def _gradients_on_rank_params():
    from childopt.ddp import all_reduce_gradients

    params = [torch.nn.Parameter(torch.zeros(5)), torch.nn.Parameter(torch.zeros(5))]
    params[dist.get_rank() % 2].grad = torch.ones(5)  # rank 0 has a's gradient, rank 1 c's
    all_reduce_gradients(MaskedAdamW(params, seed=1, backend="reference"))


def _replaced_params():
    p = torch.nn.Parameter(torch.zeros(6))
    opt = MaskedAdamW([p], backend="reference", mask={p: torch.ones(6, dtype=torch.bool)})
    flat = torch.nn.Parameter(torch.zeros(6))
    flat.grad = torch.ones(6)
    opt.param_groups[0]["params"] = [flat]
    opt.step()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2].split(","), sys.argv[3] if len(sys.argv) > 3 else "")
