"""Format driver ``vpc``: Connectix/Microsoft Virtual PC and Hyper-V VHD images, read-only.

Disk types read: fixed (the guest bytes, then a footer), dynamic (a BAT of blocks) and
differencing (a dynamic disk whose sector bitmaps say which sectors it holds; the others come
from the parent named by its parent locators). The virtual size is computed exactly as QEMU 7.2
does (geometry or current size, by creator application), so it equals ``qemu-img info``'s.

Unlike QEMU, which probes a fixed VHD as raw (its only footer is at the end), the probe looks at
the file's last 512 bytes too, and the node presents the disk without its footer.

The node reads the whole BAT at open (bounded: :data:`MAX_BAT_ENTRIES`, and it must lie in the
file) and keeps sector bitmaps of differencing blocks in a cache (``bitmap_cache_*`` counters).
Writing is not implemented; a write path would allocate a block at the footer's place (bitmap,
data, then the footer moved after it), then write the BAT entry, as QEMU's ``alloc_block``.
"""

from __future__ import annotations

import os
from array import array
from dataclasses import dataclass
from typing import Any

from vdiskfs.block.format import FormatNode
from vdiskfs.block.node import BlockNode, BlockStatus, Buffer
from vdiskfs.block.registry import OpenContext, register
from vdiskfs.drivers.format.runs import (
    LruCache,
    Run,
    RunCounters,
    RunKind,
    coalesce,
    read_runs,
    run_status,
)
from vdiskfs.drivers.format.vpc.mapping import BlockGeometry, block_window, check_bat, map_block
from vdiskfs.drivers.format.vpc.structs import (
    BAT_UNALLOCATED,
    DYNAMIC_HEADER_SIZE,
    FOOTER_COOKIE,
    FOOTER_SIZE,
    MAX_LOCATOR_DATA,
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
from vdiskfs.errors import ChainError, UnsupportedError

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


@dataclass(slots=True)
class VpcCounters(RunCounters):
    """The run counters (``data_reads``, ``backing_reads``, ``zero_bytes``...) and the bitmap
    cache's."""

    bitmap_cache_hits: int = 0
    bitmap_cache_misses: int = 0


@register
class VpcNode(FormatNode):
    """A VHD image: its footer, and for dynamic and differencing disks the BAT."""

    driver = "vpc"
    counters_class = VpcCounters
    counters: VpcCounters

    def __init__(self, file: BlockNode, ctx: OpenContext) -> None:
        super().__init__(file, ctx)
        self.footer: Footer | None = None
        self.header: DynamicHeader | None = None
        self.size_source = SizeSource.GEOMETRY
        self.geometry: BlockGeometry | None = None
        self.bat: array[int] | None = None
        self.backing: BlockNode | None = None
        self.parent_reference: str | None = None
        self._bitmaps: LruCache[int, bytes] = LruCache(BITMAP_CACHE_BLOCKS)

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
        if not self.read_only:
            raise UnsupportedError("vpc: writing is not supported; open the image read-only",
                                   path=self.label)
        file = self.file
        if file.size < FOOTER_SIZE:
            raise self.format_error(f"file of {file.size} bytes is too small for a VHD footer",
                                    field="footer")
        footer = None
        head = await self.read_metadata(0, FOOTER_SIZE, "footer copy")
        if head[:8] == FOOTER_COOKIE:
            # Dynamic and differencing disks start with a copy of the footer (QEMU reads it).
            footer = parse_footer(head, self.label, where="footer copy")
            if footer.disk_type is DiskType.FIXED:
                footer = None  # a fixed disk whose guest data happens to start with a footer
        if footer is None:
            tail = await self.read_metadata(file.size - FOOTER_SIZE, FOOTER_SIZE, "footer")
            footer = parse_footer(tail, self.label, where="footer")
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
        candidates = parent_candidates(header, locator_data)
        if not candidates:
            raise self.format_error("differencing disk names no parent", field="parent_locator")
        refused: ChainError | None = None
        for reference in candidates:
            try:
                path = self.ctx.resolve(reference, field_name="parent_locator")
            except ChainError as exc:
                refused = refused or exc
                continue
            if not os.path.exists(path):
                continue
            node = await self.ctx.open_child(reference, role="backing",
                                             field_name="parent_locator", format="vpc")
            self.add_child("backing", node)
            self.backing = node
            self.parent_reference = reference
            self._check_parent(node, reference)
            return
        if refused is not None:
            raise refused
        raise self.format_error(
            "parent of differencing disk not found; tried " + ", ".join(map(repr, candidates)),
            field="parent_locator",
        )

    def _check_parent(self, parent: BlockNode, reference: str) -> None:
        header = self.header
        parent_footer = getattr(parent, "footer", None)
        assert header is not None
        if isinstance(parent_footer, Footer) and parent_footer.uuid != header.parent_uuid:
            raise self.format_error(
                f"parent {reference!r} has UUID {parent_footer.uuid}, but this differencing "
                f"disk was made from {header.parent_uuid}",
                field="dynamic_header.parent_uuid",
            )

    # -- mapping --------------------------------------------------------------------------------

    async def _bitmap(self, index: int, entry: int) -> bytes:
        bitmap = self._bitmaps.get(index)
        if bitmap is not None:
            self.counters.bitmap_cache_hits += 1
            return bitmap
        self.counters.bitmap_cache_misses += 1
        assert self.geometry is not None
        # check_bat placed every allocated block, bitmap included, inside the file.
        bitmap = await self.read_metadata(entry * 512, self.geometry.bitmap_size,
                                          f"sector bitmap of block {index}")
        self._bitmaps.put(index, bitmap)
        return bitmap

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
        runs = await self._map(offset, length)
        if len(runs) == 1 and runs[0].kind is RunKind.DATA:
            self.counters.data_reads += 1
            self.counters.data_bytes += length
            return await self.file.pread(runs[0].host_offset, length)
        return await read_runs(runs, self.file, self.backing, self.counters)

    async def _block_status(self, offset: int, length: int) -> tuple[BlockStatus, int]:
        if self.disk_type is DiskType.FIXED:
            status, run = await self.file.block_status(offset, length)
            kind = BlockStatus.ZERO if status & BlockStatus.ZERO else BlockStatus.DATA
            return kind | BlockStatus.ALLOCATED, run
        end = offset + length
        status: BlockStatus | None = None
        total = 0
        for _ in range(STATUS_SCAN_BLOCKS):
            block_runs, n = await self._block_runs(offset, end - offset)
            for run in block_runs:
                run_flags, run_length = run_status(run, self.backing)
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
