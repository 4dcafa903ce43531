"""Train one run of ``python -m childopt finetune`` and record it: dev metrics per epoch, it/s,
peak GB, optimizer state and versions, written as the run's JSON.

Methods, all at the same hyper-parameters and parameter groups (the Trainer's: no weight decay on
biases and normalisation weights), gradients clipped to ``--max-grad-norm`` and a linear
warmup/decay schedule:

* ``adamw``: ``torch.optim.AdamW``, vanilla fine-tuning.
* ``ct-f``: Child-Tuning-F, ``MaskedAdamW(mask="bernoulli", reserve_p=...)``.
* ``ct-d``: Child-Tuning-D, a fixed mask from :func:`childopt.fisher.fisher_mask` over the
  training set (ChildTuning's defaults: the numbered layers ``layer.N``/``layers.N``, or for a model
  without them its transformer blocks, ``transformer.h.N`` and the like (plan.MASK_INCLUDES); one
  global threshold), with
  masked-out entries frozen (``masked="freeze"``; ChildTuning's own optimizer only zeroes their
  gradients, so moments and weight decay still move them); the rest of the model trains fully.
* ``sparse``: the same mask with sparse-index storage and compact gradients: the same trajectory
  as ``ct-d`` (bit for bit on one backend) with less optimizer state.
* ``ct-i``: an importance-sampled child network, ``MaskedAdamW(mask="importance", reserve_p=...)``:
  each step each entry is kept with a probability rising with its running Fisher (the optimizer's
  own ``exp_avg_sq``, re-solved every 100 steps, floor ``reserve_p / 10``), kept gradients scaled
  by ``1 / p`` (childopt.optim.importance_mask).
* ``lora``: peft LoRA r=8 on the attention query and value projections, the classifier head trained
  fully, ``torch.optim.AdamW(fused=True)`` over the trainable parameters (at the run's ``--lr``: LoRA
  usually wants about 10x full fine-tuning's, so run it with its own ``--lr``).

``--report-heads`` writes each run's heads report (childopt.finetune.heads): it keeps the base
model's layer weights and runs the Fisher pass ct-d selects its mask from for every method (for the
others under a forked RNG, so the run trains bit for bit as it would without the report).

``--train-size N`` trains on N rows of the training split drawn with the run's seed (the same rows
for every method and lr of one seed), the low-resource regime Child-Tuning is claimed to help most.

MaskedAdamW clips the gradients it steps (the selected entries, under a fixed mask), AdamW and
``ct-f`` the full gradients.

The integration helper (``child_tuning_optimizer``) is not used: it needs ``TrainingArguments``
and refuses compact gradients outside the Trainer.  Each run reseeds before training, so the
methods of one seed share the classifier initialisation, batch order and dropout stream.
:func:`execute_in_child` runs one in a fresh process, so that its CPU peak RSS is its own.
"""
from __future__ import annotations

import dataclasses
import json
import math
import multiprocessing
import os
import sys
import threading
import time
from typing import Optional

import torch
from tqdm.auto import tqdm

from childopt.analysis.quantities import kept_entries
from childopt.arguments import write_output
from childopt.bench import environment
from childopt.bench.measure import peak_memory_gb, reset_peak_memory, state_gb
from childopt.bench.train import lora_model
from childopt.finetune import glue, heads
from childopt.finetune.plan import MASK_METHODS, Run
from childopt.optim import MaskedAdamW

PARENT_GONE_EXIT = 3  # the exit status of a run whose parent command died


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


def fisher_pass(run: Run, model: torch.nn.Module, fisher_loader) -> dict:
    """ChildTuning-D's Fisher scores of the model (names matching ``run.mask_include``, clip 1.0,
    ``--fisher-batches`` batches), in train mode: what ct-d/sparse select their mask from, and the heads
    report's importance."""
    from childopt.fisher import fisher_scores

    model.train()
    return fisher_scores(model, fisher_loader, include=run.mask_include, max_batches=run.config.fisher_batches,
                         progress=sys.stderr.isatty())


def run_fisher_pass(run: Run, model: torch.nn.Module, fisher_loader) -> Optional[dict]:
    """The Fisher scores ``run`` needs (ct-d/sparse, or any method with ``--report-heads``), else None.

    For the report alone the pass runs under a forked RNG: its dropout draws leave the generator as
    it was, so what follows (LoRA's initialisation) is the run without the report, bit for bit.
    """
    if run.method in MASK_METHODS:
        return fisher_pass(run, model, fisher_loader)
    if run.report_heads:
        with torch.random.fork_rng():
            return fisher_pass(run, model, fisher_loader)
    return None


def build_optimizer(run: Run, model: torch.nn.Module, scores: Optional[dict]) -> torch.optim.Optimizer:
    """The optimizer of ``run.method``; ct-d/sparse select their mask from ``scores`` (:func:`fisher_pass`)."""
    config = run.config
    groups = param_groups(model, config.weight_decay)
    if run.method == "adamw":
        return torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay)
    if run.method == "lora":
        return torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay, fused=True)
    if run.method in ("ct-f", "ct-i"):
        return MaskedAdamW(groups, lr=config.lr, weight_decay=config.weight_decay,
                           mask="bernoulli" if run.method == "ct-f" else "importance", reserve_p=config.reserve_p,
                           seed=run.seed)
    from childopt.masks import select_mask

    mask = select_mask(scores, config.reserve_p)
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
    train_rows, dev_rows = (glue.read_split(run.data_dir, spec, split) for split in glue.SPLITS)
    train_rows = training_subset(train_rows, run.config.train_size, run.seed)
    train_set, dev_set = (glue.GlueDataset(rows, spec, tokenizer, run.config.max_length)
                          for rows in (train_rows, dev_rows))
    return tokenizer, model, train_set, dev_set


