"""Format driver ``vhdx``: Hyper-V VHDX, fixed, dynamic and differencing (differencing files
read-only).

Opening follows QEMU's ``vhdx_open``: the file identifier, the active header (headers.py), the
log (log.py: replayed into memory when it holds entries), the region table
(region.py), the metadata (metadata.py), then the BAT geometry (bat.py). A differencing file
opens its parent through the parent locator -- ``relative_path`` first, then a POSIX
``absolute_win32_path`` -- and, when the parent is a VHDX file, checks that its DataWriteGuid
is the ``parent_linkage`` recorded at creation: a parent written to since would make every
read of the child wrong.

Reads map the range (bat.py, pure) after the node has loaded what the mapping needs through its
caches: BAT pages of :data:`BAT_PAGE_ENTRIES` entries and the sector bitmap bytes of partially
present blocks, both bounded LRU caches counted in :class:`VhdxCounters`. The whole BAT is never
read at once: a 64 TiB disk of 1 MiB blocks has a 512 MiB BAT.

Writes (fixed and dynamic files; a differencing file is refused writable):

* A writable open whose log holds entries replays them into the file -- after everything was
  parsed through the in-memory replay, so a refused open writes nothing -- flushes, then
  writes both headers with a nil log GUID, as QEMU's ``vhdx_log_flush`` does.
* Before the first write of a session both headers get a new FileWriteGuid and DataWriteGuid
  (QEMU changes the first on a writable open and the second on the first guest-visible write;
  vdiskfs changes both when the file is first modified, so an image opened writable and never
  written stays byte for byte as it was). A differencing child made from this file then
  refuses it as a parent: its ``parent_linkage`` no longer matches.
* A write to a present block goes in place. A write to a block that is not present gets a new
  payload block at the end of the file, aligned to 1 MiB (QEMU's ``vhdx_allocate_block``);
  extending the file makes the rest of the block zeros. Its BAT entry (FULLY_PRESENT) is
  changed in memory; the changed BAT pages are pinned until written back.
* The BAT is written back at :meth:`~VhdxNode.flush` (and close, and when many pages are
  dirty) through the log, as the spec requires of metadata updates: flush the payload blocks;
  write one log entry holding the changed 4 KiB BAT sectors under a fresh log GUID and a
  header naming that GUID, flush; write the sectors in place, flush; write a header with a
  nil log GUID, flush. A crash before the header with the GUID is durable leaves the old BAT
  (the new blocks leak); after it, the log is replayed at the next open (by vdiskfs, or QEMU's
  ``qemu-img check -r all``) and every BAT entry it sets points at a block already durable.
  QEMU does the same per BAT entry, on every allocating write (``vhdx_log_write_and_flush``,
  some eight flushes each); vdiskfs batches a flush's worth of entries into one log entry, and
  writes the header naming the log only once the entry is written (its GUID is fresh, so a
  header that reaches the disk before the entry names no valid entry).

Zeroing a range zeroes present blocks in place and leaves the others alone: they read as
zeros already (QEMU has no write-zeroes for vhdx and allocates).
"""

from __future__ import annotations

import array
import dataclasses
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from typing import Any, ClassVar

import trio

from vdiskfs.block.context import OpenContext
from vdiskfs.block.format import FormatNode
from vdiskfs.block.node import BlockNode, BlockStatus, Buffer, Child
from vdiskfs.block.registry import redact_reference, register
from vdiskfs.drivers.format.runs import (
    LruCache,
    Run,
    RunCounters,
    RunKind,
    coalesce,
    le_bytes,
    le_table,
    read_runs,
    runs_status,
    write_runs,
)
from vdiskfs.drivers.format.vhdx import bat as batmap
from vdiskfs.drivers.format.vhdx.bat import BatGeometry, PayloadState
from vdiskfs.drivers.format.vhdx.headers import (
    HEADER_OFFSETS,
    HEADER_SIZE,
    MIB,
    NIL_GUID,
    SIGNATURE,
    VhdxHeader,
    choose_header,
    encode_header,
)
from vdiskfs.drivers.format.vhdx.log import (
    MAX_REPLAY_LOG,
    SECTOR,
    LogReplayNode,
    ReplayOverlay,
    encode_entry,
    find_active_sequence,
    max_data_sectors,
)
from vdiskfs.drivers.format.vhdx.metadata import (
    FILE_PARAMETERS,
    LOGICAL_SECTOR_SIZE,
    METADATA_TABLE_SIZE,
    PAGE83_DATA,
    PARENT_LOCATOR,
    PHYSICAL_SECTOR_SIZE,
    VIRTUAL_DISK_SIZE,
    DiskParameters,
    ParentLocator,
    parse_disk_parameters,
    parse_metadata_table,
    parse_parent_locator,
)
from vdiskfs.drivers.format.vhdx.region import (
    REGION_TABLE_OFFSETS,
    REGION_TABLE_SIZE,
    RegionTable,
    parse_region_table,
    region_table_problem,
)
from vdiskfs.errors import UnsupportedError

