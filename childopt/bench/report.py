"""``python -m childopt bench``: the optimizer-step table, the training-step table and the goals.

It runs on whatever device is present: the step rows of :mod:`childopt.bench.step`, the end-to-end
training rows of :mod:`childopt.bench.train`, then the goal ratios of :mod:`childopt.bench.goals`,
all measured in this one run; ``--json`` keeps every number with the environment, ``--markdown``
writes the summary that goes beside it in bench/results, ``--plot`` draws speed and memory.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Optional

import torch

from childopt import backends
from childopt.bench import environment, measure, step, train
from childopt.bench.goals import format_goals, step_goals, training_goals
from childopt.bench.shapes import roberta_base_shapes


def parse_args(argv=None) -> argparse.Namespace:
    """The command line of ``python -m childopt bench``."""
    parser = argparse.ArgumentParser(
        prog="python -m childopt bench",
        description="Time one optimizer step of torch AdamW, the childopt optimizers and the ChildTuning loop "
                    "(memory and achieved bandwidth), a full training step of a RoBERTa with each, and report "
                    "childopt's goals as ratios measured in this run.")
    parser.add_argument("--quick", action="store_true", help="a smaller parameter list and fewer steps")
    parser.add_argument("--json", metavar="PATH", help="write the environment, every row and the goals as JSON")
    parser.add_argument("--markdown", metavar="PATH",
                        help="write a markdown summary (environment, command, the tables and goals)")
    parser.add_argument("--plot", metavar="PATH", help="save a PNG bar chart (needs matplotlib)")
    parser.add_argument("--device", choices=("cpu", "cuda"),
                        help="where the tensors live (default: cuda when available, else cpu)")
    parser.add_argument("--steps", type=int, metavar="N",
                        help="timed steps per row, step and training rows alike (default: by device and size)")
    parser.add_argument("--backend", choices=backends.CHOICES, default="auto",
                        help="the childopt backend of the childopt rows (default: auto's pick per device)")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available to this torch")
    if args.steps is not None and args.steps < 1:
        parser.error(f"--steps must be >= 1, got {args.steps}")
    return args


def describe_run(device: torch.device, shapes, scale: float, layers: Optional[int], steps: int) -> dict:
    """What was stepped and how it was measured, for the header and the JSON meta."""
    rss_window = "each row's timed steps" if measure.reset_peak_memory(device) else "process start"
    return {
        "peak_gb": ("torch.cuda.max_memory_allocated over the timed steps" if device.type == "cuda"
                    else f"process peak RSS since {rss_window} (an upper bound: it starts from the RSS "
                         "then, heap kept from earlier rows included)"),
        "state_gb": "bytes of the tensors in optimizer.state",
        "params": {"numel": sum(torch.Size(s).numel() for s in shapes), "tensors": len(shapes),
                   "scale": scale, "layers": layers},
        "warmup": measure.WARMUP,
        "steps": steps,
    }


def _bars(fig_row, title, labels, speed, memory, speed_label):
    """One row of the figure: it/s bars on the left, GB bars (``memory``: label -> values) on the right."""
    speed_ax, memory_ax = fig_row
    speed_ax.set_title(title, loc="left")
    ticks = list(range(len(labels)))
    bars = speed_ax.barh(ticks, speed, color="tab:blue")
    speed_ax.bar_label(bars, fmt="%.2f", padding=3)
    speed_ax.set_yticks(ticks, labels)
    speed_ax.invert_yaxis()
    speed_ax.set_xlabel(f"{speed_label} per second (higher is better)")
    speed_ax.margins(x=0.15)
    height = 0.8 / len(memory)
    for i, ((label, values), color) in enumerate(zip(memory.items(), ("tab:orange", "tab:green"))):
        offset = (i - (len(memory) - 1) / 2) * height
        bars = memory_ax.barh([t + offset for t in ticks], values, height=height, label=label, color=color)
        memory_ax.bar_label(bars, fmt="%.2f", padding=3, fontsize=8)
    memory_ax.set_xlabel("GB (lower is better)")
    memory_ax.legend(loc="lower right")
    memory_ax.margins(x=0.15)


def _labels(rows) -> list[str]:
    return [f"{r.optimizer}\n{r.mode} [{r.backend}]" for r in rows]


def plot(rows: list[step.Row], train_rows: list[train.TrainRow], path: str, title: str,
         titles: tuple[str, str]) -> None:
    """Save horizontal bar charts of it/s and GB: optimizer steps on top, training steps below
    (``titles``: the subtitle of each)."""
    try:
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise RuntimeError("--plot needs matplotlib: pip install matplotlib") from exc
    heights = [len(rows)] + ([len(train_rows)] if train_rows else [])
    fig = Figure(figsize=(13, 1.5 + 0.6 * sum(heights)), layout="constrained")
    axes = fig.subplots(len(heights), 2, sharey="row", squeeze=False, gridspec_kw={"height_ratios": heights})
    _bars(axes[0], titles[0], _labels(rows), [r.it_s for r in rows],
          {"peak GB": [r.peak_gb for r in rows], "state GB": [r.state_gb for r in rows]}, "optimizer steps")
    if train_rows:
        _bars(axes[1], titles[1], _labels(train_rows), [r.it_s for r in train_rows],
              {"peak GB": [r.peak_gb for r in train_rows]}, "training steps")
    fig.suptitle(title)
    fig.savefig(path, dpi=110)


def _goals_heading(meta: dict) -> str:
    on_target_gpu = meta["gpu_name"] and any(g in meta["gpu_name"] for g in ("H100", "H200"))
    where = "" if on_target_gpu else \
        f" (targets are for H100/H200; measured here on {meta['device_name']}, so they only inform)"
    return f"goals, each a ratio of two rows of this run{where}:"


def markdown(meta: dict, body: str) -> str:
    """The markdown summary that goes beside a run's JSON: what ran where, then the printed tables."""
    command = " ".join(["python -m childopt bench", *meta["argv"]])
    return (f"# childopt bench: {meta['device_name']}, {meta['timestamp'][:10]}\n\n"
            f"`{command}` at commit `{meta['git_commit']}`: torch {meta['torch']}, Triton {meta['triton']}, "
            f"CUDA {meta['cuda']}, driver {meta['driver']}, Python {meta['python']}, {meta['platform']}.\n\n"
            f"```\n{body}\n```\n")


