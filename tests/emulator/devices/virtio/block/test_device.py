"""The virtio-blk device end to end against a simulated driver and a real vdiskfs stack."""

from __future__ import annotations

import os
import struct
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio

from emulator.devices.virtio.block.backend import status_of
from emulator.devices.virtio.block.device import (
    VIRTIO_BLK_F_DISCARD,
    VIRTIO_BLK_F_RO,
    VIRTIO_BLK_F_WRITE_ZEROES,
)
from emulator.devices.virtio.block.request import (
    SEGMENT_F_UNMAP,
    RequestError,
    RequestType,
    Status,
)
from emulator.devices.virtio.device import (
    VIRTIO_F_EVENT_IDX,
)
from emulator.devices.virtio.queue import VIRTQ_DESC_F_NEXT
from tests.emulator.devices.virtio.block.harness import FEATURES, Harness
from tests.emulator.devices.virtio.mock import Buf
from vdiskfs.block.context import OpenOptions, open_image
from vdiskfs.block.node import BlockNode, Buffer
from vdiskfs.errors import HostIOError, UnsupportedError

DISK_SIZE = 1 << 20


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "disk.raw"
    path.write_bytes(os.urandom(DISK_SIZE))
    return path


@pytest.fixture
async def node(image: Path) -> AsyncIterator[BlockNode]:
    node = await open_image(str(image), OpenOptions(read_only=False, format="raw"))
    try:
        yield node
    finally:
        await node.aclose()


async def test_read(node: BlockNode, image: Path) -> None:
    h = Harness(node)
    head, status, data = h.request(RequestType.IN, 3, read=4096, indirect=True)
    await h.device.process_queue()
    assert h.driver.pop_used() == [(head, 4097)]
    assert h.status(status) == Status.OK
    assert h.memory.read(data, 4096) == image.read_bytes()[3 * 512 : 3 * 512 + 4096]
    counters = h.device.stats()
    assert counters["read_requests"] == 1 and counters["read_bytes"] == 4096
    assert counters["interrupts"] == 1 and h.line.pulses == 1
    # The guest's read went through every layer of the stack, and each counted it.
    for _depth, _role, layer in node.walk():
        assert layer.stats_snapshot().as_dict()["rd_bytes"] >= 4096


async def test_write_flush_and_get_id(node: BlockNode, image: Path) -> None:
    h = Harness(node)
    payload = os.urandom(1024)
    _, write_status, _ = h.request(RequestType.OUT, 10, data=payload)
    _, flush_status, _ = h.request(RequestType.FLUSH)
    _, id_status, id_addr = h.request(RequestType.GET_ID, read=20)
    await h.device.process_queue()
    assert [h.status(s) for s in (write_status, flush_status, id_status)] == [0, 0, 0]
    assert image.read_bytes()[5120 : 5120 + 1024] == payload
    assert h.memory.read(id_addr, 20) == b"disk-serial-01234567"
    stats = h.device.stats()
    assert stats["write_requests"] == 1 and stats["write_bytes"] == 1024
    assert stats["flush_requests"] == 1 and stats["get_id_requests"] == 1
    assert node.stats_snapshot().as_dict()["flush_operations"] == 1


async def test_write_zeroes_and_discard(node: BlockNode, image: Path) -> None:
    h = Harness(node)
    segment = struct.pack("<QII", 4, 8, 0)
    _, zero_status, _ = h.request(RequestType.WRITE_ZEROES, data=segment)
    _, discard_status, _ = h.request(RequestType.DISCARD, data=struct.pack("<QII", 100, 8, 0))
    await h.device.process_queue()
    assert h.status(zero_status) == Status.OK and h.status(discard_status) == Status.OK
    assert image.read_bytes()[2048 : 2048 + 4096] == bytes(4096)
    stats = h.device.stats()
    assert stats["write_zeroes_bytes"] == 4096 and stats["discard_bytes"] == 4096


