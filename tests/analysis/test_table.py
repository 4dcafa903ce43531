"""The heads CSV: one row per (layer, head, quantity), read back exactly; malformed files named by line."""
import re
import pytest
import torch

from childopt.analysis.quantities import FISHER, SHARE, UPDATE, HeadValues
from childopt.analysis import table
from childopt.analysis.table import read_csv, write_csv


def _report() -> dict:
    return {FISHER: HeadValues(torch.tensor([[1.0, 2.0], [3.0, 0.1 + 0.2]], dtype=torch.float64),
                               torch.tensor([10.0, 20.0], dtype=torch.float64)),
            UPDATE: HeadValues(torch.tensor([[0.0, 1e-300], [5.5, 6.25]], dtype=torch.float64),
                               torch.tensor([0.5, 7.0], dtype=torch.float64))}


def test_one_row_per_layer_head_and_quantity_read_back_exactly(tmp_path):
    path = tmp_path / "heads.csv"
    write_csv(_report(), path)
    lines = path.read_text().splitlines()
    assert lines[:4] == ["layer,head,quantity,value", "0,0,fisher,1.0", "0,1,fisher,2.0", "0,other,fisher,10.0"]
    assert lines[6] == "1,other,fisher,20.0" and len(lines) == 1 + 2 * 2 * 3
    back = read_csv(path)
    assert list(back) == [FISHER, UPDATE]
    for quantity, values in _report().items():
        assert torch.equal(back[quantity].heads, values.heads) and torch.equal(back[quantity].other, values.other)


def test_malformed_files_are_named_with_the_line(tmp_path):
    path = tmp_path / "heads.csv"
    path.write_text("layer,head,value\n")
    with pytest.raises(ValueError, match=rf"{path}:1: expected the header layer,head,quantity,value"):
        read_csv(path)
    path.write_text("layer,head,quantity,value\n0,0,fisher,1.0\n0,x,fisher,2.0\n")
    with pytest.raises(ValueError, match=rf"{path}:3: expected layer,head,quantity,value"):
        read_csv(path)
    path.write_text("layer,head,quantity,value\n0,0,fisher,1.0\n0,1,fisher,2.0\n")
    with pytest.raises(ValueError, match=r"fisher: no value for \(layer, head\) \(0, 'other'\) of a 1 x 2 grid"):
        read_csv(path)


def test_a_duplicated_row_is_refused_naming_both_lines(tmp_path):
    """0,0,fisher twice (even with one value) is a botched file, not 'the last one wins'."""
    start = "layer,head,quantity,value\n0,0,fisher,1\n"
    tail = "0,other,fisher,1\n0,0,update_norm,1\n0,other,update_norm,1\n"
    for second in ("2", "1"):
        path = _write(tmp_path / f"dup{second}.csv", f"{start}0,0,fisher,{second}\n{tail}")
        with pytest.raises(ValueError, match=rf"{re.escape(str(path))}:3: a second fisher row for \(layer, head\) "
                                             r"\(0, 0\) \(the first is line 2\)"):
            read_csv(path)
    path = _write(tmp_path / "dup-other.csv", f"{start}{tail}0,other,update_norm,3\n")
    with pytest.raises(ValueError, match=r":6: a second update_norm row for \(layer, head\) \(0, 'other'\) "
                                         r"\(the first is line 5\)"):
        read_csv(path)


def test_quantities_on_different_grids_are_refused_naming_both(tmp_path):
    """Fisher on 2 layers x 2 heads, update norms on 1 x 2 (or 2 x 1): one report describes one model."""
    fisher = "".join(f"{layer},{head},fisher,1\n" for layer in (0, 1) for head in (0, 1, "other"))
    for layers, heads, grid in (((0,), (0, 1), "1 x 2"), ((0, 1), (0,), "2 x 1")):
        update = "".join(f"{layer},{head},update_norm,1\n" for layer in layers for head in (*heads, "other"))
        path = _write(tmp_path / f"{grid}.csv", "layer,head,quantity,value\n" + fisher + update)
        with pytest.raises(ValueError, match=rf"{re.escape(str(path))}: fisher has a 2 x 2 \(layer x head\) grid "
                                             rf"but update_norm a {grid} one"):
            read_csv(path)


