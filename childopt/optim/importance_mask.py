"""``mask="importance"`` in MaskedAdamW: its configuration and the refresh of the per-element draw.

Each refresh (every ``refresh_every`` optimizer steps, and whenever a parameter has none yet) writes, for
each sampled parameter, ``state["importance"]``: the uint8 level codes of its keep probabilities
(``sampling="poisson"``, childopt.importance; the kernels draw the keep decision every step) or,
with ``sampling="exact"``, a bool mask of exactly ``reserve_p`` of each scope drawn without
replacement (Gumbel top-k, childopt.masks.sample_mask), stepped as a fixed mask until the next
refresh.  The state entry is saved with the optimizer, and the refresh schedule and keys follow
the sampler's step count (saved in the state dict's ``"childopt"`` entry; for one saved before
it, the largest saved step of the sampled parameters), so a resumed run draws what the
uninterrupted one would have.  A loaded draw of the other ``sampling`` (an exact mask where level
codes are expected, or the reverse) is redrawn at the next step; other configuration changes
take effect at the next refresh.
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Callable, Hashable, Optional, Union

import torch

from childopt import importance, masks, user_warning
from childopt.optim import sharding

SAMPLINGS = ("poisson", "exact")
RUNNING = "running"
_EXACT_SEED_STRIDE = 0xD1B54A32D192ED03  # spreads the refresh index over the 64-bit seed of each exact draw


@dataclass(frozen=True, eq=False)
class Importance:
    """How an importance-sampled child network is drawn (``MaskedAdamW(mask=Importance(...))``).

    Each step element ``i`` is kept with probability ``p_i = clamp(c * s_i ** (1 / T), p_min, 1)``,
    ``c`` solved per scope so that the expected kept share is the group's ``reserve_p``.

    Args:
        scores: ``"running"`` (the optimizer's own ``exp_avg_sq``, an average of squared
            gradients; under zero-grad the gradients it averaged were scaled by ``1 / p``, so it is
            multiplied by each element's current ``p`` to estimate the mean squared gradient
            itself; a scope whose moments are all zero, as before the first step, is drawn
            uniformly) or a dict from parameter (or name) to non-negative scores of its shape,
            e.g. from childopt.fisher.FisherAccumulator; parameters without an entry train fully.
        temperature: ``T`` > 0; ``inf`` draws every element with ``reserve_p``, bit for bit the
            Bernoulli mask; ``T -> 0`` approaches the fixed top-``reserve_p`` mask.
        p_min: floor of ``p_i`` in ``[0, reserve_p]``: bounds the variance of ``1 / p_i``.
            ``None``: 0 for given scores; ``reserve_p / 10`` for running scores, whose entries
            stay 0 until an element is first kept (with ``p_min = 0`` an element that was not
            drawn before the first solve would never be drawn again).
        scope: ``"global"``, ``"layer"`` or ``"tensor"``, as in childopt.masks.select_mask.
        refresh_every: steps between two solves of ``c`` (running scores) and two roundings of
            ``p_i`` to the kernels' levels (childopt.importance), or two exact draws.  A refresh is
            a few passes over the sampled parameters (0.14 s for 24M on 2 CPU cores, bench run 26); the
            running ``exp_avg_sq`` it reads moves on a time scale of ``1 / (1 - beta2)`` = 1000
            steps, so the default 100 follows it closely at 1% of the refreshes' cost per step.
        sampling: ``"poisson"`` (independent draws each step, in the kernel) or ``"exact"``
            (exactly ``reserve_p`` of each scope, without replacement, redrawn each refresh).
        layer_of: for ``scope="layer"``: parameter name -> layer key (default:
            :func:`childopt.masks.layer_key`, the name up to ``layer.N`` / ``layers.N`` / ``h.N`` / ``block.N``).
    """

    scores: Union[str, Mapping] = RUNNING
    temperature: float = 1.0
    p_min: Optional[float] = None
    scope: str = "global"
    refresh_every: int = 100
    sampling: str = "poisson"
    layer_of: Optional[Callable[[str], Hashable]] = None

    def __post_init__(self):
        if not (self.scores == RUNNING if isinstance(self.scores, str) else isinstance(self.scores, Mapping)):
            raise ValueError(f"Importance.scores must be 'running' or a dict of score tensors, got {self.scores!r}")
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, numbers.Real) or not t > 0:
            raise ValueError(f"Importance.temperature must be a number > 0 (inf allowed), got {t!r}")
        p_min = self.p_min
        if p_min is not None and (isinstance(p_min, bool) or not isinstance(p_min, numbers.Real) or not 0 <= p_min <= 1):
            raise ValueError(f"Importance.p_min must be None or a number in [0, reserve_p], got {p_min!r}")
        if self.scope not in masks.SCOPES:
            raise ValueError(f"Importance.scope must be one of {masks.SCOPES}, got {self.scope!r}")
        r = self.refresh_every
        if isinstance(r, bool) or not isinstance(r, numbers.Integral) or r < 1:
            raise ValueError(f"Importance.refresh_every must be an int >= 1, got {r!r}")
        if self.sampling not in SAMPLINGS:
            raise ValueError(f"Importance.sampling must be one of {SAMPLINGS}, got {self.sampling!r}")
        if math.isinf(t) and not isinstance(self.scores, str):
            raise ValueError("Importance(temperature=inf) draws every entry with reserve_p whatever its score: pass "
                             "mask='bernoulli' instead of a score dict (the parameters without scores would be "
                             "masked too)")
        if self.sampling == "exact" and (math.isinf(t) or self.p_min not in (None, 0)):
            raise ValueError("Importance(sampling='exact') draws a fixed count without replacement: it needs a finite "
                             f"temperature and takes no p_min (got temperature={t!r}, p_min={self.p_min!r})")

    def floor(self, reserve_p: float) -> float:
        """The ``p_min`` in force for a group with ``reserve_p`` (see ``p_min``)."""
        if self.p_min is not None:
            return float(self.p_min)
        return reserve_p / 10 if isinstance(self.scores, str) and self.sampling == "poisson" else 0.0

    @property
    def uniform(self) -> bool:
        """``T = inf`` with independent draws: the Bernoulli mask itself."""
        return self.sampling == "poisson" and math.isinf(self.temperature)


@dataclass
class _Member:
    param: torch.Tensor
    name: str
    reserve_p: float
    score: Optional[torch.Tensor]  # None: the running exp_avg_sq


def shares_of(param_groups: list) -> list:
    """Each group's ``reserve_p`` as a float (an ImportanceSampler is built for these)."""
    return [float(group["reserve_p"]) for group in param_groups]


