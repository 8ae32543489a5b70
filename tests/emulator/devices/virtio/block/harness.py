"""A virtio-blk device activated on a mock driver's queue, for the device tests."""

from __future__ import annotations

import struct

from emulator.devices.eventfd import EventFd
from emulator.devices.irq import RecordingLine
from emulator.devices.virtio.block.backend import BlockBackend
from emulator.devices.virtio.block.device import BlockDevice
from emulator.devices.virtio.device import VIRTIO_F_INDIRECT_DESC, VIRTIO_F_VERSION_1
from emulator.devices.virtio.mmio import MmioTransport
from emulator.memory import GuestMemory
from tests.emulator.devices.virtio.mock import Buf, MockDriver
from vdiskfs.block.node import BlockNode

FEATURES = VIRTIO_F_VERSION_1 | VIRTIO_F_INDIRECT_DESC


class Harness:
    """A device activated on a mock driver's queue, with its transport as the interrupt."""

    def __init__(self, node: BlockNode, *, read_only: bool = False,
                 features: int = FEATURES, queue_size: int = 16,
                 memory_size: int = 4 << 20) -> None:
        self.features = features
        self.memory = GuestMemory.for_tests(memory_size)
        self.driver = MockDriver(self.memory, size=queue_size)
        self.backend = BlockBackend(node, read_only=read_only, serial="disk-serial-0123456789")
        self.device = BlockDevice(self.backend, queue_size=queue_size)
        self.line = RecordingLine()
        self.kick = EventFd()
        self.transport = MmioTransport(self.device, self.memory, self.line, [self.kick])
        self.driver.configure(self.device.queues[0])
        self.device.activate(self.memory, self.transport, features)

    def request(self, kind: int, sector: int = 0, *, data: bytes = b"", read: int = 0,
                indirect: bool = False) -> tuple[int, int, int]:
        """Post one request; returns (head, status address, data address)."""
        hdr = self.driver.alloc(16, struct.pack("<IIQ", kind, 0, sector))
        buffers = [Buf(hdr, 16)]
        data_addr = 0
        if data:
            data_addr = self.driver.alloc(len(data), data)
            buffers.append(Buf(data_addr, len(data)))
        if read:
            data_addr = self.driver.alloc(read)
            buffers.append(Buf(data_addr, read, write=True))
        status = self.driver.alloc(1, b"\xff")
        buffers.append(Buf(status, 1, write=True))
        head = self.driver.add_chain(buffers, indirect=indirect)
        return head, status, data_addr

    def status(self, addr: int) -> int:
        return self.memory.read(addr, 1)[0]
