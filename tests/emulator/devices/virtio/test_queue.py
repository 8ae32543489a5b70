"""The split virtqueue against a simulated driver: chains, indirect tables, notification
suppression, and every malformed chain a guest can make."""

from __future__ import annotations

import pytest

from emulator.devices.virtio.queue import (
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    MalformedChainError,
    QueueBrokenError,
    SplitQueue,
)
from emulator.memory import GuestMemory
from tests.emulator.devices.virtio.mock import Buf, MockDriver

MEMORY_SIZE = 1 << 20


@pytest.fixture
def memory() -> GuestMemory:
    return GuestMemory.for_tests(MEMORY_SIZE)


@pytest.fixture
def driver(memory: GuestMemory) -> MockDriver:
    return MockDriver(memory, size=16)


def test_empty_ring_pops_nothing(driver: MockDriver, memory: GuestMemory) -> None:
    assert driver.queue().pop(memory) is None


def test_chain_split_into_readable_and_writable(driver: MockDriver, memory: GuestMemory) -> None:
    queue = driver.queue()
    a, b, c = driver.alloc(16), driver.alloc(512), driver.alloc(1)
    head = driver.add_chain([Buf(a, 16), Buf(b, 512, write=True), Buf(c, 1, write=True)])
    chain = queue.pop(memory)
    assert chain is not None and chain.head == head
    assert [(d.addr, d.length) for d in chain.readable] == [(a, 16)]
    assert [(d.addr, d.length) for d in chain.writable] == [(b, 512), (c, 1)]
    assert chain.readable_length == 16 and chain.writable_length == 513
    assert queue.pop(memory) is None


def test_indirect_chain_is_resolved(driver: MockDriver, memory: GuestMemory) -> None:
    queue = driver.queue(indirect=True)
    bufs = [Buf(driver.alloc(16), 16), Buf(driver.alloc(4096), 4096, write=True),
            Buf(driver.alloc(1), 1, write=True)]
    head = driver.add_chain(bufs, indirect=True)
    chain = queue.pop(memory)
    assert chain is not None and chain.head == head
    assert [(d.addr, d.length) for d in chain.readable + chain.writable] == [
        (b.addr, b.length) for b in bufs
    ]


def test_used_ring_and_wraparound(driver: MockDriver, memory: GuestMemory) -> None:
    queue = driver.queue()
    buf = driver.alloc(8)
    # Three times around the ring, and across the 16-bit index wrap.
    driver.set_avail_idx(0xFFF0)
    queue.next_avail = queue.next_used = 0xFFF0
    driver.last_used = 0xFFF0
    memory.write_u16(driver.used_ring + 2, 0xFFF0)
    for round_ in range(48):
        head = driver.add_chain([Buf(buf, 8, write=True)])
        chain = queue.pop(memory)
        assert chain is not None and chain.head == head
        queue.add_used(memory, chain.head, round_)
        assert driver.pop_used() == [(head, round_)]
    assert driver.used_idx() == (0xFFF0 + 48) & 0xFFFF


# -- malformed chains: counted by the device, never a crash -------------------------------------


def _post_raw(driver: MockDriver, descriptors: list[tuple[int, int, int, int]],
              table: int | None = None, head: int = 0) -> None:
    table = driver.desc_table if table is None else table
    for index, (addr, length, flags, next_index) in enumerate(descriptors):
        driver.write_descriptor(table, index, addr, length, flags, next_index)
    driver.publish(head)


def test_loop_is_refused(driver: MockDriver, memory: GuestMemory) -> None:
    buf = driver.alloc(16)
    _post_raw(driver, [(buf, 16, VIRTQ_DESC_F_NEXT, 1), (buf, 16, VIRTQ_DESC_F_NEXT, 0)])
    queue = driver.queue()
    with pytest.raises(MalformedChainError, match="longer than the queue size") as info:
        queue.pop(memory)
    assert info.value.head == 0
    # The chain was consumed: the queue goes on with the next one.
    assert queue.pop(memory) is None


def test_next_out_of_table_is_refused(driver: MockDriver, memory: GuestMemory) -> None:
    _post_raw(driver, [(driver.alloc(16), 16, VIRTQ_DESC_F_NEXT, 99)])
    with pytest.raises(MalformedChainError, match="outside a table of 16"):
        driver.queue().pop(memory)


def test_buffer_outside_ram_is_refused(driver: MockDriver, memory: GuestMemory) -> None:
    _post_raw(driver, [(MEMORY_SIZE - 8, 16, 0, 0)])
    with pytest.raises(MalformedChainError, match="outside guest RAM"):
        driver.queue().pop(memory)


def test_huge_length_is_refused(driver: MockDriver, memory: GuestMemory) -> None:
    _post_raw(driver, [(0x10000, 0xFFFFFFFF, VIRTQ_DESC_F_WRITE, 0)])
    with pytest.raises(MalformedChainError, match="outside guest RAM"):
        driver.queue().pop(memory)


