"""Benchmark rows of MaskedAdamW on several processes (issue #16): FSDP2 shards and DDP's hook.

    torchrun --nproc_per_node 2 -m childopt.bench.distributed [--size 24m] [--steps 20] [--json F]

Rows, each measured in this one run:

* the optimizer step of the roberta-base-shaped list ``--size`` (fp32, Child-Tuning-D dense
  mask 0.3 freeze, Bernoulli 0.3, and the 0.3 mask in sparse-index storage) on FSDP2-placed DTensor shards, every rank at once,
  against rank 0 stepping the full list alone while the others wait, at the thread count each
  rank has (torchrun sets 1) and at that times the ranks (the cores the ranks use); with the
  optimizer state held per rank;
* DDP's all-reduce bytes for one backward with the child-network hook (childopt.ddp) against
  the bucket bytes DDP's default hook sends, for the same list as one ``nn.Module``.
"""
from __future__ import annotations

import argparse
import json
import statistics

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Shard, distribute_tensor

from childopt import MaskedAdamW
from childopt.arguments import check_output_files, write_output
from childopt.bench.environment import cpu_name
from childopt.bench.measure import time_calls
from childopt.bench.shapes import make_params, roberta_base_shapes
from childopt.bench.step import SIZES

RESERVE_P = 0.3
MODES = {"dense 0.3 freeze": dict(masked="freeze"), "bernoulli 0.3": dict(mask="bernoulli", reserve_p=RESERVE_P),
         "sparse 0.3": dict(storage="sparse")}


def _optimizer(params: list, mode: str, alone: bool = False) -> MaskedAdamW:
    """``alone``: only this rank steps it, so its seed is not agreed with the others."""
    kwargs = dict(MODES[mode])
    if "mask" not in kwargs:
        gen = torch.Generator().manual_seed(1)
        kwargs["mask"] = {p: _full_mask(p, gen) for p in params}
    return MaskedAdamW(params, lr=1e-4, seed=3, sync_seed=not alone, **kwargs)


