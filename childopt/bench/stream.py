"""The roofline reference of the optimizer-step rows: an in-place stream with an AdamW step's own
shape of traffic, on buffers several times larger than the last-level cache.

An AdamW step reads p, g, m and v and writes p, m and v back in place: four read streams, three
of them read-modify-write, no write-allocate (every line written was read first), 28 B per fp32
element.  ``dst.copy_(src)``, the earlier yardstick, pays write-allocate traffic that such a step
does not and, on buffers of the parameter list's size, can partly fit the last-level cache, so a
step could show over 100% of it.  The reference here is ``childopt._C._inplace_stream(p, g, m, v)``
(one parallel pass over torch's intra-op threads doing ``m += g; v += g; p += m``: the step's
traffic with next to no arithmetic) on fp32 buffers of at least :data:`LLC_MULTIPLE` times the
last-level cache together, and at least the parameter list's size.  Where childopt._C is not
built, or on CUDA (the native stream is a CPU kernel), three torch in-place adds stand in
(``m.add_(g); v.add_(g); p.add_(m)``): three passes moving 36 B per element, labelled an
approximation; its GB/s counts the 36 B it moves.

A row's "% of stream" is its effective GB/s (its byte model over its time) over the reference's.
"""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from childopt.bench.llc import CacheSize, last_level_cache
from childopt.bench.measure import synchronized, time_calls

# The buffers p, g, m, v together span at least this many last-level caches.
LLC_MULTIPLE = 4
BUFFERS = 4
ELEMENT_BYTES = 4  # fp32
# Bytes per element one pass moves: the native pass reads p, g, m, v and writes p, m, v; each of
# the three torch adds reads two tensors and writes one.
NATIVE_BYTES = 7 * ELEMENT_BYTES
TORCH_BYTES = 3 * 3 * ELEMENT_BYTES


@dataclass(frozen=True)
class StreamKernel:
    """One pass over (p, g, m, v), the bytes per element it moves, and what it is."""

    run: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], object]
    bytes_per_element: int
    label: str
    approximate: bool


@dataclass(frozen=True)
class StreamReference:
    """The reference's measurement: GB/s of the bytes its kernel moves, on ``numel`` elements per
    buffer, at ``threads`` intra-op threads, with the cache figure the size was chosen from
    (``llc_known``: False when no source gave one and a default stood in; ``llc_instance_bytes``:
    one instance's size, None when not known)."""

    gbps: float
    numel: int
    bytes_per_element: int
    kernel: str
    approximate: bool
    threads: int
    llc_bytes: int
    llc_source: str
    llc_known: bool = True
    llc_instance_bytes: Optional[int] = None

    @property
    def footprint_bytes(self) -> int:
        """Bytes of the four buffers together."""
        return BUFFERS * ELEMENT_BYTES * self.numel

    def describe(self) -> str:
        """One line: GB/s, kernel, buffer sizes against the cache and where its size came from."""
        return (f"in-place stream reference {self.gbps:.1f} GB/s: {self.kernel}; {BUFFERS} fp32 buffers of "
                f"{self.numel / 1e6:.1f}M elements ({self.footprint_bytes / 1e6:.0f} MB, "
                f"{self.footprint_bytes / self.llc_bytes:.1f}x the last-level cache of "
                f"{self.llc_bytes / 2**20:.0f} MiB, {self.llc_source})")


def stream_numel(llc_bytes: int, min_numel: int = 0) -> int:
    """Elements per buffer: the four fp32 buffers span at least ``LLC_MULTIPLE`` caches of
    ``llc_bytes``, and each holds at least ``min_numel`` (the parameter list's size)."""
    return max(math.ceil(LLC_MULTIPLE * llc_bytes / (BUFFERS * ELEMENT_BYTES)), min_numel)


def _torch_pass(p: torch.Tensor, g: torch.Tensor, m: torch.Tensor, v: torch.Tensor) -> None:
    m.add_(g)
    v.add_(g)
    p.add_(m)


def _native_module(build: bool = False):
    """``(childopt._C or None, why)`` as loaded by childopt._native; compiles only when ``build``."""
    from childopt import _native

    return _native.try_load(build=build)


def stream_kernel(device: torch.device, build: bool = False) -> StreamKernel:
    """The native one-pass stream on CPU when childopt._C has it, else the labelled torch approximation.
    ``build``: build childopt._C first if it is not built (a run of the native backend builds it anyway)."""
    why = "the native stream is a CPU kernel"
    if device.type == "cpu":
        module, how = _native_module(build)
        if module is not None and hasattr(module, "_inplace_stream"):
            return StreamKernel(module._inplace_stream, NATIVE_BYTES,
                                "childopt._C._inplace_stream, one pass reading p, g, m, v and writing p, m, v "
                                f"({NATIVE_BYTES} B per element)", approximate=False)
        why = (f"childopt._C is not loaded ({how})" if module is None
               else "this build of childopt._C has no _inplace_stream")
    return StreamKernel(_torch_pass, TORCH_BYTES,
                        f"APPROXIMATION ({why}): torch m.add_(g); v.add_(g); p.add_(m), three passes moving "
                        f"{TORCH_BYTES} B per element instead of one pass of {NATIVE_BYTES}", approximate=True)


def measure_stream(device: torch.device, *, warmup: int, steps: int, min_numel: int = 0,
                   llc: Optional[CacheSize] = None, kernel: Optional[StreamKernel] = None) -> StreamReference:
    """Time ``steps`` passes of the stream kernel (after ``warmup``) at the current intra-op thread
    count; the median pass gives GB/s of the bytes the kernel moves.  Buffers are freed on return."""
    llc = llc or last_level_cache(device)
    kernel = kernel or stream_kernel(device)
    numel = stream_numel(llc.bytes, min_numel)
    p, g, m, v = (torch.full((numel,), fill, dtype=torch.float32, device=device) for fill in (1.0, 1e-3, 0.0, 0.0))
    one_pass = synchronized(lambda: kernel.run(p, g, m, v), device)
    for _ in range(warmup):
        one_pass()
    seconds = statistics.median(time_calls(one_pass, steps))
    return StreamReference(gbps=kernel.bytes_per_element * numel / seconds / 1e9, numel=numel,
                           bytes_per_element=kernel.bytes_per_element, kernel=kernel.label,
                           approximate=kernel.approximate, threads=torch.get_num_threads(), llc_bytes=llc.bytes,
                           llc_source=llc.source, llc_known=llc.known,
                           llc_instance_bytes=llc.instance_bytes)
