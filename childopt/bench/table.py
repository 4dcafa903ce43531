"""Aligned text tables, the form in which every benchmark row and goal is printed."""
from __future__ import annotations

from typing import Collection


def aligned_table(columns, rows, numeric: Collection[int]) -> str:
    """``rows`` as a text table of ``columns`` (header, cell function) pairs; the columns whose
    index is in ``numeric`` are right-aligned, the others left-aligned."""
    cells = [[header for header, _ in columns]] + [[cell(r) for _, cell in columns] for r in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    lines = []
    for line in cells:
        padded = [c.rjust(w) if i in numeric else c.ljust(w) for i, (c, w) in enumerate(zip(line, widths))]
        lines.append("  ".join(padded).rstrip())
    lines.insert(1, "  ".join("-" * w for w in widths).rstrip())
    return "\n".join(lines)
