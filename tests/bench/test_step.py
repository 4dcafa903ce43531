"""The optimizer-step rows: the byte model they are charged by dtype, their comparison with torch
fused AdamW and the stream reference on made-up timings with the ratios worked out by hand, and
how rows that fail with bf16 parameters are skipped."""
import dataclasses

import pytest
import torch

from childopt.bench import shapes, step
from childopt.bench.measure import Unavailable
from tests.bench.helpers import BYTES_PER_ELEMENT, fake_row, fake_stream

SPECS = {spec.key: spec for spec in step.ROWS}
CPU = torch.device("cpu")


def test_compare_divides_by_torch_fused_and_the_stream_reference():
    """At a 40 GB/s stream and fused at 80 it/s: 50 it/s is 0.625x, 100 it/s 1.25x; 10 GB/s is 25%."""
    rows = [fake_row("adamw-foreach", "torch AdamW", "foreach", 50.0, 10.0),
            fake_row("adamw-fused", "torch AdamW", "fused", 80.0, 16.0),
            fake_row("masked-none", "MaskedAdamW", "mask=None", 100.0, 20.0)]
    compared, baseline = step.compare(rows, stream_gbps=40.0)
    assert baseline == "torch-fused"
    assert [r.x_fused for r in compared] == [0.625, 1.0, 1.25]
    assert [r.pct_stream for r in compared] == [25.0, 40.0, 50.0]


def test_compare_falls_back_to_foreach_without_a_fused_row():
    rows = [fake_row("adamw-foreach", "torch AdamW", "foreach", 50.0, 10.0),
            fake_row("masked-none", "MaskedAdamW", "mask=None", 100.0, 20.0)]
    compared, baseline = step.compare(rows, stream_gbps=40.0)
    assert baseline == "torch-foreach" and [r.x_fused for r in compared] == [1.0, 2.0]


def test_table_prints_each_row_s_share_of_the_stream_and_speed_ratio():
    compared, baseline = step.compare([fake_row("adamw-fused", "torch AdamW", "fused", 80.0, 16.0),
                                       fake_row("masked-none", "MaskedAdamW", "mask=None", 100.0, 20.0)], 40.0)
    assert "compute ms" not in step.format_table(compared, baseline)  # no row has one: no column of dashes
    compared[1] = dataclasses.replace(compared[1], compute_ms=4.25)
    table = step.format_table(compared, baseline).splitlines()
    assert table[0].split()[-7:] == ["%", "of", "stream", "compute", "ms", "x", "torch-fused"]
    assert table[2].split() == ["torch", "AdamW", "fused", "b", "80.00", "12.50", "1.000", "0.500", "16.0", "40%",
                                "-", "1.00x"]
    assert table[3].split() == ["MaskedAdamW", "mask=None", "b", "100.00", "10.00", "1.000", "0.500", "20.0", "50%",
                                "4.25", "1.25x"]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("key", BYTES_PER_ELEMENT["float32"])
def test_measure_row_charges_the_byte_model_of_the_dtype_and_steps_the_optimizer(key, dtype):
    """bytes_per_step is the row's bytes per element (by parameter and state dtype) times the
    elements; GB/s is those bytes per second; the row records its dtype and thread count."""
    params = shapes.make_params([(1000,)], CPU, dtype=step.DTYPES[dtype])
    assert params[0].grad.dtype == step.DTYPES[dtype]
    before = params[0].detach().clone()
    row = step.measure_row(SPECS[key], SPECS[key].make(params, "reference"), params, CPU, warmup=1, steps=2)
    assert (row.key, row.numel, row.steps, row.dtype, row.threads) == (key, 1000, 2, dtype, torch.get_num_threads())
    assert row.bytes_per_step == round(1000 * BYTES_PER_ELEMENT[dtype][key])
    assert row.gbps == pytest.approx(row.bytes_per_step * row.it_s / 1e9)
    assert row.ms_per_step == pytest.approx(1e3 / row.it_s)
    assert not torch.equal(params[0].detach(), before)


