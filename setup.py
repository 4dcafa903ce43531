"""Install childopt.  Metadata lives in pyproject.toml.

A plain install is pure Python (the Triton kernels compile at first use).  The native
extension childopt._C is added by the native-extension work behind CHILDOPT_BUILD_EXT=1.
"""
from setuptools import setup

setup()
