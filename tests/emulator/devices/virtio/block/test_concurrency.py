"""virtio-blk with many requests in flight: out-of-order completion, the caps, batched used
ring and interrupts, EVENT_IDX, and a reset with requests still on the stack.

The disk is a :class:`GatedNode`: every read and write parks until the test releases it, so
the test decides which requests finish, in which order, and which finish together.
"""

from __future__ import annotations

import struct
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
import trio
import trio.testing

from emulator.devices.virtio.block import device as device_module
from emulator.devices.virtio.block.request import RequestType, Status
from emulator.devices.virtio.device import VIRTIO_F_EVENT_IDX
from tests.emulator.devices.virtio.block.harness import FEATURES, Harness
from tests.emulator.devices.virtio.mock import MockDriver
from vdiskfs.block.node import BlockNode, Buffer

DISK_SIZE = 4 << 20


class GatedNode(BlockNode):
    """An in-memory disk whose reads and writes wait for :meth:`release`."""

    driver = "gated"

    def __init__(self) -> None:
        super().__init__(read_only=False, label="gated")
        # Every 512-byte sector holds its own number: easy to check what landed where.
        self.data = bytearray(b"".join(struct.pack("<Q", n) * 64
                                       for n in range(DISK_SIZE // 512)))
        #: Requests parked, by offset, in arrival order.
        self.parked: dict[int, trio.Event] = {}
        self.running = 0
        self.max_running = 0
        self.gated = True

    async def open(self) -> None:
        self.size = DISK_SIZE

    async def _gate(self, offset: int) -> None:
        self.running += 1
        self.max_running = max(self.max_running, self.running)
        try:
            if self.gated:
                event = self.parked[offset] = trio.Event()
                await event.wait()
            else:
                await trio.lowlevel.checkpoint()
        finally:
            self.running -= 1

    def release(self, *offsets: int) -> None:
        for offset in offsets:
            self.parked.pop(offset).set()

    def open_gate(self) -> None:
        self.gated = False
        self.release(*list(self.parked))

    async def _pread(self, offset: int, length: int) -> Buffer:
        await self._gate(offset)
        return bytes(self.data[offset : offset + length])

    async def _pwrite(self, offset: int, data: Buffer) -> None:
        await self._gate(offset)
        self.data[offset : offset + len(data)] = data


@pytest.fixture
async def node() -> AsyncIterator[GatedNode]:
    node = GatedNode()
    await node.open()
    try:
        yield node
    finally:
        await node.aclose()


async def _settle() -> None:
    """Let every task run until all of them wait (for the gate, a kick, the test)."""
    await trio.testing.wait_all_tasks_blocked()


def _sector_bytes(sector: int, count: int = 1) -> bytes:
    return b"".join(struct.pack("<Q", n) * 64 for n in range(sector, sector + count))


async def _in_background(nursery: trio.Nursery, fn: Callable[[], Awaitable[None]]) -> trio.Event:
    finished = trio.Event()

    async def run() -> None:
        await fn()
        finished.set()

    nursery.start_soon(run)
    await _settle()
    return finished


async def test_many_chains_complete_out_of_order(node: GatedNode) -> None:
    h = Harness(node, queue_size=32)
    requests = [h.request(RequestType.IN, 8 * i, read=4096, indirect=True) for i in range(24)]
    async with trio.open_nursery() as nursery:
        finished = await _in_background(nursery, h.device.process_queue)
        # All 24 are on the stack at once: nothing was waited for one at a time.
        assert len(node.parked) == 24 and node.max_running == 24
        assert h.device.stats()["in_flight"] == 24
        order = list(reversed(range(24)))
        for i in order:
            node.release(8 * i * 512)
            await _settle()
        assert finished.is_set()
    heads = [head for head, _, _ in requests]
    assert h.driver.pop_used() == [(heads[i], 4097) for i in order]
    for i, (_, status, data) in enumerate(requests):
        assert h.status(status) == Status.OK
        assert h.memory.read(data, 4096) == _sector_bytes(8 * i, 8)
    stats = h.device.stats()
    assert stats["max_in_flight"] == 24 and stats["in_flight"] == 0
    assert stats["in_flight_bytes"] == 0 and stats["max_in_flight_bytes"] == 24 * 4096
    assert stats["read_requests"] == 24 and stats["status_ok"] == 24
    assert stats["used_batches"] == 24 and stats["completions_discarded"] == 0


async def test_writes_run_together_and_land(node: GatedNode) -> None:
    h = Harness(node, queue_size=32)
    payloads = {sector: bytes([sector]) * 1024 for sector in range(0, 160, 16)}
    statuses = [h.request(RequestType.OUT, sector, data=payload, indirect=True)[1]
                for sector, payload in payloads.items()]
    async with trio.open_nursery() as nursery:
        finished = await _in_background(nursery, h.device.process_queue)
        assert len(node.parked) == len(payloads)
        node.open_gate()
        await _settle()
        assert finished.is_set()
    assert [h.status(s) for s in statuses] == [Status.OK] * len(payloads)
    for sector, payload in payloads.items():
        assert node.data[sector * 512 : sector * 512 + 1024] == payload


async def test_chain_cap_leaves_chains_in_the_ring(node: GatedNode) -> None:
    cap = device_module.MAX_IN_FLIGHT
    total = cap + 36
    h = Harness(node, queue_size=128)
    for i in range(total):
        h.request(RequestType.IN, i, read=512, indirect=True)
    queue = h.device.queues[0]
    async with trio.open_nursery() as nursery:
        finished = await _in_background(nursery, h.device.process_queue)
        assert len(node.parked) == cap
        # The rest is still the driver's: not taken from the available ring.
        assert (h.driver.avail_idx - queue.next_avail) & 0xFFFF == total - cap
        assert h.device.stats()["in_flight_cap_waits"] >= 1
        # One completion makes room for exactly one more.
        node.release(0)
        await _settle()
        assert len(node.parked) == cap and 512 * cap in node.parked
        assert (h.driver.avail_idx - queue.next_avail) & 0xFFFF == total - cap - 1
        node.open_gate()
        await _settle()
        assert finished.is_set()
    assert len(h.driver.pop_used()) == total
    stats = h.device.stats()
    assert stats["max_in_flight"] == cap and node.max_running == cap
    assert stats["read_requests"] == total and stats["status_ok"] == total


async def test_byte_cap_and_an_oversized_request_alone(node: GatedNode,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(device_module, "MAX_IN_FLIGHT_BYTES", 64 << 10)
    h = Harness(node, queue_size=32)
    for i in range(10):
        h.request(RequestType.IN, 64 * i, read=16 << 10, indirect=True)
    big_head, big_status, _ = h.request(RequestType.IN, 2048, read=128 << 10, indirect=True)
    async with trio.open_nursery() as nursery:
        finished = await _in_background(nursery, h.device.process_queue)
        assert len(node.parked) == 4  # 4 x 16 KiB fill the 64 KiB
        assert h.device.stats()["in_flight_bytes"] == 64 << 10
        waits = h.device.stats()["in_flight_cap_waits"]
        assert waits >= 1
        node.release(*list(node.parked))
        await _settle()
        assert len(node.parked) == 4
        node.release(*list(node.parked))
        await _settle()
        # Two 16 KiB left; the 128 KiB one does not fit beside them...
        assert len(node.parked) == 2 and 2048 * 512 not in node.parked
        node.release(*list(node.parked))
        await _settle()
        # ...and is served alone once nothing else is in flight: larger than the cap, but a
        # request the device accepts must make progress.
        assert list(node.parked) == [2048 * 512]
        node.release(2048 * 512)
        await _settle()
        assert finished.is_set()
    assert (big_head, (128 << 10) + 1) in h.driver.pop_used()
    assert h.status(big_status) == Status.OK
    stats = h.device.stats()
    assert stats["max_in_flight_bytes"] == 128 << 10 and stats["status_ok"] == 11
    # Chains given back for lack of room were parsed again, but counted once.
    assert stats["read_requests"] == 11 and stats["read_bytes"] == (10 * 16 + 128) << 10
    assert stats["in_flight_cap_waits"] > waits


async def test_one_used_batch_and_one_interrupt_per_turn(node: GatedNode) -> None:
    h = Harness(node)
    for i in range(5):
        h.request(RequestType.IN, i, read=512)
    async with trio.open_nursery() as nursery:
        finished = await _in_background(nursery, h.device.process_queue)
        node.release(*[512 * i for i in (3, 0, 4, 1, 2)])  # all five finish together
        await _settle()
        assert finished.is_set()
    assert [head for head, _ in h.driver.pop_used()] and h.driver.used_idx() == 5
    stats = h.device.stats()
    assert stats["used_batches"] == 1 and stats["max_used_batch"] == 5
    assert h.line.pulses == 1 and stats["interrupts"] == 1


async def test_event_idx_decides_once_per_batch(node: GatedNode) -> None:
    h = Harness(node, features=FEATURES | VIRTIO_F_EVENT_IDX)

    async def batch(count: int, first_sector: int) -> None:
        for i in range(count):
            h.request(RequestType.IN, first_sector + i, read=512)
        async with trio.open_nursery() as nursery:
            finished = await _in_background(nursery, h.device.process_queue)
            node.release(*list(node.parked))
            await _settle()
            assert finished.is_set()

    await batch(1, 0)
    assert h.line.pulses == 1  # the first batch always interrupts
    # Interrupt me once the used index passes 4 (used_event = 4: after the 5th element).
    h.driver.set_used_event(4)
    await batch(3, 10)  # used idx 1 -> 4: not past it
    assert h.line.pulses == 1 and h.device.stats()["interrupts_suppressed"] == 1
    await batch(2, 20)  # 4 -> 6: crosses it, one interrupt for both
    assert h.line.pulses == 2
    stats = h.device.stats()
    assert stats["used_batches"] == 3 and stats["max_used_batch"] == 3
    # The device asked to be kicked for the next chain it has not seen.
    assert h.driver.avail_event() == 6


async def test_kicks_are_served_while_requests_are_in_flight(node: GatedNode) -> None:
    h = Harness(node, features=FEATURES | VIRTIO_F_EVENT_IDX)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(h.device.serve, [h.kick])
        h.request(RequestType.IN, 0, read=512)
        h.request(RequestType.IN, 1, read=512)
        h.kick.write(1)
        await _wait_for(lambda: len(node.parked) == 2)
        # Nothing has completed; a new chain and its kick are still taken at once.
        assert h.driver.avail_event() == 2
        h.request(RequestType.IN, 2, read=512)
        h.kick.write(1)
        await _wait_for(lambda: len(node.parked) == 3)
        node.release(1024, 0, 512)
        await _wait_for(lambda: h.driver.used_idx() == 3)
        nursery.cancel_scope.cancel()
    assert h.device.stats()["max_in_flight"] == 3
    h.kick.close()


async def _wait_for(condition: Callable[[], bool]) -> None:
    # The kick arrives through an eventfd, i.e. I/O: wait_all_tasks_blocked alone is not enough.
    with trio.fail_after(5):
        while not condition():
            await trio.sleep(0.001)


async def test_reset_with_requests_in_flight_writes_nothing_afterwards(
    node: GatedNode,
) -> None:
    h = Harness(node)
    reads = [h.request(RequestType.IN, i, read=512) for i in range(4)]
    _, write_status, _ = h.request(RequestType.OUT, 100, data=b"w" * 512)
    async with trio.open_nursery() as nursery:
        finished = await _in_background(nursery, h.device.process_queue)
        assert len(node.parked) == 5
        # The driver resets the device (a status write of 0, on the vCPU thread).
        await trio.to_thread.run_sync(h.device.reset)
        node.open_gate()
        await _settle()
        assert finished.is_set()
    # The requests ran to their end on the stack (the write is on the disk)...
    assert node.data[100 * 512 : 101 * 512] == b"w" * 512
    # ...but not a byte of their answers reached guest memory.
    assert h.driver.used_idx() == 0
    assert h.status(write_status) == 0xFF
    for _, status, data in reads:
        assert h.status(status) == 0xFF and h.memory.read(data, 512) == bytes(512)
    stats = h.device.stats()
    assert stats["completions_discarded"] == 5 and stats["used_batches"] == 0
    assert stats["in_flight"] == 0 and stats["in_flight_bytes"] == 0
    assert h.line.pulses == 0


async def test_next_generation_waits_for_the_old_one_to_drain(node: GatedNode) -> None:
    h = Harness(node)
    h.request(RequestType.OUT, 7, data=b"o" * 512)  # old generation: an old write
    async with trio.open_nursery() as nursery:
        nursery.start_soon(h.device.serve, [h.kick])
        h.kick.write(1)
        await _wait_for(lambda: list(node.parked) == [7 * 512])
        await trio.to_thread.run_sync(h.device.reset)
        # The driver sets the device up again on new rings and writes the same sector.
        driver = MockDriver(h.memory, size=16, base=0x200000, data_base=0x210000)
        driver.configure(h.device.queues[0])
        h.device.activate(h.memory, h.transport, FEATURES)
        h.driver = driver
        head, status, _ = h.request(RequestType.OUT, 7, data=b"n" * 512)
        h.kick.write(1)
        await _wait_for(lambda: h.device.stats()["queue_notifications"] == 2)
        await _settle()
        # Not started while the old write is on the stack: it could land after the new one.
        assert list(node.parked) == [7 * 512] and h.device.stats()["in_flight"] == 1
        node.release(7 * 512)
        await _settle()
        assert list(node.parked) == [7 * 512]  # now the new one
        node.open_gate()
        await _wait_for(lambda: driver.used_idx() == 1)
        nursery.cancel_scope.cancel()
    assert node.data[7 * 512 : 8 * 512] == b"n" * 512
    assert driver.pop_used() == [(head, 1)] and h.status(status) == Status.OK
    assert h.device.stats()["completions_discarded"] == 1
    h.kick.close()


async def test_cancelled_with_requests_in_flight_leaves_nothing_in_flight(
    node: GatedNode,
) -> None:
    h = Harness(node)
    statuses = [h.request(RequestType.IN, i, read=512)[1] for i in range(3)]
    with trio.move_on_after(5) as scope:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(h.device.serve, [h.kick])
            h.kick.write(1)
            await _wait_for(lambda: len(node.parked) == 3)
            nursery.cancel_scope.cancel()  # the VMM stopping
    assert not scope.cancelled_caught
    stats = h.device.stats()
    assert stats["in_flight"] == 0 and stats["in_flight_bytes"] == 0
    assert node.running == 0 and h.driver.used_idx() == 0
    assert [h.status(s) for s in statuses] == [0xFF] * 3
    h.kick.close()


async def test_one_dispatcher_per_queue(node: GatedNode) -> None:
    h = Harness(node)
    h.request(RequestType.IN, 0, read=512)
    async with trio.open_nursery() as nursery:
        await _in_background(nursery, h.device.process_queue)
        with pytest.raises(RuntimeError, match="already served"):
            await h.device.process_queue()
        node.open_gate()


async def test_reset_before_an_out_payload_is_read_writes_nothing(node: GatedNode) -> None:
    """A reset between taking a write and reading its payload: the guest may already reuse
    those pages, so nothing of them may reach the disk."""
    h = Harness(node)
    before = bytes(node.data[3 * 512 : 4 * 512])
    _, status, _ = h.request(RequestType.OUT, 3, data=b"x" * 512)
    state = h.device._queue_states[0]
    async with trio.open_nursery() as nursery:
        # White-box: one dispatcher turn takes the chain; its task has not run yet.
        h.device._admit(0, state, nursery)
        assert h.device.stats()["in_flight"] == 1
        h.device.reset()
    assert not node.parked and node.max_running == 0  # no I/O was started
    assert bytes(node.data[3 * 512 : 4 * 512]) == before
    h.device._publish(state)
    assert h.status(status) == 0xFF and h.driver.used_idx() == 0
    assert h.device.stats()["completions_discarded"] == 1