class ImportanceSampler:
    """The sampled parameters of one optimizer, their scopes, and the refresh of their draws."""

    def __init__(self, config: Importance, param_groups: list, describe: Callable, resolve_scores: Callable,
                 steps: Optional[int] = None):
        self.config = config
        given = None if isinstance(config.scores, str) else resolve_scores(config.scores, "Importance.scores")
        self.members: list[_Member] = []
        for gi, group in enumerate(param_groups):
            if group["capturable"]:
                raise ValueError(f"mask='importance' refreshes its draw on the host; param group {gi} has "
                                 "capturable=True (use a Bernoulli or fixed mask to capture the step)")
            if config.floor(group["reserve_p"]) > group["reserve_p"]:
                raise ValueError(f"Importance.p_min={config.p_min} is above param group {gi}'s reserve_p="
                                 f"{group['reserve_p']}; p_min must be in [0, reserve_p]")
            names = group.get("param_names") or [f"param_groups.{gi}.{pi}" for pi in range(len(group["params"]))]
            for name, p in zip(names, group["params"]):
                if sharding.is_dtensor(p):
                    raise NotImplementedError(f"mask='importance' does not take sharded (DTensor) parameters yet "
                                              f"({describe(p)}); use mask='bernoulli' or a fixed mask under FSDP2")
                if given is None and p.requires_grad:
                    self.members.append(_Member(p, name, float(group["reserve_p"]), None))
                elif given is not None and p in given:
                    self.members.append(_Member(p, name, float(group["reserve_p"]), given[p]))
        if config.scope == "layer" and not all("param_names" in g for g in param_groups):
            raise ValueError("Importance(scope='layer') finds layers by parameter name: pass model.named_parameters()")
        self.scopes = masks.scope_ids([m.name for m in self.members], config.scope, config.layer_of)
        for scope in set(self.scopes):
            shares = {m.reserve_p for m, s in zip(self.members, self.scopes) if s == scope}
            if len(shares) > 1:
                raise ValueError(f"Importance(scope={config.scope!r}) puts parameters of param groups with different "
                                 f"reserve_p {sorted(shares)} in one scope; use scope='tensor' or one reserve_p")
        if given is not None:
            for scope in set(self.scopes):
                members = [m for m, s in zip(self.members, self.scopes) if s == scope]
                if any(m.score.numel() for m in members) and not any(bool(m.score.any()) for m in members):
                    raise ValueError(f"Importance.scores are all zero in the scope of {describe(members[0].param)}: "
                                     "there is nothing to sample by (use mask='bernoulli' for a uniform draw)")
        self.shares = shares_of(param_groups)  # the reserve_p this sampler was built for (see stale)
        self._scales: dict = {}  # scope -> log2 c of given scores (solved once)
        self._warned_fixed_draw = False
        self.steps = steps  # optimizer steps so far; None: read from the state at the next step

    def stale(self, param_groups: list) -> bool:
        """A group's ``reserve_p`` was edited since this sampler was built: rebuild it (its members'
        shares, scope checks and solved scales all follow from the shares)."""
        return shares_of(param_groups) != self.shares

    def before_step(self, states: dict, seed: int, rng_bases: dict, kernels, rescaled: Callable[[], set]) -> None:
        """Count the step and refresh when one is due: every ``refresh_every`` steps, or when a member
        has no draw of this sampling.  ``kernels``: the parameters' backend (its ``score_logs``, ``kept_sums``,
        ``probabilities`` and ``level_codes``, childopt.backends.base.Backend); ``rescaled()``: the
        parameters whose groups scale kept gradients by ``1 / p``, asked for only when a refresh runs
        (not on every step)."""
        if self.steps is None or self._due(states):  # traced in a compiled step: a step without refresh stays whole
            self._refresh_eagerly(states, seed, rng_bases, kernels, rescaled)
        self.steps += 1

    # A refresh is host work (solve_log_scale reads scalars back, the kernels are opaque calls):
    # traced, it would break a compiled step's graph at each of them and take minutes to compile;
    # run eagerly, it costs one graph break, on the steps that refresh.
    @torch.compiler.disable
    def _refresh_eagerly(self, states: dict, seed: int, rng_bases: dict, kernels, rescaled: Callable[[], set]) -> None:
        """Refresh (:meth:`before_step` found one :meth:`_due`); when the step count is unknown, read
        it from the state first and refresh only if that makes one due."""
        if self.steps is None:
            self.steps = max((int(states[m.param]["step"]) for m in self.members if "step" in states.get(m.param, {})),
                             default=0)
            if not self._due(states):
                return
        self.refresh(states, seed, rng_bases, kernels, self.steps, rescaled())

    def _due(self, states: dict) -> bool:
        """A refresh is due: every ``refresh_every`` steps, or when a member has no draw of this sampling."""
        return self.steps % self.config.refresh_every == 0 or any(self._needs_draw(states.get(m.param, {}))
                                                                  for m in self.members)

    def _needs_draw(self, state: dict) -> bool:
        """No draw yet, or one of the other sampling (a loaded state): a fixed bool mask for
        ``"exact"``, uint8 level codes for ``"poisson"``."""
        draw = state.get("importance")
        return draw is None or draw.dtype != (torch.bool if self.config.sampling == "exact" else torch.uint8)

    def refresh(self, states: dict, seed: int, rng_bases: dict, kernels, refresh: int,
                rescaled: set) -> None:
        """Write each member's ``state["importance"]`` for the coming steps (``refresh``: the draw's key)."""
        if not self.members:
            return
        if self.config.sampling == "exact":
            self._draw_exact(states, [self._score(m, states, m.param in rescaled) for m in self.members], seed,
                             refresh)
            return
        for scope in sorted(set(self.scopes)):
            where = [i for i, s in enumerate(self.scopes) if s == scope]
            first = self.members[where[0]]
            # Scores are made when read, so one lives at a time: the scope holds its fp32 logs only.
            scores = _ScoresOnRead([self.members[i] for i in where],
                                   lambda m: self._score_parts(m, states, m.param in rescaled))
            logs = importance.log_ratios(scores, float(self.config.temperature),
                                         lambda parts: kernels.score_logs(*parts))
            p_min = self.config.floor(first.reserve_p)
            c = self._scales.get(scope)
            if c is None:
                c = importance.solve_log_scale(logs, first.reserve_p, p_min, kernels.kept_sums)
                if c == math.inf:
                    user_warning.warn(f"importance scope {scope} ({first.name}, ...) has too few non-zero scores to "
                                      "keep reserve_p of it in expectation; all non-zero ones are kept")
                if first.score is not None:
                    self._scales[scope] = c
            for i, log_r in zip(where, logs):
                param = self.members[i].param
                codes = importance.draw_codes(log_r, c, p_min, rng_bases[param], seed, refresh, kernels.level_codes,
                                              kernels.probabilities)
                states[param]["importance"] = codes.view(param.shape)

    def _score_parts(self, member: _Member, states: dict, rescaled: bool) -> tuple:
        """(scores, level codes or None): given scores, or the running estimate of the mean squared
        gradient (see ``Importance.scores``), which a zero-grad group multiplies by each entry's level
        probability (the codes, :func:`childopt.importance.scores_at_levels`)."""
        if member.score is not None:
            return member.score, None
        state = states.get(member.param, {})
        moment = state.get("exp_avg_sq")
        if moment is None:
            return torch.zeros_like(member.param, dtype=torch.float32), None
        codes = state.get("importance")
        if rescaled and codes is not None and codes.dtype == torch.uint8:
            return moment, codes
        return moment, None

    def _score(self, member: _Member, states: dict, rescaled: bool) -> torch.Tensor:
        """The scores of :meth:`_score_parts` as one tensor."""
        score, codes = self._score_parts(member, states, rescaled)
        return score if codes is None else importance.scores_at_levels(score, codes)

    def _draw_exact(self, states: dict, scores: list, seed: int, refresh: int) -> None:
        draw_seed = (seed + (refresh + 1) * _EXACT_SEED_STRIDE) % 2**64
        by_name = {m.name: s for m, s in zip(self.members, scores)}
        drawn = masks.sample_mask(by_name, self.members[0].reserve_p, temperature=float(self.config.temperature),
                                  seed=draw_seed, scope=self.config.scope, layer_of=self.config.layer_of) \
            if len({m.reserve_p for m in self.members}) == 1 else self._draw_exact_per_tensor(by_name, draw_seed)
        for m in self.members:
            states[m.param]["importance"] = drawn[m.name]
        self._warn_if_fixed(scores, drawn)

    def _warn_if_fixed(self, scores: list, drawn: dict) -> None:
        """Warn once when an exact draw keeps exactly the entries of non-zero score: then it is no
        draw (fewer non-zero ones leave the rest to a uniform draw among the zeros).

        With running scores that is the rule, not the exception: the entries never kept keep a
        zero ``exp_avg_sq``, so after the first (uniform) draw the kept ones are the only non-zero
        scores, and every later draw repeats it.  One host read per refresh, for the two counts.
        """
        if self._warned_fixed_draw or not scores:
            return
        device = scores[0].device  # a model may span devices: the counts meet on one

        def count(tensors) -> torch.Tensor:
            return torch.stack([torch.count_nonzero(t).to(device) for t in tensors]).sum()
        nonzero, kept = torch.stack([count(scores), count(drawn.values())]).tolist()
        if 0 < nonzero == kept:
            self._warned_fixed_draw = True
            user_warning.warn(f"Importance(sampling='exact'): only {nonzero} entries have a non-zero score, as many "
                              f"as each draw keeps, so the draw keeps all of them and is not random.  "
                              "With scores='running' the entries never kept keep a zero score, and every draw repeats "
                              "the first: use sampling='poisson' (its p_min keeps every entry reachable), or start "
                              "from non-zero scores (given ones, or a dense optimizer state)")

    def _draw_exact_per_tensor(self, by_name: dict, draw_seed: int) -> dict:
        """Groups with different reserve_p (scope='tensor'): one draw per tensor at its own share."""
        drawn = {}
        for m in self.members:
            drawn.update(masks.sample_mask({m.name: by_name[m.name]}, m.reserve_p,
                                           temperature=float(self.config.temperature), seed=draw_seed, scope="tensor"))
        return drawn


