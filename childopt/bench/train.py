"""End-to-end training-step benchmark: forward, backward, ``opt.step()`` and ``zero_grad``.

The model is a transformers RoBERTa built locally from a config (no download): roberta-base with
bf16 autocast, batch 32 of 128 tokens on CUDA; a scaled-down RoBERTa in fp32 on CPU, where the
rows check that everything runs rather than what a GPU would show.  Rows: torch fused AdamW
(full fine-tuning), Child-Tuning-D (a fixed 30% mask on the encoder layers, freeze),
Child-Tuning-F (Bernoulli 30%), sparse storage with compact gradients (10% of every parameter),
and, where installed, peft LoRA r=8 on query and value and bitsandbytes 8-bit AdamW.

Memory, two ways: ``peak_gb`` over the timed steps (the CUDA allocator's peak; on CPU the
process peak RSS, which everything else in the process dominates), and the live tensor bytes of
one extra, untimed step (:mod:`childopt.bench.live`): ``held_gb``, the parameters, gradients and
optimizer state live when it starts, and ``live_gb``, that plus the step's peak increase
(activations, gradients, temporaries), which is what tells the methods apart on CPU.  ``saved_gb``
is what one forward leaves for backward (its peak increase with the graph kept): a method that
trains some entries of every weight saves each layer's input as full fine-tuning does, a frozen
weight (LoRA's) saves none for its own gradient, so this is the floor under a step's live bytes.

Shared by ``python -m childopt bench`` (the training table and its goals) and the
pytest-benchmark suite bench/bench_e2e.py.
"""
from __future__ import annotations

import importlib.util
import statistics
from dataclasses import dataclass
from typing import Callable, NamedTuple, Optional

import torch
from tqdm import tqdm

from childopt import MaskedAdamW
from childopt.bench.baselines import adamw_8bit, fused_adamw
from childopt.bench.live import measure_live, peak_increase
from childopt.bench.measure import (Unavailable, peak_memory_gb, reset_peak_memory, skip_record, synchronized,
                                    time_calls)
from childopt.bench.table import aligned_table

CT_DENSITY = 0.3
SPARSE_DENSITY = 0.1
LORA_RANK = 8
LR = 2e-5

# (label, what it trains) of every kind, in table order.  Child-Tuning-D masks the encoder
# layers only, as the published ChildTuning code does ('layer' in the parameter name): the
# embeddings, pooler and head (40M of roberta-base's 125M) train fully.
KINDS = {
    "adamw-fused": ("torch AdamW fused", "full fine-tuning"),
    "child-tuning-d": ("MaskedAdamW", f"Child-Tuning-D {CT_DENSITY} (encoder layers)"),
    "child-tuning-f": ("MaskedAdamW", f"Child-Tuning-F p={CT_DENSITY}"),
    "sparse-compact": ("MaskedAdamW", f"sparse {SPARSE_DENSITY}, compact grads"),
    "lora-r8": ("peft LoRA", f"r={LORA_RANK} query+value, fused AdamW"),
    "adamw-8bit": ("bitsandbytes AdamW8bit", "full fine-tuning"),
}
# (device type, --quick) -> timed training steps.
STEPS = {("cpu", True): 3, ("cpu", False): 5, ("cuda", True): 10, ("cuda", False): 30}


def transformers_module():
    """The transformers package, or ``Unavailable`` saying how to install it."""
    if importlib.util.find_spec("transformers") is None:
        raise Unavailable("the training rows need transformers (pip install transformers)")
    import transformers

    return transformers


@dataclass(frozen=True)
class Setup:
    """The model config and the batch shape a device trains with."""

    config: object
    batch: int
    length: int
    description: str


def setup_for(device: torch.device) -> Setup:
    """roberta-base, batch 32 x 128, bf16 autocast on CUDA; a 2-layer hidden-128 RoBERTa, batch 8 x 64, on CPU."""
    transformers = transformers_module()
    if device.type == "cuda":
        config = transformers.RobertaConfig(num_labels=2)
        return Setup(config, 32, 128, "roberta-base (125M), batch 32 x 128 tokens, bf16 autocast")
    config = transformers.RobertaConfig(vocab_size=1000, hidden_size=128, num_hidden_layers=2, num_attention_heads=2,
                                        intermediate_size=512, max_position_embeddings=80, num_labels=2)
    return Setup(config, 8, 64, "RoBERTa scaled down (2 layers, hidden 128), batch 8 x 64 tokens, fp32")


