"""The summary ``python -m childopt finetune`` writes after its runs (alone with ``--summarize``): the
run JSONs of one directory as a markdown table (mean and standard deviation over seeds, difference
to adamw, speed and memory), a paragraph on what it was measured with, and learning curves by method.

With several learning rates, each (task, method) is reported at the lr whose mean dev headline
metric over the seeds is best (chosen on dev, as GLUE's test labels are not public: an optimistic
estimate for every method alike).
"""
from __future__ import annotations

import statistics
import sys
from pathlib import Path
from typing import Optional

import torch

from childopt.arguments import save_figure, write_output
from childopt.finetune import glue
from childopt.finetune.plan import GRID, METHODS, config_differences, format_lr, read_records, run_name

TABLE_NAME, PLOT_NAME = "table.md", "curves.png"


def _run_name(record: dict) -> str:
    return run_name(record["task"], record["method"], record["config"]["lr"], record["seed"])


def load_records(output: str, purpose: str = "to summarize") -> list[dict]:
    """The run JSONs of ``output`` (:func:`.plan.read_records`), all of one configuration but the lr (else an
    error naming the field); ``purpose`` ends the error when there are none."""
    records = list(read_records(output).values())
    if not records:
        raise FileNotFoundError(f"--output {output}: no run JSONs (<TASK>-<method>-lr<lr>-seed<seed>.json) {purpose}")
    first = records[0]
    for record in records[1:]:
        if details := config_differences(record["config"], first["config"], skip=GRID):
            raise ValueError(f"{output} mixes configurations ({details}: 'there' is {_run_name(record)}, 'now' "
                             f"{_run_name(first)}); summarize one configuration per directory")
    return records


def best_lr_groups(records: list[dict]) -> dict:
    """(task, method) -> the records at its best lr, tasks and methods in their canonical order."""
    by_lr: dict = {}
    for record in sorted(records, key=lambda r: (list(glue.TASKS).index(r["task"]), METHODS.index(r["method"]),
                                                   r["config"]["lr"], r["seed"])):
        by_lr.setdefault((record["task"], record["method"]), {}).setdefault(record["config"]["lr"], []).append(record)
    return {key: max(runs_by_lr.values(), key=_mean_headline) for key, runs_by_lr in by_lr.items()}


def _mean_headline(runs: list[dict]) -> float:
    return statistics.fmean(r["dev"][glue.TASKS[r["task"]].metrics[0]] for r in runs)


def _mean_std(values: list[float]) -> str:
    mean = statistics.fmean(values)
    return f"{mean:.4f} ± {statistics.stdev(values):.4f}" if len(values) > 1 else f"{mean:.4f}"


def _delta(runs: list[dict], baseline: Optional[list[dict]]) -> str:
    """Mean headline metric of ``runs`` minus that of the adamw runs (blank for adamw or without it)."""
    if baseline is None or runs is baseline:
        return ""
    headline = glue.TASKS[runs[0]["task"]].metrics[0]
    mean = [statistics.fmean(r["dev"][headline] for r in group) for group in (runs, baseline)]
    return f"{mean[0] - mean[1]:+.4f}"