def test_damaged_reports_are_refused_naming_the_file(tmp_path):
    """A cut last row, a NaN or negative value, or a missing quantity: a ValueError, not a figure."""
    from childopt.analysis.table import read_csv

    good = ("layer,head,quantity,value\n0,0,fisher,1.0\n0,other,fisher,2.0\n"
            "0,0,update_norm,0.5\n0,other,update_norm,0.25\n")
    cases = {"cut": (good[:-3], "truncated"), "nan": (good.replace("0.5", "nan"), "finite"),
             "negative": (good.replace("0.5", "-0.5"), "finite"),
             "no-update": ("\n".join(good.splitlines()[:3]) + "\n", "no update_norm")}
    assert read_csv(_write(tmp_path / "good.csv", good))["update_norm"].heads.tolist() == [[0.5]]
    for name, (text, message) in cases.items():
        with pytest.raises(ValueError, match=message):
            read_csv(_write(tmp_path / f"{name}.csv", text))


def _write(path, text):
    path.write_text(text)
    return path


def test_a_write_that_fails_part_way_leaves_the_earlier_file_whole(tmp_path, monkeypatch):
    path = tmp_path / "heads.csv"
    write_csv(_report(), path)
    before = path.read_bytes()

    class CutShort:  # writes the header and one row, then the disk is full
        def __init__(self, file):
            self.file, self.rows = file, 0

        def writerow(self, row):
            if self.rows == 2:
                raise OSError("no space left on device")
            self.file.write(",".join(map(str, row)) + "\n")
            self.rows += 1

        def writerows(self, rows):
            for row in rows:
                self.writerow(row)

    monkeypatch.setattr(table.csv, "writer", CutShort)
    with pytest.raises(OSError, match="no space"):
        write_csv(_report(), path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["heads.csv"]  # no temporary left beside it


def _changed(quantity: str, layer: int, head, value: float) -> dict:
    """_report() with one value changed (a new quantity: a copy of the Fisher grid)."""
    report = dict(_report())
    values = report.get(quantity, report[FISHER])
    heads, other = values.heads.clone(), values.other.clone()
    if head == "other":
        other[layer] = value
    else:
        heads[layer, head] = value
    report[quantity] = HeadValues(heads, other)
    return report


@pytest.mark.parametrize("report, message", [
    (_changed(UPDATE, 1, 0, float("nan")), r"update_norm of \(layer, head\) \(1, 0\): nan is not a finite value"),
    (_changed(FISHER, 0, "other", -1.0), r"fisher of \(layer, head\) \(0, 'other'\): -1\.0 is not a finite value"),
    (_changed(SHARE, 0, 1, 1.5), r"share of \(layer, head\) \(0, 1\): 1\.5 is a share above 1"),
    ({FISHER: _report()[FISHER]}, "no update_norm"),
    ({**_report(), UPDATE: HeadValues(torch.ones(1, 2, dtype=torch.float64), torch.ones(1, dtype=torch.float64))},
     r"fisher has a 2 x 2 \(layer x head\) grid but update_norm a 1 x 2 one"),
    ({q: HeadValues(torch.ones(0, 2), torch.ones(0)) for q in (FISHER, UPDATE)}, "an empty 0 x 2"),
])
def test_write_csv_refuses_what_read_csv_would_refuse_before_writing(tmp_path, report, message):
    """A written report always reads back: a diverged run's NaN fails when written, not when compared."""
    path = tmp_path / "heads.csv"
    with pytest.raises(ValueError, match=rf"{re.escape(str(path))}: .*{message}"):
        write_csv(report, path)
    assert list(tmp_path.iterdir()) == []


def test_negative_indices_and_shares_above_one_are_refused_naming_the_line(tmp_path):
    good = "layer,head,quantity,value\n0,0,fisher,1\n0,other,fisher,1\n0,0,update_norm,1\n0,other,update_norm,1\n"
    for row, message in (("-1,0,fisher,99", "a negative index"), ("0,-3,update_norm,42", "a negative index"),
                         ("0,0,share,7.5", "7.5 is a share above 1")):
        path = _write(tmp_path / "heads.csv", good + row + "\n")
        with pytest.raises(ValueError, match=rf"{re.escape(str(path))}:6: .*\({message}\)"):
            read_csv(path)
    shares = good + "0,0,share,1.0\n0,other,share,0.0\n"
    assert read_csv(_write(tmp_path / "heads.csv", shares))[SHARE].heads.tolist() == [[1.0]]
