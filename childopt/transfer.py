"""Small host tensors to a CUDA device without making the host wait for the GPU.

A copy from pageable host memory to a CUDA device makes the host wait until every kernel queued
before it has run (torch synchronises the stream after such a copy).  In an optimizer step that
is the whole backward pass: the host cannot queue the step and the next forward while the GPU
works, which torch's fused AdamW never costs.  Staged through pinned memory, the copy is queued
like a kernel and returns at once; torch's caching host allocator keeps the pinned block until
the copy has run.
"""
from __future__ import annotations

import torch


def stages_through_pinned(tensor: torch.Tensor, device: torch.device) -> bool:
    """Whether :func:`to_device` copies ``tensor`` through pinned memory: a plain CPU tensor going
    to a CUDA device, outside a compiled graph (which places its own copies), outside fake or
    other tensor subclasses (whose ``pin_memory`` need not exist), and outside a CUDA graph
    capture: a captured copy would read the pinned block at every replay, after it was freed, so
    there the plain copy fails the capture loudly instead."""
    return (not torch.compiler.is_compiling() and device.type == "cuda" and tensor.device.type == "cpu"
            and type(tensor) is torch.Tensor and not _capturing())


def _capturing() -> bool:
    """Whether the current CUDA stream is capturing a graph (never, where CUDA is not available)."""
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def to_device(tensor: torch.Tensor, device) -> torch.Tensor:
    """``tensor.to(device)``, without blocking the host when it goes from the CPU to a CUDA device.

    The copy is staged in a pinned block of its own (never ``tensor`` itself, even when pinned),
    so the caller may write or free ``tensor`` at once; the copy is queued on the current stream,
    which is where the result may be used without waiting.
    """
    device = torch.device(device)
    if tensor.device == device:
        return tensor
    if stages_through_pinned(tensor, device):
        staged = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True).copy_(tensor)
        return staged.to(device, non_blocking=True)
    return tensor.to(device)
