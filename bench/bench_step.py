"""pytest-benchmark suite: one optimizer step of torch AdamW, the childopt optimizers and the ChildTuning loop.

``pytest bench --benchmark-enable`` times them; in CI (``--benchmark-disable`` in addopts) each
runs once as a smoke test.  CPU cases step a tiny roberta-like parameter list, 200 tiny tensors
and the report's roberta-base-shaped lists of 24.3M and 125M elements (the 125M ones also marked
``slow``), with fp32 and bf16 parameters and gradients, the childopt rows on the reference and
native backends; ``cuda`` cases step roberta-base (fp32 and bf16), a 1.26B decoder and many tiny
tensors on the backend ``auto`` picks.  The smoke run keeps one case per row, dtype and device:
roberta-tiny (childopt rows on native) and roberta-base.  Every case records
:func:`childopt.bench.step.measure_row`'s measurements and its share of the in-place stream
reference (:mod:`childopt.bench.stream`, same thread count) in ``benchmark.extra_info``, times
each call after an untimed eviction of the last-level cache as the report does, then checks what
the steps did.
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
# name -> (shapes, dtypes, marks of its cases besides the smoke one).
CPU_SHAPES = {"roberta-tiny": (roberta_base_shapes(scale=1 / 12, layers=1), ("float32", "bfloat16"), ()),
              "many-tiny": (many_tiny_shapes(200), ("float32",), ()),
              "roberta-24m": (roberta_base_shapes(*step.SIZES["24m"]), ("float32", "bfloat16"), ()),
              "roberta-125m": (roberta_base_shapes(*step.SIZES["125m"]), ("float32", "bfloat16"), (pytest.mark.slow,))}
# Timed calls per case (pytest-benchmark's own calibration has no untimed setup between calls).
ROUNDS = {"cpu": 10, "cuda": 50}
# An AdamW step of lr 1e-3 moves a bf16 entry only where that exceeds half its ulp: surely below
# |p| = 0.25 (ulp 2^-10).  Bernoulli rows leave an entry unmoved until it is first drawn (0.7^7
# of them after the 7 steps of a smoke case), so at least 80% of those entries must move.
BF16_MOVES_BELOW = 0.25
BF16_MOVED_SHARE = 0.8


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
    are bit-identical.  fp32: every selected entry (every entry without a fixed mask) moved, weight
    decay alone moving the ones a Bernoulli draw dropped at every step; bf16: over the whole list,
    at least ``BF16_MOVED_SHARE`` of the selected entries below ``BF16_MOVES_BELOW`` in magnitude moved."""
    small = moved_small = 0
    for param, p0 in zip(params, before):
        p = param.detach()
        assert torch.isfinite(p).all()
        kept = _fixed_mask(opt.state[param], p)
        if kept is not None:
            assert torch.equal(p[~kept], p0[~kept])
        else:
            kept = torch.ones_like(p, dtype=torch.bool)
        moved = p[kept] != p0[kept]
        if p.dtype == torch.float32:
            assert moved.all()
        else:
            below = p0[kept].abs() < BF16_MOVES_BELOW
            small, moved_small = small + int(below.sum()), moved_small + int(moved[below].sum())
    if small:
        assert moved_small >= BF16_MOVED_SHARE * small, (moved_small, small)


def _bench_step(benchmark, stream_reference, cache_evictor, key: str, shapes, device: torch.device,
                backend: Optional[str], steps: int, dtype: str = "float32") -> None:
    """Measure the row's step with the bench helpers, record it, hand the step to pytest-benchmark
    (``ROUNDS`` timed calls, each after the report's untimed setup: the gradients put back where the
    row scales them, the last-level cache evicted), then check the parameters the steps left."""
    spec = SPECS[key]
    params = make_params(shapes, device, dtype=step.DTYPES[dtype])
    before = [p.detach().clone() for p in params]
    try:
        opt = spec.make(params, backend)
    except measure.Unavailable as exc:
        pytest.skip(str(exc))
    evictor = cache_evictor(device)
    restore = measure.grad_restorer(params) if spec.scales_grads else None  # the gradients as set, before any step
    row = step.measure_row(spec, opt, params, device, warmup=measure.WARMUP, steps=steps, evictor=evictor)
    reference = stream_reference(row.numel, device)
    benchmark.extra_info.update(backend=row.backend, dtype=row.dtype, threads=row.threads, it_s=row.it_s,
                                peak_gb=row.peak_gb, bytes_per_step=row.bytes_per_step, gbps=row.gbps,
                                stream_gbps=reference.gbps, stream_kernel=reference.kernel,
                                pct_stream=100.0 * row.gbps / reference.gbps)
    benchmark.pedantic(measure.synchronized(opt.step, device), setup=step.before_timed(restore, evictor),
                       rounds=ROUNDS[device.type])
    assert_stepped(opt, params, before)


def _cpu_cases():
    """(key, shapes, backend, dtype) of the CPU grid: childopt rows on each backend, the others
    (torch, bitsandbytes, the ChildTuning loop) once, with backend None."""
    cases = []
    for key in KEYS:
        for name, (shapes, dtypes, marks) in CPU_SHAPES.items():
            for dtype in dtypes:
                for backend in (None,) if SPECS[key].backend else ("reference", "native"):
                    smoke = name == "roberta-tiny" and backend != "reference"
                    tag = None if dtype == "float32" else dtype
                    cases.append(pytest.param(key, shapes, backend, dtype,
                                              id="-".join(filter(None, (backend, name, tag, key))),
                                              marks=marks if smoke else (pytest.mark.timing, *marks)))
    return cases


@pytest.mark.parametrize("key,shapes,backend,dtype", _cpu_cases())
def bench_step_cpu(benchmark, stream_reference, cache_evictor, key, shapes, backend, dtype):
    if backend is not None:
        ok, why = backends.MODULES[backend].available(torch.device("cpu"))
        if not ok:
            pytest.skip(why)
    _bench_step(benchmark, stream_reference, cache_evictor, key, shapes, torch.device("cpu"), backend=backend, steps=3,
                dtype=dtype)


@pytest.mark.cuda
@pytest.mark.parametrize("key", KEYS)
@pytest.mark.parametrize("shapes,dtype", [
    pytest.param(roberta_base_shapes(), "float32", id="roberta-base"),
    pytest.param(roberta_base_shapes(), "bfloat16", id="roberta-base-bfloat16"),
    pytest.param(decoder_1b_shapes(), "float32", id="decoder-1b", marks=pytest.mark.timing),
    pytest.param(many_tiny_shapes(), "float32", id="many-tiny", marks=pytest.mark.timing)])
def bench_step_cuda(benchmark, stream_reference, cache_evictor, key, shapes, dtype):
    _bench_step(benchmark, stream_reference, cache_evictor, key, shapes, torch.device("cuda"), backend="auto", steps=20,
                dtype=dtype)
