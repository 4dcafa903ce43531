"""Checks of a state dict before ``load_state_dict`` changes anything.

torch's ``Optimizer.load_state_dict`` replaces the state and the groups first and leaves every
value as given, so a bad entry would surface at the next ``step()`` (a cryptic error, or NaN
parameters) or leave the optimizer half-loaded.  Everything the load relies on is checked here,
with the parameter named, before torch is called: group sizes and hyper-parameters, the
``"childopt"`` entry, and each parameter's step count, moments, mask or indices.
"""
from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from childopt import philox, sparse
from childopt.backends.contract import MaskKind
from childopt.optim import params, validation
from childopt.optim.state import MOMENT_KEYS

STATE_FORMAT = 1
REQUIRED_MOMENTS = ("exp_avg", "exp_avg_sq")
SQUARED_MOMENTS = ("exp_avg_sq", "max_exp_avg_sq")


def check_extras(saved: Mapping, storage: str) -> MaskKind:
    """The mask kind of a ``"childopt"`` entry, refusing another format or storage with the fix."""
    if not isinstance(saved, Mapping) or saved.get("format") != STATE_FORMAT \
            or saved.get("mask_kind") not in [k.label for k in MaskKind]:
        raise ValueError(f"unsupported childopt state format: {saved!r} (expected format {STATE_FORMAT} "
                         f"and mask_kind one of {[k.label for k in MaskKind]})")
    if "seed" not in saved:
        raise ValueError(f"state_dict['childopt'] has no 'seed' (the Bernoulli stream's; None for one saved without "
                         f"it), got {dict(saved)!r}: load the dict MaskedAdamW.state_dict() returned")
    try:
        if saved["seed"] is not None:  # None: saved before an optimizer without a drawn mask got a seed
            philox.check_seed(saved["seed"])
    except (TypeError, ValueError) as exc:
        raise type(exc)(f"state_dict['childopt']['seed']: {exc}") from None
    if not isinstance(saved.get("seed_drawn", False), bool):
        raise TypeError(f"state_dict['childopt']['seed_drawn'] must be a bool, got {saved['seed_drawn']!r}")
    steps = saved.get("importance_steps")
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 0):
        raise TypeError(f"state_dict['childopt']['importance_steps'] must be None or an int >= 0, got {steps!r}")
    saved_storage = saved.get("storage", "dense")
    if saved_storage != storage:
        raise ValueError(f"this state_dict was saved with storage={saved_storage!r}; construct the "
                         f"optimizer with storage={saved_storage!r} to load it")
    return MaskKind.from_label(saved["mask_kind"])


def check_state_dict(optimizer, state_dict) -> list:
    """Raise a clear error for anything ``optimizer`` cannot load; return the saved ids in order.

    The ids pair with the optimizer's parameters in order, as torch pairs them.
    """
    if not isinstance(state_dict, Mapping) or not {"state", "param_groups"} <= set(state_dict):
        raise ValueError("state_dict must be a dict with 'state' and 'param_groups' (an optimizer's "
                         f"state_dict()), got {type(state_dict).__name__}")
    saved_groups = state_dict["param_groups"]
    if len(saved_groups) != len(optimizer.param_groups):
        raise ValueError(f"state_dict has {len(saved_groups)} param groups; this optimizer has "
                         f"{len(optimizer.param_groups)}")
    extras = state_dict.get("childopt")
    kind = check_extras(extras, optimizer.storage) if extras is not None else None
    saved_ids = []
    for gi, (saved, group) in enumerate(zip(saved_groups, optimizer.param_groups)):
        where = f" (loaded param group {gi})"
        if len(saved.get("params", ())) != len(group["params"]):
            raise ValueError(f"loaded param group {gi} has {len(saved.get('params', ()))} parameters; "
                             f"this optimizer's has {len(group['params'])}")
        # This optimizer's defaults for what an older state dict lacks; the constructor's rules.
        merged = {**optimizer.defaults, **saved}
        validation.check_group(merged, where, optimizer.storage)
        try:
            validation.check_torch_flags(merged["foreach"], merged["fused"], merged["capturable"],
                                         merged["differentiable"])
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"loaded param group {gi}: {exc}") from None
        # what this optimizer's groups may hold (ChildTuning's rules), with the flags the load keeps
        optimizer._check_group_options({**merged, **{k: group[k] for k in BACKEND_FLAGS}}, where)
        moved = _moved_names(saved, group)
        for position, (saved_id, p) in enumerate(zip(saved["params"], group["params"])):
            entry = state_dict["state"].get(saved_id)
            if entry is not None:
                _check_param_state(optimizer, p, entry, kind)
                if isinstance(entry, Mapping) and "indices" in entry and position in moved:
                    raise ValueError(f"loaded param group {gi} pairs its saved {moved[position][0]!r} with this "
                                     f"optimizer's {moved[position][1]!r}, and lists that one elsewhere (torch pairs "
                                     "parameters by position): sparse state holds flat indices, not the shape they "
                                     "were selected in, so they would land on another tensor; list the parameters in "
                                     "the saved order")
                if merged["amsgrad"] and "step" in entry and "max_exp_avg_sq" not in entry:
                    raise ValueError(f"loaded param group {gi} has amsgrad=True, but its saved state for "
                                     f"{optimizer.describe(p)} holds no 'max_exp_avg_sq': {_DCP_FILLS}, so build the "
                                     f"optimizer with amsgrad=True {_BEFORE_DCP}")
            saved_ids.append(saved_id)
    listed = set(saved_ids)
    unknown = [key for key in state_dict["state"] if key not in listed]
    if unknown:
        raise ValueError(f"state_dict['state'] has entries under {unknown[:4]!r}{' ...' if len(unknown) > 4 else ''}, "
                         f"which are not ids in the param groups' 'params' ({saved_ids[:4]!r}"
                         f"{' ...' if len(saved_ids) > 4 else ''}): their state would be lost (keys turned to strings, "
                         "by JSON for one, or state dicts merged); load the dict state_dict() returned")
    _check_mask_kept(optimizer, state_dict["state"], kind)
    return saved_ids


