"""The virtio-mmio transport, version 2 ("modern"): one device's register file (virtio spec
4.2.2).

The guest finds the device through ``virtio_mmio.device=4K@<base>:<irq>`` on its command line;
every access to the 4 KiB window is an MMIO exit served here, on the vCPU thread -- except
writes to ``QueueNotify`` when an ioeventfd catches them in the kernel. Either way the queue's
:class:`~emulator.devices.eventfd.EventFd` wakes the device on the trio loop.

The interrupt status register is shared with the trio side (the device sets bits as it
completes requests, the driver acknowledges them from the vCPU thread), so it is guarded by a
lock; everything else is only touched by the vCPU thread. Modelled on Firecracker's
``transport/mmio.rs``.
"""

from __future__ import annotations

import logging
import struct
import threading
from collections.abc import Sequence

from emulator.devices.eventfd import EventFd
from emulator.devices.irq import InterruptLine
from emulator.devices.virtio.device import (
    STATUS_ACKNOWLEDGE,
    STATUS_DEVICE_NEEDS_RESET,
    STATUS_DRIVER,
    STATUS_DRIVER_OK,
    STATUS_FAILED,
    STATUS_FEATURES_OK,
    VIRTIO_F_VERSION_1,
    VirtioDevice,
)
from emulator.devices.virtio.queue import SplitQueue
from emulator.memory import GuestMemory

__all__ = ["MMIO_WINDOW_SIZE", "QUEUE_NOTIFY_OFFSET", "MmioTransport"]

log = logging.getLogger(__name__)

#: Size of one device's register window.
MMIO_WINDOW_SIZE = 0x1000
MAGIC_VALUE = 0x74726976  # "virt"
VERSION = 2
#: Vendor ID reported to the guest ("VDFS"); drivers do not look at it.
VENDOR_ID = 0x53464456

# Register offsets.
REG_MAGIC = 0x000
REG_VERSION = 0x004
REG_DEVICE_ID = 0x008
REG_VENDOR_ID = 0x00C
REG_DEVICE_FEATURES = 0x010
REG_DEVICE_FEATURES_SEL = 0x014
REG_DRIVER_FEATURES = 0x020
REG_DRIVER_FEATURES_SEL = 0x024
REG_QUEUE_SEL = 0x030
REG_QUEUE_NUM_MAX = 0x034
REG_QUEUE_NUM = 0x038
REG_QUEUE_READY = 0x044
REG_QUEUE_NOTIFY = 0x050
REG_INTERRUPT_STATUS = 0x060
REG_INTERRUPT_ACK = 0x064
REG_STATUS = 0x070
REG_QUEUE_DESC_LOW = 0x080
REG_QUEUE_DESC_HIGH = 0x084
REG_QUEUE_DRIVER_LOW = 0x090
REG_QUEUE_DRIVER_HIGH = 0x094
REG_QUEUE_DEVICE_LOW = 0x0A0
REG_QUEUE_DEVICE_HIGH = 0x0A4
REG_CONFIG_GENERATION = 0x0FC
CONFIG_SPACE = 0x100
#: Offset of QueueNotify: where an ioeventfd is registered.
QUEUE_NOTIFY_OFFSET = REG_QUEUE_NOTIFY

#: InterruptStatus bits.
INT_USED_RING = 1
INT_CONFIG_CHANGE = 2

_U32 = struct.Struct("<I")


