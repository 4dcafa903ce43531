"""The planner's check: the same training step on real CPU tensors, measured by torch's profiler.

MaskedAdamW runs on its fused kernels (the native backend, built once if needed), as the plan
assumes.  The model is built for real (random weights), the fixed masks keep exactly the planned number
of entries at random places, one step creates the optimizer state, and the second step's peak
increase is read from the profiler's allocation events (as childopt.bench.live does), which see every
allocation of the CPU allocator: not the process RSS, which holds libraries and freed heap.  A
gradient hook leaves a marker event naming the address of each gradient, which tells which of the
allocations live at the peak are (or become) gradients.
Only for models that fit in memory; the tests compare :func:`measure` with
:func:`childopt.memory.planner.plan` on small configs.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch._C._profiler import _EventType, _ExtraFields_Allocation
from torch.profiler import ProfilerActivity, profile, record_function

from childopt.memory import methods
from childopt.memory.models import Architecture
from childopt.memory.planner import Plan, Setting, inputs_for, mark_gradients, model_for, terms, training_step

GRADIENT_MARK = "childopt.memory.gradient@"


def measure(arch: Architecture, method_name: str, setting: Setting = Setting()) -> Plan:
    """Run two real training steps of ``method_name`` on ``arch`` on the CPU; the second's peak, by term."""
    method = methods.check_method(method_name)
    if setting.world_size > 1:
        raise ValueError(f"world_size must be 1 to measure on one CPU process, got {setting.world_size}")
    torch.manual_seed(0)
    model = model_for(arch, method, setting, "cpu")
    inputs = inputs_for(arch, setting)
    optimizer = methods.build_optimizer(method, model, reserve_p=setting.reserve_p, mask_scope=setting.mask_scope,
                                        backend="native")
    training_step(model, optimizer, inputs, setting)
    held = []
    handles = mark_gradients(model, optimizer, _leave_marker)
    try:
        increase, gradients = peak_and_gradients(lambda: held.append(training_step(model, optimizer, inputs, setting)))
    finally:
        for handle in handles:
            handle.remove()
    return terms(method, setting, model, optimizer, gradients=gradients, held=held[0], increase=increase,
                 stand_in=False, peak_phase="")


def _leave_marker(grad: torch.Tensor) -> None:
    with record_function(f"{GRADIENT_MARK}{grad.untyped_storage().data_ptr()}"):
        pass


def peak_and_gradients(fn: Callable[[], object]) -> tuple[int, int]:
    """The peak of CPU bytes allocated minus freed while ``fn()`` runs, and the bytes of the allocations
    live at that peak that a gradient marker (:func:`_leave_marker`) names, then or later."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        event = stack.pop()
        stack.extend(event.children)
        fields = event.extra_fields
        if isinstance(fields, _ExtraFields_Allocation) and fields.device.type == "cpu":
            events.append((event.start_time_ns, 0, fields.ptr, fields.alloc_size))
        elif event.tag == _EventType.TorchOp and event.name.startswith(GRADIENT_MARK):
            events.append((event.start_time_ns, 1, int(event.name[len(GRADIENT_MARK):]), 0))
    live, allocations, gradients = {}, [], set()  # address -> allocation; allocation -> bytes; gradient ones
    total = peak = 0
    at_peak: list = []
    for _, is_marker, ptr, size in sorted(events, key=lambda e: e[:2]):
        if is_marker:
            gradients.add(live[ptr])
        elif size > 0:
            live[ptr] = len(allocations)
            allocations.append(size)
        else:
            live.pop(ptr, None)  # freed; an allocation made before fn() is not in live
        total += size
        if total > peak:
            peak, at_peak = total, list(live.values())
    return peak, sum(allocations[a] for a in at_peak if a in gradients)
