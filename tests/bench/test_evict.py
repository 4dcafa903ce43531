"""The cache evictor the step rows call ahead of each timed step: its buffer's size, from the
last-level cache, and that every call rewrites all of it."""
import pytest
import torch

from childopt.bench import evict
from childopt.bench.llc import CacheSize

CPU = torch.device("cpu")


def test_the_buffer_is_twice_the_cache_and_every_call_rewrites_all_of_it():
    evictor = evict.CacheEvictor(CPU, cache_bytes=4096)
    assert evictor.nbytes == evict.CACHES * 4096 == 8192
    for calls in (1, 2, 3):
        evictor()
        assert torch.equal(evictor._buffer, torch.full((2048,), calls, dtype=torch.int32))


def test_an_odd_cache_size_rounds_the_buffer_up_to_whole_elements():
    assert evict.CacheEvictor(CPU, cache_bytes=4097).nbytes == 8196


def test_without_a_size_it_takes_the_last_level_cache_of_the_device(monkeypatch):
    asked = []
    monkeypatch.setattr(evict, "last_level_cache", lambda device: asked.append(device) or CacheSize(1000, "made up"))
    assert evict.CacheEvictor(CPU).nbytes == 2000
    assert asked == [CPU]


@pytest.mark.parametrize("cache_bytes", [0, -64])
def test_a_cache_size_that_is_not_positive_is_refused_by_name(cache_bytes):
    with pytest.raises(ValueError, match=f"cache_bytes must be positive, got {cache_bytes}"):
        evict.CacheEvictor(CPU, cache_bytes=cache_bytes)
