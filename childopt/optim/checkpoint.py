"""MaskedAdamW's state dicts: torch's format plus a ``"childopt"`` entry, and their loading.

A childopt state dict is torch's (``state`` by parameter index, ``param_groups``) with fp32
moments whatever the parameter dtype, ``mask`` (dense storage) or ``indices`` (sparse storage)
per parameter, and ``"childopt": {format, mask_kind, seed, storage, ...}``.  Loading also accepts
state dicts saved by earlier childopt versions (param groups without torch's implementation
flags) and ``torch.optim.AdamW`` state dicts (dense moments; this optimizer's masks are kept).
"""
from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Mapping

import torch

from childopt import philox, sparse, user_warning
from childopt.backends.contract import MaskKind
from childopt.optim import params, sharding, sparse_shards
from childopt.optim.saved_state import BACKEND_FLAGS, STATE_FORMAT, check_state_dict
from childopt.optim.state import MOMENT_KEYS, moment_dtype

# What a loaded group keeps of the live one: the flags that picked the backend (BACKEND_FLAGS), and
# the parameters' names, which describe the live parameters (torch would take the saved names, in
# the saved order even where torch.distributed.checkpoint paired the parameters by name) and which
# set_mask, importance scores and sparse_indices() look parameters up by.
LIVE_GROUP_KEYS = (*BACKEND_FLAGS, "param_names")
GROUP_KEY = "childopt"  # None in the live groups; the saved groups' copy of the entry (see attach_extras)
_HOOKS = ("_optimizer_load_state_dict_pre_hooks", "_optimizer_load_state_dict_post_hooks")


def extras(optimizer) -> dict:
    """The ``"childopt"`` entry of ``optimizer.state_dict()``.

    ``seed_drawn``: the seed came from ``seed=None``, so ranks that load different ones still
    agree on rank 0's (childopt.optim.sharding.agree_seed).  ``importance_steps``: the steps the
    importance sampler counted, its refresh schedule (None before its first step: then read from
    the parameters' step counts at the next step, as for state dicts saved before it existed).
    Its keys stay those of the released versions: a torch.distributed.checkpoint load fills the
    keys of the target's groups from the checkpoint and fails on one it lacks.
    An optimizer of the dense kind that holds no mask (``mask={}``) trains every entry: saved as
    ``"none"``, so a dense state without masks always means masks lost on the way (check_state_dict).
    """
    steps = optimizer._sampler_steps() if optimizer._importance_config is not None else None
    kind = optimizer.mask_kind
    if optimizer._mask_kind == MaskKind.DENSE and optimizer.storage == "dense" \
            and not any("mask" in s for s in optimizer.state.values()):
        kind = MaskKind.NONE.label
    return {"format": STATE_FORMAT, "mask_kind": kind, "seed": optimizer.seed,
            "storage": optimizer.storage, "seed_drawn": optimizer._seed_drawn, "importance_steps": steps}


def _steps_total(state: Mapping, skip=lambda entry: False) -> float:
    """The sum of the saved step counts (of the entries ``skip`` does not name): what a group's copy
    of ``"childopt"`` is stamped with."""
    return float(sum(float(s["step"]) for s in state.values()
                     if isinstance(s, Mapping) and "step" in s and not skip(s)))


def _fresh(entry: Mapping) -> bool:
    """A state torch.distributed.checkpoint's zero-lr init step made (step 1, zero moments): what a
    parameter without saved state keeps through a partial load."""
    try:
        return float(entry["step"]) == 1.0 and all(
            isinstance(entry.get(key), torch.Tensor) and not sharding.local(entry[key]).any()
            for key in ("exp_avg", "exp_avg_sq"))
    except (TypeError, ValueError, RuntimeError):
        return False


def attach_extras(state_dict: dict, extras_entry: dict) -> dict:
    """Put ``"childopt"`` at the top and, stamped with the steps taken, in every saved group.

    torch.distributed.checkpoint's ``get_optimizer_state_dict`` keeps only ``state`` and
    ``param_groups`` (and its flattened form only the keys of the live groups, which hold
    ``"childopt": None`` for that); the copy in the groups carries the entry through it.  The
    stamp tells it from a stale copy that torch's AdamW carried along while it stepped.
    """
    state_dict["childopt"] = extras_entry
    stamped = {**extras_entry, "steps_total": _steps_total(state_dict["state"])}
    for group in state_dict["param_groups"]:
        group[GROUP_KEY] = stamped
    return state_dict