def _failing(dtype_ok):
    """A row whose optimizer raises on parameters of any dtype but ``dtype_ok``."""
    def make(params, backend):
        if params[0].dtype != dtype_ok:
            raise RuntimeError("no kernel for this dtype")
        return torch.optim.AdamW(params, fused=True)

    return step.RowSpec("failing", "Failing", "test", step.adamw_traffic(), make, backend="torch")


def test_rows_that_fail_with_bf16_parameters_are_skipped_with_the_reason(monkeypatch):
    unavailable = step.RowSpec("missing", "Missing", "test", step.adamw_traffic(),
                               lambda ps, backend: (_ for _ in ()).throw(Unavailable("needs a GPU")))
    monkeypatch.setattr(step, "ROWS", (SPECS["adamw-fused"], _failing(torch.float32), unavailable))
    rows, skipped = step.run_rows([(64,)], CPU, warmup=1, steps=1, dtype=torch.bfloat16)
    assert [r.key for r in rows] == ["adamw-fused"] and rows[0].dtype == "bfloat16"
    assert [(s["key"], s["reason"]) for s in skipped] == [
        ("failing", "fails with bfloat16 parameters: RuntimeError: no kernel for this dtype"),
        ("missing", "needs a GPU")]


def test_an_fp32_failure_is_not_hidden(monkeypatch):
    monkeypatch.setattr(step, "ROWS", (_failing(torch.bfloat16),))
    with pytest.raises(RuntimeError, match="no kernel"):
        step.run_rows([(64,)], CPU, warmup=1, steps=1)


def test_run_table_steps_the_named_size_and_dtype_at_the_current_threads(monkeypatch):
    caches = []
    monkeypatch.setattr(step, "measure_compute", lambda make, dtype, cache_bytes, **kw: caches.append(cache_bytes)
                        or 0.5)
    monkeypatch.setitem(step.SIZES, "24m", (1 / 24, 1))
    monkeypatch.setattr(step, "ROWS", (SPECS["adamw-fused"], SPECS["masked-none"]))
    table = step.run_table("24m", torch.bfloat16, fake_stream(50.0), CPU, warmup=1, steps=1, backend="reference")
    numel = sum(torch.Size(s).numel() for s in shapes.roberta_base_shapes(1 / 24, 1))
    assert (table.size, table.dtype, table.threads, table.baseline) == ("24m", "bfloat16", torch.get_num_threads(),
                                                                        "torch-fused")
    fused, masked = table.rows
    assert fused.numel == numel and fused.x_fused == 1.0 and masked.x_fused == pytest.approx(masked.it_s / fused.it_s)
    assert masked.pct_stream == pytest.approx(100 * masked.gbps / 50.0)
    assert masked.bytes_per_step == round(22 * numel) and fused.bytes_per_step == 14 * numel
    # the in-cache time, measured with one instance of the stream's cache, scaled to the row's elements
    assert [r.compute_ms for r in table.rows] == [0.5 * numel / 1e6] * 2
    assert caches == [2000, 2000]


def test_no_compute_ceiling_when_the_cache_size_was_assumed(monkeypatch):
    monkeypatch.setitem(step.SIZES, "24m", (1 / 24, 1))
    monkeypatch.setattr(step, "ROWS", (SPECS["adamw-fused"],))
    table = step.run_table("24m", torch.float32, fake_stream(50.0, llc_known=False), CPU, warmup=1, steps=1)
    assert [r.compute_ms for r in table.rows] == [None]


