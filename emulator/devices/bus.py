"""Port-I/O and MMIO dispatch: which device answers an address the guest touched.

A :class:`Bus` maps non-overlapping ``[base, base + length)`` ranges to devices; the vCPU thread
calls :meth:`Bus.read` / :meth:`Bus.write` for each I/O or MMIO exit with the address, and the
device sees the offset within its range. An address nobody claims reads as all ones (an
unterminated ISA bus) and ignores writes, counted per address for the stats.
"""

from __future__ import annotations

import bisect
from collections import Counter
from dataclasses import dataclass
from typing import Protocol

__all__ = ["Bus", "BusDevice"]


class BusDevice(Protocol):
    """A device on a bus: register reads and writes at an offset within its range."""

    def read(self, offset: int, size: int) -> bytes: ...

    def write(self, offset: int, data: bytes) -> None: ...


@dataclass(frozen=True, slots=True)
class _Range:
    base: int
    length: int
    name: str
    device: BusDevice


class Bus:
    """One address space (port I/O or MMIO)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._ranges: list[_Range] = []
        self._bases: list[int] = []
        #: Accesses per device name; "unclaimed" for addresses nobody answers.
        self.accesses: Counter[str] = Counter()
        #: Unclaimed addresses that were touched, and how often.
        self.unclaimed: Counter[int] = Counter()

    def insert(self, base: int, length: int, name: str, device: BusDevice) -> None:
        if length <= 0:
            raise ValueError("empty bus range")
        index = bisect.bisect_right(self._bases, base)
        if index > 0:
            before = self._ranges[index - 1]
            if before.base + before.length > base:
                raise ValueError(f"{name} at {base:#x} overlaps {before.name}")
        if index < len(self._ranges) and base + length > self._ranges[index].base:
            raise ValueError(f"{name} at {base:#x} overlaps {self._ranges[index].name}")
        self._ranges.insert(index, _Range(base, length, name, device))
        self._bases.insert(index, base)

    def _find(self, address: int, size: int) -> _Range | None:
        index = bisect.bisect_right(self._bases, address) - 1
        if index >= 0:
            entry = self._ranges[index]
            if address + size <= entry.base + entry.length:
                return entry
        return None

    def read(self, address: int, size: int) -> bytes:
        entry = self._find(address, size)
        if entry is None:
            self.accesses["unclaimed"] += 1
            self.unclaimed[address] += 1
            return b"\xff" * size
        self.accesses[entry.name] += 1
        data = entry.device.read(address - entry.base, size)
        return data if len(data) == size else data[:size].ljust(size, b"\0")

    def write(self, address: int, data: bytes) -> None:
        entry = self._find(address, len(data))
        if entry is None:
            self.accesses["unclaimed"] += 1
            self.unclaimed[address] += 1
            return
        self.accesses[entry.name] += 1
        entry.device.write(address - entry.base, data)