# The flags that picked the optimizer's backend when it was built: a loaded group keeps the
# optimizer's own (checkpoint.load).  A saved value is checked, but torch's fused AdamW's
# ``fused=True`` would describe a backend that does not run.
BACKEND_FLAGS = ("foreach", "fused")


def _moved_names(saved: Mapping, group: Mapping) -> dict:
    """{position: (saved name, live name)} where the saved group's ``param_names`` (torch saves them
    for an optimizer built on named parameters) list at that position a name the live group lists
    at another: a reordered parameter list, which torch's load pairs by position.  A renamed or
    prefixed parameter (a compiled model's ``_orig_mod.``) is not a move.  Empty without names on
    both sides, or when the ids are names: torch.distributed.checkpoint paired those by name."""
    saved_names, names = saved.get("param_names"), group.get("param_names")
    if not isinstance(saved_names, (list, tuple)) or names is None or len(saved_names) != len(names) \
            or any(isinstance(saved_id, str) for saved_id in saved.get("params", ())):
        return {}
    position_of = {name: i for i, name in enumerate(names)}
    return {i: (name, names[i]) for i, name in enumerate(saved_names)
            if isinstance(name, str) and position_of.get(name, i) != i}


_DCP_FILLS = "torch.distributed.checkpoint loads only the state keys the target optimizer already holds"
# dcp.load writes the saved tensors into the target's own before this check can refuse them.
_BEFORE_DCP = ("before get_optimizer_state_dict and dcp.load (a fresh one: dcp.load has already written the saved "
               "moments and step counts into this one's tensors)")


def _check_mask_kept(optimizer, state: Mapping, kind) -> None:
    """Refuse a dense-mask state whose masks are all gone.

    torch.distributed.checkpoint fills only the keys the target's state has: one built with
    ``mask=None``, ``mask={}`` or a drawn mask gets no mask and would train every entry.  A dense
    optimizer without masks saves the kind ``"none"`` (checkpoint.extras), so no complete state
    looks like this; one such optimizer's state saved before that names the way to load it.  Not
    detected: a target that masks fewer parameters than the checkpoint (the others load without theirs).
    """
    if kind != MaskKind.DENSE or optimizer.storage != "dense":
        return
    entries = [entry for entry in state.values() if isinstance(entry, Mapping)]
    if any("step" in entry for entry in entries) and not any("mask" in entry for entry in entries):
        raise ValueError(f"the state_dict's mask_kind is 'dense', but its state holds no mask (this optimizer was "
                         f"built with a {optimizer.mask_kind!r} one and holds none): {_DCP_FILLS}, so build the "
                         "optimizer with a mask on the same parameters (a dict of bool tensors of the saved shapes, "
                         "e.g. all-True; for ChildTuningAdamW(mode='ChildTuning-D'), set_gradient_mask with one) "
                         f"{_BEFORE_DCP}: the saved masks replace it.  A plain load_state_dict of a state dict "
                         "that an earlier childopt saved with mask={} (no mask at all, every entry trained): set "
                         "its 'childopt' entry's mask_kind to 'none'")