def _full_mask(p: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    return torch.rand(p.shape, generator=gen) < RESERVE_P  # the same full mask on every rank


def _median_step_ms(opt: MaskedAdamW, warmup: int, steps: int, after_warmup=lambda: None) -> float:
    time_calls(opt.step, warmup)
    after_warmup()
    return 1e3 * statistics.median(time_calls(opt.step, steps))


def step_rows(size: str, warmup: int, steps: int) -> list[dict]:
    """FSDP2 shards on every rank vs the full list on rank 0 alone, per mask mode."""
    world, rank = dist.get_world_size(), dist.get_rank()
    mesh = init_device_mesh("cpu", (world,))
    shapes = roberta_base_shapes(*SIZES[size])
    full = make_params(shapes, torch.device("cpu"))
    rows = []
    for mode in MODES:
        sharded = []
        for p in full:
            shard = torch.nn.Parameter(distribute_tensor(p.detach(), mesh, [Shard(0)], src_data_rank=None))
            shard.grad = distribute_tensor(p.grad, mesh, [Shard(0)], src_data_rank=None)
            sharded.append(shard)
        opt = _optimizer(sharded, mode)
        sharded_ms = _median_step_ms(opt, warmup, steps, after_warmup=dist.barrier)  # timed together
        state = torch.tensor([opt.state_bytes()], dtype=torch.int64)
        per_rank = [torch.zeros_like(state) for _ in range(world)]
        dist.all_gather(per_rank, state)
        del opt, sharded
        one_ms, one_state = {}, None
        if rank == 0:  # the others wait at the barrier, leaving their cores to it
            alone = _optimizer(full, mode, alone=True)
            threads = torch.get_num_threads()
            for count in sorted({threads, world * threads}):
                torch.set_num_threads(count)
                one_ms[count] = _median_step_ms(alone, warmup, steps)
            torch.set_num_threads(threads)
            one_state = alone.state_bytes()
            del alone
        dist.barrier()
        rows.append({"mode": mode, "world": world, "sharded_step_ms": sharded_ms, "one_process_step_ms": one_ms,
                     "state_bytes_per_rank": [int(x) for x in per_rank], "one_process_state_bytes": one_state})
    return rows


class _Sum(torch.nn.Module):
    """Parameters whose forward gives every entry a gradient (DDP reduces after its forward)."""

    def __init__(self, params: list):
        super().__init__()
        self.params = torch.nn.ParameterList(params)

    def forward(self, scale: torch.Tensor) -> torch.Tensor:
        return scale * sum(p.sum() for p in self.params)


def ddp_bytes_row(size: str) -> dict:
    """Bytes DDP all-reduces for one backward with the child-network hook, and the bucket bytes
    its default hook would all-reduce (the same buckets, every entry)."""
    from torch.nn.parallel import DistributedDataParallel

    from childopt.ddp import register_child_network_hook

    module = _Sum(make_params(roberta_base_shapes(*SIZES[size]), torch.device("cpu")))
    gen = torch.Generator().manual_seed(1)
    opt = MaskedAdamW(module.parameters(), mask={p: _full_mask(p, gen) for p in module.parameters()}, seed=3)
    ddp = DistributedDataParallel(module)
    state = register_child_network_hook(ddp, opt)
    ddp(torch.ones(())).backward()
    return {"child_hook_bytes": state.bytes_sent, "default_hook_bytes": state.dense_bytes,
            "ratio": state.bytes_sent / state.dense_bytes, "reserve_p": RESERVE_P}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="torchrun --nproc_per_node N -m childopt.bench.distributed",
                                     description="FSDP2 and DDP rows of MaskedAdamW (run under torchrun)")
    parser.add_argument("--size", default="24m", choices=sorted(SIZES))
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--json", default=None,
                        help="also write the rows to this JSON file (rank 0; checked first, missing folders made)")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup < 0:
        parser.error(f"--steps must be >= 1 and --warmup >= 0, got {args.steps} and {args.warmup}")
    check_output_files(parser, {"--json": args.json})
    dist.init_process_group("gloo")
    rows = step_rows(args.size, args.warmup, args.steps)
    ddp = ddp_bytes_row(args.size)
    if dist.get_rank() == 0:
        report = {"machine": cpu_name(), "threads_per_rank": torch.get_num_threads(), "size": args.size,
                  "steps": args.steps, "rows": rows, "ddp": ddp}
        _print(report)
        if args.json:
            write_output(args.json, json.dumps(report, indent=2) + "\n")
    dist.destroy_process_group()
    return 0


def _print(report: dict) -> None:
    print(f"{report['machine']}; {report['threads_per_rank']} thread(s) per rank; {report['size']} fp32; "
          f"median of {report['steps']} steps")
    print("| mode | ranks | step ms, sharded (all ranks) | step ms, one process (threads) | state MiB, most on a rank "
          "| state MiB, one process | most on a rank / (one process / ranks) |")
    print("|---|---|---|---|---|---|---|")
    for row in report["rows"]:
        most = max(row["state_bytes_per_rank"])
        share = most / (row["one_process_state_bytes"] / row["world"])
        alone = ", ".join(f"{ms:.1f} ({threads})" for threads, ms in row["one_process_step_ms"].items())
        print(f"| {row['mode']} | {row['world']} | {row['sharded_step_ms']:.1f} | {alone} | "
              f"{most / 2**20:.1f} | {row['one_process_state_bytes'] / 2**20:.1f} | {share:.4f} |")
    ddp = report["ddp"]
    print(f"DDP all-reduce per backward: child-network hook {ddp['child_hook_bytes'] / 2**20:.1f} MiB, default "
          f"{ddp['default_hook_bytes'] / 2**20:.1f} MiB: {ddp['ratio']:.4f} of the dense bytes "
          f"(reserve_p {ddp['reserve_p']})")


if __name__ == "__main__":
    raise SystemExit(main())
