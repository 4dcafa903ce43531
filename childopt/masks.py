"""Exact top-p masks from importance scores, on the scores' device, without concatenating them.

``select_mask`` keeps, in every scope (all tensors, each layer, or each tensor), exactly its share
of ``reserve_p``: the largest scores, ties at the threshold taken in canonical order (the
mapping's order, then flat index).  The threshold comes from a radix select over the fp32 bit
patterns: three histogram passes (11, 11 and 10 bits) over all tensors and scopes at once, each
reading 4 bytes per element and keeping one 2048-bin histogram per scope; only those histograms
reach the host.  So there is no ``torch.cat`` of the model's scores, no 2**24 ``quantile`` limit
and no INT_MAX ``topk`` limit.  ``sample_mask`` draws an exact-size sample without replacement
(Gumbel top-k on ``log(score) / temperature``) on the same machinery.
"""
from __future__ import annotations

import math
import re
import struct
from collections.abc import Callable, Mapping
from typing import Hashable, Optional

import torch

from childopt import backends, philox

PASSES = ((21, 11), (10, 11), (0, 10))  # (shift, bits): 32 key bits, most significant first
SCOPES = ("global", "layer", "tensor")
# "encoder.layer.3.attention...", "model.layers.12.mlp...", "transformer.h.0.attn...", "blocks.7..."
LAYER_PATTERN = re.compile(r"(?:^|\.)(?:layer|layers|h|block|blocks)\.(\d+)(?:\.|$)")
GUMBEL_STREAM = 0x5A3D  # Philox counter words 2-3 of the Gumbel noise: apart from any optimizer step


def layer_index(name: str) -> Optional[int]:
    """The layer number in a parameter name (``encoder.layer.3.…`` -> 3), or None."""
    match = LAYER_PATTERN.search(name)
    return int(match.group(1)) if match else None


