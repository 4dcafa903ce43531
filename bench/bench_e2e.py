"""pytest-benchmark suite: one full training step (forward, backward, step, zero_grad) of a
transformers model built locally from a config: roberta-base with bf16 autocast on a GPU, a
scaled-down RoBERTa on CPU (CI smoke).

Rows: torch AdamW fused (full fine-tuning), Child-Tuning-D (a fixed 30% mask on the layers,
freeze), Child-Tuning-F (Bernoulli 30%), sparse storage with compact gradients (10%), and, where
installed, peft LoRA r=8 and bitsandbytes 8-bit AdamW (skipped with the reason otherwise).
``extra_info`` records it/s and peak GB (``max_memory_allocated`` on GPU, RSS on CPU).
"""
import importlib.util

import pytest
import torch

from childopt import MaskedAdamW, bench

transformers = pytest.importorskip("transformers")


def _config(device: str):
    if device == "cuda":
        return transformers.RobertaConfig(num_labels=2), 32, 128  # roberta-base, batch 32, 128 tokens
    return transformers.RobertaConfig(vocab_size=1000, hidden_size=128, num_hidden_layers=2, num_attention_heads=2,
                                      intermediate_size=512, max_position_embeddings=80, num_labels=2), 8, 64


def _masks(model, density):
    gen = torch.Generator().manual_seed(0)
    return {n: (torch.rand(p.shape, generator=gen) < density).to(p.device)
            for n, p in model.named_parameters() if "layer" in n}


def _optimizer(kind: str, model):
    if kind == "adamw-fused":
        return model, torch.optim.AdamW(model.parameters(), lr=2e-5, fused=True)
    if kind == "child-tuning-d":
        return model, MaskedAdamW(model.named_parameters(), lr=2e-5, mask=_masks(model, 0.3), seed=0)
    if kind == "child-tuning-f":
        return model, MaskedAdamW(model.named_parameters(), lr=2e-5, mask="bernoulli", reserve_p=0.3, seed=0)
    if kind == "sparse-compact":
        return model, MaskedAdamW(model.named_parameters(), lr=2e-5, mask=_masks(model, 0.1), storage="sparse",
                                  compact_grads=True, seed=0)
    if kind == "lora-r8":
        if importlib.util.find_spec("peft") is None:
            pytest.skip("peft is not installed (pip install peft)")
        import peft

        model = peft.get_peft_model(model, peft.LoraConfig(r=8, target_modules=["query", "value"],
                                                           task_type="SEQ_CLS"))
        return model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4, fused=True)
    if importlib.util.find_spec("bitsandbytes") is None or not torch.cuda.is_available():
        pytest.skip("bitsandbytes 8-bit AdamW needs the bitsandbytes package and a CUDA GPU")
    import bitsandbytes

    return model, bitsandbytes.optim.AdamW8bit(model.parameters(), lr=2e-5)


KINDS = ["adamw-fused", "child-tuning-d", "child-tuning-f", "sparse-compact", "lora-r8", "adamw-8bit"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def bench_training_step(benchmark, kind, device):
    config, batch, length = _config(device)
    torch.manual_seed(0)
    model, opt = _optimizer(kind, transformers.RobertaForSequenceClassification(config).to(device))
    gen = torch.Generator().manual_seed(1)
    inputs = {"input_ids": torch.randint(3, config.vocab_size, (batch, length), generator=gen).to(device),
              "labels": torch.randint(0, 2, (batch,), generator=gen).to(device)}
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device == "cuda")

    def step():
        with autocast:
            loss = model(**inputs).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    run = bench.synchronized(step, torch.device(device))
    run()  # compiles kernels and creates the optimizer state outside the measurement
    bench.reset_peak_memory(torch.device(device))
    benchmark(run)
    stats = benchmark.stats.stats if benchmark.stats is not None else None
    benchmark.extra_info.update(peak_gb=bench.peak_memory_gb(torch.device(device)),
                                params=sum(p.numel() for p in model.parameters()))
    if stats is not None and stats.rounds:
        benchmark.extra_info["it_s"] = 1.0 / stats.median
