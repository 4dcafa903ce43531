"""The performance goals of childopt, each a ratio of two rows measured in the same run.

The targets are set for an H100/H200: masked steps at >= 0.95x torch fused AdamW's speed and
>= 85% of copy bandwidth, >= 10x the ChildTuning reference loop, the 5% sparse step at <= 0.15x
the dense step's time, end-to-end Child-Tuning-D/-F steps at >= 0.97x fused full fine-tuning, and
the peak memory of sparse storage with compact gradients at <= 1.1x peft LoRA r=8.  On other
devices the same ratios are reported; whether they are met there says nothing about the targets.
A goal whose rows were not measured reports why instead of a ratio.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from childopt.bench import step, train
from childopt.bench.table import aligned_table

MASKED_KEYS = ("masked-dense-freeze", "masked-dense-zero_grad", "masked-bernoulli", "childtuning-f")


@dataclass(frozen=True)
class Goal:
    """``value`` (a ratio, or None when not measured) against ``target``; ``at_most``: lower is better."""

    goal: str
    value: Optional[float]
    target: float
    at_most: bool
    unit: str  # "x" for a ratio, "%" for a percentage
    detail: str

    @property
    def met(self) -> Optional[bool]:
        if self.value is None:
            return None
        return self.value <= self.target if self.at_most else self.value >= self.target


def _ratio(goal: str, rows: dict, top: str, bottom: str, field: str, target: float, *,
           at_most: bool = False, unit: str = "x") -> Goal:
    """``rows[top].field / rows[bottom].field`` as a goal, or a goal saying which row is missing."""
    missing = [key for key in (top, bottom) if key not in rows]
    if missing:
        return Goal(goal, None, target, at_most, unit, f"not measured: {', '.join(missing)}")
    value = getattr(rows[top], field) / getattr(rows[bottom], field)
    return Goal(goal, value, target, at_most, unit, f"{field} of {top} / {bottom}")


def step_goals(rows: list[step.Row]) -> list[Goal]:
    """Goals of the optimizer-step rows (``pct_copy_bw`` set by :func:`childopt.bench.step.compare`)."""
    by_key = {r.key: r for r in rows}
    goals = []
    for key in MASKED_KEYS:
        name = f"{by_key[key].optimizer} {by_key[key].mode}" if key in by_key else key
        goals.append(_ratio(f"{name}: speed vs torch fused AdamW", by_key, key, "adamw-fused", "it_s", 0.95))
        if key in by_key:
            pct = by_key[key].pct_copy_bw
            goals.append(Goal(f"{name}: share of copy bandwidth", pct, 85.0, False, "%",
                              "effective GB/s / the same run's copy_ GB/s"))
    goals.append(_ratio("ChildTuning-F: fused step vs the ChildTuning reference loop", by_key, "childtuning-f",
                        "childtuning-f-loop", "it_s", 10.0))
    goals.append(_ratio("sparse 5%: step time vs the dense MaskedAdamW step", by_key, "masked-sparse-0.05",
                        "masked-none", "ms_per_step", 0.15, at_most=True))
    return goals


def training_goals(rows) -> list[Goal]:
    """Goals of the end-to-end training rows (:class:`childopt.bench.train.TrainRow`)."""
    by_key = {r.key: r for r in rows}
    sparse = f"sparse {train.SPARSE_DENSITY:.0%} + compact grads"
    return [
        _ratio("training step, Child-Tuning-D vs fused full fine-tuning", by_key, "child-tuning-d", "adamw-fused",
               "it_s", 0.97),
        _ratio("training step, Child-Tuning-F vs fused full fine-tuning", by_key, "child-tuning-f", "adamw-fused",
               "it_s", 0.97),
        _ratio(f"training peak GB, {sparse} vs LoRA r={train.LORA_RANK}", by_key, "sparse-compact", "lora-r8",
               "peak_gb", 1.1, at_most=True),
    ]


def _shown(value: Optional[float], unit: str) -> str:
    if value is None:
        return "n/a"
    return f"{value:.0f}%" if unit == "%" else f"{value:.2f}x"


def format_goals(goals: list[Goal]) -> str:
    """The goals as an aligned text table: measured, target, met (yes / NO / n/a) and how."""
    columns = (
        ("goal", lambda g: g.goal),
        ("measured", lambda g: _shown(g.value, g.unit)),
        ("target", lambda g: ("<= " if g.at_most else ">= ") + _shown(g.target, g.unit)),
        ("met", lambda g: {True: "yes", False: "NO", None: "n/a"}[g.met]),
        ("how", lambda g: g.detail),
    )
    return aligned_table(columns, goals, numeric=(1, 2))
