"""DDP with a fixed child network: all-reduce only the gradient entries the optimizer can use.

Under a fixed mask (Child-Tuning-D; ``MaskedAdamW(mask={...})``, dense or sparse storage) the
step reads no gradient entry outside the child network: frozen entries never move, and under
``masked="zero_grad"`` their gradient is zeroed anyway.  :func:`register_child_network_hook`
installs a DDP communication hook that packs each bucket's child-network entries, averages
them with one all-reduce (DDP's own order: divide, then sum) and writes them back, so those
entries equal DDP's dense all-reduce while the bytes moved scale with ``reserve_p``.  The
indices are fixed with the mask and never sent.  Entries outside the child network are set to
zero on every rank, so anything else reading ``.grad`` (a norm, a clip) sees the same values on
every rank and the replicas cannot drift apart.  Parameters without a mask send every entry.
"""
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from childopt import sparse


@dataclass
class ChildNetworkHookState:
    """The hook's state: where each parameter's child network is, and the bytes moved so far."""

    optimizer: torch.optim.Optimizer
    process_group: object = None
    bytes_sent: int = 0  # all-reduced payload (per rank), summed over calls
    dense_bytes: int = 0  # what DDP's default hook would have all-reduced
    _positions: dict = field(default_factory=dict)

    def positions(self, bucket) -> torch.Tensor:
        """Flat positions, in the bucket's buffer, of its parameters' child-network entries."""
        params = bucket.parameters()
        key = (bucket.index(), tuple(id(p) for p in params))  # DDP rebuilds its buckets after step 1
        if key not in self._positions:
            buffer = bucket.buffer()
            pieces = []
            for p, grad in zip(params, bucket.gradients()):
                start = (grad.data_ptr() - buffer.data_ptr()) // buffer.element_size()
                pieces.append(start + self._selected(p).to(buffer.device))
            self._positions[key] = torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.int64)
        return self._positions[key]

    def _selected(self, p: torch.Tensor) -> torch.Tensor:
        state = self.optimizer.state.get(p, {})
        if "indices" in state:
            return state["indices"].to(torch.int64)
        if "mask" in state:
            return sparse.indices_from_mask(state["mask"]).to(torch.int64)
        return torch.arange(p.numel(), device=p.device)


def child_network_hook(state: ChildNetworkHookState, bucket) -> torch.futures.Future[torch.Tensor]:
    """The DDP communication hook (see the module docstring).

    DDP checks this return annotation as an object, so this module has no postponed annotations.
    """
    group = state.process_group if state.process_group is not None else dist.group.WORLD
    buffer = bucket.buffer()
    positions = state.positions(bucket)
    packed = buffer[positions]
    packed.div_(group.size())
    state.bytes_sent += packed.nbytes
    state.dense_bytes += buffer.nbytes

    def unpack(future) -> torch.Tensor:
        buffer.zero_()
        buffer[positions] = future.value()[0]
        return buffer

    return dist.all_reduce(packed, group=group, async_op=True).get_future().then(unpack)


def register_child_network_hook(ddp_model, optimizer, process_group=None) -> ChildNetworkHookState:
    """Install :func:`child_network_hook` on ``ddp_model`` for ``optimizer``'s fixed masks.

    Call it after the masks are set and before the first backward; a later ``set_mask`` is not
    seen (the positions are cached): register the hook on a fresh DDP wrapper instead.
    Returns the hook's state, whose ``bytes_sent`` and ``dense_bytes`` count the traffic.
    """
    kind = getattr(optimizer, "mask_kind", None)
    if kind not in ("dense", "none"):
        raise ValueError(f"the child-network hook needs a fixed mask (mask_kind 'dense'), but the optimizer's "
                         f"mask_kind is {kind!r}: a Bernoulli mask changes every step, so every entry must be "
                         "all-reduced (use DDP's default hook)")
    held = {p for group in optimizer.param_groups for p in group["params"]}
    missing = [name for name, p in ddp_model.module.named_parameters() if p.requires_grad and p not in held]
    if missing:
        raise ValueError(f"the optimizer does not hold {missing[0]!r} of the DDP model; build it from "
                         "ddp_model.module's parameters")
    state = ChildNetworkHookState(optimizer, process_group)
    group = process_group if process_group is not None else dist.group.WORLD
    named = [(name, p) for name, p in ddp_model.module.named_parameters() if p.requires_grad]
    selected = [state._selected(p) for _, p in named]
    # Masks that differ between ranks would average different entries and drift the replicas.
    name_of = lambda i: repr(named[i][0])  # noqa: E731
    _check_same_on_every_rank([len(s) for s in selected], name_of, "child-network entries", group)
    _check_same_on_every_rank([int(s.sum()) for s in selected], name_of, "child-network positions", group)
    ddp_model.register_comm_hook(state, child_network_hook)
    return state


def _check_same_on_every_rank(values: list, name_of, what: str, group) -> None:
    """Raise on every rank unless each rank holds the same ``values`` (one all-reduce of integers);
    ``name_of(i)`` names entry ``i`` in the message."""
    if not values:
        return
    mine = torch.tensor(values, dtype=torch.int64)
    if dist.get_backend(group) == "nccl":
        mine = mine.cuda()
    both = torch.cat([mine, -mine])
    dist.all_reduce(both, op=dist.ReduceOp.MAX, group=group)  # [max over ranks, -min over ranks]
    differs = (both[: len(values)] != -both[len(values):]).nonzero()
    if len(differs):
        raise ValueError(f"the ranks disagree on the {what} of {name_of(int(differs[0]))}: every rank must hold the "
                         "same masks and gradients for the same parameters, as DDP requires")


_DTYPE_CODES = {torch.float32: 1, torch.bfloat16: 2, torch.float16: 3, torch.float64: 4}  # others: 15


def all_reduce_gradients(optimizer, process_group=None) -> int:
    """Average, over the ranks, every gradient ``optimizer.step()`` will use; return the bytes sent.

    The gradients are the compact buffers of ``compact_grads=True`` parameters and ``.grad`` of
    the others, in the optimizer's parameter order, packed into one buffer per dtype, divided by
    the world size and summed (DDP's order, so the result equals DDP's on those entries).  Every
    rank must have gradients of the same size and dtype for the same parameters, as under DDP:
    one small all-reduce checks it first, and a mismatch raises on every rank.
    """
    group = process_group if process_group is not None else dist.group.WORLD
    compact = optimizer.compact_gradients()
    by_dtype: dict = {}
    layout = []  # per parameter: no gradient (0), else its size and dtype, which every rank must share
    params = [p for param_group in optimizer.param_groups for p in param_group["params"]]
    for p in params:
        grad = compact.get(p, p.grad)
        layout.append(0 if grad is None else 1 + grad.numel() * 16 + _DTYPE_CODES.get(grad.dtype, 15))
        if grad is not None:
            by_dtype.setdefault((grad.device, grad.dtype), []).append(grad)
    _check_same_on_every_rank(layout, lambda i: optimizer.describe(params[i]), "gradient (present, size, dtype)",
                              group)
    sent = 0
    for grads in by_dtype.values():
        packed = torch.cat([g.reshape(-1) for g in grads])
        packed.div_(group.size())
        dist.all_reduce(packed, group=group)
        sent += packed.nbytes
        for grad, reduced in zip(grads, packed.split([g.numel() for g in grads])):
            grad.copy_(reduced.view_as(grad))
    return sent
