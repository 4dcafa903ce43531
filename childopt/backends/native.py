"""The native backend: childopt._C's C++ (CPU) and CUDA kernels, through ``torch.ops.childopt``.

The extension is found or built by childopt._native on first use; it registers the CPU and
CUDA implementations of the ops childopt.backends.contract declares.  Its kernels cover
float32, bfloat16 and float16 parameters: the optimizer routes a float64 bucket to the
reference backend while bucketing (``Backend.covers``).
"""
from __future__ import annotations

import math

import torch

from childopt import importance, philox
from childopt.backends import base

NAME = "native"
AUTO_DEVICES = ("cpu", "cuda")


def available(device: torch.device) -> tuple[bool, str]:
    """Whether childopt._C loads, building it if needed, and has kernels for ``device``."""
    return _check(device, build=True)


def ready(device: torch.device) -> tuple[bool, str]:
    """Like :func:`available`, but without compiling: what ``backend="auto"`` asks."""
    return _check(device, build=False)


def _check(device: torch.device, build: bool) -> tuple[bool, str]:
    from childopt import _native

    module, reason = _native.try_load(build=build)
    if module is None:
        return False, f"childopt._C is not available ({reason})"
    if device.type == "cpu":
        return True, f"childopt._C ({reason})"
    if device.type == "cuda":
        if not module.with_cuda:
            return False, f"childopt._C was built without CUDA ({reason})"
        return True, f"childopt._C with CUDA kernels ({reason})"
    return False, f"childopt._C has no kernels for {device.type} tensors"


class Backend(base.Backend):
    """Calls torch.ops.childopt.*; loads the extension when constructed."""

    name = NAME
    PARAM_DTYPES = base.KERNEL_DTYPES

    def __init__(self):
        from childopt import _native

        self._module = _native.load()

    def random_words(self, numel: int, rng_base: int, seed: int, step: int, device) -> torch.Tensor:
        """On CPU, the vectorised Philox of childopt._C on every intra-op thread (the same bits)."""
        if torch.device(device).type != "cpu":
            return super().random_words(numel, rng_base, seed, step, device)
        words = torch.empty(numel, dtype=torch.int32)
        self._module._philox_words(words, rng_base, seed, step)
        return words.to(torch.int64) & philox.MASK32

    def score_logs(self, score: torch.Tensor, codes=None) -> torch.Tensor:
        """On CPU, childopt._C's log2 in one pass, the level lookup fused (the same bits; any input at one
        speed, where torch.log2 is 8x slower on zeros); float64 scores keep the torch definition (their range)."""
        if score.device.type != "cpu" or score.dtype != torch.float32 or (
                codes is not None and codes.shape != score.shape):
            return super().score_logs(score, codes)
        score = score.reshape(-1).contiguous()
        logs = torch.empty_like(score)
        self._module._portable_log2(score, logs, None if codes is None else codes.reshape(-1).contiguous())
        return logs

    def probabilities(self, log_r: torch.Tensor, log_c: float, p_min: float) -> torch.Tensor:
        """On CPU, childopt._C's one pass (the same bits) for a finite ``log_c``."""
        if log_r.device.type != "cpu" or math.isinf(log_c):
            return super().probabilities(log_r, log_c, p_min)
        log_r = log_r.float().contiguous()
        p = torch.empty_like(log_r)
        self._module._keep_probabilities(log_r, p, *importance.scale_parts(log_c), p_min)
        return p

    def kept_sums(self, log_r: torch.Tensor, log_c: float, p_min: float) -> tuple[int, int, int]:
        """On CPU, childopt._C's one read for a finite ``log_c``: the probabilities are never written (the
        same integers)."""
        if log_r.device.type != "cpu" or math.isinf(log_c):
            return super().kept_sums(log_r, log_c, p_min)
        return self._module._probability_sums(log_r.float().contiguous(), *importance.scale_parts(log_c), p_min)

    def level_codes(self, p: torch.Tensor, rng_base: int, seed: int, step: int) -> torch.Tensor:
        """On CPU, childopt._C's level codes (the same bits; the words never stored): 10x the torch ops."""
        if p.device.type != "cpu":
            return super().level_codes(p, rng_base, seed, step)
        codes = torch.empty(p.shape, dtype=torch.uint8)
        self._module._level_codes(p.float().contiguous(), codes, rng_base, seed, step)
        return codes
