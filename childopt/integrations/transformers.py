"""Child-Tuning-D and -F with the Hugging Face ``Trainer``.

One call builds the optimizer from ``TrainingArguments``; the stock ``Trainer`` runs it::

    optimizer = child_tuning_optimizer(model, args, mode="ChildTuning-D", reserve_p=0.3,
                                       train_dataloader=loader)
    Trainer(model=model, args=args, train_dataset=dataset, optimizers=(optimizer, None)).train()

or :class:`ChildTuningTrainer` builds it when ``train()`` sets up, computing the Fisher mask over
the trainer's own train dataloader with the trainer's own loss (``compute_loss``)::

    ChildTuningTrainer(model=model, args=args, train_dataset=dataset,
                       child_tuning_mode="ChildTuning-D", reserve_p=0.3).train()

The Trainer wraps the optimizer in accelerate's ``AcceleratedOptimizer`` (its ``.optimizer`` is the
MaskedAdamW), which round-trips the state dict (masks included) and forwards ``step``.

Compact gradients (``storage="sparse", compact_grads=True``) are supported by ChildTuningTrainer
only; ``child_tuning_optimizer`` refuses them.  The stock Trainer clips ``model.parameters()``,
whose ``.grad`` the compact hook has already freed (the compact gradients would go unclipped), and
resets gradients with ``model.zero_grad()``, which leaves the compact buffers to add up across
steps.  Neither can be seen from the optimizer, so that path would be silently wrong.
ChildTuningTrainer overrides the Trainer's clipping hook (``_clip_grad_norm``, and
``_get_grad_norm`` for the logged norm) to call ``MaskedAdamW.clip_grad_norm_``, whose norm is
that of the *selected* entries (the dense gradients of masked parameters no longer exist), and a
callback calls ``optimizer.zero_grad()`` after every step.  The compact-gradient hooks live only
while ``train()`` runs: removed when it returns or raises (so that a plain backward or another
optimizer afterwards sees the dense ``.grad``), put back when a later ``train()`` begins.  Without
compact gradients the Trainer's own clipping runs: the norm of the full gradients, as ChildTuning
does.  Compact gradients are refused with fp16 (the GradScaler unscales and checks only ``.grad``)
and on several processes (the hook frees gradients before the all-reduce reads them).

Resuming (``train(resume_from_checkpoint=...)``): the Trainer builds the optimizer before it loads
the checkpoint's optimizer state.  When that state is a ChildTuning-D MaskedAdamW's, its mask is
restored by the load, so ChildTuningTrainer skips the Fisher pass, which would only score the
trained weights for a mask the load replaces (and, in train mode, move BatchNorm statistics, so
the resumed run would no longer end where the uninterrupted one does).  Without optimizer state
(``save_only_model=True``) the Fisher pass runs as on a fresh start.
"""
from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from typing import Optional

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer import OPTIMIZER_NAME, SCHEDULER_NAME
from transformers.trainer_utils import get_last_checkpoint
from transformers.utils import is_sagemaker_mp_enabled

from childopt import user_warning
from childopt.fisher import fisher_mask
from childopt.optim import MaskedAdamW
from childopt.optim import validation
from childopt.optim.checkpoint import lift_extras

MODES = ("ChildTuning-D", "ChildTuning-F")


