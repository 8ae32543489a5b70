"""The e820 memory map handed to the kernel in boot_params."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from emulator.arch.x86_64 import layout

__all__ = ["E820Entry", "E820Type", "memory_map"]


class E820Type(enum.IntEnum):
    RAM = 1
    RESERVED = 2


@dataclass(frozen=True)
class E820Entry:
    addr: int
    size: int
    type: E820Type


def memory_map(ram: list[tuple[int, int]]) -> list[E820Entry]:
    """Usable RAM as the kernel should see it: low memory below the EBDA, then everything from
    1 MiB (the real-mode area and ROM space in between is not RAM to a PC kernel)."""
    entries = [E820Entry(0, layout.EBDA_START, E820Type.RAM)]
    for base, size in ram:
        start = max(base, layout.HIMEM_START)
        end = base + size
        if end > start:
            entries.append(E820Entry(start, end - start, E820Type.RAM))
    return entries