async def test_discard_and_write_zeroes_config_as_linux_reads_it(node: BlockNode) -> None:
    """The fields of ``struct virtio_blk_config`` that Linux 6.1's ``virtblk_probe`` reads to
    enable discard and write-zeroes, at their offsets in ``include/uapi/linux/virtio_blk.h``:
    a zero there means "no limit" to Linux, so each states the limit the device enforces."""
    h = Harness(node)
    assert h.device.avail_features & VIRTIO_BLK_F_DISCARD
    assert h.device.avail_features & VIRTIO_BLK_F_WRITE_ZEROES
    config = h.device.config_bytes()
    assert len(config) == 60  # up to write_zeroes_may_unmap and its padding
    (max_discard_sectors, max_discard_seg, discard_sector_alignment, max_write_zeroes_sectors,
     max_write_zeroes_seg) = struct.unpack_from("<5I", config, 36)
    limits = h.device.limits
    assert max_discard_sectors == max_write_zeroes_sectors == limits.max_segment_sectors > 0
    # Linux caps the segments at 256 (MAX_DISCARD_SEGMENTS) and merges discards up to it.
    assert max_discard_seg == max_write_zeroes_seg == limits.max_segments
    assert 1 < max_discard_seg <= 256
    assert discard_sector_alignment == 1  # discard_granularity: one 512-byte sector
    assert config[56] == 1  # write_zeroes_may_unmap (read by the spec's drivers, not by 6.1)


async def test_multi_range_discard_as_linux_sends_it(node: BlockNode, image: Path) -> None:
    """Linux merges discards into one request of up to max_discard_seg ranges; a write-zeroes
    that may unmap carries VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP. Both reach the stack, range by
    range, and every layer counts them."""
    h = Harness(node)
    segments = h.device.limits.max_segments
    ranges = b"".join(struct.pack("<QII", 16 * i, 8, 0) for i in range(segments))
    _, discard_status, _ = h.request(RequestType.DISCARD, data=ranges)
    _, zero_status, _ = h.request(RequestType.WRITE_ZEROES,
                                  data=struct.pack("<QII", 1024, 64, SEGMENT_F_UNMAP))
    await h.device.process_queue()
    assert h.status(discard_status) == Status.OK and h.status(zero_status) == Status.OK
    data = image.read_bytes()
    assert data[1024 * 512 : 1088 * 512] == bytes(64 * 512)
    stats = h.device.stats()
    assert stats["discard_requests"] == 1 and stats["discard_bytes"] == segments * 4096
    assert stats["write_zeroes_requests"] == 1 and stats["write_zeroes_bytes"] == 64 * 512
    for _depth, _role, layer in node.walk():
        counters = layer.stats_snapshot().as_dict()
        assert counters["unmap_operations"] == segments, layer
        assert counters["unmap_bytes"] == segments * 4096, layer
        assert counters["zero_operations"] == 1 and counters["zero_bytes"] == 64 * 512, layer


async def test_read_only_disk_refuses_writes(node: BlockNode, image: Path) -> None:
    before = image.read_bytes()
    h = Harness(node, read_only=True)
    assert h.device.avail_features & VIRTIO_BLK_F_RO
    assert not h.device.avail_features & VIRTIO_BLK_F_DISCARD
    _, write_status, _ = h.request(RequestType.OUT, 0, data=bytes(512))
    _, zero_status, _ = h.request(RequestType.WRITE_ZEROES, data=struct.pack("<QII", 0, 1, 0))
    await h.device.process_queue()
    assert h.status(write_status) == Status.IOERR and h.status(zero_status) == Status.IOERR
    assert image.read_bytes() == before
    assert h.device.stats()["status_ioerr"] == 2


