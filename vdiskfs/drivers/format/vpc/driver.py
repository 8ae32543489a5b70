"""Format driver ``vpc``: Connectix/Microsoft Virtual PC and Hyper-V VHD images.

Disk types (read and written): fixed (the guest bytes, then a footer), dynamic (a BAT of blocks)
and differencing (a dynamic disk whose sector bitmaps say which sectors it holds; the others come
from the parent named by its parent locators). The virtual size is computed exactly as QEMU 7.2
does (geometry or current size, by creator application), so it equals ``qemu-img info``'s.

Unlike QEMU, which probes a fixed VHD as raw (its only footer is at the end), the probe looks at
the file's last 512 bytes too, and the node presents the disk without its footer.

The node reads the whole BAT at open (bounded: :data:`MAX_BAT_ENTRIES`, and it must lie in the
file) and keeps sector bitmaps in a cache (``bitmap_cache_*`` counters).

Writing. A fixed disk is written in place; its footer never moves. A dynamic or differencing
disk allocates a block where the footer at the end was, as QEMU's ``alloc_block``, and moves the
footer after it. QEMU writes the bitmap over the old footer, then the footer at the new end,
then the BAT entry, each with a flush, and the data last; vdiskfs orders it so that the file
always ends with a footer and a BAT entry only ever names a block whose bytes are written:

1. the footer is written at the new end, and flushed (the old one is about to be overwritten);
2. the block: its sector bitmap -- all ones in a dynamic disk, as QEMU writes it; the written
   sectors only in a differencing disk -- and its data: the request, and in a differencing disk
   the parent's bytes around an unaligned edge (copy-on-write of that sector only). Sectors of a
   dynamic block not written read as zeros: they lie past the old end of the file (a hole);
3. the BAT entry changes in memory; at :meth:`flush` (or when too many wait), after a flush of
   the file, the dirty BAT entries are written, with any sector bitmap whose bits a write to an
   existing block set.

A crash thus leaks a block at worst. In a dynamic disk QEMU ignores the bitmap and so does the
reader here; the bits are kept true anyway for other readers (Virtual PC, Hyper-V).
"""

from __future__ import annotations

import errno
import struct
from array import array
from dataclasses import dataclass
from functools import partial
from typing import Any

import trio

from vdiskfs.block.context import OpenContext
from vdiskfs.block.format import FormatNode
from vdiskfs.block.node import BlockNode, BlockStatus, Buffer
from vdiskfs.block.registry import redact_reference, register
from vdiskfs.drivers.format.runs import (
    LruCache,
    Run,
    RunCounters,
    coalesce,
    read_runs,
    run_status,
)
from vdiskfs.drivers.format.vpc.mapping import (
    BlockGeometry,
    block_window,
    check_bat,
    check_block_layout,
    map_block,
    merge_ranges,
    sectors_present,
    set_sectors,
)
from vdiskfs.drivers.format.vpc.structs import (
    BAT_UNALLOCATED,
    DYNAMIC_HEADER_SIZE,
    FOOTER_COOKIE,
    FOOTER_SIZE,
    MAX_LOCATOR_DATA,
    SECTOR,
    DiskType,
    DynamicHeader,
    Footer,
    SizeSource,
    check_virtual_size,
    parent_candidates,
    parse_bat,
    parse_dynamic_header,
    parse_footer,
    probe_footer,
    virtual_size,
)
from vdiskfs.errors import ChainError, NoSpaceError, UnsupportedError

__all__ = ["VpcCounters", "VpcNode"]

