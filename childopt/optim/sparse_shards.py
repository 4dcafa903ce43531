"""Sparse-index storage of DTensor (FSDP2) parameters: per-shard state, global state dicts.

Each rank keeps the selected entries of its own rows: flat ``indices`` into its local shard and
compact moments of the same length, so a step needs no communication.  A state dict holds the
*global* form, the one a single process saves: the sorted global flat indices and the
compact moments, each a 1-D DTensor of the parameter's selected count K split evenly over the
mesh (``Shard(0)``, torch's chunking), which torch.distributed.checkpoint saves and reshards
like any DTensor.  Rows are sharded in order, so each rank's entries are one contiguous run of
the global order, and moving between the two forms is one ``all_to_all_single`` per tensor.
A replicated parameter's global form is its local one.
"""
from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from childopt import sparse
from childopt.optim import sharding
from childopt.optim.saved_state import SQUARED_MOMENTS
from childopt.optim.state import MOMENT_KEYS

try:
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor, Replicate, Shard
except ImportError:  # pragma: no cover - only on builds without torch.distributed
    dist = None


def _sharded(t: torch.Tensor) -> bool:
    return isinstance(t.placements[0], Shard)


def _chunks(size: int, world: int) -> list:
    """torch's Shard(0) split of ``size`` rows over ``world`` ranks, as (start, end) per rank."""
    ranges = []
    for rank in range(world):
        length, start = Shard.local_shard_size_and_offset(size, world, rank)
        ranges.append((start, start + length))
    return ranges


def _exchange(tensor: torch.Tensor, held: list, wanted: list, rank: int, group) -> torch.Tensor:
    """Entries ``held[rank]`` of one global order in, entries ``wanted[rank]`` out (all ranks call it)."""
    def overlap(a, b):
        return max(0, min(a[1], b[1]) - max(a[0], b[0]))

    send = [overlap(held[rank], w) for w in wanted]
    receive = [overlap(h, wanted[rank]) for h in held]
    out = tensor.new_empty(sum(receive))
    dist.all_to_all_single(out, tensor.contiguous(), receive, send, group=group)
    return out


def _global_dtensor(value: torch.Tensor, like: torch.Tensor, total: int) -> torch.Tensor:
    placements = [Shard(0)] if _sharded(like) else [Replicate()]
    return DTensor.from_local(value, like.device_mesh, placements, run_check=False, shape=torch.Size([total]),
                              stride=(1,))


def _by_mesh(entries: list) -> dict:
    groups: dict = {}
    for i, (p, *_rest) in enumerate(entries):
        groups.setdefault(p.device_mesh, []).append(i)
    return groups


def global_states(entries: list, describe) -> list:
    """The global form of each ``(DTensor parameter, its sparse state)``, as new state dicts.

    A collective over each parameter's mesh: every rank calls it with the same parameters.
    """
    results = [None] * len(entries)
    for mesh, members in _by_mesh(entries).items():
        group, world, rank = mesh.get_group(0), mesh.size(0), mesh.get_local_rank(0)
        counts = torch.tensor([entries[i][1]["indices"].numel() for i in members], dtype=torch.int64)
        every = [torch.empty_like(counts) for _ in range(world)]
        dist.all_gather(every, counts, group=group)
        for column, i in enumerate(members):
            p, state = entries[i]
            offset = sharding.element_offset(p, describe)
            indices = (state["indices"].to(torch.int64) + offset).to(sparse.index_dtype(p.numel()))
            out = {key: value for key, value in state.items() if key not in ("indices", *MOMENT_KEYS)}
            if not _sharded(p):
                total = indices.numel()
                out.update({key: _global_dtensor(state[key].clone(), p, total)
                            for key in MOMENT_KEYS if key in state})
                out["indices"] = _global_dtensor(indices, p, total)
            else:
                sizes = [int(c[column]) for c in every]
                total, starts = sum(sizes), [sum(sizes[:r]) for r in range(world)]
                held = [(s, s + n) for s, n in zip(starts, sizes)]
                wanted = _chunks(total, world)
                out["indices"] = _global_dtensor(_exchange(indices, held, wanted, rank, group), p, total)
                for key in MOMENT_KEYS:
                    if key in state:
                        out[key] = _global_dtensor(_exchange(state[key], held, wanted, rank, group), p, total)
            results[i] = out
    return results


