"""Hosted sparse extents (``SPARSE``, ``VMFSSPARSE``, monolithicSparse): grains found through a
grain directory and grain tables, allocated at the end of the file by writes.

Mapping a guest range to runs is :mod:`.mapping`'s pure work; an extent loads its grain tables
(through the image's cache, :class:`~.extent.SparseShared`) and does its writes' I/O.
Compressed (stream-optimized) extents add reading inflated grains: :mod:`.stream_extent`.

Writing, in the order that makes a crash leak space at worst, never point at unwritten bytes
(the node's docstring, :mod:`.driver`, has the whole order and why): a new grain's bytes are
written whole (copy-on-write head, the request, copy-on-write tail), then the cached grain
table changes in memory and is pinned dirty here until the node's write-back, which writes
:meth:`SparseExtent.write_tables` after a flush of the grains and
:meth:`SparseExtent.write_directory` after a flush of the new tables.
"""

from __future__ import annotations

import errno
import struct
from array import array
from typing import Any

from vdiskfs.block.node import BlockNode, BlockStatus
from vdiskfs.drivers.format.runs import Run, RunKind, le_table, runs_status
from vdiskfs.drivers.format.vmdk.alloc import SparseWriteState, check_directories, table_bytes
from vdiskfs.drivers.format.vmdk.extent import FileExtent, SparseShared, read_checked
from vdiskfs.drivers.format.vmdk.mapping import (
    GTE_ZEROED,
    SparseGeometry,
    gt_window,
    map_grain_table,
)
from vdiskfs.drivers.format.vmdk.sparse import (
    SECTOR,
    STREAM_FOOTER_SIZE,
    SparseHeader,
    check_header,
    parse_stream_footer,
)
from vdiskfs.errors import FormatError, UnsupportedError

__all__ = ["SparseExtent", "checked_header"]

#: Largest piece of a parent read at once to fill a new grain (grains may be up to 1 GiB).
COW_CHUNK = 1 << 20
_GD_ENTRY = struct.Struct("<I")


async def checked_header(file: BlockNode, header: SparseHeader, label: str) -> SparseHeader:
    """A sparse extent's header, checked against its file: the stream footer's when the header
    at sector 0 only promises one (``gdOffset`` at the end)."""
    if header.gd_at_end:
        if file.size < STREAM_FOOTER_SIZE + SECTOR:
            raise FormatError("file too small for a stream-optimized footer", path=label,
                              field="footer")
        tail = bytes(await file.pread(file.size - STREAM_FOOTER_SIZE, STREAM_FOOTER_SIZE))
        header = parse_stream_footer(tail, label)
    check_header(header, file.size, label)
    return header


