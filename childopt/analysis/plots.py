"""Figures of heads reports: layer x head heatmaps, importance-vs-update scatter plots, and several runs
side by side.

Drawn with matplotlib's object API (``Figure``, no pyplot), so no display or global backend state is
needed: ``savefig`` renders PNGs with Agg.  Heatmaps put layers on the y axis and heads on the x axis,
with each layer's ``other`` value (its parameters outside the heads) written at the right edge; the
scatter plot has one point per head, Fisher importance against update norm, coloured by layer, and
names Spearman's rank correlation of the two in its title.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Union

import torch

from childopt.analysis.quantities import FISHER, QUANTITIES, SHARE, UPDATE, HeadValues, total_norm
from childopt.analysis.table import Report, check_report
from childopt.arguments import output_path, save_figure, why_not_a_figure
from childopt.finetune.glue import spearman

PathLike = Union[str, os.PathLike]


def _figure_class():
    try:
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise ImportError("the heads figures need matplotlib: pip install 'childopt[plot]'") from exc
    return Figure


def _figure(**kwargs):
    return _figure_class()(layout="constrained", **kwargs)


def _check_path(path: PathLike) -> None:
    """Raise a ValueError naming ``path`` unless it names a file (not a folder) whose suffix is a format
    matplotlib writes by itself (the formats the command lines' ``--plot`` takes)."""
    _figure_class()  # the install hint when matplotlib is missing
    if str(path).endswith(("/", os.sep)) or output_path(path).is_dir():
        raise ValueError(f"{str(path)!r} is a folder; give the path of a figure file in it, such as heatmaps.png")
    why = why_not_a_figure(Path(path))
    if why:
        raise ValueError(why)


def rank_correlation(report: Report) -> float:
    """Spearman's rank correlation of Fisher importance and update norm over the heads (NaN if constant)."""
    return spearman(report[FISHER].heads.flatten(), report[UPDATE].heads.flatten())


def _norm(quantity: str, values: HeadValues):
    """Colour scale: shares on [0, 1], Fisher importance logarithmic (it spans decades), else linear."""
    from matplotlib.colors import LogNorm, Normalize

    if quantity == SHARE:
        return Normalize(0.0, 1.0)
    heads = values.heads
    if quantity == FISHER and bool((heads > 0).all()):
        return LogNorm(float(heads.min()), float(heads.max()))
    return Normalize(float(heads.min()), float(heads.max()))


def heatmap(fig, ax, quantity: str, values: HeadValues, title: str) -> None:
    """``values.heads`` as a layer x head image with a colour bar, the per-layer ``other`` values at its right."""
    layers, heads = values.heads.shape
    image = ax.imshow(values.heads.numpy(), cmap="viridis", norm=_norm(quantity, values), aspect="auto",
                      origin="lower")
    fig.colorbar(image, ax=ax, shrink=0.85)
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_xticks(range(heads))
    ax.set_yticks(range(layers))
    ax.tick_params(labelsize=7)
    ax.text(heads - 0.5, layers - 0.5, " other", fontsize=7, va="bottom")
    for layer, value in enumerate(values.other.tolist()):
        ax.text(heads - 0.5, layer, f" {value:.3g}", fontsize=7, va="center")


def scatter(fig, ax, report: Report, title: str) -> None:
    """One point per head: Fisher importance (x) against update norm (y), coloured by layer."""
    fisher, update = report[FISHER].heads, report[UPDATE].heads
    layers = torch.arange(fisher.shape[0]).unsqueeze(1).expand_as(fisher)
    points = ax.scatter(fisher.flatten().numpy(), update.flatten().numpy(), c=layers.flatten().numpy(),
                        cmap="viridis", s=14)
    fig.colorbar(points, ax=ax, shrink=0.85, label="layer")
    if bool((fisher > 0).all()):
        ax.set_xscale("log")
    if bool((update > 0).all()):
        ax.set_yscale("log")
    ax.set_xlabel(QUANTITIES[FISHER], fontsize=8)
    ax.set_ylabel(QUANTITIES[UPDATE], fontsize=8)
    ax.set_title(f"{title}\nSpearman rho {rank_correlation(report):.2f}", fontsize=9)


def layer_bars(ax, values: HeadValues, title: str) -> None:
    """Per layer, the update norm of the attention heads together (L2 over them) beside the other parameters'."""
    layers = torch.arange(values.heads.shape[0], dtype=torch.float64)
    attention = values.heads.square().sum(1).sqrt()
    ax.bar((layers - 0.2).numpy(), attention.numpy(), width=0.4, label="attention heads")
    ax.bar((layers + 0.2).numpy(), values.other.numpy(), width=0.4, label="other (FFN, LayerNorm)")
    ax.set_xticks(layers.tolist())
    ax.set_xlabel("layer")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)


