"""MaskedAdamW and ChildTuningAdamW: the torch.optim front-end of childopt.

The front-end validates, owns the state and the mask, and does no arithmetic itself: each step
it sorts the parameters of a group into buckets that share (device, dtypes, step count, mask
kind, storage), turns the hyper-parameters into host-computed scalars, and calls its backend's
``adamw_step`` (or ``sparse_adamw_step``) once per bucket; childopt.backends.ops defines the update.
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Mapping

import torch
from torch.optim import Optimizer

from childopt import backends, philox, sparse
from childopt.backends.ops import (MASK_BERNOULLI, MASK_DENSE, MASK_NONE, MaskScalars, SparseTensorLists,
                                   StepScalars, TensorLists)

MASKED_MODES = ("freeze", "zero_grad")
MASK_KINDS = (MASK_NONE, MASK_DENSE, MASK_BERNOULLI)
STORAGES = ("dense", "sparse")
STATE_FORMAT = 1
_MOMENT_KEYS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")


def _check_number(value, name: str, where: str, *, low: float, high: float = math.inf,
                  low_open: bool = False, high_open: bool = False) -> float:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name}{where} must be a number, got {type(value).__name__}")
    below = value <= low if low_open else value < low
    above = value >= high if high_open else value > high
    if below or above or math.isnan(value):
        interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        raise ValueError(f"{name}{where} must be in {interval}, got {value}")
    return float(value)


def check_group(group: Mapping, where: str = "") -> None:
    """Raise a clear error for any hyper-parameter of ``group`` that is out of range."""
    _check_number(group["lr"], "lr", where, low=0.0)
    _check_number(group["eps"], "eps", where, low=0.0)
    _check_number(group["weight_decay"], "weight_decay", where, low=0.0)
    _check_number(group["reserve_p"], "reserve_p", where, low=0.0, high=1.0, low_open=True)
    betas = group["betas"]
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"betas{where} must be a pair (beta1, beta2), got {betas!r}")
    for i, beta in enumerate(betas):
        _check_number(beta, f"betas[{i}]", where, low=0.0, high=1.0, high_open=True)
    if group["masked"] is not None and group["masked"] not in MASKED_MODES:
        raise ValueError(f"masked{where} must be one of {MASKED_MODES} (or None), got {group['masked']!r}")
    for flag in ("amsgrad", "maximize"):
        if not isinstance(group[flag], bool):
            raise TypeError(f"{flag}{where} must be a bool, got {group[flag]!r}")


class MaskedAdamW(Optimizer):
    r"""AdamW that updates only a child network of the parameters.

    Args:
        params: parameters, named parameters (``model.named_parameters()``) or param groups.
            Groups may override ``lr``, ``betas``, ``eps``, ``weight_decay``, ``reserve_p``,
            ``masked``, ``amsgrad`` and ``maximize``.
        lr, betas, eps, weight_decay, amsgrad, maximize: as in ``torch.optim.AdamW``.
        mask: ``None`` (plain AdamW: the same update as ``torch.optim.AdamW``), a dict from
            parameter (or parameter name, when named parameters were given) to a bool tensor of
            that parameter's shape (a fixed child network, Child-Tuning-D; parameters without an
            entry train fully), or ``"bernoulli"`` (Child-Tuning-F: each step every element is
            kept with probability ``reserve_p``, drawn in-kernel from Philox keyed by the seed,
            the parameter's step and the element's index; see childopt.philox).
        reserve_p: keep probability of the Bernoulli mask, in (0, 1]; 1 keeps everything.
        masked: what happens to masked-out entries.  ``"freeze"``: p, m and v stay
            bit-identical (no moment decay, no weight decay).  ``"zero_grad"``: the gradient is
            zeroed (Bernoulli: kept entries scaled by ``1 / reserve_p``) and the step otherwise
            runs on every entry, as ChildTuning publishes it.  ``None`` (default) means
            ``"freeze"`` for dict masks and ``"zero_grad"`` for ``"bernoulli"``.
        seed: 64-bit seed of the Bernoulli stream.  ``None`` draws one from torch's default
            generator (so ``torch.manual_seed`` makes it reproducible).  Saved in ``state_dict``.
        backend: ``"auto"``, ``"triton"`` or ``"reference"`` (see childopt.backends).
        storage: ``"dense"`` or ``"sparse"``.  Sparse keeps, for each parameter with a dict mask,
            only its selected entries: sorted flat ``indices`` (int32; int64 past 2**31 elements)
            and compact fp32 moments, 12 bytes per selected entry instead of 8 per element plus a
            1-byte mask.  The step reads and writes only those entries, and the parameters follow
            the same trajectory as ``storage="dense", masked="freeze"``, bit for bit on one
            backend (the same element arithmetic runs on gathered instead of contiguous entries).
            Needs a dict mask (not ``"bernoulli"``) and ``masked="freeze"``.
        compact_grads: with sparse storage, a post-accumulate-grad hook gathers ``grad[indices]``
            into a compact buffer (adding across micro-batches) and frees the dense gradient at
            once, so dense gradients of masked parameters never coexist.  Clip with
            :meth:`clip_grad_norm_`; :meth:`zero_grad` clears the buffers.  Under DDP the hook
            frees each gradient before DDP's all-reduce reads it: use ``compact_grads=False``
            there, or run the model without DDP's gradient sync (``no_sync``) and all-reduce
            :meth:`compact_gradients` yourself (index sets are equal on every rank, so that is
            exact and 1/density smaller).

    State per parameter: ``step`` (CPU float32 tensor, as in torch), fp32 ``exp_avg``,
    ``exp_avg_sq`` (and ``max_exp_avg_sq``) whatever the parameter dtype, and ``mask`` (dense
    storage) or ``indices`` (sparse storage) for parameters with a dict mask, so a checkpoint
    restores the child network too.
    """

    _PICKLED = ("_backend_request", "seed", "_mask_kind", "storage", "compact_grads")

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, *,
                 mask=None, reserve_p=1.0, masked=None, seed=None, amsgrad=False, maximize=False,
                 backend="auto", storage="dense", compact_grads=False):
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, reserve_p=reserve_p,
                        masked=masked, amsgrad=amsgrad, maximize=maximize)
        self._setup(params, defaults, mask=mask, seed=seed, backend=backend, storage=storage,
                    compact_grads=compact_grads)

    def _setup(self, params, defaults: dict, *, mask, seed, backend: str, storage: str = "dense",
               compact_grads: bool = False) -> None:
        check_group(defaults)
        if storage not in STORAGES:
            raise ValueError(f"storage must be one of {STORAGES}, got {storage!r}")
        if not isinstance(compact_grads, bool):
            raise TypeError(f"compact_grads must be a bool, got {compact_grads!r}")
        if compact_grads and storage != "sparse":
            raise ValueError("compact_grads=True needs storage='sparse' (it keeps only the selected entries)")
        self.storage = storage
        self.compact_grads = compact_grads
        # GradScaler unscales and inf-checks only .grad, which compact gradients replace: declaring
        # our own scaling makes it hand us the scale, so step() can refuse instead of mis-stepping.
        self._step_supports_amp_scaling = compact_grads
        self._compact = sparse.CompactGradients(self._indices_of) if compact_grads else None
        self._backend_request = backends.check_name(backend)
        self._backends: dict = {}
        self.seed = int(torch.randint(0, 2**63 - 1, ()).item()) if seed is None else philox.check_seed(seed)
        self._rng_bases: dict = {}
        self._rng_groups = 0
        self._mask_kind = MASK_NONE
        super().__init__(params, defaults)
        self.set_mask(mask)

    # ----------------------------------------------------------------- parameters and masks
    def add_param_group(self, param_group: dict) -> None:
        """Add a group (validated) and give its parameters the next Philox index range."""
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            check_group(group, f" (param group {len(self.param_groups) - 1})")
            self._check_storage(group, f" (param group {len(self.param_groups) - 1})")
        except (TypeError, ValueError):
            self.param_groups.pop()
            raise
        for p in group["params"]:
            self._rng_bases[p] = self._rng_groups
            self._rng_groups += philox.rng_group_counts(p.numel())
        for device in {p.device for p in group["params"]}:
            self._backend(device)  # a backend asked for by name that cannot run here fails now

    def _check_storage(self, group: dict, where: str = "") -> None:
        if self.storage == "sparse" and group["masked"] == "zero_grad":
            raise ValueError(f"masked='zero_grad'{where} needs state for every entry; storage='sparse' "
                             "keeps only the selected ones (use masked='freeze')")

    def _indices_of(self, param: torch.Tensor) -> torch.Tensor:
        return self.state[param]["indices"]

    def _describe(self, param: torch.Tensor) -> str:
        for gi, group in enumerate(self.param_groups):
            for pi, p in enumerate(group["params"]):
                if p is param:
                    if "param_names" in group:
                        return f"parameter {group['param_names'][pi]!r}"
                    return f"param_groups[{gi}]['params'][{pi}] (shape {tuple(p.shape)})"
        return f"a tensor of shape {tuple(param.shape)}"

    def _resolve_mask_dict(self, mask: Mapping) -> dict:
        held = {id(p): p for g in self.param_groups for p in g["params"]}
        named = {n: p for g in self.param_groups for n, p in zip(g.get("param_names", ()), g["params"])}
        resolved = {}
        for key, value in mask.items():
            if isinstance(key, str):
                if key not in named:
                    hint = "" if named else " (pass model.named_parameters() to address parameters by name)"
                    raise ValueError(f"mask has an entry for {key!r}, which is not a parameter of this optimizer{hint}")
                param, label = named[key], f"parameter {key!r}"
            elif isinstance(key, torch.Tensor):
                if id(key) not in held:
                    raise ValueError(f"mask has an entry for a tensor of shape {tuple(key.shape)} "
                                     "that is not a parameter of this optimizer")
                param = key
                label = self._describe(param)
            else:
                raise TypeError(f"mask keys must be parameters or parameter names, got {type(key).__name__}")
            if not isinstance(value, torch.Tensor):
                raise TypeError(f"mask for {label} must be a bool tensor, got {type(value).__name__}")
            if value.dtype != torch.bool:
                raise TypeError(f"mask for {label} has dtype {value.dtype}, expected torch.bool")
            if value.shape != param.shape:
                raise ValueError(f"mask for {label} has shape {tuple(value.shape)}, "
                                 f"expected the parameter's shape {tuple(param.shape)}")
            if param in resolved:
                raise ValueError(f"mask has two entries for {label}")
            resolved[param] = value.detach().to(device=param.device, copy=True).contiguous()
        return resolved

    def set_mask(self, mask, *, reset_state: bool = False) -> None:
        """Replace the child network: ``None``, ``"bernoulli"`` or a dict as in the constructor.

        Existing state is kept by default: entries leaving the child network keep their moments
        (frozen under ``masked="freeze"``) and resume from them if selected again; entries joining
        it start from their current moments (zero if never updated) and the parameter's step
        count.  With sparse storage there is no room for entries outside the child network: the
        state is re-compacted, entries selected before and after keep their moments, newly
        selected ones start from zero (or from their dense moments, for a parameter that had no
        mask), and a parameter losing its mask gets dense moments that are zero off its old
        indices.  ``reset_state=True`` drops ``step`` and the moments of every parameter whose
        mask changed (every parameter, when the mask kind changes), so they restart as on step 1.
        """
        if mask is None:
            kind, new = MASK_NONE, {}
        elif isinstance(mask, str):
            if mask != MASK_BERNOULLI:
                raise ValueError(f"mask must be None, 'bernoulli' or a dict of bool tensors, got {mask!r}")
            if all(g["reserve_p"] == 1.0 for g in self.param_groups):
                warnings.warn("mask='bernoulli' with reserve_p=1.0 in every group keeps every entry: "
                              "this trains like plain AdamW; pass reserve_p < 1", stacklevel=3)
            kind, new = MASK_BERNOULLI, {}
        elif isinstance(mask, Mapping):
            kind, new = MASK_DENSE, self._resolve_mask_dict(mask)
        else:
            raise TypeError(f"mask must be None, 'bernoulli' or a dict of bool tensors, got {type(mask).__name__}")
        if self.storage == "sparse" and kind == MASK_BERNOULLI:
            raise ValueError("storage='sparse' needs a fixed mask (a dict); a Bernoulli mask changes every step")

        changed = self._store_sparse_masks(new) if self.storage == "sparse" else self._store_dense_masks(new)
        if kind != self._mask_kind:
            changed = [p for g in self.param_groups for p in g["params"]]
        if reset_state:
            for p in changed:
                for key in ("step", *_MOMENT_KEYS):
                    self.state[p].pop(key, None)
        self._mask_kind = kind

    def _store_dense_masks(self, new: dict) -> list:
        """Keep ``new`` as bool masks in the state; return the parameters whose mask changed."""
        old = {p: s["mask"] for p, s in self.state.items() if "mask" in s}
        changed = [p for p in set(old) | set(new) if p not in old or p not in new or not torch.equal(old[p], new[p])]
        for p in old:
            del self.state[p]["mask"]
        for p, m in new.items():
            self.state[p]["mask"] = m
        return changed

    def _store_sparse_masks(self, new: dict) -> list:
        """Turn ``new`` into indices and re-compact state (rule in set_mask); return the changed."""
        old = {p: s["indices"] for p, s in self.state.items() if "indices" in s}
        new_indices = {p: sparse.indices_from_mask(m) for p, m in new.items()}
        changed = [p for p in set(old) | set(new_indices)
                   if p not in old or p not in new_indices or not torch.equal(old[p], new_indices[p])]
        pending = [p for p in changed if self._compact is not None and p in self._compact.buffers]
        if pending:
            raise RuntimeError(f"{self._describe(pending[0])} has a compact gradient for its old indices: call "
                               "set_mask after step() and zero_grad(), not between backward and step")
        for p in changed:
            state = self.state[p]
            for key in _MOMENT_KEYS:
                if key not in state:
                    continue
                if p not in new_indices:
                    state[key] = sparse.scatter(state[key], old[p], p.shape)
                elif p in old:
                    state[key] = sparse.remap(state[key], old[p], new_indices[p])
                else:
                    state[key] = sparse.gather(state[key], new_indices[p])
            if p in new_indices:
                state["indices"] = new_indices[p]
                if self._compact is not None:
                    self._compact.register(p)
            else:
                del state["indices"]
                if self._compact is not None:
                    self._compact.unregister(p)
        return changed

    @property
    def mask_kind(self) -> str:
        """``"none"``, ``"dense"`` (dict mask) or ``"bernoulli"``."""
        return self._mask_kind

    def backend_name(self, device=None) -> str:
        """The backend that steps tensors on ``device`` (default: the first parameter's)."""
        if device is None:
            device = self.param_groups[0]["params"][0].device
        return self._backend(torch.device(device)).name

    def _backend(self, device: torch.device):
        backend = self._backends.get(device)
        if backend is None:
            backend = self._backends[device] = backends.create(self._backend_request, device)
        return backend

    # --------------------------------------------------------------------------- the step
    def _check_ready(self) -> None:
        """Hook for subclasses that need configuration before the first step."""

    def _masked_mode(self, group: dict) -> str:
        if group["masked"] is not None:
            return group["masked"]
        return "zero_grad" if self._mask_kind == MASK_BERNOULLI else "freeze"

    def _bias_scalars(self, group: dict, lr: float, step: int) -> tuple[float, float, bool]:
        """(step_size, bc2_sqrt, decay_after) of AdamW: bias corrections in host float64, as torch."""
        beta1, beta2 = (float(b) for b in group["betas"])
        return lr / (1 - beta1**step), math.sqrt(1 - beta2**step), False

    def _step_scalars(self, group: dict, step: int) -> StepScalars:
        """Host float64 scalars of the update; tensor hyper-parameters (as torch allows) become floats."""
        lr = float(group["lr"])
        beta1, beta2 = (float(b) for b in group["betas"])
        step_size, bc2_sqrt, decay_after = self._bias_scalars(group, lr, step)
        return StepScalars(
            decay=1 - lr * float(group["weight_decay"]), one_minus_beta1=1 - beta1, beta2=beta2,
            one_minus_beta2=1 - beta2, eps=float(group["eps"]), step_size=step_size, bc2_sqrt=bc2_sqrt,
            maximize=group["maximize"], amsgrad=group["amsgrad"], decay_after=decay_after,
        )

    def _mask_scalars(self, group: dict, kind: str, step: int) -> MaskScalars:
        freeze = self._masked_mode(group) == "freeze"
        if kind == MASK_BERNOULLI:
            reserve_p = group["reserve_p"]
            return MaskScalars(kind=kind, freeze=freeze, grad_scale=1.0 if freeze else 1.0 / reserve_p,
                               keep_threshold=philox.keep_threshold(reserve_p), seed=self.seed, step=step)
        return MaskScalars(kind=kind, freeze=freeze)

    def _init_state(self, p: torch.Tensor, state: dict, amsgrad: bool) -> None:
        shape = state["indices"].shape if "indices" in state else p.shape
        state["step"] = torch.tensor(0.0, dtype=torch.float32)
        state["exp_avg"] = torch.zeros(shape, dtype=torch.float32, device=p.device)
        state["exp_avg_sq"] = torch.zeros(shape, dtype=torch.float32, device=p.device)
        if amsgrad:
            state["max_exp_avg_sq"] = torch.zeros(shape, dtype=torch.float32, device=p.device)

    def _tensor_kind(self, group: dict, state: dict):
        if "indices" in state:
            return ("sparse", state["indices"].dtype)
        if self._mask_kind == MASK_DENSE and "mask" not in state:
            return MASK_NONE
        if self._mask_kind == MASK_BERNOULLI and group["reserve_p"] == 1.0:
            return MASK_NONE
        return self._mask_kind

    @torch.no_grad()
    def step(self, closure=None):
        """Perform one optimisation step; ``closure`` re-evaluates the model and returns the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._check_ready()
        if getattr(self, "grad_scale", None) is not None or getattr(self, "found_inf", None) is not None:
            raise RuntimeError("compact_grads=True cannot run under torch.amp.GradScaler: it unscales and checks "
                               "only .grad, which the compact gradients replace; use bf16 autocast (no scaler) or "
                               "compact_grads=False")
        for group in self.param_groups:
            self._step_group(group)
        if self._compact is not None:
            self._compact.mark_stepped()
        return loss

    def _gradient(self, p: torch.Tensor):
        """The gradient the step uses: the compact buffer of a hooked parameter, else ``p.grad``."""
        compact = self._compact.buffers.get(p) if self._compact is not None else None
        if compact is not None and p.grad is not None:
            raise RuntimeError(f"{self._describe(p)} has both a dense .grad and a compact gradient; with "
                               "compact_grads=True gradients come from backward (set .grad only without it)")
        return compact if compact is not None else p.grad

    def _step_group(self, group: dict) -> None:
        grads = {p: g for p in group["params"] if (g := self._gradient(p)) is not None}
        params = list(grads)
        if not params:
            return
        for p in params:
            if grads[p].is_sparse:
                raise RuntimeError(f"{type(self).__name__} does not support sparse gradients "
                                   f"({self._describe(p)}); use dense gradients, e.g. nn.Embedding(sparse=False)")
            state = self.state[p]
            if "step" not in state:
                self._init_state(p, state, group["amsgrad"])
            elif group["amsgrad"] and "max_exp_avg_sq" not in state:
                state["max_exp_avg_sq"] = state["exp_avg_sq"].clone()
        # Each bucket's step counters advance only once its kernel has run: a failed step does not count.
        buckets: dict = {}
        for p, step in zip(params, torch.stack([self.state[p]["step"] for p in params]).tolist()):
            kind = self._tensor_kind(group, self.state[p])
            if isinstance(kind, tuple):
                kind += (grads[p] is not p.grad,)  # compact gradient or a dense one to gather from
            buckets.setdefault((p.device, p.dtype, grads[p].dtype, int(step) + 1, kind), []).append(p)
        for (device, _, _, step, kind), bucket in buckets.items():
            self._step_bucket(group, bucket, [grads[p] for p in bucket], device, step, kind)
            torch._foreach_add_([self.state[p]["step"] for p in bucket], 1.0)

    def _step_bucket(self, group: dict, params: list, grads: list, device, step: int, kind) -> None:
        states = [self.state[p] for p in params]
        work = [p if p.is_contiguous() else p.contiguous() for p in params]
        grads = [g if g.is_contiguous() else g.contiguous() for g in grads]
        moments = dict(exp_avgs=[s["exp_avg"] for s in states], exp_avg_sqs=[s["exp_avg_sq"] for s in states],
                       max_exp_avg_sqs=[s["max_exp_avg_sq"] for s in states] if group["amsgrad"] else None)
        hp = self._step_scalars(group, step)
        if isinstance(kind, tuple):
            tensors = SparseTensorLists(params=work, grads=grads, indices=[s["indices"] for s in states],
                                        compact_grads=kind[-1], **moments)
            self._backend(device).sparse_adamw_step(tensors, hp)
        else:
            tensors = TensorLists(
                params=work, grads=grads, **moments,
                masks=[s["mask"] for s in states] if kind == MASK_DENSE else None,
                rng_bases=[self._rng_bases[p] for p in params] if kind == MASK_BERNOULLI else None,
            )
            self._backend(device).adamw_step(tensors, hp, self._mask_scalars(group, kind, step))
        for p, w in zip(params, work):
            if w is not p:
                p.copy_(w)

    # ------------------------------------------------------------ gradients and accounting
    def zero_grad(self, set_to_none: bool = True) -> None:
        """Reset ``.grad`` of every parameter, and the compact gradient buffers."""
        super().zero_grad(set_to_none)
        if self._compact is not None:
            self._compact.zero(set_to_none)

    def compact_gradients(self) -> dict:
        """The compact gradient buffers (parameter -> ``grad[indices]``), e.g. to all-reduce them."""
        return dict(self._compact.buffers) if self._compact is not None else {}

    def clip_grad_norm_(self, max_norm: float, norm_type: float = 2.0, error_if_nonfinite: bool = False):
        """Clip the gradients the next step uses by their global norm; return that norm.

        Equals ``torch.nn.utils.clip_grad_norm_`` on the *masked* gradients: compact buffers,
        dense gradients restricted to the parameter's indices or dense mask, and full gradients
        of parameters without a fixed mask (a Bernoulli mask is drawn inside the step, so it
        clips the full gradient, as ChildTuning's trainer does).
        """
        scaled, measured = [], []
        for group in self.param_groups:
            for p in group["params"]:
                grad = self._gradient(p)
                if grad is None:
                    continue
                scaled.append(grad)
                state = self.state.get(p, {})
                if grad is p.grad and "indices" in state:
                    measured.append(sparse.gather(grad, state["indices"]))
                elif "mask" in state:
                    measured.append(grad[state["mask"]])
                else:
                    measured.append(grad)
        if not scaled:
            return torch.tensor(0.0)
        total = torch.nn.utils.get_total_norm(measured, norm_type, error_if_nonfinite)
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        by_device: dict = {}
        for grad in scaled:
            by_device.setdefault(grad.device, []).append(grad)
        for device, device_grads in by_device.items():
            torch._foreach_mul_(device_grads, coef.to(device))
        return total

    def state_bytes(self) -> int:
        """Bytes of every tensor in the optimizer state: moments, indices or masks, step counters.

        Sparse storage: 12 per selected entry (int32 index + fp32 m and v; +4 with amsgrad, +4
        per entry for int64 indices past 2**31 elements) plus a 4-byte step per parameter.
        """
        return sum(v.nbytes for s in self.state.values() for v in s.values() if isinstance(v, torch.Tensor))

    def sparse_indices(self) -> dict:
        """The selected flat indices of every sparse parameter, by name (or by parameter when unnamed)."""
        result = {}
        for group in self.param_groups:
            names = group.get("param_names", group["params"])
            for name, p in zip(names, group["params"]):
                if "indices" in self.state.get(p, {}):
                    result[name] = self.state[p]["indices"]
        return result

    # ------------------------------------------------------------------ state round trip
    def state_dict(self) -> dict:
        """torch's state dict plus ``"childopt"``: format, mask kind, Bernoulli seed and storage."""
        state_dict = super().state_dict()
        state_dict["childopt"] = {"format": STATE_FORMAT, "mask_kind": self._mask_kind, "seed": self.seed,
                                  "storage": self.storage}
        return state_dict

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a MaskedAdamW (or ``torch.optim.AdamW``) state dict.

        torch casts floating state to the parameter's dtype; here moments stay fp32 and masks
        bool.  A childopt state dict also restores the mask kind and seed (the Bernoulli stream
        continues where it was saved); a foreign one (torch AdamW) keeps this optimizer's masks.
        """
        extras = state_dict.get("childopt")
        if extras is not None:
            if extras.get("format") != STATE_FORMAT or extras.get("mask_kind") not in MASK_KINDS:
                raise ValueError(f"unsupported childopt state format: {extras!r}")
            philox.check_seed(extras.get("seed"))
            saved_storage = extras.get("storage", "dense")
            if saved_storage != self.storage:
                raise ValueError(f"this state_dict was saved with storage={saved_storage!r}; construct the "
                                 f"optimizer with storage={saved_storage!r} to load it")
        kept_masks = {p: s["mask"] for p, s in self.state.items() if "mask" in s}
        kept_indices = {p: s["indices"] for p, s in self.state.items() if "indices" in s}
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        super().load_state_dict(state_dict)
        params = [p for g in self.param_groups for p in g["params"]]
        for saved_id, p in zip(saved_ids, params):
            saved = state_dict["state"].get(saved_id, {})
            state = self.state[p]
            if "indices" in saved:
                sparse.check_indices(saved["indices"], p.numel(), f"state 'indices' for {self._describe(p)}")
                state["indices"] = saved["indices"].to(device=p.device, copy=True)
            elif extras is None and p in kept_indices:
                state["indices"] = kept_indices[p]
            shape = state["indices"].shape if "indices" in state else p.shape
            for key in _MOMENT_KEYS:
                if key in saved:
                    value = saved[key].detach().to(device=p.device, dtype=torch.float32, copy=True)
                    if "indices" in state and "indices" not in saved and value.shape == p.shape:
                        value = sparse.gather(value, state["indices"])  # dense (torch AdamW) state
                    if value.shape != shape:
                        raise ValueError(f"state {key!r} for {self._describe(p)} has shape "
                                         f"{tuple(value.shape)}, expected {tuple(shape)}")
                    state[key] = value.contiguous()
            if "step" in saved:
                state["step"] = torch.tensor(float(saved["step"]), dtype=torch.float32)
            if "mask" in saved:
                state["mask"] = self._resolve_mask_dict({p: saved["mask"]})[p]
            elif extras is None and p in kept_masks:
                state["mask"] = kept_masks[p]
        for gi, group in enumerate(self.param_groups):
            for key, value in self.defaults.items():
                group.setdefault(key, value)
            check_group(group, f" (loaded param group {gi})")
            self._check_storage(group, f" (loaded param group {gi})")
        if self._compact is not None:
            self._compact.buffers.clear()
            for p in params:
                (self._compact.register if "indices" in self.state[p] else self._compact.unregister)(p)
        if extras is not None:
            self._mask_kind = extras["mask_kind"]
            self.seed = extras["seed"]

    def __getstate__(self) -> dict:
        """torch keeps only defaults, state and groups; add what defines the mask stream."""
        state = super().__getstate__()
        state.update({key: getattr(self, key) for key in self._PICKLED})
        return state

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self._backends = {}
        self._compact = sparse.CompactGradients(self._indices_of) if self.compact_grads else None
        if self._compact is not None:
            for p, s in self.state.items():
                if "indices" in s:
                    self._compact.register(p)
        self._rng_bases, self._rng_groups = {}, 0
        for group in self.param_groups:
            for p in group["params"]:
                self._rng_bases[p] = self._rng_groups
                self._rng_groups += philox.rng_group_counts(p.numel())


CHILDTUNING_MODES = (None, "ChildTuning-D", "ChildTuning-F")


class ChildTuningAdamW(MaskedAdamW):
    r"""The ChildTuning optimizer (Xu et al., 2021) with its published arithmetic, on fused kernels.

    Constructor-compatible with the original ``ChildTuningAdamW``.  Its update differs from
    AdamW: ``eps`` is added to ``sqrt(v)`` without bias correction, the bias corrections are
    folded into the step size ``lr * sqrt(1 - beta2^t) / (1 - beta1^t)`` (when ``correct_bias``),
    and weight decay ``p -= lr * wd * p`` runs after the update on every entry, masked or not.

    ``mode="ChildTuning-F"``: every step, every gradient entry is kept with probability
    ``reserve_p`` and scaled by ``1 / reserve_p`` (in-kernel Philox, see MaskedAdamW).
    ``mode="ChildTuning-D"``: the gradient is multiplied by the mask given to
    :meth:`set_gradient_mask` (required before the first step).  ``mode=None``: no mask.
    """

    _PICKLED = (*MaskedAdamW._PICKLED, "mode")

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0,
                 correct_bias=True, reserve_p=1.0, mode=None, *, seed=None, backend="auto"):
        if mode not in CHILDTUNING_MODES:
            raise ValueError(f"mode must be one of {CHILDTUNING_MODES}, got {mode!r}")
        if not isinstance(correct_bias, bool):
            raise TypeError(f"correct_bias must be a bool, got {correct_bias!r}")
        self.mode = mode
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, reserve_p=reserve_p,
                        masked="zero_grad", amsgrad=False, maximize=False, correct_bias=correct_bias)
        self._setup(params, defaults, mask=MASK_BERNOULLI if mode == "ChildTuning-F" else None,
                    seed=seed, backend=backend)

    def set_gradient_mask(self, gradient_mask: Mapping) -> None:
        """Set the Child-Tuning-D mask: a dict from parameter (or name) to a bool tensor."""
        if self.mode != "ChildTuning-D":
            raise ValueError(f"set_gradient_mask applies to mode='ChildTuning-D'; this optimizer has mode={self.mode!r}")
        if not isinstance(gradient_mask, Mapping):
            raise TypeError(f"gradient_mask must be a dict of bool tensors, got {type(gradient_mask).__name__}")
        self.set_mask(gradient_mask)

    _MODE_KINDS = {None: (MASK_NONE,), "ChildTuning-D": (MASK_NONE, MASK_DENSE), "ChildTuning-F": (MASK_BERNOULLI,)}

    def load_state_dict(self, state_dict: dict) -> None:
        """As MaskedAdamW's, refusing a state dict whose mask kind contradicts this ``mode``."""
        kind = (state_dict.get("childopt") or {}).get("mask_kind", self._mask_kind)
        if kind not in self._MODE_KINDS[self.mode]:
            raise ValueError(f"this state_dict holds a {kind!r} mask, which mode={self.mode!r} cannot use")
        super().load_state_dict(state_dict)

    def _check_ready(self) -> None:
        if self.mode == "ChildTuning-D" and self._mask_kind != MASK_DENSE:
            raise RuntimeError("ChildTuningAdamW(mode='ChildTuning-D') needs set_gradient_mask(...) before step()")

    def _bias_scalars(self, group: dict, lr: float, step: int) -> tuple[float, float, bool]:
        """ChildTuning folds both corrections into the step size and decays after the update."""
        beta1, beta2 = (float(b) for b in group["betas"])
        step_size = lr * math.sqrt(1 - beta2**step) / (1 - beta1**step) if group["correct_bias"] else lr
        return step_size, 1.0, True
