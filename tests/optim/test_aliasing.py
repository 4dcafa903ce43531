"""childopt.optim.aliasing against a brute-force oracle: the sets of bytes two strided views of one
storage cover.  hypothesis draws dtypes of two widths, shapes, strides (zero and interleaved
ones included) and storage offsets; the stride rules and the enumeration must both agree with it."""
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from childopt.optim import aliasing

SETTINGS = dict(deadline=None, database=None, derandomize=True, max_examples=400)


def element_offsets(t: torch.Tensor) -> torch.Tensor:
    """The oracle's storage offsets of ``t``'s elements: every index combination, broadcast."""
    offsets = torch.full((), t.storage_offset(), dtype=torch.int64)
    for size, stride in zip(t.shape, t.stride()):
        offsets = offsets.unsqueeze(-1) + torch.arange(size, dtype=torch.int64) * stride
    return offsets.reshape(-1)


def covered_bytes(t: torch.Tensor) -> set:
    size = t.element_size()
    return {offset * size + j for offset in element_offsets(t).tolist() for j in range(size)}


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
    offsets = element_offsets(t).tolist()
    assert aliasing.overlaps_itself(t) == (len(set(offsets)) < len(offsets))


def test_views_larger_than_one_chunk_are_judged_piece_by_piece(monkeypatch):
    """Column blocks of one buffer (a fused qkv weight split in three), enumerated in pieces."""
    monkeypatch.setattr(aliasing, "CHUNK", 64)
    fused = torch.zeros(40, 48)
    q, k, v = fused.chunk(3, dim=-1)
    assert not aliasing.share_memory(q, k) and not aliasing.share_memory(k, v)
    assert aliasing.share_memory(fused[:, 10:20], k)
    assert aliasing.share_memory(fused[39:, 47:], v)


def test_addresses_come_in_bounded_pieces_whatever_the_layout(monkeypatch):
    """A view with rows wider than a piece (or a 0-d one) is still enumerated CHUNK at a time."""
    monkeypatch.setattr(aliasing, "CHUNK", 16)
    buffer = torch.zeros(2, 100)
    for view, unit in ((buffer[:, 3:90], 4), (buffer[:, 3:90], 1), (buffer[1, 5], 4)):
        pieces = list(aliasing._addresses(view, unit))
        assert all(piece.numel() <= 16 for piece in pieces)
        scale = 4 // unit
        expected = (element_offsets(view).unsqueeze(-1) * scale + torch.arange(scale)).reshape(-1)
        assert torch.equal(torch.cat(pieces), expected)


def test_a_parameter_moved_since_it_was_added_leaves_its_old_memory_free():
    """model.to(dtype) replaces .data: a new parameter may get the old address (here forced)."""
    from childopt import MaskedAdamW

    held = torch.nn.Parameter(torch.randn(8))
    opt = MaskedAdamW([held], lr=1e-2, seed=0)
    old = held.data
    held.data = old.to(torch.bfloat16)
    opt.add_param_group({"params": [torch.nn.Parameter(old)]})
    assert len(opt.param_groups) == 2


def test_layouts_are_judged_on_the_cpu_whatever_the_default_device():
    fused = torch.zeros(8, 12)
    with torch.device("meta"):
        assert not aliasing.share_memory(fused[:, :6], fused[:, 6:])
        assert aliasing.overlaps_itself(fused.as_strided((2, 3), (1, 1)))
