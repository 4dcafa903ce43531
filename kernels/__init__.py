"""Triton kernels of childopt, installed as ``childopt.kernels``.

This folder sits at the top level of the repository; ``pyproject.toml`` maps it onto the package
name ``childopt.kernels`` (``package-dir``), so it imports under that name once childopt is
installed (``pip install -e .`` included), not from a bare source tree (docs/design.md, "Layers").

Pure ``@triton.jit`` functions and their launchers.  Nothing here queries a device at import
time; under ``TRITON_INTERPRET=1`` (set before import) the same kernels run on CPU tensors.
"""
