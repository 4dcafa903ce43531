"""The performance goals of childopt, each a ratio of two rows (or a row and its stream reference)
measured in the same run.

CPU targets are issue #20's, set on a 2-core AVX-512 Xeon, fp32 unless said, "all" meaning the
table at every intra-op thread the run started with:

* MaskedAdamW mask=None, dense 0.3 freeze, dense 0.3 zero_grad: >= 1.05x torch fused AdamW's speed
  and >= 90% of the in-place stream at all threads; >= 1.0x torch fused AdamW at 1 thread;
* MaskedAdamW Bernoulli p=0.3 and ChildTuningAdamW F: >= 0.9x torch fused AdamW and >= 30x the
  published ChildTuning loop, at all threads;
* bf16 parameters, dense freeze and zero_grad masks: >= 1.0x torch fused AdamW on the same bf16
  parameters, at all threads (measured with ``--dtype bfloat16``);
* sparse storage at 5%: <= 0.25x the dense freeze step's time; at 1%: <= 0.08x;
* MaskedAdamW importance p=0.3 (Poisson draws, running scores refreshed every 100 steps; the row's
  median step, between refreshes): >= 0.9x the Bernoulli step's speed (issue #17), on CPU and CUDA.

CUDA targets are set for an H100/H200: masked steps at >= 0.95x torch fused AdamW and >= 85% of
the stream reference, ChildTuningAdamW >= 10x the ChildTuning loop, the 5% sparse step at
<= 0.15x the dense mask=None step.  Training goals, both devices: end-to-end Child-Tuning-D/-F
steps at >= 0.97x fused full fine-tuning, and the peak live tensor bytes of sparse storage with
compact gradients at <= 1.1x peft LoRA r=8's.  On other machines the same ratios are reported;
whether they are met there says nothing about the targets.  A goal whose rows were not measured
reports why instead of a ratio.  The speed goals whose two rows are both stepped in the paired
tables (:mod:`childopt.bench.paired`) are also given on those, where the placement spread of
separate parameter copies does not enter the ratio.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

from childopt.bench import paired, step, train
from childopt.bench.table import aligned_table
from childopt.bench.threads import label

ALL, ONE = "all", "1"
FUSED, LOOP = "adamw-fused", "childtuning-f-loop"
DENSE_KEYS = ("masked-none", "masked-dense-freeze", "masked-dense-zero_grad")
BERNOULLI_KEYS = ("masked-bernoulli", "childtuning-f")
BF16_KEYS = ("masked-dense-freeze", "masked-dense-zero_grad")
BERNOULLI, IMPORTANCE = "masked-bernoulli", "masked-importance"


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


@dataclass(frozen=True)
class StepGoal:
    """A goal on the step tables: ``kind`` "speed" (it/s of ``top`` over ``bottom``), "time" (ms of
    ``top`` over ``bottom``, lower is better) or "share" (``top``'s % of the stream reference), in the
    table of ``dtype`` at ``threads`` (:data:`ALL` or :data:`ONE`)."""

    kind: str
    top: str
    target: float
    bottom: Optional[str] = FUSED
    dtype: str = "float32"
    threads: str = ALL


CPU_GOALS = (
    *(StepGoal("speed", key, 1.05) for key in DENSE_KEYS),
    *(StepGoal("share", key, 90.0) for key in DENSE_KEYS),
    *(StepGoal("speed", key, 1.0, threads=ONE) for key in DENSE_KEYS),
    *(StepGoal("speed", key, 0.9) for key in BERNOULLI_KEYS),
    *(StepGoal("speed", key, 30.0, bottom=LOOP) for key in BERNOULLI_KEYS),
    *(StepGoal("speed", key, 1.0, dtype="bfloat16") for key in BF16_KEYS),
    StepGoal("time", "masked-sparse-0.05", 0.25, bottom="masked-dense-freeze"),
    StepGoal("time", "masked-sparse-0.01", 0.08, bottom="masked-dense-freeze"),
    StepGoal("speed", IMPORTANCE, 0.9, bottom=BERNOULLI),
)
CUDA_GOALS = (
    *(StepGoal("speed", key, 0.95) for key in DENSE_KEYS[1:] + BERNOULLI_KEYS),
    *(StepGoal("share", key, 85.0) for key in DENSE_KEYS[1:] + BERNOULLI_KEYS),
    StepGoal("speed", "childtuning-f", 10.0, bottom=LOOP),
    StepGoal("time", "masked-sparse-0.05", 0.15, bottom="masked-none"),
    StepGoal("speed", IMPORTANCE, 0.9, bottom=BERNOULLI),
)
BOTTOM_NAMES = {FUSED: "torch fused AdamW", LOOP: "the ChildTuning loop", "masked-none": "the mask=None step",
                "masked-dense-freeze": "the dense freeze step", BERNOULLI: "the Bernoulli step"}
TARGETS = {"cpu": "issue #20's, set on a 2-core AVX-512 Xeon", "cuda": "set for H100/H200"}


def _ratio(goal: str, rows: dict, top: str, bottom: str, field: str, target: float, *,
           at_most: bool = False, unit: str = "x") -> Goal:
    """``rows[top].field / rows[bottom].field`` as a goal, or a goal saying which row is missing."""
    missing = [key for key in (top, bottom) if key not in rows]
    if missing:
        return Goal(goal, None, target, at_most, unit, f"not measured: {', '.join(missing)}")
    value = getattr(rows[top], field) / getattr(rows[bottom], field)
    return Goal(goal, value, target, at_most, unit, f"{field} of {top} / {bottom}")


def _threads_label(spec: StepGoal, all_threads: int) -> str:
    """"2 threads (all)" or "1 thread"; a one-thread goal never says "(all)", so on a machine with
    one intra-op thread, where both goals read the same table, the per-core goal and the
    all-threads goal (a stricter target, set on two cores) keep their own names."""
    return label(all_threads, all_threads) if spec.threads == ALL else label(1, all_threads=0)


def _name(spec: StepGoal, table, all_threads: int, size: str, where: str = "") -> str:
    """"24m float32, 2 threads (all): MaskedAdamW dense 0.3 freeze: speed vs torch fused AdamW"
    (``where`` after the thread count: ", paired")."""
    row = next((r for r in table.rows if r.key == spec.top), None) if table else None
    what = f"{row.optimizer} {row.mode}" if row else spec.top
    bottom = BOTTOM_NAMES.get(spec.bottom, spec.bottom)
    versus = {"speed": f"speed vs {bottom}", "time": f"step time vs {bottom}",
              "share": "share of the in-place stream"}[spec.kind]
    return f"{size} {spec.dtype}, {_threads_label(spec, all_threads)}{where}: {what}: {versus}"


def _table_of(spec: StepGoal, tables: list, all_threads: int):
    """The table of ``spec``'s dtype and thread count among ``tables``, or None."""
    threads = all_threads if spec.threads == ALL else 1
    return next((t for t in tables if t.dtype == spec.dtype and t.threads == threads), None)


def evaluate(spec: StepGoal, tables: list, all_threads: int, where: str = "") -> Goal:
    """``spec`` on the table of its dtype and thread count among ``tables`` (one size's step tables,
    or for speed goals its paired tables, ``where`` naming which), or a goal saying that table was
    not measured."""
    size = tables[0].size if tables else "?"
    table = _table_of(spec, tables, all_threads)
    name = _name(spec, table, all_threads, size, where)
    if table is None:
        return Goal(name, None, spec.target, spec.kind == "time", "%" if spec.kind == "share" else "x",
                    f"not measured: no {spec.dtype} table at {_threads_label(spec, all_threads)}")
    by_key = {r.key: r for r in table.rows}
    if spec.kind == "share":
        if spec.top not in by_key:
            return Goal(name, None, spec.target, False, "%", f"not measured: {spec.top}")
        detail = f"GB/s of {spec.top} / the stream reference's {table.stream.gbps:.1f} GB/s"
        return Goal(name, by_key[spec.top].pct_stream, spec.target, False, "%", detail)
    field = "it_s" if spec.kind == "speed" else "ms_per_step"
    return _ratio(name, by_key, spec.top, spec.bottom, field, spec.target, at_most=spec.kind == "time")


def step_goals(tables: list[step.Table], device_type: str, all_threads: int) -> list[Goal]:
    """The device's goals on the step tables of each size in ``tables``, sizes in their order."""
    specs = CUDA_GOALS if device_type == "cuda" else CPU_GOALS
    sizes = list(dict.fromkeys(t.size for t in tables))
    return [evaluate(spec, [t for t in tables if t.size == size], all_threads) for size in sizes for spec in specs]


def paired_goals(tables: list[paired.PairedTable], device_type: str, all_threads: int) -> list[Goal]:
    """The device's speed goals between two rows of the paired tables, evaluated on those tables
    (sizes in their order); goals whose table was not measured are left to the step tables' lines."""
    stepped = {*paired.BASELINES, *paired.KEYS}
    specs = [spec for spec in (CUDA_GOALS if device_type == "cuda" else CPU_GOALS)
             if spec.kind == "speed" and {spec.top, spec.bottom} <= stepped]
    goals = []
    for size in dict.fromkeys(t.size for t in tables):
        sized = [t for t in tables if t.size == size]
        goals += [evaluate(spec, sized, all_threads, where=", paired") for spec in specs
                  if _table_of(spec, sized, all_threads) is not None]
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
        _with_live_floor(_ratio(f"training live GB, {sparse} vs LoRA r={train.LORA_RANK}", by_key, "sparse-compact",
                                "lora-r8", "live_gb", 1.1, at_most=True), by_key),
    ]


def _with_live_floor(goal: Goal, by_key: dict) -> Goal:
    """The live-GB goal with the floor under it: sparse storage trains entries of every weight, so a
    forward saves every layer's input, as full fine-tuning's does (its saved GB); what it holds plus
    that is the least its step can peak at, whatever the optimizer does."""
    if goal.value is None:
        return goal
    sparse, lora = by_key["sparse-compact"], by_key["lora-r8"]
    floor = (sparse.held_gb + sparse.saved_gb) / lora.live_gb
    return dataclasses.replace(goal, detail=f"{goal.detail}; floor (held + saved GB of sparse-compact) / "
                                            f"lora-r8 live GB = {floor:.2f}x")


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