class _ScoresOnRead(Sequence):
    """A scope's score tensors, each computed when it is read (``score_of(member)``)."""

    def __init__(self, members: list, score_of: Callable):
        self._members, self._score_of = members, score_of

    def __len__(self) -> int:
        return len(self._members)

    def __getitem__(self, index):
        return self._score_of(self._members[index])


def check_scores(value, param: torch.Tensor, label: str) -> torch.Tensor:
    """``value`` as a flat-able fp32 score tensor of ``param``'s shape on its device, or a clear error."""
    if not isinstance(value, torch.Tensor) or not value.is_floating_point():
        what = f"a {value.dtype} tensor" if isinstance(value, torch.Tensor) else type(value).__name__
        raise TypeError(f"Importance.scores for {label} must be a floating-point tensor, got {what}")
    if value.shape != param.shape:
        raise ValueError(f"Importance.scores for {label} has shape {tuple(value.shape)}, expected the parameter's "
                         f"shape {tuple(param.shape)}")
    if value.numel() and not bool(torch.isfinite(value).all()):
        raise ValueError(f"Importance.scores for {label} has inf or NaN entries; scores must be finite and >= 0")
    if value.numel() and bool((value < 0).any()):
        raise ValueError(f"Importance.scores for {label} has negative entries; scores must be >= 0")
    return value.detach().to(device=param.device, dtype=torch.float32).contiguous()
