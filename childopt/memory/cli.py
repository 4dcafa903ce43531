"""The command line of ``python -m childopt memory``: plan each method's peak memory, print a table
per device, and optionally measure the same step on the CPU, plot the bars and write JSON."""
from __future__ import annotations

import argparse
import sys

from tqdm import tqdm

from childopt.arguments import check_output_files, number, replacing
from childopt.memory import report
from childopt.memory.methods import METHODS
from childopt.memory.models import HEADS, PRESETS, architecture, build, check_length
from childopt.memory.planner import AUTOCAST, DTYPES, Setting, plan


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m childopt memory",
        description="Peak memory per device of one training step of each fine-tuning method, by term, traced on "
                    "fake tensors (no memory is allocated; seconds even for a 7B model).",
        epilog="presets: " + "; ".join(f"{name}: {info[2]}" for name, info in PRESETS.items())
               + ".  Methods: " + "; ".join(f"{m.name}: {m.description}" for m in METHODS.values()))
    parser.add_argument("--model", required=True, metavar="PRESET|PATH",
                        help="a preset, or a local Hugging Face config.json or model directory")
    parser.add_argument("--head", choices=("auto",) + HEADS, default="auto",
                        help="auto: classification for encoders (BERT, RoBERTa, ...), causal-lm otherwise")
    parser.add_argument("--method", nargs="+", choices=tuple(METHODS),
                        help="default: every method; with --world-size > 1, every method FSDP2 can run (not "
                             + ", ".join(m.name for m in METHODS.values() if m.fsdp2_refusal) + ")")
    parser.add_argument("--reserve-p", type=number(float, 0.0, high=1.0), default=0.3,
                        help="child-network share: the masks' kept share, the Bernoulli keep probability")
    parser.add_argument("--mask-scope", choices=("layers", "all"), default="layers",
                        help="what fixed masks cover: the transformer blocks (as Child-Tuning-D) or every parameter")
    parser.add_argument("--batch-size", type=number(int, 0), default=8)
    parser.add_argument("--seq-len", type=number(int, 0), default=128)
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="fp32", help="parameter dtype")
    parser.add_argument("--autocast", choices=tuple(AUTOCAST), default="none")
    parser.add_argument("--checkpointing", action="store_true", help="activation checkpointing of every block")
    parser.add_argument("--world-size", type=number(int, 0), default=1, help="FSDP2 devices sharding the model")
    parser.add_argument("--lora-rank", type=number(int, 0), default=8)
    parser.add_argument("--measure", action="store_true",
                        help="also run each method's step for real on this CPU (MaskedAdamW on its native "
                             "kernels, built once if needed) and print the measured peak (small models only: it "
                             "allocates everything)")
    parser.add_argument("--plot", metavar="PATH",
                        help="save a stacked bar chart, as PNG or any format matplotlib writes, by the suffix "
                             "(needs matplotlib)")
    parser.add_argument("--json", metavar="PATH", help="write the plans as JSON")
    parser.epilog += ". Output paths are checked before anything is traced; missing folders are made."
    args = parser.parse_args(argv)
    if args.method is None:
        args.method = [m.name for m in METHODS.values() if args.world_size == 1 or not m.fsdp2_refusal]
    check_output_files(parser, {"--plot": args.plot, "--json": args.json}, plots=("--plot",))
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.measure and args.world_size > 1:
        print("python -m childopt memory: error: --measure runs one CPU process; it cannot check --world-size "
              f"{args.world_size}", file=sys.stderr)
        return 2
    refused = [METHODS[m] for m in args.method if METHODS[m].fsdp2_refusal] if args.world_size > 1 else []
    if refused:
        reasons = "; ".join(f"--method {m.name} cannot be planned with --world-size {args.world_size} (FSDP2): "
                            f"{m.fsdp2_refusal}" for m in refused)
        print(f"python -m childopt memory: error: {reasons}", file=sys.stderr)
        return 2
    try:
        arch = architecture(args.model, args.head)
        setting = Setting(batch_size=args.batch_size, seq_len=args.seq_len, dtype=args.dtype, autocast=args.autocast,
                          checkpointing=args.checkpointing, world_size=args.world_size, reserve_p=args.reserve_p,
                          mask_scope=args.mask_scope, lora_rank=args.lora_rank)
        check_length(build(arch, DTYPES[args.dtype]), arch.config, args.seq_len, name="--seq-len")
        plans = [plan(arch, name, setting) for name in tqdm(args.method, desc="tracing", unit="method")]
        measured = {}
        if args.measure:
            from childopt.memory.validate import measure

            runnable = [m for m in args.method if METHODS[m].runs_on_cpu]
            measured = {m: measure(arch, m, setting) for m in tqdm(runnable, desc="measuring", unit="method")}
    except (ValueError, RuntimeError) as exc:
        print(f"python -m childopt memory: error: {exc}", file=sys.stderr)
        return 2
    title = report.describe(arch, setting, plans[0].parameters, args.method)
    print(title)
    print(report.table(plans, measured))
    if args.plot:
        with replacing(args.plot) as image:
            report.plot(str(image), plans, title)
        print(f"plot: {args.plot}")
    if args.json:
        with replacing(args.json) as record:
            report.write_json(str(record), args.model, arch, setting, plans, measured)
        print(f"json: {args.json}")
    return 0
