"""Backend registry: which implementation of the op set steps tensors on a given device.

``auto`` picks, per device, the first backend that can run there in the order native, triton,
reference, and logs once which it picked and why.  ``auto`` takes native only when childopt._C
is ready without compiling (a prebuilt module, or a build already in the cache from
``python -m childopt build`` or an earlier ``backend="native"``): a first optimizer step never
starts a compile nobody asked for.  The ``CHILDOPT_BACKEND`` environment variable replaces
``auto``'s choice.  A backend asked for by name that cannot run raises with the reason.

Every backend module declares ``NAME``, ``AUTO_DEVICES``, ``available(device)`` (and
``ready(device)`` when checking could compile) and a ``Backend`` class (childopt.backends.base)
whose ``covers`` says which dtypes its kernels step; :func:`route` sends a bucket it does not
cover to the reference backend.
"""
from __future__ import annotations

import logging
import os

import torch

from childopt.backends import contract  # noqa: F401  (defines the ops before any backend registers them)
from childopt.backends import native, reference, triton
from childopt.backends.base import Backend, SparseTensorLists, TensorLists  # noqa: F401

log = logging.getLogger("childopt")

MODULES = {reference.NAME: reference, triton.NAME: triton, native.NAME: native}
AUTO_ORDER = (native.NAME, triton.NAME, reference.NAME)
CHOICES = ("auto", *MODULES)
_announced: set = set()


def check_name(backend: str) -> str:
    """Validate a ``backend=`` argument."""
    if backend not in CHOICES:
        raise ValueError(f"backend must be one of {CHOICES}, got {backend!r}")
    return backend


def requested(backend: str) -> str:
    """``backend`` with ``CHILDOPT_BACKEND`` applied when it is ``auto``."""
    env = os.environ.get("CHILDOPT_BACKEND", "").strip()
    if backend == "auto" and env:
        if env not in CHOICES:
            raise ValueError(f"CHILDOPT_BACKEND must be one of {CHOICES}, got {env!r}")
        return env
    return backend


def check_ready(module, device: torch.device) -> tuple[bool, str]:
    """Whether ``module`` can run on ``device`` without compiling anything."""
    return (module.ready if hasattr(module, "ready") else module.available)(device)


def create(backend: str, device: torch.device, *, exclude: tuple = ()) -> Backend:
    """A backend instance for tensors on ``device``: the named one, or ``auto``'s pick.

    ``exclude`` names backends ``auto`` must not pick (``fused=True`` excludes the reference).
    """
    name = requested(check_name(backend))
    if name in exclude:  # only CHILDOPT_BACKEND can name one: backend_for_flags refuses the argument
        raise ValueError(f"CHILDOPT_BACKEND={name!r} names a backend this optimizer excludes: fused=True asks for "
                         "a fused kernel backend ('native' or 'triton'); unset CHILDOPT_BACKEND or leave fused unset")
    if name != "auto":
        ok, why = MODULES[name].available(device)
        if not ok:
            raise RuntimeError(f"backend {name!r} cannot run on {device}: {why}")
        return MODULES[name].Backend()
    reasons = []
    native_skipped = ""
    for candidate in AUTO_ORDER:
        module = MODULES[candidate]
        if candidate in exclude:
            reasons.append(f"{candidate}: excluded")
            continue
        if device.type not in module.AUTO_DEVICES:
            reasons.append(f"{candidate}: not used automatically for {device.type} tensors")
            continue
        ok, why = check_ready(module, device)
        if ok:
            key = (candidate, str(device))
            if key not in _announced:
                _announced.add(key)
                skipped = f" (skipped: {'; '.join(reasons)})" if reasons else ""
                log.info("childopt: backend %r for %s tensors: %s%s", candidate, device, why, skipped)
                if native_skipped and candidate == reference.NAME:
                    _warn_native_missed(candidate, device, native_skipped)
            return module.Backend()
        reasons.append(f"{candidate}: {why}")
        if candidate == native.NAME:
            native_skipped = why
    raise RuntimeError(f"no backend can run on {device}: {'; '.join(reasons)}")


def _warn_native_missed(picked: str, device: torch.device, why: str) -> None:
    """Warn (once per device, as the pick is announced) when ``auto`` fell back to the reference backend past
    childopt._C although a build of it is in the cache or could be made here: a much slower backend must
    not be taken silently (Triton, on a GPU, is not: it runs the same fused step)."""
    from childopt import _native  # here: only when native was passed over

    state, _ = _native.status()
    if state in ("cached", "needs a build"):
        advice = "" if "childopt build" in why else "; run python -m childopt build or pass backend='native'"
        log.warning("childopt: backend='auto' uses %r for %s tensors, not the native backend: %s%s", picked, device,
                    why, advice)


_REFERENCE = reference.Backend()


def route(backend: Backend, param_dtype: torch.dtype, grad_dtype: torch.dtype) -> Backend:
    """``backend`` when its kernels cover the dtypes, else the reference backend (float64)."""
    return backend if backend.covers(param_dtype, grad_dtype) else _REFERENCE
