"""The driver side of a split virtqueue, played in plain memory (rust-vmm virtio-queue's
``mock.rs``): lay out the rings, post descriptor chains -- well-formed or not -- and read
back what the device returned, so the device can be tested without a guest.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from emulator.devices.virtio.queue import (
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    SplitQueue,
)
from emulator.memory import GuestMemory

_DESC = struct.Struct("<QIHH")


@dataclass(frozen=True)
class Buf:
    """One buffer of a chain to post: where, how long, device-writable or not."""

    addr: int
    length: int
    write: bool = False


class MockDriver:
    """A driver for one queue: descriptor table, avail ring and used ring in ``memory``."""

    def __init__(self, memory: GuestMemory, size: int = 16, *, base: int = 0x1000,
                 data_base: int = 0x10000) -> None:
        self.memory = memory
        self.size = size
        self.desc_table = base
        self.avail_ring = base + 16 * size
        self.avail_ring += -self.avail_ring % 2
        self.used_ring = self.avail_ring + 6 + 2 * size
        self.used_ring += -self.used_ring % 4
        self.end = self.used_ring + 6 + 8 * size
        self._next_data = data_base
        self._next_desc = 0
        self.avail_idx = 0
        self.last_used = 0

    def queue(self, *, event_idx: bool = False, indirect: bool = True,
              max_size: int | None = None) -> SplitQueue:
        """A device-side queue configured as a driver would through the transport."""
        queue = SplitQueue(max_size or self.size)
        self.configure(queue)
        queue.activate(event_idx=event_idx, indirect=indirect)
        return queue

    def configure(self, queue: SplitQueue) -> None:
        """Point a device's queue at this driver's rings, as the transport registers do."""
        queue.size = self.size
        queue.desc_table = self.desc_table
        queue.avail_ring = self.avail_ring
        queue.used_ring = self.used_ring
        queue.ready = True

    # -- memory for buffers -----------------------------------------------------------------------

    def alloc(self, length: int, fill: bytes | None = None) -> int:
        """Reserve ``length`` bytes of guest memory for a buffer (16-byte aligned)."""
        addr = self._next_data
        self._next_data += length + (-length % 16)
        if fill is not None:
            self.memory.write(addr, fill)
        return addr

    # -- posting chains ----------------------------------------------------------------------------

    def write_descriptor(self, table: int, index: int, addr: int, length: int, flags: int,
                         next_index: int = 0) -> None:
        self.memory.write(table + 16 * index, _DESC.pack(addr, length, flags, next_index))

    def _take_descriptors(self, count: int) -> list[int]:
        indexes = [(self._next_desc + i) % self.size for i in range(count)]
        self._next_desc = (self._next_desc + count) % self.size
        return indexes

    def add_chain(self, buffers: list[Buf], *, indirect: bool = False) -> int:
        """Post a chain (optionally through one indirect table); returns its head index."""
        if indirect:
            table = self.alloc(16 * len(buffers))
            for i, buf in enumerate(buffers):
                flags = (VIRTQ_DESC_F_WRITE if buf.write else 0) | (
                    VIRTQ_DESC_F_NEXT if i + 1 < len(buffers) else 0)
                self.write_descriptor(table, i, buf.addr, buf.length, flags, i + 1)
            (head,) = self._take_descriptors(1)
            self.write_descriptor(self.desc_table, head, table, 16 * len(buffers),
                                  VIRTQ_DESC_F_INDIRECT)
        else:
            indexes = self._take_descriptors(len(buffers))
            head = indexes[0]
            for i, (index, buf) in enumerate(zip(indexes, buffers, strict=True)):
                last = i + 1 == len(buffers)
                flags = (VIRTQ_DESC_F_WRITE if buf.write else 0) | (0 if last else
                                                                    VIRTQ_DESC_F_NEXT)
                self.write_descriptor(self.desc_table, index, buf.addr, buf.length, flags,
                                      0 if last else indexes[i + 1])
        self.publish(head)
        return head

    def publish(self, head: int) -> None:
        """Put ``head`` in the available ring and move the index."""
        slot = self.avail_ring + 4 + 2 * (self.avail_idx % self.size)
        self.memory.write_u16(slot, head)
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self.memory.write_u16(self.avail_ring + 2, self.avail_idx)

    def set_avail_idx(self, value: int) -> None:
        self.avail_idx = value & 0xFFFF
        self.memory.write_u16(self.avail_ring + 2, self.avail_idx)

    # -- notification suppression ------------------------------------------------------------------

    def set_used_event(self, value: int) -> None:
        self.memory.write_u16(self.avail_ring + 4 + 2 * self.size, value)

    def set_avail_flags(self, flags: int) -> None:
        self.memory.write_u16(self.avail_ring, flags)

    def avail_event(self) -> int:
        return self.memory.read_u16(self.used_ring + 4 + 8 * self.size)

    def used_flags(self) -> int:
        return self.memory.read_u16(self.used_ring)

    # -- what the device returned ------------------------------------------------------------------

    def used_idx(self) -> int:
        return self.memory.read_u16(self.used_ring + 2)

    def pop_used(self) -> list[tuple[int, int]]:
        """New used elements ``(head, length)`` since the last call."""
        out = []
        idx = self.used_idx()
        while self.last_used != idx:
            slot = self.used_ring + 4 + 8 * (self.last_used % self.size)
            out.append((self.memory.read_u32(slot), self.memory.read_u32(slot + 4)))
            self.last_used = (self.last_used + 1) & 0xFFFF
        return out
