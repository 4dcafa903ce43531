"""Exact top-p masks from importance scores, on the scores' device, without concatenating them.

``select_mask`` keeps, in every scope (all tensors, each layer, or each tensor), exactly its share
of ``reserve_p``: the largest scores, ties at the threshold taken in canonical order (the
mapping's order, then flat index).  The threshold comes from a radix select over the scores' bit
patterns: for fp32 (and fp16/bf16) scores, three histogram passes (11, 11 and 10 bits) of the
backend's ``radix_histogram`` op over all tensors and scopes at once, each reading 4 bytes per
element and keeping one 2048-bin histogram per scope; only those histograms reach the host.
Float64 scores are selected in float64 (the kernels histogram 32-bit keys): six plain-torch
passes over 64-bit keys, so scores that differ below fp32 precision are still told apart.  So
there is no ``torch.cat`` of the model's scores, no 2**24 ``quantile`` limit and no INT_MAX
``topk`` limit.  ``sample_mask`` draws an exact-size sample without replacement (Gumbel top-k on
``log(score) / temperature``) on the same machinery.
"""
from __future__ import annotations

import math
import re
import struct
from collections.abc import Callable, Mapping
from fractions import Fraction
from typing import Hashable, Optional

import torch

from childopt import backends, philox
from childopt.importance import PIECE
from childopt.optim.validation import check_number
from childopt.score_shards import ScoreShards

# (shift, bits) per pass, most significant first: 32-bit keys (fp32) and 64-bit keys (float64)
PASSES = ((21, 11), (10, 11), (0, 10))
PASSES_64 = ((53, 11), (42, 11), (31, 11), (20, 11), (10, 10), (0, 10))
_KEY_FORMATS = {32: ("<I", "<f"), 64: ("<Q", "<d")}  # struct formats: unsigned key bits, float
SCOPES = ("global", "layer", "tensor")
# "encoder.layer.3.attention...", "model.layers.12.mlp...", "transformer.h.0.attn...", "blocks.7..."
LAYER_PATTERN = re.compile(r"(?:^|\.)(?:layer|layers|h|block|blocks)\.(\d+)(?:\.|$)")
GUMBEL_STREAM = 0x5A3D  # Philox counter words 2-3 of the Gumbel noise: apart from any optimizer step
# The Gumbel noise lies in [-2.86, 17.33] (uniforms in [2**-25, 1 - 2**-25]), so keys this far
# below log(smallest positive float) or above log(largest float) are below or above the key of
# every finite positive score, whatever the temperature (sample_mask's zero and infinite scores).
_KEY_MARGIN = 32.0


def layer_key(name: str) -> Optional[str]:
    """The layer of a parameter name: the name up to its layer number (``model.encoder.layers.3.fc1.weight``
    -> ``model.encoder.layers.3``), or None.  The whole prefix, not the number alone, keeps an
    encoder's layer 3 and a decoder's layer 3 (BART, T5) apart."""
    match = LAYER_PATTERN.search(name)
    return name[:match.end(1)] if match else None


