"""``python -m childopt bench``: the optimizer-step tables, the training-step table and the goals.

It runs on whatever device is present: the step tables of :mod:`childopt.bench.sweep` (on CPU at
one intra-op thread and at all of them, each beside its in-place stream reference), the paired
ratios of :mod:`childopt.bench.paired` (the main rows and torch fused AdamW on the same
parameters, in rotation), the end-to-end training rows of :mod:`childopt.bench.train`, then the goal ratios of
:mod:`childopt.bench.goals`, all measured in this one run; ``--json`` keeps every number with the
environment, ``--markdown`` writes the summary that goes beside it in bench/results, ``--plot``
draws speed and memory.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys

import torch

from childopt import backends
from childopt.arguments import check_output_files, replacing, write_output
from childopt.bench import ceiling, contention, environment, evict, measure, paired, step, sweep, train
from childopt.bench.contention import OtherLoad
from childopt.bench.goals import TARGETS, format_goals, paired_goals, step_goals, training_goals
from childopt.bench.shapes import roberta_base_shapes
from childopt.bench.threads import DEFAULT_CPU, label, parse_threads


def _listed(text: str, allowed, option: str, parser: argparse.ArgumentParser) -> list[str]:
    """The comma-separated items of ``text``, each once, each one of ``allowed``; a usage error otherwise."""
    items = list(dict.fromkeys(item.strip() for item in text.split(",")))
    bad = [item for item in items if item not in allowed]
    if bad:
        parser.error(f"{option}: {', '.join(map(repr, bad))} not among {', '.join(allowed)}")
    return items


def device_of(args: argparse.Namespace) -> torch.device:
    """``--device``, else cuda when available, else cpu."""
    return torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))


def _check_backend(backend: str, device: torch.device, parser: argparse.ArgumentParser) -> None:
    """A usage error, before anything is measured, for a bad CHILDOPT_BACKEND or a backend (named by
    --backend or CHILDOPT_BACKEND) that cannot run on ``device``: every childopt row would fail."""
    try:
        name = backends.requested(backend)
    except ValueError as exc:
        parser.error(str(exc))
    if name != "auto":
        ok, why = backends.MODULES[name].available(device)  # native: builds it, as its first row would
        if not ok:
            given = f"--backend {name}" if backend == name else f"CHILDOPT_BACKEND={name}"
            parser.error(f"{given} cannot run on {device.type} tensors: {why}")


def parse_args(argv=None) -> argparse.Namespace:
    """The command line of ``python -m childopt bench``; ``sizes``, ``dtypes`` and ``thread_counts``
    hold the parsed lists (``sizes`` None: the device's default)."""
    parser = argparse.ArgumentParser(
        prog="python -m childopt bench",
        description="Time one optimizer step of torch AdamW, the childopt optimizers and the ChildTuning loop "
                    "(memory, achieved bandwidth and its share of an in-place stream reference), a full "
                    "training step of a RoBERTa with each (with live tensor memory), and report childopt's goals "
                    "as ratios measured in this run.")
    parser.add_argument("--quick", action="store_true", help="fewer timed steps per row")
    parser.add_argument("--json", metavar="PATH", help="write the environment, every row and the goals as JSON")
    parser.add_argument("--markdown", metavar="PATH",
                        help="write a markdown summary (environment, command, the tables and goals)")
    parser.add_argument("--plot", metavar="PATH",
                        help="save bar charts, as PNG or any format matplotlib writes, by the suffix "
                             "(needs matplotlib)")
    parser.epilog = "Output paths are checked before anything is measured; missing folders are made."
    parser.add_argument("--device", choices=("cpu", "cuda"),
                        help="where the tensors live (default: cuda when available, else cpu)")
    parser.add_argument("--steps", type=int, metavar="N",
                        help="timed steps per row, step and training rows alike (default: by device and --quick)")
    parser.add_argument("--backend", choices=backends.CHOICES, default="auto",
                        help="the childopt backend of the childopt rows (default: auto's pick per device)")
    parser.add_argument("--size", metavar="LIST",
                        help=f"roberta-base-shaped parameter lists, comma-separated, of {', '.join(step.SIZES)} "
                             f"(default: {step.DEFAULT_SIZE['cpu']} on CPU, {step.DEFAULT_SIZE['cuda']} on CUDA)")
    parser.add_argument("--dtype", metavar="LIST", default="float32",
                        help=f"parameter and gradient dtypes, comma-separated, of {', '.join(step.DTYPES)} "
                             "(default: float32)")
    parser.add_argument("--threads", metavar="LIST",
                        help="intra-op thread counts of the step tables, comma-separated positive integers or "
                             f"'all' (torch.get_num_threads() at start; default: {DEFAULT_CPU} on CPU, all on CUDA)")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available to this torch")
    if args.steps is not None and args.steps < 1:
        parser.error(f"--steps must be >= 1, got {args.steps}")
    args.sizes = _listed(args.size, step.SIZES, "--size", parser) if args.size is not None else None
    args.dtypes = _listed(args.dtype, step.DTYPES, "--dtype", parser)
    threads = args.threads if args.threads is not None else DEFAULT_CPU if device_of(args).type == "cpu" else "all"
    try:
        args.thread_counts = parse_threads(threads, torch.get_num_threads())
    except ValueError as exc:  # the default too: "all" is torch's count, which may exceed the limit
        parser.error(f"--threads{'' if args.threads is not None else f' (default {threads})'}: {exc}")
    check_output_files(parser, {"--json": args.json, "--markdown": args.markdown, "--plot": args.plot},
                       plots=("--plot",))
    _check_backend(args.backend, device_of(args), parser)  # last: it may build childopt._C
    return args


def describe_run(device: torch.device, sizes: list[str], thread_counts: list[int], steps: int) -> dict:
    """What was stepped and how it was measured, for the header and the JSON meta."""
    rss_window = "each row's timed steps" if measure.reset_peak_memory(device) else "process start"
    return {
        "peak_gb": ("torch.cuda.max_memory_allocated over the timed steps" if device.type == "cuda"
                    else f"process peak RSS since {rss_window} (an upper bound: it starts from the RSS "
                         "then, heap kept from earlier rows included)") + ", less the cache-eviction buffer",
        "state_gb": "bytes of the tensors in optimizer.state",
        "pct_stream": "the row's GB/s (its byte model over its median time) / the in-place stream reference's "
                      "GB/s, measured at the same thread count",
        "compute_ms": ("the row's in-cache time: its step's cost per element with its data in cache (arithmetic "
                       f"and cache traffic: the slope between two sizes of a {ceiling.TENSORS}-tensor list within "
                       "one last-level cache instance, without fixed per-step costs) times its elements; near "
                       "ms/step: bound by the cores, not memory; '-' where not measured (compiled rows) or no "
                       "slope stood out of the timing noise"
                       if device.type == "cpu" else "not measured on CUDA"),
        "live_gb": "held GB: parameters, gradients and optimizer state live when one extra, untimed training step "
                   "starts (counted from the tensors); live GB: held + the peak of tensor bytes allocated minus "
                   "freed during that step (" + ("torch.cuda.max_memory_allocated" if device.type == "cuda"
                                                 else "torch profiler memory events") + "); saved GB: the same "
                   "peak over one forward whose graph is kept, what autograd saves for backward (a frozen weight "
                   "saves no input for its gradient; a weight with any trained entry does)",
        "params": {size: {"numel": sweep.size_numel(size), "tensors": len(roberta_base_shapes(*step.SIZES[size])),
                          "roberta_base_shapes": step.SIZES[size]} for size in sizes},
        "threads": {"all": torch.get_num_threads(), "timed": thread_counts},
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
    _memory_bars(memory_ax, ticks, memory, "GB", "%.2f")


def _memory_bars(ax, ticks, memory: dict, unit: str, fmt: str) -> None:
    """Grouped bars on ``ax``, one colour per entry of ``memory`` (label -> values in ``unit``)."""
    height = 0.8 / len(memory)
    for i, ((legend, values), color) in enumerate(zip(memory.items(), ("tab:orange", "tab:green", "tab:red"))):
        offset = (i - (len(memory) - 1) / 2) * height
        bars = ax.barh([t + offset for t in ticks], values, height=height, label=legend, color=color)
        ax.bar_label(bars, fmt=fmt, padding=3, fontsize=8)
    ax.set_xlabel(f"{unit} (lower is better)")
    ax.legend(loc="lower right")
    ax.margins(x=0.15)


def _training_bars(fig, fig_row, title: str, rows) -> None:
    """The training row: it/s, then peak GB (on CPU the process peak RSS, about the same for every
    row) on an axis of its own, so that held, live and saved bytes, which tell the methods apart,
    get theirs: in MB below 1 GB, 3 significant digits."""
    speed_ax, memory_ax = fig_row
    peak_spec, bytes_spec = memory_ax.get_subplotspec().subgridspec(1, 2, width_ratios=(1, 2))
    memory_ax.remove()
    peak_ax = fig.add_subplot(peak_spec, sharey=speed_ax)
    bytes_ax = fig.add_subplot(bytes_spec, sharey=speed_ax)
    _bars((speed_ax, peak_ax), title, _labels(rows), [r.it_s for r in rows], {"peak GB": [r.peak_gb for r in rows]},
          "training steps")
    peak_ax.get_legend().remove()  # one series: the axis says what it is
    peak_ax.set_xlabel("peak GB (lower is better)")
    peak_ax.margins(x=0.3)
    gb = {"held": [r.held_gb for r in rows], "live": [r.live_gb for r in rows], "saved": [r.saved_gb for r in rows]}
    unit, scale = ("MB", 1e3) if max(max(values) for values in gb.values()) < 1 else ("GB", 1)
    _memory_bars(bytes_ax, list(range(len(rows))),
                 {f"{name} {unit}": [v * scale for v in values] for name, values in gb.items()}, unit, "%#.3g")
    for ax in (peak_ax, bytes_ax):
        ax.tick_params(labelleft=False)


def _labels(rows) -> list[str]:
    return [f"{r.optimizer}\n{r.mode} [{r.backend}]" for r in rows]


def _paired_bars(fig_row, title: str, table: paired.PairedTable) -> None:
    """One row of the figure for a paired table: the ratios to the baseline on the left (a line at
    1), the median ms per step on the right."""
    ratio_ax, ms_ax = fig_row
    ratio_ax.set_title(title, loc="left")
    ticks = list(range(len(table.rows)))
    bars = ratio_ax.barh(ticks, [r.x_fused for r in table.rows], color="tab:purple")
    ratio_ax.bar_label(bars, fmt="%.2fx", padding=3)
    ratio_ax.axvline(1.0, color="black", linewidth=0.8)
    ratio_ax.set_yticks(ticks, _labels(table.rows))
    ratio_ax.invert_yaxis()
    ratio_ax.set_xlabel(f"speed vs {table.rows[0].optimizer} {table.rows[0].mode}, same parameters (higher is better)")
    ratio_ax.margins(x=0.15)
    bars = ms_ax.barh(ticks, [r.ms_per_step for r in table.rows], color="tab:gray")
    ms_ax.bar_label(bars, fmt="%.2f", padding=3, fontsize=8)
    ms_ax.set_xlabel("median ms per step in the rotation (lower is better)")
    ms_ax.margins(x=0.15)


def plot(tables: list[step.Table], paired_tables: list[paired.PairedTable], train_rows: list[train.TrainRow],
         path: str, title: str, titles: list[str]) -> None:
    """Save horizontal bar charts: it/s and GB, one row of charts per step table; ratios and ms per
    step, one row per paired table; the training steps below (``titles``: the subtitle of each
    row, in that order)."""
    try:
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise RuntimeError("--plot needs matplotlib: pip install matplotlib") from exc
    heights = ([len(t.rows) for t in tables] + [len(t.rows) for t in paired_tables]
               + ([len(train_rows)] if train_rows else []))
    fig = Figure(figsize=(13, 1.5 + 0.6 * sum(heights)), layout="constrained")
    axes = fig.subplots(len(heights), 2, sharey="row", squeeze=False, gridspec_kw={"height_ratios": heights})
    for axes_row, table, subtitle in zip(axes, tables, titles):
        _bars(axes_row, subtitle, _labels(table.rows), [r.it_s for r in table.rows],
              {"peak GB": [r.peak_gb for r in table.rows], "state GB": [r.state_gb for r in table.rows]},
              "optimizer steps")
    for axes_row, table, subtitle in zip(axes[len(tables):], paired_tables, titles[len(tables):]):
        _paired_bars(axes_row, subtitle, table)
    if train_rows:
        _training_bars(fig, axes[-1], titles[-1], train_rows)
    fig.suptitle(title)
    fig.savefig(path, dpi=110)


def _goals_heading(meta: dict) -> str:
    """Whose targets the goals are and where they were measured."""
    if meta["device"].startswith("cuda"):
        on_target_gpu = any(g in meta["gpu_name"] for g in ("H100", "H200"))
        where = "" if on_target_gpu else f"; measured here on {meta['device_name']}, so they only inform"
        return f"goals, each a ratio of two rows of this run (targets {TARGETS['cuda']}{where}):"
    return (f"goals, each a ratio of two rows of this run (targets {TARGETS['cpu']}; measured here on "
            f"{meta['device_name']}, {meta['threads']['all']} threads):")


def markdown(meta: dict, body: str) -> str:
    """The markdown summary that goes beside a run's JSON: what ran where, then the printed tables."""
    command = " ".join(["python -m childopt bench", *meta["argv"]])
    return (f"# childopt bench: {meta['device_name']}, {meta['timestamp'][:10]}\n\n"
            f"`{command}` at commit `{meta['git_commit']}`: torch {meta['torch']}, Triton {meta['triton']}, "
            f"CUDA {meta['cuda']}, driver {meta['driver']}, Python {meta['python']}, {meta['platform']}.\n\n"
            f"```\n{body}\n```\n")


def _shown_load(load) -> str:
    """The load average as the header prints it."""
    return "unknown" if load is None else f"{load:.2f}"


def table_heading(table: step.Table, params: dict, all_threads: int) -> str:
    """What a step table stepped, at how many threads, and its stream reference."""
    return (f"optimizer step, {table.size} list: {params['numel'] / 1e6:.1f}M {table.dtype} parameters in "
            f"{params['tensors']} tensors, {label(table.threads, all_threads)}\n  {table.stream.describe()}\n"
            f"  {contention.describe(table.other_cpu)}")


def main(argv=None) -> int:
    """Run the step tables and training rows, print them and the goals; write JSON, markdown and plot when asked."""
    args = parse_args(argv)
    device = device_of(args)
    all_threads = torch.get_num_threads()
    sizes = args.sizes or [step.DEFAULT_SIZE[device.type]]
    thread_counts = args.thread_counts
    steps = args.steps or step.STEPS[(device.type, args.quick)]
    train_steps = args.steps or train.STEPS[(device.type, args.quick)]
    meta = {**environment.describe(device, vars(args)), **describe_run(device, sizes, thread_counts, steps),
            "argv": list(sys.argv[1:] if argv is None else argv)}
    lines = [f"childopt bench on {meta['device_name']} ({device}); torch {meta['torch']}, "
             f"triton {meta['triton'] or 'not installed'}, CUDA {meta['cuda']}, python {meta['python']}; "
             f"load average {_shown_load(meta['load_average'])} on {meta['cpu_count']} CPUs at the start",
             f"optimizer step tables: sizes {', '.join(sizes)}, dtypes {', '.join(args.dtypes)}, at "
             f"{' and '.join(label(n, all_threads) for n in thread_counts)} (torch.set_num_threads, restored "
             f"after); {measure.WARMUP} warm-up + {steps} timed steps per row, each after an untimed pass over "
             f"{evict.CACHES}x the last-level cache that evicts it, as a training step's forward and backward do",
             f"peak GB: {meta['peak_gb']}; state GB: {meta['state_gb']}; % of stream: {meta['pct_stream']}; "
             f"compute ms: {meta['compute_ms']}"]
    print("\n".join(lines))

    tables = sweep.run_tables(sizes, args.dtypes, thread_counts, device, warmup=measure.WARMUP, steps=steps,
                              backend=args.backend)
    paired_tables = paired.run_tables(sizes, args.dtypes, thread_counts, device, rounds=2 * steps + 1,
                                      warmup=measure.WARMUP, backend=args.backend)
    with OtherLoad() as train_load:
        setup, train_rows, train_skipped = train.optional_rows(device, warmup=measure.WARMUP, steps=train_steps,
                                                               backend=args.backend)
    goals = (step_goals(tables, device.type, all_threads) + paired_goals(paired_tables, device.type, all_threads)
             + training_goals(train_rows))

    results = []
    for table in tables:
        results += ["\n" + table_heading(table, meta["params"][table.size], all_threads),
                    step.format_table(table.rows, table.baseline)]
        results += [f"skipped {skip['optimizer']} {skip['mode']}: {skip['reason']}" for skip in table.skipped]
    for table in paired_tables:
        results += ["\n" + paired.heading(table, all_threads), paired.format_table(table)]
        results += [f"skipped {skip['optimizer']} {skip['mode']}: {skip['reason']}" for skip in table.skipped]
    if train_rows:
        results += [f"\ntraining step (forward, backward, step, zero_grad): {setup.description}; "
                    f"{label(all_threads, all_threads)}; {measure.WARMUP} warm-up + {train_steps} timed steps "
                    f"per row\n  {meta['live_gb']}\n  {contention.describe(train_load.share)}",
                    train.format_table(train_rows)]
    results += [f"skipped {skip['optimizer']} {skip['mode']}: {skip['reason']}" for skip in train_skipped]
    results += ["\n" + _goals_heading(meta), format_goals(goals)]
    shares = [t.other_cpu for t in tables + paired_tables] + ([train_load.share] if train_rows else [])
    if loaded := sum(1 for share in shares if share is not None and share > contention.LOADED_SHARE):
        results.append(f"WARNING: {loaded} of the {len(shares)} tables ran while other processes took more than "
                       f"{contention.LOADED_SHARE:.0%} of the CPUs (LOADED above): their figures and goal lines "
                       "measure the machine's load, not this code; rerun on a quiet machine")
    print("\n".join(results))

    if args.json:
        report = {"meta": meta,
                  "tables": [{"size": t.size, "dtype": t.dtype, "threads": t.threads, "baseline": t.baseline,
                              "stream": dataclasses.asdict(t.stream), "rows": [dataclasses.asdict(r) for r in t.rows],
                              "skipped": t.skipped, "other_cpu": t.other_cpu} for t in tables],
                  "paired": [dataclasses.asdict(t) for t in paired_tables],
                  "training": {"setup": setup.description if setup else None,
                               "steps": train_steps,
                               "rows": [dataclasses.asdict(r) for r in train_rows],
                               "skipped": train_skipped,
                               "other_cpu": train_load.share},
                  "goals": [{**dataclasses.asdict(g), "met": g.met} for g in goals]}
        write_output(args.json, json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json}")
    if args.markdown:
        write_output(args.markdown, markdown(meta, "\n".join(lines + results)))
        print(f"wrote {args.markdown}")
    if args.plot:
        with replacing(args.plot) as image:
            plot(tables, paired_tables, train_rows, str(image), f"childopt bench: {meta['device_name']}",
                 [f"optimizer step, {t.size} {t.dtype}, {label(t.threads, all_threads)}" for t in tables]
                 + [f"paired ratios, {t.size} {t.dtype}, {label(t.threads, all_threads)}" for t in paired_tables]
                 + [f"training step, {setup.description if setup else ''}"])
        print(f"wrote {args.plot}")
    return 0
