"""Virtqueue cases: a hostile guest driver against the virtio-blk device, no KVM.

A case is a number (``case.json`` ``params.seed``); :func:`run_virtio_case` turns it into a
guest: RAM of two regions with a hole between them, a small in-memory disk (read-only or not),
a virtio-blk device behind its MMIO transport, activated through the registers as a guest
driver does, and the test suite's :class:`~tests.emulator.devices.virtio.mock.MockDriver`
playing the driver side. Then a few rounds of chains, kicked through the ``QueueNotify``
register, served by ``BlockDevice.serve`` on the trio loop -- the device's public entry points
only, so the harness holds however the device schedules its chains. Each chain is one of:

- **good**: a well-formed request (read, write, flush, get-id, discard, write-zeroes), its
  header, data and status split over descriptors at random, direct or through an indirect
  table: the device must answer OK (IOERR for a write to a read-only disk) with the right used
  length, and a read must return the disk's bytes;
- **bad**: a well-formed chain with a request the device must refuse -- an unknown type, sectors
  past the end, a length that is not whole sectors, bad discard segments: the status must be
  IOERR or UNSUPP;
- **malformed**: a chain that breaks the virtqueue rules -- a loop, ``next`` out of the table,
  buffers outside RAM, across the hole, of huge or zero length, readable after writable, nested
  or flagged indirect tables, no room for a status byte: anything may be answered, nothing may
  break;
- and, now and then, ring-level damage: the available index jumping past the queue size, a head
  outside the table, a head published twice.

After every round: every chain came back (unless the device asked for a reset after ring
damage), no used length exceeds what the chain could hold, and the **guard** holds: guest
memory changed only in the used ring and in device-writable buffers the driver posted, and the
device looked (``GuestMemory.view``) only at the rings and at buffers and tables that some
descriptor names. A violation raises one of the :class:`OracleError` subclasses below, which
the runner reports as an unexpected outcome at the oracle's check.
"""

from __future__ import annotations

import bisect
import itertools
import random
import struct
from dataclasses import dataclass, field
from pathlib import Path

import trio

from emulator.devices.eventfd import EventFd
from emulator.devices.irq import RecordingLine
from emulator.devices.virtio.block.backend import BlockBackend
from emulator.devices.virtio.block.device import BlockDevice
from emulator.devices.virtio.block.request import RequestType, Status
from emulator.devices.virtio.device import (
    STATUS_ACKNOWLEDGE,
    STATUS_DEVICE_NEEDS_RESET,
    STATUS_DRIVER,
    STATUS_DRIVER_OK,
    STATUS_FEATURES_OK,
    VIRTIO_F_EVENT_IDX,
    VIRTIO_F_INDIRECT_DESC,
    VIRTIO_F_VERSION_1,
)
from emulator.devices.virtio.mmio import (
    REG_DRIVER_FEATURES,
    REG_DRIVER_FEATURES_SEL,
    REG_QUEUE_DESC_HIGH,
    REG_QUEUE_DESC_LOW,
    REG_QUEUE_DEVICE_HIGH,
    REG_QUEUE_DEVICE_LOW,
    REG_QUEUE_DRIVER_HIGH,
    REG_QUEUE_DRIVER_LOW,
    REG_QUEUE_NOTIFY,
    REG_QUEUE_NUM,
    REG_QUEUE_READY,
    REG_QUEUE_SEL,
    REG_STATUS,
    MmioTransport,
)
from emulator.devices.virtio.queue import (
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
)
from emulator.memory import GuestMemory, MemoryRegion
from tests.emulator.devices.virtio.mock import MockDriver
from tests.support.fuzz.mutate import CaseSpec
from vdiskfs.block.node import BlockNode, Buffer, NodeKind

__all__ = ["GuardError", "LostChainError", "OracleError", "WrongAnswerError",
           "make_virtio_case", "run_virtio_case"]

KiB = 1024
#: Guest RAM: two regions with a hole between them (a buffer across it is outside RAM).
LOW = (0, 256 * KiB)
HIGH = (512 * KiB, 128 * KiB)
RING_BASE = 0x1000
DATA_BASE = 0x8000
DATA_END = LOW[1]
#: How long a round may take before its missing chains count as lost.
ROUND_TIMEOUT = 3.0
_HEADER = struct.Struct("<IIQ")
_SEGMENT = struct.Struct("<QII")
_DESC = struct.Struct("<QIHH")


