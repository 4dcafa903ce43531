"""Heads reports of ``python -m childopt finetune``: per run with ``--report-heads``, and the runs of one
task side by side with ``--compare-heads``.

A run with ``--report-heads`` keeps, before it trains, a CPU copy of the base model's layer weights
and the Fisher scores of the base model (the pass ct-d selects its mask from: same batches, same
defaults, run for every method), then writes into ``<output>/heads/<run name>/``:

* ``heads.csv``: per (layer, head, quantity), Fisher importance, the child network's share (ct-d
  and sparse, whose mask is fixed) and the update norm (childopt.analysis);
* ``heatmaps.png`` (layer x head, per quantity) and ``scatter.png`` (importance against update norm);
  a diverged run (NaN weights) gets these, and on stderr why it has no ``heads.csv``.

LoRA's update is its merged delta (peft ``merge_and_unload``: ``W + B A * scaling``).  The report is
not part of the run's configuration, name or JSON.

``--compare-heads`` reads the run JSONs in ``--output`` (per method, the lr the summary table picks: the
best dev headline metric, mean over seeds) and, at that lr, the heads reports of adamw, ct-d, ct-f and
lora for one task and seed, and writes ``heads-<TASK>.png`` (the runs side by side) and
``heads-<TASK>.md`` (per run: total update norm, the attention heads' share of it, the rank correlation
of importance and update over the heads, and the heads that moved most).
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from childopt.analysis.layout import HeadLayout
from childopt.analysis.plots import plot_comparison, plot_heatmaps, plot_scatter, rank_correlation
from childopt.analysis.quantities import (FISHER, SHARE, UPDATE, HeadValues, child_share, fisher_importance,
                                          total_norm, update_norms)
from childopt.analysis.table import read_csv, write_csv
from childopt.arguments import write_output
from childopt.finetune import glue
from childopt.finetune.plan import MASK_METHODS, Run, format_lr, run_name
from childopt.finetune.summary import best_lr_groups, load_records

HEADS_DIR, CSV_NAME, HEATMAPS_NAME, SCATTER_NAME = "heads", "heads.csv", "heatmaps.png", "scatter.png"
COMPARED = ("adamw", "ct-d", "ct-f", "lora")  # full fine-tuning, Child-Tuning D and F, LoRA


@dataclass(frozen=True)
class BeforeTraining:
    """What a heads report needs from the model before it trains."""

    layout: HeadLayout
    base: dict  # name -> CPU copy of each layer parameter
    scores: dict  # the Fisher scores of the base model


def report_dir(run: Run) -> Path:
    """``<output>/heads/<run name>``."""
    return Path(run.output) / HEADS_DIR / run.name


def before_training(model: torch.nn.Module, scores: dict) -> BeforeTraining:
    """The layout of ``model``, a CPU copy of its layer weights, and its Fisher ``scores``."""
    layout = HeadLayout.from_model(model)
    names = set(layout.layer_parameters())
    base = {name: p.detach().to("cpu", copy=True) for name, p in model.named_parameters() if name in names}
    return BeforeTraining(layout, base, scores)


def trained_weights(model: torch.nn.Module) -> dict:
    """name -> the trained weights; a LoRA model is merged into its base first (the model is changed)."""
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    return dict(model.named_parameters())


def write_report(run: Run, before: BeforeTraining, model: torch.nn.Module, optimizer) -> Path:
    """Write the run's heads report (CSV, and the figures when matplotlib is there); return its directory.

    A report with values no CSV holds (NaN update norms of a diverged run) gets its figures and a note
    on stderr instead of its CSV, so the run and the rest of the grid still finish."""
    report = {FISHER: fisher_importance(before.layout, before.scores)}
    if run.method in MASK_METHODS:
        report[SHARE] = child_share(before.layout, optimizer)
    report[UPDATE] = update_norms(before.layout, before.base, trained_weights(model))
    directory = report_dir(run)
    directory.mkdir(parents=True, exist_ok=True)
    try:
        write_csv(report, directory / CSV_NAME)
    except ValueError as exc:  # NaN weights of a diverged run: the figures show them, no CSV holds them
        print(f"[{run.name}] no {CSV_NAME}: {exc}", file=sys.stderr)
    try:
        plot_heatmaps(report, directory / HEATMAPS_NAME, run.name)
        plot_scatter(report, directory / SCATTER_NAME, run.name)
    except ImportError as exc:
        print(f"[{run.name}] no heads figures: {exc}", file=sys.stderr)
    return directory


def _top_heads(values: HeadValues, count: int = 3) -> str:
    """The ``count`` largest heads as ``layer.head``, largest first."""
    order = values.heads.flatten().argsort(descending=True)[:count].tolist()
    heads = values.heads.shape[1]
    return ", ".join(f"{i // heads}.{i % heads}" for i in order)


def comparison_table(reports: dict, records: dict) -> str:
    """Markdown, one row per run: dev headline, total update norm, the heads' share of its square, Spearman
    of importance and update over the heads, and the top heads by update and by importance."""
    header = ["method", "lr", "dev", "update norm", "heads' share of update^2", "Spearman(Fisher, update)",
              "top heads by update", "top heads by Fisher"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for method, report in reports.items():
        record, update = records[method], report[UPDATE]
        headline = glue.TASKS[record["task"]].metrics[0]
        total = total_norm(update)
        heads_share = float(update.heads.square().sum()) / total**2 if total else float("nan")
        lines.append("| " + " | ".join([
            method, format_lr(record['config']['lr']), f"{headline} {record['dev'][headline]:.4f}", f"{total:.4g}",
            f"{heads_share:.3f}", f"{rank_correlation(report):.3f}", _top_heads(update), _top_heads(report[FISHER]),
        ]) + " |")
    return "\n".join(lines)


def compare(output: str, task: str, seed: int) -> str:
    """Draw adamw, ct-d, ct-f and lora of ``task`` and ``seed``, each at the lr the summary table picks,
    side by side from their heads reports into ``<output>/heads-<TASK>.png`` and tabulate them into
    ``heads-<TASK>.md``; return the table.

    Raises:
        FileNotFoundError: no run of the task and seed, or a run without its heads report.
    """
    groups = best_lr_groups([r for r in load_records(output, "to compare heads of") if r["task"] == task])
    reports, chosen = {}, {}
    for method in COMPARED:
        runs = groups.get((task, method), [])
        record = next((r for r in runs if r["seed"] == seed), None)
        if record is None:
            at = f" at its best lr (mean over seeds) {format_lr(runs[0]['config']['lr'])}" if runs else ""
            print(f"no {task} {method} run of seed {seed}{at} in {output}; compared without it", file=sys.stderr)
            continue
        name = run_name(task, method, record["config"]["lr"], seed)
        path = Path(output) / HEADS_DIR / name / CSV_NAME
        if not path.is_file():
            raise FileNotFoundError(f"{path}: run {name} has no heads report; delete {name}.json and rerun it with "
                                    "--report-heads")
        reports[method], chosen[method] = read_csv(path), record
    if not reports:
        raise FileNotFoundError(f"--output {output}: no run of {task}, seed {seed}, with a method of "
                                f"{', '.join(COMPARED)}")
    shapes = {method: tuple(report[FISHER].heads.shape) for method, report in reports.items()}
    if len(set(shapes.values())) > 1:
        raise ValueError(f"the heads reports of {task}, seed {seed}, are of different layer x head grids "
                         f"({shapes}): a report is incomplete or from another model")
    figure = Path(output) / f"heads-{task}.png"
    plot_comparison({f"{m} (lr {format_lr(chosen[m]['config']['lr'])})": r for m, r in reports.items()}, figure,
                    f"{task}, seed {seed}: where each method moves the weights")
    table = comparison_table(reports, chosen)
    write_output(figure.with_suffix(".md"), table + "\n")
    print(f"{table}\nwrote {figure} and {figure.with_suffix('.md')}")
    return table
