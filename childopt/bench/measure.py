"""How every benchmark measures: timing, peak memory and optimizer state, and how a row that
cannot run here is reported.

A row is warmed up with a few untimed calls (the first Triton step compiles); then each timed
call is wall time, with a device synchronize after it on CUDA so the time covers its kernels,
and the rows report the median; the step rows evict the last-level cache, untimed, ahead of each
timed call (:mod:`childopt.bench.evict`).  The yardstick of the memory-bound steps is the in-place stream
of :mod:`childopt.bench.stream`; the live tensor bytes of a step are :mod:`childopt.bench.live`'s.
"""
from __future__ import annotations

import gc
import resource
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import torch

# Untimed calls ahead of the timed ones of every row (the first Triton step compiles).
WARMUP = 3


class Unavailable(RuntimeError):
    """A row that cannot run here (a package or a GPU is missing); the message says which."""


def skip_record(key: str, optimizer: str, mode: str, reason: str) -> dict:
    """How a skipped row appears in the report and its JSON."""
    return {"key": key, "optimizer": optimizer, "mode": mode, "reason": reason}


def synchronized(fn: Callable[[], object], device: torch.device) -> Callable[[], None]:
    """``fn`` followed, on CUDA, by a synchronize, so a call's wall time covers its kernels."""
    if device.type != "cuda":
        return fn

    def call():
        fn()
        torch.cuda.synchronize(device)

    return call


def time_calls(fn: Callable[[], object], steps: int, before: Optional[Callable[[], object]] = None) -> list[float]:
    """Wall seconds of each of ``steps`` calls of a synchronized ``fn``; ``before`` runs untimed ahead of each."""
    times = []
    for _ in range(steps):
        if before is not None:
            before()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def grad_restorer(params) -> Callable[[], None]:
    """A callable that puts back the gradients ``params`` have now (for optimizers that scale them)."""
    saved = [p.grad.clone() for p in params]

    def restore() -> None:
        for p, g in zip(params, saved):
            p.grad.copy_(g)

    return restore


def release_memory(device: torch.device) -> None:
    """Free what earlier measurements left: objects in reference cycles, and on CUDA the
    allocator's cached blocks."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def reset_peak_memory(device: torch.device) -> bool:
    """Start a new peak-memory window; False where the CPU peak RSS cannot be reset.

    Garbage of earlier rows (objects in reference cycles) is collected first, so it is not
    counted.  On CUDA the window starts from the memory allocated now.  On Linux writing 5 to
    /proc/self/clear_refs resets the RSS high-water mark that ``ru_maxrss`` reports to the
    current RSS, which still holds heap the allocator kept from earlier rows; elsewhere the CPU
    peak counts from process start.  CPU peaks are therefore upper bounds.
    """
    release_memory(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return True
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def peak_memory_gb(device: torch.device) -> float:
    """Peak memory since :func:`reset_peak_memory`: CUDA allocated bytes, or the process peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    rss_unit = 1 if sys.platform == "darwin" else 1024  # ru_maxrss is in bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * rss_unit / 1e9


def state_gb(opt: torch.optim.Optimizer) -> float:
    """GB held by the tensors of ``opt.state`` (moments, masks, step counters)."""
    return sum(v.nbytes for s in opt.state.values() for v in s.values() if isinstance(v, torch.Tensor)) / 1e9
