"""Cluster allocation for a qcow2 writer (QEMU's ``qcow2_alloc_host_offset``,
``get_cluster_table``, ``qcow2_alloc_cluster_link_l2`` and the metadata overlap check): L2
tables this image owns, host clusters for a write step, the link that points the L2 entries at
them, and the guest ranges in flight meanwhile.

Every method that changes metadata runs under the write-back lock, which :meth:`Allocator.claim`
takes once no allocation in flight holds the guest range (QEMU's ``handle_dependencies``): so
two writes to one cluster never both allocate it, and a reader sees the old mapping until the
link, then the new one -- never a half-written cluster.
"""

from __future__ import annotations

from array import array
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import trio

from vdiskfs.drivers.format.qcow2.alloc import (
    Action,
    Inflight,
    InflightList,
    linked_entry,
    needs_new_cluster,
    plan_cluster,
)
from vdiskfs.drivers.format.qcow2.mapping import L1E_OFFSET_MASK, OFLAG_COPIED, encode_table
from vdiskfs.drivers.format.qcow2.refcount import Refcounts
from vdiskfs.drivers.format.qcow2.state import Qcow2State
from vdiskfs.drivers.format.qcow2.writeback import ChildWrites, WriteBack
from vdiskfs.errors import FormatError

__all__ = ["Allocation", "Allocator", "InPlace", "MetadataGuard"]

#: Queued frees beyond this trigger a metadata write-back, so that freed clusters are reused.
_MAX_PENDING_FREES = 4096


class MetadataGuard:
    """QEMU's metadata overlap check ("constant" and "cached" parts): a cluster the refcounts
    call free must not hold the header, an L1 table, the snapshot table, the refcount table or
    a block, or an active L2 table. If it does, the image is corrupt and writing on would
    destroy it: every later change is refused."""

    def __init__(self, state: Qcow2State) -> None:
        self._state = state
        header = state.header
        # The structures whose place never changes while open: (start, end, what).
        self._fixed = [(0, header.cluster_size, "header")]
        if header.l1_size:
            self._fixed.append((header.l1_table_offset,
                                header.l1_table_offset + header.l1_size * 8, "active L1 table"))
        if state.snapshots:
            self._fixed.append((header.snapshots_offset,
                                header.snapshots_offset + state.snapshots[-1].entry_end,
                                "snapshot table"))
        for snapshot in state.snapshots:
            self._fixed.append((snapshot.l1_table_offset,
                                snapshot.l1_table_offset + snapshot.l1_size * 8,
                                f"snapshot {snapshot.id} L1 table"))
        #: Host offsets of the L2 tables the active L1 table points at.
        self.active_l2 = {entry & L1E_OFFSET_MASK for entry in state.l1} - {0}
        self._broken: str | None = None

    def check(self, refcounts: Refcounts, offset: int, length: int) -> None:
        """Refuse to allocate ``[offset, offset + length)`` if it holds metadata."""
        cluster_size = self._state.geometry.cluster_size
        end = offset + length
        found = next((what for start, stop, what in self._fixed
                      if start < end and offset < stop), None)
        if found is None:
            table_start = refcounts.table_offset
            if table_start < end and offset < table_start + refcounts.table_clusters * (
                    cluster_size):
                found = "refcount table"
        if found is None:
            for cluster in range(offset & ~(cluster_size - 1), end, cluster_size):
                if cluster in self.active_l2:
                    found = "an active L2 table"
                    break
                if cluster in refcounts.block_offsets:
                    found = "a refcount block"
                    break
        if found is not None:
            self._broken = (f"refcounts call clusters at {offset:#x} free, but they hold the "
                            f"{found}: the image is corrupt; repair it with "
                            "'qemu-img check -r all'")
            raise FormatError(self._broken, path=self._state.label, field="refcount block",
                              offset=offset)

    def refuse_if_broken(self) -> None:
        if self._broken is not None:
            raise FormatError(self._broken, path=self._state.label, field="refcount block")


