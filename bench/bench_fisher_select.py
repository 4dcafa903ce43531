"""pytest-benchmark suite: Fisher accumulation and exact mask selection against torch baselines.

Baselines in the same run: ``torch._foreach_addcmul_(F, G, G)`` (one fused kernel family at
12 B/element) for accumulation, and ``kthvalue`` / ``topk`` on a ``torch.cat`` copy of all
scores for selection (the copy is what childopt avoids).  CPU cases use small sizes (CI smoke);
``cuda`` cases use roberta-base's 125M scores.  ``extra_info`` records it/s, the byte model and
GB/s with its share of the in-place stream reference (:mod:`childopt.bench.stream`), and peak GB;
each case then checks its result (Fisher: g**2 from zero; selection: the k largest scores).
"""
import pytest
import torch

from childopt import backends, masks
from childopt.bench import measure
from childopt.bench.shapes import roberta_base_shapes

FISHER_BYTES = 12     # F read + write, g read (fp32)
SELECT_PASS_BYTES = 4  # one read of every fp32 score per histogram pass (three passes)


def _scores(shapes, device):
    gen = torch.Generator().manual_seed(0)
    return {f"t{i}": torch.rand(s, generator=gen).to(device) for i, s in enumerate(shapes)}


def _record(benchmark, stream_reference, device, bytes_moved, numel):
    stats = benchmark.stats.stats if benchmark.stats is not None else None
    seconds = stats.median if stats is not None and stats.rounds else None
    benchmark.extra_info.update(bytes=bytes_moved, peak_gb=measure.peak_memory_gb(device))
    if seconds:
        gbps = bytes_moved / seconds / 1e9
        benchmark.extra_info.update(it_s=1.0 / seconds, gbps=gbps,
                                    pct_stream=100.0 * gbps / stream_reference(numel, device).gbps)


def _cases(cpu_shapes):
    return [pytest.param("cpu", cpu_shapes, id="cpu"),
            pytest.param("cuda", roberta_base_shapes(), id="cuda-roberta-base", marks=pytest.mark.cuda)]


@pytest.mark.parametrize("impl", ["childopt", "foreach_addcmul"])
@pytest.mark.parametrize("device,shapes", _cases(roberta_base_shapes(scale=1 / 12, layers=1)))
def bench_fisher_accumulate(benchmark, stream_reference, impl, device, shapes):
    device = torch.device(device)
    grads = list(_scores(shapes, device).values())
    fisher = [torch.zeros_like(g) for g in grads]
    scales = torch.ones(len(grads), device=device)
    if impl == "childopt":
        op = backends.create("auto", device)
        step = measure.synchronized(lambda: op.fisher_accumulate(fisher, grads, scales), device)
        benchmark.extra_info["backend"] = op.name
    else:
        step = measure.synchronized(lambda: torch._foreach_addcmul_(fisher, grads, grads), device)
    measure.reset_peak_memory(device)
    benchmark(step)
    numel = sum(g.numel() for g in grads)
    _record(benchmark, stream_reference, device, FISHER_BYTES * numel, numel)
    for f in fisher:
        f.zero_()
    step()
    assert all(torch.equal(f, g * g) for f, g in zip(fisher, grads))  # unit scales: one call from zero is g**2


@pytest.mark.parametrize("impl", ["select_mask", "cat_kthvalue", "cat_topk"])
@pytest.mark.parametrize("device,shapes", _cases(roberta_base_shapes(scale=1 / 12, layers=1)))
def bench_select(benchmark, stream_reference, impl, device, shapes):
    device = torch.device(device)
    scores = _scores(shapes, device)
    n = sum(s.numel() for s in scores.values())
    k = round(0.1 * n)
    if impl == "select_mask":
        run = lambda: masks.select_mask(scores, 0.1)  # noqa: E731
    elif impl == "cat_kthvalue":
        run = lambda: torch.kthvalue(torch.cat([s.reshape(-1) for s in scores.values()]), n - k + 1)  # noqa: E731
    else:
        run = lambda: torch.topk(torch.cat([s.reshape(-1) for s in scores.values()]), k)  # noqa: E731
    measure.reset_peak_memory(device)
    benchmark(measure.synchronized(run, device))
    _record(benchmark, stream_reference, device, 3 * SELECT_PASS_BYTES * n, n)
    assert_selects_the_top_k(impl, run(), scores, k)


def assert_selects_the_top_k(impl, result, scores, k):
    """Each implementation finds the k-th largest score (sorted here): ``select_mask`` keeps k
    entries, none below it and none above it dropped; kthvalue returns it; topk k values down to it."""
    flat = torch.cat([s.reshape(-1) for s in scores.values()])
    kth = torch.sort(flat, descending=True).values[k - 1]
    if impl == "select_mask":
        kept = torch.cat([result[name].reshape(-1) for name in scores])
        assert int(kept.sum()) == k and bool((flat[kept] >= kth).all()) and bool((flat[~kept] <= kth).all())
    elif impl == "cat_kthvalue":
        assert result.values == kth
    else:
        assert result.values.numel() == k and result.values.min() == kth
