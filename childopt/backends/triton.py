"""The Triton backend: childopt.kernels' multi-tensor kernels, one launch per bucket.

Implementations of ``childopt_triton::*`` for CUDA tensors (and CPU tensors under
``TRITON_INTERPRET=1``, for tests).  They are registered as opaque custom-op kernels rather
than through ``torch.library.triton_op``: the kernels address a whole tensor list through a
device table of element offsets, which functionalization cannot see, so letting inductor trace
into them would hide which tensors they write.  The schemas' mutation annotations and the
fake kernels (childopt.backends.contract) are what torch.compile needs.

Device tables are cached by the layout they encode (offsets relative to each list's first
tensor, alignment, sizes), so a training loop whose tensors keep their relative placement, and
every one-tensor launch of a given size, does no table work after the first; a new layout costs
one small host-to-device copy.  Launches run on the
device of their tensors (a device guard), whatever the current device is.
"""
from __future__ import annotations

import contextlib
from collections import OrderedDict

import torch

from childopt.backends import base, contract

NAME = "triton"
# The interpreter (TRITON_INTERPRET=1) is for tests: auto never picks Triton for CPU tensors.
AUTO_DEVICES = ("cuda",)
_PLAN_CACHE_SIZE = 64  # plans are a few small device tables and hold no tensor of the bucket
_plans: OrderedDict = OrderedDict()
# Elements per program and block iterations; tests shrink them so small tensors span blocks.
_shape = {"block": None, "iters": None}


def available(device: torch.device) -> tuple[bool, str]:
    """Whether the Triton kernels can step tensors on ``device``, and why (not)."""
    try:
        from childopt.kernels import masked_adamw
    except ImportError as exc:
        return False, f"triton is not importable ({exc})"
    interpreted = type(masked_adamw.masked_adamw_kernel).__name__ == "InterpretedFunction"
    if device.type == "cuda":
        if interpreted:
            return False, "TRITON_INTERPRET=1 was set when childopt.kernels was imported; CUDA tensors need compiled kernels"
        return True, "CUDA tensors and Triton available"
    if interpreted and device.type == "cpu":
        return True, "TRITON_INTERPRET=1: Triton kernels interpreted on CPU"
    return False, f"Triton kernels need CUDA tensors (got {device.type}; TRITON_INTERPRET=1 runs them on CPU for tests)"


class Backend(base.Backend):
    """Steps buckets with the Triton kernels; ``block``/``iters`` override the launch shape."""

    name = NAME
    PARAM_DTYPES = base.KERNEL_DTYPES

    def __init__(self, block: int | None = None, iters: int | None = None):
        from childopt import kernels  # noqa: F401  (fails here, not at the first step, without triton)

        self.block, self.iters = block, iters

    def _op(self, op: str):
        call = super()._op(op)
        if self.block is None and self.iters is None:
            return call

        def with_shape(*args):
            with launch_shape(self.block, self.iters):
                return call(*args)

        return with_shape


@contextlib.contextmanager
def launch_shape(block: int | None, iters: int | None):
    """Launch with ``block`` elements per block and ``iters`` blocks per program (tests)."""
    saved = dict(_shape)
    _shape.update(block=block, iters=iters)
    try:
        yield
    finally:
        _shape.update(saved)


def _device_guard(tensor: torch.Tensor):
    return torch.cuda.device(tensor.device) if tensor.is_cuda else contextlib.nullcontext()


def _layout(tensors: list) -> tuple:
    """What a plan's tables depend on for one tensor list: device, dtype (the tables hold
    *element* offsets and element-size alignment facts), the first tensor's 16-byte alignment
    and every tensor's byte offset from it."""
    if not tensors:
        return ()
    base = tensors[0].data_ptr()
    return (tensors[0].device, tensors[0].dtype, base % 16, tuple(t.data_ptr() - base for t in tensors))


def _plan(family, lists: dict, *extra):
    """The cached plan of ``lists``, built on a miss.

    Keyed by what the plan holds (relative offsets, alignment, sizes), not by absolute
    addresses: a one-tensor launch (a Fisher hook per parameter) hits whatever address its
    gradient got, and a bucket whose tensors all moved together hits too.  A new plan's tables
    are copied to the device without blocking (childopt.transfer), queued on the current
    stream: a launch on another stream that reuses the plan must be ordered after that one.
    """
    from childopt.kernels import multi_tensor

    block = _shape["block"] or multi_tensor.DEFAULT_BLOCK
    # a family may want more blocks per program (radix_histogram: to amortise its flush)
    iters = _shape["iters"] or getattr(family, "DEFAULT_ITERS", multi_tensor.DEFAULT_ITERS)
    key = (family.__name__, tuple(_layout(tensors) for tensors in lists.values()),
           tuple(t.numel() for tensors in lists.values() for t in tensors), extra, block, iters)
    plan = _plans.get(key)
    if plan is None:
        plan = family.make_plan(lists, *extra, block=block, iters=iters)
        _plans[key] = plan
        if len(_plans) > _PLAN_CACHE_SIZE:
            _plans.popitem(last=False)
    else:
        _plans.move_to_end(key)
    return plan


def adamw_step(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, masks, scalars, mask_kind, freeze, amsgrad,
               keep_threshold, seed_lo, seed_hi) -> None:
    """One launch over the bucket (see childopt.backends.contract for the update)."""
    if not params:
        return
    from childopt.kernels import masked_adamw

    coded = mask_kind in (contract.MaskKind.DENSE, contract.MaskKind.IMPORTANCE)
    lists = masked_adamw.launch_lists(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs if amsgrad else None,
                                      masks if coded else None)
    with _device_guard(params[0]):
        masked_adamw.launch(_plan(masked_adamw, lists), lists, scalars, mask_kind=mask_kind, freeze=freeze,
                            amsgrad=amsgrad, keep_threshold=keep_threshold, seed=seed_lo | (seed_hi << 32))


def sparse_adamw_step(params, grads, indices, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, scalars, amsgrad,
                      compact_grads) -> None:
    """One launch over the selected entries of every tensor of the bucket."""
    if not params:
        return
    from childopt.kernels import sparse_adamw

    lists = sparse_adamw.launch_lists(params, grads, indices, exp_avgs, exp_avg_sqs,
                                      max_exp_avg_sqs if amsgrad else None)
    with _device_guard(params[0]):
        sparse_adamw.launch(_plan(sparse_adamw, lists), lists, scalars, amsgrad=amsgrad, compact_grads=compact_grads)


def radix_histogram(scores, scopes, prefixes, shift, bits, n_scopes) -> torch.Tensor:
    """One launch over every score tensor (contiguous fp32) of every scope."""
    from childopt.kernels import radix_histogram as family

    hist = torch.zeros(n_scopes, 2**bits, dtype=torch.int64, device=prefixes.device)
    if scores:
        with _device_guard(prefixes):
            family.launch(_plan(family, {"scores": scores}, tuple(scopes)), scores, hist, prefixes, shift, bits)
    return hist


def fisher_accumulate(fisher, grads, scales) -> None:
    """``fisher[i] += (grads[i] * scales[i])**2`` in one launch (fisher contiguous fp32)."""
    if not fisher:
        return
    from childopt.kernels import fisher_accumulate as family

    lists = {"fisher": fisher, "grads": grads}
    with _device_guard(fisher[0]):
        family.launch(_plan(family, lists), lists, scales)


for _op in contract.SCHEMAS:
    contract.register(NAME, _op, ("cpu", "cuda"), globals()[_op])
