"""The order in which a qcow2 writer's metadata reaches the disk, and when freed clusters may be
reused (QEMU's ``qcow2-cache.c`` flush order and ``qcow2-refcount.c`` frees).

**Crash safety** is an order of writes, with a sync (fdatasync) wherever a later write depends
on an earlier one being on the disk:

1. guest data, copied data, new L2 tables' first contents, and refcount blocks (increments);
2. refcount table entries for new blocks (or a whole new table, then the header pointing at it);
3. L2 slices; 4. L1 entries; 5. refcount decrements of the clusters that 3 and 4 stopped using.

So an L2 entry on disk never points at a cluster whose count is not on disk, nor at data not yet
written; an L1 entry never points at an L2 table that is not; and no count drops while a table on
disk still uses the cluster. A crash can leak clusters (counted, unused) but never corrupt the
image. Dirty metadata stays in the caches until a flush, an eviction or close -- not one sync per
guest write. With ``lazy_refcounts`` the image is marked dirty (header written and synced)
before its first change, steps 1-2 may lag, and a clean close clears the bit; a dirty image is
repaired (:mod:`.check`, from :func:`prepare`) before it is written again.

A cluster is reused only after its old references are gone from the disk, and after every read
or in-place write that may have looked it up under the old mapping has finished
(:class:`RequestEpochs`).
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass, replace

import trio

from vdiskfs.block.node import BlockNode, Buffer
from vdiskfs.drivers.format.qcow2.alloc import is_allocated
from vdiskfs.drivers.format.qcow2.check import rebuild_refcounts
from vdiskfs.drivers.format.qcow2.header import AUTOCLEAR_DATA_FILE_RAW, INCOMPAT_DIRTY, Header
from vdiskfs.drivers.format.qcow2.mapping import L2E_OFFSET_MASK, OFLAG_COMPRESSED, encode_table
from vdiskfs.drivers.format.qcow2.refcount import Refcounts
from vdiskfs.drivers.format.qcow2.state import Qcow2State

__all__ = ["ChildWrites", "MetadataLock", "RequestEpochs", "WriteBack", "index_runs", "prepare"]

#: Header fields a writer changes (docs/interop/qcow2.txt).
_INCOMPATIBLE_OFFSET = 72
_AUTOCLEAR_OFFSET = 88
_REFTABLE_FIELDS = struct.Struct(">QI")
_REFTABLE_FIELDS_OFFSET = 48


class MetadataLock:
    """QEMU's ``s->lock``: a fair :class:`trio.Lock` that, when free, is taken without a trip
    through the scheduler (trio's ``acquire`` always yields once; two such trips per allocating
    write cost more than the allocation). It stays fair: a released lock goes to the first
    waiter, so a task never takes it ahead of one that waits."""

    __slots__ = ("_lock",)

    def __init__(self) -> None:
        self._lock = trio.Lock()

    async def __aenter__(self) -> None:
        try:
            self._lock.acquire_nowait()
        except trio.WouldBlock:
            await self._lock.acquire()

    async def __aexit__(self, *exc_info: object) -> None:
        self._lock.release()

    def locked(self) -> bool:
        return self._lock.locked()


class RequestEpochs:
    """Requests (reads, in-place writes) that use a mapping looked up without the lock, by the
    epoch they started in. Every dropped reference starts a new epoch; its cluster may be
    reused once no request of an earlier epoch is left."""

    __slots__ = ("_active", "_epoch")

    def __init__(self) -> None:
        self._epoch = 0
        self._active: dict[int, int] = {}

    def begin(self) -> int:
        """Mark a request that uses a mapping looked up without the lock; returns its token."""
        epoch = self._epoch
        self._active[epoch] = self._active.get(epoch, 0) + 1
        return epoch

    def end(self, epoch: int) -> None:
        left = self._active[epoch] - 1
        if left:
            self._active[epoch] = left
        else:
            del self._active[epoch]

    def advance(self) -> int:
        """Start a new epoch (a reference was dropped); returns the one that ended."""
        epoch = self._epoch
        self._epoch += 1
        return epoch

    def oldest(self) -> float:
        """The epoch of the oldest request still running (infinity when none is)."""
        return min(self._active) if self._active else math.inf


@dataclass(slots=True)
class _PendingFree:
    #: The request epoch when the last reference was dropped (see RequestEpochs).
    epoch: int
    offset: int
    length: int
    #: Freed on the guest's request (discard, unmapping zero): punch a hole once unused.
    discard: bool


def index_runs(indices: set[int]) -> list[tuple[int, int]]:
    """Sorted indices as ``[start, stop)`` runs of consecutive values."""
    runs: list[tuple[int, int]] = []
    for index in sorted(indices):
        if runs and runs[-1][1] == index:
            runs[-1] = (runs[-1][0], index + 1)
        else:
            runs.append((index, index + 1))
    return runs


async def _write_incompatible(file: BlockNode, header: Header, value: int) -> Header:
    await file.pwrite(_INCOMPATIBLE_OFFSET, value.to_bytes(8, "big"))
    await file.flush()
    return replace(header, incompatible_features=value)


async def prepare(state: Qcow2State) -> None:
    """Before anything is cached: clear autoclear bits a writer does not maintain, and repair a
    dirty image's refcounts (as QEMU's ``qcow2_do_open``). ``state.header`` is then as on
    disk."""
    file, header = state.file, state.header
    # Bitmaps (bit 0) would go stale under our writes: clearing the bit tells QEMU that the
    # bitmaps extension is no longer valid, exactly what autoclear bits are for.
    keep = header.autoclear_features & AUTOCLEAR_DATA_FILE_RAW
    if header.version >= 3 and header.autoclear_features != keep:
        await file.pwrite(_AUTOCLEAR_OFFSET, keep.to_bytes(8, "big"))
        await file.flush()
        header = replace(header, autoclear_features=keep)
    if header.dirty:
        header = await rebuild_refcounts(
            file=file, header=header, geometry=state.geometry, l1=state.l1,
            snapshots=state.snapshots, read_metadata=state.read_metadata, label=state.label,
        )
        state.counters.refcount_rebuilds += 1
        header = await _write_incompatible(file, header,
                                           header.incompatible_features & ~INCOMPAT_DIRTY)
    state.header = header


class ChildWrites:
    """Writes to the children, remembering which ones a sync must reach."""

    def __init__(self, state: Qcow2State) -> None:
        self._state = state
        # Set by every write, cleared by the sync that makes it durable.
        self._unsynced_file = False
        self._unsynced_data = False

    async def store_metadata(self, offset: int, data: Buffer) -> None:
        self._unsynced_file = True
        self._state.counters.metadata_writebacks += 1
        await self._state.file.pwrite(offset, data)

    async def write_header(self, offset: int, data: bytes) -> None:
        self._unsynced_file = True
        await self._state.file.pwrite(offset, data)

    def _touch(self, node: BlockNode) -> None:
        if node is self._state.file:
            self._unsynced_file = True
        else:
            self._unsynced_data = True

    async def write_data(self, host: int, data: Buffer) -> None:
        data_node = self._state.data
        self._touch(data_node)
        await data_node.pwrite(host, data)

    async def zero_data(self, host: int, length: int, *, may_unmap: bool = False) -> None:
        data_node = self._state.data
        self._touch(data_node)
        await data_node.zero(host, length, may_unmap=may_unmap)

    async def punch(self, node: BlockNode, offset: int, length: int) -> None:
        """Discard ``[offset, offset + length)`` of ``node`` (the file or the data file)."""
        self._touch(node)
        await node.discard(offset, length)

    async def sync(self) -> None:
        """Make every write so far durable (only the children that were written)."""
        state = self._state
        if self._unsynced_data:
            self._unsynced_data = False
            try:
                await state.data.flush()
            except BaseException:
                self._unsynced_data = True
                raise
        if self._unsynced_file:
            self._unsynced_file = False
            state.counters.metadata_flushes += 1
            try:
                await state.file.flush()
            except BaseException:
                self._unsynced_file = True
                raise


class WriteBack:
    """Dirty metadata and queued frees of one writable image, written back in the crash-safe
    order. Everything here runs under :attr:`lock` (QEMU's ``s->lock``)."""

    def __init__(self, state: Qcow2State, io: ChildWrites, refcounts: Refcounts) -> None:
        self._state = state
        self._io = io
        self._refcounts = refcounts
        #: Held by every task that changes metadata or writes it back.
        self.lock = MetadataLock()
        self.requests = RequestEpochs()
        self._pending_frees: list[_PendingFree] = []
        #: External data file clusters to punch before the lock is released.
        self._data_punches: list[int] = []
        #: Indices of L1 entries changed since the table was last written.
        self._l1_dirty: set[int] = set()
        self._lazy = state.header.lazy_refcounts
        #: This session set the dirty bit (lazy refcounts) and must clear it on close.
        self._marked_dirty = False
        self._closed = False

    @property
    def pending_frees(self) -> int:
        return len(self._pending_frees)

    def l1_changed(self, index: int) -> None:
        """Entry ``index`` of the active L1 table changed: write it at the next write-back."""
        self._l1_dirty.add(index)

    # -- frees ------------------------------------------------------------------------------------

    def free_later(self, offset: int, length: int, *, discard: bool = False) -> None:
        """Queue a refcount decrement for after the metadata that dropped the reference is on
        disk, and after the requests that may still use it have finished."""
        self._pending_frees.append(_PendingFree(self.requests.advance(), offset, length,
                                                discard))

    def free_entry_later(self, entry: int, *, discard: bool = False) -> None:
        """Queue the host cluster(s) an L2 entry references (QEMU's qcow2_free_any_cluster):
        a compressed cluster's bytes (every host cluster they touch loses a reference), or a
        data cluster. ``discard``: the guest asked for it, so a host cluster whose count drops
        to 0 is punched too. An external data file has no counts: its cluster is punched by
        :meth:`punch_data_file`, which the caller runs before it releases the lock."""
        g = self._state.geometry
        if entry & OFLAG_COMPRESSED:
            host, stored = g.compressed(entry)
            self.free_later(host, stored, discard=discard)
        elif not is_allocated(g, entry):
            return
        elif not g.has_data_file:
            self.free_later(entry & L2E_OFFSET_MASK, g.cluster_size, discard=discard)
        elif discard and not self._state.header.data_file_raw:
            # (data_file_raw: zero() and discard() zeroed the data file already.)
            self._data_punches.append(entry & L2E_OFFSET_MASK)

    async def punch_data_file(self) -> None:
        """Punch the external data file's clusters that a discard or an unmapping zero just
        unmapped (QEMU passes the discard to the data file at once, as here: a crash before
        the L2 slice is written leaves it pointing at zeros, which is what the guest asked
        for). Caller holds the lock, so no write can reuse the clusters before the punch."""
        if not self._data_punches:
            return
        cluster_bits = self._state.geometry.cluster_bits
        data = self._state.data
        punches, self._data_punches = self._data_punches, []
        for start, stop in index_runs({host >> cluster_bits for host in punches}):
            offset = start << cluster_bits
            end = min(stop << cluster_bits, data.size)
            if end > offset:
                await self._io.punch(data, offset, end - offset)

    # -- the dirty bit ----------------------------------------------------------------------------

    async def mark_dirty(self) -> None:
        """Lazy refcounts: the dirty bit is on disk before any metadata change (QEMU's
        qcow2_mark_dirty)."""
        state = self._state
        if not self._lazy or state.header.dirty:
            return
        state.header = await _write_incompatible(
            state.file, state.header, state.header.incompatible_features | INCOMPAT_DIRTY)
        self._marked_dirty = True

    # -- write-back, in order ---------------------------------------------------------------------

    async def before_l2_write_back(self) -> None:
        """What a dirty L2 slice may point at is on disk first (the hook of the L2 cache)."""
        if not self._lazy:
            await self._write_back_refcounts()
        await self._io.sync()

    async def _write_back_refcounts(self) -> None:
        """Refcount blocks, then (after a sync) the refcount table entries -- or a whole new
        table and the header that points at it."""
        refcounts, io, state = self._refcounts, self._io, self._state
        await refcounts.cache.write_back()
        if not refcounts.relocated and not refcounts.dirty_entries:
            return
        await io.sync()
        table = refcounts.table
        if refcounts.relocated:
            await io.store_metadata(refcounts.table_offset, encode_table(table))
            await io.sync()
            await io.write_header(_REFTABLE_FIELDS_OFFSET, _REFTABLE_FIELDS.pack(
                refcounts.table_offset, refcounts.table_clusters))
            state.header = replace(state.header, refcount_table_offset=refcounts.table_offset,
                                   refcount_table_clusters=refcounts.table_clusters)
            refcounts.relocated = False
            refcounts.dirty_entries.clear()
            for offset, clusters in refcounts.retired_tables:
                self.free_later(offset, clusters * state.header.cluster_size)
            refcounts.retired_tables.clear()
            return
        for start, stop in index_runs(refcounts.dirty_entries):
            await io.store_metadata(refcounts.table_offset + 8 * start,
                                    encode_table(table[start:stop]))
        refcounts.dirty_entries.clear()

    async def _write_l1(self) -> None:
        state = self._state
        dirty, self._l1_dirty = self._l1_dirty, set()
        try:
            for start, stop in index_runs(dirty):
                await self._io.store_metadata(state.header.l1_table_offset + 8 * start,
                                              encode_table(state.l1[start:stop]))
        except BaseException:
            self._l1_dirty |= dirty
            raise

    async def write_back(self) -> None:
        """All dirty metadata to the disk, in the crash-safe order; then the queued frees.
        Caller holds the lock. The caller syncs at the end (the node's flush does)."""
        if not self._lazy:
            await self._write_back_refcounts()
        l2_cache = self._state.l2_cache
        if l2_cache.dirty:
            await l2_cache.write_back()
        if self._l1_dirty:
            await self._io.sync()  # the new L2 tables' contents and counts
            await self._write_l1()
        if self._pending_frees:
            await self._io.sync()  # nothing on disk references them any more
            await self._apply_frees()
        await self._write_back_refcounts()

    async def _apply_frees(self) -> None:
        refcounts, state = self._refcounts, self._state
        oldest = self.requests.oldest()
        ready = [f for f in self._pending_frees if f.epoch < oldest]
        if not ready:
            return
        self._pending_frees = [f for f in self._pending_frees if f.epoch >= oldest]
        cluster_bits = state.geometry.cluster_bits
        punch: set[int] = set()
        for free in ready:
            await refcounts.change(free.offset, free.length, -1)
            first = free.offset >> cluster_bits
            last = (free.offset + free.length - 1) >> cluster_bits
            state.counters.clusters_freed += last - first + 1
            if free.discard:
                # As QEMU's update_refcount_discard: every host cluster whose count dropped to
                # 0 (a compressed cluster's bytes may share theirs with others).
                for cluster in range(first, last + 1):
                    if await refcounts.get(cluster) == 0:
                        punch.add(cluster)
        # The host file gets the holes too (QEMU's pass-discard-request). The clusters are
        # free in the cache only; on disk their counts drop later -- a crash in between leaks
        # them, with nothing referencing their (now zero) contents.
        file = state.file
        for start, stop in index_runs(punch):
            offset = start << cluster_bits
            end = min(stop << cluster_bits, file.size)
            if end > offset:
                await self._io.punch(file, offset, end - offset)

    # -- the node's verbs -------------------------------------------------------------------------

    async def flush(self) -> None:
        with trio.CancelScope(shield=True):
            async with self.lock:
                await self.write_back()

    async def close(self) -> None:
        """Write everything back, sync, and clear the dirty bit this session set."""
        if self._closed:
            return
        self._closed = True
        state = self._state
        with trio.CancelScope(shield=True):
            async with self.lock:
                await self.write_back()
                await self._io.sync()
                if self._marked_dirty:
                    state.header = await _write_incompatible(
                        state.file, state.header,
                        state.header.incompatible_features & ~INCOMPAT_DIRTY)
                    self._marked_dirty = False
