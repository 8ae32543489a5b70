"""virtio-blk requests: parsing a descriptor chain into a :class:`Request`. No I/O here.

A request is two byte streams over the chain's buffers (virtio spec 5.2.6; a device must not
assume how the driver split them into descriptors):

- device-readable: the 16-byte header ``{type: u32, reserved: u32, sector: u64}``, then the
  data to write (OUT) or the discard / write-zeroes segments;
- device-writable: the data to read (IN, GET_ID), then the one-byte status, last.

Everything the guest controls is checked here, against the disk's geometry too, and a request
that breaks a rule raises :class:`RequestError` with the status the device answers. A chain with
no room for a status byte cannot be answered at all: that is a :class:`MalformedChainError`.
As Firecracker's ``request.rs``: this module only parses.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

from emulator.devices.virtio.queue import Descriptor, DescriptorChain, MalformedChainError
from emulator.memory import GuestMemory

__all__ = [
    "HEADER_SIZE",
    "ID_BYTES",
    "SECTOR_SIZE",
    "Request",
    "RequestError",
    "RequestType",
    "Segment",
    "Status",
    "parse_request",
    "status_address",
]

SECTOR_SIZE = 512
HEADER_SIZE = 16
#: Length of the GET_ID answer (``VIRTIO_BLK_ID_BYTES``).
ID_BYTES = 20
SEGMENT_SIZE = 16
#: ``virtio_blk_discard_write_zeroes.flags``: the device may deallocate (write-zeroes only).
SEGMENT_F_UNMAP = 1

_HEADER = struct.Struct("<IIQ")
_SEGMENT = struct.Struct("<QII")


class RequestType(enum.IntEnum):
    """``virtio_blk_outhdr.type`` values the device implements."""

    IN = 0
    OUT = 1
    FLUSH = 4
    GET_ID = 8
    DISCARD = 11
    WRITE_ZEROES = 13


class Status(enum.IntEnum):
    """The status byte (``VIRTIO_BLK_S_*``)."""

    OK = 0
    IOERR = 1
    UNSUPP = 2


class RequestError(Exception):
    """A request refused before any I/O, with the status byte to answer it with."""

    def __init__(self, status: Status, message: str) -> None:
        self.status = status
        super().__init__(message)


@dataclass(frozen=True, slots=True)
class Segment:
    """One range of a DISCARD or WRITE_ZEROES request."""

    sector: int
    num_sectors: int
    flags: int


@dataclass(frozen=True, slots=True)
class Request:
    """A parsed request: what to do, where, and which guest buffers hold the data."""

    type: int
    sector: int
    #: Guest ranges ``(gpa, length)`` of the data: filled for IN and GET_ID, read for OUT.
    data: tuple[tuple[int, int], ...]
    data_length: int
    segments: tuple[Segment, ...]
    #: Guest address of the status byte.
    status_addr: int

    @property
    def offset(self) -> int:
        return self.sector * SECTOR_SIZE


@dataclass(frozen=True, slots=True)
class Limits:
    """What the device accepts, as it advertised in its configuration space."""

    capacity_sectors: int
    #: Largest IN/OUT payload; larger ones are answered IOERR (bounds the VMM's buffers).
    max_data_bytes: int
    max_segments: int
    max_segment_sectors: int


def _ranges(
    descriptors: tuple[Descriptor, ...], start: int, length: int
) -> tuple[tuple[int, int], ...]:
    """Guest ranges covering bytes ``[start, start + length)`` of the concatenated buffers."""
    out: list[tuple[int, int]] = []
    position = 0
    end = start + length
    for d in descriptors:
        lo = max(start, position)
        hi = min(end, position + d.length)
        if lo < hi:
            out.append((d.addr + lo - position, hi - lo))
        position += d.length
        if position >= end:
            break
    return tuple(out)


def _gather(memory: GuestMemory, ranges: tuple[tuple[int, int], ...]) -> bytes:
    return b"".join(memory.read(addr, length) for addr, length in ranges)


def status_address(chain: DescriptorChain) -> int:
    """Guest address of the status byte: the last device-writable byte of the chain."""
    for d in reversed(chain.writable):
        if d.length:
            return d.addr + d.length - 1
    raise MalformedChainError(chain.head, "no device-writable byte for the status")


def parse_request(memory: GuestMemory, chain: DescriptorChain, limits: Limits) -> Request:
    """Parse and check one request chain.

    Raises :class:`MalformedChainError` when the chain cannot even carry an answer, and
    :class:`RequestError` (with the status to answer) when the request itself is refused.
    """
    status_addr = status_address(chain)
    readable_length = chain.readable_length
    if readable_length < HEADER_SIZE:
        raise RequestError(
            Status.IOERR, f"request header needs {HEADER_SIZE} readable bytes, chain has "
            f"{readable_length}"
        )
    kind, _reserved, sector = _HEADER.unpack(
        _gather(memory, _ranges(chain.readable, 0, HEADER_SIZE))
    )
    writable_data = chain.writable_length - 1  # all but the status byte
    segments: tuple[Segment, ...] = ()
    if kind == RequestType.IN:
        data = _ranges(chain.writable, 0, writable_data)
        _check_io(sector, writable_data, limits)
        length = writable_data
    elif kind == RequestType.OUT:
        length = readable_length - HEADER_SIZE
        data = _ranges(chain.readable, HEADER_SIZE, length)
        _check_io(sector, length, limits)
    elif kind == RequestType.FLUSH:
        data, length = (), 0
    elif kind == RequestType.GET_ID:
        length = min(writable_data, ID_BYTES)
        data = _ranges(chain.writable, 0, length)
    elif kind in (RequestType.DISCARD, RequestType.WRITE_ZEROES):
        segments = _parse_segments(memory, chain, RequestType(kind), limits)
        data, length = (), 0
    else:
        raise RequestError(Status.UNSUPP, f"request type {kind} is not supported")
    return Request(kind, sector, data, length, segments, status_addr)


def _check_io(sector: int, length: int, limits: Limits) -> None:
    if length % SECTOR_SIZE:
        raise RequestError(Status.IOERR, f"data length {length} is not a multiple of 512")
    if length > limits.max_data_bytes:
        raise RequestError(
            Status.IOERR, f"data length {length} exceeds the limit of {limits.max_data_bytes}"
        )
    if sector + length // SECTOR_SIZE > limits.capacity_sectors:
        raise RequestError(
            Status.IOERR, f"sectors {sector}+{length // SECTOR_SIZE} are past the end of the "
            f"disk ({limits.capacity_sectors} sectors)"
        )


def _parse_segments(
    memory: GuestMemory, chain: DescriptorChain, kind: RequestType, limits: Limits
) -> tuple[Segment, ...]:
    payload = chain.readable_length - HEADER_SIZE
    if payload == 0 or payload % SEGMENT_SIZE:
        raise RequestError(
            Status.IOERR, f"{kind.name} payload of {payload} bytes is not whole segments"
        )
    count = payload // SEGMENT_SIZE
    if count > limits.max_segments:
        raise RequestError(
            Status.IOERR, f"{count} {kind.name} segments exceed the limit of {limits.max_segments}"
        )
    raw = _gather(memory, _ranges(chain.readable, HEADER_SIZE, payload))
    segments = []
    allowed_flags = SEGMENT_F_UNMAP if kind == RequestType.WRITE_ZEROES else 0
    for sector, num_sectors, flags in _SEGMENT.iter_unpack(raw):
        if flags & ~allowed_flags:
            raise RequestError(Status.UNSUPP, f"{kind.name} segment flags {flags:#x}")
        if num_sectors > limits.max_segment_sectors:
            raise RequestError(
                Status.IOERR, f"{kind.name} of {num_sectors} sectors exceeds the limit of "
                f"{limits.max_segment_sectors}"
            )
        if sector + num_sectors > limits.capacity_sectors:
            raise RequestError(
                Status.IOERR, f"{kind.name} of sectors {sector}+{num_sectors} is past the end "
                f"of the disk ({limits.capacity_sectors} sectors)"
            )
        segments.append(Segment(sector, num_sectors, flags))
    return tuple(segments)