def save(optimizer, torch_state_dict) -> dict:
    """``optimizer.state_dict()``: torch's (``torch_state_dict()``) with sparse state in its global
    form and the ``"childopt"`` entry attached, then torch's post-hooks, which torch would have run
    before the entry was there (a hook that keeps a copy would resume without the seed)."""
    hooks = optimizer._optimizer_state_dict_post_hooks
    optimizer._optimizer_state_dict_post_hooks = OrderedDict()
    try:
        state_dict = torch_state_dict()
    finally:
        optimizer._optimizer_state_dict_post_hooks = hooks
    state_dict = attach_extras(global_sparse_state(optimizer, state_dict), extras(optimizer))
    for hook in hooks.values():
        result = hook(optimizer, state_dict)
        state_dict = state_dict if result is None else result
    return state_dict


def _finite_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _stamp_holds(steps_total: float, state: Mapping) -> bool:
    """Whether the groups' copy belongs to this state, not to one that torch's AdamW stepped on since.

    Steps only grow: a copy AdamW carried while stepping holds a sum above its stamp, and a load that
    skipped states (DCP skips frozen parameters') one below, so a sum at most the stamp is accepted.
    Equal sums need nothing more: without a skip they mean no step since; a copy both stepped on and
    skipped can pass at or below the stamp (no saved key tells them apart), but it is then this run's
    own last entry (its mask kind and seed), and a target built with another mask warns.  States
    that DCP's init step made for parameters the checkpoint has none of (a partial load) do not
    count.
    """
    try:  # a NaN step too: check_state_dict names it
        return not _steps_total(state) > steps_total or not _steps_total(state, skip=_fresh) > steps_total
    except (AttributeError, TypeError, ValueError, RuntimeError):  # a step that is no number, likewise
        return True


def lift_extras(state_dict):
    """``state_dict`` with ``"childopt"`` at the top and groups without it, as torch's loader expects.

    Without a top-level entry, the groups' copy is lifted when its stamp fits the state's steps;
    otherwise an optimizer that is not childopt's stepped since, and it is dropped with a warning
    (a foreign state dict).  Anything else is returned unchanged.
    """
    if not isinstance(state_dict, Mapping) or not isinstance(state_dict.get("param_groups"), list):
        return state_dict
    if "childopt" in state_dict and not isinstance(state_dict["childopt"], Mapping):
        raise ValueError(f"state_dict['childopt'] must be a dict (format, mask_kind, seed, storage), got "
                         f"{type(state_dict['childopt']).__name__}")
    groups = state_dict["param_groups"]
    marked = [g for g in groups if isinstance(g, Mapping) and GROUP_KEY in g]
    if not marked:
        return state_dict
    lifted = dict(state_dict)
    lifted["param_groups"] = [{k: v for k, v in g.items() if k != GROUP_KEY} if isinstance(g, Mapping) else g
                              for g in groups]
    in_groups = [g[GROUP_KEY] for g in marked if g[GROUP_KEY] is not None]  # None: a live group's marker
    if not in_groups:
        return lifted
    for entry in in_groups:  # before comparing them: a tensor stamp has no truth value
        if not isinstance(entry, Mapping) or not _finite_number(entry.get("steps_total", 0.0)):
            raise ValueError(f"a param group's 'childopt' entry must be a dict whose 'steps_total' (the step count "
                             f"it was saved at) is a finite number, got {entry!r}: the state_dict is corrupt")
    if any(entry != in_groups[0] for entry in in_groups):
        raise ValueError("the param groups of this state_dict carry different 'childopt' entries (format, "
                         "mask_kind, seed, storage): it merges state dicts of different optimizers")
    if len(in_groups) != len(groups) and "childopt" not in lifted:
        user_warning.warn(f"load_state_dict: {len(groups) - len(in_groups)} of the {len(groups)} param groups carry "
                          "no 'childopt' entry: an optimizer that is not childopt's (torch's AdamW, given a group by "
                          "add_param_group) saved it; it loads as a torch.optim.AdamW state dict, and this optimizer "
                          "keeps its mask kind and seed")
        return lifted
    if "steps_total" not in in_groups[0]:
        raise ValueError(f"the param groups' 'childopt' entry has no 'steps_total' (the step count it was saved at), "
                         f"got {in_groups[0]!r}: the state_dict is corrupt")
    if "childopt" in lifted:
        return lifted
    entry = {k: v for k, v in in_groups[0].items() if k != "steps_total"}
    if _stamp_holds(in_groups[0]["steps_total"], state_dict.get("state", {})):
        lifted["childopt"] = entry
    else:
        user_warning.warn(f"load_state_dict: the param groups' 'childopt' entry (mask_kind {entry.get('mask_kind')!r}, "
                          f"seed {entry.get('seed')}) was saved at fewer steps than this state_dict holds: an "
                          "optimizer that is not childopt's (torch's AdamW keeps unknown group keys) stepped it since, "
                          "or a partial torch.distributed.checkpoint load kept this optimizer's own entry; it loads "
                          "as a torch.optim.AdamW state dict, and this optimizer keeps its mask kind and seed")
    return lifted


