"""The masked AdamW step as a pure function over tensor lists, as ``torch.optim.adamw.adamw`` is.

:func:`masked_adamw` sorts the tensors into buckets that share (device, dtypes, mask kind,
storage, backend, 16-byte alignment), computes each tensor's row of step scalars
(childopt.backends.contract), and makes one op call per bucket.  Only the eager step with plain
CPU step counts reads them on the host (Python float arithmetic is faster there); a compiled
step keeps them tensors, so ``torch.compile`` traces it without a graph break (but for the
eager split of a shard starting inside a Philox group, childopt.optim.philox_lanes), and with
``capturable`` the rows are computed on the parameters' device (CUDA-graph safe; an LR
scheduler writing a tensor lr causes no recompile).
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch

from childopt import _native, backends, philox
from childopt.backends import Backend, SparseTensorLists, TensorLists
from childopt.backends.contract import COLUMN, STEP_SCALAR_FIELDS, MaskKind, MaskSpec
from childopt.optim import philox_lanes
from childopt.transfer import to_device

# How bias corrections and weight decay enter the update: torch's AdamW, or ChildTuning's
# published optimizer (corrections folded into the step size, decay after the update; its
# ``correct_bias=False`` drops the corrections).
RULES = ("adamw", "childtuning", "childtuning-uncorrected")


def step_scalar_rows(state_steps: list, rng_bases: list, *, lr, betas, eps: float, weight_decay: float,
                     maximize: bool, grad_scale: float, rule: str, device) -> torch.Tensor:
    """The float64 [n, len(STEP_SCALAR_FIELDS)] rows of one bucket, for its next step.

    Every backend rounds the same rows to fp32.  ``rng_bases`` are ints, or float64 scalars on
    ``device`` (capturable: no host copy, so a CUDA graph can capture this).  Hyper-parameters are
    numbers (numpy's included: taken as Python floats, so a float32 one computes in float64 like
    the rest) or one-element tensors.  Eager on the host (plain CPU step counts, number
    hyper-parameters, int rng bases, rows built on the CPU) the arithmetic runs on Python floats
    once per distinct count, as torch.optim.AdamW's own step computes its bias corrections: about
    40 us for roberta-base's 139 tensors where the tensor ops take 90-100 (2-core EPYC).  Anywhere
    else (compiled, capturable, a tensor hyper-parameter, a dispatch or __torch_function__ mode) it
    is float64 tensor ops, which read nothing on the host.  The two differ only where torch's
    vectorised pow and the C library's differ in the last float64 bit (25 of the counts up to
    2 * 10**6 for beta 0.999), and none of those survives the rounding to fp32 (checked for every
    count up to 2 * 10**6 with betas (0.9, 0.999), (0.9, 0.98), (0.95, 0.999)).
    """
    lr, beta1, beta2, eps, weight_decay, grad_scale = map(_number_as_float, (lr, *betas, eps, weight_decay, grad_scale))
    formula = dict(betas=(beta1, beta2), eps=eps, weight_decay=weight_decay, maximize=maximize, grad_scale=grad_scale,
                   rule=rule)
    counts = _host_counts(state_steps, rng_bases, device, hyper=(lr, beta1, beta2, eps, weight_decay, grad_scale))
    if counts is not None:
        return _host_rows(counts, rng_bases, lr, **formula)
    t = torch.stack(state_steps).to(device=device, dtype=torch.float64) + 1
    ones = torch.ones_like(t)
    columns = _columns(t, _lr_tensor(lr, device), sqrt=torch.sqrt, **formula)
    columns["rng_base"] = (torch.stack(rng_bases) if isinstance(rng_bases[0], torch.Tensor)
                           else torch.tensor(rng_bases, dtype=torch.float64, device=device))
    # a number or a 0-dim tensor is spread over the bucket
    return torch.stack([c if isinstance(c, torch.Tensor) and c.shape == t.shape else ones * c
                        for c in map(columns.get, STEP_SCALAR_FIELDS)], dim=1)


def _lr_tensor(lr, device) -> torch.Tensor:
    """``lr`` as a float64 tensor on ``device``, a number without baking its value into a compiled graph.

    ``torch.as_tensor(number)`` makes dynamo guard on the value (a recompile per LR scheduler
    step, then eager once the recompile limit is hit).  ``ones * number`` keeps a float that
    dynamo left unspecialised a graph input, as torch AdamW's ``lr / bias_correction`` does, and
    ``1.0 * lr`` is exact, so the rows equal those from the value itself.
    """
    if isinstance(lr, torch.Tensor):
        return lr.to(dtype=torch.float64, device=device)
    return torch.ones((), dtype=torch.float64, device=device) * lr


def _number_as_float(value):
    """A Python float for a number (a numpy float32 would keep float32 arithmetic); a one-element
    tensor as a 0-dim one (torch takes any shape, e.g. ``[1, 1]``, which would broadcast the rows)."""
    return value.reshape(()) if isinstance(value, torch.Tensor) else float(value)


def _columns(t, lr, *, betas, eps: float, weight_decay: float, maximize: bool, grad_scale: float, rule: str,
             sqrt) -> dict:
    """Every column but ``rng_base`` for the counts ``t`` after this step: Python floats (``lr`` a
    float, ``sqrt`` math.sqrt) or float64 tensors (``sqrt`` torch.sqrt), by one formula."""
    beta1, beta2 = betas
    bias1 = 1 - beta1 ** t
    bias2 = 1 - beta2 ** t
    decay = 1 - lr * weight_decay
    if rule == "adamw":
        decay_before, decay_after, step_size, bc2_sqrt = decay, 1.0, lr / bias1, sqrt(bias2)
    elif rule == "childtuning":
        decay_before, decay_after, step_size, bc2_sqrt = 1.0, decay, lr * sqrt(bias2) / bias1, 1.0
    else:
        decay_before, decay_after, step_size, bc2_sqrt = 1.0, decay, lr, 1.0
    return {
        "decay_before": decay_before, "decay_after": decay_after, "one_minus_beta1": 1 - beta1, "beta2": beta2,
        "one_minus_beta2": 1 - beta2, "eps": eps, "step_size": step_size, "bc2_sqrt": bc2_sqrt,
        "grad_scale": grad_scale, "grad_sign": -1.0 if maximize else 1.0,
        "lerp_from_start": 1.0 if 1 - beta1 < 0.5 else 0.0, "step": t,
    }


def _host_counts(state_steps: list, rng_bases: list, device, hyper: tuple) -> Optional[list]:
    """The step counts as floats when the rows can be host arithmetic (see step_scalar_rows): rows
    built on the CPU, no tensor among the ``hyper``-parameters or rng bases; else None."""
    if (device != "cpu" and torch.device(device).type != "cpu") or any(isinstance(x, torch.Tensor)
                                                                       for x in (*hyper, rng_bases[0])):
        return None
    module = _native.loaded()[0] if _host_eager() else None
    return None if module is None else module._step_counts(state_steps)


def _host_rows(counts: list, rng_bases: list, lr: float, **formula) -> torch.Tensor:
    """The rows of step_scalar_rows from host counts: one row of Python floats per distinct count
    (the formula's other arguments in ``formula``), spread over the bucket's tensors, then each
    tensor's rng base."""
    row_of: dict = {}  # count -> its row's index (a NaN count, never equal to itself, gets a row per tensor)
    if counts.count(counts[0]) == len(counts):  # the usual bucket: one count, so one row (no per-tensor index)
        row_of[counts[0]], index = 0, None
    else:
        index = [row_of.setdefault(count, len(row_of)) for count in counts]
    rows = []
    for count in row_of:
        columns = dict(_columns(count + 1, lr, sqrt=math.sqrt, **formula), rng_base=0.0)
        rows.append([columns[name] for name in STEP_SCALAR_FIELDS])
    block = torch.tensor(rows, dtype=torch.float64)
    block = block.expand(len(counts), -1).clone() if index is None else block[torch.tensor(index)]
    block[:, COLUMN["rng_base"]] = torch.tensor(rng_bases, dtype=torch.float64)
    return block


def _host_eager() -> bool:
    """No compiler, __torch_function__ mode or TorchScript trace is watching: host reads and the
    native count loops are allowed (they would be invisible to, or break, any of them)."""
    return not (torch.compiler.is_compiling() or torch._C._is_torch_function_mode_enabled()
                or torch._C._get_tracing_state() is not None)


def advance_steps(steps: list) -> None:
    """Add 1 to each step count, as ``torch._foreach_add_(steps, 1.0)`` does.

    Eager CPU counts take one call into childopt._C when it is loaded: torch's foreach op has no
    CPU fast path and dispatches once per tensor (about 1 ms of a step over roberta-base's 139
    tensors on a 2-core EPYC, a fifth of a 1%-sparse step).  Whatever must see the add takes
    torch's op: a compiled step, a ``__torch_function__`` mode, a TorchScript trace, and, refused
    by the native loop (which then changes nothing), Python dispatch modes (fake tensors,
    make_fx), tensor subclasses and device (capturable) counts.
    """
    module = _native.loaded()[0] if _host_eager() else None
    if module is None or not module._advance_step_counts(steps):
        torch._foreach_add_(steps, 1.0)


def _aligned_offset(t: torch.Tensor) -> bool:
    """Whether ``t`` starts 16 bytes into an aligned storage (offset 0, the common case, in one call)."""
    offset = t.storage_offset()
    return offset == 0 or offset * t.element_size() % 16 == 0


def masked_adamw(params: list, grads: list, exp_avgs: list, exp_avg_sqs: list, max_exp_avg_sqs: Optional[list],
                 state_steps: list, *, masks: list, indices: list, compact_grads: list, rng_bases: list,
                 backend: Callable[[torch.device], Backend], mask_kind: MaskKind, freeze: bool, reserve_p: float,
                 seed: int, lr, betas, eps: float, weight_decay: float, amsgrad: bool, maximize: bool,
                 rule: str = "adamw", capturable: bool = False, rng_lanes: Optional[list] = None) -> None:
    """One masked AdamW step over parallel lists (one entry per parameter that has a gradient).

    ``masks[i]``: the bool mask of a dense-storage parameter with a fixed (or exact-size drawn) mask,
    its uint8 importance level codes (childopt.importance), else None;
    ``indices[i]``: the selected flat indices of a sparse-storage parameter, else None (its
    moments are then compact); ``compact_grads[i]``: its gradient is ``grad[indices]``.
    ``mask_kind`` is the optimizer's kind (Bernoulli applies to every tensor of a group with
    ``reserve_p < 1``); ``freeze`` leaves dropped entries bit-identical, else their gradient
    is zeroed (and a Bernoulli draw's kept entries are scaled by ``1 / reserve_p``).
    ``backend(device)`` gives the backend of a device; a bucket whose dtypes it does not cover
    goes to the reference backend.  Each bucket's step counts advance once its op has run.
    ``rng_lanes[i]``: the Philox lane of tensor i's first element, non-zero for a shard that
    starts inside a group (childopt.optim.philox_lanes); ``None``: all 0.
    """
    bernoulli = mask_kind == MaskKind.BERNOULLI and reserve_p < 1.0
    writebacks = []
    if bernoulli and rng_lanes is not None and any(rng_lanes):
        lists, writebacks = philox_lanes.split_heads(
            dict(params=params, grads=grads, exp_avgs=exp_avgs, exp_avg_sqs=exp_avg_sqs,
                 max_exp_avg_sqs=max_exp_avg_sqs, state_steps=state_steps, rng_bases=rng_bases), rng_lanes)
        params, grads, exp_avgs, exp_avg_sqs = lists["params"], lists["grads"], lists["exp_avgs"], lists["exp_avg_sqs"]
        max_exp_avg_sqs, state_steps, rng_bases = lists["max_exp_avg_sqs"], lists["state_steps"], lists["rng_bases"]
        masks, indices, compact_grads = [None] * len(params), [None] * len(params), [False] * len(params)
    buckets: dict = {}  # (route number, kind, aligned) -> (device, backend, member indices)
    routes: dict = {}  # (device, param dtype, grad dtype) -> (backend, route number): one lookup per kind of tensor
    compiling = torch.compiler.is_compiling()
    # The kind of a tensor without indices or a mask is the group's (this loop's host work per
    # tensor is a share of the step's overhead, so it is found once).
    plain_kind = MaskKind.BERNOULLI if bernoulli else MaskKind.NONE
    for i, p in enumerate(params):
        grad = grads[i]
        if indices[i] is not None:
            kind = ("sparse", indices[i].dtype, compact_grads[i])
        elif masks[i] is not None:  # importance: uint8 level codes; a fixed or an exact-size drawn mask: bool
            kind = MaskKind.IMPORTANCE if masks[i].dtype == torch.uint8 else MaskKind.DENSE
        else:
            kind = plain_kind
        route = (p.device, p.dtype, grad.dtype)
        known = routes.get(route)
        if known is None:
            known = routes[route] = (backends.route(backend(p.device), p.dtype, grad.dtype), len(routes))
        # A tensor off 16-byte alignment gets its own bucket: in a shared one it would turn off
        # the vector loads of every tensor (a kernel vectorises a list only when all are aligned).
        # Storages are allocated aligned, so the storage offset tells.  A compiled step does not
        # split (dynamo breaks its graph on these reads); the kernels then check alignment themselves.
        aligned = compiling or (_aligned_offset(p) and _aligned_offset(grad))
        bucket = buckets.get((known[1], kind, aligned))
        if bucket is None:
            bucket = buckets[known[1], kind, aligned] = (p.device, known[0], [])
        bucket[2].append(i)
    keep_threshold = philox.keep_threshold(reserve_p) if bernoulli else 1
    for (_, kind, _), (device, impl, members) in buckets.items():
        steps = [state_steps[i] for i in members]
        rows = step_scalar_rows(steps, [rng_bases[i] for i in members], lr=lr, betas=betas, eps=eps,
                                weight_decay=weight_decay, maximize=maximize,
                                grad_scale=1.0 / reserve_p if kind == MaskKind.BERNOULLI and not freeze else 1.0,
                                rule=rule,
                                device=device if capturable else "cpu")
        rows = to_device(rows, device)  # queued, not waited for (childopt.transfer)
        work = [params[i] for i in members]
        contiguous = all(map(torch.Tensor.is_contiguous, work))
        if not contiguous:
            work = [p if p.is_contiguous() else p.contiguous() for p in work]
        bucket_grads = [grads[i] for i in members]
        if not all(map(torch.Tensor.is_contiguous, bucket_grads)):
            bucket_grads = [g if g.is_contiguous() else g.contiguous() for g in bucket_grads]
        moments = dict(exp_avgs=[exp_avgs[i] for i in members], exp_avg_sqs=[exp_avg_sqs[i] for i in members],
                       max_exp_avg_sqs=[max_exp_avg_sqs[i] for i in members] if amsgrad else None)
        if isinstance(kind, tuple):
            impl.sparse_adamw_step(SparseTensorLists(params=work, grads=bucket_grads,
                                                     indices=[indices[i] for i in members],
                                                     compact_grads=kind[2], **moments), rows)
        else:
            held = kind in (MaskKind.DENSE, MaskKind.IMPORTANCE)
            impl.adamw_step(TensorLists(params=work, grads=bucket_grads, **moments,
                                        masks=[masks[i] for i in members] if held else None),
                            rows, MaskSpec(kind=kind, freeze=freeze, seed=seed, keep_threshold=keep_threshold))
        if not contiguous:
            for i, w in zip(members, work):
                if w is not params[i]:
                    params[i].copy_(w)
        advance_steps(steps)
    for destination, source in writebacks:
        destination.copy_(source)
