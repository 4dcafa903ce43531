"""argparse types shared by the command lines of childopt."""
from __future__ import annotations

import argparse
import math


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
