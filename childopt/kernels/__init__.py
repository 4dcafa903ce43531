"""Triton kernels of childopt (``childopt.kernels``).

Pure ``@triton.jit`` functions and their launchers.  Nothing here queries a device at import
time; under ``TRITON_INTERPRET=1`` (set before import) the same kernels run on CPU tensors.
"""
