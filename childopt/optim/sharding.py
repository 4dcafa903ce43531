"""Parameters sharded by FSDP2 (DTensors): placement checks, local shards and global offsets.

FSDP2 (``torch.distributed.fsdp.fully_shard``) turns each parameter into a DTensor whose local
tensor is a block of whole rows (``Shard(0)``; uneven, possibly empty on trailing ranks).  The
kernels step local tensors; what makes a step independent of the world size is that every
element keeps its *global* flat index: the Bernoulli counter of element ``j`` of a shard is that
of element ``offset + j`` of the full parameter (childopt.philox), and a full-shape mask is cut
to the same rows.  Any other placement (``Shard(1)``, ``Partial``, FSDP2 + TP's strided shards)
is refused, as its local tensor is not a block of the flattened parameter.
"""
from __future__ import annotations

import math

import torch

try:  # torch built without distributed support has no DTensor
    from torch.distributed.tensor import DTensor, Replicate, Shard
    # Written against torch's private helper: the public DTensor API exposes no global offset.
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
    DTENSOR = (DTensor,)
except ImportError:  # pragma: no cover - only on builds without torch.distributed
    DTENSOR = ()  # isinstance(t, ()) is False


def is_dtensor(t) -> bool:
    """Whether ``t`` is a DTensor (always False where torch has no distributed support)."""
    return isinstance(t, DTENSOR)


def local(t):
    """The local tensor of a DTensor (it shares storage: writes reach the DTensor), else ``t``."""
    return t.to_local() if isinstance(t, DTENSOR) else t


def locals_of(tensors: list) -> list:
    """:func:`local` of each tensor (None stays None)."""
    return [local(t) for t in tensors]


def element_offset(p: torch.Tensor, describe) -> int:
    """The flat index, in the full parameter, of the first element of ``p``'s local shard.

    0 for a plain tensor.  Raises for a placement whose local tensor is not a block of rows
    (``describe(p)`` names the parameter).
    """
    if not is_dtensor(p):
        return 0
    for placement in p.placements:
        if not (isinstance(placement, Replicate) or (type(placement) is Shard and placement.dim == 0)):
            raise ValueError(f"{describe(p)} is a DTensor placed as {tuple(p.placements)}; childopt steps DTensors "
                             f"sharded by rows (Shard(0), as FSDP2's fully_shard places them) or replicated, "
                             f"not {placement}")
    shape, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
    if tuple(shape[1:]) != tuple(p.shape[1:]) or any(offset[1:]):
        raise ValueError(f"{describe(p)}: its local shard {tuple(shape)} at {tuple(offset)} is not a block of whole rows "
                         f"of the parameter {tuple(p.shape)}")
    return offset[0] * math.prod(p.shape[1:]) if p.dim() else 0


def check_gradient(p: torch.Tensor, grad: torch.Tensor, describe) -> None:
    """A DTensor parameter needs a DTensor gradient of its placement; a plain one a plain gradient."""
    if is_dtensor(p) != is_dtensor(grad):
        kinds = ("a DTensor", "a plain tensor")
        raise TypeError(f"{describe(p)} is {kinds[not is_dtensor(p)]} but its gradient is {kinds[not is_dtensor(grad)]}; "
                        "shard the gradient as the parameter (FSDP2 does) or use plain tensors for both")
    if is_dtensor(p) and (grad.placements != p.placements or grad.device_mesh != p.device_mesh):
        raise ValueError(f"{describe(p)} is placed as {tuple(p.placements)} but its gradient as {tuple(grad.placements)}; "
                         "both must be sharded alike")


def shard_like(value: torch.Tensor, p: torch.Tensor, label: str, what: str = "mask") -> torch.Tensor:
    """``value`` (a full tensor of ``p``'s shape, or a DTensor placed as ``p``) as a DTensor like ``p``.

    A full tensor is cut to this rank's rows locally (no communication): every rank must pass
    the same full tensor, as each keeps only its own shard.  ``what`` names ``value`` in errors.
    """
    if is_dtensor(value):
        if value.placements != p.placements or value.device_mesh != p.device_mesh:
            raise ValueError(f"{what} for {label} is a DTensor placed as {tuple(value.placements)}; expected the "
                             f"parameter's placement {tuple(p.placements)}")
        return value.clone()
    start = element_offset(p, lambda _: label)
    rows = local(p).shape[0] if p.dim() else 1
    row_numel = math.prod(p.shape[1:]) if p.dim() else 1
    piece = value.reshape(-1)[start:start + rows * row_numel].reshape(local(p).shape)
    piece = piece.to(device=local(p).device, copy=True).contiguous()  # not a view that keeps the full mask
    return wrap_like(piece, p)


def wrap_like(piece: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """``piece``, a tensor of the shape of ``p``'s local shard, as a DTensor placed like ``p``."""
    return DTensor.from_local(piece, p.device_mesh, p.placements, run_check=False, shape=p.shape, stride=p.stride())


def world_size() -> int:
    """The ranks of the default process group; 1 without one.  A compiled step traces it without a
    graph break (dynamo folds it to a constant), so one process can skip the seed agreement there."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return 1


def agree_seed(seed: int, drawn: bool) -> int:
    """The Bernoulli seed every rank of the default process group uses (``seed`` without one).

    A drawn seed (``seed=None``) is replaced by rank 0's, so the ranks' masks agree; a seed the
    user gave must be the same on every rank, else every rank raises (no rank is left waiting).
    """
    if world_size() == 1:
        return seed
    seeds = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(seeds, (seed, drawn))
    if all(was_drawn for _, was_drawn in seeds):
        return seeds[0][0]
    given = {rank: value for rank, (value, was_drawn) in enumerate(seeds) if not was_drawn}
    if len(given) < len(seeds) or len(set(given.values())) > 1:
        by_rank = ", ".join(f"rank {rank}: {'None' if was_drawn else value}" for rank, (value, was_drawn)
                            in enumerate(seeds))
        raise ValueError(f"MaskedAdamW's seed differs between ranks ({by_rank}): their Bernoulli masks, and so "
                         "their replicas, would drift apart; pass the same seed on every rank, or seed=None "
                         "on every rank to use rank 0's")
    return seed
