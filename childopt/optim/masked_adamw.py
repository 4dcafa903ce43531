"""MaskedAdamW: the torch.optim surface of childopt (groups, step, masks, state dicts, hooks).

The class validates, owns the state and the mask, and does no arithmetic: ``step`` hands each
group's tensor lists to childopt.optim.functional.masked_adamw, which buckets them and calls
one backend op per bucket (childopt.backends.contract defines the update).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch.optim import Optimizer
from torch.optim.optimizer import _use_grad_for_differentiable

from childopt import backends, philox, sparse, user_warning
from childopt.backends.contract import MaskKind
from childopt.optim import checkpoint, importance_mask, params, sharding, validation
from childopt.optim.aliasing import MemorySpans
from childopt.optim.functional import masked_adamw
from childopt.optim.state import (LAYOUTS, MOMENT_KEYS, clip_by_norm_, init_missing_state, measured_gradient,
                                   with_gradients)


class MaskedAdamW(Optimizer):
    r"""AdamW that updates only a child network of the parameters (docs/design.md, "Semantics").

    Args:
        params: parameters, named parameters (``model.named_parameters()``) or param groups;
            groups may override ``lr``, ``betas``, ``eps``, ``weight_decay``, ``reserve_p``,
            ``masked``, ``amsgrad`` and ``maximize``.
        lr, betas, eps, weight_decay, amsgrad, maximize: as in ``torch.optim.AdamW``.
        mask: ``None`` (torch AdamW's update), a dict from parameter (or name) to a bool tensor
            of its shape (a fixed child network, Child-Tuning-D; parameters without an entry
            train fully), or ``"bernoulli"`` (Child-Tuning-F: each step each element is kept
            with probability ``reserve_p``, drawn in-kernel from Philox keyed by the seed, the
            parameter's step and the element's global index; childopt.philox), or ``"importance"``
            / ``Importance(...)`` (each step each element is kept with a probability rising with
            its importance, ``reserve_p`` in expectation per scope, drawn in the kernel from the
            same stream; childopt.optim.importance_mask.Importance).
        reserve_p: keep probability of the Bernoulli mask (the expected kept share of the
            importance mask), in (0, 1].
        masked: ``"freeze"`` (dropped p, m, v stay bit-identical) or ``"zero_grad"`` (their
            gradient is zeroed, Bernoulli keeps scaled by ``1 / reserve_p``, as ChildTuning
            publishes it, importance keeps by ``1 / p_i``: an unbiased gradient estimate);
            ``None``: freeze for dict masks, zero_grad for Bernoulli and importance.
        seed: 64-bit seed of the Bernoulli stream; ``None`` draws one from torch's generator.  Without
            a drawn mask (Bernoulli, importance) at construction, the draw leaves the generator as
            it was, so that swapping torch's AdamW for this one keeps the user's random stream (two
            such optimizers built with nothing drawn in between share a seed: give ``seed`` to
            tell apart the masks they may be given later).
        sync_seed: with torch.distributed initialised, the ranks of the default process group
            agree on the seed at the first Bernoulli step (``seed=None`` takes rank 0's; seeds
            that differ raise on every rank), so replicas and shards draw one mask.  ``False``
            for an optimizer that only some ranks step (the agreement is a collective).
        backend: ``"auto"``, ``"native"``, ``"triton"`` or ``"reference"`` (childopt.backends).
        storage: ``"dense"``, or ``"sparse"``: parameters with a dict mask keep only their
            selected entries (int32/int64 ``indices`` and compact fp32 moments, 12 B per entry)
            and follow ``masked="freeze"``'s trajectory bit for bit on one backend.
        compact_grads: sparse storage only: a gradient hook keeps ``grad[indices]`` and frees
            the dense gradient inside backward (clip with :meth:`clip_grad_norm_`).
        foreach, fused: ``fused=True`` needs a kernel backend; ``foreach=False`` or
            ``fused=False`` select the one-tensor-at-a-time reference; ``foreach=True``: as is.
        capturable: steps, ``lr`` and step scalars on the parameters' device: CUDA graphs can
            capture ``step()``; a compiled step does not recompile when an LR scheduler runs.
        differentiable: only ``False`` (the kernels have no autograd formula).
    """

    _PICKLED = ("_backend_request", "_backend_exclude", "seed", "_mask_kind", "storage", "compact_grads", "sync_seed",
                "_seed_drawn", "_importance_config")
    _RULE = "adamw"

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, *, mask=None,
                 reserve_p=1.0, masked=None, seed=None, amsgrad=False, maximize=False, backend="auto",
                 storage="dense", compact_grads=False, foreach=None, fused=None, capturable=False,
                 differentiable=False, sync_seed=True):
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, reserve_p=reserve_p, masked=masked,
                        amsgrad=amsgrad, maximize=maximize, foreach=foreach, fused=fused, capturable=capturable,
                        differentiable=differentiable)
        self._setup(params, defaults, mask=mask, seed=seed, backend=backend, storage=storage,
                    compact_grads=compact_grads, sync_seed=sync_seed)
        if mask is None and (shares := sorted({float(g["reserve_p"]) for g in self.param_groups} - {1.0})):
            user_warning.warn(f"reserve_p={shares[0]:g} has no effect without a mask (until set_mask gives one): "
                              "every entry is trained.  For Child-Tuning-F pass mask='bernoulli'; for importance "
                              "sampling, mask='importance'")

    def _setup(self, params, defaults: dict, *, mask, seed, backend: str, storage: str = "dense",
               compact_grads: bool = False, sync_seed: bool = True) -> None:
        validation.check_arguments(defaults, storage, compact_grads)
        self.storage, self.compact_grads = storage, compact_grads
        # GradScaler unscales and inf-checks only .grad, which compact gradients replace: declaring
        # our own scaling makes it hand us the scale, so step() can refuse instead of mis-stepping.
        self._step_supports_amp_scaling = compact_grads
        self._compact = sparse.CompactGradients(self._indices_of) if compact_grads else None
        self._backend_request, self._backend_exclude = validation.backend_for_flags(
            backends.check_name(backend), defaults["foreach"], defaults["fused"])
        self._backends: dict = {}
        self.seed = None if seed is None else philox.check_seed(seed)  # None: drawn by set_mask below
        validation.check_bool(sync_seed, "sync_seed")
        self.sync_seed = sync_seed
        self._seed_drawn, self._seed_agreed = seed is None, not sync_seed
        self._rng_bases: dict = {}
        self._rng_lanes: dict = {}
        self._shapes: dict = {}  # parameter -> its shape when numbered (a resized one no longer fits its state)
        self._sharded = False  # any DTensor parameter: the step unwraps local shards
        self._rng_groups = 0
        self._mask_kind = MaskKind.NONE
        self._importance_config = self._importance = None
        super().__init__(params, defaults)
        self.set_mask(mask)

    def add_param_group(self, param_group: dict) -> None:
        """Add a group (validated) and give its parameters the next Philox index range."""
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        group[checkpoint.GROUP_KEY] = None  # the key that state_dict() fills (checkpoint.attach_extras)
        where = f" (param group {len(self.param_groups) - 1})"
        try:
            validation.check_group(group, where, self.storage)
            self._check_group_options(group, where)
            validation.check_params(group["params"], self.describe)
            self._held_memory().check(group["params"], self.describe)
            for device in {p.device for p in group["params"]}:
                self._backend(device)  # a backend asked for by name that cannot run here fails now
            # the sampled parameters and their scopes include the new group (its reserve_p must fit theirs)
            sampler = (None if self._importance_config is None
                       else self._make_sampler(self._importance_config, self._sampler_steps()))
        except Exception:
            self.param_groups.pop()  # torch's add_param_group appended it; nothing else has changed
            raise
        self._held_memory().remember(group["params"])
        if group["capturable"] and not isinstance(group["lr"], torch.Tensor):
            group["lr"] = torch.tensor(float(group["lr"]), dtype=torch.float64, device=group["params"][0].device)
        self._number(group)
        if sampler is not None:
            self._importance = sampler

    def _held_memory(self) -> MemorySpans:
        """The memory of the held parameters, against which an added group is checked (rebuilt,
        without the group being added, on the first add after unpickling)."""
        if self.__dict__.get("_spans") is None:
            self._spans = MemorySpans()
            self._spans.remember([p for g in self.param_groups[:-1] for p in g["params"]])
        return self._spans

    def _check_group_options(self, group: dict, where: str) -> None:
        """torch's flags in a group: valid, and ``foreach``/``fused`` the optimizer's own (they pick
        one backend for every group, at construction)."""
        try:
            validation.check_torch_flags(group["foreach"], group["fused"], group["capturable"],
                                         group["differentiable"])
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"{exc}{where}") from None
        for flag in ("foreach", "fused"):
            if group[flag] != self.defaults[flag]:
                raise ValueError(f"{flag}={group[flag]!r}{where} differs from the optimizer's {flag}="
                                 f"{self.defaults[flag]!r}: it picks the backend of every group; set it on the "
                                 "optimizer")

    def _number(self, group: dict) -> None:
        """Give each parameter the next Philox index range; capturable: as a device scalar too.

        A shard (DTensor) is numbered by its full parameter's size; its own first group and
        lane follow from its global offset, so its draws do not depend on the world size.
        """
        for p in group["params"]:
            offset = sharding.element_offset(p, self.describe)
            base = self._rng_groups + offset // 4
            self._rng_bases[p] = torch.tensor(float(base), dtype=torch.float64, device=p.device) \
                if group["capturable"] else base
            self._rng_lanes[p] = offset % 4
            self._shapes[p] = p.shape
            self._sharded = self._sharded or sharding.is_dtensor(p)
            self._rng_groups += philox.rng_group_counts(p.numel())

    def _indices_of(self, param: torch.Tensor) -> torch.Tensor:
        return self.state[param]["indices"]

    def describe(self, param: torch.Tensor) -> str:
        """How messages name ``param``."""
        return params.describe(self.param_groups, param)

    def set_mask(self, mask, *, reset_state: bool = False) -> None:
        """Replace the child network: ``None``, ``"bernoulli"`` or a dict as in the constructor.

        State is kept by default (see childopt.optim.state for how each storage carries it over);
        ``reset_state=True`` restarts ``step`` and the moments of every parameter whose mask
        changed (every parameter, when the mask kind changes) from zero, as on step 1.  A mask is
        state, so once one is held the state of every parameter that requires grad is initialised:
        torch.distributed.checkpoint takes an optimizer with any state for one with all of it.
        """
        validation.check_bool(reset_state, "reset_state")
        kind, new = params.parse_mask(self.param_groups, mask)
        self._check_mask_kind(kind, "set_mask got")
        if self.storage == "sparse" and kind.draws:
            raise ValueError(f"storage='sparse' needs a fixed mask (a dict); mask={kind.label!r} changes every step")
        sampler = self._make_sampler(new) if kind == MaskKind.IMPORTANCE else None
        if kind == MaskKind.IMPORTANCE:
            new = {}
        for state in self.state.values():
            state.pop("importance", None)  # a new mask draws anew
        changed = LAYOUTS[self.storage].store_masks(self.state, new, self._compact, self.describe)
        if kind != self._mask_kind:
            changed = [p for g in self.param_groups for p in g["params"]]
        if reset_state:
            for p in changed:
                for key in ("step", *MOMENT_KEYS):
                    self.state[p].pop(key, None)
        if self.seed is None:  # seed=None, at construction
            self.seed = _draw_seed(advance=kind.draws)
        self._mask_kind = kind
        self._importance = sampler
        self._importance_config = sampler.config if sampler is not None else None
        if any(self.state.values()):  # of the parameters that can get a gradient, as DCP's own init step
            for group in self.param_groups:
                trained = [p for p in group["params"] if p.requires_grad]
                init_missing_state(trained, [self.state[p] for p in trained], group["amsgrad"], group["capturable"])

    def _rescaled_params(self) -> set:
        """The parameters whose kept gradients are scaled by 1 / p (groups under zero-grad)."""
        return {p for g in self.param_groups if self._masked_mode(g) == "zero_grad" for p in g["params"]}

    def _make_sampler(self, config, steps: Optional[int] = None) -> importance_mask.ImportanceSampler:
        def resolve(scores, what):
            return params.resolve_entries(self.param_groups, scores, what, importance_mask.check_scores)

        return importance_mask.ImportanceSampler(config, self.param_groups, self.describe, resolve, steps)

    def _sampler_steps(self) -> Optional[int]:
        """The importance sampler's step count (its refresh schedule): the live sampler's, or the one
        kept for the sampler rebuilt at the next step (after a copy, pickling or a load)."""
        return self._importance.steps if self._importance is not None else self.__dict__.get("_importance_steps")

    @property
    def mask_kind(self) -> str:
        """``"none"``, ``"dense"`` (dict mask), ``"bernoulli"`` or ``"importance"``."""
        return self._mask_kind.label

    def backend_name(self, device=None) -> str:
        """The backend that steps tensors on ``device`` (default: the first parameter's)."""
        if device is None:
            device = self.param_groups[0]["params"][0].device
        return self._backend(torch.device(device)).name

    def _backend(self, device: torch.device):
        backend = self._backends.get(device)
        if backend is None:
            backend = self._backends[device] = backends.create(self._backend_request, device,
                                                               exclude=self._backend_exclude)
        return backend

    def _check_ready(self) -> None:
        """Hook for subclasses that need configuration before the first step."""

    def _check_mask_kind(self, kind: MaskKind, holder: str) -> None:
        """Hook for subclasses that cannot run every mask kind: refuse ``kind``, which set_mask got or
        a loaded state dict holds (``holder`` says which), before anything is written."""

    def _rule(self, group: dict) -> str:
        """How bias corrections and weight decay enter the update (childopt.optim.functional.RULES)."""
        return self._RULE

    def _check_group_at_step(self, group: dict, where: str) -> None:
        """What a group the user may have edited since construction must hold, checked at each step
        before any group is written."""
        validation.check_group(group, where, self.storage, at_step=True)
        self._check_group_options(group, where)
        if self._masked_mode(group) == "zero_grad" and self._masks_some_entry(group):
            validation.check_eps_divides(group["eps"], where)

    def _masks_some_entry(self, group: dict) -> bool:
        if self._mask_kind.draws:
            return float(group["reserve_p"]) < 1.0
        return self._mask_kind == MaskKind.DENSE and any("mask" in self.state.get(p, ()) for p in group["params"])

    def _masked_mode(self, group: dict) -> str:
        if group["masked"] is not None:
            return group["masked"]
        return "zero_grad" if self._mask_kind.draws else "freeze"

    @_use_grad_for_differentiable  # torch's optimizers' graph breaks: AOT then sees an inference graph
    def step(self, closure=None):
        """Perform one optimisation step; ``closure`` re-evaluates the model and returns the loss.

        Atomic as far as inputs go: every group is checked (hyper-parameters edited since
        construction, gradients, parameter memory) before the first tensor is written.  As in
        torch's optimizers, a CUDA graph capture of a step without ``capturable`` is refused: its
        step counts and rows live on the host, so every replay would repeat the captured step.
        """
        if not torch.compiler.is_compiling():  # torch skips it there too; calling it would break the graph
            self._capture_health_check()
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._check_ready()
        if self._mask_kind.draws and not self._seed_agreed and sharding.world_size() > 1:
            self._agree_seed()
        if self._compact is not None:
            validation.check_no_grad_scaler(self)
        work = []
        for gi, group in enumerate(self.param_groups):
            self._check_group_at_step(group, f" (param group {gi})")
            validation.check_numbered(group["params"], self._shapes, gi)
            stepped, grads = with_gradients(group["params"], self._gradient)
            validation.check_steppable(stepped, grads, self.describe, self._sharded, self._shapes)
            work.append((group, stepped, grads))
        # Unpickled or loaded, or a group's reserve_p edited (it applies from the next refresh, as
        # after a resume): rebuild the sampler
        if self._importance_config is not None and (self._importance is None
                                                    or self._importance.stale(self.param_groups)):
            self._importance = self._make_sampler(self._importance_config, self._sampler_steps())
        if self._importance is not None and not self._importance.config.uniform:
            self._importance.before_step(self.state, self.seed, self._rng_bases,
                                         self._backend(self.param_groups[0]["params"][0].device),
                                         self._rescaled_params)
        for group, stepped, grads in work:
            self._step_group(group, stepped, grads)
        if self._compact is not None:
            self._compact.mark_stepped()
        return loss

    # Eager in a compiled step (one graph break, on the first step of 2+ ranks): all_gather_object is
    # a collective of Python objects, which dynamo cannot trace, and a compiled step loses the seed it
    # would write (torch 2.13 drops writes to the optimizer's attributes from step's frame).
    @torch.compiler.disable
    def _agree_seed(self) -> None:
        """Take the seed the ranks agree on (childopt.optim.sharding.agree_seed), once."""
        self.seed = sharding.agree_seed(self.seed, self._seed_drawn)
        self._seed_agreed = True

    # torch.optim.Optimizer's check of a graph capture: its accelerator-wide name in recent torch
    # (where the CUDA name is a deprecated alias that warns), the CUDA name before.
    _capture_health_check = (getattr(Optimizer, "_accelerator_graph_capture_health_check", None)
                             or Optimizer._cuda_graph_capture_health_check)

    def _gradient(self, p: torch.Tensor):
        """The gradient the step uses: the compact buffer of a hooked parameter, else ``p.grad``."""
        return sparse.gradient_of(p, self._compact, self.describe)

    def _step_group(self, group: dict, stepped: list, grads: list) -> None:
        if not stepped:
            return
        states = [self.state[p] for p in stepped]
        init_missing_state(stepped, states, group["amsgrad"], group["capturable"])
        beta1, beta2 = group["betas"]
        unwrap = sharding.locals_of if self._sharded else list  # the kernels step each rank's shard
        uniform = self._importance is not None and self._importance.config.uniform  # Bernoulli: no draw is read
        drawn = None if uniform else "importance" if self._importance is not None else "mask"
        masked_adamw(
            unwrap(stepped), unwrap(grads), unwrap([s["exp_avg"] for s in states]),
            unwrap([s["exp_avg_sq"] for s in states]),
            unwrap([s["max_exp_avg_sq"] for s in states]) if group["amsgrad"] else None, [s["step"] for s in states],
            masks=unwrap([s.get(drawn) for s in states]),
            indices=[s.get("indices") for s in states],
            compact_grads=([False] * len(stepped) if self._compact is None
                           else [g is not p.grad for p, g in zip(stepped, grads)]),
            rng_bases=[self._rng_bases[p] for p in stepped],
            rng_lanes=[self._rng_lanes[p] for p in stepped] if self._sharded else None,
            backend=self._backend,
            mask_kind=MaskKind.BERNOULLI if uniform else self._mask_kind,
            freeze=self._masked_mode(group) == "freeze", reserve_p=float(group["reserve_p"]), seed=self.seed,
            lr=group["lr"], betas=(float(beta1), float(beta2)), eps=float(group["eps"]),
            weight_decay=float(group["weight_decay"]), amsgrad=group["amsgrad"], maximize=group["maximize"],
            rule=self._rule(group), capturable=group["capturable"],
        )

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Reset ``.grad`` of every parameter, and the compact gradient buffers."""
        validation.check_bool(set_to_none, "set_to_none")
        super().zero_grad(set_to_none)
        if self._compact is not None:
            self._compact.zero(set_to_none)

    def clip_grad_norm_(self, max_norm: float, norm_type: float = 2.0, error_if_nonfinite: bool = False):
        """Clip the gradients the next step uses by the global norm of their child-network entries.

        Equals ``torch.nn.utils.clip_grad_norm_`` on the *masked* gradients (a Bernoulli mask is
        drawn inside the step, so it clips the full gradient, as ChildTuning's trainer does).
        ``max_norm`` must be >= 0 (torch's would turn a negative one into a step uphill, NaN into
        NaN weights); a tensor is checked for shape only, as reading it could wait on a device.
        """
        validation.check_number(max_norm, "max_norm", low=0.0, read_tensor=False)
        validation.check_bool(error_if_nonfinite, "error_if_nonfinite")
        stepped, grads = with_gradients([p for group in self.param_groups for p in group["params"]], self._gradient)
        measured = [measured_gradient(g, g is p.grad, self.state.get(p, {})) for p, g in zip(stepped, grads)]
        return clip_by_norm_(grads, measured, max_norm, norm_type, error_if_nonfinite)

    def state_bytes(self) -> int:
        """Bytes of every tensor in the optimizer state: moments, indices or masks, step counters.

        Of this rank's shards only, for DTensor (FSDP2) state.
        """
        return sum(sharding.local(v).nbytes for s in self.state.values() for v in s.values()
                   if isinstance(v, torch.Tensor))

    def compact_gradients(self) -> dict:
        """The compact gradients (``grad[indices]``) kept since the last ``zero_grad``, by parameter."""
        return dict(self._compact.buffers) if self._compact is not None else {}

    def release_gradients(self) -> None:
        """Stop taking compact gradients: remove the gradient hooks, so that backward leaves a dense
        ``.grad`` on the parameters again, for another optimizer on the same model.

        The hooks live as long as this optimizer, and a Trainer, an LR scheduler or a wrapper may
        keep it alive: until then another optimizer finds ``.grad`` None and skips the parameter.
        This optimizer then steps from ``.grad``, as with ``compact_grads=False``.

        Raises:
            RuntimeError: compact gradients are waiting for a step (call it after ``zero_grad``).
        """
        if self._compact is not None:
            self._refuse_pending("release_gradients()")
            self._compact.unregister_all()
        self._compact, self.compact_grads, self._step_supports_amp_scaling = None, False, False

    def hook_gradients(self, on: bool = True) -> None:
        """Attach (``on=True``) or remove the compact-gradient hooks of the sparse parameters, to lend
        the model to code that needs dense ``.grad`` for a while (an evaluation with gradients,
        another optimizer) and take it back; unlike :meth:`release_gradients`, compact gradients
        stay on.  Nothing without compact_grads.  ``load_state_dict`` hooks them again.

        Raises:
            TypeError: ``on`` is not a bool.
            RuntimeError: removing them would drop compact gradients not yet stepped (call it after
                ``step()`` and ``zero_grad()``).
        """
        validation.check_bool(on, "hook_gradients(on=...)")
        if self._compact is None:
            return
        if not on:
            self._refuse_pending("hook_gradients(on=False)")
            self._compact.unregister_all()
            return
        for p in [p for group in self.param_groups for p in group["params"]]:
            if "indices" in self.state.get(p, {}):
                self._compact.register(p)

    def _refuse_pending(self, call: str) -> None:
        """Raise when ``call`` would drop compact gradients that no step has used yet."""
        # zero_grad(set_to_none=False) keeps the buffers, zeroed: nothing to lose there
        pending = [g for g in self._compact.buffers.values() if bool(g.any())]
        if pending:
            raise RuntimeError(f"{call} would drop the compact gradients of {len(pending)} parameters not yet "
                               "stepped: call it after step() and zero_grad()")

    def sparse_indices(self) -> dict:
        """The selected flat indices of every sparse parameter, by name (or by parameter when unnamed).

        Of a DTensor (FSDP2) parameter: this rank's entries, as int64 indices of the full parameter.
        A name that two parameters share is refused: one would hide the other's entries.
        """
        named = params.parameters_by_name(self.param_groups)
        indices = {}
        for group in self.param_groups:
            for name, p in zip(group.get("param_names", group["params"]), group["params"]):
                if "indices" in self.state.get(p, {}):
                    if isinstance(name, str) and named[name] is None:
                        raise ValueError(f"sparse_indices(): {name!r} is {params.SHARED_NAME}")
                    indices[name] = self._global_indices(p)
        return indices

    def _global_indices(self, p: torch.Tensor) -> torch.Tensor:
        indices = self.state[p]["indices"]
        if not sharding.is_dtensor(p):
            return indices
        return indices.to(torch.int64) + sharding.element_offset(p, self.describe)

    def state_dict(self) -> dict:
        """torch's state dict plus ``"childopt"``: format, mask kind, Bernoulli seed, storage (checkpoint.extras).

        Each saved group carries ``"childopt"`` too (None in the live groups), so torch.distributed.checkpoint
        keeps it, flattened or not.
        Sparse state of DTensor (FSDP2) parameters is saved in its global form, one DTensor of
        global indices and one per moment split over the ranks (childopt.optim.sparse_shards):
        a collective, so every rank calls ``state_dict()``, as torch.distributed.checkpoint does.
        torch's state-dict post-hooks see the whole dict, ``"childopt"`` included.
        """
        return checkpoint.save(self, super().state_dict)

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a MaskedAdamW state dict (any childopt version; one an earlier version saved with
        ``mask={}`` needs its entry's mask_kind set to 'none', as the error says) or a ``torch.optim.AdamW`` one.

        A childopt state dict also restores the mask kind and seed (the Bernoulli stream
        continues where it was saved); a foreign one keeps this optimizer's masks and the group
        keys it lacks (``reserve_p``, ``masked``).  A saved mask replaces the one this optimizer was
        built with, with a warning when they differ, and silently into one built with ``mask=None``.
        torch's load hooks run as in torch.optim (childopt.optim.checkpoint.load).
        """
        checkpoint.load(self, state_dict, super().load_state_dict)

    def __getstate__(self) -> dict:
        """torch keeps only defaults, state and groups; add what defines the mask stream."""
        state = super().__getstate__()
        state.update({key: getattr(self, key) for key in self._PICKLED})
        state["_importance_steps"] = self._sampler_steps()  # the sampler itself is rebuilt, not pickled
        return state

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(checkpoint.upgrade_pickled(state))
        self._backends = {}
        self._compact = sparse.CompactGradients(self._indices_of) if self.compact_grads else None
        self._rng_bases, self._rng_lanes, self._shapes, self._rng_groups, self._sharded = {}, {}, {}, 0, False
        self.__dict__.setdefault("sync_seed", True)  # pickled before the flag existed
        self.__dict__.setdefault("_importance_config", None)
        self._importance = None  # rebuilt from the config at the next step
        # Pickled before these existed: a given seed; torch's load_state_dict (which calls this too) keeps them.
        self.__dict__.setdefault("_seed_drawn", False)
        self.__dict__.setdefault("_seed_agreed", not self.sync_seed)
        if self.seed is None:  # pickled before an optimizer without a drawn mask got a seed
            self.seed = _draw_seed(advance=False)
        for group in self.param_groups:
            for key, value in self.defaults.items():
                group.setdefault(key, value)  # groups saved before a flag existed
            group.setdefault(checkpoint.GROUP_KEY, None)
            self._number(group)
        self.hook_gradients()


def _draw_seed(advance: bool) -> int:
    """A seed from torch's default generator; without ``advance``, the value its next draw would
    give, from a copy, so that the user's dropout and shuffling stay as with torch's AdamW."""
    generator = torch.default_generator
    if not advance:
        generator = torch.Generator().set_state(generator.get_state())
    return int(torch.randint(0, 2**63 - 1, (), generator=generator, device="cpu").item())  # whatever the default device