class OracleError(AssertionError):
    """The device broke a rule the harness checks."""


class GuardError(OracleError):
    """Guest memory was touched outside the rings and the buffers the driver posted."""


class LostChainError(OracleError):
    """A chain never came back to the used ring."""


class WrongAnswerError(OracleError):
    """A status byte or used length that the request does not allow."""


def make_virtio_case(directory: Path, name: str) -> CaseSpec:
    rng = random.Random(name)
    directory.mkdir(parents=True, exist_ok=True)
    spec = CaseSpec("virtio", "virtio", name, "virtio", params={"seed": rng.getrandbits(48)})
    spec.save(directory)
    return spec


# -- the guest -------------------------------------------------------------------------------------


class GuardedMemory(GuestMemory):
    """Guest RAM that records every range the device views while :attr:`recording`."""

    def __init__(self, regions: list[MemoryRegion]) -> None:
        super().__init__(regions)
        self.recording = False
        self.views: list[tuple[int, int]] = []

    def view(self, gpa: int, length: int) -> memoryview:
        if self.recording and length:
            self.views.append((gpa, length))
        return super().view(gpa, length)

    def snapshot(self) -> list[bytes]:
        return [bytes(r.view) for r in self.regions]


class MemoryDisk(BlockNode):
    """A disk in a bytearray, writable unless ``read_only``."""

    driver = "memory"
    kind = NodeKind.PROTOCOL

    def __init__(self, data: bytearray, *, read_only: bool) -> None:
        super().__init__(read_only=read_only, label="fuzz-disk")
        self.data = data
        self.size = len(data)

    async def _pread(self, offset: int, length: int) -> Buffer:
        return bytes(self.data[offset : offset + length])

    async def _pwrite(self, offset: int, data: Buffer) -> None:
        self.data[offset : offset + len(data)] = data

    async def _zero(self, offset: int, length: int, may_unmap: bool) -> None:
        self.data[offset : offset + length] = bytes(length)


@dataclass
class Plan:
    """One posted chain and what the driver expects back."""

    head: int
    kind: str  # good, bad, malformed
    writable: int = 0
    #: Allowed statuses (good/bad chains) and the exact used length (good chains).
    statuses: tuple[int, ...] = ()
    used_length: int | None = None
    status_addr: int | None = None
    #: A read to compare with the disk: (guest buffers, disk offset).
    read_back: tuple[list[tuple[int, int]], int] | None = None
    writes_disk: bool = False


@dataclass
class Guest:
    rng: random.Random
    memory: GuardedMemory
    driver: MockDriver
    disk: MemoryDisk
    read_only: bool
    indirect: bool
    qsize: int
    plans: list[Plan] = field(default_factory=list)
    free: list[int] = field(default_factory=list)
    next_data: int = DATA_BASE

    # -- guest memory for buffers ---------------------------------------------------------------

    def alloc(self, length: int, fill: bytes | None = None) -> int:
        if self.next_data + length > DATA_END:
            raise _OutOfRoom
        addr = self.next_data
        self.next_data += length + (-length % 16)
        if fill is not None:
            self.memory.write(addr, fill)
        return addr

    def take(self, count: int) -> list[int]:
        if len(self.free) < count:
            raise _OutOfRoom
        taken, self.free = self.free[:count], self.free[count:]
        return taken

    # -- chains ---------------------------------------------------------------------------------

    def post(self, buffers: list[tuple[int, int, bool]], *, indirect: bool) -> int:
        """Post a well-formed chain of ``(addr, length, writable)`` buffers."""
        flags = [(VIRTQ_DESC_F_WRITE if w else 0) for _, _, w in buffers]
        if indirect:
            table = self.alloc(16 * len(buffers))
            for i, (addr, length, _) in enumerate(buffers):
                nxt = VIRTQ_DESC_F_NEXT if i + 1 < len(buffers) else 0
                self.memory.write(table + 16 * i, _DESC.pack(addr, length, flags[i] | nxt, i + 1))
            (head,) = self.take(1)
            self.driver.write_descriptor(self.driver.desc_table, head, table, 16 * len(buffers),
                                         VIRTQ_DESC_F_INDIRECT)
        else:
            indexes = self.take(len(buffers))
            head = indexes[0]
            for i, (index, (addr, length, _)) in enumerate(zip(indexes, buffers, strict=True)):
                last = i + 1 == len(buffers)
                self.driver.write_descriptor(self.driver.desc_table, index, addr, length,
                                             flags[i] | (0 if last else VIRTQ_DESC_F_NEXT),
                                             0 if last else indexes[i + 1])
        self.driver.publish(head)
        return head

    def split(self, addr: int, length: int, writable: bool) -> list[tuple[int, int, bool]]:
        """One buffer as 1-3 descriptors (a device must not assume the split)."""
        if length < 2 or self.rng.random() < 0.5:
            return [(addr, length, writable)]
        cut = sorted(self.rng.sample(range(1, length), min(length - 1, self.rng.choice((1, 2)))))
        edges = [0, *cut, length]
        return [(addr + a, b - a, writable) for a, b in itertools.pairwise(edges)]


