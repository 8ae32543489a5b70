"""The write half of a qcow2 node: allocation, copy on write, zero clusters, discard, and the
order in which metadata reaches the disk.

The design is QEMU's (``block/qcow2.c``, ``qcow2-cluster.c``, ``qcow2-refcount.c``,
``qcow2-cache.c``), written for one trio task at a time holding :attr:`Qcow2Writer.lock`:

**A write** maps each cluster it touches (:func:`.alloc.plan_cluster`). Clusters the image owns
are written in place, with no metadata change -- and, when their L2 slice is cached, without the
lock at all. Otherwise, under the lock, the writer allocates host clusters (refcount +1 in the
refcount block cache), records the guest range as in flight, and releases the lock; it writes
the data together with what must be copied on write around it (read through the node's own read
path: backing file, zeros, the old or the compressed cluster); then, under the lock again, it
points the L2 entries at the new clusters ("links" them) and queues the old clusters for freeing.
A writer that meets a guest range in flight waits for it (QEMU's ``handle_dependencies``), so
two writes to one cluster never both allocate it, and a reader sees the old mapping until the
link, then the new one -- never a half-written cluster.

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
repaired (:mod:`.check`) before it is written again.

A cluster is reused only after its old references are gone from the disk, and after every read
or in-place write that may have looked it up under the old mapping has finished (an epoch count
of requests in flight).
"""

from __future__ import annotations

import math
import struct
from array import array
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import trio

from vdiskfs.block.node import Buffer
from vdiskfs.drivers.format.qcow2.alloc import (
    ALL_SUBCLUSTERS,
    ALL_ZERO_BITMAP,
    Action,
    Inflight,
    InflightList,
    is_allocated,
    linked_entry,
    needs_new_cluster,
    plan_cluster,
    subcluster_bits,
)
from vdiskfs.drivers.format.qcow2.check import rebuild_refcounts
from vdiskfs.drivers.format.qcow2.header import (
    AUTOCLEAR_DATA_FILE_RAW,
    INCOMPAT_DIRTY,
    Header,
)
from vdiskfs.drivers.format.qcow2.mapping import (
    L1E_OFFSET_MASK,
    L2E_OFFSET_MASK,
    OFLAG_COMPRESSED,
    OFLAG_COPIED,
    OFLAG_ZERO,
    decode_table,
)
from vdiskfs.drivers.format.qcow2.metadata_cache import MetadataCache
from vdiskfs.drivers.format.qcow2.refcount import RefcountCodec, Refcounts, encode_table
from vdiskfs.drivers.format.runs import RunKind
from vdiskfs.errors import FormatError

if TYPE_CHECKING:
    from vdiskfs.drivers.format.qcow2.driver import Qcow2Node

__all__ = ["Qcow2Writer"]

#: Header fields this writer changes (docs/interop/qcow2.txt).
_INCOMPATIBLE_OFFSET = 72
_AUTOCLEAR_OFFSET = 88
_REFTABLE_FIELDS = struct.Struct(">QI")
_REFTABLE_FIELDS_OFFSET = 48
#: Refcount blocks kept: QEMU's default refcount cache is a quarter of the L2 cache; at least 4.
_REFCOUNT_CACHE_BYTES = 4 * 1024 * 1024
_MIN_REFCOUNT_BLOCKS = 4
#: Writes of at most this much data are merged with their copy-on-write regions into one
#: buffer (one host write); larger ones are written beside them, saving the copy.
_MERGE_LIMIT = 64 * 1024
#: Queued frees beyond this trigger a metadata write-back, so that freed clusters are reused.
_MAX_PENDING_FREES = 4096
#: Largest zero buffer written at once where zeros must be written as data.
_ZERO_CHUNK = 1 << 20


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


@dataclass(slots=True)
class _PendingFree:
    #: The request epoch when the last reference was dropped (see Qcow2Writer.io_begin).
    epoch: int
    offset: int
    length: int
    #: Freed on the guest's request (discard, unmapping zero): punch a hole once unused.
    discard: bool


