"""Peak bytes of live tensors during one training or optimizer step: the memory that tells
full fine-tuning, sparse storage and LoRA apart on a CPU, where the process RSS is dominated by
everything else in the process (libraries, allocator caches, earlier rows).

``live bytes = held + peak increase``:

* ``held``: the bytes of the model's parameters, their gradients and the optimizer's state tensors
  live when the step starts, counted from the tensors themselves (each storage once);
* ``peak increase``: the highest point, during the one step, of the bytes of tensors allocated
  since it started minus those of them freed (activations, gradients, state created on a first
  step, temporaries; the free of a tensor live before the step is not counted), at least zero.
  On CPU it is read from torch's profiler: with ``profile_memory=True`` every allocation and free
  is a ``[memory]`` event carrying its signed size, and walking them in time order gives the
  running total and its peak.  On CUDA it is
  ``torch.cuda.max_memory_allocated`` over the step minus ``memory_allocated`` at its start.

The profiler slows the step, so the step measured is an extra, untimed one.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

import torch
from torch._C._profiler import _EventType, _ExtraFields_Allocation
from torch.profiler import ProfilerActivity, profile, record_function


@dataclass(frozen=True)
class LiveMemory:
    """Bytes ``held`` when the step started and the ``peak_increase`` above that during the step."""

    held: int
    peak_increase: int

    @property
    def peak(self) -> int:
        return self.held + self.peak_increase


def storage_key(tensor: torch.Tensor) -> int:
    """The identity of ``tensor``'s storage (its C++ object), shared by views and aliases; unlike
    the data pointer it also tells apart the storages of fake tensors, which hold no data."""
    return tensor.untyped_storage()._cdata


def storage_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind ``tensors`` (views and repeats counted once)."""
    return sum({storage_key(t): t.untyped_storage().nbytes() for t in tensors}.values())


def held_bytes(params: Iterable[torch.Tensor], opt: torch.optim.Optimizer) -> int:
    """Bytes of ``params``, their gradients (where set) and every tensor in ``opt.state``."""
    params = list(params)
    grads = [p.grad for p in params if p.grad is not None]
    state = [v for s in opt.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    return storage_bytes(params + grads + state)


def mark_allocation(marker: str, tensor: torch.Tensor) -> None:
    """Leave a profiler event naming ``tensor``'s allocation under ``marker``, for
    :func:`cpu_peak_and_marked` to tell which allocations live at the peak it names."""
    with record_function(f"{marker}{tensor.untyped_storage().data_ptr()}"):
        pass


def cpu_peak_and_marked(fn: Callable[[], object], marker: str = "") -> tuple[int, int]:
    """The peak of CPU bytes allocated while ``fn()`` runs minus those of them freed, from the
    profiler's allocation events (frees of what was allocated before are left out), and the bytes
    of the allocations live at that peak that an event of :func:`mark_allocation` under ``marker``
    names, then or later (0 without a ``marker``)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        event = stack.pop()
        stack.extend(event.children)
        fields = event.extra_fields
        if isinstance(fields, _ExtraFields_Allocation) and fields.device.type == "cpu":
            events.append((event.start_time_ns, 0, fields.ptr, fields.alloc_size))
        elif marker and event.tag == _EventType.TorchOp and event.name.startswith(marker):
            events.append((event.start_time_ns, 1, int(event.name[len(marker):]), 0))
    live, allocations, marked = {}, [], set()  # address -> allocation; allocation -> bytes; marked ones
    total = peak = 0
    at_peak: list = []
    for _, is_marker, ptr, size in sorted(events, key=lambda e: e[:2]):
        if is_marker:
            marked.add(live[ptr])
        elif size > 0:
            live[ptr] = len(allocations)
            allocations.append(size)
        elif live.pop(ptr, None) is None:  # the free of an allocation made before fn(): not counted, whether or
            continue                        # not the profiler saw it made (an earlier profile of the process did)
        total += size
        if total > peak:
            peak, at_peak = total, list(live.values())
    return peak, sum(allocations[a] for a in at_peak if a in marked)


def cpu_peak_increase(fn: Callable[[], object]) -> int:
    """Peak bytes allocated minus freed on the CPU while ``fn()`` runs."""
    return cpu_peak_and_marked(fn)[0]


def cuda_peak_increase(fn: Callable[[], object], device: torch.device) -> int:
    """``max_memory_allocated`` while ``fn()`` runs minus ``memory_allocated`` before it."""
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    start = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return max(0, torch.cuda.max_memory_allocated(device) - start)


def peak_increase(fn: Callable[[], object], device: torch.device) -> int:
    """Peak bytes of tensors allocated minus freed on ``device`` while ``fn()`` runs."""
    return cuda_peak_increase(fn, device) if device.type == "cuda" else cpu_peak_increase(fn)


def measure_live(step: Callable[[], object], params: Iterable[torch.Tensor], opt: torch.optim.Optimizer,
                 device: torch.device) -> LiveMemory:
    """Run ``step`` once and return what was held before it and the peak increase during it."""
    held = held_bytes(params, opt)
    return LiveMemory(held=held, peak_increase=peak_increase(step, device))