class _OutOfRoom(Exception):
    """No descriptors or buffer memory left in this round."""


# -- requests --------------------------------------------------------------------------------------


def _request(g: Guest, kind: str) -> None:
    rng, sectors = g.rng, g.disk.size // 512
    indirect = g.indirect and rng.random() < 0.3
    rtype = rng.choice((RequestType.IN, RequestType.IN, RequestType.OUT, RequestType.FLUSH,
                        RequestType.GET_ID, RequestType.DISCARD, RequestType.WRITE_ZEROES))
    sector, nsect, payload, read_len, statuses = 0, 0, b"", 0, (Status.OK,)
    writes = rtype in (RequestType.OUT, RequestType.DISCARD, RequestType.WRITE_ZEROES)
    if rtype in (RequestType.IN, RequestType.OUT):
        nsect = rng.randint(0, min(8, sectors)) if sectors else 0
        sector = rng.randint(0, sectors - nsect) if sectors else 0
        if rtype == RequestType.OUT:
            payload = rng.randbytes(512 * nsect)
        else:
            read_len = 512 * nsect
    elif rtype in (RequestType.DISCARD, RequestType.WRITE_ZEROES):
        segments = b""
        for _ in range(rng.randint(1, 3)):
            n = rng.randint(0, min(16, sectors)) if sectors else 0
            start = rng.randint(0, sectors - n) if sectors else 0
            flag = 1 if rtype == RequestType.WRITE_ZEROES and rng.random() < 0.5 else 0
            segments += _SEGMENT.pack(start, n, flag)
        payload = segments
    elif rtype == RequestType.GET_ID:
        read_len = rng.choice((20, 20, 8, 64))
    if writes and g.read_only:
        # A write of no sectors to a read-only disk touches nothing: any answer will do.
        statuses = (Status.IOERR, Status.UNSUPP) if payload else (Status.OK, Status.IOERR,
                                                                   Status.UNSUPP)
    if kind == "bad":
        rtype, sector, payload, read_len, statuses = _spoil(g, rtype, sector, payload, read_len)
    header = _HEADER.pack(int(rtype), 0, sector)
    hdr = g.alloc(16, header)
    buffers = g.split(hdr, 16, False)
    if payload:
        buffers += g.split(g.alloc(len(payload), payload), len(payload), False)
    data_addr = g.alloc(read_len) if read_len else 0
    if read_len:
        buffers += g.split(data_addr, read_len, True)
    status = g.alloc(1, b"\xff")
    buffers.append((status, 1, True))
    if read_len and rng.random() < 0.3:
        # Data and status in one writable stream split elsewhere: a 513-byte descriptor.
        buffers = [b for b in buffers if not b[2]]
        whole = g.alloc(read_len + 1, bytes(read_len) + b"\xff")
        data_addr, status = whole, whole + read_len
        buffers.append((whole, read_len + 1, True))
    head = g.post(buffers, indirect=indirect)
    if len(buffers) > g.qsize:
        # Longer than the queue (through an indirect table): the spec forbids it, so the
        # device may refuse it as malformed.
        kind, statuses = "malformed", ()
    used = None
    if kind == "good" and statuses == (Status.OK,):
        used = (min(read_len, 20) if rtype == RequestType.GET_ID else read_len) + 1
    back = ([(data_addr, read_len)], sector * 512) if rtype == RequestType.IN and kind == "good" \
        and read_len else None
    g.plans.append(Plan(head, kind, read_len + 1, statuses, used, status, back,
                        writes_disk=writes))


