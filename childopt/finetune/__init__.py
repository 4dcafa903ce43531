"""``python -m childopt finetune``: fine-tune a pretrained model on GLUE tasks with each optimizer.

Every (task, method, lr, seed) is one run that writes ``<output>/<TASK>-<method>-lr<lr>-seed<seed>.json``:
the configuration, the dev metrics after each epoch, it/s, peak GB and versions.  A run whose JSON
exists is skipped, so a long table can be built over several sessions; one folder holds one
configuration (only the lr may differ), refused before anything trains otherwise.  ``--summarize``
turns the JSONs of a directory into a markdown table (mean and standard deviation over seeds) and
a learning-curve plot by method.

Tooling, not the optimizer: :mod:`.glue` reads the GLUE files and scores predictions, :mod:`.plan`
lays out and checks the runs, :mod:`.train` trains and records one, :mod:`.summary` builds the
table and curves, :mod:`.lock` keeps other commands out of the output folder while one runs, and
:mod:`.cli` is the command line.
"""