def summary_table(records: list[dict]) -> str:
    """Markdown: per task and method (at its best lr), each dev metric after the last epoch as mean ±
    std over seeds, the headline metric's difference to adamw, it/s, peak GB and optimizer state GB."""
    groups = best_lr_groups(records)
    metrics = list(dict.fromkeys(m for task, _ in groups for m in glue.TASKS[task].metrics))
    header = ["task", "method", "lr", "seeds", *metrics, "Δ vs adamw", "it/s", "peak GB", "state GB"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for (task, method), runs in groups.items():
        cells = [task, method, format_lr(runs[0]['config']['lr']), str(len(runs)),
                 *(_mean_std([r["dev"][m] for r in runs]) if m in runs[0]["dev"] else "" for m in metrics),
                 _delta(runs, groups.get((task, "adamw"))), f"{statistics.fmean(map(fastest_epoch, runs)):.2f}",
                 f"{max(r['peak_gb'] for r in runs):.2f}", f"{max(r['state_gb'] for r in runs):.3f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def fastest_epoch(record: dict) -> float:
    """A run's it/s in its fastest epoch.  On a shared machine the slower epochs time the neighbours'
    work as much as ours; the fastest is the closest to the run alone (the JSON keeps every epoch's)."""
    return max(h["it_s"] for h in record["history"] if h.get("it_s"))


def describe(records: list[dict]) -> str:
    """One paragraph: model, hyper-parameters, device and versions the table was measured with."""
    config, env = records[0]["config"], records[0]["env"]
    tasks = dict.fromkeys(r["task"] for r in records)
    lrs = sorted({r["config"]["lr"] for r in records})
    lr = f"lr {lrs[0]}" if len(lrs) == 1 else \
        f"lr grid {', '.join(map(format_lr, lrs))} (each task and method at its best mean dev headline: column lr)"
    rows = "all training rows" if config.get("train_size") is None else \
        f"{config['train_size']} training rows drawn per seed"
    return (f"Model {config['model']}; {rows}; {config['epochs']} epochs"
            f"{'' if config['max_steps'] is None else ' capped at ' + str(config['max_steps']) + ' steps'}, "
            f"{lr}, batch {config['batch_size']}, max_length {config['max_length']}, "
            f"warmup {config['warmup_ratio']}, weight decay {config['weight_decay']}, clip {config['max_grad_norm']}, "
            f"reserve_p {config['reserve_p']}. Dev metrics after the last epoch; Δ is the headline metric "
            f"({', '.join(f'{t}: {glue.TASKS[t].metrics[0]}' for t in tasks)}) minus adamw's. it/s: training "
            f"steps per second (forward, backward, clip, step; no eval, no Fisher pass) in each run's fastest "
            f"epoch, mean over seeds; peak GB: "
            f"{'torch.cuda.max_memory_allocated' if env['device'].startswith('cuda') else 'process peak RSS'} "
            f"(max over seeds). Measured on "
            f"{_env_values(records, lambda e: e['device_name'] + ' (' + e['device'] + ')')}, "
            f"torch {_env_values(records, lambda e: e['torch'])}, "
            f"transformers {_env_values(records, lambda e: e['transformers'])}, "
            f"childopt commit {_env_values(records, lambda e: _short_commit(e['git_commit']))}.")


def _short_commit(commit) -> str:
    """10 hex digits of a recorded commit, and its mark of uncommitted changes when it has one."""
    digits, _, changes = (commit or "unknown").partition(" ")
    return f"{digits[:10]} {changes}".rstrip()


def _env_values(records: list[dict], field) -> str:
    """Each distinct ``field(env)`` over the runs, first seen first: a table built over several sessions
    names every machine, version and commit that went into it, not only the first run's."""
    return ", ".join(dict.fromkeys(field(record["env"]) for record in records))


def plot_curves(records: list[dict], path: Path) -> None:
    """Dev headline metric and train loss against epochs, mean over seeds (band: ± std), by method."""
    try:
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise ImportError("the learning-curve plot needs matplotlib: pip install 'childopt[plot]'") from exc
    groups = best_lr_groups(records)
    tasks = list(dict.fromkeys(task for task, _ in groups))
    fig = Figure(figsize=(4.5 * len(tasks), 7), layout="constrained")
    axes = fig.subplots(2, len(tasks), squeeze=False)
    for column, task in enumerate(tasks):
        headline = glue.TASKS[task].metrics[0]
        for method in METHODS:
            runs = groups.get((task, method))
            if runs:
                _curve(axes[0][column], runs, lambda h: h["dev"][headline], method, start=0)
                _curve(axes[1][column], runs, lambda h: h["train_loss"], method, start=1)
        axes[0][column].set_title(f"{task}: dev {headline}")
        axes[1][column].set_title(f"{task}: train loss (epoch mean)")
        axes[1][column].set_xlabel("epoch")
        axes[0][column].legend()
    save_figure(fig, path, dpi=110)


def _curve(ax, runs: list[dict], value, label: str, *, start: int) -> None:
    """One method's mean curve over its seeds, with a ± std band when there are several."""
    epochs = [h["epoch"] for h in runs[0]["history"][start:]]
    values = torch.tensor([[value(h) for h in r["history"][start:]] for r in runs], dtype=torch.float64)
    mean = values.mean(0)
    style = "--" if label == "sparse" else "-"  # sparse retraces ct-d: dashed, so both stay visible
    line, = ax.plot(epochs, mean.tolist(), marker="o", linestyle=style, label=label)
    if len(runs) > 1:
        std = values.std(0)
        ax.fill_between(epochs, (mean - std).tolist(), (mean + std).tolist(), color=line.get_color(), alpha=0.2)


def summarize(output: str) -> str:
    """Write ``table.md`` (and ``curves.png`` when matplotlib is there) into ``output``; return the table."""
    records = load_records(output)
    text = f"{summary_table(records)}\n\n{describe(records)}\n"
    write_output(Path(output) / TABLE_NAME, text)
    print(text + f"wrote {Path(output) / TABLE_NAME}")
    try:
        plot_curves(records, Path(output) / PLOT_NAME)
        print(f"wrote {Path(output) / PLOT_NAME}")
    except ImportError as exc:
        print(f"no plot: {exc}", file=sys.stderr)
    return text
