"""The benchmark's roofline reference (csrc/cpu/inplace_stream.cpp): the traffic of an AdamW step
(reads p, g, m, v; writes p, m, v) in one pass.  Its arithmetic is checked against torch so the
pass cannot silently skip a stream, which would inflate the reference bandwidth."""
import pytest
import torch


@pytest.mark.parametrize("numel", [1, 1031, 3 * 32768 + 5])
def test_the_stream_reads_every_input_and_writes_p_m_v(native_module, numel):
    torch.manual_seed(0)
    p, g, m, v = (torch.randn(numel) for _ in range(4))
    want_m, want_v = m + g, v + g
    want_p = p + want_m
    g_before = g.clone()
    native_module._inplace_stream(p, g, m, v)
    assert torch.equal(m, want_m) and torch.equal(v, want_v) and torch.equal(p, want_p)
    assert torch.equal(g, g_before)


@pytest.mark.parametrize("bad", ["dtype", "size", "stride"])
def test_bad_buffers_are_refused_by_name(native_module, bad):
    p, g, m, v = (torch.zeros(64) for _ in range(4))
    if bad == "dtype":
        m = torch.zeros(64, dtype=torch.float64)
    elif bad == "size":
        m = torch.zeros(63)
    else:
        m = torch.zeros(128)[::2]
    with pytest.raises(RuntimeError, match="m must be a contiguous float32 CPU tensor of 64 elements"):
        native_module._inplace_stream(p, g, m, v)
