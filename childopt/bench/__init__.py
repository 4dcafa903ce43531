"""Benchmarks of childopt: the report of ``python -m childopt bench`` and the measuring code the
pytest-benchmark suites in bench/ share.  Tooling, not the optimizer: nothing in childopt's
optimizers imports it.

One job per module: :mod:`.measure` (timing, peak memory), :mod:`.live` (live tensor bytes of one
step), :mod:`.llc` (the last-level cache's size), :mod:`.stream` (the in-place stream reference),
:mod:`.threads` (intra-op thread counts), :mod:`.environment` (what the numbers depend on),
:mod:`.shapes` (the parameter lists stepped), :mod:`.table` (aligned text tables),
:mod:`.baselines` (the optimizers childopt is compared against), :mod:`.step` (the optimizer-step
rows and tables), :mod:`.sweep` (the tables of a run: sizes, dtypes, thread counts),
:mod:`.train` (the training-step rows), :mod:`.goals` (the goal ratios) and :mod:`.report` (the
command line).
"""
