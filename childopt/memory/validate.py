"""The planner's check: the same training step on real CPU tensors, measured by torch's profiler.

MaskedAdamW runs on its fused kernels (the native backend, built once if needed), as the plan
assumes.  The model is built for real (random weights), the fixed masks keep exactly the planned number
of entries at random places, one step creates the optimizer state, and the second step's peak
increase is read from the profiler's allocation events (childopt.bench.live), which see every
allocation of the CPU allocator: not the process RSS, which holds libraries and freed heap.  A
gradient hook leaves a marker event naming the address of each gradient, which tells which of the
allocations live at the peak are (or become) gradients.
Only for models that fit in memory; the tests compare :func:`measure` with
:func:`childopt.memory.planner.plan` on small configs.
"""
from __future__ import annotations

import functools
import warnings

import torch

from childopt.bench.live import cpu_peak_and_marked, mark_allocation
from childopt.memory import methods
from childopt.memory.models import Architecture
from childopt.memory.planner import Plan, Setting, inputs_for, mark_gradients, model_for, terms, training_step

GRADIENT_MARK = "childopt.memory.gradient@"


def available_memory() -> tuple[int | None, str]:
    """Bytes of memory available to a new allocation, and where they were read: psutil (installed with
    accelerate, on any OS), else MemAvailable in /proc/meminfo; ``(None, why)`` where neither is there."""
    try:
        import psutil
    except ImportError:
        from childopt._native.config import mem_available

        found = mem_available()
        return found, "MemAvailable in /proc/meminfo" if found is not None else "no psutil and no /proc/meminfo"
    return psutil.virtual_memory().available, "psutil.virtual_memory().available"


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
    held = []
    # random weights and data: what the optimizer warns about (e.g. importance scores with too few
    # non-zero entries) concerns this stand-in step, not the user's training, which has no line here
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        training_step(model, optimizer, inputs, setting)
        handles = mark_gradients(model, optimizer, functools.partial(mark_allocation, GRADIENT_MARK))
        try:
            increase, gradients = cpu_peak_and_marked(
                lambda: held.append(training_step(model, optimizer, inputs, setting)), GRADIENT_MARK)
        finally:
            for handle in handles:
                handle.remove()
    return terms(method, setting, model, optimizer, gradients=gradients, held=held[0], increase=increase,
                 stand_in=False, peak_phase="")
