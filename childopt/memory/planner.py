"""Peak memory per device of one training step, by term, for a model and a fine-tuning method.

The step is traced, not estimated: the model is built at full size on fake tensors, the method's
real optimizer is made over it, and two training steps (forward with the chosen autocast and
activation checkpointing, backward, ``step()``, ``zero_grad(set_to_none=True)``) run under
:class:`childopt.memory.trace.LiveBytes`.  The first creates the optimizer state; the second is
measured.  Terms, per device:

* weights: parameters and buffers (buffers are replicated under FSDP2);  optimizer state: every
  tensor in ``optimizer.state`` but the masks (what ``MaskedAdamW.state_bytes()`` sums);  masks:
  ``mask``, ``indices`` and ``importance`` codes;
* gradients: the bytes of gradients (``.grad``, or the compact gradients) live at the step's peak,
  as the peak counts them: none when it falls in the forward, those made so far in the backward,
  all of them in ``step()`` (the dense gradient a compact-gradient hook gathers from is a temporary);
* activations: the rest of the step's peak increase above what it starts with (saved
  activations and temporaries live at the peak).

``total = weights + state + masks + gradients + activations`` is the step's peak.  With a world
size ``W > 1`` (FSDP2, ``fully_shard`` on each block and the root) the parameters, state and
masks are divided by ``W``, gradients count at their shard's size from the moment they are
accumulated (so the peak falls where activations and sharded gradients together are highest),
and what FSDP2 holds unsharded is added (:func:`_fsdp_extra`): a model of FSDP2, not a trace,
checked against ``fully_shard`` on 2 and 4 CPU ranks in the tests.
"""
from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass
from typing import Callable

import torch
from torch._subclasses.fake_tensor import (DataDependentOutputException, DynamicOutputShapeException,
                                          UnsupportedOperatorException)

from childopt.bench.live import storage_bytes
from childopt.memory import methods
from childopt.memory.methods import Method
from childopt.memory.models import Architecture, build, check_length, layer_blocks
from childopt.memory.trace import LiveBytes, fake_mode, to_fake

MASK_KEYS = ("mask", "indices", "importance")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
AUTOCAST = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}
# MaskedAdamW's step as its fused kernels (childopt._C, CUDA, Triton) run it: in place, allocating
# nothing.  On fake tensors every backend's op runs its fake kernel (childopt.backends.contract),
# which allocates nothing either, so the plan takes the reference backend: no build needed.  The
# reference backend's own torch ops would add temporaries; validate.measure runs the native one.
PLANNED_BACKEND = "reference"