class Qcow2Writer:
    """Everything a writable :class:`~.driver.Qcow2Node` adds: owned by the node, created by
    its ``open`` (which calls :meth:`prepare` then :meth:`open`)."""

    def __init__(self, node: Qcow2Node) -> None:
        self.node = node
        #: Held by every task that changes metadata or writes it back.
        self.lock = MetadataLock()
        self.inflight = InflightList()
        self.refcounts: Refcounts | None = None
        self._pending_frees: list[_PendingFree] = []
        #: External data file clusters to punch before the lock is released.
        self._data_punches: list[int] = []
        self._free_checkpoint = _MAX_PENDING_FREES
        self._l1_dirty: set[int] = set()
        # Set by every write, cleared by the sync that makes it durable.
        self._unsynced_file = False
        self._unsynced_data = False
        self._lazy = False
        #: This session set the dirty bit (lazy refcounts) and must clear it on close.
        self._marked_dirty = False
        # Requests that may use a mapping looked up without the lock, by the epoch they
        # started in (see io_begin).
        self._epoch = 0
        self._active: dict[int, int] = {}
        self._zeros = b""
        self._closed = False
        self._fixed_metadata: list[tuple[int, int, str]] = []
        #: Host offsets of the L2 tables the active L1 table points at.
        self._active_l2: set[int] = set()
        #: Set when corruption was found: every later change is refused.
        self._broken: str | None = None

    # -- open -------------------------------------------------------------------------------------

    async def prepare(self, header: Header) -> Header:
        """Before the caches exist: clear autoclear bits this writer does not maintain, and
        repair a dirty image's refcounts (as QEMU's ``qcow2_do_open``). Returns the header as
        it is on disk afterwards."""
        node = self.node
        file = node.file
        # Bitmaps (bit 0) would go stale under our writes: clearing the bit tells QEMU that the
        # bitmaps extension is no longer valid, exactly what autoclear bits are for.
        keep = header.autoclear_features & AUTOCLEAR_DATA_FILE_RAW
        if header.version >= 3 and header.autoclear_features != keep:
            await file.pwrite(_AUTOCLEAR_OFFSET, keep.to_bytes(8, "big"))
            await file.flush()
            header = replace(header, autoclear_features=keep)
        if header.dirty:
            assert node.geometry is not None
            header = await rebuild_refcounts(
                file=file, header=header, geometry=node.geometry, l1=node._l1,
                snapshots=node.snapshots, read_metadata=node.read_metadata, label=node.label,
            )
            node.counters.refcount_rebuilds += 1
            header = await self._write_incompatible(header,
                                                    header.incompatible_features & ~INCOMPAT_DIRTY)
        return header

    async def open(self) -> None:
        """Load the refcount table and make the node's caches write-back."""
        node = self.node
        header = node.header
        assert header is not None and node.l2_cache is not None
        self._lazy = header.lazy_refcounts
        table = decode_table(await node.read_metadata(
            header.refcount_table_offset, header.refcount_table_clusters * header.cluster_size,
            "refcount table"))
        cache: MetadataCache[bytearray] = MetadataCache(
            max(_MIN_REFCOUNT_BLOCKS, _REFCOUNT_CACHE_BYTES // header.cluster_size),
            node.counters,
            name="refcount_cache",
            store=self._store_metadata,
            encode=bytes,
            min_capacity=_MIN_REFCOUNT_BLOCKS,
        )
        self.refcounts = Refcounts(
            codec=RefcountCodec(header.refcount_order, header.cluster_bits),
            cluster_bits=header.cluster_bits,
            table=table,
            table_offset=header.refcount_table_offset,
            table_clusters=header.refcount_table_clusters,
            cache=cache,
            load_block=self._load_refcount_block,
            counters=node.counters,
            label=node.label,
            guard=self._check_not_metadata,
        )
        self._fixed_metadata = self._metadata_ranges()
        self._active_l2 = {entry & L1E_OFFSET_MASK for entry in node._l1} - {0}
        node.l2_cache.enable_write_back(self._store_metadata, encode_table,
                                        self._before_l2_write_back)
        self._zeros = bytes(header.cluster_size)

    def _metadata_ranges(self) -> list[tuple[int, int, str]]:
        """The structures whose place never changes while open: ``(start, end, what)``."""
        node = self.node
        header = node.header
        assert header is not None
        ranges = [(0, header.cluster_size, "header")]
        if header.l1_size:
            ranges.append((header.l1_table_offset,
                           header.l1_table_offset + header.l1_size * 8, "active L1 table"))
        if node.snapshots:
            ranges.append((header.snapshots_offset,
                           header.snapshots_offset + node.snapshots[-1].entry_end,
                           "snapshot table"))
        for snapshot in node.snapshots:
            ranges.append((snapshot.l1_table_offset,
                           snapshot.l1_table_offset + snapshot.l1_size * 8,
                           f"snapshot {snapshot.id} L1 table"))
        return ranges

    def _check_not_metadata(self, offset: int, length: int) -> None:
        """QEMU's metadata overlap check ("constant" and "cached" parts): a cluster the
        refcounts call free must not hold the header, an L1 table, the snapshot table, the
        refcount table or a block, or an active L2 table. If it does, the image is corrupt and
        writing on would destroy it: refuse."""
        node = self.node
        refcounts = self.refcounts
        assert refcounts is not None and node.header is not None
        end = offset + length
        found = next((what for start, stop, what in self._fixed_metadata
                      if start < end and offset < stop), None)
        if found is None:
            table_start = refcounts.table_offset
            if table_start < end and offset < table_start + (
                    refcounts.table_clusters << node.header.cluster_bits):
                found = "refcount table"
        if found is None:
            mask = ~(node.header.cluster_size - 1)
            for cluster in range(offset & mask, end, node.header.cluster_size):
                if cluster in self._active_l2:
                    found = "an active L2 table"
                    break
                if cluster in refcounts.block_offsets:
                    found = "a refcount block"
                    break
        if found is not None:
            self._broken = (f"refcounts call clusters at {offset:#x} free, but they hold the "
                            f"{found}: the image is corrupt; repair it with "
                            "'qemu-img check -r all'")
            raise FormatError(self._broken, path=node.label, field="refcount block",
                              offset=offset)

    async def _load_refcount_block(self, offset: int) -> bytearray:
        node = self.node
        assert node.header is not None
        if offset & (node.header.cluster_size - 1):
            raise FormatError(f"refcount block offset {offset:#x} is not cluster aligned",
                              path=node.label, field="refcount table entry")
        return bytearray(await node.read_metadata(offset, node.header.cluster_size,
                                                  "refcount block"))

    # -- requests in flight -----------------------------------------------------------------------

    def io_begin(self) -> int:
        """Mark a request that uses a mapping looked up without the lock; returns its token."""
        epoch = self._epoch
        self._active[epoch] = self._active.get(epoch, 0) + 1
        return epoch

    def io_end(self, epoch: int) -> None:
        left = self._active[epoch] - 1
        if left:
            self._active[epoch] = left
        else:
            del self._active[epoch]

    def _free_later(self, offset: int, length: int, *, discard: bool = False) -> None:
        """Queue a refcount decrement for after the metadata that dropped the reference is on
        disk, and after the requests that may still use it have finished."""
        self._pending_frees.append(_PendingFree(self._epoch, offset, length, discard))
        self._epoch += 1

    def _free_entry_later(self, entry: int, *, discard: bool = False) -> None:
        """Queue the host cluster(s) an L2 entry references (QEMU's qcow2_free_any_cluster):
        a compressed cluster's bytes (every host cluster they touch loses a reference), or a
        data cluster. ``discard``: the guest asked for it, so a host cluster whose count drops
        to 0 is punched too. An external data file has no counts: its cluster is punched by
        the caller at once (:meth:`_punch_data_file`)."""
        node = self.node
        g = node.geometry
        assert g is not None and node.header is not None
        if entry & OFLAG_COMPRESSED:
            host, stored = g.compressed(entry)
            self._free_later(host, stored, discard=discard)
        elif not is_allocated(g, entry):
            return
        elif not g.has_data_file:
            self._free_later(entry & L2E_OFFSET_MASK, g.cluster_size, discard=discard)
        elif discard and not node.header.data_file_raw:
            # (data_file_raw: zero() and discard() zeroed the data file already.)
            self._data_punches.append(entry & L2E_OFFSET_MASK)

    async def _punch_data_file(self) -> None:
        """Punch the external data file's clusters that a discard or an unmapping zero just
        unmapped (QEMU passes the discard to the data file at once, as here: a crash before
        the L2 slice is written leaves it pointing at zeros, which is what the guest asked
        for). Caller holds the lock, so no write can reuse the clusters before the punch."""
        node = self.node
        g = node.geometry
        assert g is not None
        punches, self._data_punches = self._data_punches, []
        for start, stop in _runs({host >> g.cluster_bits for host in punches}):
            offset = start << g.cluster_bits
            end = min(stop << g.cluster_bits, node._data.size)
            if end > offset:
                self._unsynced_data = True
                await node._data.discard(offset, end - offset)

    # -- writing to the children ------------------------------------------------------------------

    async def _store_metadata(self, offset: int, data: bytes) -> None:
        self._unsynced_file = True
        self.node.counters.metadata_writebacks += 1
        await self.node.file.pwrite(offset, data)

    async def _write_data(self, host: int, data: Buffer) -> None:
        node = self.node
        if node._data is node.file:
            self._unsynced_file = True
        else:
            self._unsynced_data = True
        await node._data.pwrite(host, data)

    async def _zero_data(self, host: int, length: int, *, may_unmap: bool = False) -> None:
        node = self.node
        if node._data is node.file:
            self._unsynced_file = True
        else:
            self._unsynced_data = True
        await node._data.zero(host, length, may_unmap=may_unmap)

    async def _sync(self) -> None:
        """Make every write so far durable (only the children that were written)."""
        node = self.node
        if self._unsynced_data:
            self._unsynced_data = False
            try:
                await node._data.flush()
            except BaseException:
                self._unsynced_data = True
                raise
        if self._unsynced_file:
            self._unsynced_file = False
            node.counters.metadata_flushes += 1
            try:
                await node.file.flush()
            except BaseException:
                self._unsynced_file = True
                raise

    async def _write_incompatible(self, header: Header, value: int) -> Header:
        file = self.node.file
        await file.pwrite(_INCOMPATIBLE_OFFSET, value.to_bytes(8, "big"))
        await file.flush()
        return replace(header, incompatible_features=value)

    async def _mark_dirty(self) -> None:
        """Lazy refcounts: the dirty bit is on disk before any metadata change (QEMU's
        qcow2_mark_dirty)."""
        node = self.node
        header = node.header
        assert header is not None
        if not self._lazy or header.dirty:
            return
        node.header = await self._write_incompatible(
            header, header.incompatible_features | INCOMPAT_DIRTY)
        self._marked_dirty = True

    # -- metadata write-back, in order ------------------------------------------------------------

    async def _before_l2_write_back(self) -> None:
        """What a dirty L2 slice may point at is on disk first (the hook of the L2 cache)."""
        if not self._lazy:
            await self._write_back_refcounts()
        await self._sync()

    async def _write_back_refcounts(self) -> None:
        """Refcount blocks, then (after a sync) the refcount table entries -- or a whole new
        table and the header that points at it."""
        refcounts = self.refcounts
        node = self.node
        assert refcounts is not None and node.header is not None
        await refcounts.cache.write_back()
        if not refcounts.relocated and not refcounts.dirty_entries:
            return
        await self._sync()
        table = refcounts.table
        if refcounts.relocated:
            await self._store_metadata(refcounts.table_offset, encode_table(table))
            await self._sync()
            await node.file.pwrite(_REFTABLE_FIELDS_OFFSET, _REFTABLE_FIELDS.pack(
                refcounts.table_offset, refcounts.table_clusters))
            self._unsynced_file = True
            node.header = replace(node.header, refcount_table_offset=refcounts.table_offset,
                                  refcount_table_clusters=refcounts.table_clusters)
            refcounts.relocated = False
            refcounts.dirty_entries.clear()
            for offset, clusters in refcounts.retired_tables:
                self._free_later(offset, clusters * node.header.cluster_size)
            refcounts.retired_tables.clear()
            return
        for start, stop in _runs(refcounts.dirty_entries):
            await self._store_metadata(refcounts.table_offset + 8 * start,
                                       encode_table(table[start:stop]))
        refcounts.dirty_entries.clear()

    async def _write_l1(self) -> None:
        node = self.node
        assert node.header is not None
        dirty, self._l1_dirty = self._l1_dirty, set()
        try:
            for start, stop in _runs(dirty):
                await self._store_metadata(node.header.l1_table_offset + 8 * start,
                                           encode_table(node._l1[start:stop]))
        except BaseException:
            self._l1_dirty |= dirty
            raise

    async def write_back(self) -> None:
        """All dirty metadata to the disk, in the crash-safe order; then the queued frees.
        Caller holds the lock. The caller syncs at the end (the node's flush does)."""
        node = self.node
        assert node.l2_cache is not None and self.refcounts is not None
        if not self._lazy:
            await self._write_back_refcounts()
        if node.l2_cache.dirty:
            await node.l2_cache.write_back()
        if self._l1_dirty:
            await self._sync()  # the new L2 tables' contents and counts
            await self._write_l1()
        if self._pending_frees:
            await self._sync()  # nothing on disk references them any more
            await self._apply_frees()
        await self._write_back_refcounts()

    async def _apply_frees(self) -> None:
        refcounts = self.refcounts
        node = self.node
        assert refcounts is not None and node.header is not None
        oldest = min(self._active) if self._active else math.inf
        ready = [f for f in self._pending_frees if f.epoch < oldest]
        if not ready:
            return
        self._pending_frees = [f for f in self._pending_frees if f.epoch >= oldest]
        cluster_bits = node.header.cluster_bits
        punch: set[int] = set()
        for free in ready:
            await refcounts.change(free.offset, free.length, -1)
            first = free.offset >> cluster_bits
            last = (free.offset + free.length - 1) >> cluster_bits
            node.counters.clusters_freed += last - first + 1
            if free.discard:
                # As QEMU's update_refcount_discard: every host cluster whose count dropped to
                # 0 (a compressed cluster's bytes may share theirs with others).
                for cluster in range(first, last + 1):
                    if await refcounts.get(cluster) == 0:
                        punch.add(cluster)
        # The host file gets the holes too (QEMU's pass-discard-request). The clusters are
        # free in the cache only; on disk their counts drop later -- a crash in between leaks
        # them, with nothing referencing their (now zero) contents.
        file = node.file
        for start, stop in _runs(punch):
            offset = start << cluster_bits
            end = min(stop << cluster_bits, file.size)
            if end > offset:
                self._unsynced_file = True
                await file.discard(offset, end - offset)

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
        node = self.node
        with trio.CancelScope(shield=True):
            async with self.lock:
                await self.write_back()
                await self._sync()
                if self._marked_dirty and node.header is not None:
                    node.header = await self._write_incompatible(
                        node.header, node.header.incompatible_features & ~INCOMPAT_DIRTY)
                    self._marked_dirty = False

    async def pwrite(self, offset: int, data: Buffer) -> None:
        """Write ``data``; whole (sub)clusters of zeros become zero clusters (unallocated ones
        on a v2 image without a backing file), and so does a part of one whose rest reads as
        zeros with nothing stored (see :meth:`zero`): QEMU's ``detect-zeroes=on``. Everything
        else takes the data path."""
        node = self.node
        g = node.geometry
        assert g is not None
        view = memoryview(data).cast("B") if not isinstance(data, bytes) else memoryview(data)
        if g.zero_flag or g.extended_l2 or node.backing is None:
            unit = 1 << subcluster_bits(g)
            end = offset + len(view)
            first = -(-offset // unit) * unit
            last = end if end == node.size else end // unit * unit
            zeros = self._zeros
            if (len(view) <= len(zeros) and view[0] == 0 and view[-1] == 0
                    and zeros.startswith(view) and self._in_place_host(offset, len(view)) < 0):
                # Up to a cluster of zeros, not into a cluster written in place (a file system
                # zeroing a 4 KiB block): a zero request, which allocates nothing where the
                # (sub)clusters read as zeros anyway.
                node.counters.zero_writes_detected += 1
                await self.zero(offset, len(view), may_unmap=False)
                return
            if first < last and len(view) >= unit:
                pos = offset
                chunk = first
                while chunk < last:
                    n = min(unit, last - chunk)
                    piece = view[chunk - offset : chunk - offset + n]
                    if piece[0] == 0 and piece[-1] == 0 and zeros.startswith(piece):
                        run_end = chunk + n
                        while run_end < last:
                            n2 = min(unit, last - run_end)
                            more = view[run_end - offset : run_end - offset + n2]
                            if not (more[0] == 0 and zeros.startswith(more)):
                                break
                            run_end += n2
                        if pos < chunk:
                            await self.write(pos, view[pos - offset : chunk - offset])
                        node.counters.zero_writes_detected += 1
                        await self.zero(chunk, run_end - chunk, may_unmap=False)
                        pos = chunk = run_end
                        continue
                    chunk += n
                if pos < end:
                    await self.write(pos, view[pos - offset :])
                return
        await self.write(offset, view)

    async def write(self, offset: int, data: memoryview) -> None:
        """The data path: in place, or allocating with copy on write."""
        end = offset + len(data)
        pos = offset
        while pos < end:
            pos += await self._write_step(pos, data[pos - offset :])

    # -- the data path ----------------------------------------------------------------------------

    def _in_place_host(self, offset: int, length: int) -> int:
        """The host offset for a write that lies in one cluster the image owns, fully
        allocated, whose L2 slice is cached and which no allocation holds; else -1."""
        node = self.node
        in_cluster = offset & node._cluster_mask
        if in_cluster + length > node._cluster_size:
            return -1
        cluster = offset >> node._cluster_bits
        l1_index = cluster >> node._l2_bits
        l1_entry = node._l1[l1_index]
        if not l1_entry & OFLAG_COPIED:
            return -1
        index = cluster & node._l2_index_mask
        key = (l1_entry & L1E_OFFSET_MASK) + ((index >> node._slice_bits) << node._slice_shift)
        table = node._slices.get(key)
        if table is None:
            return -1
        if node._extended:
            at = (index & node._slice_mask) << 1
            if table[at + 1] & ALL_SUBCLUSTERS != ALL_SUBCLUSTERS:
                return -1
            entry = table[at]
        else:
            entry = table[index & node._slice_mask]
        host = entry & L2E_OFFSET_MASK
        if entry & node._not_plain or host & node._cluster_mask:
            return -1
        if node._has_data_file:
            if host != offset - in_cluster or not (host or entry & OFLAG_COPIED):
                return -1
        elif not host or not entry & OFLAG_COPIED:
            return -1
        if self.inflight and self.inflight.overlaps(offset - in_cluster,
                                                    offset - in_cluster + node._cluster_size):
            return -1
        return host + in_cluster

    async def _write_step(self, pos: int, data: memoryview) -> int:
        """Write a prefix of ``data`` at guest ``pos``; returns its length."""
        node = self.node
        g = node.geometry
        assert g is not None
        length = len(data)
        host = self._in_place_host(pos, length)
        if host >= 0:
            # The common case once a cluster exists: no lock, no metadata.
            token = self.io_begin()
            try:
                await self._write_data(host, data)
            finally:
                self.io_end(token)
            node.counters.in_place_writes += 1
            return length

        slice_span = 1 << (g.cluster_bits + g.slice_bits)
        length = min(length, slice_span - (pos & (slice_span - 1)))
        while True:
            async with self.lock:
                blocker, length = self.inflight.blocking(pos, length)
                if blocker is None:
                    plan = await self._plan(pos, length)
                    break
            node.counters.allocation_waits += 1
            await blocker.done.wait()
            length = min(len(data), slice_span - (pos & (slice_span - 1)))

        if plan.action == Action.IN_PLACE:
            try:
                await self._write_data(plan.host, data[: plan.length])
            finally:
                self.io_end(plan.token)
            node.counters.in_place_writes += 1
            return plan.length
        await self._perform(plan, pos, data[: plan.length])
        return plan.length

    async def _writable_slice(self, guest: int) -> tuple[int, array[int]]:
        """The cached L2 slice mapping ``guest``, in an L2 table this image owns (allocated or
        copied first if needed: QEMU's get_cluster_table). Caller holds the lock; the slice may
        be changed only before the caller's next await."""
        node = self.node
        g = node.geometry
        assert g is not None and node.l2_cache is not None
        if self._broken is not None:
            raise FormatError(self._broken, path=node.label, field="refcount block")
        l1_index = guest >> g.l2_coverage_bits
        if l1_index >= len(node._l1):
            raise FormatError(f"guest offset {guest:#x} lies beyond the L1 table",
                              path=node.label, field="l1_size")
        l1_entry = node._l1[l1_index]
        if not l1_entry & OFLAG_COPIED:
            await self._allocate_l2_table(l1_index, l1_entry & L1E_OFFSET_MASK)
            l1_entry = node._l1[l1_index]
        l2_offset = l1_entry & L1E_OFFSET_MASK
        if l2_offset & (g.cluster_size - 1):
            raise FormatError(f"L2 table offset {l2_offset:#x} is not cluster aligned",
                              path=node.label, field=f"L1 entry {l1_index}")
        key = g.slice_offset(l2_offset, guest)
        table = await node.l2_cache.get(key, node._load_slice, write_back=True)
        return key, table

    async def _allocate_l2_table(self, l1_index: int, old_offset: int) -> None:
        """A new L2 table for ``l1_index``: empty, or a copy of the shared one it replaces."""
        node = self.node
        g = node.geometry
        refcounts = self.refcounts
        assert g is not None and refcounts is not None and node.l2_cache is not None
        cluster_size = g.cluster_size
        await self._mark_dirty()
        if old_offset:
            if old_offset & (cluster_size - 1):
                raise FormatError(f"L2 table offset {old_offset:#x} is not cluster aligned",
                                  path=node.label, field=f"L1 entry {l1_index}")
            content = bytearray(await node.read_metadata(old_offset, cluster_size, "L2 table"))
            # Cached slices are at least as new as the disk.
            for at in range(0, cluster_size, g.slice_bytes):
                cached = node.l2_cache.peek(old_offset + at)
                if cached is not None:
                    content[at : at + g.slice_bytes] = encode_table(cached)
        else:
            content = self._zeros
        offset = await refcounts.allocate(1)
        self._forget_cached(offset, cluster_size)
        try:
            await self._store_metadata(offset, content)
        except BaseException:
            await refcounts.change(offset, cluster_size, -1)
            raise
        node._l1[l1_index] = offset | OFLAG_COPIED
        self._l1_dirty.add(l1_index)
        self._active_l2.add(offset)
        if old_offset:
            self._active_l2.discard(old_offset)
            self._free_later(old_offset, cluster_size)
        node.counters.l2_tables_allocated += 1

    def _forget_cached(self, offset: int, length: int) -> None:
        """A cluster that may have held metadata before is reused: drop stale cache entries."""
        node = self.node
        g = node.geometry
        assert g is not None and node.l2_cache is not None and self.refcounts is not None
        node.l2_cache.invalidate_range(offset, offset + length, g.slice_bytes)
        self.refcounts.cache.invalidate_range(offset, offset + length, g.cluster_size)

    async def _plan(self, pos: int, length: int) -> _Plan:
        """Under the lock: how the write of ``length`` bytes at ``pos`` proceeds (at most one
        L2 slice, a run of clusters of one kind)."""
        node = self.node
        g = node.geometry
        assert g is not None and self.refcounts is not None
        cluster_size = g.cluster_size
        _key, table = await self._writable_slice(pos)
        index = (pos >> g.cluster_bits) & (g.slice_entries - 1)
        cluster_start = pos & ~(cluster_size - 1)
        in_cluster = pos - cluster_start
        end = pos + length
        extended = g.extended_l2
        step = 2 if extended else 1

        def entry_at(i: int) -> tuple[int, int]:
            return (table[step * i], table[step * i + 1]) if extended else (table[i], 0)

        entry, bitmap = entry_at(index)
        first = plan_cluster(g, entry, bitmap, in_cluster, min(cluster_size, end - cluster_start))
        if first.action == Action.IN_PLACE:
            count = 1
            host = first.host
            while cluster_start + count * cluster_size < end and index + count < g.slice_entries:
                following, following_bitmap = entry_at(index + count)
                write_to = min(cluster_size, end - cluster_start - count * cluster_size)
                nxt = plan_cluster(g, following, following_bitmap, 0, write_to)
                if nxt.action != Action.IN_PLACE or nxt.host != host + count * cluster_size:
                    break
                count += 1
            n = min(length, count * cluster_size - in_cluster)
            return _Plan(Action.IN_PLACE, host=first.host + in_cluster, length=n,
                         token=self.io_begin())
        if first.action == Action.KEEP:
            n = min(length, cluster_size - in_cluster)
            inflight = self.inflight.add(cluster_start, cluster_start + cluster_size)
            return _Plan(Action.KEEP, host=first.host, length=n, guest=cluster_start,
                         clusters=1, cow_from=cluster_start + first.cow_from,
                         cow_to=cluster_start + first.cow_to, inflight=inflight)
        # NEW: as many following clusters as also need a new cluster.
        count = 1
        old = [(entry, bitmap)]
        while cluster_start + count * cluster_size < end and index + count < g.slice_entries:
            following, following_bitmap = entry_at(index + count)
            if not needs_new_cluster(g, following):
                break
            old.append((following, following_bitmap))
            count += 1
        n = min(length, count * cluster_size - in_cluster)
        last_start = cluster_start + (count - 1) * cluster_size
        last_entry, last_bitmap = old[-1]
        last = plan_cluster(g, last_entry, last_bitmap, max(0, pos - last_start),
                            pos + n - last_start)
        cow_from = cluster_start + first.cow_from
        cow_to = last_start + last.cow_to
        data_node = node._data
        await self._mark_dirty()
        if g.has_data_file:
            host = cluster_start
        else:
            host = await self.refcounts.allocate(count)
            node.counters.clusters_allocated += count
        # Never written since the file ended before it: reads as zeros without writing them.
        fresh = host >= data_node.size
        if not fresh and not g.has_data_file:
            self._forget_cached(host, count * cluster_size)
        inflight = self.inflight.add(cluster_start, cluster_start + count * cluster_size)
        return _Plan(Action.NEW, host=host, length=n, guest=cluster_start, clusters=count,
                     cow_from=cow_from, cow_to=cow_to, inflight=inflight, fresh=fresh,
                     unallocated=not any(e or b for e, b in old))

    async def _perform(self, plan: _Plan, pos: int, data: memoryview) -> None:
        """Write the data and what is copied around it, then link the L2 entries."""
        node = self.node
        assert plan.inflight is not None
        try:
            await self._write_with_cow(plan, pos, data)
        except BaseException:
            with trio.CancelScope(shield=True):
                async with self.lock:
                    try:
                        if plan.action == Action.NEW and not node._has_data_file:
                            # Never referenced: the clusters are free again at once.
                            assert self.refcounts is not None and node.geometry is not None
                            await self.refcounts.change(
                                plan.host, plan.clusters * node.geometry.cluster_size, -1)
                    finally:
                        self.inflight.finish(plan.inflight)
            raise
        with trio.CancelScope(shield=True):
            async with self.lock:
                try:
                    await self._link(plan)
                finally:
                    self.inflight.finish(plan.inflight)

    async def _write_with_cow(self, plan: _Plan, pos: int, data: memoryview) -> None:
        node = self.node
        g = node.geometry
        assert g is not None
        counters = node.counters
        guest, host = plan.guest, plan.host
        write_end = pos + len(data)
        head = await self._cow_source(plan.cow_from, pos - plan.cow_from, plan)
        tail = await self._cow_source(write_end, plan.cow_to - write_end, plan)
        if head is not None or tail is not None:
            counters.cow_operations += 1
            counters.cow_bytes += (pos - plan.cow_from) + (plan.cow_to - write_end)
        if len(data) <= _MERGE_LIMIT and (head is not None or tail is not None):
            start = plan.cow_from if head is not None else pos
            stop = plan.cow_to if tail is not None else write_end
            buffer = bytearray(stop - start)
            if head is not None:
                buffer[: len(head)] = head
            buffer[pos - start : write_end - start] = data
            if tail is not None:
                buffer[write_end - start :] = tail
            await self._write_data(host + start - guest, buffer)
        else:
            if head is not None:
                await self._write_data(host + plan.cow_from - guest, head)
            await self._write_data(host + pos - guest, data)
            if tail is not None:
                await self._write_data(host + write_end - guest, tail)
        if plan.fresh:
            # Zeros left unwritten read back only if the file covers the cluster(s).
            data_node = node._data
            alloc_end = host + plan.clusters * g.cluster_size
            if data_node.size < alloc_end:
                start = max(data_node.size, host)
                await self._zero_data(start, alloc_end - start)

    async def _cow_source(self, guest: int, length: int, plan: _Plan) -> Buffer | None:
        """What the guest saw at ``[guest, guest + length)`` before this write, or None when
        nothing needs writing there (empty, or zeros into a fresh cluster)."""
        if length <= 0:
            return None
        node = self.node
        # Unallocated with nothing below reads as zeros: known without mapping it again.
        zero = (plan.unallocated and node.backing_length(guest, length) == 0) or (
            await node._reads_as_zero(guest, length))
        if zero:
            if plan.fresh:
                return None
            return self._zeros[:length] if length <= len(self._zeros) else bytes(length)
        return await node._pread_mapped(guest, length)

    async def _link(self, plan: _Plan) -> None:
        """Point the L2 entries at the written clusters (QEMU's link_l2); queue the old
        clusters' frees. Caller holds the lock."""
        node = self.node
        g = node.geometry
        assert g is not None
        cluster_size = g.cluster_size
        key, table = await self._writable_slice(plan.guest)
        index = (plan.guest >> g.cluster_bits) & (g.slice_entries - 1)
        step = 2 if g.extended_l2 else 1
        for j in range(plan.clusters):
            at = step * (index + j)
            cluster = plan.guest + j * cluster_size
            old_entry = table[at]
            old_bitmap = table[at + 1] if g.extended_l2 else 0
            written_from = max(plan.cow_from, cluster) - cluster
            written_to = min(plan.cow_to, cluster + cluster_size) - cluster
            host = plan.host + j * cluster_size
            entry, bitmap = linked_entry(g, host, old_entry, old_bitmap, written_from, written_to)
            table[at] = entry
            if g.extended_l2:
                table[at + 1] = bitmap
            if plan.action == Action.NEW:
                self._free_entry_later(old_entry)
        assert node.l2_cache is not None
        node.l2_cache.mark_dirty(key)
        node.counters.allocating_writes += 1
        if len(self._pending_frees) >= self._free_checkpoint:
            # Make the freed clusters reusable. (Frees that requests in flight still hold stay
            # queued: the next checkpoint waits for as many new ones, not for every link.)
            await self.write_back()
            self._free_checkpoint = len(self._pending_frees) + _MAX_PENDING_FREES

    # -- zero and discard -------------------------------------------------------------------------

    async def zero(self, offset: int, length: int, *, may_unmap: bool) -> None:
        """Make ``[offset, offset + length)`` read as zeros (QEMU's qcow2_co_pwrite_zeroes):
        whole (sub)clusters are marked zero (or, on v2 without a backing file, unallocated); a
        partial one at either end is marked whole when the rest of it reads as zeros already
        and nothing is stored there, else written with zeros as data -- as everything is on a
        v2 image with a backing file, which has no way to mark zeros."""
        node = self.node
        g = node.geometry
        header = node.header
        assert g is not None and header is not None
        if header.data_file_raw:
            # The data file stays a consistent raw image (QEMU zeroes it first as well).
            await self._zero_data(offset, length, may_unmap=may_unmap)
        end = offset + length
        if header.version < 3 and node.backing is not None:
            await self._write_zeros(offset, length)
            return
        unit = 1 << subcluster_bits(g)
        first = -(-offset // unit) * unit
        last = end if end == node.size else end // unit * unit
        # The partial units at the ends (one, when the range lies inside a unit).
        head = (offset, min(first, end)) if offset < first else None
        tail = (max(last, offset), end) if last < end else None
        if head is not None and head == tail:
            tail = None
        if head is not None:
            await self._zero_partial(*head, may_unmap)
        pos = first
        while pos < last:
            pos = await self._zero_step(pos, last, may_unmap)
        if tail is not None:
            await self._zero_partial(*tail, may_unmap)

    async def _zero_partial(self, start: int, stop: int, may_unmap: bool) -> bool:
        """Zero ``[start, stop)``, a part of one (sub)cluster: the whole unit is marked zero if
        nothing is stored in it and the rest of it reads as zeros (QEMU's head and tail
        check, decided under the lock so that no write lands in between); else zeros are
        written as data. Returns whether the unit was marked."""
        node = self.node
        g = node.geometry
        assert g is not None
        unit = 1 << subcluster_bits(g)
        unit_start = start // unit * unit
        unit_end = min(unit_start + unit, node.size)
        marked = False
        while True:
            async with self.lock:
                blocker, _n = self.inflight.blocking(unit_start, unit_end - unit_start)
                if blocker is None:
                    if await self._only_zeros_around(unit_start, unit_end, start, stop):
                        marked = not await self._zero_locked(unit_start, unit_end, may_unmap)
                    break
            node.counters.allocation_waits += 1
            await blocker.done.wait()
        if not marked:
            await self._write_zeros(start, stop - start)
        return marked

    async def _only_zeros_around(self, unit_start: int, unit_end: int, start: int,
                                 stop: int) -> bool:
        """Whether the unit ``[unit_start, unit_end)`` stores nothing here (zero or
        unallocated: QEMU's ZERO and UNALLOCATED subcluster types) and reads as zeros outside
        ``[start, stop)``. Caller holds the lock."""
        node = self.node
        for run in await node._map(unit_start, unit_end - unit_start):
            if run.kind is RunKind.ZERO:
                continue
            if run.kind is not RunKind.BACKING:
                return False
            for lo, hi in ((run.offset, min(run.end, start)), (max(run.offset, stop), run.end)):
                if hi > lo and node.backing_length(lo, hi - lo):
                    return False
        return True

    async def _write_zeros(self, offset: int, length: int) -> None:
        end = offset + length
        while offset < end:
            n = min(_ZERO_CHUNK, end - offset)
            zeros = self._zeros if n <= len(self._zeros) else bytes(n)
            await self.write(offset, memoryview(zeros)[:n])
            offset += n

    async def _zero_step(self, pos: int, last: int, may_unmap: bool) -> int:
        """Zero whole (sub)clusters from ``pos`` within one L2 slice; returns where it ended."""
        node = self.node
        g = node.geometry
        assert g is not None
        slice_span = 1 << (g.cluster_bits + g.slice_bits)
        stop = min(last, (pos | (slice_span - 1)) + 1)
        while True:
            async with self.lock:
                blocker, n = self.inflight.blocking(pos, stop - pos)
                if blocker is None:
                    stop = pos + n
                    fallback = await self._zero_locked(pos, stop, may_unmap)
                    break
            node.counters.allocation_waits += 1
            await blocker.done.wait()
        # What cannot be marked (part of a compressed cluster, v2 partial clusters): zeros as
        # data, outside the lock like any write.
        for start, end in fallback:
            await self._write_zeros(start, end - start)
        return stop

    async def _zero_locked(self, pos: int, stop: int, may_unmap: bool) -> list[tuple[int, int]]:
        """Under the lock: mark ``[pos, stop)`` (one L2 slice) zero as QEMU's zero_in_l2_slice
        and zero_l2_subclusters do. Returns the ranges left to write as zeros."""
        node = self.node
        g = node.geometry
        header = node.header
        assert g is not None and header is not None and node.l2_cache is not None
        fallback: list[tuple[int, int]] = []
        if await self._skip_unallocated(pos, stop):
            return fallback
        await self._mark_dirty()
        key, table = await self._writable_slice(pos)
        cluster_size = g.cluster_size
        sc_bits = subcluster_bits(g)
        step = 2 if g.extended_l2 else 1
        changed = False
        cursor = pos
        while cursor < stop:
            cluster = cursor & ~(cluster_size - 1)
            piece_end = min(stop, cluster + cluster_size)
            at = step * ((cursor >> g.cluster_bits) & (g.slice_entries - 1))
            entry = table[at]
            bitmap = table[at + 1] if g.extended_l2 else 0
            whole = cursor == cluster and (piece_end == cluster + cluster_size
                                           or piece_end == node.size)
            if header.version < 3:
                # No zero flag: without a backing file, unallocated reads as zeros (QEMU
                # discards); zero() wrote zeros as data for an image with a backing file.
                if not whole:
                    fallback.append((cursor, piece_end))
                elif entry:
                    table[at] = 0
                    self._free_entry_later(entry, discard=True)
                    changed = True
            elif whole:
                unmap = bool(entry & OFLAG_COMPRESSED) or (may_unmap and is_allocated(g, entry))
                new_entry = 0 if unmap else entry
                if g.extended_l2:
                    new_bitmap = ALL_ZERO_BITMAP
                else:
                    new_entry |= OFLAG_ZERO
                    new_bitmap = 0
                if (new_entry, new_bitmap) != (entry, bitmap):
                    table[at] = new_entry
                    if g.extended_l2:
                        table[at + 1] = new_bitmap
                    changed = True
                    node.counters.zero_clusters_written += 1
                    if unmap:
                        self._free_entry_later(entry, discard=True)
            elif g.extended_l2 and not entry & OFLAG_COMPRESSED:
                first_sc = (cursor - cluster) >> sc_bits
                last_sc = (piece_end - cluster - 1) >> sc_bits
                span = ((1 << (last_sc + 1)) - 1) & ~((1 << first_sc) - 1)
                new_bitmap = (bitmap | span << 32) & ~span
                if new_bitmap != bitmap:
                    table[at + 1] = new_bitmap
                    changed = True
                    node.counters.zero_clusters_written += 1
            else:
                # A compressed cluster cannot be zeroed in part.
                fallback.append((cursor, piece_end))
            cursor = piece_end
        if changed:
            node.l2_cache.mark_dirty(key)
        if self._data_punches:
            await self._punch_data_file()
        return fallback

    async def _skip_unallocated(self, start: int, stop: int) -> bool:
        """Whether ``[start, stop)`` already reads as zeros with nothing allocated here and no
        backing file below: then zeroing it changes nothing (and allocates no L2 table)."""
        node = self.node
        if node.backing_length(start, stop - start):
            return False
        g = node.geometry
        assert g is not None
        l1_entry = node._l1[start >> g.l2_coverage_bits]
        if not l1_entry & L1E_OFFSET_MASK:
            return True
        runs = await node._map(start, stop - start)
        return len(runs) == 1 and runs[0].kind is RunKind.BACKING  # unallocated

    async def discard(self, offset: int, length: int) -> None:
        """Deallocate whole clusters (QEMU's qcow2_co_pdiscard and qcow2_cluster_discard): they
        read as zeros afterwards; partial clusters are left alone, except the image's partial
        last cluster when the range covers it from its start. A v2 image with a backing file
        is left alone too: without the zero flag, a discarded cluster would show the backing
        file's stale data (QEMU refuses it, and a refused discard is no error)."""
        node = self.node
        g = node.geometry
        header = node.header
        assert g is not None and header is not None
        if header.version < 3 and node.backing is not None:
            return
        cluster_size = g.cluster_size
        end = offset + length
        first = -(-offset // cluster_size) * cluster_size
        last = end if end == node.size else end // cluster_size * cluster_size
        if first < last and header.data_file_raw:
            # QEMU leaves the data file as it was, so that it no longer matches what the image
            # reads (zeros); zeroing it keeps the two views one disk.
            await self._zero_data(first, last - first, may_unmap=True)
        pos = first
        slice_span = 1 << (g.cluster_bits + g.slice_bits)
        while pos < last:
            stop = min(last, (pos | (slice_span - 1)) + 1)
            async with self.lock:
                blocker, n = self.inflight.blocking(pos, stop - pos)
                if blocker is not None:
                    node.counters.allocation_waits += 1
                else:
                    stop = pos + n
                    if not await self._skip_unallocated(pos, stop):
                        await self._discard_slice(pos, stop)
                    pos = stop
                    continue
            await blocker.done.wait()

    async def _discard_slice(self, pos: int, stop: int) -> None:
        node = self.node
        g = node.geometry
        header = node.header
        assert g is not None and header is not None and node.l2_cache is not None
        await self._mark_dirty()
        key, table = await self._writable_slice(pos)
        step = 2 if g.extended_l2 else 1
        changed = False
        for cluster in range(pos, stop, g.cluster_size):
            at = step * ((cluster >> g.cluster_bits) & (g.slice_entries - 1))
            entry = table[at]
            bitmap = table[at + 1] if g.extended_l2 else 0
            if node.backing is None and not is_allocated(g, entry) and not (
                    entry & OFLAG_COMPRESSED):
                continue
            if g.extended_l2:
                new_entry, new_bitmap = 0, ALL_ZERO_BITMAP
            else:
                new_entry, new_bitmap = (OFLAG_ZERO if header.version >= 3 else 0), 0
            if (new_entry, new_bitmap) == (entry, bitmap):
                continue
            table[at] = new_entry
            if g.extended_l2:
                table[at + 1] = new_bitmap
            self._free_entry_later(entry, discard=True)
            node.counters.clusters_discarded += 1
            changed = True
        if changed:
            node.l2_cache.mark_dirty(key)
        if self._data_punches:
            await self._punch_data_file()


@dataclass(slots=True)
class _Plan:
    """A write step decided under the lock (QEMU's QCowL2Meta, plus the in-place case)."""

    action: Action
    #: IN_PLACE: where the data goes; KEEP/NEW: the host cluster of ``guest``.
    host: int
    #: Bytes of the request this step covers.
    length: int
    #: First guest cluster (KEEP/NEW) and how many.
    guest: int = 0
    clusters: int = 0
    #: Guest range holding data afterwards (written or copied).
    cow_from: int = 0
    cow_to: int = 0
    inflight: Inflight | None = None
    #: The new clusters lie past the end of the data file: zeros need no writing.
    fresh: bool = False
    #: Every cluster was unallocated here (entry and bitmap 0): the old content is the backing
    #: file's, or zeros.
    unallocated: bool = False
    #: IN_PLACE: the io_begin token to end after the write.
    token: int = 0


def _runs(indices: set[int]) -> list[tuple[int, int]]:
    """Sorted indices as ``[start, stop)`` runs of consecutive values."""
    runs: list[tuple[int, int]] = []
    for index in sorted(indices):
        if runs and runs[-1][1] == index:
            runs[-1] = (runs[-1][0], index + 1)
        else:
            runs.append((index, index + 1))
    return runs