__all__ = ["VhdxCounters", "VhdxNode"]

#: BAT entries read and cached together (32 KiB).
BAT_PAGE_ENTRIES = 4096
BAT_CACHE_PAGES = 64
#: Bytes of sector bitmaps the node keeps.
BITMAP_CACHE_BYTES = 4 * MIB
#: Blocks a block-status request maps at most (each may need a sector bitmap read).
BLOCK_STATUS_BLOCKS = 64
#: BAT entries per 4 KiB sector: the unit the BAT is journaled and written back in.
BAT_SECTOR_ENTRIES = SECTOR // 8
#: Changed BAT sectors kept in memory before a write-back is forced (each maps 512 blocks).
BAT_DIRTY_LIMIT = 64
#: Largest log entry written: bounds the memory and the checksum time of one write-back.
MAX_LOG_ENTRY = MIB


@dataclass(slots=True)
class VhdxCounters(RunCounters):
    bat_cache_hits: int = 0
    bat_cache_misses: int = 0
    bitmap_cache_hits: int = 0
    bitmap_cache_misses: int = 0
    #: Log entries replayed on open (into memory read-only, into the file writable).
    log_entries_replayed: int = 0
    #: Payload blocks allocated by writes.
    blocks_allocated: int = 0
    #: Log entries written to journal BAT updates, and the BAT sectors they carried.
    log_entries_written: int = 0
    bat_sectors_written: int = 0
    #: Header writes (session GUIDs, log GUID set and cleared).
    header_updates: int = 0