def plot_heatmaps(report: Report, path: PathLike, title: str) -> None:
    """One layer x head heatmap per quantity of ``report``, side by side, into ``path``.

    Raises:
        ValueError: ``path`` is a folder or has no suffix matplotlib writes, or ``report`` holds none of
            :data:`QUANTITIES` or quantities on grids of different sizes; the message names ``title``.
    """
    _check_path(path)
    check_report(report, title, required=())
    quantities = [q for q in QUANTITIES if q in report]
    if not quantities:
        raise ValueError(f"{title}: the report has none of {', '.join(QUANTITIES)}")
    fig = _figure(figsize=(4.6 * len(quantities), 3.6))
    fig.suptitle(title, fontsize=10)
    for ax, quantity in zip(fig.subplots(1, len(quantities), squeeze=False)[0], quantities):
        heatmap(fig, ax, quantity, report[quantity], QUANTITIES[quantity])
    save_figure(fig, path, dpi=110)


def plot_scatter(report: Report, path: PathLike, title: str) -> None:
    """Fisher importance against update norm, one point per head, into ``path``.

    Raises:
        ValueError: ``path`` is a folder or has no suffix matplotlib writes, or ``report`` lacks Fisher or
            update norms or has them on grids of different sizes; the message names ``title``.
    """
    _check_path(path)
    check_report(report, title)
    fig = _figure(figsize=(5.2, 4.2))
    scatter(fig, fig.subplots(), report, title)
    save_figure(fig, path, dpi=110)


def plot_comparison(reports: Mapping[str, Report], path: PathLike, title: str) -> None:
    """Runs side by side (a column each): Fisher, child-network share and update-norm heatmaps, the
    importance-vs-update scatter and the per-layer update norms, into ``path``.

    A run without a quantity (the share of a run without a fixed mask) leaves its panel blank with a note.

    Raises:
        ValueError: ``path`` is a folder or has no suffix matplotlib writes, no run is given, or a run's
            report lacks Fisher or update norms or has them on grids of different sizes (the message
            names the run).
    """
    _check_path(path)
    if not reports:
        raise ValueError(f"{title}: no run to draw")
    for label, report in reports.items():
        check_report(report, label)
    rows = ("fisher", "share", "update", "scatter", "layers")
    fig = _figure(figsize=(4.4 * len(reports), 3.3 * len(rows)))
    fig.suptitle(title, fontsize=11)
    axes = fig.subplots(len(rows), len(reports), squeeze=False)
    for column, (label, report) in enumerate(reports.items()):
        panels = dict(zip(rows, axes[:, column]))
        for row, quantity in (("fisher", FISHER), ("share", SHARE), ("update", UPDATE)):
            ax = panels[row]
            if quantity in report:
                suffix = f" (total {total_norm(report[quantity]):.3g})" if quantity == UPDATE else ""
                heatmap(fig, ax, quantity, report[quantity], f"{label}: {QUANTITIES[quantity]}{suffix}")
            else:
                ax.set_axis_off()
                ax.text(0.5, 0.5, f"{label}: no fixed mask", ha="center", va="center", transform=ax.transAxes)
        scatter(fig, panels["scatter"], report, label)
        layer_bars(panels["layers"], report[UPDATE], f"{label}: update norm per layer")
    save_figure(fig, path, dpi=100)
