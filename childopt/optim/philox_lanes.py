"""Bernoulli steps of shards that start inside a 4-element Philox group.

The kernels draw element ``j`` of a tensor from lane ``j % 4`` of Philox group
``rng_base + j // 4``.  A shard of a parameter (FSDP2) starts at global element ``offset``; when
``offset % 4 = r != 0`` its first ``h = 4 - r`` elements live in lanes ``r..3`` of a group.  So
that their draws equal a single process's, each such tensor is stepped as two pieces with the
unchanged kernels: its body from element ``h`` on (a view, group ``rng_base + 1``, lane 0) and
its head copied into small tensors padded with ``r`` leading elements (group ``rng_base``),
whose results are copied back.  The padding's results are discarded.

Under ``torch.compile`` the split runs eagerly (one graph break, only in a sharded Bernoulli step
with such a shard): traced, its slices of an FSDP2 gradient's local tensor, whose sizes dynamo
makes symbolic, lead AOT autograd to add shape guards on symbols of its own copy of the DTensor
input, which dynamo cannot build (``sources must not be empty for symbol ...``).  Run eagerly,
the pieces reach the graph as plain tensors of fixed sizes, with no guard on the split.
"""
from __future__ import annotations

import torch

MUTATED = ("params", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs")
LISTS = (*MUTATED, "grads", "state_steps", "rng_bases")


@torch.compiler.disable
def split_heads(lists: dict, rng_lanes: list) -> tuple[dict, list]:
    """``lists`` (the step's parallel lists by name, see LISTS) with each tensor whose lane is not 0 split.

    Returns the new lists and the ``(destination, source)`` copies to make after the step.
    A piece's step count is a copy of its tensor's, so the step advances each tensor once.
    """
    out = {name: [] for name in LISTS}
    writebacks = []
    for i, lane in enumerate(rng_lanes):
        row = {name: lists[name][i] if lists[name] is not None else None for name in LISTS}
        numel = row["params"].numel()
        if lane == 0 or numel == 0:
            _append(out, row)
            continue
        for name in MUTATED:  # a split needs flat views: a strided tensor is stepped as a copy written back whole
            tensor = row[name]
            if tensor is not None and not tensor.is_contiguous():
                row[name] = tensor.contiguous()
                writebacks.append((tensor, row[name]))
        head = min(4 - lane, numel)
        padded = {name: _padded(row[name], lane, head) for name in (*MUTATED, "grads")}
        padded["state_steps"] = row["state_steps"].clone()
        padded["rng_bases"] = row["rng_bases"]
        _append(out, padded)
        copies = [(row[name].reshape(-1)[:head], padded[name][lane:]) for name in MUTATED if row[name] is not None]
        if numel > head:
            body = {name: row[name].reshape(-1)[head:] if row[name] is not None else None for name in (*MUTATED, "grads")}
            body["state_steps"] = row["state_steps"]
            body["rng_bases"] = row["rng_bases"] + 1
            _append(out, body)
        else:  # no body steps the tensor's own count
            copies.append((row["state_steps"], padded["state_steps"]))
        writebacks[:0] = copies  # heads land in a contiguous copy before it is written back whole
    return {name: (out[name] if lists[name] is not None else None) for name in LISTS}, writebacks


def _padded(tensor, lane: int, head: int):
    if tensor is None:
        return None
    flat = tensor.reshape(-1)
    padded = torch.zeros(lane + head, dtype=tensor.dtype, device=tensor.device)
    padded[lane:] = flat[:head]
    return padded


def _append(out: dict, row: dict) -> None:
    for name in LISTS:
        out[name].append(row[name])