def test_readable_after_writable_is_refused(driver: MockDriver, memory: GuestMemory) -> None:
    buf = driver.alloc(16)
    _post_raw(driver, [(buf, 16, VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT, 1), (buf, 16, 0, 0)])
    with pytest.raises(MalformedChainError, match="readable buffer after a writable"):
        driver.queue().pop(memory)


def test_indirect_not_negotiated_is_refused(driver: MockDriver, memory: GuestMemory) -> None:
    driver.add_chain([Buf(driver.alloc(16), 16)], indirect=True)
    with pytest.raises(MalformedChainError, match="not negotiated"):
        driver.queue(indirect=False).pop(memory)


@pytest.mark.parametrize(
    ("length", "flags", "match"),
    [
        (0, VIRTQ_DESC_F_INDIRECT, "not a multiple of 16"),
        (24, VIRTQ_DESC_F_INDIRECT, "not a multiple of 16"),
        (16 * 17, VIRTQ_DESC_F_INDIRECT, "exceeds the queue size"),
        (16, VIRTQ_DESC_F_INDIRECT | VIRTQ_DESC_F_NEXT, "with the NEXT flag"),
    ],
)
def test_bad_indirect_descriptor_is_refused(driver: MockDriver, memory: GuestMemory,
                                            length: int, flags: int, match: str) -> None:
    table = driver.alloc(16 * 17)
    _post_raw(driver, [(table, length, flags, 1)])
    with pytest.raises(MalformedChainError, match=match):
        driver.queue().pop(memory)


def test_indirect_table_outside_ram_is_refused(driver: MockDriver, memory: GuestMemory) -> None:
    _post_raw(driver, [(MEMORY_SIZE - 16, 32, VIRTQ_DESC_F_INDIRECT, 0)])
    with pytest.raises(MalformedChainError, match=r"indirect table .* outside guest RAM"):
        driver.queue().pop(memory)


def test_nested_indirect_is_refused(driver: MockDriver, memory: GuestMemory) -> None:
    inner = driver.alloc(16)
    outer = driver.alloc(16)
    driver.write_descriptor(outer, 0, inner, 16, VIRTQ_DESC_F_INDIRECT)
    _post_raw(driver, [(outer, 16, VIRTQ_DESC_F_INDIRECT, 0)])
    with pytest.raises(MalformedChainError, match="inside an indirect table"):
        driver.queue().pop(memory)


def test_loop_inside_indirect_table_is_refused(driver: MockDriver, memory: GuestMemory) -> None:
    table = driver.alloc(32)
    buf = driver.alloc(16)
    driver.write_descriptor(table, 0, buf, 16, VIRTQ_DESC_F_NEXT, 1)
    driver.write_descriptor(table, 1, buf, 16, VIRTQ_DESC_F_NEXT, 0)
    _post_raw(driver, [(table, 32, VIRTQ_DESC_F_INDIRECT, 0)])
    with pytest.raises(MalformedChainError, match="loop"):
        driver.queue().pop(memory)


def test_head_out_of_range_breaks_the_queue(driver: MockDriver, memory: GuestMemory) -> None:
    driver.publish(16)
    with pytest.raises(QueueBrokenError, match="descriptor 16 of 16"):
        driver.queue().pop(memory)


def test_avail_index_jump_breaks_the_queue(driver: MockDriver, memory: GuestMemory) -> None:
    driver.set_avail_idx(17)
    with pytest.raises(QueueBrokenError, match="moved by 17"):
        driver.queue().pop(memory)


# -- notification suppression ----------------------------------------------------------------------


def test_no_interrupt_flag_without_event_idx(driver: MockDriver, memory: GuestMemory) -> None:
    queue = driver.queue(event_idx=False)
    queue.add_used(memory, 0, 0)
    assert queue.needs_notification(memory)
    driver.set_avail_flags(1)  # VRING_AVAIL_F_NO_INTERRUPT
    queue.add_used(memory, 0, 0)
    assert not queue.needs_notification(memory)


def test_event_idx_interrupts_only_when_used_event_is_crossed(
    driver: MockDriver, memory: GuestMemory
) -> None:
    queue = driver.queue(event_idx=True)
    queue.add_used(memory, 0, 0)
    assert queue.needs_notification(memory)  # first time: always
    # The driver wants an interrupt once used index 3 is written (used_event = 2).
    driver.set_used_event(2)
    queue.add_used(memory, 0, 0)  # next_used 2
    assert not queue.needs_notification(memory)
    queue.add_used(memory, 0, 0)  # next_used 3: crosses used_event
    assert queue.needs_notification(memory)
    assert not queue.needs_notification(memory)  # nothing new since


