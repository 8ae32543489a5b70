"""The virtio-mmio register file, driven the way Linux's virtio_mmio driver probes a device."""

from __future__ import annotations

import struct

import pytest

from emulator.devices.eventfd import EventFd
from emulator.devices.irq import RecordingLine
from emulator.devices.virtio.device import (
    STATUS_ACKNOWLEDGE,
    STATUS_DEVICE_NEEDS_RESET,
    STATUS_DRIVER,
    STATUS_DRIVER_OK,
    STATUS_FEATURES_OK,
    VIRTIO_F_EVENT_IDX,
    VIRTIO_F_VERSION_1,
    VirtioCounters,
    VirtioDevice,
)
from emulator.devices.virtio.mmio import MmioTransport
from emulator.memory import GuestMemory
from tests.emulator.devices.virtio.mock import MockDriver


class Dummy(VirtioDevice):
    device_type = 42

    def __init__(self) -> None:
        super().__init__([16], VirtioCounters())
        self.avail_features |= VIRTIO_F_EVENT_IDX | 1

    def config_bytes(self) -> bytes:
        return bytes(range(8))


class Guest:
    """Register accesses as a driver makes them."""

    def __init__(self) -> None:
        self.memory = GuestMemory.for_tests(1 << 20)
        self.device = Dummy()
        self.line = RecordingLine()
        self.kick = EventFd()
        self.mmio = MmioTransport(self.device, self.memory, self.line, [self.kick])

    def r(self, offset: int) -> int:
        return struct.unpack("<I", self.mmio.read(offset, 4))[0]

    def w(self, offset: int, value: int) -> None:
        self.mmio.write(offset, struct.pack("<I", value))

    def probe(self, features: int, *, queue_size: int = 16) -> int:
        assert self.r(0x000) == 0x74726976
        assert self.r(0x004) == 2
        assert self.r(0x008) == 42
        self.w(0x070, 0)
        self.w(0x070, STATUS_ACKNOWLEDGE)
        self.w(0x070, STATUS_ACKNOWLEDGE | STATUS_DRIVER)
        offered = 0
        for sel in (0, 1):
            self.w(0x014, sel)
            offered |= self.r(0x010) << (32 * sel)
        for sel in (0, 1):
            self.w(0x024, sel)
            self.w(0x020, (features >> (32 * sel)) & 0xFFFFFFFF)
        self.w(0x070, STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK)
        if not self.r(0x070) & STATUS_FEATURES_OK:
            return offered
        driver = MockDriver(self.memory, size=queue_size)
        self.w(0x030, 0)
        assert self.r(0x044) == 0
        assert self.r(0x034) == 16
        self.w(0x038, queue_size)
        for reg, addr in ((0x080, driver.desc_table), (0x090, driver.avail_ring),
                          (0x0A0, driver.used_ring)):
            self.w(reg, addr & 0xFFFFFFFF)
            self.w(reg + 4, addr >> 32)
        self.w(0x044, 1)
        self.w(0x070, STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK)
        return offered


@pytest.fixture
def guest() -> Guest:
    return Guest()


def test_probe_activates_with_negotiated_features(guest: Guest) -> None:
    offered = guest.probe(VIRTIO_F_VERSION_1 | VIRTIO_F_EVENT_IDX)
    assert offered == VIRTIO_F_VERSION_1 | VIRTIO_F_EVENT_IDX | 1
    assert guest.device.active
    assert guest.device.acked_features == VIRTIO_F_VERSION_1 | VIRTIO_F_EVENT_IDX
    assert guest.device.queues[0].event_idx
    assert guest.r(0x070) & STATUS_DRIVER_OK


def test_legacy_driver_is_refused(guest: Guest) -> None:
    guest.probe(VIRTIO_F_EVENT_IDX)  # no VERSION_1
    assert not guest.r(0x070) & STATUS_FEATURES_OK
    assert not guest.device.active


def test_unoffered_feature_is_refused(guest: Guest) -> None:
    guest.probe(VIRTIO_F_VERSION_1 | 1 << 40)
    assert not guest.r(0x070) & STATUS_FEATURES_OK


def test_bad_queue_size_needs_reset(guest: Guest) -> None:
    guest.probe(VIRTIO_F_VERSION_1, queue_size=12)
    assert not guest.device.active
    assert guest.r(0x070) & STATUS_DEVICE_NEEDS_RESET


def test_notify_and_interrupt_ack(guest: Guest) -> None:
    guest.probe(VIRTIO_F_VERSION_1)
    guest.w(0x050, 0)  # QueueNotify reaching user space
    assert guest.kick.read() == 1
    assert guest.device.counters.notify_exits == 1
    guest.w(0x050, 7)  # no such queue: ignored
    assert guest.kick.read() == 0
    guest.mmio.signal_used_queue()
    assert guest.line.pulses == 1
    assert guest.r(0x060) == 1
    guest.w(0x064, 1)
    assert guest.r(0x060) == 0


def test_config_space_and_odd_accesses(guest: Guest) -> None:
    assert guest.mmio.read(0x100, 4) == bytes([0, 1, 2, 3])
    assert guest.mmio.read(0x106, 4) == bytes([6, 7, 0, 0])
    assert guest.mmio.read(0x000, 2) == b"\0\0"  # registers are 32-bit only
    guest.mmio.write(0x070, b"\x01")  # ignored
    assert guest.r(0x070) == 0


def test_reset(guest: Guest) -> None:
    guest.probe(VIRTIO_F_VERSION_1)
    resets = guest.device.counters.resets
    guest.w(0x070, 0)
    assert not guest.device.active
    assert guest.r(0x070) == 0
    assert guest.device.queues[0].ready is False
    assert guest.device.counters.resets == resets + 1
