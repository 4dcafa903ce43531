"""ChildTuningAdamW: the published ChildTuning optimizer's arithmetic on childopt's kernels."""
from __future__ import annotations

from collections.abc import Mapping

from childopt.backends.contract import MaskKind
from childopt.optim import validation
from childopt.optim.masked_adamw import MaskedAdamW

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
    ``seed``, ``sync_seed``, ``backend`` and torch's ``foreach``, ``fused``, ``capturable``, ``differentiable``
    are as in :class:`MaskedAdamW`.
    """

    _PICKLED = (*MaskedAdamW._PICKLED, "mode")
    _MODE_KINDS = {None: (MaskKind.NONE,), "ChildTuning-D": (MaskKind.NONE, MaskKind.DENSE),
                   "ChildTuning-F": (MaskKind.BERNOULLI,)}

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0,
                 correct_bias=True, reserve_p=1.0, mode=None, *, seed=None, backend="auto", foreach=None,
                 fused=None, capturable=False, differentiable=False, sync_seed=True):
        if mode not in CHILDTUNING_MODES:
            raise ValueError(f"mode must be one of {CHILDTUNING_MODES}, got {mode!r}")
        validation.check_bool(correct_bias, "correct_bias")
        self.mode = mode
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, reserve_p=reserve_p,
                        masked="zero_grad", amsgrad=False, maximize=False, correct_bias=correct_bias,
                        foreach=foreach, fused=fused, capturable=capturable, differentiable=differentiable)
        self._setup(params, defaults, mask=MaskKind.BERNOULLI.label if mode == "ChildTuning-F" else None,
                    seed=seed, backend=backend, sync_seed=sync_seed)

    def _check_group_options(self, group: dict, where: str) -> None:
        """As MaskedAdamW's; a group may not turn on what the published arithmetic lacks."""
        super()._check_group_options(group, where)
        validation.check_bool(group["correct_bias"], f"correct_bias{where}")
        for key in ("amsgrad", "maximize", "masked"):
            if group[key] != self.defaults[key]:
                raise ValueError(f"{key}={group[key]!r}{where}: ChildTuningAdamW runs the published ChildTuning "
                                 f"arithmetic, whose {key} is {self.defaults[key]!r}; use MaskedAdamW for {key}")

    def set_gradient_mask(self, gradient_mask: Mapping) -> None:
        """Set the Child-Tuning-D mask: a dict from parameter (or name) to a bool tensor."""
        if self.mode != "ChildTuning-D":
            raise ValueError(f"set_gradient_mask applies to mode='ChildTuning-D'; this optimizer has mode={self.mode!r}")
        if not isinstance(gradient_mask, Mapping):
            raise TypeError(f"gradient_mask must be a dict of bool tensors, got {type(gradient_mask).__name__}")
        self.set_mask(gradient_mask)

    def _check_mask_kind(self, kind: MaskKind, holder: str) -> None:
        """Refuse a mask kind that contradicts this ``mode`` (set_mask's, or a loaded state dict's)."""
        if kind not in self._MODE_KINDS[self.mode]:
            raise ValueError(f"{holder} a {kind.label!r} mask, which mode={self.mode!r} cannot use")

    def _check_ready(self) -> None:
        if self.mode == "ChildTuning-D" and self._mask_kind != MaskKind.DENSE:
            raise RuntimeError("ChildTuningAdamW(mode='ChildTuning-D') needs set_gradient_mask(...) before step()")

    def _rule(self, group: dict) -> str:
        """ChildTuning folds both corrections into the step size and decays after the update."""
        return "childtuning" if group["correct_bias"] else "childtuning-uncorrected"
