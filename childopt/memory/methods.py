"""The fine-tuning methods the planner sizes, each built as it would train.

Every method but one is the real optimizer over the real model (on fake tensors, see
childopt.memory.trace); two are sized from a method the trace runs plus a stated layout:

* ``importance``: its sampler solves for the keep probabilities on the host (values that fake
  tensors do not have), so it is traced as Child-Tuning-F, the same step, and its one-byte level
  code per sampled element (``state["importance"]``, childopt.optim.importance_mask) is added, and
  the fp32 log ratio per sampled element a refresh step holds while it solves (the plan is the
  peak of a refresh step; validate.measure measures one: it refreshes every step).
* ``adamw-8bit``: bitsandbytes runs on CUDA only, so it is traced as full fine-tuning with
  torch's state replaced by bitsandbytes' layout (below).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from childopt import Importance, MaskedAdamW, importance
from childopt.bench.baselines import adamw_8bit
from childopt.memory.models import layer_blocks

# bitsandbytes AdamW8bit (bitsandbytes/optim/optimizer.py, Optimizer2State.init_state): tensors of
# fewer than 4096 elements keep two fp32 moments; larger ones two uint8 moments and one fp32
# absmax per 256-element block of each; the two 256-entry quantisation maps are shared.
BNB_MIN_8BIT_SIZE = 4096
BNB_BLOCK = 256
BNB_QMAPS_BYTES = 2 * 256 * 4
# Bytes per element of one piece's temporaries in an importance refresh with childopt._C's CPU level
# codes (fitted to torch's profiler on the three small test models: extra = 4 B per element + 13 B
# per element of the largest tensor).  The torch level codes (CUDA, or a CPU without childopt._C)
# hold about 47 B: up to 36 MB more at a 2**20-element piece, which the plan leaves out.
IMPORTANCE_PIECE_BYTES = 13


@dataclass(frozen=True)
class Method:
    """What a method trains, and with what."""

    name: str
    description: str
    masks: bool = False  # a fixed child network: Child-Tuning-D masks on the blocks
    traced_as: str = ""  # the method whose trace it shares, when it cannot be traced itself
    modeled: str = ""  # what is added to that trace by layout
    runs_on_cpu: bool = True  # validate.measure can run it here
    fsdp2_refusal: str = ""  # why FSDP2 (world_size > 1) cannot run it; '' when it can


METHODS = {m.name: m for m in (
    Method("full", "full fine-tuning, torch AdamW (fused)"),
    Method("ct-f", "Child-Tuning-F: MaskedAdamW, Bernoulli mask of reserve_p each step"),
    Method("ct-d", "Child-Tuning-D: MaskedAdamW, fixed mask of reserve_p on the blocks, dense storage", masks=True),
    Method("sparse", "Child-Tuning-D with storage='sparse' (moments of the kept entries only)", masks=True),
    Method("sparse-compact", "storage='sparse' and compact_grads=True (gradients of the kept entries only)",
           masks=True,
           fsdp2_refusal="compact_grads=True does not take FSDP2 (DTensor) parameters (FSDP2 sets sharded gradients "
                         "after its reduce-scatter, outside the hook that keeps the compact entries); 'sparse' is "
                         "the same method with dense gradients"),
    Method("importance", "MaskedAdamW mask='importance' (running scores)", traced_as="ct-f",
           modeled="traced as ct-f, plus 1 B of level code per element; a refresh step's logs and temporaries "
                   "modeled",
           fsdp2_refusal="mask='importance' does not take sharded (DTensor) parameters yet "
                         "(childopt.optim.importance_mask); use ct-f or a fixed mask under FSDP2"),
    Method("lora", "peft LoRA on peft's default modules for the model, torch AdamW (fused)"),
    Method("adamw-8bit", "bitsandbytes AdamW8bit", traced_as="full",
           modeled="traced as full, state from bitsandbytes' 8-bit layout", runs_on_cpu=False,
           fsdp2_refusal="bitsandbytes' optimizers do not take FSDP2 (DTensor) parameters (bitsandbytes issues #89, "
                         "#1633)"),
)}

SPARSE_STORAGE = ("sparse", "sparse-compact")


def check_method(name: str) -> Method:
    if name not in METHODS:
        raise ValueError(f"method must be one of {tuple(METHODS)}, got {name!r}")
    return METHODS[name]


def traced(method: Method) -> Method:
    """The method whose step the planner traces for ``method``."""
    return METHODS[method.traced_as] if method.traced_as else method


def kept_count(numel: int, reserve_p: float) -> int:
    """Entries a fixed mask of ``reserve_p`` keeps: what childopt.masks.select_mask picks."""
    return max(1, round(reserve_p * numel))


def masked_parameters(model: torch.nn.Module, scope: str) -> list:
    """``(name, parameter)`` a fixed mask covers: those of the transformer blocks (``layers``, as
    the published Child-Tuning-D does) or ``all``."""
    in_blocks = {id(p) for p in layer_blocks(model).parameters()}
    return [(name, p) for name, p in model.named_parameters()
            if p.requires_grad and (scope == "all" or id(p) in in_blocks)]


def wrap_lora(model: torch.nn.Module, head: str, rank: int) -> torch.nn.Module:
    """``model`` with peft LoRA adapters of ``rank`` on peft's default target modules for its type."""
    try:
        import peft
    except ImportError as exc:
        raise RuntimeError("method 'lora' is sized with peft: pip install peft") from exc
    task = "SEQ_CLS" if head == "classification" else "CAUSAL_LM"
    try:
        return peft.get_peft_model(model, peft.LoraConfig(r=rank, task_type=task))
    except ValueError as exc:
        raise ValueError(f"method 'lora': peft {peft.__version__} has no default LoRA target modules for model type "
                         f"{model.config.model_type!r} ({exc})") from exc


