"""The virtio-blk device: features, configuration space, and the queue loop that ties the
parser (:mod:`.request`) to the I/O (:mod:`.backend`), counting everything.

One request queue. The loop runs on the trio loop: it drains the available ring, serves each
chain in order (``await`` on the stack), returns it to the used ring and interrupts the driver
when its EVENT_IDX asks for it. Modelled on Firecracker's ``device.rs: process_queue``.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from emulator.devices.eventfd import EventFd
from emulator.devices.virtio.block.backend import BlockBackend, status_of
from emulator.devices.virtio.block.request import (
    SECTOR_SIZE,
    SEGMENT_F_UNMAP,
    Limits,
    Request,
    RequestError,
    RequestType,
    Status,
    parse_request,
    status_address,
)
from emulator.devices.virtio.device import (
    VIRTIO_F_EVENT_IDX,
    VIRTIO_F_INDIRECT_DESC,
    VIRTIO_F_VERSION_1,
    VIRTIO_ID_BLOCK,
    VirtioCounters,
    VirtioDevice,
)
from emulator.devices.virtio.queue import (
    DescriptorChain,
    MalformedChainError,
    QueueBrokenError,
    SplitQueue,
)
from emulator.memory import GuestMemory
from vdiskfs.errors import VdiskError

__all__ = ["BlockCounters", "BlockDevice"]

log = logging.getLogger(__name__)

# virtio-blk feature bits (virtio spec 5.2.3).
VIRTIO_BLK_F_SEG_MAX = 1 << 2
VIRTIO_BLK_F_RO = 1 << 5
VIRTIO_BLK_F_BLK_SIZE = 1 << 6
VIRTIO_BLK_F_FLUSH = 1 << 9
VIRTIO_BLK_F_DISCARD = 1 << 13
VIRTIO_BLK_F_WRITE_ZEROES = 1 << 14

DEFAULT_QUEUE_SIZE = 256
#: Largest IN/OUT payload served (the Linux default request is at most 1280 KiB).
MAX_DATA_BYTES = 32 << 20
#: Discard / write-zeroes: segments per request and sectors per segment advertised.
MAX_SEGMENTS = 16
MAX_SEGMENT_SECTORS = (1 << 30) // SECTOR_SIZE
#: Malformed chains logged individually before going quiet (the counter keeps counting).
MAX_LOGGED_MALFORMED = 10

# struct virtio_blk_config, up to write_zeroes_may_unmap (60 bytes; spec 5.2.4).
_CONFIG = struct.Struct("<QII4sI8sBBHIIIIIB3x")


@dataclass
class BlockCounters(VirtioCounters):
    """Flat counters of one virtio-blk device (Firecracker's ``BlockDeviceMetrics`` names)."""

    read_requests: int = 0
    write_requests: int = 0
    flush_requests: int = 0
    get_id_requests: int = 0
    discard_requests: int = 0
    write_zeroes_requests: int = 0
    unsupported_requests: int = 0
    read_bytes: int = 0
    write_bytes: int = 0
    discard_bytes: int = 0
    write_zeroes_bytes: int = 0
    #: Answers by status.
    status_ok: int = 0
    status_ioerr: int = 0
    status_unsupp: int = 0
    #: Requests refused before any I/O (out of range, unaligned, oversized...).
    invalid_requests: int = 0
    #: Chains that broke the virtqueue rules; returned unused.
    malformed_chains: int = 0
    in_flight: int = 0
    max_in_flight: int = 0


_REQUEST_COUNTER = {
    RequestType.IN: "read_requests",
    RequestType.OUT: "write_requests",
    RequestType.FLUSH: "flush_requests",
    RequestType.GET_ID: "get_id_requests",
    RequestType.DISCARD: "discard_requests",
    RequestType.WRITE_ZEROES: "write_zeroes_requests",
}
_STATUS_COUNTER = {Status.OK: "status_ok", Status.IOERR: "status_ioerr",
                   Status.UNSUPP: "status_unsupp"}


class BlockDevice(VirtioDevice):
    """A virtio-blk device over a :class:`BlockBackend`."""

    device_type: ClassVar[int] = VIRTIO_ID_BLOCK
    kind: ClassVar[str] = "virtio-blk"
    counters: BlockCounters

    def __init__(self, backend: BlockBackend, *, queue_size: int = DEFAULT_QUEUE_SIZE) -> None:
        super().__init__([queue_size], BlockCounters())
        self.backend = backend
        self.avail_features = (
            VIRTIO_F_VERSION_1
            | VIRTIO_F_INDIRECT_DESC
            | VIRTIO_F_EVENT_IDX
            | VIRTIO_BLK_F_SEG_MAX
            | VIRTIO_BLK_F_BLK_SIZE
            | VIRTIO_BLK_F_FLUSH
        )
        if backend.read_only:
            self.avail_features |= VIRTIO_BLK_F_RO
        else:
            self.avail_features |= VIRTIO_BLK_F_DISCARD | VIRTIO_BLK_F_WRITE_ZEROES
        # A request is header + data segments + status in at most queue_size descriptors.
        self.seg_max = queue_size - 2
        self._config = _CONFIG.pack(
            backend.capacity_sectors,
            0,  # size_max: not offered
            self.seg_max,
            b"",  # geometry: not offered
            SECTOR_SIZE,
            b"",  # topology: not offered
            0,  # writeback: not offered
            0,
            1,  # num_queues
            MAX_SEGMENT_SECTORS,
            MAX_SEGMENTS,
            1,  # discard_sector_alignment
            MAX_SEGMENT_SECTORS,
            MAX_SEGMENTS,
            1,  # write_zeroes_may_unmap
        )
        self.limits = Limits(
            capacity_sectors=backend.capacity_sectors,
            max_data_bytes=MAX_DATA_BYTES,
            max_segments=MAX_SEGMENTS,
            max_segment_sectors=MAX_SEGMENT_SECTORS,
        )

    def config_bytes(self) -> bytes:
        return self._config

    # -- the queue loop (trio) ----------------------------------------------------------------

    async def serve(self, kicks: Sequence[EventFd]) -> None:
        (kick,) = kicks
        while True:
            self.counters.queue_notifications += await kick.wait()
            if self.active:
                await self.process_queue()

    async def process_queue(self) -> None:
        """Serve every available chain; return when the ring is empty and notifications are
        back on (or the device was reset meanwhile)."""
        memory, queue, generation = self.memory, self.queues[0], self.generation
        assert memory is not None
        try:
            while self.active and self.generation == generation:
                queue.disable_notification(memory)
                while (chain := self._pop(memory, queue)) is not None:
                    used_length = await self._serve_chain(memory, chain)
                    if not self.active or self.generation != generation:
                        return  # reset while the I/O ran: the ring belongs to nobody now
                    self._complete(memory, queue, chain.head, used_length)
                if not queue.enable_notification(memory):
                    return
        except QueueBrokenError as exc:
            if self.interrupt is not None:
                self.interrupt.needs_reset(str(exc))

    def _pop(self, memory: GuestMemory, queue: SplitQueue) -> DescriptorChain | None:
        while True:
            try:
                return queue.pop(memory)
            except MalformedChainError as exc:
                self._refuse_chain(memory, queue, exc)

    def _refuse_chain(self, memory: GuestMemory, queue: SplitQueue,
                      exc: MalformedChainError) -> None:
        self.counters.malformed_chains += 1
        if self.counters.malformed_chains <= MAX_LOGGED_MALFORMED:
            log.warning("%s: %s: refused", self.backend.node.label, exc)
        # The head goes back with nothing written, so the driver does not leak the descriptors.
        self._complete(memory, queue, exc.head, 0)

    def _complete(self, memory: GuestMemory, queue: SplitQueue, head: int, length: int) -> None:
        queue.add_used(memory, head, length)
        if queue.needs_notification(memory):
            assert self.interrupt is not None
            self.interrupt.signal_used_queue()
        else:
            self.counters.interrupts_suppressed += 1

    async def _serve_chain(self, memory: GuestMemory, chain: DescriptorChain) -> int:
        """Serve one chain; the number of bytes written into its writable buffers."""
        counters = self.counters
        try:
            request = parse_request(memory, chain, self.limits)
        except MalformedChainError as exc:
            counters.malformed_chains += 1
            if counters.malformed_chains <= MAX_LOGGED_MALFORMED:
                log.warning("%s: %s: refused", self.backend.node.label, exc)
            return 0
        except RequestError as exc:
            counters.invalid_requests += 1
            if exc.status == Status.UNSUPP:
                counters.unsupported_requests += 1
            log.debug("%s: request refused: %s", self.backend.node.label, exc)
            # parse_request found the status byte before it refused the request.
            return self._answer(memory, status_address(chain), status_of(exc), 0)

        counter = _REQUEST_COUNTER[RequestType(request.type)]
        setattr(counters, counter, getattr(counters, counter) + 1)
        counters.in_flight += 1
        counters.max_in_flight = max(counters.max_in_flight, counters.in_flight)
        try:
            written = await self._execute(memory, request)
            status = Status.OK
        except (VdiskError, RequestError) as exc:
            written = 0
            status = status_of(exc)
            log.debug("%s: %s failed: %s", self.backend.node.label,
                      RequestType(request.type).name, exc)
        finally:
            counters.in_flight -= 1
        return self._answer(memory, request.status_addr, status, written)

    def _answer(self, memory: GuestMemory, status_addr: int, status: Status, written: int) -> int:
        memory.view(status_addr, 1)[0] = status
        counter = _STATUS_COUNTER[status]
        setattr(self.counters, counter, getattr(self.counters, counter) + 1)
        return written + 1

    async def _execute(self, memory: GuestMemory, request: Request) -> int:
        """Do the I/O of a parsed request; the data bytes written into guest buffers."""
        backend, counters = self.backend, self.counters
        kind = request.type
        if kind == RequestType.IN:
            if request.data_length:
                data = memoryview(await backend.read(request.offset, request.data_length))
                position = 0
                for addr, length in request.data:
                    memory.view(addr, length)[:] = data[position : position + length]
                    position += length
            counters.read_bytes += request.data_length
            return request.data_length
        if kind == RequestType.OUT:
            if request.data_length:
                payload = b"".join(memory.view(a, n) for a, n in request.data)
                await backend.write(request.offset, payload)
            counters.write_bytes += request.data_length
            return 0
        if kind == RequestType.FLUSH:
            await backend.flush()
            return 0
        if kind == RequestType.GET_ID:
            position = 0
            for addr, length in request.data:
                memory.view(addr, length)[:] = backend.device_id[position : position + length]
                position += length
            return request.data_length
        if kind == RequestType.DISCARD:
            for segment in request.segments:
                nbytes = segment.num_sectors * SECTOR_SIZE
                await backend.discard(segment.sector * SECTOR_SIZE, nbytes)
                counters.discard_bytes += nbytes
            return 0
        if kind == RequestType.WRITE_ZEROES:
            for segment in request.segments:
                nbytes = segment.num_sectors * SECTOR_SIZE
                await backend.write_zeroes(
                    segment.sector * SECTOR_SIZE, nbytes,
                    may_unmap=bool(segment.flags & SEGMENT_F_UNMAP),
                )
                counters.write_zeroes_bytes += nbytes
            return 0
        raise RequestError(Status.UNSUPP, f"request type {kind}")  # pragma: no cover

    def stats(self) -> dict[str, Any]:
        out = super().stats()
        out["capacity_sectors"] = self.backend.capacity_sectors
        out["read_only"] = self.backend.read_only
        out["features_acked"] = self.acked_features
        return out

