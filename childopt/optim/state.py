"""The two state layouts of MaskedAdamW: dense moments with a bool mask, or sparse indices.

Dense storage keeps moments (fp32; float64 for a float64 parameter, as torch's AdamW) of every element and, for a parameter with a fixed mask, the
bool ``mask``.  Sparse storage keeps, for such a parameter, sorted flat ``indices`` of the
selected entries and compact moments of the same length (childopt.sparse); parameters without
a mask keep dense moments.  A layout knows how to store a new mask (keeping what state it
can), how large the moments are, which entries clipping measures, and how to restore a saved
parameter state.
"""
from __future__ import annotations

from functools import partial

import torch

from childopt import sparse
from childopt.optim import sharding

MOMENT_KEYS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")


def moment_dtype(param_dtype: torch.dtype) -> torch.dtype:
    """fp32 moments for fp32/bf16/fp16 parameters, float64 for float64 ones (torch's AdamW keeps
    them in the parameter's dtype; a float64 user asked for float64 arithmetic)."""
    return torch.promote_types(param_dtype, torch.float32)


def init_state(p: torch.Tensor, state: dict, amsgrad: bool, capturable: bool) -> None:
    """Step 0 and zero moments (:func:`moment_dtype`), shaped by the parameter or its selected entries.

    A DTensor parameter's dense moments are DTensors placed alike (so torch.distributed.checkpoint
    saves and reshards them); compact moments are its shard's (childopt.optim.sparse_shards); the
    step stays a plain tensor, as torch's AdamW keeps it.
    """
    dtype = moment_dtype(p.dtype)
    if "indices" in state:  # compact moments of the selected entries (of this rank's shard)
        zeros = partial(torch.zeros, state["indices"].shape, dtype=dtype, device=p.device)
    elif sharding.is_dtensor(p):
        zeros = partial(torch.zeros_like, p, dtype=dtype, memory_format=torch.contiguous_format)
    else:
        zeros = partial(torch.zeros, p.shape, dtype=dtype, device=p.device)
    state["step"] = torch.zeros((), dtype=torch.float32, device=p.device if capturable else "cpu")
    state["exp_avg"] = zeros()
    state["exp_avg_sq"] = zeros()
    if amsgrad:
        state["max_exp_avg_sq"] = zeros()


def init_missing_state(params: list, states: list, amsgrad: bool, capturable: bool) -> None:
    """Initialise the state of parameters stepped for the first time; add vmax when amsgrad is new."""
    for p, state in zip(params, states):
        if "step" not in state:
            init_state(p, state, amsgrad, capturable)
        elif amsgrad and "max_exp_avg_sq" not in state:
            state["max_exp_avg_sq"] = state["exp_avg_sq"].clone()


def with_gradients(candidates: list, gradient_of) -> tuple[list, list]:
    """The parameters of ``candidates`` that have a gradient (``gradient_of(p)``), and those gradients."""
    stepped, grads = [], []
    for p in candidates:
        grad = gradient_of(p)
        if grad is not None:
            stepped.append(p)
            grads.append(grad)
    return stepped, grads


def measured_gradient(grad: torch.Tensor, is_dense_grad: bool, state: dict) -> torch.Tensor:
    """The entries of ``grad`` the step will use: the child network's, for norms and clipping.

    A fixed mask's entries are ``grad[mask]``: the order of sparse storage's compact gradients,
    so a norm is the same bits in both storages.  On a GPU its ``nonzero`` makes the host wait at
    each masked tensor; a count cached to avoid that went stale under mask edits torch does not
    version (``.data``, numpy views) and failed on inference-mode masks, so it was not kept.
    """
    if is_dense_grad and "indices" in state:
        if sharding.is_dtensor(grad):  # zeros off the child network: the norm is reduced over the ranks
            child = torch.zeros(sharding.local(grad).shape, dtype=torch.bool, device=grad.device)
            child.view(-1)[state["indices"].long()] = True
            return torch.where(sharding.wrap_like(child, grad), grad, 0.0)
        return sparse.gather(grad, state["indices"])
    if "mask" in state:
        if sharding.is_dtensor(grad):  # a shard cannot be boolean-indexed; zeros add nothing to a norm
            return torch.where(state["mask"], grad, 0.0)
        return grad[state["mask"]]
    return grad


