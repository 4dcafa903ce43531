"""The size of the last-level cache, read from the OS, with where the figure came from.

The in-place stream reference (:mod:`childopt.bench.stream`) must run on buffers several times
larger than the last-level cache, or part of its traffic never leaves the cache and the
reference overstates what memory streams.  Sources, in order: Linux sysfs
(``/sys/devices/system/cpu/cpu*/cache/index*/{level,type,size,shared_cpu_list}``: the highest
data or unified level, its size times the number of distinct instances shared by the CPUs this
process may run on: a container pinned to two cores of a many-CCD host reaches one L3), then
``lscpu`` (util-linux >= 2.34 prints the total over instances), then ``getconf
LEVEL3_CACHE_SIZE``.  When none answers the size is "unknown" and :data:`DEFAULT_BYTES` stands
in, large enough for most server CPUs.  On CUDA the last-level cache is the GPU's L2, from
``torch.cuda.get_device_properties``.
"""
from __future__ import annotations

import math
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Collection, Optional

import torch

SYSFS_CPU = Path("/sys/devices/system/cpu")
DEFAULT_BYTES = 256 * 2**20
_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
# ASCII digits, one optional decimal point, nothing number-like after it ("1.2.3K" is no size).
_SIZE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)(?![0-9.])\s*([KMGT]?)(?:i?B)?\b", re.IGNORECASE)
_LSCPU_LINE = re.compile(r"^L(\d+) cache:\s*(.+)$")
_INSTANCES = re.compile(r"\((\d+) instances?\)")


@dataclass(frozen=True)
class CacheSize:
    """``bytes`` of last-level cache (all instances together) and ``source``: where the figure
    came from, or "unknown: ..." with the default used; ``known`` is False for the default.
    ``instance_bytes``: one instance's size (what a core's data can stay in), None when not known."""

    bytes: int
    source: str
    known: bool = True
    instance_bytes: Optional[int] = None


def parse_size(text: str) -> Optional[int]:
    """Bytes of a cache size as sysfs, lscpu or getconf write it ("107520K", "105 MiB (1 instance)",
    "110100480"); binary units, as those tools use.  None for text that holds no size or a zero."""
    match = _SIZE.match(text)
    if match is None:
        return None
    value = float(match.group(1)) * _UNITS[match.group(2).upper()]
    if not math.isfinite(value):  # hundreds of digits
        return None
    return round(value) or None


def from_sysfs(root: Path = SYSFS_CPU, cpus: Optional[Collection[int]] = None) -> Optional[CacheSize]:
    """The highest-level data or unified cache in ``root/cpu*/cache/index*``: one instance's size times
    the number of distinct ``shared_cpu_list`` sets it has among the CPUs (those in ``cpus``, when
    given: a process pinned to a few cores of a many-CCD host reaches only their instances); None
    when sysfs has none."""
    caches = {}  # level -> (size of one instance, the distinct CPU sets sharing an instance)
    for index in sorted(root.glob("cpu[0-9]*/cache/index[0-9]*")):
        if cpus is not None and int(index.parent.parent.name[3:]) not in cpus:
            continue
        try:
            if (index / "type").read_text().strip() == "Instruction":
                continue
            level = int((index / "level").read_text())
            size = parse_size((index / "size").read_text())
            shared = (index / "shared_cpu_list").read_text().strip() if (index / "shared_cpu_list").exists() \
                else index.parent.parent.name
        except (OSError, ValueError):
            continue
        if size is not None:
            caches.setdefault(level, (size, set()))[1].add(shared)
    if not caches:
        return None
    level = max(caches)
    size, instances = caches[level]
    of_cpus = "" if cpus is None else \
        f" (of the {len(cpus)} CPU{'' if len(cpus) == 1 else 's'} this process may run on)"
    return CacheSize(size * len(instances), f"sysfs {root}/cpu*/cache: L{level}, {len(instances)} x {size} B{of_cpus}",
                     instance_bytes=size)


def from_lscpu_text(text: str) -> Optional[CacheSize]:
    """The highest ``L<n> cache:`` line of ``lscpu``'s output ("L1d"/"L1i" lines are skipped): the
    total, and one instance's share where it says "(N instances)" (older lscpu prints one instance)."""
    found = {}
    for line in text.splitlines():
        match = _LSCPU_LINE.match(line.strip())
        if match and parse_size(match.group(2)) is not None:
            count = _INSTANCES.search(match.group(2))
            found[int(match.group(1))] = (parse_size(match.group(2)), int(count.group(1)) if count else 1)
    if not found:
        return None
    level = max(found)
    size, instances = found[level]
    return CacheSize(size, f"lscpu: L{level}", instance_bytes=size // max(instances, 1))


def _command(argv: list[str]) -> Optional[str]:
    """A command's stdout, or None when it is missing or fails."""
    if shutil.which(argv[0]) is None:
        return None
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=20, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None


def allowed_cpus() -> Optional[frozenset]:
    """The CPUs this process may run on (its affinity), None where the OS does not say."""
    try:
        return frozenset(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # macOS and Windows have no sched_getaffinity
        return None


def cpu_llc(root: Path = SYSFS_CPU, cpus: Optional[Collection[int]] = None) -> CacheSize:
    """The CPU's last-level cache from sysfs (counting the instances of ``cpus``, by default the
    CPUs this process may run on), else lscpu, else getconf (which count every instance), else
    the stated default."""
    found = from_sysfs(root, allowed_cpus() if cpus is None else cpus)
    if found is None:
        found = from_lscpu_text(_command(["lscpu"]) or "")
    if found is None:
        size = parse_size(_command(["getconf", "LEVEL3_CACHE_SIZE"]) or "")
        found = CacheSize(size, "getconf LEVEL3_CACHE_SIZE", instance_bytes=size) if size else None
    return found or CacheSize(DEFAULT_BYTES, f"unknown: sysfs, lscpu and getconf gave no size; "
                                             f"assumed {DEFAULT_BYTES // 2**20} MiB", known=False)


def last_level_cache(device: torch.device) -> CacheSize:
    """The last-level cache the step's traffic passes through: the GPU's L2 on CUDA, else the CPU's."""
    if device.type == "cuda":
        size = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0)
        if size:
            return CacheSize(size, "torch.cuda.get_device_properties: L2_cache_size")
        return CacheSize(DEFAULT_BYTES, f"unknown: this torch reports no L2 size; assumed {DEFAULT_BYTES // 2**20} MiB",
                         known=False)
    return cpu_llc()