#: Most BAT entries read at open (64 MiB of table): 2040 GiB of 128 KiB blocks. Real VHDs use
#: 2 MiB blocks (1 Mi entries at most).
MAX_BAT_ENTRIES = 1 << 24
#: Sector bitmaps of differencing blocks kept per node (512 bytes each for 2 MiB blocks).
BITMAP_CACHE_BLOCKS = 1024
#: Blocks that one block-status call examines at most, so that it returns in bounded time.
STATUS_SCAN_BLOCKS = 4096
#: Probe scores: a header cookie is as sure as any magic; a footer found only at the end of
#: the file yields to any format recognised by its first bytes.
PROBE_HEAD = 100
PROBE_TAIL = 50
#: Dirty BAT entries and sector bitmaps held before they are written back without waiting for
#: a flush: bounds the memory a long run of writes without flushes can pin.
MAX_DIRTY = 4096
#: A BAT entry is a 32-bit sector number: no block may start at or past 2 TiB.
MAX_BLOCK_START = (1 << 32) * SECTOR
#: Bytes of zeros written at once when zeroing a differencing disk.
ZERO_CHUNK = 1 << 20


@dataclass(slots=True)
class VpcCounters(RunCounters):
    """The run counters (``data_reads``, ``backing_reads``, ``zero_bytes_read``...) and the bitmap
    cache's."""

    bitmap_cache_hits: int = 0
    bitmap_cache_misses: int = 0
    #: Blocks appended by writes, and footers written at the file's new end.
    blocks_allocated: int = 0
    footer_moves: int = 0
    #: Bytes of partially written sectors of a differencing disk filled from the parent.
    cow_bytes: int = 0
    #: Sector bitmaps and BAT entries written back.
    bitmap_writebacks: int = 0
    bat_writebacks: int = 0


