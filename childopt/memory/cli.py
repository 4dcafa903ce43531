"""The command line of ``python -m childopt memory``: plan each method's peak memory, print a table
per device, and optionally measure the same step on the CPU, plot the bars and write JSON."""
from __future__ import annotations

import argparse
import sys

from tqdm import tqdm

from childopt.arguments import check_output_files, number, replacing
from childopt.memory import report
from childopt.memory.methods import METHODS, wrap_lora
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
    args.default_methods = args.method is None
    if args.method is None:
        args.method = [m.name for m in METHODS.values() if args.world_size == 1 or not m.fsdp2_refusal]
    check_output_files(parser, {"--plot": args.plot, "--json": args.json}, plots=("--plot",))
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.measure and args.world_size > 1:
        return _error(f"--measure runs one CPU process; it cannot check --world-size {args.world_size}")
    refused = [METHODS[m] for m in args.method if METHODS[m].fsdp2_refusal] if args.world_size > 1 else []
    if refused:
        reasons = "; ".join(f"--method {m.name} cannot be planned with --world-size {args.world_size} (FSDP2): "
                            f"{m.fsdp2_refusal}" for m in refused)
        return _error(reasons)
    try:
        arch = architecture(args.model, args.head)
        setting = Setting(batch_size=args.batch_size, seq_len=args.seq_len, dtype=args.dtype, autocast=args.autocast,
                          checkpointing=args.checkpointing, world_size=args.world_size, reserve_p=args.reserve_p,
                          mask_scope=args.mask_scope, lora_rank=args.lora_rank)
        model = build(arch, DTYPES[args.dtype])
        parameters = sum(p.numel() for p in model.parameters())  # the base model's, whatever --method lists first
        check_length(model, arch.config, args.seq_len, name="--seq-len")
        names = _lora_checked(args, arch, model)
        plans = [plan(arch, name, setting) for name in tqdm(names, desc="tracing", unit="method")]
    except (ValueError, RuntimeError) as exc:
        return _error(exc)
    title = report.describe(arch, setting, parameters, names)
    print(title)
    print(report.table(plans))  # before measuring: a measurement that fails leaves the plans printed
    measured = {}
    if args.measure:
        try:
            measured = _measure(arch, setting, plans)
        except (ValueError, RuntimeError, MemoryError) as exc:
            return _error(exc)
        if measured:
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


def _error(message) -> int:
    print(f"python -m childopt memory: error: {message}", file=sys.stderr)
    return 2


def _lora_checked(args: argparse.Namespace, arch, model) -> list:
    """The methods to plan, with 'lora' checked on ``model`` (it gets adapters) before anything is traced:
    without default LoRA target modules in peft for the model, it is left out of the default methods
    with a note, and refused when --method names it."""
    if "lora" not in args.method:
        return args.method
    try:
        wrap_lora(model, arch.head, args.lora_rank)
    except (ValueError, RuntimeError) as exc:
        if not args.default_methods:
            raise ValueError(f"{exc}; leave lora out of --method to plan the others") from exc
        print(f"python -m childopt memory: note: lora left out: {exc}", file=sys.stderr)
        return [m for m in args.method if m != "lora"]
    return args.method


def _size(n: int) -> str:
    return f"{n / 1e9:,.3f} GB" if n >= 1e9 else f"{n / 1e6:,.3f} MB"


def _measure(arch, setting: Setting, plans: list) -> dict:
    """Each plan measured on this CPU, where its method runs on one; refused, before anything is
    allocated, when the largest planned peak is above the memory available."""
    from childopt.memory.validate import available_memory, measure

    runnable = [p for p in plans if METHODS[p.method].runs_on_cpu]
    if not runnable:  # adamw-8bit alone
        return {}
    largest = max(runnable, key=lambda p: p.total)
    available, source = available_memory()
    if available is None:
        print(f"python -m childopt memory: note: the available memory is unknown ({source}); measuring without "
              "checking it against the plans", file=sys.stderr)
    elif largest.total > available:
        raise ValueError(f"--measure would allocate {_size(largest.total)} (the planned peak of {largest.method}) "
                         f"but {_size(available)} is available ({source}); drop --measure or plan a smaller step")
    return {p.method: measure(arch, p.method, setting) for p in tqdm(runnable, desc="measuring", unit="method")}
