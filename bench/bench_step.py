"""pytest-benchmark suite: one optimizer step of torch AdamW, the childopt optimizers and the ChildTuning loop.

``pytest bench --benchmark-enable`` times them; in CI (``--benchmark-disable`` in addopts) each
runs once as a smoke test.  CPU cases step a tiny roberta-like parameter list and 200 tiny
tensors, the childopt rows on the reference and native backends; ``cuda`` cases step
roberta-base, a 1.26B decoder and many tiny tensors on the backend ``auto`` picks.  The smoke run
keeps one case per row and device: roberta-tiny (childopt rows on native) and roberta-base.
Every case records :func:`childopt.bench.step.measure_row`'s measurements and the percentage of
the same run's copy bandwidth in ``benchmark.extra_info``, then checks what the steps did.
"""
from typing import Optional

import pytest
import torch

from childopt import backends
from childopt.bench import measure, step
from childopt.bench.shapes import decoder_1b_shapes, make_params, many_tiny_shapes, roberta_base_shapes

SPECS = {spec.key: spec for spec in step.ROWS}
KEYS = ("adamw-foreach", "adamw-fused", "adamw-8bit", "masked-none", "masked-dense-freeze", "masked-bernoulli",
        "childtuning-f", "childtuning-f-loop", "masked-sparse-0.05")
CPU_SHAPES = {"roberta-tiny": roberta_base_shapes(scale=1 / 12, layers=1), "many-tiny": many_tiny_shapes(200)}


def _fixed_mask(state: dict, param: torch.Tensor) -> Optional[torch.Tensor]:
    """The bool mask a dense ``mask`` or sparse ``indices`` in the optimizer state fixes, else None."""
    if "mask" in state:
        return state["mask"]
    if "indices" not in state:
        return None
    selected = torch.zeros(param.numel(), dtype=torch.bool, device=param.device)
    selected[state["indices"].long()] = True
    return selected.reshape(param.shape)


def assert_stepped(opt, params, before) -> None:
    """Every parameter is finite; under a fixed mask (freeze, sparse storage) the entries outside it
    are bit-identical and every selected entry moved; otherwise every entry moved (weight decay
    alone moves the ones a Bernoulli draw dropped at every step)."""
    for param, p0 in zip(params, before):
        p = param.detach()
        assert torch.isfinite(p).all()
        kept = _fixed_mask(opt.state[param], p)
        if kept is None:
            assert (p != p0).all()
        else:
            assert torch.equal(p[~kept], p0[~kept]) and (p[kept] != p0[kept]).all()


def _bench_step(benchmark, copy_gbps, key: str, shapes, device: torch.device, backend: Optional[str],
                steps: int) -> None:
    """Measure the row's step with the bench helpers, record it, hand the step to pytest-benchmark,
    then check the parameters the steps left."""
    spec = SPECS[key]
    params = make_params(shapes, device)
    before = [p.detach().clone() for p in params]
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
    assert_stepped(opt, params, before)


def _cpu_cases():
    """(key, shapes, backend) of the CPU grid: childopt rows on each backend, the others (torch,
    bitsandbytes, the ChildTuning loop) once, with backend None."""
    cases = []
    for key in KEYS:
        for name, shapes in CPU_SHAPES.items():
            for backend in (None,) if SPECS[key].backend else ("reference", "native"):
                smoke = name == "roberta-tiny" and backend != "reference"
                cases.append(pytest.param(key, shapes, backend, id="-".join(filter(None, (backend, name, key))),
                                          marks=() if smoke else pytest.mark.timing))
    return cases


@pytest.mark.parametrize("key,shapes,backend", _cpu_cases())
def bench_step_cpu(benchmark, copy_gbps, key, shapes, backend):
    if backend is not None:
        ok, why = backends.MODULES[backend].available(torch.device("cpu"))
        if not ok:
            pytest.skip(why)
    _bench_step(benchmark, copy_gbps, key, shapes, torch.device("cpu"), backend=backend, steps=3)


@pytest.mark.cuda
@pytest.mark.parametrize("key", KEYS)
@pytest.mark.parametrize("shapes", [pytest.param(roberta_base_shapes(), id="roberta-base"),
                                    pytest.param(decoder_1b_shapes(), id="decoder-1b", marks=pytest.mark.timing),
                                    pytest.param(many_tiny_shapes(), id="many-tiny", marks=pytest.mark.timing)])
def bench_step_cuda(benchmark, copy_gbps, key, shapes):
    _bench_step(benchmark, copy_gbps, key, shapes, torch.device("cuda"), backend="auto", steps=20)
