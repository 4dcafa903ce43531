"""Host tensors to a CUDA device through pinned memory (childopt.transfer): the routing, checked
here on the host; tests/backends/test_cuda_lane.py proves on a GPU that an eager step never waits."""
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from childopt import transfer

CUDA = torch.device("cuda")


def test_a_plain_cpu_tensor_bound_for_cuda_goes_through_pinned_memory(monkeypatch):
    assert transfer.stages_through_pinned(torch.ones(3), CUDA)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    assert not transfer.stages_through_pinned(torch.ones(3), CUDA)  # a captured copy would outlive its source
    assert not transfer.stages_through_pinned(torch.ones(3), torch.device("cpu"))
    assert not transfer.stages_through_pinned(torch.ones(3), torch.device("meta"))
    assert not transfer.stages_through_pinned(torch.ones(3, device="meta"), CUDA)


def test_fake_tensors_and_compiled_graphs_keep_a_plain_copy():
    """A fake tensor (the memory planner traces the step under FakeTensorMode) has no pinned
    memory, and a compiled graph places its own copies."""
    with FakeTensorMode():
        assert not transfer.stages_through_pinned(torch.ones(3), CUDA)

    @torch.compile(backend="eager", fullgraph=True)
    def staged(t):
        return t + 1 if transfer.stages_through_pinned(t, CUDA) else t - 1

    torch._dynamo.reset()
    assert torch.equal(staged(torch.ones(2)), torch.zeros(2))


def test_the_same_device_returns_the_tensor_and_others_copy():
    t = torch.arange(4.0)
    assert transfer.to_device(t, "cpu") is t
    moved = transfer.to_device(t, "meta")
    assert moved.device.type == "meta" and moved.shape == t.shape


def test_a_copy_to_cuda_is_staged_in_its_own_pinned_block_then_queued(monkeypatch):
    """The CPU-side calls a CUDA copy makes (recorded, since this machine may have no GPU): a new
    pinned block holding the values (a strided source made dense), then a non-blocking copy."""
    calls, empty = [], torch.empty

    def unpinned_empty(*args, **kwargs):  # a CPU-only torch cannot pin
        calls.append(("empty", kwargs))
        return empty(*args, **{**kwargs, "pin_memory": False})

    monkeypatch.setattr(torch, "empty", unpinned_empty)
    monkeypatch.setattr(torch.Tensor, "to", lambda self, *a, **k: calls.append((self.clone(), a, k)) or self)
    source = torch.arange(6.0)[::2]
    transfer.to_device(source, "cuda")
    (made, kwargs), (staged, args, to_kwargs) = calls
    assert made == "empty" and kwargs == {"dtype": torch.float32, "pin_memory": True}
    assert torch.equal(staged, source) and staged.is_contiguous()
    assert (args, to_kwargs) == ((CUDA,), {"non_blocking": True})


@pytest.mark.cuda
@pytest.mark.parametrize("pinned", [False, True])
def test_a_pinned_copy_arrives_intact_without_a_host_sync(pinned):
    """No sync, and the source is free to change at once (even a pinned one is not read later)."""
    t = torch.arange(1 << 20, dtype=torch.float64)
    t = t.pin_memory() if pinned else t
    expected = t.clone()
    torch.cuda._sleep(10**7)  # keep the stream busy, so a late read of the source would see the write below
    torch.cuda.set_sync_debug_mode("error")
    try:
        moved = transfer.to_device(t, "cuda")
    finally:
        torch.cuda.set_sync_debug_mode(0)
    t.add_(1)
    assert torch.equal(moved.cpu(), expected)