@register
class VhdxNode(FormatNode):
    """A VHDX image: fixed or dynamic (writable), or differencing with its parent chain
    (read-only)."""

    driver = "vhdx"
    counters_class = VhdxCounters
    counters: VhdxCounters
    supports_write: ClassVar[bool] = True

    def __init__(self, file: BlockNode, ctx: OpenContext) -> None:
        super().__init__(file, ctx)
        self._bat_pages: LruCache[int, array.array[int]] = LruCache(BAT_CACHE_PAGES)
        #: BAT pages changed in memory and not yet written back: never evicted.
        self._dirty_pages: dict[int, array.array[int]] = {}
        self._dirty_sectors: set[int] = set()
        #: Bumped by every BAT change: a page read from the file meanwhile is not cached.
        self._bitmaps: LruCache[int, bytes] = LruCache(1)
        #: One allocation or BAT write-back at a time.
        self._alloc_lock = trio.Lock()
        self._session_lock = trio.Lock()
        #: Whether this session already gave the headers new FileWriteGuid/DataWriteGuid.
        self._session_started = False
        self._log_sequence = 1
        self._writable_open = False
        self.parent_locator: ParentLocator | None = None
        self.parent_path: str | None = None

    @classmethod
    def probe(cls, head: bytes, tail: bytes, filename: str) -> int:
        return 100 if head[:8] == SIGNATURE else 0

    # -- open -------------------------------------------------------------------------------------

    async def open(self) -> None:
        if await self.read_metadata(0, 8, "file_identifier") != SIGNATURE:
            raise self.format_error("not a VHDX file (no \"vhdxfile\" signature)",
                                    field="file_identifier")
        first, second = [await self.read_metadata(offset, HEADER_SIZE, "header")
                         for offset in HEADER_OFFSETS]
        self.header_index, self.header = choose_header(first, second, label=self.label)
        log_range = await self._replay_log(self.header)
        regions = await self._read_region_table(log_range)
        self.params = await self._read_metadata(regions)
        params = self.params
        reserved = [(regions.bat.file_offset, regions.bat.end, "the BAT"),
                    (regions.metadata.file_offset, regions.metadata.end, "the metadata region")]
        if log_range is not None:
            reserved.append((log_range[0], log_range[0] + log_range[1], "the log"))
        self.geometry = BatGeometry(
            virtual_size=params.virtual_disk_size,
            block_size=params.block_size,
            logical_sector_size=params.logical_sector_size,
            has_parent=params.has_parent,
            file_size=self.file.size,
            reserved=tuple(reserved),
            label=self.label,
        )
        if self.geometry.bat_entries * 8 > regions.bat.length:
            raise self.format_error(
                f"the BAT region ({regions.bat.length} bytes) is too small for "
                f"{self.geometry.bat_entries} entries", field="region_table.bat.length")
        self.bat_offset = regions.bat.file_offset
        self._bitmaps = LruCache(max(16, BITMAP_CACHE_BYTES
                                     // max(1, self.geometry.bitmap_bytes_per_block)))
        self.size = params.virtual_disk_size
        if not self.read_only:
            await self._prepare_for_writes()
            return
        if params.has_parent and self.ctx.options.backing:
            await self._open_parent()

    async def _prepare_for_writes(self) -> None:
        """Refuse what vdiskfs cannot write; replay a pending log into the file."""
        if self.params.has_parent:
            raise UnsupportedError(
                "writing differencing VHDX files is not supported (QEMU cannot open them at "
                "all); open the image read-only", path=self.label, field="file_parameters")
        if self.header.log_length < 2 * SECTOR:
            raise UnsupportedError("the file has no log to journal metadata updates through",
                                   path=self.label, field="header.log_length")
        if isinstance(self.file, LogReplayNode):
            await self._commit_replay(self.file)
        self._writable_open = True

    async def _replay_log(self, header: VhdxHeader) -> tuple[int, int] | None:
        """Check the log fields (as QEMU's ``vhdx_parse_log``) and replay pending entries into
        an in-memory overlay that replaces the file child. Returns the log's file range."""
        if header.log_offset < MIB or header.log_offset % MIB:
            raise self.format_error(f"log offset {header.log_offset:#x} is not a MiB multiple "
                                    "past the header section", field="header.log_offset")
        if header.log_version != 0:
            raise UnsupportedError(f"log version {header.log_version} is not supported",
                                   path=self.label, field="header.log_version")
        if header.log_length % MIB:
            raise self.format_error(f"log length {header.log_length} is not a MiB multiple",
                                    field="header.log_length")
        if not header.log_length:
            return None
        log_range = (header.log_offset, header.log_length)
        if not header.has_log:
            return log_range
        if header.log_length > MAX_REPLAY_LOG:
            raise UnsupportedError(
                f"the log ({header.log_length} bytes) may need replaying and is larger than the "
                f"{MAX_REPLAY_LOG} bytes vdiskfs replays in memory; replay it on a copy with "
                "'qemu-img check -r all'", path=self.label, field="header.log_length")
        log = await self.read_metadata(header.log_offset, header.log_length, "log")
        entries = find_active_sequence(log, header.log_guid)
        if not entries:
            return log_range
        overlay = ReplayOverlay.replay(entries, file_size=self.file.size, log_range=log_range,
                                       label=self.label)
        replay = LogReplayNode(self.file, overlay)
        await replay.open()
        # The overlay takes the file's place as this node's "file" child and owns it.
        self.children[0] = Child("file", replay)
        self.counters.log_entries_replayed = overlay.entries_replayed
        self._log_sequence = entries[-1].sequence + 1
        if self.read_only:
            self.ctx.warn(f"{self.label}: replayed {overlay.entries_replayed} pending VHDX log "
                          "entries in memory (the file is unchanged)")
        return log_range

    async def _commit_replay(self, replay: LogReplayNode) -> None:
        """Write what the in-memory replay laid over the file into it, then mark the log
        empty: QEMU's ``vhdx_log_flush``, with the headers written once everything is durable.

        The replay is idempotent: a crash before the new headers replays it again."""
        file = replay.file
        overlay = replay.overlay
        for start, end, payload in zip(overlay.starts, overlay.ends, overlay.payloads,
                                       strict=True):
            if payload is None:
                await file.zero(start, end - start)
            else:
                await file.pwrite(start, payload)
        if overlay.file_size > file.size:
            # QEMU rounds a file the log extended up to a whole MiB.
            end = -(-overlay.file_size // MIB) * MIB
            await file.zero(file.size, end - file.size)
        await file.flush()
        # The format node takes the file back; the replay node is dropped without closing it.
        self.children[0] = Child("file", file)
        self.geometry = dataclasses.replace(self.geometry, file_size=file.size)
        await self._start_session()
        self.ctx.warn(f"{self.label}: replayed {overlay.entries_replayed} pending VHDX log "
                      "entries into the file")

    async def _read_region_table(self, log_range: tuple[int, int] | None) -> RegionTable:
        problems: list[str] = []
        for copy, offset in enumerate(REGION_TABLE_OFFSETS):
            data = await self.read_metadata(offset, REGION_TABLE_SIZE, "region_table")
            problem = region_table_problem(data)
            if problem is None:
                if copy:
                    self.ctx.warn(f"{self.label}: region table 1 is damaged ({problems[0]}); "
                                  "using region table 2")
                return parse_region_table(data, label=self.label, log_range=log_range)
            problems.append(problem)
        raise self.format_error("no valid region table (" + "; ".join(
            f"copy {i + 1}: {p}" for i, p in enumerate(problems)) + ")", field="region_table")

    async def _read_metadata(self, regions: RegionTable) -> DiskParameters:
        region = regions.metadata
        table = await self.read_metadata(region.file_offset, METADATA_TABLE_SIZE,
                                         "metadata_table")
        items = parse_metadata_table(table, region_length=region.length, label=self.label)
        contents: dict[uuid.UUID, bytes] = {}
        for guid in (FILE_PARAMETERS, VIRTUAL_DISK_SIZE, PAGE83_DATA, LOGICAL_SECTOR_SIZE,
                     PHYSICAL_SECTOR_SIZE):
            item = items[guid]
            contents[guid] = await self.read_metadata(region.file_offset + item.offset,
                                                      item.length, item.name)
        params = parse_disk_parameters(contents, label=self.label)
        if params.has_parent:
            locator = items.get(PARENT_LOCATOR)
            if locator is None:
                raise self.format_error("a differencing file without a parent locator",
                                        field="parent_locator")
            data = await self.read_metadata(region.file_offset + locator.offset, locator.length,
                                            "parent_locator")
            self.parent_locator = parse_parent_locator(data, label=self.label)
        return params

    async def _open_parent(self) -> None:
        locator = self.parent_locator
        assert locator is not None
        tried = []
        for key, path in locator.paths():
            field = f"parent_locator.{key}"
            if not await self.ctx.exists(path, field_name=field):
                tried.append(f"{key} {redact_reference(path)!r}")
                continue
            parent = await self.open_backing(path, field=field)
            assert parent is not None  # opened only when backing files are wanted
            self.parent_path = path
            self._check_parent(parent, locator)
            return
        raise self.format_error(
            "parent not found (tried " + (", ".join(tried) or "no usable path") + ")",
            field="parent_locator")

    def _check_parent(self, parent: BlockNode, locator: ParentLocator) -> None:
        if isinstance(parent, VhdxNode):
            linkage = {locator.parent_linkage, locator.parent_linkage2}
            if parent.header.data_write_guid not in linkage:
                raise self.format_error(
                    f"parent {parent.label} has DataWriteGuid {parent.header.data_write_guid}, "
                    f"not the parent_linkage {locator.parent_linkage} recorded in this file: "
                    "the parent was modified after this differencing file was made",
                    field="parent_locator.parent_linkage")
        if parent.size != self.size:
            self.ctx.warn(f"{self.label}: parent {parent.label} is {parent.size} bytes, this "
                          f"differencing file {self.size}")

    # -- information ------------------------------------------------------------------------------

    def info(self) -> dict[str, Any]:
        info: dict[str, Any] = {"cluster-size": self.params.block_size}
        if self.parent_locator is not None:
            paths = self.parent_locator.paths()
            name = self.parent_path or (paths[0][1] if paths else None)
            if name is not None:
                info["backing-filename"] = name
        return info

    # -- mapping and I/O --------------------------------------------------------------------------

    async def _bat_page(self, page_number: int) -> array.array[int]:
        page = self._dirty_pages.get(page_number)
        if page is not None:
            self.counters.bat_cache_hits += 1
            return page
        # Single-flight: concurrent readers of one uncached page read it once; a page read
        # while a BAT entry changed is used by its own request only (LruCache's rules).
        page, hit = await self._bat_pages.load(page_number,
                                               partial(self._read_bat_page, page_number))
        if hit:
            self.counters.bat_cache_hits += 1
        else:
            self.counters.bat_cache_misses += 1
        return page

    async def _read_bat_page(self, page_number: int) -> array.array[int]:
        first = page_number * BAT_PAGE_ENTRIES
        count = min(BAT_PAGE_ENTRIES, self.geometry.bat_entries - first)
        return le_table(await self.read_metadata(self.bat_offset + 8 * first, 8 * count, "bat"),
                        8)

    async def _bat_entries(self, indices: list[int]) -> dict[int, int]:
        entries: dict[int, int] = {}
        for index in indices:
            page_number, in_page = divmod(index, BAT_PAGE_ENTRIES)
            entries[index] = (await self._bat_page(page_number))[in_page]
        return entries

    async def _sector_bitmaps(self, blocks: list[int]) -> dict[int, bytes]:
        bitmaps: dict[int, bytes] = {}
        for block in blocks:
            bitmap, hit = await self._bitmaps.load(block, partial(self._read_sector_bitmap, block))
            if hit:
                self.counters.bitmap_cache_hits += 1
            else:
                self.counters.bitmap_cache_misses += 1
            bitmaps[block] = bitmap
        return bitmaps

    async def _read_sector_bitmap(self, block: int) -> bytes:
        geom = self.geometry
        chunk, block_in_chunk = divmod(block, geom.chunk_ratio)
        index = batmap.sector_bitmap_index(geom, chunk)
        entry = (await self._bat_entries([index]))[index]
        base = geom.check_sector_bitmap(chunk, entry)
        size = geom.bitmap_bytes_per_block
        return await self.read_metadata(base + block_in_chunk * size, size, "sector_bitmap")

    async def _map(self, offset: int, length: int) -> Iterator[Run]:
        geom = self.geometry
        entries = await self._bat_entries(batmap.payload_indices(geom, offset, length))
        bitmaps = await self._sector_bitmaps(batmap.bitmap_needs(geom, entries, offset, length))
        return batmap.map_range(geom, entries, bitmaps, offset, length)

    async def _pread(self, offset: int, length: int) -> Buffer:
        return await read_runs(self, coalesce(await self._map(offset, length)))

    async def _block_status(self, offset: int, length: int) -> tuple[BlockStatus, int]:
        span = BLOCK_STATUS_BLOCKS * self.geometry.block_size
        window = min(length, span - offset % span)
        return runs_status(self, await self._map(offset, window))

    # -- writes -----------------------------------------------------------------------------------

    async def _pwrite(self, offset: int, data: Buffer) -> None:
        view = memoryview(data)
        await self._start_session()
        runs = coalesce(await self._map(offset, len(view)))
        if all(run.kind is RunKind.DATA for run in runs):
            await write_runs(runs, offset, view, self.file, self._allocate)
            return
        async with self._alloc_lock:
            # Mapped again under the lock: the allocation before may have mapped these blocks.
            runs = coalesce(await self._map(offset, len(view)))
            await write_runs(runs, offset, view, self.file, self._allocate)
            if len(self._dirty_sectors) >= BAT_DIRTY_LIMIT:
                await self._write_back_bat()

    async def _allocate(self, run: Run, data: memoryview) -> None:
        """Give the blocks of ``run`` (none present) consecutive new payload blocks at the end
        of the file, write ``data`` into them, and mark them present in the in-memory BAT."""
        geom = self.geometry
        first_block = run.offset // geom.block_size
        count = (run.end - 1) // geom.block_size - first_block + 1
        start = -(-self.file.size // MIB) * MIB
        # Past the end of the file zeroing only extends it: the rest of each block reads zero.
        await self.file.zero(start, count * geom.block_size)
        await self.file.pwrite(start + run.offset - first_block * geom.block_size, data)
        self.geometry = dataclasses.replace(geom, file_size=self.file.size)
        for i in range(count):
            await self._set_bat_entry(batmap.payload_index(geom, first_block + i),
                                      (start + i * geom.block_size)
                                      | PayloadState.FULLY_PRESENT)
        self.counters.blocks_allocated += count

    async def _set_bat_entry(self, index: int, entry: int) -> None:
        page_number, in_page = divmod(index, BAT_PAGE_ENTRIES)
        page = await self._bat_page(page_number)
        # No await from here on: a reader sees the entry old or new, and the page stays in
        # _dirty_pages (looked up first) until it is written back.
        with self._bat_pages.updating():
            page[in_page] = entry
            self._dirty_pages[page_number] = page
            self._bat_pages.put(page_number, page)
            self._dirty_sectors.add(index // BAT_SECTOR_ENTRIES)

    async def _zero(self, offset: int, length: int, may_unmap: bool) -> None:
        # Blocks that are not present read as zeros already (no parent: differencing files
        # are not written); present ones are zeroed in place.
        runs = [run for run in coalesce(await self._map(offset, length))
                if run.kind is RunKind.DATA]
        if runs:
            await self._start_session()
        for run in runs:
            await self.file.zero(run.host_offset, run.length, may_unmap=may_unmap)

    # -- headers and the log ----------------------------------------------------------------------

    async def _write_header(self, **changes: Any) -> None:
        """Write the inactive header with the next sequence number and ``changes``, flushed:
        it becomes the active one (a torn write leaves the other active)."""
        header = dataclasses.replace(self.header,
                                     sequence_number=self.header.sequence_number + 1, **changes)
        slot = 1 - self.header_index
        encoded = encode_header(header)
        await self.file.pwrite(HEADER_OFFSETS[slot], encoded)
        await self.file.flush()
        self.header_index, self.header = slot, VhdxHeader.parse(encoded)
        self.counters.header_updates += 1

    async def _start_session(self) -> None:
        """Before the file's first modification: new FileWriteGuid and DataWriteGuid in both
        headers (QEMU's ``vhdx_update_headers``), so either one, if the other is torn, tells
        a differencing child that this file changed."""
        if self._session_started:
            return
        async with self._session_lock:
            if self._session_started:
                return
            session, data = uuid.uuid4(), uuid.uuid4()
            for _ in HEADER_OFFSETS:
                await self._write_header(file_write_guid=session, data_write_guid=data,
                                         log_guid=NIL_GUID)
            self._session_started = True

    async def _flush(self) -> None:
        async with self._alloc_lock:
            await self._write_back_bat()

    async def _write_back_bat(self) -> None:
        """Journal the changed BAT sectors through the log and write them in place (see the
        module docstring for the order and why a crash anywhere in it only leaks blocks)."""
        if not self._dirty_sectors:
            return
        # The payload blocks first: the BAT entries must never point at data not on disk.
        await self.file.flush()
        sectors = sorted(self._dirty_sectors)
        per_entry = max_data_sectors(min(self.header.log_length, MAX_LOG_ENTRY))
        for first in range(0, len(sectors), per_entry):
            updates = [(self.bat_offset + SECTOR * k, await self._bat_sector(k))
                       for k in sectors[first : first + per_entry]]
            log_guid = uuid.uuid4()
            entry = encode_entry(updates, sequence=self._log_sequence, tail=0,
                                 log_guid=log_guid, flushed_file_offset=self.file.size,
                                 last_file_offset=self.file.size)
            self._log_sequence += 1
            # The entry, then a header naming its (fresh) GUID, both durable before the BAT is
            # touched. A header durable without the whole entry finds no valid entry, or a
            # subset, for that GUID: nothing is replayed that is not durable.
            await self.file.pwrite(self.header.log_offset, entry)
            await self._write_header(log_guid=log_guid)
            self.counters.log_entries_written += 1
            for file_offset, data in updates:
                await self.file.pwrite(file_offset, data)
            self.counters.bat_sectors_written += len(updates)
            await self.file.flush()
            await self._write_header(log_guid=NIL_GUID)
        self._dirty_sectors.clear()
        self._dirty_pages.clear()

    async def _bat_sector(self, sector: int) -> bytes:
        """The 4 KiB BAT sector ``sector`` as it must be on disk: the in-memory entries over
        the file's bytes (which hold what lies past the last entry)."""
        first = sector * BAT_SECTOR_ENTRIES
        page = self._dirty_pages[first // BAT_PAGE_ENTRIES]
        in_page = first % BAT_PAGE_ENTRIES
        count = min(BAT_SECTOR_ENTRIES, len(page) - in_page)
        data = bytearray(await self.read_metadata(self.bat_offset + SECTOR * sector, SECTOR,
                                                  "bat"))
        data[: 8 * count] = le_bytes(page[in_page : in_page + count])
        return bytes(data)

    async def _close(self) -> None:
        if self._writable_open:
            await self.flush()
        self._bat_pages.clear()
        self._dirty_pages.clear()
        self._bitmaps.clear()