def _spoil(g: Guest, rtype: RequestType, sector: int, payload: bytes, read_len: int
           ) -> tuple[int, int, bytes, int, tuple[int, ...]]:
    """Make a request the device must refuse (IOERR or UNSUPP)."""
    rng, sectors = g.rng, g.disk.size // 512
    refused = (Status.IOERR, Status.UNSUPP)
    choice = rng.randrange(6)
    if choice == 0:
        return rng.choice((2, 3, 5, 7, 9, 10, 12, 14, 0xFFFF, 1 << 31)), 0, b"", 0, refused
    if choice == 1:
        return RequestType.IN, sectors + rng.choice((0, 1, 1 << 40)), b"", 512, refused
    if choice == 2:
        return RequestType.IN, 0, b"", rng.choice((1, 100, 511, 513)), refused
    if choice == 3:
        return RequestType.OUT, rng.choice((sectors, (1 << 64) - 1)), bytes(512), 0, refused
    if choice == 4:
        bad = _SEGMENT.pack(rng.choice((sectors, (1 << 64) - 8)), 8, 0)
        return RequestType.DISCARD, 0, bad, 0, refused
    segs = rng.choice((_SEGMENT.pack(0, 1, 0xFE), _SEGMENT.pack(0, 1, 0)[:10],
                       _SEGMENT.pack(0, 1, 0) * 17))
    return RequestType.WRITE_ZEROES, 0, segs, 0, refused


def _outside(g: Guest) -> tuple[int, int]:
    """A buffer that is not (wholly) in guest RAM."""
    return g.rng.choice((
        (LOW[1] - 8, 16),  # runs into the hole
        (LOW[1] + 4096, 16),  # in the hole
        (HIGH[0] + HIGH[1] - 1, 2),  # runs past the end of RAM
        (HIGH[0] + HIGH[1], 1),
        ((1 << 64) - 16, 32),  # wraps around
        (0, 0xFFFFFFFF),  # huge
        (DATA_BASE, 0xFFFFFFFF),
    ))


