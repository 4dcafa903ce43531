"""Host side of childopt's multi-tensor launches: per-tensor offset tables and chunk maps.

Every tensor list of a launch is addressed as one base pointer (its first tensor) plus a
per-tensor int64 *element* offset in a device table.  Keeping the base a real pointer argument
keeps Triton's 16-byte alignment facts, and ``tl.multiple_of`` on the offsets restores them per
tensor, so contiguous accesses vectorise.  Each program owns one chunk of ``block * iters``
elements of one tensor; the chunk -> (tensor, start) map is built here.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from childopt.transfer import to_device

# No multiply-add contraction: the rounding of every step is then the same on every Triton
# version (3.9 contracts by default, 3.10 will not) and closer to torch's separate ops.
FP_FUSION = False
DEFAULT_BLOCK = 1024
DEFAULT_ITERS = 4


@dataclass
class Plan:
    """Device tables of one bucket: per-tensor columns and the chunk -> tensor map.

    It holds no reference to the bucket's tensors (a cached plan must not keep freed gradients
    alive): the offsets are relative to the first tensor of each list, passed at launch.
    """

    table: torch.Tensor
    chunk_tensor: torch.Tensor
    chunk_start: torch.Tensor
    aligns: tuple
    block: int
    iters: int


def vector_align(tensors: list[torch.Tensor]) -> int:
    """How many elements every offset is a multiple of when all tensors are 16-byte aligned."""
    if all(t.data_ptr() % 16 == 0 for t in tensors):
        return max(16 // tensors[0].element_size(), 1)
    return 1


def element_offsets(tensors: list[torch.Tensor], what: str) -> list[int]:
    """Element offsets of each tensor from the first one (they must share dtype and alignment)."""
    base = tensors[0]
    size = base.element_size()
    offsets = []
    for t in tensors:
        delta = t.data_ptr() - base.data_ptr()
        if delta % size or t.dtype != base.dtype:
            raise ValueError(f"{what}: tensors of one launch must share dtype and element alignment")
        offsets.append(delta // size)
    return offsets


def make_plan(lists: dict, extra_columns: list, sizes: list, align_groups: list, *,
              block: int = DEFAULT_BLOCK, iters: int = DEFAULT_ITERS) -> Plan:
    """Table columns = offsets of each named list, then ``extra_columns``; chunks cover ``sizes``."""
    if block < 4 or block & (block - 1):
        raise ValueError(f"block must be a power of two >= 4, got {block}")
    columns = [element_offsets(tensors, name) for name, tensors in lists.items()] + list(extra_columns)
    device = next(iter(lists.values()))[0].device
    table = to_device(torch.tensor(columns, dtype=torch.int64).t().contiguous(), device)
    chunk = block * iters
    counts = torch.tensor([(k + chunk - 1) // chunk for k in sizes], dtype=torch.int64)
    first_chunk = torch.cumsum(counts, 0) - counts
    chunk_tensor = torch.repeat_interleave(torch.arange(len(sizes), dtype=torch.int32), counts)
    chunk_ids = torch.arange(int(counts.sum()), dtype=torch.int64)
    chunk_start = (chunk_ids - first_chunk.repeat_interleave(counts)) * chunk
    return Plan(table=table, chunk_tensor=to_device(chunk_tensor, device), chunk_start=to_device(chunk_start, device),
                aligns=tuple(vector_align(group) for group in align_groups), block=block, iters=iters)
