"""Guest RAM: anonymous host memory, guest-physical to host translation, checked accessors.

Guest RAM is one anonymous ``mmap`` per region (two when RAM reaches into the 32-bit MMIO hole,
see :mod:`emulator.arch.x86_64.layout`). KVM maps the same host pages into the guest, so every
access here sees what the guest sees and vice versa.

Everything that reads guest memory on behalf of the guest -- the virtqueue, the virtio-blk
requests -- goes through :meth:`GuestMemory.view`, which refuses any range that is not wholly
inside one region: a descriptor the guest made up can point anywhere, and must never let the VMM
read or write outside guest RAM (rust-vmm's ``vm-memory`` ``GuestMemory`` does the same).
"""

from __future__ import annotations

import bisect
import ctypes
import itertools
import mmap
import struct
from dataclasses import dataclass

__all__ = ["GuestMemory", "GuestMemoryError", "MemoryRegion"]

_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")


class GuestMemoryError(Exception):
    """A guest-physical range that is not backed by guest RAM."""

    def __init__(self, gpa: int, length: int) -> None:
        self.gpa = gpa
        self.length = length
        super().__init__(f"guest range {gpa:#x}+{length:#x} is not in guest RAM")


@dataclass(eq=False)
class MemoryRegion:
    """A run of guest-physical addresses backed by one host buffer."""

    guest_base: int
    size: int
    #: The host memory: an anonymous ``mmap`` for a VM, any writable buffer in unit tests.
    buffer: mmap.mmap | bytearray

    def __post_init__(self) -> None:
        self.view = memoryview(self.buffer)
        if len(self.view) < self.size:
            raise ValueError(f"region buffer of {len(self.view)} bytes is smaller than {self.size}")

    @property
    def guest_end(self) -> int:
        return self.guest_base + self.size

    @property
    def host_address(self) -> int:
        """Host virtual address of the region's first byte (for KVM_SET_USER_MEMORY_REGION)."""
        return ctypes.addressof(ctypes.c_char.from_buffer(self.buffer))


class GuestMemory:
    """The guest's physical memory map: sorted, non-overlapping RAM regions."""

    def __init__(self, regions: list[MemoryRegion]) -> None:
        regions = sorted(regions, key=lambda r: r.guest_base)
        for before, after in itertools.pairwise(regions):
            if before.guest_end > after.guest_base:
                raise ValueError("guest memory regions overlap")
        self.regions = regions
        self._bases = [r.guest_base for r in regions]

    @classmethod
    def anonymous(cls, layout: list[tuple[int, int]]) -> GuestMemory:
        """Allocate ``(guest_base, size)`` regions as private anonymous host memory.

        ``MAP_NORESERVE``: a 4 GiB guest that touches 100 MiB costs the host 100 MiB.
        """
        regions = []
        for base, size in layout:
            buf = mmap.mmap(
                -1,
                size,
                flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_NORESERVE", 0),
                prot=mmap.PROT_READ | mmap.PROT_WRITE,
            )
            regions.append(MemoryRegion(base, size, buf))
        return cls(regions)

    @classmethod
    def for_tests(cls, size: int, base: int = 0) -> GuestMemory:
        """One region of ``size`` bytes backed by a bytearray: no mmap, no KVM."""
        return cls([MemoryRegion(base, size, bytearray(size))])

    @property
    def size(self) -> int:
        """Total bytes of RAM."""
        return sum(r.size for r in self.regions)

    def close(self) -> None:
        """Release the host memory; every view must have been dropped first."""
        for region in self.regions:
            region.view.release()
            if isinstance(region.buffer, mmap.mmap):
                region.buffer.close()

    # -- translation --------------------------------------------------------------------------

    def _region(self, gpa: int, length: int) -> MemoryRegion:
        index = bisect.bisect_right(self._bases, gpa) - 1
        if index >= 0 and length >= 0:
            region = self.regions[index]
            if gpa + length <= region.guest_end:
                return region
        raise GuestMemoryError(gpa, length)

    def contains(self, gpa: int, length: int) -> bool:
        """Whether ``[gpa, gpa + length)`` lies wholly inside one RAM region."""
        try:
            self._region(gpa, length)
        except GuestMemoryError:
            return False
        return True

    def view(self, gpa: int, length: int) -> memoryview:
        """A writable view of guest memory; raises :class:`GuestMemoryError` when out of RAM."""
        region = self._region(gpa, length)
        start = gpa - region.guest_base
        return region.view[start : start + length]

    # -- accessors ----------------------------------------------------------------------------

    def read(self, gpa: int, length: int) -> bytes:
        return bytes(self.view(gpa, length))

    def write(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
        self.view(gpa, len(data))[:] = data

    def fill(self, gpa: int, length: int, byte: int = 0) -> None:
        view = self.view(gpa, length)
        chunk = bytes([byte]) * min(length, 1 << 20)
        for start in range(0, length, len(chunk) or 1):
            n = min(len(chunk), length - start)
            view[start : start + n] = chunk[:n]

    def read_u16(self, gpa: int) -> int:
        value: int = _U16.unpack(self.view(gpa, 2))[0]
        return value

    def read_u32(self, gpa: int) -> int:
        value: int = _U32.unpack(self.view(gpa, 4))[0]
        return value

    def read_u64(self, gpa: int) -> int:
        value: int = _U64.unpack(self.view(gpa, 8))[0]
        return value

    def write_u16(self, gpa: int, value: int) -> None:
        _U16.pack_into(self.view(gpa, 2), 0, value)

    def write_u32(self, gpa: int, value: int) -> None:
        _U32.pack_into(self.view(gpa, 4), 0, value)

    def write_u64(self, gpa: int, value: int) -> None:
        _U64.pack_into(self.view(gpa, 8), 0, value)
