"""Diagonal Fisher information, accumulated in place during backward, and Fisher masks.

``FisherAccumulator`` registers a post-accumulate-grad hook on each scored parameter; the hook
adds ``(g * c)^2`` to the parameter's fp32 score with the fused ``fisher_accumulate`` op, where
``c`` is a per-tensor clip coefficient kept on the device.  Estimators:

* ``"batch"`` (ChildTuning-D): the squared gradient of each batch, i.e. of the batch-mean loss;
  scores are divided by the number of batches.  Cost: one backward per batch, as training.
* ``"sample"`` (FISH's empirical Fisher): the sum of squared *per-sample* gradients, computed with
  ``torch.func.vmap(torch.func.grad(...))`` over the batch in chunks of ``chunk_size`` samples
  instead of a batch-size-1 loop; scores are divided by the number of samples.  Cost: about one
  backward per sample, vectorised, and ``chunk_size`` x the scored parameters' memory.

``fisher_mask`` runs a dataloader through it with a progress bar and selects the child network
with :func:`childopt.masks.select_mask`, with ChildTuning-D's defaults.
"""
from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from functools import partial
from itertools import islice
from typing import Optional, Union

import torch
from torch.utils._pytree import tree_map
from tqdm.auto import tqdm

from childopt import backends
from childopt.masks import select_mask

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
        if clip_norm is not None and not clip_norm > 0:
            raise ValueError(f"clip_norm must be > 0 or None, got {clip_norm!r}")
        if not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating-point dtype, got {dtype}")
        included = _matcher(include)
        self._params = {n: p for n, p in named if p.requires_grad and included(n)}
        if not self._params:
            raise ValueError(f"include={include!r} matches no trainable parameter")
        self.estimator, self.clip_norm, self.free_grads = estimator, clip_norm, free_grads
        self.grad_scaler, self.chunk_size = grad_scaler, chunk_size
        self._fisher = {n: torch.zeros(p.shape, dtype=dtype, device=p.device) for n, p in self._params.items()}
        self._counts = dict.fromkeys(self._params, 0)
        self._backend_request = backends.check_name(backend)
        self._backends: dict = {}
        self._handles: list = []

    def __enter__(self) -> "FisherAccumulator":
        if self.estimator == "batch":
            self._handles = [p.register_post_accumulate_grad_hook(partial(self._on_grad, n))
                             for n, p in self._params.items()]
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
        """Per-tensor gradient multipliers: GradScaler's inverse scale times the clip coefficient."""
        inverse = 1.0
        if self.grad_scaler is not None and self.grad_scaler.is_enabled():
            inverse = 1.0 / self.grad_scaler.get_scale()
        coefficients = torch.full_like(norms, inverse)
        if self.clip_norm is not None:
            coefficients = coefficients * torch.clamp(self.clip_norm / (norms * inverse + 1e-6), max=1.0)
        return coefficients

    def _on_grad(self, name: str, param: torch.Tensor) -> None:
        if param.grad is None:
            raise RuntimeError(f"the gradient of {name!r} was freed by an earlier hook (e.g. MaskedAdamW with "
                               "compact_grads=True) before the Fisher hook could read it: compute the Fisher "
                               "scores before building a compact-gradient optimizer")
        grad = param.grad.detach()
        norms = torch.linalg.vector_norm(grad.float()).reshape(1)
        if self.grad_scaler is not None and not bool(torch.isfinite(norms).all()):
            param.grad = None if self.free_grads else param.grad
            return  # an overflowed batch (GradScaler will skip it too): not counted
        # A gradient dtype the kernels do not take (float64) goes to the reference backend.
        backend = backends.route(self._backend(grad.device), grad.dtype, grad.dtype)
        backend.fisher_accumulate([self._fisher[name]], [grad.contiguous()], self._coefficients(norms))
        self._counts[name] += 1
        if self.free_grads:
            param.grad = None

    def accumulate_samples(self, loss_fn: Callable, batch) -> None:
        """Add the squared per-sample gradients of ``loss_fn(model, batch)`` (``estimator="sample"``).

        ``batch`` is a tensor or a pytree of tensors whose leading dimension is the sample;
        ``loss_fn`` sees each sample with a batch dimension of 1.  Dropout draws differ per sample.
        """
        if self.estimator != "sample":
            raise RuntimeError("accumulate_samples needs estimator='sample'; with 'batch', call loss.backward()")
        wrapper = _LossModule(self.model, loss_fn)
        names = list(self._params)
        detached = {n: self._params[n].detach() for n in names}

        def sample_loss(params, sample):
            one = tree_map(lambda x: x.unsqueeze(0), sample)
            return torch.func.functional_call(wrapper, {f"model.{n}": v for n, v in params.items()}, (one,))

        per_sample = torch.func.vmap(torch.func.grad(sample_loss), in_dims=(None, 0), randomness="different",
                                     chunk_size=self.chunk_size)(detached, batch)
        for n in names:
            grads = per_sample[n].reshape(per_sample[n].shape[0], -1).float()
            norms = torch.linalg.vector_norm(grads, dim=1)
            scaled = grads * self._coefficients(norms)[:, None]
            self._fisher[n].add_((scaled * scaled).sum(0).view(self._fisher[n].shape).to(self._fisher[n].dtype))
            self._counts[n] += grads.shape[0]

    def scores(self) -> dict:
        """name -> Fisher estimate: the accumulated squares over the number of batches (or samples)."""
        return {n: f / max(self._counts[n], 1) for n, f in self._fisher.items()}

    @property
    def counts(self) -> dict:
        """How many batches (or samples) each parameter's score averages."""
        return dict(self._counts)


