"""Parsing virtio-blk requests from descriptor chains (no I/O)."""

from __future__ import annotations

import struct

import pytest

from emulator.devices.virtio.block.request import (
    Limits,
    RequestError,
    RequestType,
    Segment,
    Status,
    parse_request,
)
from emulator.devices.virtio.queue import DescriptorChain, MalformedChainError
from emulator.memory import GuestMemory
from tests.emulator.devices.virtio.mock import Buf, MockDriver

LIMITS = Limits(capacity_sectors=2048, max_data_bytes=64 * 1024, max_segments=4,
                max_segment_sectors=1024)


class Driver(MockDriver):
    """The mock driver with the device's queue beside it."""

    def __init__(self) -> None:
        super().__init__(GuestMemory.for_tests(1 << 20), size=16)
        self.device_queue = self.queue(indirect=True)


@pytest.fixture
def driver() -> Driver:
    return Driver()


def header(kind: int, sector: int = 0) -> bytes:
    return struct.pack("<IIQ", kind, 0, sector)


def post(driver: Driver, buffers: list[Buf], *, indirect: bool = False) -> DescriptorChain:
    driver.add_chain(buffers, indirect=indirect)
    chain = driver.device_queue.pop(driver.memory)
    assert chain is not None
    return chain


def test_read_request(driver: Driver) -> None:
    hdr = driver.alloc(16, header(RequestType.IN, 8))
    data1, data2 = driver.alloc(512), driver.alloc(1024)
    status = driver.alloc(1)
    chain = post(driver, [Buf(hdr, 16), Buf(data1, 512, True), Buf(data2, 1024, True),
                          Buf(status, 1, True)])
    request = parse_request(driver.memory, chain, LIMITS)
    assert request.type == RequestType.IN
    assert request.offset == 8 * 512
    assert request.data == ((data1, 512), (data2, 1024))
    assert request.data_length == 1536
    assert request.status_addr == status


def test_layout_free_framing(driver: Driver) -> None:
    """Header, data and status may share descriptors (VIRTIO_F_ANY_LAYOUT is implied by 1.x)."""
    out = driver.alloc(16 + 512, header(RequestType.OUT, 2) + b"x" * 512)
    status = driver.alloc(1)
    request = parse_request(driver.memory, post(driver, [Buf(out, 528), Buf(status, 1, True)]),
                            LIMITS)
    assert request.type == RequestType.OUT
    assert request.data == ((out + 16, 512),)
    inbuf = driver.alloc(16, header(RequestType.IN))
    tail = driver.alloc(513)
    request = parse_request(driver.memory, post(driver, [Buf(inbuf, 16),
                                                         Buf(tail, 513, True)]), LIMITS)
    assert request.data == ((tail, 512),)
    assert request.status_addr == tail + 512


def test_get_id_and_flush(driver: Driver) -> None:
    hdr = driver.alloc(16, header(RequestType.GET_ID))
    idbuf = driver.alloc(64)
    request = parse_request(driver.memory, post(driver, [Buf(hdr, 16), Buf(idbuf, 65, True)]),
                            LIMITS)
    assert request.data == ((idbuf, 20),)
    hdr = driver.alloc(16, header(RequestType.FLUSH))
    request = parse_request(driver.memory, post(driver, [Buf(hdr, 16),
                                                         Buf(driver.alloc(1), 1, True)]), LIMITS)
    assert request.type == RequestType.FLUSH and request.data == ()


def test_discard_segments(driver: Driver) -> None:
    segs = struct.pack("<QII", 10, 20, 0) + struct.pack("<QII", 100, 8, 0)
    hdr = driver.alloc(16 + len(segs), header(RequestType.DISCARD) + segs)
    chain = post(driver, [Buf(hdr, 16 + len(segs)), Buf(driver.alloc(1), 1, True)],
                 indirect=True)
    request = parse_request(driver.memory, chain, LIMITS)
    assert request.segments == (Segment(10, 20, 0), Segment(100, 8, 0))


def _refused(driver: Driver, buffers: list[Buf]) -> RequestError:
    with pytest.raises(RequestError) as info:
        parse_request(driver.memory, post(driver, buffers), LIMITS)
    return info.value


@pytest.mark.parametrize(
    ("kind", "sector", "length", "status", "match"),
    [
        (RequestType.IN, 0, 100, Status.IOERR, "not a multiple of 512"),
        (RequestType.IN, 2047, 1024, Status.IOERR, "past the end"),
        (RequestType.OUT, 2048, 512, Status.IOERR, "past the end"),
        (RequestType.IN, 0, 128 * 1024, Status.IOERR, "exceeds the limit"),
        (99, 0, 0, Status.UNSUPP, "type 99"),
    ],
)
def test_refused_requests(driver: Driver, kind: int, sector: int, length: int,
                          status: Status, match: str) -> None:
    hdr = driver.alloc(16, header(kind, sector))
    data = driver.alloc(max(length, 1))
    write = kind != RequestType.OUT
    buffers = [Buf(hdr, 16)]
    if length:
        buffers.append(Buf(data, length, write))
    buffers.append(Buf(driver.alloc(1), 1, True))
    error = _refused(driver, buffers)
    assert error.status == status
    assert match in str(error)


def test_short_header(driver: Driver) -> None:
    error = _refused(driver, [Buf(driver.alloc(8), 8), Buf(driver.alloc(1), 1, True)])
    assert error.status == Status.IOERR


def test_no_status_byte_cannot_be_answered(driver: Driver) -> None:
    hdr = driver.alloc(16, header(RequestType.FLUSH))
    with pytest.raises(MalformedChainError, match="status"):
        parse_request(driver.memory, post(driver, [Buf(hdr, 16)]), LIMITS)
    with pytest.raises(MalformedChainError, match="status"):
        parse_request(driver.memory, post(driver, [Buf(hdr, 16),
                                                   Buf(driver.alloc(1), 0, True)]), LIMITS)


@pytest.mark.parametrize(
    ("segments", "kind", "status", "match"),
    [
        (b"", RequestType.DISCARD, Status.IOERR, "not whole segments"),
        (b"\0" * 15, RequestType.DISCARD, Status.IOERR, "not whole segments"),
        (struct.pack("<QII", 0, 1, 0) * 5, RequestType.DISCARD, Status.IOERR, "5 DISCARD"),
        (struct.pack("<QII", 0, 1, 1), RequestType.DISCARD, Status.UNSUPP, "flags"),
        (struct.pack("<QII", 0, 1, 2), RequestType.WRITE_ZEROES, Status.UNSUPP, "flags"),
        (struct.pack("<QII", 0, 2000, 0), RequestType.WRITE_ZEROES, Status.IOERR, "limit"),
        (struct.pack("<QII", 2000, 100, 0), RequestType.DISCARD, Status.IOERR, "past the end"),
    ],
)
def test_refused_segments(driver: Driver, segments: bytes, kind: RequestType,
                          status: Status, match: str) -> None:
    hdr = driver.alloc(16 + len(segments), header(kind) + segments)
    error = _refused(driver, [Buf(hdr, 16 + len(segments)), Buf(driver.alloc(1), 1, True)])
    assert error.status == status
    assert match in str(error)


def test_write_zeroes_unmap_flag_is_accepted(driver: Driver) -> None:
    segs = struct.pack("<QII", 0, 8, 1)
    hdr = driver.alloc(32, header(RequestType.WRITE_ZEROES) + segs)
    request = parse_request(driver.memory, post(driver, [Buf(hdr, 32),
                                                         Buf(driver.alloc(1), 1, True)]), LIMITS)
    assert request.segments == (Segment(0, 8, 1),)
