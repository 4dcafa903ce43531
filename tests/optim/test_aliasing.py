"""childopt.optim.aliasing against a brute-force oracle: the sets of bytes two strided views of one
storage cover.  hypothesis draws dtypes of two widths, shapes, strides (zero and interleaved
ones included) and storage offsets; the stride rules and the enumeration must both agree with it."""
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from childopt.optim import aliasing

SETTINGS = dict(deadline=None, database=None, derandomize=True, max_examples=400)


def covered_bytes(t: torch.Tensor) -> set:
    size = t.element_size()
    return {offset * size + j for offset in aliasing.element_offsets(t).tolist() for j in range(size)}


def span(t: torch.Tensor) -> tuple:
    size = t.element_size()
    last = t.storage_offset() + sum((n - 1) * s for n, s in zip(t.shape, t.stride()))
    return t.storage_offset() * size, (last + 1) * size


@st.composite
def views(draw, arena):
    dtype = draw(st.sampled_from([torch.float32, torch.bfloat16]))
    base = arena.view(dtype)
    shape = tuple(draw(st.lists(st.integers(1, 4), min_size=0, max_size=3)))
    stride = tuple(draw(st.integers(0, 7)) for _ in shape)
    extent = sum((n - 1) * s for n, s in zip(shape, stride)) + 1
    offset = draw(st.integers(0, base.numel() - extent))
    return base.as_strided(shape, stride, offset)


@settings(**SETTINGS)
@given(st.data())
def test_share_memory_is_a_common_byte_of_two_views_whose_spans_cross(data):
    arena = torch.zeros(64, dtype=torch.float32)
    a, b = data.draw(views(arena)), data.draw(views(arena))
    (a0, a1), (b0, b1) = span(a), span(b)
    if a0 < b1 and b0 < a1:
        assert aliasing.share_memory(a, b) == bool(covered_bytes(a) & covered_bytes(b))


@settings(**SETTINGS)
@given(st.data())
def test_overlaps_itself_is_an_address_reached_twice(data):
    t = data.draw(views(torch.zeros(64, dtype=torch.float32)))
    offsets = aliasing.element_offsets(t).tolist()
    assert aliasing.overlaps_itself(t) == (len(set(offsets)) < len(offsets))


def test_views_larger_than_one_chunk_are_judged_piece_by_piece(monkeypatch):
    """Column blocks of one buffer (a fused qkv weight split in three), enumerated in pieces."""
    monkeypatch.setattr(aliasing, "CHUNK", 64)
    fused = torch.zeros(40, 48)
    q, k, v = fused.chunk(3, dim=-1)
    assert not aliasing.share_memory(q, k) and not aliasing.share_memory(k, v)
    assert aliasing.share_memory(fused[:, 10:20], k)
    assert aliasing.share_memory(fused[39:, 47:], v)