def apportion(reserve_p: float, sizes: list[int]) -> list[int]:
    """Entries to keep per scope: floor or ceil of ``reserve_p * size``, summing to ``round(reserve_p * N)``.

    Largest remainders (ties to earlier scopes) hand out the rounding, so a global, a layer-wise
    and a tensor-wise mask of the same scores always keep the same total.  The shares are
    computed exactly from ``reserve_p`` as written (its shortest decimal form, so ``0.3 * 31``
    and ``0.3 * 21`` tie at remainder 0.3 and the earlier scope wins), not from float products
    whose rounding noise would break such ties arbitrarily.
    """
    total = round(reserve_p * sum(sizes))
    share = Fraction(repr(float(reserve_p)))
    exact = [share * n for n in sizes]
    counts = [min(math.floor(x), n) for x, n in zip(exact, sizes)]
    order = sorted(range(len(sizes)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in order[: max(total - sum(counts), 0)]:
        counts[i] += 1
    return counts


def scope_ids(names: list[str], scope: str, layer_of: Optional[Callable[[str], Hashable]]) -> list[int]:
    """The scope number of each name: all 0 (global), one per layer key in order of appearance, or one per tensor."""
    _check_scope(scope)
    if scope == "global":
        return [0] * len(names)
    if scope == "tensor":
        return list(range(len(names)))
    keys = [(layer_of or layer_key)(name) for name in names]
    first_seen: dict = {}
    return [first_seen.setdefault(key, len(first_seen)) for key in keys]


def _check_scope(scope: str) -> None:
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")


def check_selection(reserve_p, scope: str) -> float:
    """``reserve_p`` as a float in [0, 1] (numpy scalars and 0-dim tensors too) and ``scope`` one of
    SCOPES, or a clear error: fisher_mask asks before its Fisher pass, not after it."""
    _check_scope(scope)
    return check_number(reserve_p, "reserve_p", low=0.0, high=1.0)


def _key_to_float(key: int, width: int = 32) -> float:
    """The float whose order-preserving unsigned key (see ``_keys_64``, ``reference.score_keys``) is ``key``."""
    sign = 1 << (width - 1)
    bits = key ^ sign if key & sign else ~key & ((1 << width) - 1)
    unsigned, floating = _KEY_FORMATS[width]
    return struct.unpack(floating, struct.pack(unsigned, bits))[0]


def _keys_64(scores: torch.Tensor) -> torch.Tensor:
    """Order-preserving unsigned 64-bit keys (as int64 bit patterns) of float64 scores, -0.0 as +0.0."""
    bits = (scores + 0.0).view(torch.int64)
    return torch.where(bits < 0, ~bits, bits ^ -(2**63))


def _histogram_64(scores: list, scope_ids: list, prefixes: list, shift: int, bits: int, n_scopes: int):
    """Per scope, counts of the 64-bit keys under the scope's prefix, by their ``bits`` bits at ``shift``.

    The float64 counterpart of the ``radix_histogram`` op, in plain torch (the kernels take fp32).
    """
    device = scores[0].device
    prefix_tensor = torch.tensor(prefixes, dtype=torch.int64, device=device)
    hist = torch.zeros(n_scopes, 2**bits, dtype=torch.int64, device=device)
    for s, scope in zip(scores, scope_ids):
        keys = _keys_64(s)
        if shift + bits < 64:  # the shift sign-extends: mask back to the 64 - shift - bits prefix bits
            keys = keys[((keys >> (shift + bits)) & (2 ** (64 - shift - bits) - 1)) == prefix_tensor[scope]]
        hist[scope] += torch.bincount((keys >> shift) & (2**bits - 1), minlength=2**bits)
    return hist


def _thresholds(histogram: Callable, passes: tuple, width: int, ks: list) -> list[tuple[float, int]]:
    """Per scope, (tau, r): keep scores > tau and the first r scores == tau (a radix select).

    ``histogram(prefixes, shift, bits)`` gives the host copy of one pass's per-scope histograms.
    """
    n_scopes = len(ks)
    prefixes = [0] * n_scopes
    remaining = list(ks)
    for shift, bits in passes:
        hist = histogram(prefixes, shift, bits)
        for s in range(n_scopes):
            if remaining[s] == 0:
                continue
            from_top = hist[s].flip(0).cumsum(0)
            b = int(torch.searchsorted(from_top, remaining[s]))  # first cumulative count >= remaining
            remaining[s] -= int(from_top[b]) - int(hist[s].flip(0)[b])
            prefixes[s] = (prefixes[s] << bits) | (2**bits - 1 - b)
    return [(_key_to_float(prefixes[s], width), remaining[s]) if ks[s] else (math.inf, 0) for s in range(n_scopes)]


def _check_scores(scores: Mapping) -> tuple[list, list, ScoreShards]:
    """Names, tensors and placement of ``scores``; a NaN on any rank raises on every rank."""
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
    shards = ScoreShards(names, tensors)
    nan = shards.any_rank(torch.stack([torch.isnan(t).any() for t in shards.local(tensors)]).tolist())
    if any(nan):
        raise ValueError(f"scores[{names[nan.index(True)]!r}] contains NaN")
    return names, tensors, shards


def _key_dtype(tensors: list) -> torch.dtype:
    """float64 when any score is float64 (selected in float64), else float32 (exact for fp16/bf16)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _radix_passes(flat: list, scope_ids: list, n_scopes: int, backend: str,
                  shards: ScoreShards) -> tuple[Callable, tuple, int]:
    """(histogram(prefixes, shift, bits), passes, key width) for scores of ``flat``'s dtype.

    fp32 scores use the backend's ``radix_histogram`` op; float64 scores, which its 32-bit keys
    cannot order, use :func:`_histogram_64` on the scores' device, like :func:`backends.route`
    sends dtypes the kernels do not cover to plain torch.  Sharded scores' histograms are
    summed over the ranks before they reach the host.
    """
    if flat[0].dtype == torch.float64:
        backends.check_name(backend)
        return (lambda prefixes, shift, bits: shards.sum_histograms(
            _histogram_64(flat, scope_ids, prefixes, shift, bits, n_scopes)).cpu(), PASSES_64, 64)
    device = flat[0].device
    impl = backends.create(backend, device)

    def histogram(prefixes: list, shift: int, bits: int) -> torch.Tensor:
        prefix_tensor = torch.tensor(prefixes, dtype=torch.int64, device=device)
        return shards.sum_histograms(impl.radix_histogram(flat, scope_ids, prefix_tensor, shift, bits,
                                                          n_scopes)).cpu()

    return histogram, PASSES, 32


def select_mask(scores: Mapping[str, torch.Tensor], reserve_p: float, *, scope: str = "global",
                layer_of: Optional[Callable[[str], Hashable]] = None, backend: str = "auto") -> dict:
    """Bool masks keeping the largest ``reserve_p`` share of ``scores`` per scope, exactly.

    Args:
        scores: name -> floating-point tensor (e.g. ``FisherAccumulator.scores()``), one device.
            When any is float64, all are compared in float64; otherwise in fp32.
        reserve_p: share to keep, in [0, 1]; each scope keeps floor or ceil of its share
            (:func:`apportion`), so every scope choice keeps ``round(reserve_p * N)`` in total.
        scope: ``"global"`` (one threshold for all), ``"layer"`` (per layer: ``layer_of(name)``,
            default :func:`layer_key`, the name up to the number after ``layer.``/``layers.``/``h.``/
            ``block.``; names without one form one more scope), or ``"tensor"``.
        backend: ``"auto"``, ``"triton"`` or ``"reference"`` for the fp32 histogram passes
            (float64 scores take plain-torch passes whatever the backend).

    Ties at the threshold are kept in the mapping's order, then by flat index.  Memory: one
    histogram per scope, plus, per tensor, the transient comparisons that build its mask.

    Scores may be DTensors sharded ``Shard(0)`` on one 1-D mesh (an FSDP2 model's Fisher scores;
    every rank calls this): the histograms and tie counts are summed over the mesh, and each
    rank gets DTensor masks of its rows, equal to the single-process mask bit for bit
    (childopt.score_shards).
    """
    reserve_p = check_selection(reserve_p, scope)
    names, tensors, shards = _check_scores(scores)
    scope_of = scope_ids(names, scope, layer_of)
    sizes = [0] * (max(scope_of) + 1)
    for t, s in zip(tensors, scope_of):
        sizes[s] += t.numel()
    ks = apportion(reserve_p, sizes)
    dtype = _key_dtype(tensors)
    local = shards.local(tensors)
    flat = [t.detach().reshape(-1).to(dtype).contiguous() for t in local]
    thresholds = _thresholds(*_radix_passes(flat, scope_of, len(ks), backend, shards), ks)
    ties = torch.stack([(f == thresholds[s][0]).sum() for f, s in zip(flat, scope_of)]).tolist()
    full_ties, ties_before = shards.ties_before(ties)
    budgets = [r for _, r in thresholds]
    masks = {}
    for i, (name, t, f, s) in enumerate(zip(names, tensors, flat, scope_of)):
        tau = thresholds[s][0]
        take_in_tensor = min(full_ties[i], budgets[s])
        budgets[s] -= take_in_tensor
        take = min(max(take_in_tensor - ties_before[i], 0), ties[i])  # this shard's share of the tensor's ties
        mask = f > tau
        if take == ties[i] and take:
            mask |= f == tau
        elif take:
            equal = f == tau
            mask |= equal & (torch.cumsum(equal, 0) <= take)
        masks[name] = shards.wrap(mask.view(local[i].shape), t)
    return masks


def gumbel_noise(words: torch.Tensor) -> torch.Tensor:
    """Standard Gumbel noise (float64) from uint32 Philox words: ``-log(-log(u))``.

    ``u = ((word >> 8) + 0.5) / 2**24`` lies in [2**-25, 1 - 2**-25] and is exact in float64 (in
    fp32 the top value rounds to 1.0, whose noise is +inf), so the noise is finite: [-2.86, 17.33].
    """
    uniform = (words >> 8).double().add_(0.5).mul_(2.0**-24)
    return uniform.log_().neg_().log_().neg_()  # in place: the same values, no new temporaries


def _sample_keys(score: torch.Tensor, gumbel: torch.Tensor, temperature: float, dtype: torch.dtype):
    """Keys whose top share is the Gumbel top-k draw of ``log(score) / temperature + G``.

    The same order, overflow-free: ``log(s) / T + G`` for ``T >= 1`` and ``T`` times that,
    ``log(s) + T * G``, below, both finite for every finite positive score.  Zero scores get keys
    ``floor + G`` below every such key and infinite scores ``ceiling + G`` above, so zeros are
    drawn only after all other entries, infinities before them, each uniformly among themselves.
    """
    s = score.detach().reshape(-1).to(dtype)
    noise = gumbel.to(dtype)
    log_s = torch.log(s)
    keys = log_s.div_(temperature).add_(noise) if temperature >= 1 else log_s.add_(noise * temperature)
    # Only zero and infinite scores give infinite keys (every other key is within ~800 of 0), so a
    # finite sum says there are none: on a CPU one reduction where two torch.where cost 8x as much.
    # Not on a GPU, where the where ops are cheap and reading the sum would sync once per piece.
    if keys.device.type == "cpu" and math.isfinite(float(keys.sum())):
        return keys
    info = torch.finfo(dtype)
    floor = math.log(info.tiny * info.eps) - _KEY_MARGIN  # info.tiny * info.eps: the smallest subnormal
    ceiling = math.log(info.max) + _KEY_MARGIN
    keys = torch.where(torch.isinf(s), ceiling + noise, keys)
    return torch.where(s == 0, floor + noise, keys)


def _perturbed_keys(score: torch.Tensor, words: Callable, first_group: int, lane: int, seed: int,
                    temperature: float, dtype: torch.dtype) -> torch.Tensor:
    """One tensor's flat Gumbel top-k keys (:func:`_sample_keys`), a piece of ``PIECE`` elements at a time.

    Element ``j``'s noise is word ``lane + j`` of the Philox words from group ``first_group`` on.  A
    piece starts on a multiple of 4 elements, so its words are those from group
    ``first_group + start // 4`` on, with the same lane: the keys equal one whole-tensor draw.  In
    pieces, the float64 temporaries stay in cache between torch ops (2x faster on a CPU than
    whole-tensor ops over a large model) and the draw holds one piece's noise, not the tensor's.
    """
    flat = score.detach().reshape(-1)
    keys = torch.empty(flat.numel(), dtype=dtype, device=flat.device)
    for start in range(0, flat.numel(), PIECE):
        piece = flat[start:start + PIECE]
        drawn = words(piece.numel() + lane, first_group + start // 4, seed, GUMBEL_STREAM, flat.device)
        keys[start:start + PIECE] = _sample_keys(piece, gumbel_noise(drawn[lane:]), temperature, dtype)
    return keys


def sample_mask(scores: Mapping[str, torch.Tensor], reserve_p: float, *, temperature: float, seed: int,
                scope: str = "global", layer_of: Optional[Callable[[str], Hashable]] = None,
                backend: str = "auto") -> dict:
    """An exact-size sample without replacement, entries drawn with probability rising with score.

    Gumbel top-k: keep the top share of ``log(score) / temperature + G`` with ``G`` standard
    Gumbel noise from Philox (key ``seed``, counter = global element index / 4 in the mapping's
    order), so the draw is reproducible on every device.  Equal scores are drawn uniformly among
    themselves.  ``temperature -> 0`` gives :func:`select_mask`'s result (once ``temperature * G``
    is below the keys' precision, ties are taken in select_mask's canonical order); a large
    temperature gives a uniform draw.  Scores must be >= 0: zero-score entries are drawn only after
    all others, uniformly among themselves.  Keys are float64 when any score is, else fp32.
    Memory: one perturbed copy of the scores in that dtype, plus one piece's noise.  Sharded scores: as in
    :func:`select_mask`; each shard draws the noise of its global indices.
    """
    temperature = check_number(temperature, "temperature", low=0.0, low_open=True, high_open=True)
    philox.check_seed(seed)
    names, tensors, shards = _check_scores(scores)
    local = shards.local(tensors)
    negative = shards.any_rank(torch.stack([(t < 0).any() for t in local]).tolist())
    if any(negative):
        raise ValueError(f"scores[{names[negative.index(True)]!r}] has negative entries; sample_mask needs scores >= 0")
    dtype = _key_dtype(tensors)
    # Every backend draws the same words; float64 keys take plain-torch selection passes, so any
    # backend auto finds ready may draw their noise.
    source = "auto" if dtype == torch.float64 else backend
    words = backends.create(backends.check_name(source), tensors[0].device).random_words
    perturbed, base = {}, 0
    for i, (name, t, shard) in enumerate(zip(names, tensors, local)):
        group, lane = shards.first_word(i)  # a shard draws the words of its global indices
        keys = _perturbed_keys(shard, words, base + group, lane, seed, float(temperature), dtype)
        perturbed[name] = shards.wrap(keys.view(shard.shape), t)
        base += philox.rng_group_counts(t.numel())
    return select_mask(perturbed, reserve_p, scope=scope, layer_of=layer_of, backend=backend)
