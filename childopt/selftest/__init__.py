"""``python -m childopt selftest``: one command that checks childopt on the machine it runs on.

On a CUDA machine it runs, in order, each step's output in a log of the output folder:

1. ``environment``: GPU, capability, driver, CUDA, torch, Triton, nvcc and compute-sanitizer
   versions, the git commit (``environment.log``, JSON).
2. ``build``: childopt._C with CUDA kernels for the present GPU, as ``python -m childopt build``
   does (childopt._native sets TORCH_CUDA_ARCH_LIST from the visible GPUs' capability, or
   CHILDOPT_CUDA_ARCHS).
3. ``lane``: ``pytest tests/backends/test_cuda_lane.py`` (its CUDA and CPU lanes): Bernoulli
   masks bit for bit against childopt.philox and the reference at sizes 1, 3, 5, 65535, 65537
   and 320*65536+5, 40 tensors in one bucket, Philox bases past 2**32, storage offsets 1-3, bf16
   params with fp32 grads, a tensor of 2**31+5 elements, CUDA-graph capture and torch.compile.
4. ``cuda-tests``: every other ``cuda``-marked test (``pytest -m cuda``).
5. ``graph-capture``: the lane's CUDA-graph tests, on a line of their own.
6. ``memcheck`` and 7. ``racecheck``: compute-sanitizer over every kernel of Triton and native
   on small shapes (childopt.selftest.target), when the toolkit has it and it can check the GPU.
8. ``benchmark``: the report of ``python -m childopt bench --quick`` (``bench.json``, ``bench.md``).

Pass, fail and skip per test come from pytest's JUnit XML (``lane.xml``, ``cuda-tests.xml``).
``selftest.json`` and ``selftest.md`` summarise the run; the screen ends with a verdict per
kernel (adamw_step none/dense/bernoulli/importance, sparse_adamw_step, fisher_accumulate, radix_histogram)
and backend/device: PASS, FAIL or SKIPPED with the reason.  The exit status is 1 if a step or a
cell failed (skips are not failures), else 0.  ``--quick`` leaves out the slow tests (2**31+
elements) and racecheck.

Without a GPU (or with ``--cpu-only``) it runs the environment and the lane's CPU lanes (native
CPU, Triton interpreted) and marks every GPU step skipped with the reason.  The tests are not
installed with a wheel: when ``tests/`` is not beside the package (and ``--tests DIR`` does not
name one), the test steps are skipped with that reason and the rest runs (the sanitizer's
program is part of the package).
"""
from childopt.selftest.cli import main

__all__ = ["main"]
