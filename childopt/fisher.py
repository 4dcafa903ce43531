"""Diagonal Fisher information, accumulated in place during backward, and Fisher masks.

``FisherAccumulator`` registers a post-accumulate-grad hook on each scored parameter; the hook
adds ``(g * c)^2`` to the parameter's fp32 score with the fused ``fisher_accumulate`` op, where
``c`` is a per-tensor clip coefficient kept on the device.  Estimators:

* ``"batch"`` (ChildTuning-D): the squared gradient of each batch, i.e. of the batch-mean loss;
  every score is divided by the same number, the batches seen (ChildTuning's ``/ N``), so a
  parameter that gets gradients in only some batches (an unused branch, a routed expert) is not
  inflated against the others.  Cost: one backward per batch, as training.
* ``"sample"`` (FISH's empirical Fisher): the sum of squared *per-sample* gradients, computed with
  ``torch.func.vmap(torch.func.grad(...))`` over the batch in chunks of ``chunk_size`` samples
  instead of a batch-size-1 loop; scores are divided by the number of samples.  Cost: about one
  backward per sample, vectorised, and ``chunk_size`` x the scored parameters' memory.

``fisher_scores`` runs a dataloader through it with a progress bar; ``fisher_mask`` selects the child network
with :func:`childopt.masks.select_mask`, with ChildTuning-D's defaults.
"""
from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from functools import partial
from itertools import islice
from typing import Optional, Union

import torch
from torch.utils._pytree import tree_leaves, tree_map
from tqdm.auto import tqdm

from childopt import backends, user_warning
from childopt.masks import check_selection, select_mask
from childopt.optim import sharding, validation

ESTIMATORS = ("batch", "sample")
Include = Union[None, str, Callable[[str], bool]]


def _matcher(include: Include) -> Callable[[str], bool]:
    if include is None:
        return lambda name: True
    if isinstance(include, str):
        pattern = re.compile(include)
        return lambda name: pattern.search(name) is not None
    if callable(include):
        return include
    raise TypeError(f"include must be None, a regex string or a callable on names, got {type(include).__name__}")


class _LossModule(torch.nn.Module):
    """``loss_fn(model, batch)`` as a module, so torch.func.functional_call can swap its parameters."""

    def __init__(self, model: torch.nn.Module, loss_fn: Callable):
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, batch):
        return self.loss_fn(self.model, batch)