def _check(mode, reserve_p, storage="dense", compact_grads=False, fisher_options=()) -> float:
    """The options' checks, made before a Fisher pass (which can take a full pass over the data);
    returns ``reserve_p`` as a float (a one-element tensor or numpy scalar is read once, here)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    reserve_p = validation.check_number(reserve_p, "reserve_p (the fraction of entries trained)", low=0.0, high=1.0,
                                        low_open=True)
    validation.check_storage(storage, compact_grads)
    if mode == "ChildTuning-F" and storage == "sparse":
        raise ValueError("storage='sparse' needs ChildTuning-D's fixed mask; ChildTuning-F draws a new one each step")
    if mode == "ChildTuning-F" and fisher_options:
        raise TypeError(f"unexpected {', '.join(sorted(fisher_options))} with mode='ChildTuning-F' (Fisher options "
                        "apply to ChildTuning-D, which scores a Fisher pass)")
    return reserve_p


def child_tuning_optimizer(model, args: TrainingArguments, *, mode: str, reserve_p: float, train_dataloader=None,
                           max_batches: Optional[int] = None, storage: str = "dense", compact_grads: bool = False,
                           seed: Optional[int] = None, decay_parameters: Optional[Iterable[str]] = None,
                           **fisher_kwargs) -> MaskedAdamW:
    """MaskedAdamW for Child-Tuning from ``TrainingArguments``, grouped as the Trainer groups AdamW.

    ``lr``, ``betas``, ``eps`` and ``weight_decay`` come from ``args.learning_rate``,
    ``(args.adam_beta1, args.adam_beta2)``, ``args.adam_epsilon`` and ``args.weight_decay``; weight
    decay goes to ``decay_parameters`` only (default: the Trainer's rule, which leaves out biases and
    normalisation weights), and the groups hold named parameters, so masks are addressed by name.

    ``mode="ChildTuning-F"``: every step keeps each gradient entry with probability ``reserve_p``
    (``mask="bernoulli"``, published ``masked="zero_grad"`` semantics).  ``mode="ChildTuning-D"``:
    a fixed child network of ``round(reserve_p * n)`` entries chosen by Fisher information over
    ``train_dataloader`` (required; at most ``max_batches`` batches), computed in train mode as
    ChildTuning does; ``fisher_kwargs`` go to :func:`childopt.fisher.fisher_mask` (``loss_fn``,
    ``include``, ``scope``, ...).  Masked-out entries stay frozen (``masked="freeze"``).
    ``storage`` and ``seed`` go to MaskedAdamW.  ``compact_grads=True`` raises: the stock Trainer
    would silently neither clip nor clear compact gradients (module docstring); use
    ``ChildTuningTrainer(..., storage="sparse", compact_grads=True)``.
    """
    if compact_grads:
        raise ValueError("compact_grads=True needs ChildTuningTrainer(..., storage='sparse', compact_grads=True): the "
                         "stock Trainer clips model.parameters() and clears model.zero_grad(), and neither reaches "
                         "the compact gradients")
    return _build_optimizer(model, args, mode=mode, reserve_p=reserve_p, train_dataloader=train_dataloader,
                            max_batches=max_batches, storage=storage, seed=seed, decay_parameters=decay_parameters,
                            **fisher_kwargs)


def _build_optimizer(model, args: TrainingArguments, *, mode: str, reserve_p: float, train_dataloader=None,
                     max_batches: Optional[int] = None, storage: str = "dense", compact_grads: bool = False,
                     seed: Optional[int] = None, decay_parameters: Optional[Iterable[str]] = None,
                     mask_from_state: bool = False, **fisher_kwargs) -> MaskedAdamW:
    """:func:`child_tuning_optimizer` with compact gradients allowed (ChildTuningTrainer handles them).

    ``mask_from_state=True`` (ChildTuning-D): no Fisher pass; the fixed mask starts as an empty dict
    (``mask=None`` would warn that ``reserve_p`` has no effect) and the state dict loaded next restores it.
    """
    given = [*fisher_kwargs, *(["max_batches"] if max_batches is not None else [])]
    reserve_p = _check(mode, reserve_p, storage, compact_grads, given)
    if mode == "ChildTuning-D" and train_dataloader is None and not mask_from_state:
        raise ValueError("mode='ChildTuning-D' needs train_dataloader= to compute the Fisher mask")
    if compact_grads and args.fp16:
        raise ValueError("compact_grads=True does not work with fp16: the GradScaler unscales and checks only "
                         "the parameters' .grad, not the compact buffers (use bf16 or compact_grads=False)")
    if compact_grads and args.world_size > 1:
        raise ValueError("compact_grads=True frees each gradient before the distributed all-reduce reads it; "
                         "use compact_grads=False when training on several processes")
    if decay_parameters is None:
        # Trainer's own rule (bias, LayerNorm/RMSNorm/norm names and nn.LayerNorm modules). It is an
        # instance method that never reads ``self``, so it is called unbound rather than copied.
        decay_parameters = Trainer.get_decay_parameter_names(None, model)
    decay_parameters = set(decay_parameters)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [{"params": [(n, p) for n, p in named if n in decay_parameters], "weight_decay": args.weight_decay},
              {"params": [(n, p) for n, p in named if n not in decay_parameters], "weight_decay": 0.0}]
    if mode == "ChildTuning-F":
        mask = "bernoulli"
    elif mask_from_state:
        mask = {}
    else:
        was_training = model.training
        model.train()  # dropout on, as ChildTuning's Fisher pass (from_pretrained returns eval mode)
        # several processes each score their share of the data: sum over the ranks, one mask on all
        fisher_kwargs.setdefault("across_ranks", args.world_size > 1)
        try:
            mask = fisher_mask(model, train_dataloader, reserve_p, max_batches=max_batches, **fisher_kwargs)
        finally:
            model.train(was_training)
    groups = [g for g in groups if g["params"]]  # an empty group would carry no param_names
    return MaskedAdamW(groups, lr=args.learning_rate,
                       betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon,
                       weight_decay=args.weight_decay, mask=mask, reserve_p=reserve_p, seed=seed,
                       storage=storage, compact_grads=compact_grads)


def _saved_child_network(checkpoint: str) -> Optional[set]:
    """The ``reserve_p`` values (of its param groups) of the ChildTuning-D MaskedAdamW state in
    ``checkpoint`` that the Trainer will load, or None when it holds none.

    The Trainer loads ``optimizer.pt`` only next to ``scheduler.pt``.  The file is memory-mapped,
    so only its small ``"childopt"`` entry and groups are read; one that cannot be read answers
    None (the Fisher pass runs, and the Trainer's own load then reports the file).
    """
    path = os.path.join(checkpoint, OPTIMIZER_NAME)
    if not (os.path.isfile(path) and os.path.isfile(os.path.join(checkpoint, SCHEDULER_NAME))):
        return None
    try:
        saved = lift_extras(torch.load(path, map_location="cpu", weights_only=True, mmap=True))
    except Exception:  # noqa: BLE001 - any unreadable file takes the path that reports it
        return None
    extras = saved.get("childopt") if isinstance(saved, Mapping) else None
    if not (isinstance(extras, Mapping) and extras.get("mask_kind") == "dense"):
        return None
    return {group.get("reserve_p") for group in saved.get("param_groups", []) if isinstance(group, Mapping)}


class _MaskFromCheckpoint(TrainerCallback):
    """The checkpoint whose ChildTuning-D optimizer state gives a ``train()`` call its mask.

    ``checkpoint`` is set by :meth:`ChildTuningTrainer.train` for one call (None: the Fisher pass
    runs, or the optimizer exists); :meth:`ChildTuningTrainer.create_optimizer` then builds the
    optimizer with an empty mask for the Trainer's load to fill.  Checked and cleared once the
    Trainer has loaded the state: still set when ``train()`` ends, the check never passed.
    """

    def __init__(self):
        self.checkpoint: Optional[str] = None

    def on_train_begin(self, args, state, control, *, optimizer, **kwargs):
        if self.checkpoint is None:
            return
        optimizer = getattr(optimizer, "optimizer", optimizer)
        kind = getattr(optimizer, "mask_kind", None)
        if kind != "dense" or not any("mask" in s or "indices" in s for s in optimizer.state.values()):
            raise RuntimeError(f"ChildTuning-D skipped its Fisher pass to take the mask from the optimizer state in "
                               f"{self.checkpoint!r}, but the Trainer's load left the optimizer without one (mask "
                               f"kind {kind!r}); it is dropped, and train() builds it anew")
        self.checkpoint = None


def _compact_masked_adamw(optimizer) -> Optional[MaskedAdamW]:
    """The MaskedAdamW under accelerate's wrapper when it keeps compact gradients, else None."""
    optimizer = getattr(optimizer, "optimizer", optimizer)
    return optimizer if isinstance(optimizer, MaskedAdamW) and optimizer.compact_grads else None


class _CompactGradientsWhileTraining(TrainerCallback):
    """Compact-gradient hooks for the length of a ``train()`` call (removed by ``train()`` itself).

    Attached once the optimizer is built and its checkpoint state loaded; the buffers are cleared
    after every step, because the Trainer resets gradients with ``model.zero_grad()``, which
    does not reach them.
    """

    def on_train_begin(self, args, state, control, *, optimizer, **kwargs):
        compact = _compact_masked_adamw(optimizer)
        if compact is not None:
            compact.hook_gradients()

    def on_optimizer_step(self, args, state, control, *, optimizer, **kwargs):
        optimizer.zero_grad()


# The Trainer's AdamW choices that differ from MaskedAdamW only in their kernel, not in their
# state or arithmetic: the quantised (8/4-bit) and anyprecision ones would silently become fp32.
_ADAMW_OPTIMS = ("adamw_torch", "adamw_torch_fused", "adamw_torch_xla", "adamw_torch_npu_fused")


def _check_optimizer_options(trainer: Trainer) -> None:
    """Refuse the Trainer's optimizer settings that ChildTuningTrainer's own MaskedAdamW would ignore."""
    if trainer.optimizer is not None or getattr(trainer, "optimizer_cls_and_kwargs", None) is not None:
        raise ValueError("ChildTuningTrainer builds its own MaskedAdamW from child_tuning_mode and reserve_p; "
                         "optimizers=(optimizer, ...) and optimizer_cls_and_kwargs= would replace it (to train "
                         "a given optimizer, such as child_tuning_optimizer's, use Trainer)")
    optim = str(getattr(trainer.args.optim, "value", trainer.args.optim))
    if optim not in _ADAMW_OPTIMS:
        raise ValueError(f"TrainingArguments(optim={optim!r}): ChildTuningTrainer trains with childopt's "
                         f"MaskedAdamW, a full-precision AdamW; leave optim at its default or use one of "
                         f"{', '.join(_ADAMW_OPTIMS)}")
    if trainer.args.optim_args:
        raise ValueError(f"TrainingArguments(optim_args={trainer.args.optim_args!r}) would be ignored: "
                         "ChildTuningTrainer's MaskedAdamW takes learning_rate, adam_beta1, adam_beta2, "
                         "adam_epsilon and weight_decay only")


class ChildTuningTrainer(Trainer):
    """``Trainer`` whose optimizer is :func:`child_tuning_optimizer`'s, built when ``train()`` sets up.

    Extra keyword arguments: ``child_tuning_mode`` and ``reserve_p`` (required), ``storage``,
    ``compact_grads``, ``max_fisher_batches`` and ``fisher_kwargs`` (a dict for
    :func:`childopt.fisher.fisher_mask`; its default loss here is the trainer's ``compute_loss``,
    so label smoothing, ``compute_loss_func`` and overrides score Fisher as they train, and its
    progress bar follows ``args.disable_tqdm``).  Weight-decay groups follow
    :meth:`get_decay_parameter_names`, overrides included.  With ``compact_grads=True`` gradients
    are clipped by :meth:`MaskedAdamW.clip_grad_norm_`, the compact buffers cleared after every
    step, and the hooks removed when ``train()`` ends (module docstring).  The Fisher pass runs
    inside ``train()``, before the first step, except when ``train()`` resumes from a checkpoint
    whose optimizer state holds the mask (module docstring).  Optimizer settings the MaskedAdamW
    would ignore (``optimizers=``, ``optimizer_cls_and_kwargs=``, a quantised ``optim``,
    ``optim_args``) are refused.
    """

    def __init__(self, *args, child_tuning_mode: str, reserve_p: float, storage: str = "dense",
                 compact_grads: bool = False, max_fisher_batches: Optional[int] = None,
                 fisher_kwargs: Optional[dict] = None, **kwargs):
        given = [*(fisher_kwargs or {}), *(["max_fisher_batches"] if max_fisher_batches is not None else [])]
        reserve_p = _check(child_tuning_mode, reserve_p, storage, compact_grads, given)
        if compact_grads and not hasattr(Trainer, "_clip_grad_norm"):
            raise RuntimeError("compact_grads=True needs a transformers whose Trainer clips in _clip_grad_norm "
                               "(5.x); this one clips inline, where the compact gradients cannot be reached")
        super().__init__(*args, **kwargs)
        _check_optimizer_options(self)
        self.child_tuning = dict(mode=child_tuning_mode, reserve_p=reserve_p, storage=storage,
                                 compact_grads=compact_grads, **(fisher_kwargs or {}))
        self.max_fisher_batches = max_fisher_batches
        self._mask_from = _MaskFromCheckpoint()
        self.add_callback(_CompactGradientsWhileTraining())
        self.add_callback(self._mask_from)

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        """``Trainer.train``, telling :meth:`create_optimizer` which checkpoint it resumes from.

        When it returns or raises, the compact-gradient hooks come off the model (module
        docstring), and an optimizer whose mask the checkpoint was to give but did not (the load
        failed or left none) is dropped, so that no later ``train()`` steps it without a mask.
        """
        checkpoint = resume_from_checkpoint
        if checkpoint is True and os.path.isdir(self.args.output_dir):  # as the Trainer resolves it
            checkpoint = get_last_checkpoint(self.args.output_dir)
        checkpoint = os.fspath(checkpoint) if isinstance(checkpoint, (str, os.PathLike)) else None
        # decided here, not in create_optimizer, so that a warning names the user's train() line
        wanted = self.optimizer is None and self.child_tuning["mode"] == "ChildTuning-D"
        self._mask_from.checkpoint = self._resumes_child_network(checkpoint) if wanted else None
        try:
            return super().train(resume_from_checkpoint, *args, **kwargs)
        finally:
            compact = _compact_masked_adamw(self.optimizer)
            if compact is not None:
                compact.zero_grad()  # buffers of a step train() raised in are dropped, as dense .grad are
                compact.hook_gradients(on=False)
            if self._mask_from.checkpoint is not None:
                self._mask_from.checkpoint = self.optimizer = None

    def _resumes_child_network(self, checkpoint: Optional[str]) -> Optional[str]:
        """``checkpoint`` when the Trainer will load its ChildTuning-D mask from it, else None.

        DeepSpeed, FSDP and SageMaker model parallelism load optimizer state their own way: there
        the Fisher pass runs as before.  A ``reserve_p`` other than the checkpoint's warns: the
        resumed run keeps the checkpoint's mask.
        """
        if checkpoint is None or is_sagemaker_mp_enabled() or any(
                getattr(self, flag, False) for flag in ("is_deepspeed_enabled", "is_fsdp_enabled",
                                                         "is_fsdp_xla_v1_enabled")):
            return None
        saved = _saved_child_network(checkpoint)
        if saved is None:
            return None
        wanted = self.child_tuning["reserve_p"]
        if saved != {wanted}:
            user_warning.warn(f"resuming ChildTuning-D from {checkpoint!r} keeps its mask, selected at "
                              f"reserve_p={', '.join(map(str, sorted(saved, key=str)))}, not reserve_p={wanted}: a new "
                              "reserve_p needs a new run (a new Fisher pass), not a resume")
        return checkpoint

    def create_optimizer(self, model=None):
        """Build the Child-Tuning MaskedAdamW unless one was given.

        ChildTuning-D runs the Fisher pass first, unless ``train()`` resumes from a checkpoint
        holding a ChildTuning-D optimizer state: the Trainer loads that next, mask included, so
        the optimizer starts with an empty mask and the pass is skipped.
        """
        if self.optimizer is None:
            model = self.model if model is None else model
            options = dict(self.child_tuning)
            if self._mask_from.checkpoint is not None:  # set by train() for ChildTuning-D only
                options["mask_from_state"] = True
            elif options["mode"] == "ChildTuning-D":
                options.setdefault("loss_fn", self.compute_loss)
                options.setdefault("progress", not self.args.disable_tqdm)
                options.update(train_dataloader=self.get_train_dataloader(), max_batches=self.max_fisher_batches)
            self.optimizer = _build_optimizer(
                model, self.args, decay_parameters=self.get_decay_parameter_names(model), **options)
        return self.optimizer

    def _clip_grad_norm(self, model):
        optimizer = _compact_masked_adamw(self.optimizer)
        if optimizer is None:
            return super()._clip_grad_norm(model)
        return optimizer.clip_grad_norm_(self.args.max_grad_norm)

    def _get_grad_norm(self, model, grad_norm=None):
        optimizer = _compact_masked_adamw(self.optimizer)
        if grad_norm is None and optimizer is not None:  # max_grad_norm == 0: measure only, for the logs
            grad_norm = optimizer.clip_grad_norm_(float("inf"))
        return super()._get_grad_norm(model, grad_norm)
