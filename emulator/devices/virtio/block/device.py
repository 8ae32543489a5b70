"""The virtio-blk device: features, configuration space, and the queue loop that ties the
parser (:mod:`.request`) to the I/O (:mod:`.backend`), counting everything.

One request queue, served on the trio loop (modelled on Firecracker's ``device.rs:
process_queue``, with QEMU's concurrency). The queue's *dispatcher* takes every available
chain, parses it and starts one trio task per request, so requests run on the stack together
and complete in any order. It admits at most :data:`MAX_IN_FLIGHT` chains and
:data:`MAX_IN_FLIGHT_BYTES` of request data at once: a chain that does not fit is given back to
the available ring (it stays the driver's) until a completion frees room. Finished requests
queue their used element; the dispatcher publishes everything finished since its last turn as
one batch -- the elements, one used-index store, and at most one interrupt, which the driver's
``used_event`` (EVENT_IDX) may suppress.

A reset comes from the vCPU thread at any moment. Every write into guest memory (read data,
status bytes, the used ring) and every read of a request's payload happens under the device's
state lock after checking that the device is still active in the generation the request was
taken in; a reset takes the same lock, so once it returns nothing of the old generation reaches
guest memory. Requests already on the stack run to their end (a write half done is worse than
one done) and their completions are dropped and counted (``completions_discarded``); the next
generation is served only when the old one has drained, so an old write can never land after
a new one.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar, assert_never

import trio

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
#: Chains served at once per queue; more wait in the available ring. Linux's virtio-blk keeps
#: up to the queue size (256) in flight; 64 is well past the depth where the stack's host I/O
#: engine saturates the disk, and bounds the tasks one guest can create.
MAX_IN_FLIGHT = 64
#: Request data (IN/OUT payloads: the host buffers they cost) in flight per queue: 64 requests
#: of the 1 MiB Linux sends when streaming, so the byte cap only binds on larger requests.
MAX_IN_FLIGHT_BYTES = 64 << 20

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
    #: Requests taken from the queue and not yet finished, and the high-water mark.
    in_flight: int = 0
    max_in_flight: int = 0
    #: Their data bytes (IN/OUT payloads), and the high-water mark.
    in_flight_bytes: int = 0
    max_in_flight_bytes: int = 0
    #: Times a chain was left in the ring because MAX_IN_FLIGHT(_BYTES) was reached.
    in_flight_cap_waits: int = 0
    #: Used-ring publications (one used-index store, at most one interrupt each) and the
    #: largest number of elements one carried.
    used_batches: int = 0
    max_used_batch: int = 0
    #: Requests finished after a device reset: their answers were dropped, not written.
    completions_discarded: int = 0

    def count_request(self, kind: RequestType) -> None:
        match kind:
            case RequestType.IN:
                self.read_requests += 1
            case RequestType.OUT:
                self.write_requests += 1
            case RequestType.FLUSH:
                self.flush_requests += 1
            case RequestType.GET_ID:
                self.get_id_requests += 1
            case RequestType.DISCARD:
                self.discard_requests += 1
            case RequestType.WRITE_ZEROES:
                self.write_zeroes_requests += 1
            case _:  # the type checker fails here when RequestType gains a member
                assert_never(kind)

    def count_status(self, status: Status) -> None:
        match status:
            case Status.OK:
                self.status_ok += 1
            case Status.IOERR:
                self.status_ioerr += 1
            case Status.UNSUPP:
                self.status_unsupp += 1
            case _:
                assert_never(status)


class _ResetBeforeIO(Exception):
    """The device was reset before a request's payload was read: do nothing."""