def apportion(reserve_p: float, sizes: list[int]) -> list[int]:
    """Entries to keep per scope: floor or ceil of ``reserve_p * size``, summing to ``round(reserve_p * N)``.

    Largest remainders (ties to earlier scopes) hand out the rounding, so a global, a layer-wise
    and a tensor-wise mask of the same scores always keep the same total.
    """
    total = round(reserve_p * sum(sizes))
    exact = [reserve_p * n for n in sizes]
    counts = [min(math.floor(x), n) for x, n in zip(exact, sizes)]
    order = sorted(range(len(sizes)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in order[: max(total - sum(counts), 0)]:
        counts[i] += 1
    return counts


def _scope_ids(names: list[str], scope: str, layer_of: Optional[Callable[[str], Hashable]]) -> list[int]:
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
    if scope == "global":
        return [0] * len(names)
    if scope == "tensor":
        return list(range(len(names)))
    keys = [(layer_of or layer_index)(name) for name in names]
    first_seen: dict = {}
    return [first_seen.setdefault(key, len(first_seen)) for key in keys]


def _key_to_float(key: int) -> float:
    bits = key ^ 0x80000000 if key & 0x80000000 else ~key & 0xFFFFFFFF
    return struct.unpack("<f", struct.pack("<I", bits))[0]


def _thresholds(backend, scores: list, scope_ids: list, ks: list, device) -> list[tuple[float, int]]:
    """Per scope, (tau, r): keep scores > tau and the first r scores == tau (three radix passes)."""
    n_scopes = len(ks)
    prefixes = [0] * n_scopes
    remaining = list(ks)
    for shift, bits in PASSES:
        prefix_tensor = torch.tensor(prefixes, dtype=torch.int64, device=device)
        hist = backend.radix_histogram(scores, scope_ids, prefix_tensor, shift, bits, n_scopes).cpu()
        for s in range(n_scopes):
            if remaining[s] == 0:
                continue
            from_top = hist[s].flip(0).cumsum(0)
            b = int(torch.searchsorted(from_top, remaining[s]))  # first cumulative count >= remaining
            remaining[s] -= int(from_top[b]) - int(hist[s].flip(0)[b])
            prefixes[s] = (prefixes[s] << bits) | (2**bits - 1 - b)
    return [(_key_to_float(prefixes[s]), remaining[s]) if ks[s] else (math.inf, 0) for s in range(n_scopes)]


def _check_scores(scores: Mapping) -> tuple[list, list]:
    if not isinstance(scores, Mapping) or not scores:
        raise TypeError("scores must be a non-empty mapping from name to a floating-point tensor")
    names, tensors = list(scores), list(scores.values())
    for name, t in zip(names, tensors):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise TypeError(f"scores[{name!r}] must be a floating-point tensor, got "
                            f"{t.dtype if isinstance(t, torch.Tensor) else type(t).__name__}")
        if t.device != tensors[0].device:
            raise ValueError(f"scores[{name!r}] is on {t.device}, the others on {tensors[0].device}: "
                             "move them to one device")
    nan = torch.stack([torch.isnan(t).any() for t in tensors]).tolist()
    if any(nan):
        raise ValueError(f"scores[{names[nan.index(True)]!r}] contains NaN")
    return names, tensors


def select_mask(scores: Mapping[str, torch.Tensor], reserve_p: float, *, scope: str = "global",
                layer_of: Optional[Callable[[str], Hashable]] = None, backend: str = "auto") -> dict:
    """Bool masks keeping the largest ``reserve_p`` share of ``scores`` per scope, exactly.

    Args:
        scores: name -> floating-point tensor (e.g. ``FisherAccumulator.scores()``), one device.
        reserve_p: share to keep, in [0, 1]; each scope keeps floor or ceil of its share
            (:func:`apportion`), so every scope choice keeps ``round(reserve_p * N)`` in total.
        scope: ``"global"`` (one threshold for all), ``"layer"`` (per layer: ``layer_of(name)``,
            default the number after ``layer.``/``layers.``/``h.``/``block.`` in the name; names
            without one form one more scope), or ``"tensor"``.
        backend: ``"auto"``, ``"triton"`` or ``"reference"`` for the histogram passes.

    Ties at the threshold are kept in the mapping's order, then by flat index.  Memory: one
    histogram per scope, plus, per tensor, the transient comparisons that build its mask.
    """
    if isinstance(reserve_p, bool) or not isinstance(reserve_p, (int, float)) or not 0.0 <= reserve_p <= 1.0:
        raise ValueError(f"reserve_p must be in [0, 1], got {reserve_p!r}")
    names, tensors = _check_scores(scores)
    scope_ids = _scope_ids(names, scope, layer_of)
    sizes = [0] * (max(scope_ids) + 1)
    for t, s in zip(tensors, scope_ids):
        sizes[s] += t.numel()
    ks = apportion(reserve_p, sizes)
    device = tensors[0].device
    impl = backends.create(backend, device)
    flat = [t.detach().reshape(-1).float().contiguous() for t in tensors]
    thresholds = _thresholds(impl, flat, scope_ids, ks, device)
    ties = torch.stack([(f == thresholds[s][0]).sum() for f, s in zip(flat, scope_ids)]).tolist()
    budgets = [r for _, r in thresholds]
    masks = {}
    for name, t, f, s, n_ties in zip(names, tensors, flat, scope_ids, ties):
        tau = thresholds[s][0]
        take = min(n_ties, budgets[s])
        budgets[s] -= take
        mask = f > tau
        if take == n_ties and take:
            mask |= f == tau
        elif take:
            equal = f == tau
            mask |= equal & (torch.cumsum(equal, 0) <= take)
        masks[name] = mask.view(t.shape)
    return masks


def sample_mask(scores: Mapping[str, torch.Tensor], reserve_p: float, *, temperature: float, seed: int,
                scope: str = "global", layer_of: Optional[Callable[[str], Hashable]] = None,
                backend: str = "auto") -> dict:
    """An exact-size sample without replacement, entries drawn with probability rising with score.

    Gumbel top-k: keep the top share of ``log(score) / temperature + G`` with ``G`` standard
    Gumbel noise from Philox (key ``seed``, counter = global element index / 4 in the mapping's
    order), so the draw is reproducible on every device.  ``temperature -> 0`` gives
    :func:`select_mask`'s result; a large temperature gives a uniform draw.  Scores must be >= 0
    (zero-score entries are drawn only after all others).  Memory: one perturbed fp32 copy of the
    scores.
    """
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    philox.check_seed(seed)
    names, tensors = _check_scores(scores)
    negative = torch.stack([(t < 0).any() for t in tensors]).tolist()
    if any(negative):
        raise ValueError(f"scores[{names[negative.index(True)]!r}] has negative entries; sample_mask needs scores >= 0")
    perturbed, base = {}, 0
    for name, t in zip(names, tensors):
        words = philox.random_words(t.numel(), base, seed, GUMBEL_STREAM, t.device)
        uniform = ((words >> 8).float() + 0.5) * 2.0**-24  # in (0, 1), exact in fp32
        gumbel = -torch.log(-torch.log(uniform))
        perturbed[name] = (torch.log(t.detach().reshape(-1).float()) / temperature + gumbel).view(t.shape)
        base += philox.rng_group_counts(t.numel())
    return select_mask(perturbed, reserve_p, scope=scope, layer_of=layer_of, backend=backend)