async def test_out_of_range_and_unknown_requests(node: BlockNode) -> None:
    h = Harness(node)
    _, past_end, _ = h.request(RequestType.IN, DISK_SIZE // 512, read=512)
    _, unknown, _ = h.request(42)
    await h.device.process_queue()
    assert h.status(past_end) == Status.IOERR
    assert h.status(unknown) == Status.UNSUPP
    stats = h.device.stats()
    assert stats["invalid_requests"] == 2 and stats["unsupported_requests"] == 1


class FailingNode(BlockNode):
    """A node whose reads fail on the host and that cannot discard."""

    driver = "failing"

    async def open(self) -> None:
        self.size = DISK_SIZE

    async def _pread(self, offset: int, length: int) -> Buffer:
        raise HostIOError.wrap(OSError(5, "Input/output error"), "failing", "read failed")

    async def _discard(self, offset: int, length: int) -> None:
        raise UnsupportedError("cannot discard", path="failing")


async def test_stack_errors_become_status_bytes() -> None:
    node = FailingNode(read_only=False, label="failing")
    await node.open()
    h = Harness(node)
    _, read_status, _ = h.request(RequestType.IN, 0, read=512)
    _, discard_status, _ = h.request(RequestType.DISCARD, data=struct.pack("<QII", 0, 8, 0))
    await h.device.process_queue()
    assert h.status(read_status) == Status.IOERR
    assert h.status(discard_status) == Status.UNSUPP
    assert h.device.active  # the VMM goes on


def test_status_of() -> None:
    assert status_of(RequestError(Status.UNSUPP, "x")) == Status.UNSUPP
    assert status_of(UnsupportedError("x")) == Status.UNSUPP
    assert status_of(HostIOError("x")) == Status.IOERR


async def test_malformed_chain_is_counted_and_refused(node: BlockNode) -> None:
    h = Harness(node)
    first, first_status, _ = h.request(RequestType.IN, 0, read=512)
    # A chain that loops on itself.
    bad = h.driver.alloc(16)
    loop_head = 8
    h.driver.write_descriptor(h.driver.desc_table, loop_head, bad, 16, VIRTQ_DESC_F_NEXT,
                              loop_head)
    h.driver.publish(loop_head)
    # A chain with no writable byte for a status.
    hdr = h.driver.alloc(16, struct.pack("<IIQ", RequestType.FLUSH, 0, 0))
    no_status = h.driver.add_chain([Buf(hdr, 16)])
    last, last_status, _ = h.request(RequestType.IN, 1, read=512)
    await h.device.process_queue()
    used = dict(h.driver.pop_used())
    assert used == {first: 513, loop_head: 0, no_status: 0, last: 513}
    assert h.status(first_status) == Status.OK and h.status(last_status) == Status.OK
    assert h.device.stats()["malformed_chains"] == 2
    assert h.device.active


async def test_broken_ring_asks_for_reset(node: BlockNode) -> None:
    h = Harness(node)
    h.driver.publish(0)
    h.driver.set_avail_idx(100)  # more entries than the queue has
    await h.device.process_queue()
    assert not h.device.active
    assert h.device.stats()["queue_failures"] == 1


async def test_event_idx_suppresses_interrupts(node: BlockNode) -> None:
    h = Harness(node, features=FEATURES | VIRTIO_F_EVENT_IDX)
    h.request(RequestType.IN, 0, read=512)
    await h.device.process_queue()
    assert h.line.pulses == 1
    # The driver asks to be interrupted only after the 4th next completion.
    h.driver.set_used_event(4)
    for sector in range(3):
        h.request(RequestType.IN, sector, read=512)
    await h.device.process_queue()
    assert h.line.pulses == 1
    h.request(RequestType.IN, 0, read=512)
    await h.device.process_queue()
    assert h.line.pulses == 2
    stats = h.device.stats()
    # One decision per published batch: every batch either interrupted or was suppressed.
    assert stats["interrupts_suppressed"] >= 1
    assert stats["interrupts"] + stats["interrupts_suppressed"] == stats["used_batches"]
    # The device asks to be notified for the next buffer it has not seen.
    assert h.driver.avail_event() == 5


async def test_serve_wakes_on_the_kick_eventfd(node: BlockNode) -> None:
    h = Harness(node)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(h.device.serve, [h.kick])
        head, _, _ = h.request(RequestType.IN, 0, read=512)
        h.kick.write(1)  # what KVM's ioeventfd, or the vCPU thread, does
        with trio.fail_after(5):
            while h.driver.used_idx() == 0:
                await trio.sleep(0.001)
        nursery.cancel_scope.cancel()
    assert h.driver.pop_used() == [(head, 513)]
    assert h.device.stats()["queue_notifications"] == 1
    h.kick.close()