def is_global_form(saved) -> bool:
    """Whether a saved parameter state holds global indices (every sparse state dict does)."""
    return isinstance(saved, Mapping) and isinstance(saved.get("indices"), torch.Tensor)


def local_states(entries: list, describe) -> list:
    """Each ``(DTensor parameter, saved global-form state)`` as this rank's local sparse state.

    The saved indices and moments are DTensors split over the parameter's mesh (a distributed
    checkpoint loaded into this optimizer's state dict) or full tensors (one process's state
    dict; every rank cuts its own rows without communication).  Indices that are not sorted,
    unique global indices of the parameter, and moments that are not finite (or negative, for
    second moments) raise the same clear error on every rank, before anything moves.
    """
    results = [None] * len(entries)
    split = [i for i, (p, saved) in enumerate(entries)
             if sharding.is_dtensor(saved["indices"]) and _sharded(saved["indices"])]
    for i, (p, saved) in enumerate(entries):
        if i not in split:
            full = {key: sharding.local(v) if key == "indices" or key in MOMENT_KEYS else v for key, v in saved.items()}
            results[i] = _cut_own_rows(p, full, describe)
    for mesh, members in _by_mesh([entries[i] for i in split]).items():
        members = [split[m] for m in members]
        group, world, rank = mesh.get_group(0), mesh.size(0), mesh.get_local_rank(0)
        for i in members:
            _check_split(entries[i][1], entries[i][0], describe)
        # One all-gather tells every rank what each rank's piece holds (its problems, its ends,
        # and how many of its entries lie below each rank's first row), so every rank reaches the
        # same verdict before anything moves, and finds where each rank's rows start in the
        # global order: a bad piece raises on every rank instead of leaving the others waiting.
        mine = torch.tensor([_piece_summary(*entries[i]) for i in members], dtype=torch.int64)
        every = [torch.empty_like(mine) for _ in range(world)]
        dist.all_gather(every, mine, group=group)
        for row, i in enumerate(members):
            _raise_for_bad_pieces(entries[i][0], [piece[row].tolist() for piece in every], describe)
        for row, i in enumerate(members):
            p, saved = entries[i]
            total = saved["indices"].shape[0]
            held = _chunks(total, world)
            positions = sum(piece[row, _SUMMARY:] for piece in every).tolist() + [total]
            wanted = [(positions[r], positions[r + 1]) for r in range(world)]
            moved = {key: _exchange(sharding.local(saved[key]), held, wanted, rank, group)
                     for key in ("indices", *MOMENT_KEYS) if key in saved}
            rest = {key: value for key, value in saved.items() if key not in moved}
            results[i] = _localize(p, {**rest, **moved}, describe)
    return results


# A piece's summary: a problem code, its first and last index, then its entries below each
# rank's first row.  Codes: 1 indices unsorted or out of range; 10 + k moment k not finite;
# 20 + k moment k (a squared one) negative or NaN (k indexes MOMENT_KEYS).
_SUMMARY = 3
_BAD_INDICES, _NOT_FINITE, _NEGATIVE = 1, 10, 20


def _piece_summary(p: torch.Tensor, saved: Mapping) -> list:
    """This rank's piece of a split global-form state, as :data:`_SUMMARY` numbers and counts."""
    indices = sharding.local(saved["indices"]).to(torch.int64)
    problem = 0
    if indices.numel() and (int(indices[0]) < 0 or int(indices[-1]) >= p.numel()
                            or not bool((indices[1:] > indices[:-1]).all())):
        problem = _BAD_INDICES
    for k, key in enumerate(MOMENT_KEYS):
        value = sharding.local(saved[key]) if key in saved else None
        if problem or value is None or not value.numel():
            continue
        if key in SQUARED_MOMENTS and not bool((value >= 0).all()):
            problem = _NEGATIVE + k
        elif not bool(torch.isfinite(value).all()):
            problem = _NOT_FINITE + k
    ends = [int(indices[0]), int(indices[-1])] if indices.numel() else [-1, -1]
    return [problem, *ends, *(int(torch.searchsorted(indices, start)) for start in _row_blocks(p))]