class FisherAccumulator:
    """Context manager that accumulates a diagonal Fisher estimate of the included parameters.

    Args:
        model_or_named_params: an ``nn.Module`` or ``(name, parameter)`` pairs.
        include: which parameters to score: None (all trainable), a regex searched in the name,
            or a callable on the name.
        estimator: ``"batch"`` or ``"sample"`` (needs a module; use :meth:`accumulate_samples`).
        clip_norm: clip each gradient tensor to this L2 norm before squaring (ChildTuning: 1.0).
        free_grads: set ``p.grad = None`` right after accumulating it (no optimizer step follows).
        grad_scaler: a ``torch.amp.GradScaler`` whose scale is divided out, so scores come from
            unscaled gradients; a tensor whose gradient overflowed skips that batch.
        dtype: score dtype (fp32; the fused kernels need it, other dtypes use the reference op).

    Use ``with FisherAccumulator(model) as acc: loss.backward(); ...; scores = acc.scores()``.
    Zero the gradients between batches (or pass ``free_grads=True``): the hook sees ``p.grad``.
    A batch is one backward pass that gives at least one scored parameter a gradient (overflowed
    ones under ``grad_scaler`` not counted); reentrant activation checkpointing runs a nested
    backward per segment, so there pass the number of batches to :meth:`scores` yourself.

    Under DDP, score each batch with :meth:`accumulate_loss` on a loss computed through the
    wrapped module (``ddp.module``), which leaves DDP's reducer out of the pass, then call
    :meth:`sum_over_ranks` (as :func:`fisher_scores` does).

    Under FSDP2 (DTensor parameters) each rank accumulates its shard's scores, as DTensors; the
    clip norms are those of whole tensors (reduced over the shards).  FSDP2 calls the hooks after
    its reduce-scatter, so the scores are those of the gradient averaged over the ranks' batches.
    """

    def __init__(self, model_or_named_params, *, include: Include = None, estimator: str = "batch",
                 clip_norm: Optional[float] = None, free_grads: bool = False, grad_scaler=None,
                 dtype: torch.dtype = torch.float32, backend: str = "auto", chunk_size: Optional[int] = None):
        if isinstance(model_or_named_params, torch.nn.Module):
            self.model = model_or_named_params
            named = list(model_or_named_params.named_parameters())
        else:
            self.model = None
            named = list(model_or_named_params)
            if not all(isinstance(n, str) and isinstance(p, torch.Tensor) for n, p in named):
                raise TypeError("model_or_named_params must be an nn.Module or (name, parameter) pairs")
        if estimator not in ESTIMATORS:
            raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
        if estimator == "sample" and self.model is None:
            raise ValueError("estimator='sample' needs the nn.Module (it calls the model per sample)")
        if clip_norm is not None:  # a number, not a truthy stand-in (True would clip at 1.0)
            clip_norm = validation.check_number(clip_norm, "clip_norm (or None)", low=0.0, low_open=True)
        validation.check_bool(free_grads, "free_grads")
        if not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating-point dtype, got {dtype}")
        included = _matcher(include)
        self._params = {n: p for n, p in named if p.requires_grad and included(n)}
        if not self._params:
            raise ValueError(f"include={include!r} matches no trainable parameter")
        self.estimator, self.clip_norm, self.free_grads = estimator, clip_norm, free_grads
        self.grad_scaler, self.chunk_size = grad_scaler, chunk_size
        # FSDP2 parameters (DTensors) get DTensor scores of their placement: each rank scores its shard.
        self._sharded = any(sharding.is_dtensor(p) for p in self._params.values())
        self._fisher = {n: torch.zeros_like(p, dtype=dtype, memory_format=torch.contiguous_format)
                        if sharding.is_dtensor(p) else torch.zeros(p.shape, dtype=dtype, device=p.device)
                        for n, p in self._params.items()}
        self._counts = dict.fromkeys(self._params, 0)
        self._graph_task = None  # sharded: the backward pass (autograd graph task) last seen
        self._seen = 0  # batches (sample estimator: samples): the divisor of every score
        self._new_pass = False  # a backward pass reached a scored parameter and is not counted yet
        self._pass = 0  # id of the current backward pass
        self._counted_passes: set = set()
        self._overflowed = {n: [] for n in self._params}  # GradScaler: passes whose gradient was inf/NaN
        self._backend_request = backends.check_name(backend)
        self._backends: dict = {}
        self._handles: list = []
        self._loop_samples = False  # the sample estimator's model failed under vmap: one sample at a time

    def __enter__(self) -> "FisherAccumulator":
        if self.estimator == "batch":
            self._handles = [p.register_post_accumulate_grad_hook(partial(self._on_grad, n))
                             for n, p in self._params.items()]
            # fires once per backward pass (graph task), before the first scored gradient accumulates;
            # FSDP2's sharded parameters are not in the graph (it calls their hooks after the
            # reduce-scatter, once per pass): there _on_grad tells passes apart.
            if not self._sharded:
                self._handles.append(torch.autograd.graph.register_multi_grad_hook(
                    list(self._params.values()), self._on_pass, mode="any"))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _backend(self, device: torch.device):
        if device not in self._backends:
            wanted = self._backend_request
            if next(iter(self._fisher.values())).dtype != torch.float32:
                wanted = "reference"
            self._backends[device] = backends.create(wanted, device)
        return self._backends[device]

    def _coefficients(self, norms: torch.Tensor) -> torch.Tensor:
        """Per-tensor gradient multipliers: GradScaler's inverse scale times the clip coefficient.

        ``norms`` are only read when clipping; without it they may be a placeholder of the count.
        """
        inverse = 1.0
        if self.grad_scaler is not None and self.grad_scaler.is_enabled():
            inverse = 1.0 / self.grad_scaler.get_scale()
        coefficients = torch.full(norms.shape, inverse, dtype=torch.float32, device=norms.device)
        if self.clip_norm is not None:
            coefficients = coefficients * torch.clamp(self.clip_norm / (norms * inverse + 1e-6), max=1.0)
        return coefficients

    def _on_pass(self, grad: torch.Tensor) -> None:
        """A backward pass reaches the scored parameters: the next accumulation counts one batch."""
        self._pass += 1
        self._new_pass = True

    def _on_grad(self, name: str, param: torch.Tensor) -> None:
        if param.grad is None:
            raise RuntimeError(f"the gradient of {name!r} was freed by an earlier hook (e.g. MaskedAdamW with "
                               "compact_grads=True) before the Fisher hook could read it: compute the Fisher "
                               "scores before building a compact-gradient optimizer, or call its "
                               "release_gradients()")
        if self._sharded:
            # FSDP2's sharded parameters are outside the autograd graph, so no multi-grad hook
            # sees a pass start; their hooks run inside the backward's graph task, whose id tells
            # passes apart (torch's private accessor: no public API exposes the graph task).
            task = torch._C._current_graph_task_id()
            if task != self._graph_task:
                self._graph_task = task
                self._on_pass(None)
        self._add_gradient(name, param.grad.detach())
        if self.free_grads:
            param.grad = None

    def _add_gradient(self, name: str, grad: torch.Tensor) -> None:
        """Add the clipped, unscaled square of one tensor's gradient of the current pass to its score."""
        if self.clip_norm is None and self.grad_scaler is None:
            norms = torch.empty(1, device=sharding.local(grad).device)  # no norm pass: 12 B per element, not 16
        else:  # fp32 or wider: a float64 gradient's norm is not narrowed before it is taken
            wide = torch.promote_types(grad.dtype, torch.float32)
            norms = torch.linalg.vector_norm(grad, dtype=wide).float().reshape(1)
            if sharding.is_dtensor(norms):  # the whole tensor's norm, reduced over the shards
                norms = norms.full_tensor()
        # GradScaler: one sync per tensor, to leave an overflowed gradient out of its tensor's score
        # and divisor (other tensors of the batch may be finite and already accumulated).
        if self.grad_scaler is not None and not bool(torch.isfinite(norms).all()):
            self._overflowed[name].append(self._pass)
            return
        # A gradient dtype the kernels do not take (float64) goes to the reference backend.
        grad = sharding.local(grad)
        backend = backends.route(self._backend(grad.device), grad.dtype, grad.dtype)
        backend.fisher_accumulate([sharding.local(self._fisher[name])], [grad.contiguous()], self._coefficients(norms))
        self._counts[name] += 1
        if self._new_pass:
            self._seen += 1
            self._counted_passes.add(self._pass)
            self._new_pass = False

    def accumulate_loss(self, loss: torch.Tensor) -> None:
        """Score the gradients of one batch's ``loss`` without a backward into ``.grad`` (``estimator="batch"``).

        The gradients of the scored parameters come from ``torch.autograd.grad``, so no ``.grad``
        and no gradient-accumulator hook is touched: under DDP its reducer (which would all-reduce,
        and counts the backward passes of a static graph) stays out of the pass.  They arrive
        together, as a training backward holds them (the hooks of ``loss.backward()`` free each as
        it comes), and each is freed once scored.

        Raises:
            RuntimeError: the estimator is not ``"batch"``, a scored parameter is an FSDP2 DTensor
                (its gradient reaches it outside the graph: use ``loss.backward()``), or ``loss``'s
                graph holds a reentrant activation checkpoint, whose parameters
                ``torch.autograd.grad`` cannot reach (it would return no gradient for them).
        """
        if self.estimator != "batch":
            raise RuntimeError("accumulate_loss needs estimator='batch'; with 'sample', call accumulate_samples")
        if self._sharded:
            raise RuntimeError("accumulate_loss does not take FSDP2 (DTensor) parameters: torch.autograd.grad gets no "
                               "gradient for them; call loss.backward() inside the with-block")
        if _holds_reentrant_checkpoint(loss):
            raise RuntimeError("the Fisher pass's loss goes through reentrant activation checkpointing "
                               "(use_reentrant=True), whose parameters torch.autograd.grad cannot reach: score the "
                               "model before wrapping it in DDP, or checkpoint with use_reentrant=False")
        names, params = list(self._params), list(self._params.values())
        grads = list(torch.autograd.grad(loss, params, allow_unused=True))
        self._on_pass(None)
        for i, name in enumerate(names):
            if grads[i] is not None:
                self._add_gradient(name, grads[i])
                grads[i] = None

    def accumulate_samples(self, loss_fn: Callable, batch) -> None:
        """Add the squared per-sample gradients of ``loss_fn(model, batch)`` (``estimator="sample"``).

        ``batch`` is a tensor or a pytree of tensors whose leading dimension is the sample (a
        mapping that is not a dict, as Hugging Face's ``BatchEncoding``, is taken as a dict: vmap
        sees no tensors inside it); ``loss_fn`` sees each sample with a batch dimension of 1.
        Dropout draws differ per sample.  A model that cannot run under vmap (data-dependent control
        flow: ``.item()``, ``if tensor``, as Hugging Face's attention-mask code) is run one sample
        at a time, with a warning.
        """
        if self.estimator != "sample":
            raise RuntimeError("accumulate_samples needs estimator='sample'; with 'batch', call loss.backward()")
        if isinstance(batch, Mapping) and not isinstance(batch, dict):
            batch = dict(batch)
        wrapper = _LossModule(self.model, loss_fn)
        detached = {n: p.detach() for n, p in self._params.items()}

        def sample_loss(params, sample):
            one = tree_map(lambda x: x.unsqueeze(0), sample)
            return torch.func.functional_call(wrapper, {f"model.{n}": v for n, v in params.items()}, (one,))

        if not self._loop_samples:
            try:
                self._add_squares(torch.func.vmap(torch.func.grad(sample_loss), in_dims=(None, 0),
                                                  randomness="different", chunk_size=self.chunk_size)(detached, batch))
                return
            except RuntimeError as error:  # data-dependent control flow the model cannot run under vmap
                if not str(error).startswith("vmap:"):
                    raise
                user_warning.warn(f"estimator='sample': the model cannot run under torch.func.vmap "
                                  f"({str(error)[:160]}...); taking one sample at a time instead (the same scores, "
                                  "about a backward per sample, unvectorised).  Hugging Face models do this when "
                                  "the batch has an attention_mask.")
                self._loop_samples = True
        samples = tree_leaves(batch)[0].shape[0]
        for i in range(samples):
            one = tree_map(lambda x: x[i], batch)
            self._add_squares({n: g.unsqueeze(0) for n, g in torch.func.grad(sample_loss)(detached, one).items()})

    def _add_squares(self, per_sample: dict) -> None:
        """Add the clipped squares of per-sample gradients (name -> [samples, *shape]) to the scores."""
        names = list(self._params)
        n_samples = per_sample[names[0]].shape[0]
        for n in names:
            grads = per_sample[n].reshape(n_samples, -1).float()
            norms = torch.linalg.vector_norm(grads, dim=1)
            scaled = grads * self._coefficients(norms)[:, None]
            self._fisher[n].add_((scaled * scaled).sum(0).view(self._fisher[n].shape).to(self._fisher[n].dtype))
            self._counts[n] += n_samples
        self._seen += n_samples

    def scores(self, num_batches: Optional[int] = None) -> dict:
        """name -> Fisher estimate: the accumulated squares over the batches (or samples) seen.

        Every tensor is divided by the same number, :attr:`num_seen` or, with the batch
        estimator, ``num_batches`` when given (the batches run, where a batch may take several
        backward passes or reach no scored parameter); under a GradScaler, less the batches in
        which that tensor's gradient overflowed (it is left out of them).

        Raises:
            ValueError: ``num_batches`` is not an int >= 1, or is given to the sample estimator.
            RuntimeError: nothing was accumulated (no backward pass inside the with-block).
        """
        divisor = self._seen
        if num_batches is not None:
            if self.estimator != "batch":
                raise ValueError("num_batches is for estimator='batch'; the sample estimator divides by "
                                 "the samples it saw")
            if isinstance(num_batches, bool) or not isinstance(num_batches, int) or num_batches < 1:
                raise ValueError(f"num_batches must be an int >= 1, got {num_batches!r}")
            divisor = num_batches
        if divisor == 0:
            raise RuntimeError("no gradients of the scored parameters were accumulated: run loss.backward() "
                               "inside the with-block (or accumulate_samples) before asking for scores")
        return {n: f / max(divisor - self._overflows(n), 1) for n, f in self._fisher.items()}

    def _overflows(self, name: str) -> int:
        """Counted batches in which ``name``'s gradient overflowed (GradScaler) and was left out."""
        return sum(1 for p in self._overflowed[name] if p in self._counted_passes)

    def sum_over_ranks(self, group=None) -> None:
        """Sum the scores, counts and batches seen over the ranks of ``group`` (default: the world).

        For replicated parameters (DDP), where each rank scored its own batches: every rank then
        holds the Fisher of all ranks' batches, the same bits everywhere (reduced on the group's
        first rank, then broadcast from it), so a mask selected from it is the same on every rank.
        Sharded (DTensor) scores are left alone, with the batches seen: FSDP2 hands each rank
        gradients already reduced over the ranks' batches, so they are every rank's Fisher already.
        Every rank of ``group`` must call it.

        Raises:
            NotImplementedError: with a grad_scaler, or over both sharded and replicated
                parameters (their scores would need different divisors).
        """
        if self.grad_scaler is not None:
            raise NotImplementedError("sum_over_ranks with a grad_scaler: the ranks' overflowed passes differ")
        if not _process_group_running():
            raise RuntimeError("sum_over_ranks needs an initialized torch.distributed process group")
        names = [n for n, p in self._params.items() if not sharding.is_dtensor(p)]
        if self._sharded and names:
            raise NotImplementedError(f"sum_over_ranks over FSDP2-sharded (DTensor) and replicated parameters "
                                      f"({names[0]!r}, ...) together: the sharded ones hold every rank's batches "
                                      "already, the replicated ones this rank's; score them in two accumulators")
        if not names:
            return
        first = torch.distributed.get_global_rank(group, 0) if group is not None else 0
        for name in names:
            torch.distributed.reduce(self._fisher[name], dst=first, group=group)
            torch.distributed.broadcast(self._fisher[name], src=first, group=group)
        totals = torch.tensor([self._seen] + [self._counts[n] for n in names], dtype=torch.int64,
                              device=self._fisher[names[0]].device if names else "cpu")
        torch.distributed.all_reduce(totals, group=group)
        self._seen, *counts = totals.tolist()
        self._counts.update(zip(names, counts))

    @property
    def num_seen(self) -> int:
        """Batches (sample estimator: samples) seen, the divisor of every score."""
        return self._seen

    @property
    def counts(self) -> dict:
        """In how many batches (or samples) each parameter received a gradient (a diagnostic:
        scores are all divided by :attr:`num_seen`)."""
        return dict(self._counts)


