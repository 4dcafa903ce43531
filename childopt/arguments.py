"""argparse types and checks shared by the command lines of childopt."""
from __future__ import annotations

import argparse
import math
import os
from pathlib import Path
from typing import Optional


def number(kind, low: float, *, low_open: bool = True, high: float = math.inf):
    """An argparse type: ``kind`` in (low, high] (or [low, high]), with a message naming the range."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, got {text!r}")
        if not ((value > low) if low_open else (value >= low)) or value > high or math.isnan(value):
            interval = f"{'(' if low_open else '['}{low}, {high}]"
            raise argparse.ArgumentTypeError(f"expected a value in {interval}, got {text}")
        return value
    return parse


def _folder_can_take(path: Path) -> bool:
    """Whether ``path``'s folder exists and takes new files, or can be made (its nearest existing
    ancestor is a folder that takes new entries)."""
    folder = path.parent.absolute()
    while not folder.exists():
        folder = folder.parent
    return folder.is_dir() and os.access(folder, os.W_OK | os.X_OK)


def check_output_files(parser: argparse.ArgumentParser, outputs: dict[str, Optional[str]], plots=()) -> None:
    """Refuse, before anything runs, output paths a command could only fail to write at its end
    (after minutes of measuring): a folder given as the file, a read-only file, a folder that
    cannot be made, two options naming one file; for the options in ``plots``, a missing matplotlib
    or a suffix that is not a format it writes.  ``outputs``: option -> path given (None: not given)."""
    given = {option: Path(value) for option, value in outputs.items() if value}
    seen: dict = {}
    for option, path in given.items():
        if path.is_dir():
            parser.error(f"{option}: {str(path)!r} is a folder; give the path of a file in it")
        if path.exists() and not os.access(path, os.W_OK):
            parser.error(f"{option}: cannot write {str(path)!r}: the file is read-only")
        if not _folder_can_take(path):
            parser.error(f"{option}: cannot write {str(path)!r}: its folder cannot be made or written")
        other = seen.setdefault(path.resolve(), option)
        if other != option:
            parser.error(f"{option}: {str(path)!r} is also the file of {other}; give each output its own path")
    for option in (option for option in plots if option in given):
        try:
            from matplotlib.figure import Figure
        except ImportError:
            parser.error(f"{option} needs matplotlib: pip install matplotlib")
        formats = Figure().canvas.get_supported_filetypes()
        if given[option].suffix.lstrip(".").lower() not in formats:
            parser.error(f"{option}: {str(given[option])!r} does not end in a format matplotlib writes "
                         f"({', '.join('.' + f for f in sorted(formats))})")


def writable_path(path: str) -> Path:
    """``path`` with its folder made if missing, for an output :func:`check_output_files` passed."""
    made = Path(path)
    made.parent.mkdir(parents=True, exist_ok=True)
    return made