def _raise_for_bad_pieces(p: torch.Tensor, pieces: list, describe) -> None:
    """Every rank's verdict on the pieces of one parameter (the same numbers on every rank)."""
    label = describe(p)
    problem = next((piece[0] for piece in pieces if piece[0]), 0)
    lasts = [piece[2] for piece in pieces if piece[1] >= 0]
    firsts = [piece[1] for piece in pieces if piece[1] >= 0]
    if problem == _BAD_INDICES or any(first <= last for first, last in zip(firsts[1:], lasts)):
        raise ValueError(f"saved 'indices' for {label}: indices must be strictly increasing and inside "
                         f"[0, {p.numel()})")
    if problem >= _NEGATIVE:
        raise ValueError(f"saved {MOMENT_KEYS[problem - _NEGATIVE]!r} for {label} has negative or NaN entries; a "
                         "second moment is a running mean of squares (>= 0)")
    if problem >= _NOT_FINITE:
        raise ValueError(f"saved {MOMENT_KEYS[problem - _NOT_FINITE]!r} for {label} has inf or NaN entries; the "
                         "next step would make the parameter NaN")


def _row_blocks(p: torch.Tensor) -> list:
    """The global flat index at which each rank's rows start, rank by rank."""
    row_numel = math.prod(p.shape[1:])  # from the shape: indexing a DTensor row would gather it
    return [start * row_numel for start, _ in _chunks(p.shape[0] if p.dim() else 1, p.device_mesh.size(0))]


def _check_split(saved: Mapping, p: torch.Tensor, describe) -> None:
    """Split saved entries must be 1-D, of one length, on the parameter's mesh."""
    total = saved["indices"].shape
    for key, value in saved.items():
        if key != "indices" and key not in MOMENT_KEYS:
            continue
        if not sharding.is_dtensor(value) or value.device_mesh != p.device_mesh or value.shape != total \
                or value.dim() != 1 or value.placements != saved["indices"].placements:
            raise ValueError(f"saved {key!r} for {describe(p)} must be a 1-D DTensor of the saved indices' shape "
                             f"{tuple(total)}, split on the parameter's mesh as the indices are")


def _cut_own_rows(p: torch.Tensor, saved: Mapping, describe) -> dict:
    """This rank's entries of a full global-form state (plain tensors)."""
    indices = saved["indices"]
    sparse.check_indices(indices, p.numel(), f"saved 'indices' for {describe(p)}")
    for key in MOMENT_KEYS:
        if key in saved and (not isinstance(saved[key], torch.Tensor) or saved[key].shape != indices.shape):
            shape = tuple(saved[key].shape) if isinstance(saved[key], torch.Tensor) else type(saved[key]).__name__
            raise ValueError(f"saved {key!r} for {describe(p)} has shape {shape}, expected the indices' "
                             f"{tuple(indices.shape)}")
    start = sharding.element_offset(p, describe)
    wide = indices.to(torch.int64)
    lo, hi = (int(torch.searchsorted(wide, bound)) for bound in (start, start + sharding.local(p).numel()))
    mine = {key: saved[key][lo:hi] for key in ("indices", *MOMENT_KEYS) if key in saved}
    return _localize(p, {**saved, **mine}, describe)


def _localize(p: torch.Tensor, saved: dict, describe) -> dict:
    """Global indices of this rank's rows made local, in the narrowest index dtype."""
    start, numel = sharding.element_offset(p, describe), sharding.local(p).numel()
    local_indices = saved["indices"].to(torch.int64) - start
    sparse.check_indices(local_indices, numel, f"saved 'indices' for {describe(p)} (this rank's rows, "
                                               f"shifted by their offset {start})")
    return {**saved, "indices": local_indices.to(sparse.index_dtype(numel))}
