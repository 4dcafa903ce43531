"""The build of childopt._C this process would make: its sources, CPU or CUDA, its arch list and its key.

``runtime`` gathers the running torch, Python, platform, visible GPUs and nvcc, which the prebuilt
check and the cache lookup compare build records against; ``build_spec`` turns them into a
BuildSpec, whose key names its directory in the cache.
"""
from __future__ import annotations

import os
import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from childopt._native import config as cfg
from childopt._native.errors import ExtensionUnavailable, warn_once

# The childopt package: csrc/ is in it (installed) or beside it (a checkout); tests point this at a copy.
PACKAGE_DIR = Path(__file__).resolve().parents[1]


def csrc_dir() -> Path | None:
    """The C++ sources: childopt/csrc when installed, ../csrc in a source checkout."""
    return cfg.find_csrc(PACKAGE_DIR)


def torch_cuda_home() -> str | None:
    from torch.utils.cpp_extension import CUDA_HOME

    return CUDA_HOME


def _gpu_capabilities() -> list[tuple[int, int]]:
    """Compute capabilities of the visible GPUs (nvidia-smi in a forked child where CUDA cannot start)."""
    import torch

    if not torch.version.cuda or not torch.cuda.is_available():
        return []
    if torch.cuda._is_in_bad_fork():
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=compute_cap", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=30).stdout
            return [tuple(int(x) for x in line.strip().split(".")) for line in out.splitlines() if line.strip()]
        except (OSError, subprocess.SubprocessError, ValueError):
            return []
    return [tuple(torch.cuda.get_device_capability(i)) for i in range(torch.cuda.device_count())]


def runtime(csrc: Path | None = None, probe: bool = True) -> dict:
    """The running torch, Python, platform, GPUs and nvcc, as build records are checked against.

    ``probe=False`` (import time) leaves out what is costly or must not happen yet: no GPU query
    (it starts CUDA), no nvcc lookup, no source digest.
    """
    facts = cfg.torch_facts()
    base = {**facts, "python": cfg.python_tag(), "platform": cfg.platform_tag()}
    if not probe:
        return {**base, "sources": None, "gpus": [], "nvcc": None, "want_cuda": False}
    gpus = _gpu_capabilities()
    nvcc = None
    if facts["torch_cuda"] and not facts["torch_hip"]:
        nvcc = cfg.nvcc_path(torch_cuda_home())
    csrc = csrc if csrc is not None else csrc_dir()
    return {**base, "sources": cfg.source_digest(csrc) if csrc else None, "gpus": gpus, "nvcc": nvcc,
            "want_cuda": bool(gpus and nvcc)}


def _clamp_to_torch(cap: tuple[int, int]) -> str:
    """The GPU's arch, clamped to the newest arch this torch was built for (as torch does)."""
    import torch

    sms = [int(re.sub(r"[^0-9]", "", a.split("_")[1])) for a in torch.cuda.get_arch_list() if a.startswith("sm_")]
    if sms:
        top = max(sms)
        cap = min(tuple(cap), (top // 10, top % 10))
    return f"{cap[0]}.{cap[1]}"


@dataclass
class BuildSpec:
    """One build: where its sources are, CPU or CUDA, the arch list, and its key."""

    csrc: Path
    with_cuda: bool
    archs: tuple
    inputs: dict
    key: str
    base_key: str
    gpus: list = field(default_factory=list)
    nvcc: str | None = None
    note: str = ""

    @property
    def key16(self) -> str:
        return self.key[:16]

    @property
    def module_name(self) -> str:
        return f"{cfg.NAME}_{self.key[:12]}"

    @property
    def dirname(self) -> str:
        return f"{cfg.NAME}-{self.key16}"

    def describe(self) -> str:
        if not self.with_cuda:
            return "CPU kernels only"
        return f"CPU and CUDA {self.inputs['torch_cuda']} kernels for {';'.join(self.archs)}"


def build_spec(archs: str | None = None, cpu: bool = False, rt: dict | None = None) -> BuildSpec:
    """The build this process would make: CUDA when torch has CUDA, a GPU (or an arch list) and nvcc.

    ``archs`` (``python -m childopt build --archs``) or CHILDOPT_CUDA_ARCHS choose the arch list;
    otherwise it is the visible GPUs' archs with ``+PTX`` on the highest.  ``cpu`` forces a
    CPU-only build.
    """
    csrc = csrc_dir()
    if csrc is None:
        raise ExtensionUnavailable(
            f"the C++ sources of childopt._C are not installed (no csrc/ in {PACKAGE_DIR} or beside it); "
            "reinstall childopt from a source distribution or a checkout")
    rt = rt if rt is not None else runtime(csrc)
    has_cuda_torch = bool(rt["torch_cuda"]) and not rt["torch_hip"]
    env_archs = os.environ.get("CHILDOPT_CUDA_ARCHS", "").strip()
    with_cuda, chosen, note = False, (), ""
    if cpu:
        note = "CPU-only build asked for"
    elif archs is not None or env_archs:
        source = "--archs" if archs is not None else "CHILDOPT_CUDA_ARCHS"
        # Without CUDA in torch the variable means nothing here (an environment shared with GPU jobs), so
        # even a value that does not parse is only noted; with CUDA a bad value is an error naming it.
        if has_cuda_torch or archs is not None:
            try:
                parsed = cfg.parse_archs(archs if archs is not None else env_archs)
            except ValueError as exc:
                raise ExtensionUnavailable(f"{source}: {exc}") from None
            if not parsed:
                raise ExtensionUnavailable(f"{source} names no CUDA arch")
        if not has_cuda_torch or not rt["nvcc"]:
            why = "torch has no CUDA" if not has_cuda_torch else "nvcc was not found (set CUDA_HOME)"
            if archs is not None:
                raise ExtensionUnavailable(f"cannot build CUDA kernels for {archs}: {why}")
            note = f"CHILDOPT_CUDA_ARCHS={env_archs} ignored: {why}; building CPU kernels only"
            warn_once(("archs", note), f"childopt: {note}")
        else:
            with_cuda, chosen = True, cfg.finalize_archs(parsed)
    elif has_cuda_torch and rt["gpus"]:
        if rt["nvcc"]:
            with_cuda, chosen = True, cfg.finalize_archs(_clamp_to_torch(c) for c in rt["gpus"])
        else:
            note = ("torch has CUDA and a GPU is visible, but nvcc was not found (set CUDA_HOME): childopt._C is "
                    "built with CPU kernels only, and CUDA tensors use the Triton backend")
            warn_once(("nonvcc",), f"childopt: {note}")
    nvcc_version = cfg.tool_version(rt["nvcc"]) if with_cuda else None
    torch_part = {k: rt[k] for k in ("torch_version", "torch_git", "torch_cuda", "torch_hip", "cxx11_abi",
                                       "openmp")}
    inputs = cfg.key_inputs(torch_part, rt["sources"], with_cuda, chosen, nvcc_version)
    key, base_key = cfg.keys(inputs)
    return BuildSpec(csrc=csrc, with_cuda=with_cuda, archs=tuple(inputs["archs"]), inputs=inputs, key=key,
                     base_key=base_key, gpus=list(rt["gpus"]), nvcc=rt["nvcc"] if with_cuda else None, note=note)