def training_subset(rows: list, size: Optional[int], seed: int) -> list:
    """``size`` rows drawn without replacement with ``seed`` (in file order), or all of them when None."""
    if size is None:
        return rows
    chosen = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed))[:size].sort().values
    return [rows[i] for i in chosen.tolist()]


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
        _print_epoch(run, history[-1], peak_memory_gb(device))
    return history


def execute(run: Run) -> dict:
    """Train ``run`` and return its record (dev metrics per epoch, speed, memory, versions)."""
    import transformers

    device = torch.device(run.device)
    reset_peak_memory(device)
    tokenizer, model, train_set, dev_set = load(run)
    batch_size = run.config.batch_size
    start = time.perf_counter()
    scores = run_fisher_pass(run, model, _loader(train_set, tokenizer, batch_size, seed=run.seed))
    before = heads.before_training(model, scores) if run.report_heads else None
    if run.method == "lora":
        model = lora_model(model)
    optimizer = build_optimizer(run, model, scores)
    fisher_seconds = time.perf_counter() - start if scores is not None else 0.0
    train_loader = _loader(train_set, tokenizer, batch_size, seed=run.seed)
    history = train(run, model, optimizer, train_loader, _loader(dev_set, tokenizer, batch_size, seed=None))
    steps, seconds = history[-1]["step"], sum(h["seconds"] for h in history)
    record = {
        "task": run.task, "method": run.method, "seed": run.seed, "config": dataclasses.asdict(run.config),
        "data": {"train_rows": len(train_set), "dev_rows": len(dev_set), "steps_per_epoch": len(train_loader)},
        "history": history, "dev": history[-1]["dev"], "steps": steps, "train_seconds": seconds,
        "it_s": steps / seconds, "fisher_seconds": fisher_seconds, "peak_gb": peak_memory_gb(device),
        "state_gb": state_gb(optimizer), "backend": _optimizer_backend(optimizer),
    }
    if run.method in MASK_METHODS:
        record["mask"] = {"include": run.mask_include,
                          **mask_check(model, optimizer, run.model_dir, glue.TASKS[run.task].num_labels)}
    record["env"] = {**environment.describe(device, {"model_dir": run.model_dir, "data_dir": run.data_dir}),
                     "transformers": transformers.__version__}
    if before is not None:  # last: it merges a LoRA model into its base
        print(f"[{run.name}] heads report in {heads.write_report(run, before, model, optimizer)}", flush=True)
    return record


def _print_epoch(run: Run, entry: dict, peak_gb: float) -> None:
    metrics = ", ".join(f"{k} {v:.4f}" for k, v in entry["dev"].items())
    print(f"[{run.name}] epoch {entry['epoch']:.2f} (step {entry['step']}): train loss {entry['train_loss']:.4f} | "
          f"dev {metrics} | {entry['it_s']:.2f} it/s | peak {peak_gb:.2f} GB", flush=True)


def execute_and_save(run: Run) -> None:
    """Train ``run`` and write its JSON atomically (a killed run leaves no JSON, so it reruns)."""
    record = execute(run)
    write_output(run.path, json.dumps(record, indent=2) + "\n")
    print(f"[{run.name}] {record['it_s']:.2f} it/s, peak {record['peak_gb']:.2f} GB; wrote {run.path}", flush=True)


def execute_in_child(run: Run) -> None:
    """:func:`execute_and_save` in a fresh process, so its peak memory is its own; the process stops when
    this one dies (:func:`_exit_with_parent`)."""
    process = multiprocessing.get_context("spawn").Process(target=_child_main, args=(run,), name=run.name)
    process.start()
    try:
        process.join()
    finally:
        if process.is_alive():
            process.terminate()
            process.join()
    if process.exitcode != 0:
        raise RuntimeError(f"run {run.name} failed (exit code {process.exitcode}); its error is printed above")


def _child_main(run: Run) -> None:
    """The spawned process of :func:`execute_in_child`."""
    _exit_with_parent(run.name)
    execute_and_save(run)


def _exit_with_parent(name: str) -> None:
    """End this spawned process as soon as the process that spawned it dies (say a SIGKILL), instead of
    training on as an orphan holding memory and a GPU, outside the lock of its --output.

    A daemon thread waits on multiprocessing's parent sentinel (a pipe whose write end only the parent
    holds on POSIX, the parent's process handle on Windows): it wakes the moment the parent is gone, on
    every platform, without polling, and at once if the parent died before it started.  Not Linux's
    PR_SET_PDEATHSIG: that is Linux only (ctypes), and fires when the parent *thread* that spawned the
    process ends, not the parent process.
    """
    parent = multiprocessing.parent_process()

    def watch() -> None:
        parent.join()
        try:
            print(f"[{name}] the finetune command that started this run is gone; stopping it", file=sys.stderr,
                  flush=True)
        finally:
            os._exit(PARENT_GONE_EXIT)  # not sys.exit: that would end this thread alone

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()