class SparseExtent(FileExtent):
    """A hosted sparse extent: its header, grain directory, and, when written, the allocation
    and write-back state."""

    def __init__(self, *, file: BlockNode, label: str, header: SparseHeader, gd: array[int],
                 shared: SparseShared, number: int, guest_start: int, type_name: str,
                 image_label: str, writable: bool = True) -> None:
        super().__init__(file=file, label=label, number=number, guest_start=guest_start,
                         size=header.capacity * SECTOR, type_name=type_name,
                         image_label=image_label, writable=writable)
        self.header = header
        self.geometry = SparseGeometry.from_header(header)
        #: The grain directory, one grain-table sector per entry (changed in memory when a
        #: write allocates a grain table).
        self._gd = gd
        self._shared = shared
        # Set by prepare_writes() on a writable extent of a writable image, before any write.
        self._state: SparseWriteState | None = None

    @classmethod
    async def open(cls, file: BlockNode, header: SparseHeader, label: str,
                   **kwargs: Any) -> SparseExtent:
        """The extent whose checked ``header`` (:func:`checked_header`) is ``file``'s: reads its
        grain directory."""
        gd_bytes = await read_checked(file, header.gd_offset * SECTOR, header.gd_entries * 4,
                                      "grain directory", label, field="gdOffset")
        return cls(file=file, label=label, header=header, gd=le_table(gd_bytes, 4), **kwargs)

    @property
    def compressed(self) -> bool:
        return self.geometry.compressed

    def info(self) -> dict[str, Any]:
        info: dict[str, Any] = {"compressed": True} if self.compressed else {}
        info["virtual-size"] = self.size
        info["filename"] = self.label
        info["cluster-size"] = self.geometry.grain_size
        info["format"] = self.type_name
        return info

    # -- mapping --------------------------------------------------------------------------------

    async def _grain_table(self, gd_index: int) -> array[int] | None:
        """The grain table ``gd_index`` (None: the directory names none)."""
        shared = self._shared
        state = self._state
        if state is not None:
            dirty = state.dirty_tables.get(gd_index)
            if dirty is not None:
                shared.counters.gt_cache_hits += 1
                return dirty
        if self._gd[gd_index] == 0:
            return None
        # Single-flight: concurrent readers of one uncached table read it once. A table read
        # while a write changed tables is used by its own request only (LruCache's rules):
        # the changed table is found dirty, or cached after its write-back.
        table, hit = await shared.gt_cache.load((self.number, gd_index),
                                                lambda: self._read_grain_table(gd_index))
        if hit:
            shared.counters.gt_cache_hits += 1
        else:
            shared.counters.gt_cache_misses += 1
        return table

    async def _read_grain_table(self, gd_index: int) -> array[int]:
        data = await read_checked(
            self._file,
            self._gd[gd_index] * SECTOR,
            self.geometry.gtes_per_gt * 4,
            f"grain table {gd_index}",
            self._label,
            field="grain directory entry",
            field_offset=self.header.gd_offset * SECTOR + 4 * gd_index,
        )
        return le_table(data, 4)

    def _table_runs(self, table: array[int] | None, gd_index: int, offset: int,
                    length: int) -> list[Run]:
        """Runs for the extent's ``[offset, offset + length)``, all mapped by ``table``."""
        return map_grain_table(
            self.geometry,
            table,
            extent=self.number,
            child=self._file,
            guest_base=self.guest_start,
            offset=offset,
            length=length,
            file_size=self._file.size,
            table_offset=self._gd[gd_index] * SECTOR,
            label=self._label,
        )

    async def map(self, offset: int, length: int, *, first_window: bool = False) -> list[Run]:
        """With ``first_window``, only as far as one grain table reaches (block status)."""
        runs: list[Run] = []
        end = offset + length
        while offset < end:
            gd_index, n = gt_window(self.geometry, offset, end - offset)
            runs.extend(self._table_runs(await self._grain_table(gd_index), gd_index, offset,
                                         n))
            offset += n
            if first_window:
                break
        return runs

    async def block_status(self, offset: int, length: int) -> tuple[BlockStatus, int]:
        return runs_status(self._shared.image, await self.map(offset, length, first_window=True))

    # -- writing: preparation ------------------------------------------------------------------

    async def prepare_writes(self) -> None:
        """Refuse what cannot be written, as QEMU does, and load what writes need: the
        redundant directory, the map of the metadata, where new grains go. Nothing for an
        ``RDONLY`` extent."""
        if not self.writable:
            return
        header = self.header
        if header.version == 3:
            # QEMU: version 3 adds changed block tracking, which a writer would have to keep
            # up to date ("VMDK version 3 must be read only").
            raise UnsupportedError(
                "VMDK sparse version 3 (changed block tracking) is read-only, as in QEMU",
                path=self._label, field="version", errno=errno.EROFS,
            )
        rgd = None
        if header.has_redundant_gd:
            raw = await read_checked(self._file, header.rgd_offset * SECTOR,
                                     header.gd_entries * 4, "redundant grain directory",
                                     self._label, field="rgdOffset")
            rgd = le_table(raw, 4)
        metadata = check_directories(header, self._gd, rgd, self._file.size, self._label)
        # As QEMU's next_cluster_sector: new grains start at the file's end, grain-aligned.
        grain = header.grain_size
        next_free = -(-self._file.size // grain) * grain
        self._state = SparseWriteState(rgd, next_free, metadata)

    @property
    def _writing(self) -> SparseWriteState:
        # Writes reach a sparse extent only after check_writable(), and a writable extent of
        # a writable image was prepared at open.
        assert self._state is not None, "sparse extent written before prepare_writes()"
        return self._state

    # -- writing --------------------------------------------------------------------------------

    async def write(self, offset: int, data: memoryview) -> None:
        """Write ``data`` at ``offset``, one grain table at a time: in place where grains
        exist, into new grains elsewhere."""
        self.check_writable()
        done = 0
        while done < len(data):
            gd_index, n = gt_window(self.geometry, offset + done, len(data) - done)
            table = await self._table_for_write(gd_index)
            for run in self._table_runs(table, gd_index, offset + done, n):
                start = run.offset - self.guest_start - offset
                piece = data[start : start + run.length]
                if run.kind is RunKind.DATA:
                    self._check_not_metadata(run.host_offset, run.length)
                    await self._file.pwrite(run.host_offset, piece)
                else:
                    await self._allocate_grains(table, gd_index, run, piece)
            done += n

    def _check_not_metadata(self, host: int, length: int) -> None:
        clash = self._writing.metadata.find(host, host + length)
        if clash is not None:
            raise FormatError(
                f"a grain table entry places guest data at {host:#x}, inside the extent's "
                f"metadata ({clash[0]:#x}-{clash[1]:#x}); refusing to write over it",
                path=self._label, field="grain table entry", offset=host,
            )

    async def _table_for_write(self, gd_index: int) -> array[int]:
        """The grain table to change; a new one (and its redundant copy) when the directory
        has none -- reserved at the end of the file, written at the next write-back."""
        table = await self._grain_table(gd_index)
        if table is not None:
            return table
        state, header = self._writing, self.header
        size = header.gt_bytes
        primary = state.allocate(size, SECTOR, self._label)
        state.metadata.add(primary, primary + size)
        self._gd[gd_index] = primary // SECTOR
        if state.rgd is not None:
            redundant = state.allocate(size, SECTOR, self._label)
            state.metadata.add(redundant, redundant + size)
            state.rgd[gd_index] = redundant // SECTOR
        table = array("I", bytes(4 * header.gtes_per_gt))
        state.dirty_directory.add(gd_index)
        self._mark_dirty(gd_index, table)
        self._shared.counters.gts_allocated += 1
        return table

    def _mark_dirty(self, gd_index: int, table: array[int]) -> None:
        state = self._writing
        if gd_index not in state.dirty_tables:
            state.dirty_tables[gd_index] = table
            self._shared.dirty_tables += 1
        # Readers find the table dirty from now on; a load of it from the file in flight
        # may predate this change and must not be cached.
        self._shared.gt_cache.changed()

    async def _allocate_grains(self, table: array[int], gd_index: int, run: Run,
                               data: memoryview | None) -> None:
        """Give the unallocated (or zeroed) grains of ``run`` new space at the end of the
        extent file and write them whole: the part of the first grain before the run and of
        the last one after it come from the parent (BACKING runs) or are zeros (zeroed grains,
        or no parent); ``data`` None writes zeros. Then, and only then, the table names them.
        """
        geometry, state, file = self.geometry, self._writing, self._file
        grain = geometry.grain_size
        start = run.offset - self.guest_start
        end = start + run.length
        first = start // grain
        count = -(-end // grain) - first
        host = state.allocate(count * grain, grain, self._label)
        from_backing = run.kind is RunKind.BACKING
        head = start - first * grain
        tail = (first + count) * grain - end
        if head:
            await self._fill_grain(host, self.guest_start + first * grain, head, from_backing)
        if data is None:
            await file.zero(host + head, run.length)
        else:
            await file.pwrite(host + head, data)
        if tail:
            await self._fill_grain(host + head + run.length, run.end, tail, from_backing)
        slot = first - gd_index * geometry.gtes_per_gt
        for k in range(count):
            table[slot + k] = (host + k * grain) // SECTOR
        self._mark_dirty(gd_index, table)
        self._shared.counters.grains_allocated += count

    async def _fill_grain(self, host: int, guest: int, length: int, from_backing: bool) -> None:
        """Copy-on-write: fill ``length`` bytes of a new grain at ``host`` with what guest
        ``guest`` read before -- the parent's bytes, zeros past its end (or the extent's)."""
        image, counters = self._shared.image, self._shared.counters
        counters.cow_bytes += length
        end = guest + length
        pos = guest
        if from_backing:
            # The last grain may reach past the extent's end: only the extent's bytes are the
            # parent's; the rest of the grain is zeros.
            readable = guest + image.backing_length(guest, min(end, self.guest_end) - guest)
            while pos < readable:
                n = min(COW_CHUNK, readable - pos)
                await self._file.pwrite(host + pos - guest, await image.read_backing(pos, n))
                counters.cow_backing_bytes += n
                pos += n
        if pos < end:
            # Zeros without writing them where the file is extended (a hole reads as zeros).
            await self._file.zero(host + pos - guest, end - pos)

    async def zero(self, offset: int, length: int, may_unmap: bool) -> None:
        """Make a range read as zeros with as little as possible: nothing where it already
        does, zeros in place in allocated grains, "zeroed grain" entries (when the extent has
        the feature) over parent data, new zero grains otherwise."""
        self.check_writable()
        image = self._shared.image
        done = 0
        while done < length:
            gd_index, n = gt_window(self.geometry, offset + done, length - done)
            table = await self._grain_table(gd_index)
            for run in self._table_runs(table, gd_index, offset + done, n):
                if run.kind is RunKind.ZERO:
                    continue
                if run.kind is RunKind.DATA:
                    self._check_not_metadata(run.host_offset, run.length)
                    await self._file.zero(run.host_offset, run.length)
                elif image.backing_length(run.offset, run.length):
                    table = await self._table_for_write(gd_index)
                    await self._hide_backing(table, gd_index, run)
                # else: unallocated and no parent bytes there: it reads as zeros already.
            done += n

    async def _hide_backing(self, table: array[int], gd_index: int, run: Run) -> None:
        """Zeros over an unallocated run whose parent has data."""
        geometry = self.geometry
        grain = geometry.grain_size
        start = run.offset - self.guest_start
        end = start + run.length
        whole_start = -(-start // grain) * grain
        # The extent's last grain may be short: reaching the extent's end covers it whole.
        whole_end = end if end == self.size else end // grain * grain
        if not geometry.zero_grain or whole_start >= whole_end:
            await self._allocate_grains(table, gd_index, run, None)
            return
        for part_start, part_end in ((start, whole_start), (whole_end, end)):
            if part_end > part_start:
                part = Run(RunKind.BACKING, self.guest_start + part_start,
                           part_end - part_start)
                await self._allocate_grains(table, gd_index, part, None)
        slot = whole_start // grain - gd_index * geometry.gtes_per_gt
        count = -(-(whole_end - whole_start) // grain)
        for k in range(count):
            table[slot + k] = GTE_ZEROED
        self._mark_dirty(gd_index, table)
        self._shared.counters.zeroed_grains += count

    # -- write-back: the node orders the steps across extents and flushes between them -----------

    @property
    def dirty(self) -> bool:
        return self._state is not None and self._state.dirty

    @property
    def new_tables(self) -> bool:
        """Whether tables allocated since the last write-back wait for directory entries."""
        return self._state is not None and bool(self._state.dirty_directory)

    async def write_tables(self) -> None:
        """Write every dirty grain table, primary and redundant copy. The grains they name
        must be durable first."""
        state = self._writing
        for gd_index in sorted(state.dirty_tables):
            raw = table_bytes(state.dirty_tables[gd_index])
            await self._file.pwrite(self._gd[gd_index] * SECTOR, raw)
            if state.rgd is not None and state.rgd[gd_index]:
                await self._file.pwrite(state.rgd[gd_index] * SECTOR, raw)
            self._shared.counters.gt_writebacks += 1

    async def write_directory(self) -> None:
        """Write the directory entries (primary and redundant) naming new tables. The tables
        must be durable first."""
        state, header = self._writing, self.header
        for gd_index in sorted(state.dirty_directory):
            await self._file.pwrite(header.gd_offset * SECTOR + 4 * gd_index,
                                    _GD_ENTRY.pack(self._gd[gd_index]))
            if state.rgd is not None:
                await self._file.pwrite(header.rgd_offset * SECTOR + 4 * gd_index,
                                        _GD_ENTRY.pack(state.rgd[gd_index]))
            self._shared.counters.gd_writebacks += 1

    def written(self) -> None:
        """After the write-back: the tables are ordinary cached tables again."""
        state = self._writing
        for gd_index, table in state.dirty_tables.items():
            self._shared.gt_cache.put((self.number, gd_index), table)
        state.dirty_tables.clear()
        state.dirty_directory.clear()
