"""The device side of a virtio 1.x split virtqueue (virtio spec 2.7).

Three structures in guest memory, placed by the driver:

- the *descriptor table*: ``size`` entries of ``{addr: u64, len: u32, flags: u16, next: u16}``;
- the *available ring* (driver -> device): ``flags: u16, idx: u16, ring[size]: u16`` and, with
  ``VIRTIO_F_EVENT_IDX``, ``used_event: u16``;
- the *used ring* (device -> driver): ``flags: u16, idx: u16, ring[size]: {id: u32, len: u32}``
  and, with ``VIRTIO_F_EVENT_IDX``, ``avail_event: u16``.

The guest writes all of it, so nothing read from it is trusted: :meth:`SplitQueue.pop` walks a
chain with every index, length and address checked, bounds the walk (a chain that loops, or
an indirect table inside an indirect table, is refused) and raises
:class:`MalformedChainError` -- which the device counts and answers -- rather than letting the
VMM fail. A fault that makes the whole queue unusable (the available index jumping by more than
the queue size, a head index outside the table) raises :class:`QueueBrokenError`: the device
then asks for a reset, as QEMU's ``virtio_error`` does.

Modelled on rust-vmm ``virtio-queue`` (``queue.rs``, ``chain.rs``); the notification
suppression follows its ``enable_notification``/``needs_notification``, with a full fence
(:mod:`emulator.arch.x86_64.fence`) between storing one side's index and loading the other's.

Completions may be returned in any order and in batches (:meth:`SplitQueue.add_used_batch`):
the elements are written first, then the used index once, so the driver sees a whole batch or
none of it.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from dataclasses import dataclass

from emulator.arch.x86_64 import fence
from emulator.memory import GuestMemory

__all__ = [
    "VIRTQ_DESC_F_INDIRECT",
    "VIRTQ_DESC_F_NEXT",
    "VIRTQ_DESC_F_WRITE",
    "Descriptor",
    "DescriptorChain",
    "MalformedChainError",
    "QueueBrokenError",
    "SplitQueue",
]

#: The buffer continues in the descriptor named by ``next``.
VIRTQ_DESC_F_NEXT = 1
#: The buffer is device-writable (otherwise device-readable).
VIRTQ_DESC_F_WRITE = 2
#: The buffer is a table of descriptors (``VIRTIO_F_INDIRECT_DESC``).
VIRTQ_DESC_F_INDIRECT = 4
#: ``avail.flags``: the driver asks for no interrupts (only without EVENT_IDX).
VRING_AVAIL_F_NO_INTERRUPT = 1
#: ``used.flags``: the device asks for no notifications (only without EVENT_IDX).
VRING_USED_F_NO_NOTIFY = 1

DESCRIPTOR_SIZE = 16
_DESCRIPTOR = struct.Struct("<QIHH")
_USED_ELEM = struct.Struct("<II")


class MalformedChainError(Exception):
    """A descriptor chain that breaks the spec; the chain is consumed and must be answered."""

    def __init__(self, head: int, reason: str) -> None:
        self.head = head
        self.reason = reason
        super().__init__(f"descriptor chain {head}: {reason}")


class QueueBrokenError(Exception):
    """The rings themselves are inconsistent: the device cannot go on with this queue."""


@dataclass(frozen=True, slots=True)
class Descriptor:
    """One buffer of a chain, after validation: wholly inside guest RAM."""

    addr: int
    length: int
    flags: int

    @property
    def is_write_only(self) -> bool:
        return bool(self.flags & VIRTQ_DESC_F_WRITE)


@dataclass(frozen=True, slots=True)
class DescriptorChain:
    """A validated chain: the device-readable buffers, then the device-writable ones.

    Indirect tables are already resolved: ``readable``/``writable`` list the data buffers only.
    """

    head: int
    readable: tuple[Descriptor, ...]
    writable: tuple[Descriptor, ...]

    @property
    def readable_length(self) -> int:
        return sum(d.length for d in self.readable)

    @property
    def writable_length(self) -> int:
        return sum(d.length for d in self.writable)


class SplitQueue:
    """One split virtqueue: its configuration (written through the transport) and its state.

    The transport sets :attr:`size`, the three addresses and :attr:`ready`; when the driver
    sets DRIVER_OK it checks :meth:`validate` and fixes the negotiated ring features.
    """

    def __init__(self, max_size: int) -> None:
        if max_size <= 0 or max_size > 32768 or max_size & (max_size - 1):
            raise ValueError(f"queue size {max_size} is not a power of two up to 32768")
        self.max_size = max_size
        self.reset()

    def reset(self) -> None:
        """Back to the state after a device reset (virtio spec 2.4)."""
        self.size = self.max_size
        self.ready = False
        self.desc_table = 0
        self.avail_ring = 0
        self.used_ring = 0
        self.event_idx = False
        self.indirect = False
        #: Next available-ring slot the device reads (free-running 16-bit index).
        self.next_avail = 0
        #: Next used-ring slot the device writes.
        self.next_used = 0
        #: ``next_used`` when the driver was last interrupted (EVENT_IDX); None: never.
        self._signalled_used: int | None = None

    # -- configuration ------------------------------------------------------------------------

    def validate(self, memory: GuestMemory) -> str | None:
        """Why this queue cannot be used, or None (checked at DRIVER_OK, like rust-vmm's
        ``Queue::is_valid``)."""
        size = self.size
        if size == 0 or size > self.max_size or size & (size - 1):
            return f"queue size {size} is not a power of two up to {self.max_size}"
        areas = (
            ("descriptor table", self.desc_table, 16, DESCRIPTOR_SIZE * size),
            ("available ring", self.avail_ring, 2, 6 + 2 * size),
            ("used ring", self.used_ring, 4, 6 + 8 * size),
        )
        for name, addr, align, length in areas:
            if addr % align:
                return f"{name} at {addr:#x} is not {align}-byte aligned"
            if not memory.contains(addr, length):
                return f"{name} at {addr:#x}+{length:#x} is outside guest RAM"
        return None

    def activate(self, *, event_idx: bool, indirect: bool) -> None:
        self.event_idx = event_idx
        self.indirect = indirect
        self.next_avail = 0
        self.next_used = 0
        self._signalled_used = None

    # -- driver -> device -----------------------------------------------------------------------

    def avail_idx(self, memory: GuestMemory) -> int:
        return memory.read_u16(self.avail_ring + 2)

    def pending(self, memory: GuestMemory) -> int:
        """How many chains the driver has made available and the device not yet taken."""
        pending = (self.avail_idx(memory) - self.next_avail) & 0xFFFF
        if pending > self.size:
            raise QueueBrokenError(
                f"available index moved by {pending} entries in a queue of {self.size}"
            )
        return pending

    def pop(self, memory: GuestMemory) -> DescriptorChain | None:
        """Take the next available chain, validated; None when the ring is empty.

        Raises :class:`MalformedChainError` for a chain that breaks the rules (it is consumed:
        the caller returns its head to the used ring) and :class:`QueueBrokenError` when the
        rings themselves cannot be trusted any more.
        """
        if not self.pending(memory):
            return None
        slot = self.avail_ring + 4 + 2 * (self.next_avail % self.size)
        head = memory.read_u16(slot)
        self.next_avail = (self.next_avail + 1) & 0xFFFF
        if head >= self.size:
            raise QueueBrokenError(f"available ring names descriptor {head} of {self.size}")
        return self._walk(memory, head)

    def _read_descriptor(self, memory: GuestMemory, table: int, index: int) -> tuple[int, ...]:
        return _DESCRIPTOR.unpack(memory.view(table + DESCRIPTOR_SIZE * index, DESCRIPTOR_SIZE))

    def _walk(self, memory: GuestMemory, head: int) -> DescriptorChain:
        readable: list[Descriptor] = []
        writable: list[Descriptor] = []
        # The spec bounds a chain by the queue size (and an indirect table by its length): a
        # longer walk can only be a loop.
        budget = self.size
        table, table_size, index = self.desc_table, self.size, head
        in_indirect = False
        while True:
            budget -= 1
            if budget < 0:
                raise MalformedChainError(head, f"longer than the queue size {self.size} (loop?)")
            addr, length, flags, next_index = self._read_descriptor(memory, table, index)
            if flags & VIRTQ_DESC_F_INDIRECT:
                if in_indirect:
                    raise MalformedChainError(head, "indirect descriptor inside an indirect table")
                if not self.indirect:
                    raise MalformedChainError(head, "indirect descriptor not negotiated")
                if flags & VIRTQ_DESC_F_NEXT:
                    raise MalformedChainError(head, "indirect descriptor with the NEXT flag")
                if length == 0 or length % DESCRIPTOR_SIZE:
                    raise MalformedChainError(
                        head, f"indirect table of {length} bytes is not a multiple of 16"
                    )
                entries = length // DESCRIPTOR_SIZE
                if entries > self.size:
                    raise MalformedChainError(
                        head, f"indirect table of {entries} entries exceeds the queue size"
                    )
                if not memory.contains(addr, length):
                    raise MalformedChainError(
                        head, f"indirect table at {addr:#x}+{length:#x} is outside guest RAM"
                    )
                # The walk goes on in the table and never comes back (no NEXT allowed above):
                # the table's own size bounds it.
                table, table_size, index, budget = addr, entries, 0, entries
                in_indirect = True
                continue
            if not memory.contains(addr, length):
                raise MalformedChainError(
                    head, f"buffer at {addr:#x}+{length:#x} is outside guest RAM"
                )
            descriptor = Descriptor(addr, length, flags)
            if descriptor.is_write_only:
                writable.append(descriptor)
            elif writable:
                raise MalformedChainError(head, "device-readable buffer after a writable one")
            else:
                readable.append(descriptor)
            if not flags & VIRTQ_DESC_F_NEXT:
                return DescriptorChain(head, tuple(readable), tuple(writable))
            if next_index >= table_size:
                raise MalformedChainError(
                    head, f"next descriptor {next_index} is outside a table of {table_size}"
                )
            index = next_index

    # -- device -> driver -----------------------------------------------------------------------

    def go_to_previous_position(self) -> None:
        """Give back the chain taken by the last :meth:`pop`: the next pop returns it again.

        For a device that walked a chain and found no room for it (rust-vmm has the same
        ``go_to_previous_position``); the descriptors stay the driver's until then.
        """
        self.next_avail = (self.next_avail - 1) & 0xFFFF

    def add_used(self, memory: GuestMemory, head: int, length: int) -> None:
        """Return a chain to the driver with ``length`` bytes written into its buffers."""
        self.add_used_batch(memory, ((head, length),))

    def add_used_batch(self, memory: GuestMemory, elements: Iterable[tuple[int, int]]) -> int:
        """Return chains ``(head, length)`` in the order given, published by one index store;
        how many were returned."""
        count = 0
        next_used = self.next_used
        for head, length in elements:
            slot = self.used_ring + 4 + 8 * (next_used % self.size)
            _USED_ELEM.pack_into(memory.view(slot, 8), 0, head, length)
            next_used = (next_used + 1) & 0xFFFF
            count += 1
        if count:
            self.next_used = next_used
            # The elements are stored before the index that publishes them: x86 keeps stores
            # in order (no fence needed, as in rust-vmm), and CPython runs them in program
            # order.
            memory.write_u16(self.used_ring + 2, next_used)
        return count

    def needs_notification(self, memory: GuestMemory) -> bool:
        """Whether the driver wants an interrupt for what was used since the last one.

        With EVENT_IDX: only if ``used_event`` lies in the range of used entries published
        since the last interrupt (``vring_need_event``); without: unless the driver set
        ``VRING_AVAIL_F_NO_INTERRUPT``.
        """
        # The used index was just stored; what follows loads the driver's side. Without a full
        # fence the load may be served before the store is visible: the device reads an old
        # used_event while the driver, re-checking the used index after writing a new
        # used_event, still sees the old index -- both skip, the interrupt is lost.
        fence.full_fence()
        new = self.next_used
        old, self._signalled_used = self._signalled_used, new
        if not self.event_idx:
            return not memory.read_u16(self.avail_ring) & VRING_AVAIL_F_NO_INTERRUPT
        if old is None:
            return True
        used_event = memory.read_u16(self.avail_ring + 4 + 2 * self.size)
        return ((new - used_event - 1) & 0xFFFF) < ((new - old) & 0xFFFF)

    def disable_notification(self, memory: GuestMemory) -> None:
        """Ask the driver not to notify while the device is draining the ring anyway."""
        if not self.event_idx:
            memory.write_u16(self.used_ring, VRING_USED_F_NO_NOTIFY)

    def enable_notification(self, memory: GuestMemory) -> bool:
        """Ask for a notification on the next buffer; True if buffers arrived meanwhile (the
        caller must drain them, as the driver may have skipped its notification)."""
        if self.event_idx:
            memory.write_u16(self.used_ring + 4 + 8 * self.size, self.next_avail)
        else:
            memory.write_u16(self.used_ring, 0)
        # Store then load again (the mirror of needs_notification): the driver stores the
        # avail index, then loads avail_event / the flags. Without the fence both can read the
        # other's old value: the driver skips the notification, the device goes to sleep.
        fence.full_fence()
        return self.pending(memory) > 0
