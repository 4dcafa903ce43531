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
from collections.abc import Mapping
from pathlib import Path
from typing import Union

import torch

from childopt.analysis.layout import OTHER
from childopt.analysis.quantities import FISHER, UPDATE, HeadValues
from childopt.arguments import replacing

COLUMNS = ("layer", "head", "quantity", "value")
Report = Mapping[str, HeadValues]  # quantity name -> values
REQUIRED = (FISHER, UPDATE)  # every run's report has these; the share only runs with a fixed mask


def write_csv(report: Report, path: Union[str, os.PathLike]) -> None:
    """Write ``report`` (quantity -> HeadValues) to ``path``, quantities in the order given."""
    with replacing(path) as temporary, open(temporary, "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(COLUMNS)
        for quantity, values in report.items():
            for layer in range(values.heads.shape[0]):
                for head, value in enumerate(values.heads[layer].tolist()):
                    writer.writerow((layer, head, quantity, repr(value)))
                writer.writerow((layer, OTHER, quantity, repr(float(values.other[layer]))))


def read_csv(path: Union[str, os.PathLike]) -> dict[str, HeadValues]:
    """The report a :func:`write_csv` file holds.

    Raises:
        ValueError: another header, a malformed row, a second row for one (layer, head, quantity), a
            value that is negative or not finite, a file cut short (write_csv ends every row with a
            newline), Fisher or update norms missing, a quantity whose (layer, head) grid is incomplete,
            or quantities on grids of different sizes (one report describes one model); the message
            names the file, and the line where there is one.
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
                number = float(value)
                if not math.isfinite(number) or number < 0:
                    raise ValueError(f"{number} is not a finite value >= 0")
            except ValueError as exc:
                raise ValueError(f"{path}:{line}: expected layer,head,quantity,value with an integer layer, "
                                 f"an integer head or {OTHER!r} and a number, got {row} ({exc})") from exc
            if (quantity, key) in first_line:  # a silent "last row wins" would hide a botched merge
                raise ValueError(f"{path}:{line}: a second {quantity} row for (layer, head) {key} (the first is "
                                 f"line {first_line[(quantity, key)]}), got {row}")
            first_line[(quantity, key)] = line
            cells.setdefault(quantity, {})[key] = number
    report = {quantity: _grid(values, f"{path}: {quantity}") for quantity, values in cells.items()}
    grids = [(quantity, tuple(values.heads.shape)) for quantity, values in report.items()]
    for quantity, grid in grids[1:]:
        if grid != grids[0][1]:  # one model's report: rank_correlation and the scatter plot pair them cell by cell
            raise ValueError(f"{path}: {grids[0][0]} has a {' x '.join(map(str, grids[0][1]))} (layer x head) grid "
                             f"but {quantity} a {' x '.join(map(str, grid))} one; a report's quantities describe "
                             "one model")
    missing = [q for q in REQUIRED if q not in report]
    if missing:
        raise ValueError(f"{path}: no {', '.join(missing)} rows (a heads report has {', '.join(REQUIRED)})")
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
