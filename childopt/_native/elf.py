"""A cheap check that a shared object is whole before it is mapped: a truncated one kills the process with SIGBUS.

``dlopen`` maps each loadable segment of the file; pages past the end of a truncated file are
not backed, so the first touch during relocation raises SIGBUS, which no Python code can catch.
A checksum catches that for published builds, but a build whose record was rewritten to match,
or a prebuilt module (which has no checksum), still reaches dlopen.  This reads only the ELF
header and the program headers: every table and every PT_LOAD segment must lie inside the file.
Written here rather than with pyelftools: a few struct reads do not justify a dependency, and the
check must never raise on any input.
"""
from __future__ import annotations

import os
import struct
from pathlib import Path

PT_LOAD = 1
# (ELF header after e_ident, one program header) layouts by EI_CLASS: 1 = 32-bit, 2 = 64-bit.
_HEADER = {1: "HHIIIIIHHHHHH", 2: "HHIQQQIHHHHHH"}
_PROGRAM = {1: "IIIIIIII", 2: "IIQQQQQQ"}


def _tables(head: bytes, cls: int, end: str) -> tuple[int, int, int, int, int, int]:
    """(phoff, phentsize, phnum, shoff, shentsize, shnum) from an ELF header."""
    fields = struct.unpack_from(end + _HEADER[cls], head, 16)
    _, _, _, _, phoff, shoff, _, _, phentsize, phnum, shentsize, shnum, _ = fields
    return phoff, phentsize, phnum, shoff, shentsize, shnum


def _load_segments(data: bytes, cls: int, end: str, phentsize: int, phnum: int) -> list[tuple[int, int]]:
    """(offset, size in the file) of every PT_LOAD program header."""
    out = []
    for i in range(phnum):
        fields = struct.unpack_from(end + _PROGRAM[cls], data, i * phentsize)
        p_type, offset, filesz = (fields[0], fields[2], fields[5]) if cls == 2 else (fields[0], fields[1], fields[4])
        if p_type == PT_LOAD:
            out.append((offset, filesz))
    return out


def elf_problem(path: Path) -> str | None:
    """Why the shared object at ``path`` must not be mapped (not ELF, or cut short), or None when it looks whole."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(64)
            if len(head) < 16 or head[:4] != b"\x7fELF":
                return "it is not an ELF shared object"
            cls, end = head[4], {1: "<", 2: ">"}.get(head[5])
            if cls not in _HEADER or end is None:
                return "its ELF header is invalid"
            if len(head) < 16 + struct.calcsize(end + _HEADER[cls]):
                return f"it is cut short ({size} bytes, less than an ELF header)"
            phoff, phentsize, phnum, shoff, shentsize, shnum = _tables(head, cls, end)
            if phentsize < struct.calcsize(end + _PROGRAM[cls]) or phnum == 0:
                return "its ELF header records no program headers"
            if phoff + phentsize * phnum > size or (shoff and shoff + shentsize * shnum > size):
                return f"it is cut short ({size} bytes; its ELF header records tables beyond that)"
            f.seek(phoff)
            data = f.read(phentsize * phnum)
    except OSError as exc:
        return f"it cannot be read ({exc.strerror or exc})"
    for offset, filesz in _load_segments(data, cls, end, phentsize, phnum):
        if offset + filesz > size:
            return f"it is cut short ({size} bytes; a loadable segment ends at byte {offset + filesz})"
    return None