def random_mask(param: torch.Tensor, count: int) -> torch.Tensor:
    """A bool mask of ``param``'s shape keeping ``count`` entries drawn at random (seeded)."""
    mask = torch.zeros(param.numel(), dtype=torch.bool, device=param.device)
    mask[torch.randperm(param.numel(), generator=torch.Generator().manual_seed(count))[:count]] = True
    return mask.view(param.shape)


def build_optimizer(method: Method, model: torch.nn.Module, *, reserve_p: float, mask_scope: str, backend: str,
                    make_mask: Callable[[torch.Tensor, int], torch.Tensor] = random_mask) -> torch.optim.Optimizer:
    """The optimizer of ``method`` over ``model``'s trainable parameters.

    ``make_mask(param, count)`` makes the fixed masks (the planner's are fake tensors that
    declare their count to the trace); ``backend`` is MaskedAdamW's.
    """
    name = method.name
    trainable = [p for p in model.parameters() if p.requires_grad]
    if name in ("full", "lora"):
        return torch.optim.AdamW(trainable, fused=True)
    if name == "adamw-8bit":
        return adamw_8bit(trainable)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if name == "ct-f":
        return MaskedAdamW(named, mask="bernoulli", reserve_p=reserve_p, seed=0, backend=backend)
    if name == "importance":  # a refresh every step: the step measured is the one with the highest peak
        return MaskedAdamW(named, mask=Importance("running", refresh_every=1), reserve_p=reserve_p, seed=0,
                           backend=backend)
    masks = {param_name: make_mask(p, kept_count(p.numel(), reserve_p))
             for param_name, p in masked_parameters(model, mask_scope)}
    storage = "sparse" if name in SPARSE_STORAGE else "dense"
    return MaskedAdamW(named, mask=masks, seed=0, storage=storage, compact_grads=name == "sparse-compact",
                       backend=backend)


def modeled_state_bytes(method: Method, trainable: list) -> int:
    """Optimizer-state bytes of a method sized by layout (``adamw-8bit``) over ``trainable``."""
    if method.name != "adamw-8bit":
        raise ValueError(f"method {method.name!r} is traced, not modeled")
    total = BNB_QMAPS_BYTES
    for p in trainable:
        n = p.numel()
        total += 8 * n if n < BNB_MIN_8BIT_SIZE else 2 * n + 2 * 4 * math.ceil(n / BNB_BLOCK)
    return total


def modeled_mask_bytes(method: Method, trainable: list) -> int:
    """Mask bytes a method adds to the trace it shares: ``importance``'s uint8 level codes."""
    return sum(p.numel() for p in trainable) if method.name == "importance" else 0


def modeled_step_bytes(method: Method, trainable: list) -> int:
    """Bytes a method's step holds beyond the trace it shares: at an ``importance`` refresh, the fp32
    log ratio of every sampled element, and the temporaries of one piece (scores, Philox words, level
    arithmetic: IMPORTANCE_PIECE_BYTES per element, measured; childopt.importance.PIECE elements at most)."""
    if method.name != "importance" or not trainable:
        return 0
    return 4 * sum(p.numel() for p in trainable) + IMPORTANCE_PIECE_BYTES * min(max(p.numel() for p in trainable),
                                                                                importance.PIECE)