def _hf_loss(model: torch.nn.Module, batch):
    """Hugging Face convention: the model returns ``.loss`` when the batch carries labels."""
    output = model(**batch) if isinstance(batch, Mapping) else model(batch)
    loss = getattr(output, "loss", None)
    if loss is None:
        raise ValueError("the model returned no .loss: pass loss_fn(model, batch) -> scalar loss")
    return loss


def _to_device(batch, device: torch.device):
    return tree_map(lambda x: x.to(device) if isinstance(x, torch.Tensor) else x, batch)


def fisher_mask(model: torch.nn.Module, dataloader: Iterable, reserve_p: float, *,
                loss_fn: Optional[Callable] = None, include: Include = r"layer", max_batches: Optional[int] = None,
                estimator: str = "batch", clip_norm: Optional[float] = 1.0, scope: str = "global",
                layer_of: Optional[Callable] = None, backend: str = "auto", progress: bool = True) -> dict:
    """Compute Fisher scores over ``dataloader`` and return the child-network masks by name.

    ChildTuning-D defaults: parameters whose name contains ``layer``, per-tensor clip 1.0, the
    batch estimator and one global threshold; the result is ready for
    ``MaskedAdamW(model.named_parameters(), mask=...)`` (parameters without a mask train fully).
    ``loss_fn(model, batch)`` defaults to ``model(**batch).loss``.  The model runs in its current
    mode (ChildTuning computes Fisher in train mode, with dropout).  Existing gradients are
    cleared first; each is freed as soon as it is scored, and all are zeroed after each batch.
    """
    loss_fn = loss_fn or _hf_loss
    device = next(model.parameters()).device
    accumulator = FisherAccumulator(model, include=include, estimator=estimator, clip_norm=clip_norm,
                                    free_grads=True, backend=backend)
    batches = dataloader if max_batches is None else islice(dataloader, max_batches)
    total = max_batches if max_batches is not None else (len(dataloader) if hasattr(dataloader, "__len__") else None)
    model.zero_grad(set_to_none=True)  # gradients left from earlier work would be scored as this batch's
    with accumulator:
        for batch in tqdm(batches, total=total, desc="fisher", unit="batch", disable=not progress):
            batch = _to_device(batch, device)
            if estimator == "batch":
                loss_fn(model, batch).backward()
            else:
                accumulator.accumulate_samples(loss_fn, batch)
            model.zero_grad(set_to_none=True)
    return select_mask(accumulator.scores(), reserve_p, scope=scope, layer_of=layer_of, backend=backend)