def _with_live_group_keys(optimizer, state_dict):
    """``state_dict`` whose groups take the keys they lack from this optimizer's groups (torch would
    reset them to the defaults): a torch.optim.AdamW state dict keeps ``reserve_p`` and ``masked``."""
    if not isinstance(state_dict, Mapping) or not isinstance(state_dict.get("param_groups"), list) \
            or len(state_dict["param_groups"]) != len(optimizer.param_groups):
        return state_dict  # check_state_dict explains what is wrong with it
    groups = [{**{k: v for k, v in live.items() if k != "params"}, **saved} if isinstance(saved, Mapping) else saved
              for live, saved in zip(optimizer.param_groups, state_dict["param_groups"])]
    return {**state_dict, "param_groups": groups}


def restore_param(optimizer, p: torch.Tensor, saved: dict, kept: dict, foreign: bool, capturable: bool) -> None:
    """Rebuild the state of ``p`` from its saved entry after torch's ``load_state_dict``.

    The entry was checked (childopt.optim.saved_state).  torch casts floating state to the
    parameter's dtype; here moments take :func:`moment_dtype`, masks stay bool and importance
    draws as saved; a foreign (torch AdamW) state dict keeps this optimizer's mask or indices
    (``kept``), and its dense moments are gathered onto them.
    """
    state = optimizer.state[p]
    if "indices" in saved:
        state["indices"] = saved["indices"].to(device=p.device, copy=True)
    elif foreign and "indices" in kept:
        state["indices"] = kept["indices"]
    for key in MOMENT_KEYS:
        if key in saved:
            value = saved[key].detach().to(device=p.device, dtype=moment_dtype(p.dtype), copy=True)
            if "indices" in state and "indices" not in saved and value.shape == p.shape:  # dense (torch AdamW) state
                if sharding.is_dtensor(p):
                    value = sharding.local(sharding.shard_like(value, p, optimizer.describe(p), what=f"saved {key!r}"))
                value = sparse.gather(value, state["indices"])
            elif sharding.is_dtensor(p) and "indices" not in saved:  # a full (torch.save) moment: this rank's rows
                value = sharding.shard_like(value, p, optimizer.describe(p), what=f"saved {key!r}")
            state[key] = value.contiguous()
    if "step" in saved:
        state["step"] = torch.tensor(float(saved["step"]), dtype=torch.float32,
                                     device=p.device if capturable else "cpu")
    if "importance" in saved:  # torch cast it to the parameter's dtype: the saved codes or mask, as saved
        state["importance"] = saved["importance"].detach().to(device=p.device, copy=True).contiguous()
    if "mask" in saved:
        state["mask"] = params.resolve_masks(optimizer.param_groups, {p: saved["mask"]})[p]
    elif foreign and "mask" in kept:
        state["mask"] = kept["mask"]


def _sharded_sparse(optimizer) -> list:
    """(position in the state dict, parameter) of each DTensor parameter under sparse storage."""
    if optimizer.storage != "sparse" or not optimizer._sharded:
        return []
    stepped = [p for g in optimizer.param_groups for p in g["params"]]
    return [(i, p) for i, p in enumerate(stepped) if sharding.is_dtensor(p)]


