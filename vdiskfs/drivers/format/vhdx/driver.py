"""Format driver ``vhdx``: Hyper-V VHDX, fixed, dynamic and differencing (read-only).

Opening follows QEMU's ``vhdx_open``: the file identifier, the active header (headers.py), the
log (log.py: replayed into memory when it holds entries, never written), the region table
(region.py), the metadata (metadata.py), then the BAT geometry (bat.py). A differencing file
opens its parent through the parent locator -- ``relative_path`` first, then a POSIX
``absolute_win32_path`` -- and, when the parent is a VHDX file, checks that its DataWriteGuid
is the ``parent_linkage`` recorded at creation: a parent written to since would make every
read of the child wrong.

Reads map the range (bat.py, pure) after the node has loaded what the mapping needs through its
caches: BAT pages of :data:`BAT_PAGE_ENTRIES` entries and the sector bitmap bytes of partially
present blocks, both bounded LRU caches counted in :class:`VhdxCounters`. The whole BAT is never
read at once: a 64 TiB disk of 1 MiB blocks has a 512 MiB BAT.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

from vdiskfs.block.format import FormatNode
from vdiskfs.block.node import BlockNode, BlockStatus, Buffer, Child
from vdiskfs.block.registry import OpenContext, register
from vdiskfs.drivers.format.runs import (
    LruCache,
    Run,
    RunCounters,
    coalesce,
    first_run,
    le_table,
    read_runs,
    run_status,
)
from vdiskfs.drivers.format.vhdx import bat as batmap
from vdiskfs.drivers.format.vhdx.bat import BatGeometry
from vdiskfs.drivers.format.vhdx.headers import (
    HEADER_OFFSETS,
    HEADER_SIZE,
    MIB,
    SIGNATURE,
    VhdxHeader,
    choose_header,
)
from vdiskfs.drivers.format.vhdx.log import (
    MAX_REPLAY_LOG,
    LogReplayNode,
    ReplayOverlay,
    find_active_sequence,
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


@dataclass(slots=True)
class VhdxCounters(RunCounters):
    bat_cache_hits: int = 0
    bat_cache_misses: int = 0
    bitmap_cache_hits: int = 0
    bitmap_cache_misses: int = 0
    #: Log entries replayed into memory on open.
    log_entries_replayed: int = 0


@register
class VhdxNode(FormatNode):
    """A VHDX image and, if differencing, its parent chain; read-only."""

    driver = "vhdx"
    counters_class = VhdxCounters
    counters: VhdxCounters
    supports_write: ClassVar[bool] = False

    def __init__(self, file: BlockNode, ctx: OpenContext) -> None:
        super().__init__(file, ctx)
        self._bat_pages: LruCache[int, Any] = LruCache(BAT_CACHE_PAGES)
        self._bitmaps: LruCache[int, bytes] = LruCache(1)
        self.parent_locator: ParentLocator | None = None
        self.parent_path: str | None = None

    @classmethod
    def probe(cls, head: bytes, tail: bytes, filename: str) -> int:
        return 100 if head[:8] == SIGNATURE else 0

    @property
    def backing(self) -> BlockNode | None:
        return self.child("backing")

    # -- open -------------------------------------------------------------------------------------

    async def open(self) -> None:
        if not self.read_only:
            raise UnsupportedError("vhdx: writing is not supported yet (open read-only)",
                                   path=self.label)
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
        if params.has_parent and self.ctx.options.backing:
            await self._open_parent()

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
        self.ctx.warn(f"{self.label}: replayed {overlay.entries_replayed} pending VHDX log "
                      "entries in memory (the file is unchanged)")
        return log_range

    async def _read_region_table(self, log_range: tuple[int, int] | None) -> RegionTable:
        problems = []
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
            item = items.get(PARENT_LOCATOR)
            if item is None:
                raise self.format_error("a differencing file without a parent locator",
                                        field="parent_locator")
            data = await self.read_metadata(region.file_offset + item.offset, item.length,
                                            "parent_locator")
            self.parent_locator = parse_parent_locator(data, label=self.label)
        return params

    async def _open_parent(self) -> None:
        locator = self.parent_locator
        assert locator is not None
        tried = []
        for key, path in locator.paths():
            field = f"parent_locator.{key}"
            if not os.path.exists(self.ctx.resolve(path, field_name=field)):
                tried.append(f"{key} {path!r}")
                continue
            parent = await self.ctx.open_child(path, role="backing", field_name=field,
                                               format=None)
            self.add_child("backing", parent)
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

    async def _bat_entries(self, indices: list[int]) -> dict[int, int]:
        entries: dict[int, int] = {}
        for index in indices:
            page_number, in_page = divmod(index, BAT_PAGE_ENTRIES)
            page = self._bat_pages.get(page_number)
            if page is None:
                self.counters.bat_cache_misses += 1
                first = page_number * BAT_PAGE_ENTRIES
                count = min(BAT_PAGE_ENTRIES, self.geometry.bat_entries - first)
                raw = await self.read_metadata(self.bat_offset + 8 * first, 8 * count, "bat")
                page = le_table(raw, 8)
                self._bat_pages.put(page_number, page)
            else:
                self.counters.bat_cache_hits += 1
            entries[index] = page[in_page]
        return entries

    async def _sector_bitmaps(self, blocks: list[int]) -> dict[int, bytes]:
        geom = self.geometry
        bitmaps: dict[int, bytes] = {}
        for block in blocks:
            bitmap = self._bitmaps.get(block)
            if bitmap is None:
                self.counters.bitmap_cache_misses += 1
                chunk, block_in_chunk = divmod(block, geom.chunk_ratio)
                index = batmap.sector_bitmap_index(geom, chunk)
                entry = (await self._bat_entries([index]))[index]
                base = geom.check_sector_bitmap(chunk, entry)
                size = geom.bitmap_bytes_per_block
                bitmap = await self.read_metadata(base + block_in_chunk * size, size,
                                                  "sector_bitmap")
                self._bitmaps.put(block, bitmap)
            else:
                self.counters.bitmap_cache_hits += 1
            bitmaps[block] = bitmap
        return bitmaps

    async def _map(self, offset: int, length: int) -> Iterator[Run]:
        geom = self.geometry
        entries = await self._bat_entries(batmap.payload_indices(geom, offset, length))
        bitmaps = await self._sector_bitmaps(batmap.bitmap_needs(geom, entries, offset, length))
        return batmap.map_range(geom, entries, bitmaps, offset, length)

    async def _pread(self, offset: int, length: int) -> Buffer:
        runs = coalesce(await self._map(offset, length))
        return await read_runs(runs, self.file, self.backing, self.counters)

    async def _block_status(self, offset: int, length: int) -> tuple[BlockStatus, int]:
        span = BLOCK_STATUS_BLOCKS * self.geometry.block_size
        window = min(length, span - offset % span)
        run = first_run(await self._map(offset, window))
        return run_status(run, self.backing)

    async def _close(self) -> None:
        self._bat_pages.clear()
        self._bitmaps.clear()
