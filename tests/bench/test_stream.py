"""The in-place stream reference: buffer sizes against the cache, the bytes each kernel is charged,
the labelled torch approximation when childopt._C has no stream, and what a pass computes."""
import types

import pytest
import torch

from childopt.bench import stream
from childopt.bench.llc import CacheSize

CPU = torch.device("cpu")
MIB = CacheSize(2**20, "made up")


def test_buffers_span_four_caches_and_at_least_the_parameter_list():
    assert stream.stream_numel(2**20) == 4 * 2**20 // 16  # four fp32 buffers together = 4 MiB
    assert stream.stream_numel(2**20, min_numel=10**6) == 10**6
    assert stream.stream_numel(100) == 25


def test_without_childopt_c_the_torch_approximation_is_labelled_and_charged_36_bytes(monkeypatch):
    monkeypatch.setattr(stream, "_native_module", lambda build=False: (None, "not built yet for this torch"))
    kernel = stream.stream_kernel(CPU)
    assert kernel.approximate and kernel.bytes_per_element == 36
    assert kernel.label.startswith("APPROXIMATION") and "not built yet for this torch" in kernel.label
    monkeypatch.setattr(stream, "_native_module", lambda build=False: (types.SimpleNamespace(), "cached"))
    assert "has no _inplace_stream" in stream.stream_kernel(CPU).label


def test_childopt_c_s_one_pass_is_used_and_charged_28_bytes(monkeypatch):
    calls = []
    module = types.SimpleNamespace(_inplace_stream=lambda *tensors: calls.append(len(tensors)))
    monkeypatch.setattr(stream, "_native_module", lambda build=False: (module, "cached"))
    kernel = stream.stream_kernel(CPU)
    assert not kernel.approximate and kernel.bytes_per_element == 28 and "_inplace_stream" in kernel.label
    reference = stream.measure_stream(CPU, warmup=1, steps=2, llc=MIB, kernel=kernel)
    assert calls == [4, 4, 4] and not reference.approximate


def test_gb_per_s_counts_the_bytes_the_kernel_moves_over_the_median_pass(monkeypatch):
    """36 B x 262144 elements in a median of 2 ms: 4.72 GB/s; the cache, threads and sizes are recorded."""
    monkeypatch.setattr(stream, "time_calls", lambda fn, steps: [0.001, 0.002, 0.003])
    kernel = stream.StreamKernel(stream._torch_pass, 36, "torch", approximate=True)
    reference = stream.measure_stream(CPU, warmup=1, steps=3, llc=MIB, kernel=kernel)
    assert reference.numel == 262144 and reference.footprint_bytes == 4 * 2**20
    assert reference.gbps == pytest.approx(36 * 262144 / 0.002 / 1e9)
    assert (reference.threads, reference.llc_bytes, reference.llc_source) == (torch.get_num_threads(), 2**20, "made up")
    assert "4.0x the last-level cache of 1 MiB, made up" in reference.describe()
    assert reference.llc_known and reference.llc_instance_bytes is None


def test_the_reference_records_whether_its_cache_size_was_known_and_one_instance_s_size(monkeypatch):
    monkeypatch.setattr(stream, "time_calls", lambda fn, steps: [0.001])
    kernel = stream.StreamKernel(stream._torch_pass, 36, "torch", approximate=True)
    assumed = CacheSize(2**20, "unknown: assumed", known=False)
    split = CacheSize(2**20, "two instances", instance_bytes=2**19)
    assert not stream.measure_stream(CPU, warmup=0, steps=1, llc=assumed, kernel=kernel).llc_known
    assert stream.measure_stream(CPU, warmup=0, steps=1, llc=split, kernel=kernel).llc_instance_bytes == 2**19


def test_the_torch_pass_adds_g_to_m_and_v_then_m_to_p():
    p, g, m, v = torch.tensor([1.0, 2.0]), torch.tensor([0.5, -1.0]), torch.tensor([1.0, 1.0]), torch.zeros(2)
    stream._torch_pass(p, g, m, v)
    assert p.tolist() == [2.5, 2.0] and m.tolist() == [1.5, 0.0] and v.tolist() == [0.5, -1.0]


def test_a_real_measurement_gives_positive_bandwidth_at_the_current_threads():
    reference = stream.measure_stream(CPU, warmup=1, steps=2, llc=MIB)
    assert reference.gbps > 0 and reference.numel == 262144
    assert reference.bytes_per_element == (36 if reference.approximate else 28)


def test_the_native_stream_computes_what_the_byte_model_charges():
    """Where childopt._C has ``_inplace_stream``: one pass does m += g; v += g; p += m (reads four
    tensors, writes three), like the torch pass, on a size that spans several chunks."""
    from childopt import _native

    module, why = _native.try_load(build=False)
    if module is None or not hasattr(module, "_inplace_stream"):
        pytest.skip(f"childopt._C has no _inplace_stream here ({why})")
    gen = torch.Generator().manual_seed(0)
    ours = [torch.randn(100_003, generator=gen) for _ in range(4)]
    oracle = [t.clone() for t in ours]
    assert module._inplace_stream(*ours) is None
    stream._torch_pass(*oracle)
    for got, want in zip(ours, oracle):
        assert torch.equal(got, want)


def test_a_native_run_builds_childopt_c_before_its_stream_reference_and_auto_never_builds(monkeypatch):
    """--backend native would build childopt._C at its first row; its reference must not fall back
    to the approximation because it was measured first.  auto never starts a compile."""
    from childopt.bench import sweep

    asked = []
    monkeypatch.setattr(stream, "_native_module", lambda build=False: asked.append(build) or (None, "not built"))
    monkeypatch.setattr(sweep, "measure_stream", lambda *a, **k: None)
    empty = sweep.step.Table("24m", "float32", 1, None, [], [], "")
    monkeypatch.setattr(sweep.step, "run_table", lambda *a, **k: empty)
    for backend in ("native", "auto"):
        sweep.run_tables(["24m"], ["float32"], [1], CPU, warmup=1, steps=1, backend=backend)
    assert asked == [True, False]