def _check_param_state(optimizer, p: torch.Tensor, saved, kind) -> None:
    """One parameter's saved state: the keys belong together and each value fits ``p``."""
    label = optimizer.describe(p)
    if not isinstance(saved, Mapping):
        raise TypeError(f"saved state for {label} must be a dict, got {type(saved).__name__}")
    has_moments = [key for key in MOMENT_KEYS if key in saved]
    if has_moments and "step" not in saved:
        raise ValueError(f"saved state for {label} has {has_moments} but no 'step' (the bias corrections "
                         "need the step count the moments were accumulated over)")
    if "step" in saved:
        missing = [key for key in REQUIRED_MOMENTS if key not in saved]
        if missing:
            raise ValueError(f"saved state for {label} has a 'step' but no {missing}")
        _check_step(saved["step"], label)
    if kind is None and ("mask" in saved or "indices" in saved) and not _own_tensors(optimizer, p, saved):
        raise ValueError(f"the saved state for {label} holds {'a mask' if 'mask' in saved else 'indices'}, but "
                         "the state_dict has no 'childopt' entry (format, mask_kind, seed, storage): a childopt "
                         "state dict that lost it; load the dict MaskedAdamW.state_dict() returned")
    if kind is not None and kind != MaskKind.DENSE and ("mask" in saved or "indices" in saved):
        raise ValueError(f"the state_dict's mask_kind is {kind.label!r}, but its state for {label} holds "
                         f"{'a mask' if 'mask' in saved else 'indices'}: the two disagree")
    if "mask" in saved:
        mask = saved["mask"]
        if isinstance(mask, torch.Tensor) and mask.is_floating_point():
            raise TypeError(f"the saved mask for {label} has dtype {mask.dtype}, expected torch.bool: a torch "
                            "optimizer's load_state_dict casts state to the parameter's dtype, so a childopt state "
                            "dict that passed through one lost its bool masks; load the childopt state dict itself")
        params.check_mask(mask, p, label)
    if "importance" in saved:
        _check_importance_draw(saved["importance"], p, label, kind)
    if "indices" in saved:
        if not isinstance(saved["indices"], torch.Tensor):
            raise TypeError(f"saved 'indices' for {label} must be a tensor, got {type(saved['indices']).__name__}")
        sparse.check_indices(saved["indices"], p.numel(), f"state 'indices' for {label}")
    for key in has_moments:
        _check_moment(saved[key], key, label, _moment_shapes(optimizer, p, saved, kind is None))


def _own_tensors(optimizer, p: torch.Tensor, saved: Mapping) -> bool:
    """Whether the saved mask or indices are this optimizer's own tensors, as a partial
    torch.distributed.checkpoint load (of a checkpoint without the ``"childopt"`` entry) leaves them."""
    state = optimizer.state.get(p, {})
    return all(saved[key] is state.get(key) for key in ("mask", "indices") if key in saved)


def _check_importance_draw(value, p: torch.Tensor, label: str, kind) -> None:
    """A saved importance draw: uint8 level codes or an exact-size bool mask of ``p``'s shape."""
    if kind != MaskKind.IMPORTANCE:
        raise ValueError(f"the saved state for {label} holds an importance draw, but the state_dict's mask_kind is "
                         f"{kind.label if kind is not None else 'missing'}: the two disagree")
    if not isinstance(value, torch.Tensor) or value.dtype not in (torch.uint8, torch.bool):
        what = f"a {value.dtype} tensor" if isinstance(value, torch.Tensor) else type(value).__name__
        raise TypeError(f"saved 'importance' for {label} must be uint8 level codes or a bool mask, got {what}")
    if value.shape != p.shape:
        raise ValueError(f"saved 'importance' for {label} has shape {tuple(value.shape)}, expected {tuple(p.shape)}")


def _check_step(step, label: str) -> None:
    value = validation.check_number(step, f"saved 'step' for {label}", low=0.0, high=math.inf, high_open=True)
    if value != int(value):
        raise ValueError(f"saved 'step' for {label} must be a whole number, got {value}")


def _moment_shapes(optimizer, p: torch.Tensor, saved: Mapping, foreign: bool) -> set:
    """Shapes a saved moment of ``p`` may have: compact when indices are saved, else the dense
    shape; a foreign (torch AdamW) state dict's dense moments are gathered onto kept indices."""
    if "indices" in saved:
        return {tuple(saved["indices"].shape)}
    kept = optimizer.state.get(p, {}).get("indices")
    if foreign and kept is not None:
        return {tuple(p.shape), tuple(kept.shape)}
    return {tuple(p.shape)}


def _check_moment(value, key: str, label: str, shapes: set) -> None:
    if not isinstance(value, torch.Tensor) or not value.is_floating_point():
        what = f"a {value.dtype} tensor" if isinstance(value, torch.Tensor) else type(value).__name__
        raise TypeError(f"saved {key!r} for {label} must be a floating-point tensor, got {what}")
    if value.device.type == "meta":
        raise ValueError(f"saved {key!r} for {label} is on the meta device, which holds no values")
    if tuple(value.shape) not in shapes:
        raise ValueError(f"saved {key!r} for {label} has shape {tuple(value.shape)}, expected "
                         f"{' or '.join(str(s) for s in sorted(shapes))}")
    if key in SQUARED_MOMENTS and value.numel() and not bool((value >= 0).all()):
        raise ValueError(f"saved {key!r} for {label} has negative or NaN entries; a second moment is a "
                         "running mean of squares (>= 0)")
    if value.numel() and not bool(torch.isfinite(value).all()):  # a DTensor: all ranks judge the whole
        raise ValueError(f"saved {key!r} for {label} has inf or NaN entries; the next step would make the "
                         "parameter NaN")
