"""A heads report as CSV: one row per (layer, head, quantity), and back.

The CSV is the report's record (the figures are drawn from it), so a comparison of several runs
can be drawn later from their CSVs alone.  Columns ``layer,head,quantity,value``: ``head`` is the
head's index, or ``other`` for the layer's parameters outside the heads; values are written with
``repr`` so they read back exactly.
"""
from __future__ import annotations

import csv
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Union

import torch

from childopt.analysis.layout import OTHER
from childopt.analysis.quantities import HeadValues

COLUMNS = ("layer", "head", "quantity", "value")
Report = Mapping[str, HeadValues]  # quantity name -> values


def write_csv(report: Report, path: Union[str, os.PathLike]) -> None:
    """Write ``report`` (quantity -> HeadValues) to ``path``, quantities in the order given."""
    with open(path, "w", newline="") as file:
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
        ValueError: another header, a malformed row, or a quantity whose (layer, head) grid is
            incomplete; the message names the file and line.
    """
    path = Path(path)
    cells: dict[str, dict] = {}
    with open(path, newline="") as file:
        rows = csv.reader(file)
        header = next(rows, None)
        if header is None or tuple(header) != COLUMNS:
            raise ValueError(f"{path}:1: expected the header {','.join(COLUMNS)}, got {header}")
        for line, row in enumerate(rows, start=2):
            try:
                layer, head, quantity, value = row
                key = (int(layer), head if head == OTHER else int(head))
                cells.setdefault(quantity, {})[key] = float(value)
            except ValueError as exc:
                raise ValueError(f"{path}:{line}: expected layer,head,quantity,value with an integer layer, "
                                 f"an integer head or {OTHER!r} and a number, got {row} ({exc})") from exc
    return {quantity: _grid(values, f"{path}: {quantity}") for quantity, values in cells.items()}


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