def test_enable_notification_publishes_avail_event(driver: MockDriver,
                                                   memory: GuestMemory) -> None:
    queue = driver.queue(event_idx=True)
    buf = driver.alloc(8)
    driver.add_chain([Buf(buf, 8, write=True)])
    assert queue.enable_notification(memory)  # a buffer is already waiting
    assert queue.pop(memory) is not None
    assert not queue.enable_notification(memory)
    assert driver.avail_event() == 1


def test_no_notify_flag_without_event_idx(driver: MockDriver, memory: GuestMemory) -> None:
    queue = driver.queue(event_idx=False)
    queue.disable_notification(memory)
    assert driver.used_flags() == 1
    queue.enable_notification(memory)
    assert driver.used_flags() == 0


# -- configuration checked at DRIVER_OK ------------------------------------------------------------


def test_validate(driver: MockDriver, memory: GuestMemory) -> None:
    queue = driver.queue()
    assert queue.validate(memory) is None
    queue.size = 12
    assert "power of two" in (queue.validate(memory) or "")
    queue.size = 16
    queue.used_ring += 2
    assert "aligned" in (queue.validate(memory) or "")
    queue.used_ring = MEMORY_SIZE - 8
    assert "outside guest RAM" in (queue.validate(memory) or "")


def test_max_size_must_be_power_of_two() -> None:
    with pytest.raises(ValueError, match="power of two"):
        SplitQueue(100)


# -- the fence between a store and a later load (rust-vmm virtio-queue does the same) ----------


class RecordingMemory(GuestMemory):
    """Guest memory that logs its 16-bit index accesses, in order, into ``log``."""

    def __init__(self, size: int, log: list[str], names: dict[int, str]) -> None:
        super().__init__(GuestMemory.for_tests(size).regions)
        self.log = log
        self.names = names

    def read_u16(self, gpa: int) -> int:
        if gpa in self.names:
            self.log.append(f"load {self.names[gpa]}")
        return super().read_u16(gpa)

    def write_u16(self, gpa: int, value: int) -> None:
        if gpa in self.names:
            self.log.append(f"store {self.names[gpa]}")
        super().write_u16(gpa, value)


def _recording(monkeypatch: pytest.MonkeyPatch) -> tuple[MockDriver, RecordingMemory, list[str]]:
    from emulator.arch.x86_64 import fence

    log: list[str] = []
    memory = RecordingMemory(MEMORY_SIZE, log, {})
    driver = MockDriver(memory, size=16)
    memory.names.update({
        driver.avail_ring: "avail.flags",
        driver.avail_ring + 2: "avail.idx",
        driver.avail_ring + 4 + 2 * driver.size: "used_event",
        driver.used_ring: "used.flags",
        driver.used_ring + 2: "used.idx",
        driver.used_ring + 4 + 8 * driver.size: "avail_event",
    })
    monkeypatch.setattr(fence, "full_fence", lambda: log.append("fence"))
    return driver, memory, log


@pytest.mark.parametrize("event_idx", [True, False])
def test_fence_between_used_idx_store_and_used_event_load(
    monkeypatch: pytest.MonkeyPatch, event_idx: bool
) -> None:
    driver, memory, log = _recording(monkeypatch)
    queue = driver.queue(event_idx=event_idx)
    queue.needs_notification(memory)  # past the first-time shortcut
    log.clear()
    queue.add_used_batch(memory, [(0, 0), (1, 0)])
    queue.needs_notification(memory)
    load = "load used_event" if event_idx else "load avail.flags"
    assert log == ["store used.idx", "fence", load]


@pytest.mark.parametrize("event_idx", [True, False])
def test_fence_between_avail_event_store_and_avail_idx_load(
    monkeypatch: pytest.MonkeyPatch, event_idx: bool
) -> None:
    driver, memory, log = _recording(monkeypatch)
    queue = driver.queue(event_idx=event_idx)
    log.clear()
    queue.enable_notification(memory)
    store = "store avail_event" if event_idx else "store used.flags"
    assert log == [store, "fence", "load avail.idx"]


def test_batch_is_published_by_one_index_store(monkeypatch: pytest.MonkeyPatch) -> None:
    driver, memory, log = _recording(monkeypatch)
    queue = driver.queue()
    assert queue.add_used_batch(memory, [(5, 1), (2, 2), (9, 3)]) == 3
    assert log.count("store used.idx") == 1
    assert driver.pop_used() == [(5, 1), (2, 2), (9, 3)]
    assert queue.add_used_batch(memory, []) == 0
    assert log.count("store used.idx") == 1


def test_go_to_previous_position_returns_the_chain_again(driver: MockDriver,
                                                         memory: GuestMemory) -> None:
    queue = driver.queue()
    head = driver.add_chain([Buf(driver.alloc(8), 8, write=True)])
    first = queue.pop(memory)
    assert first is not None and queue.pop(memory) is None
    queue.go_to_previous_position()
    again = queue.pop(memory)
    assert again is not None and again.head == head == first.head
