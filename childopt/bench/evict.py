"""Push a step's data out of the last-level cache before it is timed, as training does.

Between two optimizer steps, training runs a forward and a backward pass that stream far more
than the last-level cache, so a step starts with its data in memory.  Timed back to back, a step
whose data fits the cache is timed warm and looks faster than it is in training: sparse storage
at 1% touches about 19 MB on the 24m list (0.23M scattered 64-byte lines of the parameters plus
its compact state), which a 32 MiB L3 keeps between steps; measured on the 2-core Zen 5 VM at 2
threads, its step took 1.2-1.5 ms back to back and 2.0-2.5 ms with the cache evicted first.
Steps whose data is many times the cache (the dense rows) cost the same either way.

:class:`CacheEvictor` rewrites a buffer twice the last-level cache
(:func:`childopt.bench.llc.last_level_cache`, every instance together; the CUDA L2 on a GPU)
with a read-modify-write pass on every intra-op thread, so each cache line is brought in and
replaced, and synchronizes on CUDA so its kernel is not inside the next timed window.  The
benchmarks call it, untimed, ahead of every timed step.
"""
from __future__ import annotations

import torch

from childopt.bench.llc import last_level_cache

# Buffer size in last-level caches: one pass over twice the cache leaves none of what was there
# before, whatever the replacement policy keeps of the first half.
CACHES = 2


class CacheEvictor:
    """``evictor()`` replaces the contents of ``device``'s last-level cache; ``nbytes`` is its buffer's
    size, live as long as the evictor (peak-memory figures subtract it)."""

    def __init__(self, device: torch.device, cache_bytes: int | None = None):
        cache_bytes = last_level_cache(device).bytes if cache_bytes is None else cache_bytes
        if cache_bytes <= 0:
            raise ValueError(f"cache_bytes must be positive, got {cache_bytes}")
        self.device = device
        # int32, so that adding 1 at every call can wrap around but never turns into inf or NaN
        self._buffer = torch.zeros(-(-CACHES * cache_bytes // 4), dtype=torch.int32, device=device)

    @property
    def nbytes(self) -> int:
        return self._buffer.nbytes

    def __call__(self) -> None:
        self._buffer.add_(1)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