def global_sparse_state(optimizer, state_dict: dict) -> dict:
    """``state_dict`` with the sparse state of DTensor parameters in its global form.

    torch numbers the saved parameters in the groups' order; a collective over the
    parameters' meshes (childopt.optim.sparse_shards), so every rank must call it.
    """
    held = [(i, p) for i, p in _sharded_sparse(optimizer) if "indices" in optimizer.state.get(p, {})]
    forms = sparse_shards.global_states([(p, state_dict["state"][i]) for i, p in held], optimizer.describe)
    state_dict["state"] = {**state_dict["state"], **{i: form for (i, _), form in zip(held, forms)}}
    return state_dict


def local_sparse_state(optimizer, state_dict):
    """``state_dict`` with saved global-form sparse state of DTensor parameters cut to this rank's.

    A state dict whose groups do not pair with this optimizer's is returned unchanged:
    childopt.optim.saved_state explains what is wrong with it.
    """
    sharded = _sharded_sparse(optimizer)
    if not sharded or not isinstance(state_dict, Mapping) or not isinstance(state_dict.get("state"), Mapping) \
            or not isinstance(state_dict.get("param_groups"), list):
        return state_dict
    saved_ids = [saved_id for g in state_dict["param_groups"] if isinstance(g, Mapping)
                 for saved_id in g.get("params", ())]
    if len(saved_ids) != sum(len(g["params"]) for g in optimizer.param_groups):
        return state_dict
    entries = [(saved_ids[i], p, state_dict["state"].get(saved_ids[i])) for i, p in sharded]
    entries = [(saved_id, p, saved) for saved_id, p, saved in entries if sparse_shards.is_global_form(saved)]
    forms = sparse_shards.local_states([(p, saved) for _, p, saved in entries], optimizer.describe)
    return {**state_dict, "state": {**state_dict["state"], **{saved_id: form for (saved_id, _, _), form
                                                             in zip(entries, forms)}}}


def upgrade_pickled(state: dict) -> dict:
    """A pickled optimizer's ``__dict__`` in today's form (childopt 0.1.0 named mask kinds by string;
    a load of a torch fused AdamW state dict could leave its groups a ``fused`` the optimizer lacks).

    torch's ``load_state_dict`` also calls ``__setstate__``, with only ``state`` and
    ``param_groups``: that is passed through untouched.
    """
    if "_mask_kind" in state:
        if isinstance(state["_mask_kind"], str):
            state["_mask_kind"] = MaskKind.from_label(state["_mask_kind"])
        state.setdefault("_backend_exclude", ())
        defaults = state.get("defaults", {})
        for group in state.get("param_groups", ()):  # a load before this release kept a saved fused=True
            group.update({key: defaults[key] for key in BACKEND_FLAGS if key in group and key in defaults})
    return state


