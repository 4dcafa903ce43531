"""The planner's output: a table per device, a stacked bar chart, and JSON."""
from __future__ import annotations

import json
import textwrap
from pathlib import Path

from childopt.bench.table import aligned_table
from childopt.memory.models import Architecture
from childopt.memory.planner import Setting

TERMS = (("weights", "weights"), ("gradients", "gradients"), ("state", "optimizer state"),
         ("masks", "masks/indices"), ("activations", "activations & temps"))
BASELINE = "full"


def _unit(plans: list) -> tuple[float, str]:
    return (1e9, "GB") if max(p.total for p in plans) >= 1e9 else (1e6, "MB")


def count(n: int) -> str:
    """``n`` in millions from 1M up (``3,426.5M``), in thousands from 1K (``12.3K``), else as is."""
    if n >= 1e6:
        return f"{n / 1e6:,.1f}M"
    return f"{n / 1e3:,.1f}K" if n >= 1e3 else f"{n:,}"


def describe(arch: Architecture, setting: Setting, parameters: int, methods: list) -> str:
    """One line on what was planned: the model, the batch, the dtypes, the sharding, and the LoRA
    rank where ``methods`` has LoRA."""
    autocast = "" if setting.autocast == "none" else f", {setting.autocast} autocast"
    checkpointing = ", activation checkpointing" if setting.checkpointing else ""
    sharding = f", FSDP2 over {setting.world_size} devices" if setting.world_size > 1 else ", one device"
    lora = f", LoRA rank {setting.lora_rank}" if "lora" in methods else ""
    return (f"{arch.source} as {arch.head} ({count(parameters)} parameters), batch {setting.batch_size} x "
            f"{setting.seq_len} tokens (no padding), {setting.dtype} parameters{autocast}{checkpointing}{sharding}, "
            f"reserve_p {setting.reserve_p} ({setting.mask_scope}){lora}")


def table(plans: list, measured: dict | None = None) -> str:
    """Rows of ``plans`` with every term, the total, the ratio to full fine-tuning and, where
    ``measured`` has the method, the measured total and planned/measured."""
    scale, unit = _unit(plans)
    baseline = next((p.total for p in plans if p.method == BASELINE), None)
    columns = [("method", lambda p: p.method + (" *" if p.modeled else ""))]
    columns += [(f"{label} {unit}", lambda p, key=key: f"{getattr(p, key) / scale:,.3f}") for key, label in TERMS]
    columns += [(f"total {unit}", lambda p: f"{p.total / scale:,.3f}"), ("peak in", lambda p: p.peak_phase or "-")]
    if baseline:
        columns += [("vs full", lambda p: f"{p.total / baseline:.2f}x")]
    if measured:
        columns += [(f"measured {unit}", lambda p: f"{measured[p.method].total / scale:,.3f}" if p.method in measured
                     else "-"),
                    ("planned/measured", lambda p: f"{p.total / measured[p.method].total:.4f}" if p.method in measured
                     else "-")]
    text = aligned_table(columns, plans, numeric=set(range(1, len(columns))))
    notes = [f"  * {p.method}: {p.modeled}" for p in plans if p.modeled]
    return "\n".join([text] + notes)


def write_json(path: str, model: str, arch: Architecture, setting: Setting, plans: list, measured: dict) -> None:
    """The plans with what reproduces them: the --model given, the full config, the versions."""
    record = {"model": model, "source": arch.source, "head": arch.head, "config": arch.config.to_dict(),
              "setting": setting.__dict__, "versions": versions(),
              "plans": [p.as_dict() for p in plans],
              "measured": {name: p.as_dict() for name, p in measured.items()}}
    Path(path).write_text(json.dumps(record, indent=2) + "\n")


def versions() -> dict:
    import importlib.metadata

    import torch

    import childopt

    found = {"torch": torch.__version__, "childopt": childopt.__version__}
    for package in ("transformers", "peft"):
        try:
            found[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            found[package] = None
    return found


def plot(path: str, plans: list, title: str) -> None:
    """A horizontal stacked bar per method, one colour per term."""
    try:
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise RuntimeError("--plot needs matplotlib: pip install matplotlib") from exc
    scale, unit = _unit(plans)
    fig = Figure(figsize=(10, 1.6 + 0.45 * len(plans)), layout="constrained")
    ax = fig.subplots()
    labels = [p.method + (" *" if p.modeled else "") for p in plans][::-1]
    left = [0.0] * len(plans)
    for key, label in TERMS:
        widths = [getattr(p, key) / scale for p in plans][::-1]
        ax.barh(labels, widths, left=left, label=label)
        left = [a + b for a, b in zip(left, widths)]
    for y, total in enumerate(left):
        ax.text(total, y, f" {total:,.2f}", va="center", fontsize=8)
    ax.set_xlabel(f"peak memory per device ({unit})")
    ax.set_title(textwrap.fill(title, 120), fontsize=9)
    ax.legend(loc="lower right", fontsize=8)
    ax.margins(x=0.12)
    fig.savefig(path, dpi=120)