def test_run_row_adds_the_in_cache_time_on_cpu_given_the_cache_size_except_to_compiled_rows(monkeypatch):
    """It is measured with the row's own optimizer, dtype and cache size (the published loop with
    its gradients restored) and scaled to the row's elements; compiled rows and runs without a
    cache size get none, and a failure warns and keeps the measured row."""
    calls = []

    def fake_compute(make, dtype, cache_bytes, *, restore_grads=False):
        calls.append((type(make(shapes.make_params([(8,)], CPU))).__name__, dtype, cache_bytes, restore_grads))
        return 0.5

    monkeypatch.setattr(step, "measure_compute", fake_compute)
    monkeypatch.setattr(step, "measure_row",
                        lambda spec, opt, params, device, **kw: fake_row(spec.key, "o", "m", 1.0, 1.0))
    compiled = next(spec for spec in step.ROWS if spec.compiled)
    assert step.run_row(compiled, [(64,)], CPU, warmup=1, steps=1, cache_bytes=4000).compute_ms is None
    assert step.run_row(SPECS["adamw-fused"], [(64,)], CPU, warmup=1, steps=1).compute_ms is None
    assert calls == []
    row = step.run_row(SPECS["childtuning-f-loop"], [(64,)], CPU, warmup=1, steps=1, dtype=torch.bfloat16,
                       cache_bytes=4000)
    assert calls == [("ChildTuningReferenceAdamW", torch.bfloat16, 4000, True)]
    assert (row.compute_ns_per_element, row.compute_ms) == (0.5, 0.5 * row.numel / 1e6)

    def failing(*args, **kwargs):
        raise RuntimeError("no kernel for this list")

    monkeypatch.setattr(step, "measure_compute", failing)
    with pytest.warns(RuntimeWarning, match="adamw-fused: no in-cache time: RuntimeError: no kernel for this list"):
        row = step.run_row(SPECS["adamw-fused"], [(64,)], CPU, warmup=1, steps=1, cache_bytes=4000)
    assert row.key == "adamw-fused" and row.compute_ms is None


class CountingEvictor:
    """Stands in for :class:`childopt.bench.evict.CacheEvictor`: records its calls in ``log``."""

    def __init__(self, log, nbytes=250_000_000):
        self.log, self.nbytes = log, nbytes

    def __call__(self):
        self.log.append("evict")


def test_each_timed_step_follows_an_eviction_after_the_gradients_are_put_back(monkeypatch):
    """The published loop scales its gradients, so they are restored first, then the cache is
    evicted, once per timed step (never in the warm-up); the peak leaves out the evictor's buffer."""
    log = []
    real_restorer = step.grad_restorer

    def logged_restorer(params):
        restore = real_restorer(params)
        return lambda: log.append("restore") or restore()

    monkeypatch.setattr(step, "grad_restorer", logged_restorer)
    monkeypatch.setattr(step, "peak_memory_gb", lambda device: 1.75)
    spec = SPECS["childtuning-f-loop"]
    params = shapes.make_params([(1000,)], CPU)
    opt = spec.make(params, "reference")
    original = opt.step
    monkeypatch.setattr(opt, "step", lambda: log.append("step") or original())
    row = step.measure_row(spec, opt, params, CPU, warmup=2, steps=3, evictor=CountingEvictor(log))
    assert log == ["restore", "step"] * 2 + ["restore", "evict", "step"] * 3
    assert row.peak_gb == pytest.approx(1.5)
    # where the peak cannot be windowed (counted from process start, maybe before the buffer), it is left whole
    monkeypatch.setattr(step, "reset_peak_memory", lambda device: False)
    row = step.measure_row(spec, opt, params, CPU, warmup=1, steps=1, evictor=CountingEvictor([]))
    assert row.peak_gb == pytest.approx(1.75)


def test_run_table_evicts_twice_the_cache_its_stream_reference_was_sized_by(monkeypatch):
    evictors = []
    real_measure_row = step.measure_row

    def recording(*args, evictor=None, **kwargs):
        evictors.append(evictor)
        return real_measure_row(*args, evictor=evictor, **kwargs)

    monkeypatch.setattr(step, "measure_row", recording)
    monkeypatch.setitem(step.SIZES, "24m", (1 / 24, 1))
    monkeypatch.setattr(step, "ROWS", (SPECS["adamw-fused"], SPECS["masked-none"]))
    step.run_table("24m", torch.float32, fake_stream(50.0, llc_known=False), CPU, warmup=1, steps=1)
    assert len(evictors) == 2 and evictors[0] is evictors[1]
    assert isinstance(evictors[0], step.CacheEvictor) and evictors[0].nbytes == 2 * 4000
