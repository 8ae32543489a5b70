"""What every virtio device shares: feature bits, status bits, counters, the device interface.

The transport (:mod:`emulator.devices.virtio.mmio`) owns the registers and calls
:meth:`VirtioDevice.activate` / :meth:`~VirtioDevice.reset` from the vCPU thread; the device
serves its queues on the trio loop (:meth:`VirtioDevice.serve`), woken by one
:class:`~emulator.devices.eventfd.EventFd` per queue.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

from emulator.devices.eventfd import EventFd
from emulator.devices.virtio.queue import SplitQueue
from emulator.memory import GuestMemory

__all__ = [
    "STATUS_ACKNOWLEDGE",
    "STATUS_DEVICE_NEEDS_RESET",
    "STATUS_DRIVER",
    "STATUS_DRIVER_OK",
    "STATUS_FAILED",
    "STATUS_FEATURES_OK",
    "VIRTIO_F_EVENT_IDX",
    "VIRTIO_F_INDIRECT_DESC",
    "VIRTIO_F_VERSION_1",
    "VIRTIO_ID_BLOCK",
    "DeviceInterrupt",
    "VirtioCounters",
    "VirtioDevice",
]

#: Device type of virtio-blk.
VIRTIO_ID_BLOCK = 2

# Transport and ring feature bits (virtio spec 6).
VIRTIO_F_INDIRECT_DESC = 1 << 28
VIRTIO_F_EVENT_IDX = 1 << 29
#: "Modern" virtio 1.x; a legacy driver that does not ack it is refused.
VIRTIO_F_VERSION_1 = 1 << 32

# Device status bits (virtio spec 2.1).
STATUS_ACKNOWLEDGE = 1
STATUS_DRIVER = 2
STATUS_DRIVER_OK = 4
STATUS_FEATURES_OK = 8
STATUS_DEVICE_NEEDS_RESET = 64
STATUS_FAILED = 128


class DeviceInterrupt(Protocol):
    """How a device tells the driver something: the transport's interrupt status and line."""

    def signal_used_queue(self) -> None: ...

    def signal_config_change(self) -> None: ...

    def needs_reset(self, reason: str) -> None: ...


@dataclass
class VirtioCounters:
    """Counters every virtio device keeps (bumped by the device and its transport)."""

    #: Queue notifications the device woke up for (ioeventfd counts included).
    queue_notifications: int = 0
    #: Notifications that reached the VMM as an MMIO exit (none while ioeventfd works).
    notify_exits: int = 0
    #: Used-buffer interrupts raised / suppressed by the driver's EVENT_IDX or NO_INTERRUPT.
    interrupts: int = 0
    interrupts_suppressed: int = 0
    config_interrupts: int = 0
    activations: int = 0
    resets: int = 0
    #: The rings became unusable and the device asked for a reset.
    queue_failures: int = 0


class VirtioDevice:
    """Base class: subclasses set the class attributes and implement :meth:`serve`."""

    device_type: ClassVar[int] = 0
    #: Short name used in stats paths and logs ("virtio-blk").
    kind: ClassVar[str] = "virtio"

    def __init__(self, queue_max_sizes: Sequence[int], counters: VirtioCounters) -> None:
        self.queues = [SplitQueue(size) for size in queue_max_sizes]
        self.counters = counters
        self.avail_features = VIRTIO_F_VERSION_1
        self.acked_features = 0
        self.memory: GuestMemory | None = None
        self.interrupt: DeviceInterrupt | None = None
        #: Set by the vCPU thread at DRIVER_OK, cleared at reset; read by the trio side.
        self.active = False
        #: Bumped at every reset, so work started before a reset never completes into it.
        self.generation = 0
        #: Held by activate/reset (vCPU thread) and by the trio side around every access to
        #: guest memory on behalf of a request: checking ``active``/``generation`` under it
        #: and then writing is atomic with respect to a reset.
        self._state_lock = threading.Lock()

    # -- configuration space ----------------------------------------------------------------------

    def config_bytes(self) -> bytes:
        return b""

    def read_config(self, offset: int, length: int) -> bytes:
        config = self.config_bytes()
        chunk = config[offset : offset + length] if offset >= 0 else b""
        return chunk.ljust(length, b"\0")

    def write_config(self, offset: int, data: bytes) -> None:
        """The devices here have no writable configuration: ignored, as the spec allows for
        fields whose feature was not negotiated."""

    # -- life cycle (vCPU thread) -----------------------------------------------------------------

    def activate(self, memory: GuestMemory, interrupt: DeviceInterrupt, features: int) -> None:
        with self._state_lock:
            self.memory = memory
            self.interrupt = interrupt
            self.acked_features = features
            for queue in self.queues:
                queue.activate(
                    event_idx=bool(features & VIRTIO_F_EVENT_IDX),
                    indirect=bool(features & VIRTIO_F_INDIRECT_DESC),
                )
            self.counters.activations += 1
            self.active = True

    def reset(self) -> None:
        """Back to the initial state (the driver wrote 0 to the status register). Once this
        returns, no request taken before it writes into guest memory any more."""
        with self._state_lock:
            self.active = False
            self.generation += 1
            self.acked_features = 0
            for queue in self.queues:
                queue.reset()
            self.counters.resets += 1

    # -- the trio side ----------------------------------------------------------------------------

    async def serve(self, kicks: Sequence[EventFd]) -> None:
        """Serve the queues until cancelled, woken by ``kicks[i]`` for queue ``i``."""
        raise NotImplementedError

    def stats(self) -> dict[str, Any]:
        """A snapshot of the device's counters (a plain dict, for JSON and the FUSE view)."""
        return dataclasses.asdict(self.counters)