def main(argv=None) -> int:
    """Run the step and training rows, print the tables and the goals; write JSON, markdown and plot when asked."""
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    scale, layers, default_steps = step.SIZES[(device.type, args.quick)]
    steps = args.steps or default_steps
    train_steps = args.steps or train.STEPS[(device.type, args.quick)]
    shapes = roberta_base_shapes(scale, layers)
    meta = {**environment.describe(device, vars(args)), **describe_run(device, shapes, scale, layers, steps),
            "argv": list(sys.argv[1:] if argv is None else argv)}
    numel = meta["params"]["numel"]
    lines = [f"childopt bench on {meta['device_name']} ({device}); torch {meta['torch']}, "
             f"triton {meta['triton'] or 'not installed'}, CUDA {meta['cuda']}, python {meta['python']}",
             f"optimizer step: {numel / 1e6:.1f}M fp32 parameters in {len(shapes)} tensors; "
             f"{measure.WARMUP} warm-up + {steps} timed steps per row",
             f"peak GB: {meta['peak_gb']}; state GB: {meta['state_gb']}"]
    print("\n".join(lines))

    copy_gbps = measure.measure_copy_gbps(numel, device, warmup=measure.WARMUP, steps=steps)
    rows, skipped = step.run_rows(shapes, device, warmup=measure.WARMUP, steps=steps, backend=args.backend)
    rows, baseline = step.compare(rows, copy_gbps)
    setup, train_rows, train_skipped = train.optional_rows(device, warmup=measure.WARMUP, steps=train_steps,
                                                           backend=args.backend)
    goals = step_goals(rows) + training_goals(train_rows)

    results = [f"copy bandwidth: {copy_gbps:.1f} GB/s (dst.copy_(src), fp32, 8 B per element)",
               step.format_table(rows, baseline)]
    if train_rows:
        results += [f"\ntraining step (forward, backward, step, zero_grad): {setup.description}; "
                    f"{measure.WARMUP} warm-up + {train_steps} timed steps per row",
                    train.format_table(train_rows)]
    results += [f"skipped {skip['optimizer']} {skip['mode']}: {skip['reason']}" for skip in skipped + train_skipped]
    results += ["\n" + _goals_heading(meta), format_goals(goals)]
    print("\n".join(results))

    if args.json:
        report = {"meta": meta, "copy_gbps": copy_gbps, "rows": [dataclasses.asdict(r) for r in rows],
                  "skipped": skipped,
                  "training": {"setup": setup.description if setup else None,
                               "steps": train_steps,
                               "rows": [dataclasses.asdict(r) for r in train_rows],
                               "skipped": train_skipped},
                  "goals": [{**dataclasses.asdict(g), "met": g.met} for g in goals]}
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json}")
    if args.markdown:
        Path(args.markdown).write_text(markdown(meta, "\n".join(lines + results)))
        print(f"wrote {args.markdown}")
    if args.plot:
        plot(rows, train_rows, args.plot, f"childopt bench: {meta['device_name']}",
             (f"optimizer step, {numel / 1e6:.1f}M fp32 parameters",
              f"training step, {setup.description if setup else ''}"))
        print(f"wrote {args.plot}")
    return 0
