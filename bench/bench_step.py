"""pytest-benchmark suite: one optimizer step of torch AdamW, the childopt optimizers and the ChildTuning loop.

``pytest bench --benchmark-enable`` times them; in CI (``--benchmark-disable`` in addopts) each
runs once as a smoke test.  CPU cases step a tiny roberta-like parameter list on the reference
and native backends; ``cuda`` cases step roberta-base, a 1.26B decoder and many tiny tensors on the backend ``auto``
picks.  Every case records :func:`childopt.bench.step.measure_row`'s measurements and the percentage
of the same run's copy bandwidth in ``benchmark.extra_info``.
"""
import pytest
import torch

from childopt import backends
from childopt.bench import measure, step
from childopt.bench.shapes import decoder_1b_shapes, make_params, many_tiny_shapes, roberta_base_shapes

SPECS = {spec.key: spec for spec in step.ROWS}
KEYS = ("adamw-foreach", "adamw-fused", "adamw-8bit", "masked-none", "masked-dense-freeze", "masked-bernoulli",
        "childtuning-f", "childtuning-f-loop", "masked-sparse-0.05")
TINY_SHAPES = roberta_base_shapes(scale=1 / 12, layers=1)


def _bench_step(benchmark, copy_gbps, key: str, shapes, device: torch.device, backend: str, steps: int) -> None:
    """Measure the row's step with the bench helpers, record it, then hand the step to pytest-benchmark."""
    spec = SPECS[key]
    params = make_params(shapes, device)
    try:
        opt = spec.make(params, backend)
    except measure.Unavailable as exc:
        pytest.skip(str(exc))
    row = step.measure_row(spec, opt, params, device, warmup=measure.WARMUP, steps=steps)
    copy = copy_gbps(row.numel, device)
    benchmark.extra_info.update(backend=row.backend, it_s=row.it_s, peak_gb=row.peak_gb,
                                bytes_per_step=row.bytes_per_step, gbps=row.gbps, copy_gbps=copy,
                                pct_copy_bw=100.0 * row.gbps / copy)
    benchmark(measure.synchronized(opt.step, device))


@pytest.mark.parametrize("key", KEYS)
@pytest.mark.parametrize("shapes", [TINY_SHAPES, many_tiny_shapes(200)], ids=["roberta-tiny", "many-tiny"])
@pytest.mark.parametrize("backend", ["reference", "native"])
def bench_step_cpu(benchmark, copy_gbps, key, shapes, backend):
    if backend != "reference" and SPECS[key].backend:
        pytest.skip(f"{key} runs on {SPECS[key].backend}; the backend applies to childopt rows")
    ok, why = backends.MODULES[backend].available(torch.device("cpu"))
    if not ok:
        pytest.skip(why)
    _bench_step(benchmark, copy_gbps, key, shapes, torch.device("cpu"), backend=backend, steps=3)


@pytest.mark.cuda
@pytest.mark.parametrize("key", KEYS)
@pytest.mark.parametrize("shapes", [roberta_base_shapes(), decoder_1b_shapes(), many_tiny_shapes()],
                         ids=["roberta-base", "decoder-1b", "many-tiny"])
def bench_step_cuda(benchmark, copy_gbps, key, shapes):
    _bench_step(benchmark, copy_gbps, key, shapes, torch.device("cuda"), backend="auto", steps=20)
