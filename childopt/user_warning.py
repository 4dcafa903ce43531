"""Warnings that name the user's line: the first frame outside childopt and torch, however deep
the warning is raised.

A fixed ``stacklevel`` is right for one call path only (``MaskedAdamW(...)`` reaches ``set_mask``
two frames deeper than ``opt.set_mask(...)`` does, and an LR scheduler wraps ``opt.step`` in one
more frame of torch's); Python 3.12's ``skip_file_prefixes`` does this, but childopt supports
Python 3.9 on.
"""
from __future__ import annotations

import os
import sys
import warnings

import torch

_SKIPPED = tuple(os.path.dirname(os.path.abspath(path)) + os.sep for path in (__file__, torch.__file__))


def warn(message: str, category: type = UserWarning) -> None:
    """``warnings.warn(message, category)`` attributed to the nearest caller outside childopt and torch."""
    frame, level = sys._getframe(1), 1  # the frame that calls warn is stacklevel 1
    while frame is not None and frame.f_code.co_filename.startswith(_SKIPPED):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level + 1)  # + 1: warnings.warn is called from here