class _QueueState:
    """What the dispatcher of one queue keeps between turns (trio side only)."""

    def __init__(self, index: int) -> None:
        self.index = index
        #: The device generation being served.
        self.generation = 0
        #: Requests running on the stack, and their data bytes (what the caps bound).
        self.in_flight = 0
        self.in_flight_bytes = 0
        #: Finished chains not yet published: ``(head, used length, generation)``.
        self.done: list[tuple[int, int, int]] = []
        #: Set to wake the dispatcher (a kick, a completion); replaced at each of its turns.
        self.wakeup: trio.Event | None = None

    def wake(self) -> None:
        if self.wakeup is not None:
            self.wakeup.set()


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
        self._queue_states = [_QueueState(i) for i in range(len(self.queues))]
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
        state = self._queue_states[0]
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._watch_kick, kick, state)
            await self._run_queue(0, until_idle=False)

    async def _watch_kick(self, kick: EventFd, state: _QueueState) -> None:
        # Kicks only wake the dispatcher: it may be waiting for a completion at the same time.
        while True:
            self.counters.queue_notifications += await kick.wait()
            state.wake()

    async def process_queue(self) -> None:
        """Serve every available chain; return when the ring is empty, every request taken has
        been answered and published, and notifications are back on (or the device was reset
        or failed and nothing it started is left)."""
        await self._run_queue(0, until_idle=True)

    async def _run_queue(self, index: int, *, until_idle: bool) -> None:
        state = self._queue_states[index]
        if state.wakeup is not None:
            # A second dispatcher would take the first one's wake-ups and leave it waiting.
            raise RuntimeError(f"{self.kind} queue {index} is already served")
        state.wakeup = trio.Event()
        try:
            async with trio.open_nursery() as requests:
                while True:
                    idle = self._admit(index, state, requests)
                    # After admitting: chains refused while admitting are answered already
                    # and must be published now, not at some later wake-up (found by the
                    # fuzzer: a lone malformed chain never came back).
                    self._publish(state)
                    if until_idle and idle and state.in_flight == 0:
                        return
                    await state.wakeup.wait()
                    # Everything that happened until now is handled by the next turn.
                    state.wakeup = trio.Event()
        finally:
            state.wakeup = None

    @contextmanager
    def _guest(self, generation: int) -> Iterator[GuestMemory | None]:
        """Guest memory, held against a reset, if the device is still active in
        ``generation``; None once it was reset (or failed) since."""
        with self._state_lock:
            current = self.active and self.generation == generation
            yield self.memory if current else None

    def _admit(self, index: int, state: _QueueState, nursery: trio.Nursery) -> bool:
        """Take available chains while there is room; True when the ring is empty (with
        notifications back on) or the device is not serving, False when chains wait for room
        (or for the old generation to drain)."""
        queue = self.queues[index]
        with self._state_lock:
            if not self.active:
                return True
            if state.generation != self.generation:
                if state.in_flight:
                    return False  # a reset's leftovers first: see the module docstring
                state.generation = self.generation
            memory = self.memory
            assert memory is not None
            try:
                queue.disable_notification(memory)
                while True:
                    if state.in_flight >= MAX_IN_FLIGHT:
                        if queue.pending(memory):
                            self.counters.in_flight_cap_waits += 1
                            return False
                        # Nothing waits: ask for a kick, and look again in case one raced.
                        if not queue.enable_notification(memory):
                            return True
                        continue
                    chain = self._pop(memory, queue, state)
                    if chain is None:
                        if queue.enable_notification(memory):
                            continue  # the driver added chains meanwhile and may not kick
                        return True
                    request = self._parse(memory, chain, state)
                    if request is None:
                        continue  # refused and answered already
                    size = request.data_length
                    if state.in_flight and state.in_flight_bytes + size > MAX_IN_FLIGHT_BYTES:
                        queue.go_to_previous_position()
                        self.counters.in_flight_cap_waits += 1
                        return False
                    self._started(state, request)
                    nursery.start_soon(self._serve_request, state, chain.head, request,
                                       state.generation)
            except QueueBrokenError as exc:
                if self.interrupt is not None:
                    self.interrupt.needs_reset(str(exc))
                return True

    def _pop(self, memory: GuestMemory, queue: SplitQueue,
             state: _QueueState) -> DescriptorChain | None:
        while True:
            try:
                return queue.pop(memory)
            except MalformedChainError as exc:
                self._refuse_chain(exc, state)

    def _refuse_chain(self, exc: MalformedChainError, state: _QueueState) -> None:
        self.counters.malformed_chains += 1
        if self.counters.malformed_chains <= MAX_LOGGED_MALFORMED:
            log.warning("%s: %s: refused", self.backend.node.label, exc)
        # The head goes back with nothing written, so the driver does not leak the descriptors.
        state.done.append((exc.head, 0, state.generation))

    def _parse(self, memory: GuestMemory, chain: DescriptorChain,
               state: _QueueState) -> Request | None:
        """The chain's request, or None when it was refused (and its answer queued)."""
        counters = self.counters
        try:
            request = parse_request(memory, chain, self.limits)
        except MalformedChainError as exc:
            self._refuse_chain(exc, state)
            return None
        except RequestError as exc:
            counters.invalid_requests += 1
            if exc.status == Status.UNSUPP:
                counters.unsupported_requests += 1
            log.debug("%s: request refused: %s", self.backend.node.label, exc)
            # parse_request found the status byte before it refused the request; the caller
            # holds the state lock in the current generation.
            written = self._answer(memory, status_address(chain), status_of(exc), 0)
            state.done.append((chain.head, written, state.generation))
            return None
        return request

    def _started(self, state: _QueueState, request: Request) -> None:
        # Counted here, not when parsed: a chain given back for lack of room is parsed again.
        counters = self.counters
        counters.count_request(RequestType(request.type))
        size = request.data_length
        state.in_flight += 1
        state.in_flight_bytes += size
        counters.in_flight += 1
        counters.in_flight_bytes += size
        counters.max_in_flight = max(counters.max_in_flight, counters.in_flight)
        counters.max_in_flight_bytes = max(counters.max_in_flight_bytes, counters.in_flight_bytes)

    def _finished(self, state: _QueueState, size: int) -> None:
        counters = self.counters
        state.in_flight -= 1
        state.in_flight_bytes -= size
        counters.in_flight -= 1
        counters.in_flight_bytes -= size

    async def _serve_request(self, state: _QueueState, head: int, request: Request,
                             generation: int) -> None:
        """One request, as a task: its I/O, then its answer in guest memory, then its used
        element queued for the dispatcher's next batch."""
        written = 0
        cancelled = False
        try:
            written = await self._execute(request, generation)
        except trio.Cancelled:
            cancelled = True
            raise
        finally:
            # Also when cancelled (the VMM is stopping): the room is given back either way.
            self._finished(state, request.data_length)
            # A cancelled request is not answered: the guest is stopping. Queued, it could
            # still be published by a dispatcher that a wake-up made runnable just before the
            # cancellation (CI saw it under load).
            if not cancelled:
                state.done.append((head, written, generation))
                state.wake()

    def _publish(self, state: _QueueState) -> None:
        """Return every finished chain in one batch: one used-index store, at most one
        interrupt. Answers of an older generation (or of a device that failed) are dropped."""
        if not state.done:
            return
        done, state.done = state.done, []
        queue = self.queues[state.index]
        with self._state_lock:
            memory = self.memory
            if self.active and memory is not None:
                current = [(head, n) for head, n, gen in done if gen == self.generation]
            else:
                current = []
            self.counters.completions_discarded += len(done) - len(current)
            if not current:
                return
            assert memory is not None
            count = queue.add_used_batch(memory, current)
            self.counters.used_batches += 1
            self.counters.max_used_batch = max(self.counters.max_used_batch, count)
            if queue.needs_notification(memory):
                assert self.interrupt is not None
                self.interrupt.signal_used_queue()
            else:
                self.counters.interrupts_suppressed += 1

    def _answer(self, memory: GuestMemory, status_addr: int, status: Status, written: int) -> int:
        """Write the status byte (the caller holds the state lock, generation checked); the
        used length: data bytes written plus the status byte."""
        memory.view(status_addr, 1)[0] = status
        self.counters.count_status(status)
        return written + 1

    async def _execute(self, request: Request, generation: int) -> int:
        """Serve a parsed request: the I/O, then the data and the status byte written into
        guest memory unless the device was reset meanwhile; the used length."""
        try:
            data = await self._io(request, generation)
            status = Status.OK
        except _ResetBeforeIO:
            return 0
        except (VdiskError, RequestError) as exc:
            data, status = None, status_of(exc)
            log.debug("%s: %s failed: %s", self.backend.node.label,
                      RequestType(request.type).name, exc)
        with self._guest(generation) as memory:
            if memory is None:
                return 0  # dropped (and counted) when the dispatcher publishes
            written = 0
            if data is not None:
                position = 0
                for addr, length in request.data:
                    memory.view(addr, length)[:] = data[position : position + length]
                    position += length
                written = request.data_length
            return self._answer(memory, request.status_addr, status, written)

    async def _io(self, request: Request, generation: int) -> memoryview | None:
        """Do the I/O of a parsed request; the bytes to copy into its guest buffers, if any."""
        backend, counters = self.backend, self.counters
        kind = request.type
        if kind == RequestType.IN:
            data = memoryview(b"")
            if request.data_length:
                data = memoryview(await backend.read(request.offset, request.data_length))
            counters.read_bytes += request.data_length
            return data
        if kind == RequestType.OUT:
            if request.data_length:
                # Read under the lock: after a reset the guest may have reused these pages, and
                # what it put there since must not reach the disk.
                with self._guest(generation) as memory:
                    if memory is None:
                        raise _ResetBeforeIO
                    payload = b"".join(memory.view(a, n) for a, n in request.data)
                await backend.write(request.offset, payload)
            counters.write_bytes += request.data_length
            return None
        if kind == RequestType.FLUSH:
            await backend.flush()
            return None
        if kind == RequestType.GET_ID:
            return memoryview(backend.device_id)
        if kind == RequestType.DISCARD:
            for segment in request.segments:
                nbytes = segment.num_sectors * SECTOR_SIZE
                await backend.discard(segment.sector * SECTOR_SIZE, nbytes)
                counters.discard_bytes += nbytes
            return None
        if kind == RequestType.WRITE_ZEROES:
            for segment in request.segments:
                nbytes = segment.num_sectors * SECTOR_SIZE
                await backend.write_zeroes(
                    segment.sector * SECTOR_SIZE, nbytes,
                    may_unmap=bool(segment.flags & SEGMENT_F_UNMAP),
                )
                counters.write_zeroes_bytes += nbytes
            return None
        raise RequestError(Status.UNSUPP, f"request type {kind}")  # pragma: no cover

    def stats(self) -> dict[str, Any]:
        out = super().stats()
        out["in_flight_cap"] = MAX_IN_FLIGHT
        out["in_flight_bytes_cap"] = MAX_IN_FLIGHT_BYTES
        out["capacity_sectors"] = self.backend.capacity_sectors
        out["read_only"] = self.backend.read_only
        out["features_acked"] = self.acked_features
        return out

