"""End-to-end training-step benchmark: forward, backward, ``opt.step()`` and ``zero_grad``.

The model is a transformers RoBERTa built locally from a config (no download): roberta-base with
bf16 autocast, batch 32 of 128 tokens on CUDA; a scaled-down RoBERTa in fp32 on CPU, where the
rows check that everything runs rather than what a GPU would show.  Rows: torch fused AdamW
(full fine-tuning), Child-Tuning-D (a fixed 30% mask on the encoder layers, freeze),
Child-Tuning-F (Bernoulli 30%), sparse storage with compact gradients (10% of every parameter),
and, where installed, peft LoRA r=8 on query and value and bitsandbytes 8-bit AdamW.

Shared by ``python -m childopt bench`` (the training table and its goals) and the
pytest-benchmark suite bench/bench_e2e.py.
"""
from __future__ import annotations

import gc
import importlib.util
import statistics
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from tqdm import tqdm

from childopt import MaskedAdamW, bench

CT_DENSITY = 0.3
SPARSE_DENSITY = 0.1
LORA_RANK = 8
LR = 2e-5

# (label, what it trains) of every kind, in table order.
KINDS = {
    "adamw-fused": ("torch AdamW fused", "full fine-tuning"),
    "child-tuning-d": ("MaskedAdamW", f"Child-Tuning-D {CT_DENSITY} (layers)"),
    "child-tuning-f": ("MaskedAdamW", f"Child-Tuning-F p={CT_DENSITY}"),
    "sparse-compact": ("MaskedAdamW", f"sparse {SPARSE_DENSITY}, compact grads"),
    "lora-r8": ("peft LoRA", f"r={LORA_RANK} query+value, fused AdamW"),
    "adamw-8bit": ("bitsandbytes AdamW8bit", "full fine-tuning"),
}
# (device type, --quick) -> timed training steps.
STEPS = {("cpu", True): 3, ("cpu", False): 5, ("cuda", True): 10, ("cuda", False): 30}


def transformers_module():
    """The transformers package, or ``bench.Unavailable`` saying how to install it."""
    if importlib.util.find_spec("transformers") is None:
        raise bench.Unavailable("the training rows need transformers (pip install transformers)")
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


def build(kind: str, model, backend: str = "auto"):
    """``(model, optimizer)`` of ``kind`` over ``model`` (LoRA wraps it); ``bench.Unavailable`` if it cannot run."""
    if kind == "adamw-fused":
        return model, torch.optim.AdamW(model.parameters(), lr=LR, fused=True)
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
            raise bench.Unavailable("peft is not installed (pip install peft)")
        import peft

        model = peft.get_peft_model(model, peft.LoraConfig(r=LORA_RANK, target_modules=["query", "value"],
                                                           task_type="SEQ_CLS"))
        return model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=10 * LR, fused=True)
    if kind == "adamw-8bit":
        return model, bench.adamw_8bit(list(model.parameters()), lr=LR)
    raise ValueError(f"kind must be one of {tuple(KINDS)}, got {kind!r}")


def training_step(kind: str, device: torch.device, backend: str = "auto"):
    """``(step, model, optimizer)``: a synchronized full training step of ``kind`` on a fresh seeded model."""
    setup = setup_for(device)
    transformers = transformers_module()
    torch.manual_seed(0)
    model, opt = build(kind, transformers.RobertaForSequenceClassification(setup.config).to(device), backend)
    gen = torch.Generator().manual_seed(1)
    inputs = {"input_ids": torch.randint(3, setup.config.vocab_size, (setup.batch, setup.length), generator=gen),
              "labels": torch.randint(0, 2, (setup.batch,), generator=gen)}
    inputs = {k: v.to(device) for k, v in inputs.items()}
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")

    def step():
        with autocast:
            loss = model(**inputs).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return bench.synchronized(step, device), model, opt


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
    grad_params: int  # elements with requires_grad (LoRA: the adapters and the head)
    steps: int


def _backend_of(kind: str, opt) -> str:
    return opt.backend_name() if isinstance(opt, MaskedAdamW) else ("bitsandbytes" if kind == "adamw-8bit" else "torch")


def measure(kind: str, device: torch.device, *, warmup: int, steps: int, backend: str = "auto") -> TrainRow:
    """Warm up (compiles kernels, creates the optimizer state), then time ``steps`` training steps."""
    step, model, opt = training_step(kind, device, backend)
    for _ in range(warmup):
        step()
    bench.reset_peak_memory(device)
    seconds = statistics.median(bench.time_calls(step, steps))
    optimizer, mode = KINDS[kind]
    grad_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return TrainRow(key=kind, optimizer=optimizer, mode=mode, backend=_backend_of(kind, opt), it_s=1.0 / seconds,
                    ms_per_step=seconds * 1e3, peak_gb=bench.peak_memory_gb(device), grad_params=grad_params,
                    steps=steps)


def run_rows(device: torch.device, *, warmup: int, steps: int,
             backend: str = "auto") -> tuple[list[TrainRow], list[dict]]:
    """Every kind under a progress bar; kinds that cannot run here are skipped with the reason."""
    rows, skipped = [], []
    for kind in tqdm(KINDS, desc="training step", unit="row"):
        try:
            rows.append(measure(kind, device, warmup=warmup, steps=steps, backend=backend))
        except bench.Unavailable as exc:
            optimizer, mode = KINDS[kind]
            skipped.append({"key": kind, "optimizer": optimizer, "mode": mode, "reason": str(exc)})
        gc.collect()  # the next row's peak memory must not see this row's model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows, skipped


def format_table(rows: list[TrainRow]) -> str:
    """The training rows as an aligned text table, with speed relative to torch fused AdamW."""
    fused = next((r for r in rows if r.key == "adamw-fused"), None)
    columns = (
        ("optimizer", lambda r: r.optimizer), ("mode", lambda r: r.mode), ("backend", lambda r: r.backend),
        ("it/s", lambda r: f"{r.it_s:.2f}"), ("ms/step", lambda r: f"{r.ms_per_step:.1f}"),
        ("peak GB", lambda r: f"{r.peak_gb:.3f}"), ("grad params", lambda r: f"{r.grad_params / 1e6:.2f}M"),
        ("x fused", lambda r: f"{r.it_s / fused.it_s:.2f}x" if fused else "n/a"),
    )
    return bench.aligned_table(columns, rows, numeric=range(3, len(columns)))


def optional_rows(device: torch.device, *, warmup: int, steps: int,
                  backend: str = "auto") -> tuple[Optional[Setup], list[TrainRow], list[dict]]:
    """``(setup, rows, skipped)`` of :func:`run_rows`; without transformers no setup, no rows and one reason."""
    try:
        setup = setup_for(device)
    except bench.Unavailable as exc:
        return None, [], [{"key": "training", "optimizer": "training step", "mode": "every row", "reason": str(exc)}]
    rows, skipped = run_rows(device, warmup=warmup, steps=steps, backend=backend)
    return setup, rows, skipped