class MmioTransport:
    """Register file of one virtio-mmio device; also the device's :class:`DeviceInterrupt`."""

    def __init__(
        self,
        device: VirtioDevice,
        memory: GuestMemory,
        irq: InterruptLine,
        kicks: Sequence[EventFd],
    ) -> None:
        if len(kicks) != len(device.queues):
            raise ValueError("one kick eventfd per queue")
        self.device = device
        self.memory = memory
        self.irq = irq
        self.kicks = list(kicks)
        self._lock = threading.Lock()
        self._interrupt_status = 0
        self._reset_registers()

    def _reset_registers(self) -> None:
        self.status = 0
        self.device_features_sel = 0
        self.driver_features_sel = 0
        self.driver_features = 0
        self.queue_sel = 0
        with self._lock:
            self._interrupt_status = 0

    # -- the device's interrupt interface (any thread) -----------------------------------------

    def signal_used_queue(self) -> None:
        with self._lock:
            self._interrupt_status |= INT_USED_RING
        self.device.counters.interrupts += 1
        self.irq.pulse()

    def signal_config_change(self) -> None:
        with self._lock:
            self._interrupt_status |= INT_CONFIG_CHANGE
        self.device.counters.config_interrupts += 1
        self.irq.pulse()

    def needs_reset(self, reason: str) -> None:
        """The device cannot go on (its rings are broken): tell the driver, stop serving."""
        log.warning("%s: needs reset: %s", self.device.kind, reason)
        self.device.counters.queue_failures += 1
        self.device.active = False
        self.status |= STATUS_DEVICE_NEEDS_RESET
        if self.status & STATUS_DRIVER_OK:
            self.signal_config_change()

    # -- register access (vCPU thread) ------------------------------------------------------------

    def read(self, offset: int, size: int) -> bytes:
        if offset >= CONFIG_SPACE:
            return self.device.read_config(offset - CONFIG_SPACE, size)
        if size != 4 or offset % 4:
            log.debug("virtio-mmio: %d-byte read of register %#x ignored", size, offset)
            return bytes(size)
        return _U32.pack(self._read_register(offset) & 0xFFFFFFFF)

    def _selected_queue(self) -> SplitQueue | None:
        if self.queue_sel < len(self.device.queues):
            return self.device.queues[self.queue_sel]
        return None

    def _read_register(self, offset: int) -> int:
        queue = self._selected_queue()
        if offset == REG_MAGIC:
            return MAGIC_VALUE
        if offset == REG_VERSION:
            return VERSION
        if offset == REG_DEVICE_ID:
            return self.device.device_type
        if offset == REG_VENDOR_ID:
            return VENDOR_ID
        if offset == REG_DEVICE_FEATURES:
            if self.device_features_sel > 1:
                return 0
            return self.device.avail_features >> (32 * self.device_features_sel)
        if offset == REG_QUEUE_NUM_MAX:
            return queue.max_size if queue else 0
        if offset == REG_QUEUE_READY:
            return int(queue.ready) if queue else 0
        if offset == REG_INTERRUPT_STATUS:
            with self._lock:
                return self._interrupt_status
        if offset == REG_STATUS:
            return self.status
        if offset == REG_CONFIG_GENERATION:
            return 0
        if queue is not None:
            if offset == REG_QUEUE_DESC_LOW:
                return queue.desc_table
            if offset == REG_QUEUE_DESC_HIGH:
                return queue.desc_table >> 32
            if offset == REG_QUEUE_DRIVER_LOW:
                return queue.avail_ring
            if offset == REG_QUEUE_DRIVER_HIGH:
                return queue.avail_ring >> 32
            if offset == REG_QUEUE_DEVICE_LOW:
                return queue.used_ring
            if offset == REG_QUEUE_DEVICE_HIGH:
                return queue.used_ring >> 32
        return 0

    def write(self, offset: int, data: bytes) -> None:
        if offset >= CONFIG_SPACE:
            self.device.write_config(offset - CONFIG_SPACE, data)
            return
        if len(data) != 4 or offset % 4:
            log.debug("virtio-mmio: %d-byte write of register %#x ignored", len(data), offset)
            return
        value = _U32.unpack(data)[0]
        if offset == REG_QUEUE_NOTIFY:
            # Only when no ioeventfd caught it: hand the notification over through the same
            # eventfd the device waits on.
            self.device.counters.notify_exits += 1
            if value < len(self.kicks) and self.device.active:
                self.kicks[value].write(1)
        elif offset == REG_INTERRUPT_ACK:
            with self._lock:
                self._interrupt_status &= ~value
        elif offset == REG_STATUS:
            self._write_status(value)
        elif offset == REG_DEVICE_FEATURES_SEL:
            self.device_features_sel = value
        elif offset == REG_DRIVER_FEATURES_SEL:
            self.driver_features_sel = value
        elif offset == REG_DRIVER_FEATURES:
            self._write_driver_features(value)
        elif offset == REG_QUEUE_SEL:
            self.queue_sel = value
        else:
            self._write_queue_register(offset, value)

    def _write_driver_features(self, value: int) -> None:
        if self.status & STATUS_FEATURES_OK or self.driver_features_sel > 1:
            return
        shift = 32 * self.driver_features_sel
        self.driver_features = (self.driver_features & ~(0xFFFFFFFF << shift)) | (value << shift)

    def _write_queue_register(self, offset: int, value: int) -> None:
        queue = self._selected_queue()
        # Queue layout is fixed once the driver is running (spec 4.2.2.2).
        if queue is None or self.status & STATUS_DRIVER_OK:
            return
        if offset == REG_QUEUE_NUM:
            queue.size = value
        elif offset == REG_QUEUE_READY:
            queue.ready = value == 1
        elif offset == REG_QUEUE_DESC_LOW:
            queue.desc_table = (queue.desc_table & ~0xFFFFFFFF) | value
        elif offset == REG_QUEUE_DESC_HIGH:
            queue.desc_table = (queue.desc_table & 0xFFFFFFFF) | (value << 32)
        elif offset == REG_QUEUE_DRIVER_LOW:
            queue.avail_ring = (queue.avail_ring & ~0xFFFFFFFF) | value
        elif offset == REG_QUEUE_DRIVER_HIGH:
            queue.avail_ring = (queue.avail_ring & 0xFFFFFFFF) | (value << 32)
        elif offset == REG_QUEUE_DEVICE_LOW:
            queue.used_ring = (queue.used_ring & ~0xFFFFFFFF) | value
        elif offset == REG_QUEUE_DEVICE_HIGH:
            queue.used_ring = (queue.used_ring & 0xFFFFFFFF) | (value << 32)

    def _write_status(self, value: int) -> None:
        if value == 0:
            self.device.reset()
            self._reset_registers()
            return
        added = value & ~self.status
        if added & STATUS_FEATURES_OK and not self._features_acceptable():
            # The driver reads the status back and gives up (spec 3.1.1).
            value &= ~STATUS_FEATURES_OK
        if added & STATUS_DRIVER_OK and value & STATUS_FEATURES_OK:
            reason = self._queues_unusable()
            if reason is not None:
                log.warning("%s: cannot activate: %s", self.device.kind, reason)
                value |= STATUS_DEVICE_NEEDS_RESET
            else:
                self.device.activate(self.memory, self, self.driver_features)
        # NEEDS_RESET is the device's bit; FAILED and the rest are the driver's.
        keep = self.status & STATUS_DEVICE_NEEDS_RESET
        self.status = (
            value
            & (STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK
               | STATUS_FAILED | STATUS_DEVICE_NEEDS_RESET)
        ) | keep

    def _features_acceptable(self) -> bool:
        features = self.driver_features
        return not features & ~self.device.avail_features and bool(features & VIRTIO_F_VERSION_1)

    def _queues_unusable(self) -> str | None:
        for index, queue in enumerate(self.device.queues):
            if not queue.ready:
                return f"queue {index} is not ready"
            reason = queue.validate(self.memory)
            if reason is not None:
                return f"queue {index}: {reason}"
        return None
