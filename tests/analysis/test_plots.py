"""The figures: PNGs from a report and from several runs side by side (a run without a fixed mask
leaves its share panel blank), and the rank correlation their titles name."""
from pathlib import Path

import pytest
import torch
from matplotlib.figure import Figure

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