def _random_masks(model, density: float, keep: Callable[[str], bool]) -> dict:
    """Seeded random bool masks of ``density`` for the named parameters ``keep`` accepts."""
    gen = torch.Generator().manual_seed(0)
    return {name: (torch.rand(p.shape, generator=gen) < density).to(p.device)
            for name, p in model.named_parameters() if keep(name)}


def lora_model(model):
    """``model`` wrapped by peft LoRA r=LORA_RANK on the attention query and value projections; the
    classifier head trains fully (peft's ``modules_to_save`` of a sequence-classification task)."""
    import peft

    return peft.get_peft_model(model, peft.LoraConfig(r=LORA_RANK, target_modules=["query", "value"],
                                                      task_type="SEQ_CLS"))


def build(kind: str, model, backend: str = "auto"):
    """``(model, optimizer)`` of ``kind`` over ``model`` (LoRA wraps it); ``Unavailable`` if it cannot run."""
    if kind == "adamw-fused":
        return model, fused_adamw(model.parameters(), lr=LR)
    if kind == "child-tuning-d":
        masks = _random_masks(model, CT_DENSITY, lambda name: ".layer." in name)
        return model, MaskedAdamW(model.named_parameters(), lr=LR, mask=masks, seed=0, backend=backend)
    if kind == "child-tuning-f":
        return model, MaskedAdamW(model.named_parameters(), lr=LR, mask="bernoulli", reserve_p=CT_DENSITY, seed=0,
                                  backend=backend)
    if kind == "sparse-compact":
        masks = _random_masks(model, SPARSE_DENSITY, lambda name: True)
        return model, MaskedAdamW(model.named_parameters(), lr=LR, mask=masks, storage="sparse", compact_grads=True,
                                  seed=0, backend=backend)
    if kind == "lora-r8":
        if importlib.util.find_spec("peft") is None:
            raise Unavailable("peft is not installed (pip install peft)")
        model = lora_model(model)
        # LoRA is usually trained at ~10x full fine-tuning's lr; the lr does not change a step's cost.
        return model, fused_adamw([p for p in model.parameters() if p.requires_grad], lr=10 * LR)
    if kind == "adamw-8bit":
        return model, adamw_8bit(list(model.parameters()), lr=LR)
    raise ValueError(f"kind must be one of {tuple(KINDS)}, got {kind!r}")


class Training(NamedTuple):
    """A synchronized full training ``step`` of a model and its optimizer, and the ``forward`` it starts with."""

    step: Callable[[], None]
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    forward: Callable[[], torch.Tensor]


def training_step(kind: str, device: torch.device, backend: str = "auto") -> Training:
    """A :class:`Training` of ``kind`` on a fresh seeded model."""
    setup = setup_for(device)
    transformers = transformers_module()
    torch.manual_seed(0)
    model, opt = build(kind, transformers.RobertaForSequenceClassification(setup.config).to(device), backend)
    gen = torch.Generator().manual_seed(1)
    inputs = {"input_ids": torch.randint(3, setup.config.vocab_size, (setup.batch, setup.length), generator=gen),
              "labels": torch.randint(0, 2, (setup.batch,), generator=gen)}
    inputs = {k: v.to(device) for k, v in inputs.items()}
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")

    def forward():
        with autocast:
            return model(**inputs).loss

    def step():
        forward().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return Training(synchronized(step, device), model, opt, forward)


def warmed_up(kind: str, device: torch.device, *, warmup: int, backend: str = "auto") -> Training:
    """:func:`training_step` after ``warmup`` untimed steps (kernels compiled, optimizer state
    created), with a fresh peak-memory window."""
    training = training_step(kind, device, backend)
    for _ in range(warmup):
        training.step()
    reset_peak_memory(device)
    return training


def trained_entries(model, opt) -> float:
    """Parameter entries a step can update: the masks' kept entries, the selected indices, ``reserve_p``
    of each Bernoulli-masked parameter (expected), else every entry that gets a gradient."""
    if not isinstance(opt, MaskedAdamW):
        return float(sum(p.numel() for p in model.parameters() if p.requires_grad))
    total = 0.0
    for group in opt.param_groups:
        for p in group["params"]:
            state = opt.state[p]
            if "indices" in state:
                total += state["indices"].numel()
            elif "mask" in state:
                total += int(state["mask"].sum())
            else:
                total += p.numel() * (group["reserve_p"] if opt.mask_kind == "bernoulli" else 1.0)
    return total


