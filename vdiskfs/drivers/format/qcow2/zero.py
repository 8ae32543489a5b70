"""Zeroing and discarding guest ranges of a writable qcow2 image (QEMU's
``qcow2_co_pwrite_zeroes``, ``zero_in_l2_slice``, ``zero_l2_subclusters``, ``qcow2_co_pdiscard``
and ``discard_in_l2_slice``): L2 entries marked zero or unallocated, under the write-back lock,
and zeros written as data only where no entry can say it.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from vdiskfs.drivers.format.qcow2.alloc import ALL_ZERO_BITMAP, is_allocated, subcluster_bits
from vdiskfs.drivers.format.qcow2.allocate import Allocator
from vdiskfs.drivers.format.qcow2.mapping import L1E_OFFSET_MASK, OFLAG_COMPRESSED, OFLAG_ZERO
from vdiskfs.drivers.format.qcow2.state import Qcow2State, ReadSide
from vdiskfs.drivers.format.qcow2.writeback import ChildWrites, WriteBack
from vdiskfs.drivers.format.runs import RunKind

__all__ = ["Zeroing"]

#: Largest zero buffer written at once where zeros must be written as data.
_ZERO_CHUNK = 1 << 20


class Zeroing:
    """``zero`` and ``discard`` of one writable image; ``write`` is the writer's data path, for
    zeros that must be written as data."""

    def __init__(self, state: Qcow2State, reads: ReadSide, io: ChildWrites,
                 write_back: WriteBack, allocator: Allocator,
                 write: Callable[[int, memoryview], Awaitable[None]], zeros: bytes) -> None:
        self._state = state
        self._reads = reads
        self._io = io
        self._wb = write_back
        self._alloc = allocator
        self._write = write
        #: A cluster of zeros, sliced for partial zeros written as data.
        self.zeros = zeros

    async def zero(self, offset: int, length: int, *, may_unmap: bool) -> None:
        """Make ``[offset, offset + length)`` read as zeros (QEMU's qcow2_co_pwrite_zeroes):
        whole (sub)clusters are marked zero (or, on v2 without a backing file, unallocated); a
        partial one at either end is marked whole when the rest of it reads as zeros already
        and nothing is stored there, else written with zeros as data -- as everything is on a
        v2 image with a backing file, which has no way to mark zeros."""
        state = self._state
        if state.header.data_file_raw:
            # The data file stays a consistent raw image (QEMU zeroes it first as well).
            await self._io.zero_data(offset, length, may_unmap=may_unmap)
        end = offset + length
        if state.header.version < 3 and self._reads.backing is not None:
            await self.write_zeros(offset, length)
            return
        unit = 1 << subcluster_bits(state.geometry)
        first = -(-offset // unit) * unit
        last = end if end == state.size else end // unit * unit
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

    async def _zero_partial(self, start: int, stop: int, may_unmap: bool) -> None:
        """Zero ``[start, stop)``, a part of one (sub)cluster: the whole unit is marked zero if
        nothing is stored in it and the rest of it reads as zeros (QEMU's head and tail
        check, decided under the lock so that no write lands in between); else zeros are
        written as data."""
        unit = 1 << subcluster_bits(self._state.geometry)
        unit_start = start // unit * unit
        unit_end = min(unit_start + unit, self._state.size)
        marked = False
        async with self._alloc.claim(unit_start, unit_end - unit_start):
            if await self._only_zeros_around(unit_start, unit_end, start, stop):
                marked = not await self._zero_locked(unit_start, unit_end, may_unmap)
        if not marked:
            await self.write_zeros(start, stop - start)

    async def _only_zeros_around(self, unit_start: int, unit_end: int, start: int,
                                 stop: int) -> bool:
        """Whether the unit ``[unit_start, unit_end)`` stores nothing here (zero or
        unallocated: QEMU's ZERO and UNALLOCATED subcluster types) and reads as zeros outside
        ``[start, stop)``. Caller holds the lock."""
        for run in await self._state.map_range(unit_start, unit_end - unit_start):
            if run.kind is RunKind.ZERO:
                continue
            if run.kind is not RunKind.BACKING:
                return False
            for lo, hi in ((run.offset, min(run.end, start)), (max(run.offset, stop), run.end)):
                if hi > lo and self._reads.backing_length(lo, hi - lo):
                    return False
        return True

    async def write_zeros(self, offset: int, length: int) -> None:
        """Zeros as data, through the writer's data path."""
        end = offset + length
        while offset < end:
            n = min(_ZERO_CHUNK, end - offset)
            zeros = self.zeros if n <= len(self.zeros) else bytes(n)
            await self._write(offset, memoryview(zeros)[:n])
            offset += n

    async def _zero_step(self, pos: int, last: int, may_unmap: bool) -> int:
        """Zero whole (sub)clusters from ``pos`` within one L2 slice; returns where it ended."""
        g = self._state.geometry
        slice_span = 1 << (g.cluster_bits + g.slice_bits)
        stop = min(last, (pos | (slice_span - 1)) + 1)
        async with self._alloc.claim(pos, stop - pos) as allowed:
            stop = pos + allowed
            fallback = await self._zero_locked(pos, stop, may_unmap)
        # What cannot be marked (part of a compressed cluster, v2 partial clusters): zeros as
        # data, outside the lock like any write.
        for start, end in fallback:
            await self.write_zeros(start, end - start)
        return stop

    async def _zero_locked(self, pos: int, stop: int, may_unmap: bool) -> list[tuple[int, int]]:
        """Under the lock: mark ``[pos, stop)`` (one L2 slice) zero as QEMU's zero_in_l2_slice
        and zero_l2_subclusters do. Returns the ranges left to write as zeros."""
        state = self._state
        g = state.geometry
        version = state.header.version
        counters = state.counters
        fallback: list[tuple[int, int]] = []
        if await self._skip_unallocated(pos, stop):
            return fallback
        await self._wb.mark_dirty()
        key, table = await self._alloc.writable_slice(pos)
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
                                           or piece_end == state.size)
            if version < 3:
                # No zero flag: without a backing file, unallocated reads as zeros (QEMU
                # discards); zero() wrote zeros as data for an image with a backing file.
                if not whole:
                    fallback.append((cursor, piece_end))
                elif entry:
                    table[at] = 0
                    self._wb.free_entry_later(entry, discard=True)
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
                    counters.zero_clusters_written += 1
                    if unmap:
                        self._wb.free_entry_later(entry, discard=True)
            elif g.extended_l2 and not entry & OFLAG_COMPRESSED:
                first_sc = (cursor - cluster) >> sc_bits
                last_sc = (piece_end - cluster - 1) >> sc_bits
                span = ((1 << (last_sc + 1)) - 1) & ~((1 << first_sc) - 1)
                new_bitmap = (bitmap | span << 32) & ~span
                if new_bitmap != bitmap:
                    table[at + 1] = new_bitmap
                    changed = True
                    counters.zero_clusters_written += 1
            else:
                # A compressed cluster cannot be zeroed in part.
                fallback.append((cursor, piece_end))
            cursor = piece_end
        if changed:
            state.l2_cache.mark_dirty(key)
        await self._wb.punch_data_file()
        return fallback

    async def _skip_unallocated(self, start: int, stop: int) -> bool:
        """Whether ``[start, stop)`` already reads as zeros with nothing allocated here and no
        backing file below: then zeroing it changes nothing (and allocates no L2 table)."""
        if self._reads.backing_length(start, stop - start):
            return False
        state = self._state
        l1_entry = state.l1[start >> state.geometry.l2_coverage_bits]
        if not l1_entry & L1E_OFFSET_MASK:
            return True
        runs = await state.map_range(start, stop - start)
        return len(runs) == 1 and runs[0].kind is RunKind.BACKING  # unallocated

    async def discard(self, offset: int, length: int) -> None:
        """Deallocate whole clusters (QEMU's qcow2_co_pdiscard and qcow2_cluster_discard): they
        read as zeros afterwards; partial clusters are left alone, except the image's partial
        last cluster when the range covers it from its start. A v2 image with a backing file
        is left alone too: without the zero flag, a discarded cluster would show the backing
        file's stale data (QEMU refuses it, and a refused discard is no error)."""
        state = self._state
        g = state.geometry
        if state.header.version < 3 and self._reads.backing is not None:
            return
        cluster_size = g.cluster_size
        end = offset + length
        first = -(-offset // cluster_size) * cluster_size
        last = end if end == state.size else end // cluster_size * cluster_size
        if first < last and state.header.data_file_raw:
            # QEMU leaves the data file as it was, so that it no longer matches what the image
            # reads (zeros); zeroing it keeps the two views one disk.
            await self._io.zero_data(first, last - first, may_unmap=True)
        pos = first
        slice_span = 1 << (g.cluster_bits + g.slice_bits)
        while pos < last:
            stop = min(last, (pos | (slice_span - 1)) + 1)
            async with self._alloc.claim(pos, stop - pos) as allowed:
                stop = pos + allowed
                if not await self._skip_unallocated(pos, stop):
                    await self._discard_slice(pos, stop)
            pos = stop

    async def _discard_slice(self, pos: int, stop: int) -> None:
        state = self._state
        g = state.geometry
        await self._wb.mark_dirty()
        key, table = await self._alloc.writable_slice(pos)
        step = 2 if g.extended_l2 else 1
        changed = False
        for cluster in range(pos, stop, g.cluster_size):
            at = step * ((cluster >> g.cluster_bits) & (g.slice_entries - 1))
            entry = table[at]
            bitmap = table[at + 1] if g.extended_l2 else 0
            if self._reads.backing is None and not is_allocated(g, entry) and not (
                    entry & OFLAG_COMPRESSED):
                continue
            if g.extended_l2:
                new_entry, new_bitmap = 0, ALL_ZERO_BITMAP
            else:
                new_entry, new_bitmap = (OFLAG_ZERO if state.header.version >= 3 else 0), 0
            if (new_entry, new_bitmap) == (entry, bitmap):
                continue
            table[at] = new_entry
            if g.extended_l2:
                table[at + 1] = new_bitmap
            self._wb.free_entry_later(entry, discard=True)
            state.counters.clusters_discarded += 1
            changed = True
        if changed:
            state.l2_cache.mark_dirty(key)
        await self._wb.punch_data_file()
