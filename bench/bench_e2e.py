"""pytest-benchmark suite: one full training step (forward, backward, step, zero_grad) of a
transformers RoBERTa built locally from a config, for every kind of :mod:`childopt.bench.train`
(roberta-base with bf16 autocast on a GPU, a scaled-down RoBERTa on CPU as the CI smoke run).
Kinds that cannot run here (peft, bitsandbytes missing) are skipped with the reason.
``extra_info`` records it/s, peak GB (``max_memory_allocated`` on GPU, RSS on CPU), the live
tensor bytes of one more step (:mod:`childopt.bench.live`: held at its start, and the peak), what
one forward saves for backward, and the number of parameter entries a step updates; after the
timed steps every parameter is finite and (nearly) every entry the optimizer trains has moved.
"""
import pytest
import torch

from childopt.bench import live, measure, train

pytest.importorskip("transformers")


@pytest.mark.parametrize("kind", list(train.KINDS))
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def bench_training_step(benchmark, kind, device):
    device = torch.device(device)
    try:
        step, model, opt, forward = train.warmed_up(kind, device, warmup=measure.WARMUP)
    except measure.Unavailable as exc:
        pytest.skip(str(exc))
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    benchmark(step)
    trained = train.trained_entries(model, opt)
    benchmark.extra_info.update(peak_gb=measure.peak_memory_gb(device), trained=trained)
    memory = live.measure_live(step, model.parameters(), opt, device)
    benchmark.extra_info.update(held_gb=memory.held / 1e9, live_gb=memory.peak / 1e9,
                                saved_gb=live.peak_increase(forward, device) / 1e9)
    stats = benchmark.stats.stats if benchmark.stats is not None else None
    if stats is not None and stats.rounds:
        benchmark.extra_info["it_s"] = 1.0 / stats.median
    after = dict(model.named_parameters())
    assert all(torch.isfinite(p).all() for p in after.values())
    moved = sum(int((after[name].detach() != p).sum()) for name, p in before.items())
    assert moved >= 0.99 * trained  # all but the zero padding rows of the embeddings, which get no gradient