@register
class VpcNode(FormatNode):
    """A VHD image: its footer, and for dynamic and differencing disks the BAT."""

    driver = "vpc"
    supports_write = True
    counters_class = VpcCounters
    counters: VpcCounters

    def __init__(self, file: BlockNode, ctx: OpenContext) -> None:
        super().__init__(file, ctx)
        self.footer: Footer | None = None
        self.header: DynamicHeader | None = None
        self.size_source = SizeSource.GEOMETRY
        self.geometry: BlockGeometry | None = None
        self.bat: array[int] | None = None
        self.parent_reference: str | None = None
        self._bitmaps: LruCache[int, bytes] = LruCache(BITMAP_CACHE_BLOCKS)
        #: The footer as read (the copy at offset 0 of a dynamic disk): what a moved footer is.
        self._footer_raw = b""
        # Writes, zeroes and write-backs hold this lock throughout, as QEMU's s->lock: an
        # allocation decides from the BAT and then changes it. Reads do not take it.
        self._write_lock = trio.Lock()
        # Where the next block goes (the footer's place at the end, once writes are prepared).
        self._next_block = 0
        # BAT indexes changed since the last write-back; bitmaps of existing blocks whose bits
        # a write set (pinned here, not in the LRU cache, until written).
        self._bat_dirty: set[int] = set()
        self._bitmaps_dirty: dict[int, bytearray] = {}

    @classmethod
    def probe(cls, head: bytes, tail: bytes, filename: str) -> int:
        if head[:8] == FOOTER_COOKIE:
            return PROBE_HEAD
        if len(tail) == FOOTER_SIZE and probe_footer(tail, fixed_only=True):
            return PROBE_TAIL
        return 0

    @property
    def disk_type(self) -> DiskType:
        assert self.footer is not None
        return self.footer.disk_type

    # -- open ---------------------------------------------------------------------------------

    async def open(self) -> None:
        file = self.file
        if file.size < FOOTER_SIZE:
            raise self.format_error(f"file of {file.size} bytes is too small for a VHD footer",
                                    field="footer")
        footer = None
        head = await self.read_metadata(0, FOOTER_SIZE, "footer copy")
        if head[:8] == FOOTER_COOKIE:
            # Dynamic and differencing disks start with a copy of the footer (QEMU reads it).
            footer = parse_footer(head, self.label, where="footer copy")
            self._footer_raw = head
            if footer.disk_type is DiskType.FIXED:
                footer = None  # a fixed disk whose guest data happens to start with a footer
        if footer is None:
            tail = await self.read_metadata(file.size - FOOTER_SIZE, FOOTER_SIZE, "footer")
            footer = parse_footer(tail, self.label, where="footer")
            self._footer_raw = tail
            if footer.disk_type is not DiskType.FIXED:
                raise self.format_error(
                    f"{footer.disk_type.name.lower()} disk without the footer copy at offset 0",
                    field="footer copy",
                )
        self.footer = footer
        size, self.size_source = virtual_size(footer)
        check_virtual_size(size, self.label)
        if footer.disk_type is DiskType.FIXED:
            if size > file.size - FOOTER_SIZE:
                raise self.format_error(
                    f"virtual size {size} ({self.size_source}) is larger than the "
                    f"{file.size - FOOTER_SIZE} data bytes before the footer",
                    field="footer.current_size",
                )
        else:
            await self._open_dynamic(footer, size)
        self.size = size
        if footer.disk_type is DiskType.DIFFERENCING and self.ctx.options.backing:
            await self._open_parent()
        if not self.read_only and footer.disk_type is not DiskType.FIXED:
            await self._prepare_writes()

    async def _open_dynamic(self, footer: Footer, size: int) -> None:
        header = parse_dynamic_header(
            await self.read_metadata(footer.data_offset, DYNAMIC_HEADER_SIZE, "dynamic_header"),
            self.label,
        )
        self.header = header
        block_size = header.block_size
        needed = -(-size // block_size)
        if header.max_table_entries < needed:
            # QEMU: "Page table too small".
            raise self.format_error(
                f"BAT of {header.max_table_entries} entries maps less than the virtual size "
                f"{size} in blocks of {block_size}",
                field="dynamic_header.max_table_entries",
            )
        if needed > MAX_BAT_ENTRIES:
            raise UnsupportedError(
                f"{needed} blocks of {block_size} bytes (at most {MAX_BAT_ENTRIES} supported)",
                path=self.label,
                field="dynamic_header.block_size",
            )
        geometry = BlockGeometry(block_size, header.bitmap_size,
                                 uses_bitmap=footer.disk_type is DiskType.DIFFERENCING)
        # Only the entries that map the virtual size are ever used for reading.
        bat = parse_bat(await self.read_metadata(header.table_offset, needed * 4, "BAT"))
        check_bat(bat, geometry, self.file.size, header.table_offset, self.label)
        self.geometry = geometry
        self.bat = bat

    async def _open_parent(self) -> None:
        header = self.header
        assert header is not None
        locator_data: dict[int, bytes] = {}
        for locator in header.locators:
            if locator.platform is None or locator.data_length == 0:
                continue
            field_name = f"parent_locator[{locator.index}]"
            if locator.data_length > MAX_LOCATOR_DATA:
                raise self.format_error(
                    f"parent locator of {locator.data_length} bytes (at most "
                    f"{MAX_LOCATOR_DATA})",
                    field=field_name,
                )
            locator_data[locator.index] = await self.read_metadata(
                locator.data_offset, locator.data_length, field_name
            )
        candidates = parent_candidates(header, locator_data, label=self.label)
        if not candidates:
            raise self.format_error("differencing disk names no parent", field="parent_locator")
        refused: ChainError | None = None
        for reference in candidates:
            try:
                if not await self.ctx.exists(reference, field_name="parent_locator"):
                    continue
            except ChainError as exc:
                refused = refused or exc
                continue
            node = await self.open_backing(reference, field="parent_locator", format="vpc")
            assert node is not None  # opened only when backing files are wanted
            self.parent_reference = reference
            self._check_parent(node, reference)
            return
        if refused is not None:
            raise refused
        raise self.format_error(
            "parent of differencing disk not found; tried "
            + ", ".join(repr(redact_reference(c)) for c in candidates),
            field="parent_locator",
        )

    def _check_parent(self, parent: BlockNode, reference: str) -> None:
        header = self.header
        parent_footer = getattr(parent, "footer", None)
        assert header is not None
        if isinstance(parent_footer, Footer) and parent_footer.uuid != header.parent_uuid:
            raise self.format_error(
                f"parent {redact_reference(reference)!r} has UUID {parent_footer.uuid}, but "
                "this differencing "
                f"disk was made from {header.parent_uuid}",
                field="dynamic_header.parent_uuid",
            )

    # -- mapping --------------------------------------------------------------------------------

    async def _bitmap(self, index: int, entry: int) -> bytes | bytearray:
        """The sector bitmap of allocated block ``index`` (BAT ``entry``): a changed one not yet
        written back, else cached, else read (once, however many readers want it)."""
        dirty = self._bitmaps_dirty.get(index)
        if dirty is not None:
            self.counters.bitmap_cache_hits += 1
            return dirty
        bitmap, hit = await self._bitmaps.load(index, partial(self._read_bitmap, index, entry))
        if hit:
            self.counters.bitmap_cache_hits += 1
        else:
            self.counters.bitmap_cache_misses += 1
        return bitmap

    async def _read_bitmap(self, index: int, entry: int) -> bytes:
        assert self.geometry is not None
        # check_bat placed every allocated block, bitmap included, inside the file.
        return await self.read_metadata(entry * 512, self.geometry.bitmap_size,
                                        f"sector bitmap of block {index}")

    async def _block_runs(self, offset: int, length: int) -> tuple[list[Run], int]:
        """Runs of the part of ``[offset, offset + length)`` in one block, and that length."""
        geometry, bat = self.geometry, self.bat
        assert geometry is not None and bat is not None
        index, n = block_window(geometry, offset, length)
        entry = bat[index]
        bitmap = None
        if geometry.uses_bitmap and entry != BAT_UNALLOCATED:
            bitmap = await self._bitmap(index, entry)
        return map_block(geometry, entry, bitmap, offset, n), n

    async def _map(self, offset: int, length: int) -> list[Run]:
        runs: list[Run] = []
        end = offset + length
        while offset < end:
            block_runs, n = await self._block_runs(offset, end - offset)
            runs.extend(block_runs)
            offset += n
        return coalesce(runs)

    # -- I/O ------------------------------------------------------------------------------------

    async def _pread(self, offset: int, length: int) -> Buffer:
        if self.disk_type is DiskType.FIXED:
            self.counters.data_reads += 1
            self.counters.data_bytes += length
            return await self.file.pread(offset, length)
        return await read_runs(self, await self._map(offset, length))

    async def _block_status(self, offset: int, length: int) -> tuple[BlockStatus, int]:
        if self.disk_type is DiskType.FIXED:
            file_status, file_run = await self.file.block_status(offset, length)
            kind = BlockStatus.ZERO if file_status & BlockStatus.ZERO else BlockStatus.DATA
            return kind | BlockStatus.ALLOCATED, file_run
        end = offset + length
        status: BlockStatus | None = None
        total = 0
        for _ in range(STATUS_SCAN_BLOCKS):
            block_runs, n = await self._block_runs(offset, end - offset)
            for run in block_runs:
                run_flags, run_length = run_status(self, run)
                if status is None:
                    status = run_flags
                elif run_flags != status:
                    return status, total
                total += run_length
                if run_length < run.length:  # the backing file ends inside this run
                    return status, total
            offset += n
            if offset >= end:
                break
        assert status is not None
        return status, total

    # -- writing ------------------------------------------------------------------------------

    async def _prepare_writes(self) -> None:
        """Check the block layout before writing through it; find where new blocks go."""
        footer, header, geometry, bat = self.footer, self.header, self.geometry, self.bat
        assert footer is not None and header is not None
        assert geometry is not None and bat is not None
        if footer.disk_type is DiskType.DIFFERENCING and self.backing is None:
            raise UnsupportedError(
                "a differencing disk opened without its parent cannot be written: a partly "
                "written sector needs the parent's bytes",
                path=self.label, field="parent_locator", errno=errno.EROFS,
            )
        file_size = self.file.size
        bat_end = header.table_offset + 4 * header.max_table_entries
        if bat_end > file_size:
            raise self.format_error(
                f"BAT of {header.max_table_entries} entries runs past the end of the file",
                field="dynamic_header.max_table_entries",
            )
        ranges = [(0, FOOTER_SIZE), (footer.data_offset, footer.data_offset
                                     + DYNAMIC_HEADER_SIZE), (header.table_offset, bat_end)]
        ranges += [(loc.data_offset, loc.data_offset + loc.data_length)
                   for loc in header.locators if loc.code.strip(b"\0") and loc.data_length]
        metadata = merge_ranges(ranges)
        blocks_end = check_block_layout(bat, geometry, metadata, header.table_offset,
                                        self.label)
        # The footer at the end is where the next block goes, as QEMU places it; a file that
        # does not end with one gets one after its last sector.
        tail = await self.read_metadata(file_size - FOOTER_SIZE, FOOTER_SIZE, "footer")
        footer_at = (file_size - FOOTER_SIZE if probe_footer(tail, fixed_only=False)
                     else _round_up(file_size, SECTOR))
        self._next_block = max(blocks_end, _round_up(metadata[-1][1], SECTOR), footer_at)

    async def _pwrite(self, offset: int, data: Buffer) -> None:
        if self.disk_type is DiskType.FIXED:
            # The guest bytes are the file's; the footer after them never moves.
            await self.file.pwrite(offset, data)
            return
        async with self._write_lock:
            await self._write_blocks(offset, memoryview(data).cast("B"))
            await self._write_back_if_many()

    async def _write_blocks(self, offset: int, data: memoryview) -> None:
        geometry, bat = self.geometry, self.bat
        assert geometry is not None and bat is not None
        block_size = geometry.block_size
        first = offset // block_size
        last = (offset + len(data) - 1) // block_size
        new = [i for i in range(first, last + 1) if bat[i] == BAT_UNALLOCATED]
        places: dict[int, int] = {}
        fresh_from = self.file.size
        if new:
            places = await self._reserve_blocks(new)
        done = 0
        while done < len(data):
            index, n = block_window(geometry, offset + done, len(data) - done)
            piece = data[done : done + n]
            start = (offset + done) % block_size
            place = places.get(index)
            if place is not None:
                await self._write_new_block(index, place, start, piece, fresh_from)
            else:
                await self._write_existing_block(index, start, piece)
            done += n

    async def _reserve_blocks(self, indexes: list[int]) -> dict[int, int]:
        """Places for new blocks where the footer is, and the footer moved after them."""
        geometry = self.geometry
        assert geometry is not None
        span = geometry.bitmap_size + geometry.block_size
        start = self._next_block
        end = start + len(indexes) * span
        if end - span >= MAX_BLOCK_START:
            raise NoSpaceError(
                f"a new block would start past the {MAX_BLOCK_START} bytes a BAT entry can "
                "address", path=self.label,
            )
        old_size = self.file.size
        await self.file.pwrite(end, self._footer_raw)
        if start < old_size:
            # The old footer is about to be overwritten: the new one is durable first, so the
            # file never ends without a footer.
            await self.file.flush()
        self._next_block = end
        self.counters.footer_moves += 1
        return {index: start + k * span for k, index in enumerate(indexes)}

    async def _write_new_block(self, index: int, place: int, start: int, data: memoryview,
                               fresh_from: int) -> None:
        """Write a block at ``place`` (bitmap and data), then let the BAT name it."""
        geometry, bat = self.geometry, self.bat
        assert geometry is not None and bat is not None
        data_at = place + geometry.bitmap_size
        if geometry.uses_bitmap:
            bitmap = bytearray(geometry.bitmap_size)
            await self._write_sectors(index, data_at, bitmap, start, data)
        else:
            # All sectors valid, as QEMU's alloc_block; those not written read as zeros.
            bitmap = bytearray(b"\xff" * geometry.bitmap_size)
            await self.file.pwrite(data_at + start, data)
            end = start + len(data)
            for gap_start, gap_end in ((0, start), (end, geometry.block_size)):
                # Past the old end of the file the block is a hole already.
                low, high = data_at + gap_start, min(data_at + gap_end, fresh_from)
                if high > low:
                    await self.file.zero(low, high - low)
        await self.file.pwrite(place, bitmap)
        bat[index] = place // SECTOR
        self._bat_dirty.add(index)
        self._bitmaps.put(index, bytes(bitmap))
        self._bitmaps.changed()
        self.counters.blocks_allocated += 1

    async def _write_existing_block(self, index: int, start: int, data: memoryview) -> None:
        geometry, bat = self.geometry, self.bat
        assert geometry is not None and bat is not None
        entry = bat[index]
        data_at = geometry.data_offset(entry)
        bitmap = await self._bitmap(index, entry)
        first, end = start // SECTOR, -(-(start + len(data)) // SECTOR)
        if geometry.uses_bitmap:
            work = bytearray(bitmap)
            changed = await self._write_sectors(index, data_at, work, start, data)
        else:
            # QEMU reads a dynamic block whole, whatever its bitmap: no copy-on-write.
            await self.file.pwrite(data_at + start, data)
            if sectors_present(bitmap, first, end):
                return
            work = bytearray(bitmap)
            changed = set_sectors(work, first, end)
        if changed:
            self._bitmaps_dirty[index] = work
            self._bitmaps.changed()

    async def _write_sectors(self, index: int, data_at: int, bitmap: bytearray, start: int,
                             data: memoryview) -> bool:
        """Differencing: write ``data`` at ``start`` of the block whose data begins at
        ``data_at``; a partly written sector not yet present is completed from the parent
        (copy-on-write of that sector). Marks the sectors in ``bitmap``; whether it changed."""
        geometry = self.geometry
        assert geometry is not None
        end = start + len(data)
        first, last = start // SECTOR, (end - 1) // SECTOR
        block_guest = index * geometry.block_size
        head = tail = b""
        if start % SECTOR and not sectors_present(bitmap, first, first + 1):
            head = await self._parent_bytes(block_guest + first * SECTOR, start % SECTOR)
        if end % SECTOR and not sectors_present(bitmap, last, last + 1):
            tail = await self._parent_bytes(block_guest + end, (last + 1) * SECTOR - end)
        if head or tail:
            self.counters.cow_bytes += len(head) + len(tail)
            await self.file.pwrite(data_at + start - len(head), head + bytes(data) + tail)
        else:
            await self.file.pwrite(data_at + start, data)
        return set_sectors(bitmap, first, last + 1)

    async def _parent_bytes(self, offset: int, length: int) -> bytes:
        """The parent's bytes (zeros past its end)."""
        return bytes(await self.read_backing(offset, length))

    async def _zero(self, offset: int, length: int, may_unmap: bool) -> None:
        if self.disk_type is DiskType.FIXED:
            await self.file.zero(offset, length, may_unmap=may_unmap)
            return
        geometry, bat = self.geometry, self.bat
        assert geometry is not None and bat is not None
        async with self._write_lock:
            end = offset + length
            while offset < end:
                index, n = block_window(geometry, offset, end - offset)
                entry = bat[index]
                if geometry.uses_bitmap:
                    hides_parent = self.backing_length(offset, n) > 0
                    if entry != BAT_UNALLOCATED or hides_parent:
                        for at in range(offset, offset + n, ZERO_CHUNK):
                            size = min(ZERO_CHUNK, offset + n - at)
                            await self._write_blocks(at, memoryview(bytes(size)))
                elif entry != BAT_UNALLOCATED:
                    start = offset % geometry.block_size
                    await self.file.zero(geometry.data_offset(entry) + start, n)
                    bitmap = await self._bitmap(index, entry)
                    first, stop = start // SECTOR, -(-(start + n) // SECTOR)
                    if not sectors_present(bitmap, first, stop):
                        work = bytearray(bitmap)
                        set_sectors(work, first, stop)
                        self._bitmaps_dirty[index] = work
                        self._bitmaps.changed()
                # An unallocated dynamic block reads as zeros already.
                offset += n
            await self._write_back_if_many()

    # -- write-back -----------------------------------------------------------------------------

    async def _flush(self) -> None:
        if self.disk_type is DiskType.FIXED:
            return
        async with self._write_lock:
            await self._write_back()

    async def _close(self) -> None:
        if not self.read_only:
            # Everything durable on close: BAT and bitmaps, then the file's data.
            await self.flush()

    async def _write_back_if_many(self) -> None:
        if len(self._bat_dirty) + len(self._bitmaps_dirty) > MAX_DIRTY:
            await self._write_back()

    async def _write_back(self) -> None:
        """Dirty sector bitmaps and BAT entries, after a flush of the blocks they name. Called
        with the write lock held."""
        if not self._bat_dirty and not self._bitmaps_dirty:
            return
        header, bat = self.header, self.bat
        assert header is not None and bat is not None
        await self.file.flush()
        for index in sorted(self._bitmaps_dirty):
            await self.file.pwrite(bat[index] * SECTOR, bytes(self._bitmaps_dirty[index]))
            self.counters.bitmap_writebacks += 1
        for first, count in _consecutive(sorted(self._bat_dirty)):
            raw = struct.pack(f">{count}I", *bat[first : first + count])
            await self.file.pwrite(header.table_offset + 4 * first, raw)
            self.counters.bat_writebacks += count
        for index, bitmap in self._bitmaps_dirty.items():
            self._bitmaps.put(index, bytes(bitmap))
        self._bitmaps_dirty.clear()
        self._bat_dirty.clear()
        self._bitmaps.changed()

    # -- information ----------------------------------------------------------------------------

    def info(self) -> dict[str, Any]:
        """``qemu-img info`` keys (cluster-size of dynamic disks, backing file), and the footer
        facts under ``format-specific`` (QEMU prints none for vpc)."""
        footer = self.footer
        assert footer is not None
        info: dict[str, Any] = {}
        data: dict[str, Any] = {
            "disk-type": footer.disk_type.name.lower(),
            "creator-app": footer.creator_app.decode("latin-1"),
            "creator-version": f"{footer.creator_version >> 16}.{footer.creator_version & 0xFFFF}",
            "creator-os": footer.creator_os.decode("latin-1"),
            "uuid": str(footer.uuid),
            "current-size": footer.current_size,
            "geometry": {
                "cylinders": footer.cylinders,
                "heads": footer.heads,
                "sectors": footer.sectors_per_track,
            },
            "size-source": str(self.size_source),
        }
        if self.header is not None:
            info["cluster-size"] = self.header.block_size
            if footer.disk_type is DiskType.DIFFERENCING:
                data["parent-uuid"] = str(self.header.parent_uuid)
                if self.header.parent_name:
                    data["parent-name"] = self.header.parent_name
        if self.parent_reference is not None:
            info["backing-filename"] = self.parent_reference
            info["backing-filename-format"] = "vpc"
        info["format-specific"] = {"type": "vpc", "data": data}
        return info


def _round_up(value: int, alignment: int) -> int:
    return -(-value // alignment) * alignment


def _consecutive(indexes: list[int]) -> list[tuple[int, int]]:
    """Sorted indexes as ``(first, count)`` runs of consecutive ones."""
    runs: list[tuple[int, int]] = []
    for index in indexes:
        if runs and runs[-1][0] + runs[-1][1] == index:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((index, 1))
    return runs
