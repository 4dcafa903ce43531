"""pytest-benchmark suite: one full training step (forward, backward, step, zero_grad) of a
transformers RoBERTa built locally from a config, for every kind of :mod:`childopt.bench_train`
(roberta-base with bf16 autocast on a GPU, a scaled-down RoBERTa on CPU as the CI smoke run).
Kinds that cannot run here (peft, bitsandbytes missing) are skipped with the reason.
``extra_info`` records it/s, peak GB (``max_memory_allocated`` on GPU, RSS on CPU) and the
number of elements that get a gradient.
"""
import pytest
import torch

from childopt import bench, bench_train

pytest.importorskip("transformers")


@pytest.mark.parametrize("kind", list(bench_train.KINDS))
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def bench_training_step(benchmark, kind, device):
    device = torch.device(device)
    try:
        step, model, opt = bench_train.training_step(kind, device)
    except bench.Unavailable as exc:
        pytest.skip(str(exc))
    step()  # compiles kernels and creates the optimizer state outside the measurement
    bench.reset_peak_memory(device)
    benchmark(step)
    benchmark.extra_info.update(peak_gb=bench.peak_memory_gb(device),
                                grad_params=sum(p.numel() for p in model.parameters() if p.requires_grad))
    stats = benchmark.stats.stats if benchmark.stats is not None else None
    if stats is not None and stats.rounds:
        benchmark.extra_info["it_s"] = 1.0 / stats.median
