"""Scores sharded across ranks (FSDP2 DTensors): what select_mask needs to choose globally.

``select_mask`` and ``sample_mask`` take DTensor scores placed ``Shard(0)`` on a 1-D mesh (the
Fisher scores of an FSDP2 model).  Each rank histograms its own shards; the histograms are summed
over the mesh's process group, so every rank finds the same thresholds as one process over the
full scores.  Ties at a threshold are taken in canonical order (the mapping's order, then the
global flat index): shards of a tensor lie on the ranks in rank order, so a rank's share of a
tensor's ties is what its predecessors' tie counts leave.  The result equals the single-process
mask bit for bit; only histograms and per-tensor tie counts cross the network.
"""
from __future__ import annotations

import torch

from childopt.optim import sharding


class ScoreShards:
    """The scores' placement: plain tensors (one process) or DTensor shards of one mesh."""

    def __init__(self, names: list, tensors: list):
        sharded = [sharding.is_dtensor(t) for t in tensors]
        self.mesh = None
        if not any(sharded):
            return
        if not all(sharded):
            plain = names[sharded.index(False)]
            raise TypeError(f"scores mix DTensors and plain tensors (scores[{plain!r}] is plain): pass all as "
                            "DTensors sharded like the parameters, or all as full tensors")
        self.mesh = tensors[0].device_mesh
        for name, t in zip(names, tensors):
            if t.device_mesh != self.mesh or self.mesh.ndim != 1 or t.dim() == 0 or \
                    tuple(t.placements) != (torch.distributed.tensor.Shard(0),):
                raise ValueError(f"scores[{name!r}] is placed as {tuple(t.placements)} on a {t.device_mesh.ndim}-D "
                                 "mesh; sharded scores must be Shard(0) on one 1-D mesh (FSDP2's placement)")
        self.device = sharding.local(tensors[0]).device  # collectives run where the scores are (NCCL: a GPU)
        self.group = self.mesh.get_group()
        self.rank = torch.distributed.get_rank(self.group)
        self.world = torch.distributed.get_world_size(self.group)
        self.offsets = [sharding.element_offset(t, lambda _: f"scores[{name!r}]") for name, t in zip(names, tensors)]

    @property
    def sharded(self) -> bool:
        return self.mesh is not None

    def local(self, tensors: list) -> list:
        return [sharding.local(t) for t in tensors]

    def any_rank(self, flags: list) -> list:
        """Per tensor, whether ``flags`` (one bool per tensor) holds on any rank: every rank then raises alike."""
        if not self.sharded:
            return flags
        reduced = torch.tensor(flags, dtype=torch.int64, device=self.device)
        torch.distributed.all_reduce(reduced, op=torch.distributed.ReduceOp.MAX, group=self.group)
        return [bool(x) for x in reduced.tolist()]

    def sum_histograms(self, hist: torch.Tensor) -> torch.Tensor:
        """The histograms summed over the ranks (in place on their device)."""
        if self.sharded:
            torch.distributed.all_reduce(hist, group=self.group)
        return hist

    def ties_before(self, local_ties: list) -> tuple[list, list]:
        """(ties of each full tensor, ties of each tensor on the ranks before this one)."""
        if not self.sharded:
            return local_ties, [0] * len(local_ties)
        mine = torch.tensor(local_ties, dtype=torch.int64, device=self.device)
        every = [torch.zeros_like(mine) for _ in range(self.world)]
        torch.distributed.all_gather(every, mine, group=self.group)
        table = torch.stack(every)
        return table.sum(0).tolist(), table[: self.rank].sum(0).tolist()

    def first_word(self, index: int) -> tuple[int, int]:
        """(Philox group, lane) of tensor ``index``'s first local element, from its global offset."""
        offset = self.offsets[index] if self.sharded else 0
        return offset // 4, offset % 4

    def wrap(self, local_mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """A local mask as a DTensor placed like the score ``like`` (or the mask itself)."""
        if not self.sharded:
            return local_mask
        return torch.distributed.tensor.DTensor.from_local(local_mask, self.mesh, like.placements, run_check=False,
                                                           shape=like.shape, stride=like.stride())