def _malformed(g: Guest) -> None:
    rng, d = g.rng, g.driver
    table = d.desc_table
    hdr = g.alloc(16, _HEADER.pack(RequestType.IN, 0, 0))
    status = g.alloc(513)
    choice = rng.randrange(12)
    writable = 513
    if choice == 0:  # a loop: the last descriptor points back at the head
        idx = g.take(rng.randint(1, 3))
        for i, index in enumerate(idx):
            nxt = idx[(i + 1) % len(idx)]
            d.write_descriptor(table, index, hdr, 16, VIRTQ_DESC_F_NEXT, nxt)
        head = idx[0]
    elif choice == 1:  # next outside the table
        head, second = g.take(2)
        d.write_descriptor(table, head, hdr, 16, VIRTQ_DESC_F_NEXT,
                           rng.choice((g.qsize, g.qsize + 1, 0xFFFF)))
    elif choice == 2:  # a buffer outside RAM (header or status)
        head, second = g.take(2)
        addr, length = _outside(g)
        if rng.random() < 0.5:
            d.write_descriptor(table, head, addr, length, VIRTQ_DESC_F_NEXT, second)
            d.write_descriptor(table, second, status, 1, VIRTQ_DESC_F_WRITE)
        else:
            d.write_descriptor(table, head, hdr, 16, VIRTQ_DESC_F_NEXT, second)
            d.write_descriptor(table, second, addr, length, VIRTQ_DESC_F_WRITE)
    elif choice == 3:  # readable after writable
        head, second, third = g.take(3)
        d.write_descriptor(table, head, hdr, 16, VIRTQ_DESC_F_NEXT, second)
        d.write_descriptor(table, second, status, 512, VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT,
                           third)
        d.write_descriptor(table, third, status + 512, 1, 0)
    elif choice == 4:  # no writable byte at all, or a zero-length one
        head, second = g.take(2)
        d.write_descriptor(table, head, hdr, 16, VIRTQ_DESC_F_NEXT, second)
        d.write_descriptor(table, second, status, 0, rng.choice((0, VIRTQ_DESC_F_WRITE)))
    elif choice == 5:  # zero-length everything
        idx = g.take(rng.randint(1, 3))
        for i, index in enumerate(idx):
            last = i + 1 == len(idx)
            d.write_descriptor(table, index, rng.choice((0, hdr, (1 << 64) - 1)), 0,
                               (0 if last else VIRTQ_DESC_F_NEXT) | rng.choice(
                                   (0, VIRTQ_DESC_F_WRITE)), 0 if last else idx[i + 1])
        head = idx[0]
    elif choice in (6, 7, 8):  # indirect tables: nested, with NEXT, bad length, huge, outside
        (head,) = g.take(1)
        inner = g.alloc(64)
        entries = [(hdr, 16, VIRTQ_DESC_F_NEXT, 1), (status, 513, VIRTQ_DESC_F_WRITE, 0)]
        if choice == 6:
            entries[0] = (inner, 32, VIRTQ_DESC_F_INDIRECT, 0)
        for i, e in enumerate(entries):
            g.memory.write(inner + 16 * i, _DESC.pack(*e))
        addr, length, flags = inner, 32, VIRTQ_DESC_F_INDIRECT
        if choice == 7:
            flags |= VIRTQ_DESC_F_NEXT
            length = rng.choice((32, 0, 17, 15))
        elif choice == 8:
            addr, length = rng.choice((_outside(g), (inner, 16 * 0x10000), (inner, 16 * 4096)))
        d.write_descriptor(table, head, addr, length, flags, rng.randrange(g.qsize))
    elif choice == 9:  # an indirect table full of garbage descriptors
        (head,) = g.take(1)
        n = rng.randint(1, 8)
        garbage = g.alloc(16 * n, rng.randbytes(16 * n))
        d.write_descriptor(table, head, garbage, 16 * n, VIRTQ_DESC_F_INDIRECT)
    elif choice == 10:  # garbage in the main table
        idx = g.take(rng.randint(1, 4))
        for index in idx:
            addr, length, flags, nxt = _DESC.unpack(rng.randbytes(16))
            if rng.random() < 0.5:
                addr, length = rng.choice(((hdr, 16), (status, 513), _outside(g)))
            # ``next`` stays among these descriptors (or leaves the table): a chain that ran
            # into another chain's descriptors would answer in its status byte.
            nxt = rng.choice((*idx, g.qsize + nxt % g.qsize))
            d.write_descriptor(table, index, addr, length, flags & 7, nxt)
        head = idx[0]
    else:  # a status buffer that is also the header (overlapping buffers)
        head, second = g.take(2)
        d.write_descriptor(table, head, hdr, 16, VIRTQ_DESC_F_NEXT, second)
        d.write_descriptor(table, second, hdr, 16, VIRTQ_DESC_F_WRITE)
        writable = 16
    d.publish(head)
    g.plans.append(Plan(head, "malformed", writable=1 << 40 if choice in (9, 10) else writable))


# -- the allowed areas -----------------------------------------------------------------------------


def _allowed(g: Guest) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """(readable, writable) ranges: the rings, and every buffer and indirect table that some
    descriptor of the table names (one level of indirection, as the device may follow)."""
    d, mem = g.driver, g.memory
    rings = [(d.desc_table, 16 * g.qsize), (d.avail_ring, 6 + 2 * g.qsize)]
    used = [(d.used_ring, 6 + 8 * g.qsize)]
    readable, writable = rings + used, list(used)
    for i in range(g.qsize):
        addr, length, flags, _ = _DESC.unpack(GuestMemory.view(mem, d.desc_table + 16 * i, 16))
        readable.append((addr, length))
        if flags & VIRTQ_DESC_F_INDIRECT:
            if mem.contains(addr, length) and length <= 16 * 65536:
                raw = bytes(GuestMemory.view(mem, addr, length - length % 16))
                for a, n, f, _ in _DESC.iter_unpack(raw):
                    readable.append((a, n))
                    if f & VIRTQ_DESC_F_WRITE:
                        writable.append((a, n))
        elif flags & VIRTQ_DESC_F_WRITE:
            writable.append((addr, length))
    return readable, writable