def clip_by_norm_(grads: list, measured: list, max_norm: float, norm_type: float,
                  error_if_nonfinite: bool) -> torch.Tensor:
    """Scale ``grads`` in place so the ``norm_type`` norm of ``measured`` is at most ``max_norm``.

    ``torch.nn.utils.clip_grads_with_norm_`` takes parameters and scales their ``.grad``;
    compact gradients are not any parameter's ``.grad``, so the scaling is done here.
    """
    if not grads:
        return torch.tensor(0.0)
    measured = [m for m in measured if m.numel()]  # a mask that keeps nothing adds nothing (and torch's inf
    total = (torch.nn.utils.get_total_norm(measured, norm_type, error_if_nonfinite)  # norm refuses it)
             if measured else torch.zeros((), device=grads[0].device))
    if sharding.is_dtensor(total):  # the norm of sharded gradients: reduced over the ranks
        total = total.full_tensor()
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    by_device: dict = {}
    for grad in grads:
        by_device.setdefault(grad.device, []).append(grad)
    for device, device_grads in by_device.items():
        torch._foreach_mul_(device_grads, coef.to(device))
    return total


class DenseLayout:
    """Moments of every element; a fixed mask is kept as ``state["mask"]``."""

    name = "dense"

    def store_masks(self, states: dict, new: dict, compact, describe) -> list:
        """Keep ``new`` (param -> bool mask) in the state; return the parameters whose mask changed."""
        old = {p: s["mask"] for p, s in states.items() if "mask" in s}
        local = sharding.local  # a shard's comparison: torch.equal of DTensors would communicate
        changed = [p for p in set(old) | set(new)
                   if p not in old or p not in new or not torch.equal(local(old[p]), local(new[p]))]
        for p in old:
            del states[p]["mask"]
        for p, m in new.items():
            states[p]["mask"] = m
        return changed


class SparseLayout:
    """Selected flat ``indices`` and compact moments for each parameter with a fixed mask."""

    name = "sparse"

    def store_masks(self, states: dict, new: dict, compact, describe) -> list:
        """Turn ``new`` into indices and re-compact the moments; return the parameters that changed.

        Entries selected before and after keep their moments, newly selected ones start from
        zero (or from the dense moments of a parameter that had no mask), and a parameter losing
        its mask gets dense moments that are zero off its old indices.
        """
        for p in new:
            if sharding.is_dtensor(p):
                _check_sharded_sparse(p, compact, describe)
        old = {p: s["indices"] for p, s in states.items() if "indices" in s}
        new_indices = {p: sparse.indices_from_mask(sharding.local(m)) for p, m in new.items()}
        changed = [p for p in set(old) | set(new_indices)
                   if p not in old or p not in new_indices or not torch.equal(old[p], new_indices[p])]
        pending = [p for p in changed if compact is not None and p in compact.buffers]
        if pending:
            raise RuntimeError(f"{describe(pending[0])} has a compact gradient for its old indices: call "
                               "set_mask after step() and zero_grad(), not between backward and step")
        for p in changed:
            state = states[p]
            for key in MOMENT_KEYS:
                if key not in state:
                    continue
                if p not in new_indices:
                    dense = sparse.scatter(state[key], old[p], sharding.local(p).shape)
                    state[key] = sharding.wrap_like(dense, p) if sharding.is_dtensor(p) else dense
                elif p in old:
                    state[key] = sparse.remap(state[key], old[p], new_indices[p])
                else:
                    state[key] = sparse.gather(sharding.local(state[key]), new_indices[p])
            if p in new_indices:
                state["indices"] = new_indices[p]
                if compact is not None:
                    compact.register(p)
            else:
                del state["indices"]
                if compact is not None:
                    compact.unregister(p)
        return changed


def _check_sharded_sparse(p: torch.Tensor, compact, describe) -> None:
    """A DTensor parameter under sparse storage: a 1-D mesh (its state dict's global form is
    split over one dimension; childopt.optim.sparse_shards), and no compact gradients."""
    if p.device_mesh.ndim != 1:
        raise NotImplementedError(f"storage='sparse' takes DTensor parameters on a 1-D device mesh; {describe(p)} is "
                                  f"on a {p.device_mesh.ndim}-D mesh ({tuple(p.placements)}): use storage='dense'")
    if compact is not None:
        raise NotImplementedError(f"compact_grads=True does not take DTensor (FSDP2) parameters, and {describe(p)} is "
                                  "one: FSDP2 sets each sharded gradient after its reduce-scatter, outside the "
                                  "autograd accumulation whose hook keeps the compact entries; use "
                                  "compact_grads=False (the step still reads only the selected entries)")


LAYOUTS = {"dense": DenseLayout(), "sparse": SparseLayout()}