@dataclass(slots=True)
class InPlace:
    """A write step into clusters the image owns: no metadata changes."""

    #: Where the data goes, and how many bytes of the request go there.
    host: int
    length: int
    #: The request token (:class:`.writeback.RequestEpochs`) to end after the write.
    token: int


@dataclass(slots=True)
class Allocation:
    """A write step that allocates clusters or changes their L2 entries, decided under the
    lock (QEMU's QCowL2Meta): ``KEEP`` or ``NEW``."""

    action: Action
    #: The host cluster of ``guest``.
    host: int
    #: Bytes of the request this step covers.
    length: int
    #: First guest cluster and how many.
    guest: int
    clusters: int
    #: Guest range holding data afterwards (written or copied).
    cow_from: int
    cow_to: int
    #: The guest clusters, held until the link.
    inflight: Inflight
    #: The new clusters lie past the end of the data file: zeros need no writing.
    fresh: bool = False
    #: Every cluster was unallocated here (entry and bitmap 0): the old content is the backing
    #: file's, or zeros.
    unallocated: bool = False


class Allocator:
    """L2 tables, host clusters and links for one writable image."""

    def __init__(self, state: Qcow2State, io: ChildWrites, write_back: WriteBack,
                 refcounts: Refcounts, guard: MetadataGuard, zeros: bytes) -> None:
        self._state = state
        self._io = io
        self._wb = write_back
        self._refcounts = refcounts
        self._guard = guard
        self.inflight = InflightList()
        self._free_checkpoint = _MAX_PENDING_FREES
        #: A cluster of zeros: a new, empty L2 table.
        self._empty_table = zeros

    @asynccontextmanager
    async def claim(self, start: int, length: int) -> AsyncIterator[int]:
        """Hold the lock over a prefix of guest ``[start, start + length)`` that no allocation
        in flight holds; yields its length, cut short before the first allocation the range
        reaches. Waits (lock released) while one holds ``start``."""
        wb = self._wb
        while True:
            async with wb.lock:
                blocker, allowed = self.inflight.blocking(start, length)
                if blocker is None:
                    yield allowed
                    return
            self._state.counters.allocation_waits += 1
            await blocker.done.wait()

    # -- L2 tables --------------------------------------------------------------------------------

    async def writable_slice(self, guest: int) -> tuple[int, array[int]]:
        """The cached L2 slice mapping ``guest``, in an L2 table this image owns (allocated or
        copied first if needed: QEMU's get_cluster_table), and its cache key. Caller holds the
        lock; the slice may be changed only before the caller's next await."""
        state = self._state
        g = state.geometry
        self._guard.refuse_if_broken()
        l1_index = guest >> g.l2_coverage_bits
        if l1_index >= len(state.l1):
            raise FormatError(f"guest offset {guest:#x} lies beyond the L1 table",
                              path=state.label, field="l1_size")
        l1_entry = state.l1[l1_index]
        if not l1_entry & OFLAG_COPIED:
            await self._allocate_l2_table(l1_index, l1_entry & L1E_OFFSET_MASK)
            l1_entry = state.l1[l1_index]
        l2_offset = l1_entry & L1E_OFFSET_MASK
        state.check_l2_offset(l2_offset, l1_index)
        key = g.slice_offset(l2_offset, guest)
        table = await state.l2_cache.get(key, state.load_slice, write_back=True)
        return key, table

    async def _allocate_l2_table(self, l1_index: int, old_offset: int) -> None:
        """A new L2 table for ``l1_index``: empty, or a copy of the shared one it replaces."""
        state = self._state
        g = state.geometry
        cluster_size = g.cluster_size
        await self._wb.mark_dirty()
        content: bytes | bytearray
        if old_offset:
            state.check_l2_offset(old_offset, l1_index)
            content = bytearray(await state.read_metadata(old_offset, cluster_size, "L2 table"))
            # Cached slices are at least as new as the disk.
            for at in range(0, cluster_size, g.slice_bytes):
                cached = state.l2_cache.peek(old_offset + at)
                if cached is not None:
                    content[at : at + g.slice_bytes] = encode_table(cached)
        else:
            content = self._empty_table
        offset = await self._refcounts.allocate(1)
        self.forget_cached(offset, cluster_size)
        try:
            await self._io.store_metadata(offset, content)
        except BaseException:
            await self._refcounts.change(offset, cluster_size, -1)
            raise
        state.l1[l1_index] = offset | OFLAG_COPIED
        self._wb.l1_changed(l1_index)
        self._guard.active_l2.add(offset)
        if old_offset:
            self._guard.active_l2.discard(old_offset)
            self._wb.free_later(old_offset, cluster_size)
        state.counters.l2_tables_allocated += 1

    def forget_cached(self, offset: int, length: int) -> None:
        """A cluster that may have held metadata before is reused: drop stale cache entries."""
        g = self._state.geometry
        self._state.l2_cache.invalidate_range(offset, offset + length, g.slice_bytes)
        self._refcounts.cache.invalidate_range(offset, offset + length, g.cluster_size)

    # -- data clusters ----------------------------------------------------------------------------

    async def plan(self, pos: int, length: int) -> InPlace | Allocation:
        """Under the lock: how the write of ``length`` bytes at ``pos`` proceeds (at most one
        L2 slice, a run of clusters of one kind)."""
        state = self._state
        g = state.geometry
        cluster_size = g.cluster_size
        _key, table = await self.writable_slice(pos)
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
            return InPlace(first.host + in_cluster, n, self._wb.requests.begin())
        if first.action == Action.KEEP:
            n = min(length, cluster_size - in_cluster)
            inflight = self.inflight.add(cluster_start, cluster_start + cluster_size)
            return Allocation(Action.KEEP, host=first.host, length=n, guest=cluster_start,
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
        await self._wb.mark_dirty()
        if g.has_data_file:
            host = cluster_start
        else:
            host = await self._refcounts.allocate(count)
            state.counters.clusters_allocated += count
        # Never written since the file ended before it: reads as zeros without writing them.
        fresh = host >= state.data.size
        if not fresh and not g.has_data_file:
            self.forget_cached(host, count * cluster_size)
        inflight = self.inflight.add(cluster_start, cluster_start + count * cluster_size)
        return Allocation(Action.NEW, host=host, length=n, guest=cluster_start, clusters=count,
                    cow_from=cow_from, cow_to=cow_to, inflight=inflight, fresh=fresh,
                    unallocated=not any(e or b for e, b in old))

    async def cancel(self, plan: Allocation) -> None:
        """The data of an allocating ``plan`` was not written: give its clusters back (never
        referenced, they are free again at once) and let waiters in."""
        with trio.CancelScope(shield=True):
            async with self._wb.lock:
                try:
                    if plan.action == Action.NEW and not self._state.geometry.has_data_file:
                        await self._refcounts.change(
                            plan.host, plan.clusters * self._state.geometry.cluster_size, -1)
                finally:
                    self.inflight.finish(plan.inflight)

    async def link(self, plan: Allocation) -> None:
        """Point the L2 entries at the written clusters (QEMU's link_l2), queue the old
        clusters' frees, and let waiters in."""
        with trio.CancelScope(shield=True):
            async with self._wb.lock:
                try:
                    await self._link(plan)
                finally:
                    self.inflight.finish(plan.inflight)

    async def _link(self, plan: Allocation) -> None:
        state = self._state
        g = state.geometry
        cluster_size = g.cluster_size
        key, table = await self.writable_slice(plan.guest)
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
                self._wb.free_entry_later(old_entry)
        state.l2_cache.mark_dirty(key)
        state.counters.allocating_writes += 1
        if self._wb.pending_frees >= self._free_checkpoint:
            # Make the freed clusters reusable. (Frees that requests in flight still hold stay
            # queued: the next checkpoint waits for as many new ones, not for every link.)
            await self._wb.write_back()
            self._free_checkpoint = self._wb.pending_frees + _MAX_PENDING_FREES
