"""The figures: PNGs from a report and from several runs side by side (a run without a fixed mask
leaves its share panel blank), and the rank correlation their titles name."""
import re
from pathlib import Path

import pytest
import torch
from matplotlib.figure import Figure

from childopt.analysis import plots
from childopt.analysis.plots import plot_comparison, plot_heatmaps, plot_scatter, rank_correlation
from childopt.analysis.quantities import FISHER, SHARE, UPDATE, HeadValues

PNG = b"\x89PNG\r\n\x1a\n"


def _values(heads, other) -> HeadValues:
    return HeadValues(torch.tensor(heads, dtype=torch.float64), torch.tensor(other, dtype=torch.float64))


def _report(with_share: bool) -> dict:
    report = {FISHER: _values([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], [7.0, 8.0]),
              UPDATE: _values([[0.6, 0.5, 0.4], [0.3, 0.2, 0.1]], [1.0, 0.0])}
    if with_share:
        report[SHARE] = _values([[0.0, 1.0, 0.5], [0.25, 0.0, 1.0]], [0.3, 0.3])
    return report


def test_the_rank_correlation_is_spearmans_over_the_heads():
    assert rank_correlation(_report(False)) == pytest.approx(-1.0)
    report = _report(False)
    report[UPDATE] = _values([[1.0, 3.0, 2.0], [4.0, 5.0, 6.0]], [0.0, 0.0])
    assert rank_correlation(report) == pytest.approx(1 - 6 * 2 / (6 * 35))  # one swapped pair: 1 - 6 sum d^2 / n(n^2-1)


def test_each_figure_is_written_as_a_png(tmp_path):
    plot_heatmaps(_report(True), tmp_path / "heatmaps.png", "run")
    plot_scatter(_report(True), tmp_path / "scatter.png", "run")
    plot_comparison({"adamw": _report(False), "ct-d": _report(True)}, tmp_path / "compare.png", "RTE")
    for name in ("heatmaps.png", "scatter.png", "compare.png"):
        assert (tmp_path / name).read_bytes()[:8] == PNG

def test_a_save_that_fails_part_way_leaves_the_earlier_figure_whole(tmp_path, monkeypatch):
    path = tmp_path / "heatmaps.png"
    plot_heatmaps(_report(True), path, "run")
    before = path.read_bytes()

    def cut_short(fig, target, **kwargs):
        Path(target).write_bytes(PNG)  # a few bytes, then the save fails (a full disk, an interrupt)
        raise OSError("no space left on device")

    monkeypatch.setattr(Figure, "savefig", cut_short)
    with pytest.raises(OSError, match="no space"):
        plot_heatmaps(_report(False), path, "run")
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["heatmaps.png"]  # no temporary left beside it


@pytest.mark.parametrize("name", ["heatmaps", "plots", "plots/", "heatmaps.csv"])
def test_a_path_without_a_figure_suffix_or_naming_a_folder_is_refused_before_drawing(tmp_path, monkeypatch, name):
    """matplotlib would add .png to a bare name (leaving an empty file under it), or write plots.png beside plots/."""
    (tmp_path / "plots").mkdir()
    monkeypatch.setattr(plots, "_figure", lambda **kwargs: pytest.fail("drew a figure for a path it cannot write"))
    path = f"{tmp_path}/{name}"
    for draw in (lambda: plot_heatmaps(_report(True), path, "run"), lambda: plot_scatter(_report(True), path, "run"),
                 lambda: plot_comparison({"adamw": _report(False)}, path, "RTE")):
        with pytest.raises(ValueError, match=rf"'{re.escape(path)}' (is a folder|does not end in a format matplotlib "
                                             r"writes \(.*\.png)"):
            draw()
    assert [p.name for p in tmp_path.iterdir()] == ["plots"] and not any((tmp_path / "plots").iterdir())


def test_reports_the_figures_cannot_show_are_refused_naming_the_run(tmp_path):
    path = tmp_path / "figure.png"
    without_fisher = {UPDATE: _report(False)[UPDATE]}
    other_grid = {**_report(False), UPDATE: _values([[0.5, 0.5]], [0.0])}
    for draw, message in (
            (lambda: plot_heatmaps({}, path, "run"), "run: the report has none of fisher, share, update_norm"),
            (lambda: plot_heatmaps({"loss": _report(False)[FISHER]}, path, "run"), "run: the report has none of"),
            (lambda: plot_comparison({}, path, "RTE"), "RTE: no run to draw"),
            (lambda: plot_comparison({"adamw": _report(False), "ct-f": without_fisher}, path, "RTE"),
             "ct-f: no fisher"),
            (lambda: plot_scatter(without_fisher, path, "run"), "run: no fisher"),
            (lambda: plot_scatter(other_grid, path, "run"), r"run: fisher has a 2 x 3 \(layer x head\) grid but "
                                                            r"update_norm a 1 x 2 one")):
        with pytest.raises(ValueError, match=message):
            draw()
    assert not path.exists()