@dataclass(frozen=True)
class Setting:
    """Everything besides the model and the method that a plan depends on."""

    batch_size: int = 8
    seq_len: int = 128
    dtype: str = "fp32"
    autocast: str = "none"
    checkpointing: bool = False
    world_size: int = 1
    reserve_p: float = 0.3
    mask_scope: str = "layers"
    lora_rank: int = 8

    def __post_init__(self):
        for name in ("batch_size", "seq_len", "world_size", "lora_rank"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        for name, choices in (("dtype", tuple(DTYPES)), ("autocast", tuple(AUTOCAST)),
                              ("mask_scope", ("layers", "all"))):
            value = getattr(self, name)
            if not isinstance(value, str) or value not in choices:
                raise ValueError(f"{name} must be one of {choices}, got {value!r}")
        if not isinstance(self.checkpointing, bool):
            raise ValueError(f"checkpointing must be a bool, got {self.checkpointing!r}")
        p = self.reserve_p
        if not isinstance(p, (int, float)) or isinstance(p, bool) or not 0.0 < p <= 1.0:
            raise ValueError(f"reserve_p must be a number in (0, 1], got {p!r}")


@dataclass(frozen=True)
class Plan:
    """Bytes per device of each term of one training step's peak."""

    method: str
    weights: int
    gradients: int
    state: int
    masks: int
    activations: int
    parameters: int  # entries of every parameter (LoRA's adapters included)
    trainable: int  # entries of the parameters that require a gradient
    modeled: str  # what is not traced ('' when everything is)
    peak_phase: str  # where the step's peak fell: forward, backward or step

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.state + self.masks + self.activations

    def as_dict(self) -> dict:
        return {**asdict(self), "total": self.total}


def inputs_for(arch: Architecture, setting: Setting) -> dict:
    """A batch of ``batch_size`` sequences of ``seq_len`` tokens (no padding) with labels for the head."""
    ids = torch.zeros((setting.batch_size, setting.seq_len), dtype=torch.long)
    labels = ids.clone() if arch.head == "causal-lm" else torch.zeros(setting.batch_size, dtype=torch.long)
    return {"input_ids": ids, "labels": labels}


def model_for(arch: Architecture, method: Method, setting: Setting, device: str) -> torch.nn.Module:
    """The model ``method`` trains (LoRA wraps it), with activation checkpointing if asked."""
    model = build(arch, DTYPES[setting.dtype], device)
    check_length(model, arch.config, setting.seq_len)
    if setting.checkpointing:
        _checkpoint_every_block(model)
    if method.name == "lora":
        model = methods.wrap_lora(model, arch.head, setting.lora_rank)
    return model


def _checkpoint_every_block(model: torch.nn.Module) -> None:
    """Activation checkpointing of every block, non-reentrant (transformers >= 5.x renamed the call)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def held_gradients(model: torch.nn.Module, optimizer) -> int:
    """Bytes of the gradients held after backward: ``.grad`` and compact gradients."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    compact = optimizer.compact_gradients() if hasattr(optimizer, "compact_gradients") else {}
    return storage_bytes(grads + list(compact.values()))


def gradient_of(param: torch.Tensor, optimizer) -> torch.Tensor:
    """What holds ``param``'s gradient once every hook has run: ``.grad``, or its compact gradient."""
    if param.grad is not None or not hasattr(optimizer, "compact_gradients"):
        return param.grad
    return optimizer.compact_gradients()[param]


def mark_gradients(model: torch.nn.Module, optimizer, mark: Callable[[torch.Tensor], None]) -> list:
    """Hooks (after the optimizer's own) calling ``mark`` on each gradient as backward makes it; their handles."""
    return [p.register_post_accumulate_grad_hook(lambda p: mark(gradient_of(p, optimizer)))
            for p in model.parameters() if p.requires_grad]


def training_step(model: torch.nn.Module, optimizer, inputs: dict, setting: Setting,
                  on_phase: Callable[[str], None] = lambda phase: None) -> int:
    """Forward, backward, ``step()``, ``zero_grad(set_to_none=True)``; the gradients' bytes after
    backward.  ``on_phase`` hears "forward", "backward" and "step" as each starts."""
    autocast = AUTOCAST[setting.autocast]
    on_phase("forward")
    with torch.autocast("cpu", dtype=autocast) if autocast else contextlib.nullcontext():
        loss = model(**inputs).loss
    on_phase("backward")
    loss.backward()
    gradients = held_gradients(model, optimizer)
    on_phase("step")
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return gradients


def _state_tensors(optimizer, masks: bool) -> list:
    return [v for s in optimizer.state.values() for k, v in s.items()
            if isinstance(v, torch.Tensor) and (k in MASK_KEYS) == masks]


def _fsdp_extra(model: torch.nn.Module, world_size: int) -> tuple[int, int]:
    """(weights, gradients) bytes FSDP2 adds per device: the root's own parameters (embeddings, head,
    final norm: all-gathered for the whole step) and two blocks unsharded (the one computing and the
    one prefetched); the unsharded gradients of the root and of one block before reduce-scatter."""
    if world_size == 1:
        return 0, 0
    blocks = layer_blocks(model)
    in_blocks = {id(p) for p in blocks.parameters()}
    root = [p for p in model.parameters() if id(p) not in in_blocks]
    block = max(blocks, key=lambda b: storage_bytes(b.parameters()))

    def trainable(params) -> list:
        return [p for p in params if p.requires_grad]

    return (2 * storage_bytes(block.parameters()) + storage_bytes(root),
            storage_bytes(trainable(block.parameters())) + storage_bytes(trainable(root)))


def terms(method: Method, setting: Setting, model: torch.nn.Module, optimizer, *, gradients: int,
          held: int, increase: int, stand_in: bool, peak_phase: str, step_increase: int = 0) -> Plan:
    """The :class:`Plan` of a step of ``optimizer``: ``increase`` its peak above what it started with
    (the state an earlier step created; with FSDP2, counting gradients at their shard's size), in
    ``peak_phase``, of which ``gradients`` are gradients; ``held``: the gradients held after backward
    (unsharded); ``step_increase``: the peak of the ``step()`` part alone.  With ``stand_in``,
    ``optimizer`` is the traced stand-in of ``method`` (:func:`childopt.memory.methods.traced`) and
    the layout ``method`` differs by is applied."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    if stand_in and method.name == "adamw-8bit":
        state = methods.modeled_state_bytes(method, trainable)
    else:
        state = storage_bytes(_state_tensors(optimizer, masks=False))
    masks = storage_bytes(_state_tensors(optimizer, masks=True))
    if stand_in:
        masks += methods.modeled_mask_bytes(method, trainable)
        held_by_step = step_increase + methods.modeled_step_bytes(method, trainable) // setting.world_size
        if held_by_step > increase:  # every gradient is live during step()
            increase, peak_phase, gradients = held_by_step, "step", held // setting.world_size
    extra_weights, extra_gradients = _fsdp_extra(model, setting.world_size)
    w = setting.world_size
    weights = storage_bytes(model.parameters()) // w + storage_bytes(model.buffers())  # buffers are replicated
    return Plan(method=method.name, weights=weights + extra_weights, gradients=gradients + extra_gradients,
                state=state // w, masks=masks // w, activations=max(0, increase - gradients),
                parameters=sum(p.numel() for p in model.parameters()),
                trainable=sum(p.numel() for p in trainable), modeled=method.modeled if stand_in else "",
                peak_phase=peak_phase)


def _check_experts(model: torch.nn.Module, setting: Setting) -> None:
    """Refuse MoE experts on torch's grouped matmul (transformers' default for them) outside bf16: its
    fake kernel takes bf16 only (the CPU kernel also runs fp32), and autocast does not cast it."""
    experts = getattr(model, "get_experts_implementation", dict)()
    if "grouped_mm" in experts.values() and setting.dtype != "bf16":
        raise ValueError(f"{model.config.model_type}'s MoE experts run torch._grouped_mm, which traces on fake "
                         f"tensors in bf16 only, not with {setting.dtype} parameters: plan it with --dtype bf16 "
                         "(dtype='bf16')")


@contextlib.contextmanager
def _untraceable_ops_named(arch: Architecture):
    """Turn fake-tensor failures (an op whose output depends on values) into an error naming the op."""
    try:
        yield
    except (DynamicOutputShapeException, DataDependentOutputException, UnsupportedOperatorException) as exc:
        raise ValueError(f"{arch.config.model_type} cannot be traced on fake tensors: its step runs "
                         f"{exc.func}, whose output depends on tensor values") from exc


def plan(arch: Architecture, method_name: str, setting: Setting = Setting()) -> Plan:
    """Trace two training steps of ``method_name`` on ``arch`` on fake tensors; the second's peak, by term."""
    method = methods.check_method(method_name)
    if setting.world_size > 1 and method.fsdp2_refusal:
        raise ValueError(f"method {method.name!r} cannot be planned with world_size {setting.world_size} (FSDP2): "
                         f"{method.fsdp2_refusal}")
    model = model_for(arch, method, setting, "meta")
    _check_experts(model, setting)
    mode = fake_mode()
    to_fake(model, mode)
    with mode:
        inputs = inputs_for(arch, setting)
    tracker = LiveBytes(list(model.parameters()) + list(model.buffers()) + list(inputs.values()),
                        gradient_share=setting.world_size)

    def fake_mask(param: torch.Tensor, count: int) -> torch.Tensor:
        mask = torch.empty(param.shape, dtype=torch.bool, device=param.device)
        tracker.declare_kept(mask, count)
        return mask

    def on_phase(phase: str) -> None:
        tracker.phase = phase

    with mode, tracker, _untraceable_ops_named(arch):
        optimizer = methods.build_optimizer(methods.traced(method), model, reserve_p=setting.reserve_p,
                                            mask_scope=setting.mask_scope, backend=PLANNED_BACKEND,
                                            make_mask=fake_mask)
        mark_gradients(model, optimizer, tracker.mark_gradient)
        training_step(model, optimizer, inputs, setting)
        start = tracker.live
        tracker.reset_peak()
        held = training_step(model, optimizer, inputs, setting, on_phase)
    return terms(method, setting, model, optimizer, gradients=tracker.peak_gradients, held=held,
                 increase=tracker.peak - start,
                 stand_in=methods.traced(method) is not method, peak_phase=tracker.peak_phase,
                 step_increase=tracker.phase_peaks.get("step", start) - start)