def _merge(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """``(addr, length)`` ranges as sorted, disjoint ``(start, end)`` intervals."""
    merged: list[tuple[int, int]] = []
    for a, n in sorted(r for r in ranges if r[1] > 0):
        if merged and a <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], a + n))
        else:
            merged.append((a, a + n))
    return merged


def _covered(addr: int, length: int, merged: list[tuple[int, int]]) -> bool:
    """Whether ``[addr, addr+length)`` lies inside one of the ``merged`` intervals."""
    i = bisect.bisect_right(merged, (addr, 1 << 80)) - 1
    return i >= 0 and merged[i][0] <= addr and addr + length <= merged[i][1]


def _check_guard(g: Guest, before: list[bytes], readable: list[tuple[int, int]],
                 writable: list[tuple[int, int]]) -> None:
    readable, writable = _merge(readable), _merge(writable)
    for region, old in zip(g.memory.regions, before, strict=True):
        new = bytes(region.view)
        if new == old:
            continue
        for page in range(0, len(new), 4096):
            if new[page : page + 4096] == old[page : page + 4096]:
                continue
            for i in range(page, min(page + 4096, len(new))):
                if new[i] != old[i] and not _covered(region.guest_base + i, 1, writable):
                    raise GuardError(f"guest memory at {region.guest_base + i:#x} changed "
                                     "outside the used ring and the device-writable buffers")
    for gpa, length in g.memory.views:
        if not _covered(gpa, length, readable):
            raise GuardError(f"device viewed guest memory {gpa:#x}+{length:#x}, outside the "
                             "rings and every posted buffer")


# -- one case --------------------------------------------------------------------------------------


def _handshake(transport: MmioTransport, d: MockDriver, qsize: int, features: int) -> None:
    def reg(offset: int, value: int) -> None:
        transport.write(offset, struct.pack("<I", value & 0xFFFFFFFF))

    reg(REG_STATUS, STATUS_ACKNOWLEDGE)
    reg(REG_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER)
    for sel in (0, 1):
        reg(REG_DRIVER_FEATURES_SEL, sel)
        reg(REG_DRIVER_FEATURES, features >> (32 * sel))
    ok = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK
    reg(REG_STATUS, ok)
    reg(REG_QUEUE_SEL, 0)
    reg(REG_QUEUE_NUM, qsize)
    for low, high, addr in ((REG_QUEUE_DESC_LOW, REG_QUEUE_DESC_HIGH, d.desc_table),
                            (REG_QUEUE_DRIVER_LOW, REG_QUEUE_DRIVER_HIGH, d.avail_ring),
                            (REG_QUEUE_DEVICE_LOW, REG_QUEUE_DEVICE_HIGH, d.used_ring)):
        reg(low, addr)
        reg(high, addr >> 32)
    reg(REG_QUEUE_READY, 1)
    reg(REG_STATUS, ok | STATUS_DRIVER_OK)


async def run_virtio_case(params: dict[str, int]) -> None:
    """Run the virtqueue case ``params["seed"]``; raise :class:`OracleError` on a violation."""
    rng = random.Random(params["seed"])
    memory = GuardedMemory([MemoryRegion(LOW[0], LOW[1], bytearray(LOW[1])),
                            MemoryRegion(HIGH[0], HIGH[1], bytearray(HIGH[1]))])
    qsize = rng.choice((1, 2, 4, 8, 16, 16, 32, 64, 256))
    # (The VMM picks the maximum; below 4 the device cannot even advertise seg_max.)
    max_size = max(qsize, 4, rng.choice((qsize, 256)))
    disk_size = rng.choice((0, 512, 4096, 64 * KiB, 64 * KiB + 100, 1 << 20))
    disk = MemoryDisk(bytearray(rng.randbytes(disk_size)), read_only=rng.random() < 0.3)
    read_only = disk.read_only
    features = VIRTIO_F_VERSION_1
    indirect = rng.random() < 0.7
    if indirect:
        features |= VIRTIO_F_INDIRECT_DESC
    if rng.random() < 0.5:
        features |= VIRTIO_F_EVENT_IDX
    backend = BlockBackend(disk, read_only=read_only, serial="fuzz-" + "x" * rng.randrange(30))
    device = BlockDevice(backend, queue_size=max_size)
    driver = MockDriver(memory, size=qsize, base=RING_BASE, data_base=DATA_BASE)
    kick = EventFd()
    transport = MmioTransport(device, memory, RecordingLine(), [kick])
    _handshake(transport, driver, qsize, features)
    if not device.active:
        raise WrongAnswerError(f"a well-formed queue of {qsize} was refused at DRIVER_OK")
    guest = Guest(rng, memory, driver, disk, read_only, indirect, qsize)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(device.serve, [kick])
            for _ in range(rng.randint(1, 3)):
                if not await _round(guest, transport):
                    break
            nursery.cancel_scope.cancel()
    finally:
        kick.close()