@dataclass(frozen=True)
class TrainRow:
    """The measurements of one training-step row."""

    key: str
    optimizer: str
    mode: str
    backend: str
    it_s: float
    ms_per_step: float
    peak_gb: float
    held_gb: float  # tensors live at the start of a step (:class:`childopt.bench.live.LiveMemory`)
    live_gb: float  # held_gb + the step's peak increase
    saved_gb: float  # what one forward leaves for backward (its peak increase with the graph kept)
    trained: float  # :func:`trained_entries`
    steps: int


def _backend_of(kind: str, opt) -> str:
    return opt.backend_name() if isinstance(opt, MaskedAdamW) else ("bitsandbytes" if kind == "adamw-8bit" else "torch")


def measure(kind: str, device: torch.device, *, warmup: int, steps: int, backend: str = "auto") -> TrainRow:
    """Time ``steps`` training steps of ``kind`` after :func:`warmed_up`, read the peak memory, then
    measure the live tensor bytes of one more step and what one forward saves."""
    step, model, opt, forward = warmed_up(kind, device, warmup=warmup, backend=backend)
    seconds = statistics.median(time_calls(step, steps))
    peak_gb = peak_memory_gb(device)
    live = measure_live(step, model.parameters(), opt, device)
    saved = peak_increase(forward, device)  # the loss, and the graph with it, is dropped when forward returns
    optimizer, mode = KINDS[kind]
    return TrainRow(key=kind, optimizer=optimizer, mode=mode, backend=_backend_of(kind, opt), it_s=1.0 / seconds,
                    ms_per_step=seconds * 1e3, peak_gb=peak_gb, held_gb=live.held / 1e9, live_gb=live.peak / 1e9,
                    saved_gb=saved / 1e9, trained=trained_entries(model, opt), steps=steps)


def run_rows(device: torch.device, *, warmup: int, steps: int,
             backend: str = "auto") -> tuple[list[TrainRow], list[dict]]:
    """Every kind under a progress bar; kinds that cannot run here are skipped with the reason.  Any
    other error is raised: the rows train in the parameters' own dtype, where a failing optimizer is a
    bug, not a skip (a --backend that cannot run on the device is refused before anything runs)."""
    rows, skipped = [], []
    for kind in tqdm(KINDS, desc="training step", unit="row"):
        try:
            rows.append(measure(kind, device, warmup=warmup, steps=steps, backend=backend))
        except Unavailable as exc:
            skipped.append(skip_record(kind, *KINDS[kind], str(exc)))
    return rows, skipped


def format_table(rows: list[TrainRow]) -> str:
    """The training rows as an aligned text table, with speed relative to torch fused AdamW."""
    fused = next((r for r in rows if r.key == "adamw-fused"), None)
    columns = (
        ("optimizer", lambda r: r.optimizer), ("mode", lambda r: r.mode), ("backend", lambda r: r.backend),
        ("it/s", lambda r: f"{r.it_s:.2f}"), ("ms/step", lambda r: f"{r.ms_per_step:.1f}"),
        ("peak GB", lambda r: f"{r.peak_gb:.3f}"), ("held GB", lambda r: f"{r.held_gb:.4f}"),
        ("live GB", lambda r: f"{r.live_gb:.4f}"), ("saved GB", lambda r: f"{r.saved_gb:.4f}"),
        ("trained", lambda r: f"{r.trained / 1e6:.2f}M"),
        ("x fused", lambda r: f"{r.it_s / fused.it_s:.2f}x" if fused else "n/a"),
    )
    return aligned_table(columns, rows, numeric=range(3, len(columns)))


def optional_rows(device: torch.device, *, warmup: int, steps: int,
                  backend: str = "auto") -> tuple[Optional[Setup], list[TrainRow], list[dict]]:
    """``(setup, rows, skipped)`` of :func:`run_rows`; without transformers no setup, no rows and one reason."""
    try:
        setup = setup_for(device)
    except Unavailable as exc:
        return None, [], [skip_record("training", "training step", "every row", str(exc))]
    rows, skipped = run_rows(device, warmup=warmup, steps=steps, backend=backend)
    return setup, rows, skipped