def load(optimizer, state_dict, torch_load) -> None:
    """``optimizer.load_state_dict``: torch's pre-hooks, the checks, torch's load (``torch_load``, which
    maps the ids; its hooks set aside), the restore of what torch cannot, then torch's post-hooks."""
    if optimizer._compact is not None:
        optimizer._refuse_pending("load_state_dict()")
    state_dict = dict(state_dict) if isinstance(state_dict, Mapping) else state_dict  # torch's shallow copy
    for hook in getattr(optimizer, _HOOKS[0]).values():
        result = hook(optimizer, state_dict)
        state_dict = state_dict if result is None else result
    state_dict = _with_live_group_keys(optimizer, local_sparse_state(optimizer, lift_extras(state_dict)))
    saved_ids = check_state_dict(optimizer, state_dict)
    state_dict = {**state_dict, "param_groups": [{**saved, **{k: live[k] for k in LIVE_GROUP_KEYS if k in live}}
                                                 for live, saved in zip(optimizer.param_groups,
                                                                        state_dict["param_groups"])]}
    saved_extras = state_dict.get("childopt")
    if saved_extras is not None:
        optimizer._check_mask_kind(MaskKind.from_label(saved_extras["mask_kind"]), "this state_dict holds")
    if saved_extras is not None and saved_extras["mask_kind"] == MaskKind.IMPORTANCE.label \
            and optimizer._importance_config is None:
        raise ValueError("this state_dict was saved with mask='importance'; construct the optimizer with the same "
                         "mask (its Importance configuration is not saved) to load it")
    kept = {p: {k: s[k] for k in ("mask", "indices") if k in s} for p, s in optimizer.state.items()}
    built = optimizer._mask_kind
    if optimizer._compact is not None:  # torch's load builds a new one (__setstate__): no dead hooks left behind
        optimizer._compact.unregister_all()
    hooks = [getattr(optimizer, name) for name in _HOOKS]
    for name in _HOOKS:  # they run around the whole load here, as torch runs them around its own
        setattr(optimizer, name, OrderedDict())
    try:
        torch_load(state_dict)
    finally:
        for name, held in zip(_HOOKS, hooks):
            setattr(optimizer, name, held)
    stepped = [p for g in optimizer.param_groups for p in g["params"]]
    capturable = {p: g.get("capturable", False) for g in optimizer.param_groups for p in g["params"]}
    for saved_id, p in zip(saved_ids, stepped):
        restore_param(optimizer, p, state_dict["state"].get(saved_id, {}), kept.get(p, {}), saved_extras is None,
                      capturable[p])
    if optimizer._compact is not None:
        optimizer._compact.buffers.clear()
        optimizer.hook_gradients()
    if saved_extras is not None:
        optimizer._mask_kind = MaskKind.from_label(saved_extras["mask_kind"])
        if optimizer._mask_kind == MaskKind.NONE and built == MaskKind.DENSE \
                and not any("mask" in s for s in optimizer.state.values()):
            optimizer._mask_kind = MaskKind.DENSE  # built with mask={}: 'none' saved by one (extras), same training
        if optimizer._mask_kind != MaskKind.IMPORTANCE:
            optimizer._importance = optimizer._importance_config = None
        if saved_extras["seed"] is not None:  # None (older saves without a drawn mask): keep the one built
            optimizer.seed = philox.check_seed(saved_extras["seed"])
        optimizer._seed_drawn = bool(saved_extras.get("seed_drawn", False))
        optimizer._seed_agreed = not optimizer.sync_seed  # ranks must hold the same seed again
        _warn_replaced_mask(optimizer, built, kept)
    # the sampler (dropped by __setstate__) is rebuilt at the next step with the saved step count;
    # None (saved before it existed): read from the loaded state then
    optimizer._importance_steps = (saved_extras or {}).get("importance_steps")
    for hook in hooks[1].values():
        hook(optimizer)


def _warn_replaced_mask(optimizer, built: MaskKind, kept: dict) -> None:
    """Warn when the loaded state replaced the mask the optimizer was built with (the saved one wins).

    An optimizer built without a mask (``mask=None``, or an empty dict) takes the saved one
    silently: that is how to resume a mask that is expensive to make (a Fisher pass).  ``kept``:
    its masks or indices before the load.  Through torch.distributed.checkpoint ``dcp.load`` has
    already written the saved masks into the kept tensors, so a difference cannot be seen there.
    """
    if built == MaskKind.NONE or (built == MaskKind.DENSE and not any(kept.values())):
        return
    loaded = optimizer._mask_kind
    if loaded != built:
        user_warning.warn(f"load_state_dict: this optimizer was built with a {built.label!r} mask and the state_dict "
                          f"holds a {loaded.label!r} one, which it now uses (and the saved param groups' reserve_p); "
                          "build it with the saved mask, or (a plain load_state_dict) with mask=None to take it "
                          "without this warning")
        return
    changed = [p for p, state in optimizer.state.items()
               if any(not _same_tensor(kept.get(p, {}).get(key), state.get(key)) for key in ("mask", "indices"))]
    if changed:
        first = optimizer.describe(changed[0])
        user_warning.warn(f"load_state_dict: the saved masks of {len(changed)} parameters ({first}"
                          f"{', ...' if len(changed) > 1 else ''}) differ from those this optimizer was built with, "
                          "and replace them; build it with mask=None (a plain load_state_dict; through "
                          "torch.distributed.checkpoint, with all-True masks) to take the saved masks without this "
                          "warning")


def _same_tensor(a, b) -> bool:
    """Both None, or tensors of the same shape, device and values (a DTensor's local shard)."""
    if a is None or b is None:
        return a is b
    a, b = sharding.local(a), sharding.local(b)
    return a.shape == b.shape and a.device == b.device and torch.equal(a, b)
