"""Bytes of live tensors over a training step run on fake tensors: the real ops, no memory.

Under torch's ``FakeTensorMode`` every op of the forward, the backward and the optimizer step
runs for its shapes and dtypes only, on CPU-typed tensors (so autocast, SDPA's choice of a fused
attention kernel and activation checkpointing behave as on a CPU), in seconds for a 7B model.
:class:`LiveBytes` sits above the fake mode and counts each new storage an op returns until
the storage dies: the running total and its peak are what the CPU allocator would report (the
tests compare them with torch's profiler on real tensors: equal to the byte).

Why not ``torch.distributed._tools.mem_tracker.MemTracker``: it is private API, and it neither
counts fake tensors nor lets a planned mask declare how many entries it keeps.

A fake bool mask holds no values, so ``nonzero`` of it (sparse storage turns masks into
indices) cannot know its length: a mask registered with :meth:`LiveBytes.declare_kept`
answers with that many entries, and so do its copies (an op's output of the same number of
elements as a declared first argument inherits the declaration).
"""
from __future__ import annotations

import weakref
from typing import Iterable

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from childopt.bench.live import storage_key

NONZERO = torch.ops.aten.nonzero.default


class LiveBytes(TorchDispatchMode):
    """Counts the bytes of storages created by ops while it is active, and their peak.

    Storages of ``existing`` tensors (parameters, buffers, inputs, optimizer state) are not
    counted: ops that return views of them allocate nothing.  Storages marked as gradients
    (:meth:`mark_gradient`) are also counted apart, so that :attr:`peak` can be taken as if each
    gradient held only ``1 / gradient_share`` of its bytes (FSDP2's sharded gradients); ``phase``
    names the part of the step running, :attr:`peak_phase` the part where the peak fell, and
    :attr:`peak_gradients` the bytes of gradients the peak counts: those live at the peak (as
    counted there: sharded if marked by then) that are or later become marked gradients.
    """

    def __init__(self, existing: Iterable[torch.Tensor] = (), gradient_share: int = 1):
        super().__init__()
        self.live = 0
        self.peak = 0
        self.phase = ""
        self.peak_phase = ""
        self.peak_gradients = 0
        self.phase_peaks: dict = {}  # phase -> the highest (sharded) live bytes while it ran
        self._gradient_bytes = 0
        self._gradient_keys: set = set()
        self._born: dict = {}  # key -> the count of storages created up to and including it
        self._created = 0
        self._peak_created = 0  # storages created when the peak was reached
        self._unsharded = 1.0 - 1.0 / gradient_share
        self._known = {storage_key(t) for t in existing}
        self._kept: dict = {}

    def declare_kept(self, mask: torch.Tensor, count: int) -> None:
        """``nonzero`` of ``mask`` (or of any view of it) returns ``count`` rows."""
        self._kept[storage_key(mask)] = count

    def mark_gradient(self, grad: torch.Tensor) -> None:
        """``grad``'s storage (counted when an op made it) is a parameter's gradient."""
        key = storage_key(grad)
        if key in self._known and key not in self._gradient_keys:
            nbytes = grad.untyped_storage().nbytes()
            self._gradient_keys.add(key)
            self._gradient_bytes += nbytes
            if self._born.get(key, self._created + 1) <= self._peak_created:  # live at the peak, a gradient now
                self.peak_gradients += nbytes

    def reset_peak(self) -> None:
        self.peak = self._sharded_live()
        self.peak_phase = self.phase
        self.peak_gradients = self._peak_share()
        self._peak_created = self._created
        self.phase_peaks = {}

    def _peak_share(self) -> int:
        return self._gradient_bytes - int(self._unsharded * self._gradient_bytes)

    def _sharded_live(self) -> int:
        return self.live - int(self._unsharded * self._gradient_bytes)

    def _update_peak(self) -> None:
        live = self._sharded_live()
        self.phase_peaks[self.phase] = max(self.phase_peaks.get(self.phase, live), live)
        if live > self.peak:
            self.peak, self.peak_phase, self.peak_gradients = live, self.phase, self._peak_share()
            self._peak_created = self._created

    def _released(self, key: int, nbytes: int) -> None:
        self.live -= nbytes
        self._known.discard(key)
        self._kept.pop(key, None)
        self._born.pop(key, None)
        if key in self._gradient_keys:
            self._gradient_keys.discard(key)
            self._gradient_bytes -= nbytes

    def _count(self, tensor: torch.Tensor) -> None:
        key = storage_key(tensor)
        if key in self._known:
            return
        self._known.add(key)
        storage = tensor.untyped_storage()
        nbytes = storage.nbytes()
        self.live += nbytes
        self._created += 1
        self._born[key] = self._created
        self._update_peak()
        weakref.finalize(storage, self._released, key, nbytes)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        first = args[0] if args and isinstance(args[0], torch.Tensor) else None
        kept = self._kept.get(storage_key(first)) if first is not None else None
        if func is NONZERO and kept is not None:
            out = torch.empty((kept, first.dim()), dtype=torch.long, device=first.device)
        else:
            out = func(*args, **kwargs)
            if kept is not None and isinstance(out, torch.Tensor) and out.numel() == first.numel():
                self._kept[storage_key(out)] = kept
        for tensor in tree_flatten(out)[0]:
            if isinstance(tensor, torch.Tensor):
                self._count(tensor)
        return out


def fake_mode() -> FakeTensorMode:
    """A fake mode in which tensors made from scratch are fake CPU tensors."""
    return FakeTensorMode(allow_non_fake_inputs=False)


def to_fake(module: torch.nn.Module, mode: FakeTensorMode) -> torch.nn.Module:
    """Replace every parameter and buffer of ``module`` (typically on the meta device) by a fake
    CPU tensor of its shape and dtype, in place; ``requires_grad`` and parameter sharing are kept.

    Assigning to ``_parameters`` directly: ``module.to_empty`` would go through ``_apply``,
    which cannot swap a parameter for a tensor subclass.
    """
    replaced: dict = {}  # id -> (original, fake): the original is held so that its id is not reused

    def fake_like(tensor: torch.Tensor) -> torch.Tensor:
        if id(tensor) not in replaced:
            with mode:
                empty = torch.empty(tensor.shape, dtype=tensor.dtype, device="cpu")
            fake = (torch.nn.Parameter(empty, requires_grad=tensor.requires_grad)
                    if isinstance(tensor, torch.nn.Parameter) else empty)
            replaced[id(tensor)] = (tensor, fake)
        return replaced[id(tensor)][1]

    for submodule in module.modules():
        for name, param in list(submodule._parameters.items()):
            if param is not None:
                submodule._parameters[name] = fake_like(param)
        for name, buffer in list(submodule._buffers.items()):
            if buffer is not None:
                submodule._buffers[name] = fake_like(buffer)
    return module