async def _round(g: Guest, transport: MmioTransport) -> bool:
    """One round: post, kick, wait, check. False when the device asked for a reset."""
    rng, d = g.rng, g.driver
    g.free = list(range(g.qsize))
    rng.shuffle(g.free)
    g.next_data, g.plans = DATA_BASE, []
    ring_damage = False
    try:
        for _ in range(rng.randint(1, max(1, g.qsize))):
            roll = rng.random()
            _request(g, "good" if roll < 0.45 else "bad") if roll < 0.7 else _malformed(g)
    except _OutOfRoom:
        pass
    published = len(g.plans)
    if g.plans and rng.random() < 0.08:
        ring_damage = True
        damage = rng.randrange(3)
        if damage == 0:
            d.set_avail_idx(d.avail_idx + g.qsize + rng.randint(1, 100))
        elif damage == 1:
            d.publish(rng.choice((g.qsize, 0xFFFF)))
        else:
            d.publish(g.plans[0].head)  # the same chain twice
        published += 1
    readable, writable = _allowed(g)
    before = g.memory.snapshot()
    start_used = d.used_idx()
    g.memory.views.clear()
    g.memory.recording = True
    transport.write(REG_QUEUE_NOTIFY, struct.pack("<I", 0))
    with trio.move_on_after(ROUND_TIMEOUT):
        while ((_raw_u16(g, d.used_ring + 2) - start_used) & 0xFFFF) < published \
                and not transport.status & STATUS_DEVICE_NEEDS_RESET:
            await trio.sleep(0.001)
    g.memory.recording = False
    _check_guard(g, before, readable, writable)
    reset = bool(transport.status & STATUS_DEVICE_NEEDS_RESET)
    if reset and not ring_damage:
        raise WrongAnswerError("the device asked for a reset though the rings were sound")
    used = d.pop_used()
    if not reset and len(used) != published:
        raise LostChainError(f"{published - len(used)} of {published} chains never came back "
                             f"(queue of {g.qsize})")
    _check_answers(g, used, ring_damage)
    return not reset


def _raw_u16(g: Guest, gpa: int) -> int:
    return int(struct.unpack("<H", GuestMemory.view(g.memory, gpa, 2))[0])


def _check_answers(g: Guest, used: list[tuple[int, int]], ring_damage: bool) -> None:
    plans = {p.head: p for p in g.plans}
    heads = [h for h, _ in used]
    wrote = any(p.writes_disk for p in g.plans)
    for head, length in used:
        plan = plans.get(head)
        if plan is None:
            if not ring_damage:
                raise WrongAnswerError(f"used ring names head {head}, which was never posted")
            continue
        if length > plan.writable:
            raise WrongAnswerError(f"chain {head} ({plan.kind}): used length {length} > "
                                   f"{plan.writable} writable bytes")
        if heads.count(head) > 1 or plan.status_addr is None:
            continue
        status = g.memory.read(plan.status_addr, 1)[0]
        if plan.statuses and status not in plan.statuses:
            raise WrongAnswerError(f"chain {head} ({plan.kind}): status {status}, expected one "
                                   f"of {[int(s) for s in plan.statuses]}")
        if plan.used_length is not None and length != plan.used_length:
            raise WrongAnswerError(f"chain {head} ({plan.kind}): used length {length}, expected "
                                   f"{plan.used_length}")
        if plan.read_back and not wrote and status == Status.OK:
            (addr, n), = plan.read_back[0]
            if g.memory.read(addr, n) != bytes(g.disk.data[plan.read_back[1]:][:n]):
                raise WrongAnswerError(f"chain {head}: read returned the wrong bytes")
