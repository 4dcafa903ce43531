"""A heads report as CSV: one row per (layer, head, quantity), and back.

The CSV is the report's record (the figures are drawn from it), so a comparison of several runs
can be drawn later from their CSVs alone.  Columns ``layer,head,quantity,value``: ``head`` is the
head's index, or ``other`` for the layer's parameters outside the heads; values are written with
``repr`` so they read back exactly.
"""
from __future__ import annotations

import csv
import io
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Optional, Union

import torch

from childopt.analysis.layout import OTHER
from childopt.analysis.quantities import FISHER, SHARE, UPDATE, HeadValues
from childopt.arguments import replacing

COLUMNS = ("layer", "head", "quantity", "value")
Report = Mapping[str, HeadValues]  # quantity name -> values
REQUIRED = (FISHER, UPDATE)  # every run's report has these; the share only runs with a fixed mask


def write_csv(report: Report, path: Union[str, os.PathLike]) -> None:
    """Write ``report`` (quantity -> HeadValues) to ``path``, quantities in the order given.

    Raises:
        ValueError: before anything is written, a report :func:`read_csv` would refuse (:func:`check_report`,
            a value that is negative or not finite, a share above 1); the message names ``path``.
    """
    check_report(report, str(path))
    rows = []
    for quantity, values in report.items():
        for layer, numbers in enumerate(torch.cat([values.heads, values.other.unsqueeze(1)], 1).tolist()):
            for head, number in zip((*range(len(numbers) - 1), OTHER), numbers):
                if why := _bad_value(quantity, number):
                    raise ValueError(f"{path}: {quantity} of (layer, head) {(layer, head)}: {why} (a heads report "
                                     "could not be read back)")
                rows.append((layer, head, quantity, repr(number)))
    with replacing(path) as temporary, open(temporary, "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(COLUMNS)
        writer.writerows(rows)


def check_report(report: Report, what: str, required: Sequence[str] = REQUIRED) -> None:
    """Raise a ValueError naming ``what`` unless ``report`` has the ``required`` quantities and all its
    quantities are on one non-empty (layer, head) grid (one report describes one model)."""
    grids = [(quantity, tuple(values.heads.shape)) for quantity, values in report.items()]
    for quantity, grid in grids:
        if grid != grids[0][1]:  # rank_correlation and the scatter plot pair them cell by cell
            raise ValueError(f"{what}: {grids[0][0]} has a {' x '.join(map(str, grids[0][1]))} (layer x head) grid "
                             f"but {quantity} a {' x '.join(map(str, grid))} one; a report's quantities describe "
                             "one model")
        if 0 in grid:
            raise ValueError(f"{what}: {quantity} has an empty {' x '.join(map(str, grid))} (layer x head) grid")
    missing = [q for q in required if q not in report]
    if missing:
        raise ValueError(f"{what}: no {', '.join(missing)} (a heads report has {', '.join(REQUIRED)})")


def _bad_value(quantity: str, number: float) -> Optional[str]:
    """Why ``number`` cannot be a value of ``quantity``, or None."""
    if not math.isfinite(number) or number < 0:
        return f"{number} is not a finite value >= 0"
    if quantity == SHARE and number > 1:
        return f"{number} is a share above 1"
    return None


def read_csv(path: Union[str, os.PathLike]) -> dict[str, HeadValues]:
    """The report a :func:`write_csv` file holds.

    Raises:
        ValueError: another header, a malformed row (a negative index too), a second row for one (layer,
            head, quantity), a value that is negative or not finite, a share above 1, a file cut short
            (write_csv ends every row with a newline), Fisher or update norms missing, a quantity whose
            (layer, head) grid is incomplete, or quantities on grids of different sizes (one report
            describes one model); the message names the file, and the line where there is one.
    """
    path = Path(path)
    cells: dict[str, dict] = {}
    first_line: dict[tuple, int] = {}  # (quantity, (layer, head)) -> the line that gave it
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not a heads report (not UTF-8 text: {exc})") from exc
    if text and not text.endswith("\n"):
        raise ValueError(f"{path}: the last row is cut short (no final newline): the file is truncated")
    with io.StringIO(text, newline="") as file:
        rows = csv.reader(file)
        header = next(rows, None)
        if header is None or tuple(header) != COLUMNS:
            raise ValueError(f"{path}:1: expected the header {','.join(COLUMNS)}, got {header}")
        for line, row in enumerate(rows, start=2):
            try:
                layer, head, quantity, value = row
                key = (int(layer), head if head == OTHER else int(head))
                if key[0] < 0 or (key[1] != OTHER and key[1] < 0):
                    raise ValueError("a negative index")
                number = float(value)
                if why := _bad_value(quantity, number):
                    raise ValueError(why)
            except ValueError as exc:
                raise ValueError(f"{path}:{line}: expected layer,head,quantity,value with an integer layer >= 0, "
                                 f"an integer head >= 0 or {OTHER!r} and a number, got {row} ({exc})") from exc
            if (quantity, key) in first_line:  # a silent "last row wins" would hide a botched merge
                raise ValueError(f"{path}:{line}: a second {quantity} row for (layer, head) {key} (the first is "
                                 f"line {first_line[(quantity, key)]}), got {row}")
            first_line[(quantity, key)] = line
            cells.setdefault(quantity, {})[key] = number
    report = {quantity: _grid(values, f"{path}: {quantity}") for quantity, values in cells.items()}
    check_report(report, str(path))
    return report


def _grid(values: dict, what: str) -> HeadValues:
    """HeadValues from {(layer, head or 'other'): value}, or a ValueError when a cell is missing."""
    layers = 1 + max(layer for layer, _ in values)
    heads = 1 + max((head for _, head in values if head != OTHER), default=-1)
    missing = [(layer, head) for layer in range(layers) for head in (*range(heads), OTHER)
               if (layer, head) not in values]
    if missing:
        raise ValueError(f"{what}: no value for (layer, head) {missing[0]} of a {layers} x {heads} grid")
    return HeadValues(torch.tensor([[values[(layer, head)] for head in range(heads)] for layer in range(layers)],
                                   dtype=torch.float64),
                      torch.tensor([values[(layer, OTHER)] for layer in range(layers)], dtype=torch.float64))