def _holds_reentrant_checkpoint(loss: torch.Tensor) -> bool:
    """``loss``'s autograd graph holds a node of ``torch.utils.checkpoint``'s reentrant function: its
    backward runs a backward of its own into ``.grad``, which ``torch.autograd.grad`` never starts.
    A walk over the graph's nodes (a few thousand for a BERT): no autograd API says this."""
    seen, stack = set(), [loss.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        if type(node).__name__ == "CheckpointFunctionBackward":
            return True
        seen.add(node)
        stack.extend(child for child, _ in node.next_functions)
    return False


def _hf_loss(model: torch.nn.Module, batch):
    """Hugging Face convention: the model returns ``.loss`` when the batch carries labels."""
    output = model(**batch) if isinstance(batch, Mapping) else model(batch)
    loss = getattr(output, "loss", None)
    if loss is None:
        raise ValueError("the model returned no .loss: pass loss_fn(model, batch) -> scalar loss")
    return loss


def _to_device(batch, device: torch.device):
    return tree_map(lambda x: x.to(device) if isinstance(x, torch.Tensor) else x, batch)


def fisher_scores(model: torch.nn.Module, dataloader: Iterable, *, loss_fn: Optional[Callable] = None,
                  include: Include = r"layer", max_batches: Optional[int] = None, estimator: str = "batch",
                  clip_norm: Optional[float] = 1.0, backend: str = "auto", progress: bool = True,
                  across_ranks: Optional[bool] = None) -> dict:
    """Fisher scores (name -> tensor) of the included parameters over ``dataloader``: the pass
    :func:`fisher_mask` selects from, for a caller that needs the scores themselves (e.g. a picture
    of the importance per attention head, :mod:`childopt.analysis`).

    Defaults and behaviour as :func:`fisher_mask`: parameters whose name contains ``layer``,
    per-tensor clip 1.0, the batch estimator; the model runs in its current mode; existing
    gradients are cleared first, each is freed as soon as it is scored, and all are zeroed after
    each batch.  With the batch estimator every score is divided by the number of batches run.

    ``across_ranks``: sum the scores over the ranks (:meth:`FisherAccumulator.sum_over_ranks`), so
    every rank gets the Fisher of all ranks' batches and the same mask.  Under DDP each rank sees
    its own share of the data, and masks selected from per-rank scores differ: the replicas would
    drift apart.  Default: on for a ``DistributedDataParallel`` model (every rank runs it), off
    otherwise; every rank must call with it on.  Under FSDP2 (DTensor parameters) each rank's
    gradients are already reduced over every rank's batch, so the scores are the same with it or
    without.  A ``DistributedDataParallel`` model (compiled or
    not) is scored through its ``module`` (``loss_fn`` receives the module), its gradients taken
    with ``torch.autograd.grad``, outside DDP's reducer: no all-reduce in each backward, so the
    ranks may run different numbers of batches, and training through the wrapper afterwards
    (``static_graph`` included) is unaffected; the scores keep the DDP names.

    Raises:
        ValueError: the dataloader yields no batch (on any rank, with ``across_ranks``: on all), or
            no batch gives the included parameters a gradient, or ``across_ranks`` without an
            initialized process group.
    """
    validation.check_bool(across_ranks, "across_ranks", none_ok=True)
    scored, prefix, ddp = _outside_ddp(model)
    if across_ranks is None:
        across_ranks = ddp is not None
        if not across_ranks and _replicated_on_ranks(model):
            world = torch.distributed.get_world_size()
            user_warning.warn(f"Fisher scores on one of {world} ranks: each scores its own batches, and masks "
                              "selected from them differ across DDP replicas.  Pass across_ranks=True (on every "
                              "rank) to sum the scores over the ranks, or across_ranks=False if this rank alone "
                              "scores on purpose")
    if across_ranks and not _process_group_running():
        raise ValueError("across_ranks=True needs an initialized torch.distributed process group")
    if max_batches is not None and (isinstance(max_batches, bool) or not isinstance(max_batches, int)
                                    or max_batches < 1):
        raise ValueError(f"max_batches must be None or an int >= 1, got {max_batches!r}")
    loss_fn = loss_fn or _hf_loss
    device = next(model.parameters()).device
    accumulator = FisherAccumulator(scored, include=_Prefixed(include, prefix) if prefix else include,
                                    estimator=estimator, clip_norm=clip_norm, free_grads=True, backend=backend)
    batches = dataloader if max_batches is None else islice(dataloader, max_batches)
    total = _length(dataloader)
    if max_batches is not None:
        total = max_batches if total is None else min(total, max_batches)
    scored.zero_grad(set_to_none=True)  # gradients left from earlier work would be scored as this batch's
    n_batches = 0
    with accumulator:
        for batch in tqdm(batches, total=total, desc="fisher", unit="batch", disable=not progress):
            batch = _to_device(batch, device)
            if estimator == "sample":
                accumulator.accumulate_samples(loss_fn, batch)
            elif ddp is not None:
                accumulator.accumulate_loss(loss_fn(scored, batch))
            else:
                loss_fn(scored, batch).backward()
            scored.zero_grad(set_to_none=True)
            n_batches += 1
    if across_ranks:
        group = None if ddp is None else ddp.process_group  # else the world
        accumulator.sum_over_ranks(group)
        if not accumulator._sharded:  # FSDP2's gradients were of every rank's batches: the count already is
            ran = torch.tensor([n_batches], dtype=torch.int64, device=device)
            torch.distributed.all_reduce(ran, group=group)
            n_batches = int(ran)
    if n_batches == 0:
        raise ValueError(f"Fisher scores: the dataloader yielded no batches (max_batches={max_batches!r}); the "
                         "Fisher scores need at least one")
    if accumulator.num_seen == 0:
        raise ValueError(f"Fisher scores: none of the {n_batches} batches gave a gradient to the included "
                         f"parameters (include={include!r}); check include and loss_fn")
    scores = accumulator.scores(n_batches if estimator == "batch" else None)
    return {prefix + name: score for name, score in scores.items()}


def _outside_ddp(model: torch.nn.Module) -> tuple:
    """(the module to run the Fisher pass on, the prefix its parameter names lack, the DDP wrapper or None).

    A ``DistributedDataParallel`` model, compiled or not, is run through its ``module``, and its
    batches are scored with :meth:`FisherAccumulator.accumulate_loss`: DDP's reducer would
    all-reduce every backward (a collective that hangs when the ranks run different numbers of
    batches, or when one rank left a forward without its backward), count the passes into a
    static graph, and sync buffers inside vmap; the pass needs none of it (each rank scores its
    own gradients; :meth:`FisherAccumulator.sum_over_ranks` sums them once).  The scores keep the
    model's names (``module.``, ``_orig_mod.`` for ``torch.compile``).
    """
    inner, prefix = model, ""
    while isinstance(getattr(inner, "_orig_mod", None), torch.nn.Module):  # torch.compile's wrapper
        inner, prefix = inner._orig_mod, prefix + "_orig_mod."
    if isinstance(inner, torch.nn.parallel.DistributedDataParallel):
        return inner.module, prefix + "module.", inner
    return model, "", None


class _Prefixed:
    """``include`` as seen by the DDP model's names: tests ``prefix + name`` (prints as ``include``)."""

    def __init__(self, include: Include, prefix: str):
        self.include, self.prefix, self._matches = include, prefix, _matcher(include)

    def __call__(self, name: str) -> bool:
        return self._matches(self.prefix + name)

    def __repr__(self) -> str:
        return repr(self.include)


def _replicated_on_ranks(model: torch.nn.Module) -> bool:
    """Several ranks are running and ``model`` holds whole (not DTensor-sharded) parameters: a model
    each rank may score with its own data, as before DDP wraps it."""
    return (_process_group_running() and torch.distributed.get_world_size() > 1
            and not any(sharding.is_dtensor(p) for p in model.parameters()))


def _process_group_running() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _length(dataloader: Iterable) -> Optional[int]:
    """The batches ``dataloader`` says it yields, or None (an iterable without a length, or a
    DataLoader over an IterableDataset without one, whose ``len`` raises TypeError)."""
    try:
        return len(dataloader)
    except TypeError:
        return None


def fisher_mask(model: torch.nn.Module, dataloader: Iterable, reserve_p: float, *,
                loss_fn: Optional[Callable] = None, include: Include = r"layer", max_batches: Optional[int] = None,
                estimator: str = "batch", clip_norm: Optional[float] = 1.0, scope: str = "global",
                layer_of: Optional[Callable] = None, backend: str = "auto", progress: bool = True,
                across_ranks: Optional[bool] = None) -> dict:
    """Compute Fisher scores over ``dataloader`` (:func:`fisher_scores`) and return the child-network masks by name.

    ChildTuning-D defaults: parameters whose name contains ``layer``, per-tensor clip 1.0, the
    batch estimator and one global threshold; the result is ready for
    ``MaskedAdamW(model.named_parameters(), mask=...)`` (parameters without a mask train fully).
    ``loss_fn(model, batch)`` defaults to ``model(**batch).loss``.  The model runs in its current
    mode (ChildTuning computes Fisher in train mode, with dropout).  Existing gradients are
    cleared first; each is freed as soon as it is scored, and all are zeroed after each batch.
    With the batch estimator every score is divided by the number of batches run, as in ChildTuning.
    Under DDP the scores are summed over the ranks (``across_ranks``, on by default for a
    ``DistributedDataParallel`` model; see :func:`fisher_scores`), so every rank gets the same mask.

    Raises:
        ValueError: the dataloader yields no batch, or no batch gives the included parameters a
            gradient (all scores would be 0 and the mask an arbitrary first share of entries).
    """
    check_selection(reserve_p, scope)
    scores = fisher_scores(model, dataloader, loss_fn=loss_fn, include=include, max_batches=max_batches,
                           estimator=estimator, clip_norm=clip_norm, backend=backend, progress=progress,
                           across_ranks=across_ranks)
    return select_mask(scores, reserve_p, scope=scope, layer_of=layer_of, backend=backend)
