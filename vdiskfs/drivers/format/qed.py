"""Format driver ``qed``: the QEMU Enhanced Disk format (read-only).

Layout (all little-endian; see QEMU's block/qed.h)::

    header   magic "QED\\0", cluster size, table size (in clusters), header size (in
             clusters), feature bits, L1 table offset, image size, backing file name
             offset and size (bytes from the start of the file)
    L1 table table_size clusters of 64-bit offsets of L2 tables (0: none)
    L2 table table_size clusters of 64-bit offsets of data clusters (0: not allocated,
             read the backing file; 1: a zero cluster)

The checks on open are QEMU's ``bdrv_qed_open``: cluster size a power of two in [4 KiB, 64
MiB], table size a power of two in [1, 16] clusters, image size a multiple of 512 no larger
than the tables can map, an L1 table inside the file, a backing file name inside the header
clusters. Every table and cluster offset met while reading is checked as QEMU's
``qed_check_cluster_offset`` does (cluster aligned, past the header, inside the file): a bad
one is a :class:`FormatError` naming the table entry.

``QED_F_NEED_CHECK`` marks an image that was not closed cleanly. QEMU repairs it on a writable
open and reads it as is when read-only; vdiskfs, read-only, does the latter and warns: the
checks above make a dangling entry an error, never a read of bytes outside the file.

L2 tables are read in pages of at most :data:`L2_PAGE_ENTRIES` entries through an LRU cache on
the node, so a hostile 1 GiB table (64 MiB clusters, 16 per table) costs one 32 KiB read per
page touched, not a 1 GiB allocation.
"""

from __future__ import annotations

import array
import os
import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from vdiskfs.block.format import FormatNode
from vdiskfs.block.node import BlockNode, BlockStatus, Buffer
from vdiskfs.block.registry import OpenContext, register
from vdiskfs.drivers.format.runs import (
    LruCache,
    Run,
    RunCounters,
    RunKind,
    coalesce,
    first_run,
    le_table,
    read_runs,
    run_status,
)
from vdiskfs.errors import FormatError, UnsupportedError

__all__ = ["QedCounters", "QedGeometry", "QedHeader", "QedNode", "l2_pages_needed", "map_range"]

MAGIC = 0x00444551  # "QED\0"
#: The image has a backing file.
F_BACKING_FILE = 0x01
#: The image was not closed cleanly and needs a consistency check.
F_NEED_CHECK = 0x02
#: The backing file is raw: do not probe its format.
F_BACKING_FORMAT_NO_PROBE = 0x04
KNOWN_FEATURES = F_BACKING_FILE | F_NEED_CHECK | F_BACKING_FORMAT_NO_PROBE
MIN_CLUSTER_SIZE = 4 * 1024
MAX_CLUSTER_SIZE = 64 * 1024 * 1024
MIN_TABLE_SIZE = 1
MAX_TABLE_SIZE = 16
#: L2 entry of a cluster that reads as zeros (QEMU's ``qed_offset_is_zero_cluster``).
ZERO_CLUSTER = 1
#: QEMU reads the backing file name into a PATH_MAX buffer, NUL included.
MAX_BACKING_NAME = 4095
#: Entries of an L2 table read and cached together (32 KiB).
L2_PAGE_ENTRIES = 4096
#: L2 pages the node keeps (4 MiB at most).
L2_CACHE_PAGES = 128

_HEADER = struct.Struct("<IIIIQQQQQII")
assert _HEADER.size == 64


@dataclass(frozen=True, slots=True)
class QedHeader:
    """QEMU's ``QEDHeader``."""

    magic: int
    cluster_size: int
    table_size: int
    header_size: int
    features: int
    compat_features: int
    autoclear_features: int
    l1_table_offset: int
    image_size: int
    backing_filename_offset: int
    backing_filename_size: int

    @classmethod
    def parse(cls, data: bytes) -> QedHeader:
        return cls(*_HEADER.unpack_from(data))


def _is_power_of_two(value: int) -> bool:
    return value > 0 and value & (value - 1) == 0


def max_image_size(cluster_size: int, table_size: int) -> int:
    """QEMU's ``qed_max_image_size``: what an L1 table of full L2 tables can map."""
    entries = table_size * cluster_size // 8
    return entries * entries * cluster_size


@dataclass(frozen=True, slots=True)
class QedGeometry:
    """Sizes derived from a validated header, and the bounds every offset is checked against."""

    cluster_size: int
    table_size: int
    #: Entries per table (L1 and L2 alike).
    table_entries: int
    #: log2 of the guest bytes one L2 entry / one L1 entry maps.
    l2_shift: int
    l1_shift: int
    image_size: int
    #: Bytes of header clusters: no table or data cluster may start before this.
    header_bytes: int
    #: The file size rounded down to a cluster, as QEMU's ``s->file_size``.
    file_size: int
    label: str

    @property
    def table_bytes(self) -> int:
        return self.table_size * self.cluster_size

    @property
    def l2_page_entries(self) -> int:
        return min(L2_PAGE_ENTRIES, self.table_entries)

    def check_cluster(self, offset: int, field: str) -> None:
        """QEMU's ``qed_check_cluster_offset``, raising instead of returning false."""
        if offset % self.cluster_size or offset < self.header_bytes or offset >= self.file_size:
            raise FormatError(
                f"cluster offset {offset:#x} is not a cluster-aligned offset between the header "
                f"({self.header_bytes} bytes) and the end of the file ({self.file_size} bytes)",
                path=self.label,
                field=field,
                offset=offset,
            )

    def check_table(self, offset: int, field: str) -> None:
        """A table is ``table_size`` clusters, all inside the file."""
        self.check_cluster(offset, field)
        if offset + self.table_bytes > self.file_size:
            raise FormatError(
                f"table of {self.table_bytes} bytes at {offset:#x} runs past the end of the "
                f"file ({self.file_size} bytes)",
                path=self.label,
                field=field,
                offset=offset,
            )


def validate_header(header: QedHeader, *, label: str, file_size: int) -> QedGeometry:
    """Check ``header`` as QEMU's ``bdrv_qed_open`` does; return the geometry it implies."""

    def bad(message: str, field: str) -> FormatError:
        return FormatError(message, path=label, field=field)

    if header.magic != MAGIC:
        raise bad(f"not a QED image (magic {header.magic:#010x})", "magic")
    unknown = header.features & ~KNOWN_FEATURES
    if unknown:
        raise UnsupportedError(f"unknown feature bits {unknown:#x}", path=label,
                               field="features")
    if (not _is_power_of_two(header.cluster_size)
            or not MIN_CLUSTER_SIZE <= header.cluster_size <= MAX_CLUSTER_SIZE):
        raise bad(f"cluster size {header.cluster_size} is not a power of two in "
                  f"[{MIN_CLUSTER_SIZE}, {MAX_CLUSTER_SIZE}]", "cluster_size")
    if (not _is_power_of_two(header.table_size)
            or not MIN_TABLE_SIZE <= header.table_size <= MAX_TABLE_SIZE):
        raise bad(f"table size {header.table_size} is not a power of two in "
                  f"[{MIN_TABLE_SIZE}, {MAX_TABLE_SIZE}] clusters", "table_size")
    if header.image_size % 512:
        raise bad(f"image size {header.image_size} is not a multiple of 512", "image_size")
    limit = max_image_size(header.cluster_size, header.table_size)
    if header.image_size > limit:
        raise bad(f"image size {header.image_size} exceeds what the tables can map ({limit})",
                  "image_size")
    header_bytes = header.header_size * header.cluster_size
    if header.header_size == 0 or header_bytes > file_size:
        raise bad(f"header of {header.header_size} clusters does not fit the file "
                  f"({file_size} bytes)", "header_size")
    table_entries = header.table_size * header.cluster_size // 8
    l2_shift = header.cluster_size.bit_length() - 1
    geometry = QedGeometry(
        cluster_size=header.cluster_size,
        table_size=header.table_size,
        table_entries=table_entries,
        l2_shift=l2_shift,
        l1_shift=l2_shift + table_entries.bit_length() - 1,
        image_size=header.image_size,
        header_bytes=header_bytes,
        file_size=file_size - file_size % header.cluster_size,
        label=label,
    )
    geometry.check_table(header.l1_table_offset, "l1_table_offset")
    if header.features & F_BACKING_FILE:
        end = header.backing_filename_offset + header.backing_filename_size
        if end > header_bytes:
            raise bad(f"backing file name ({header.backing_filename_size} bytes at "
                      f"{header.backing_filename_offset}) lies outside the header clusters",
                      "backing_filename_offset")
        if not 0 < header.backing_filename_size <= MAX_BACKING_NAME:
            raise bad(f"backing file name of {header.backing_filename_size} bytes (must be 1 to "
                      f"{MAX_BACKING_NAME})", "backing_filename_size")
    return geometry


#: A page of an L2 table: (L2 table offset, page number within the table).
L2PageKey = tuple[int, int]


def l2_pages_needed(geom: QedGeometry, l1: array.array[int], offset: int,
                    length: int) -> list[L2PageKey]:
    """The L2 pages that mapping ``[offset, offset + length)`` reads, L1 entries checked.

    Pure: the node loads these pages (through its cache) and hands them to :func:`map_range`.
    """
    pages: list[L2PageKey] = []
    page_entries = geom.l2_page_entries
    end = offset + length
    while offset < end:
        l1_index = offset >> geom.l1_shift
        span_end = min(end, (l1_index + 1) << geom.l1_shift)
        l2_offset = l1[l1_index]
        if l2_offset:
            geom.check_table(l2_offset, f"l1_table[{l1_index}]")
            first = (offset >> geom.l2_shift) & (geom.table_entries - 1)
            last = ((span_end - 1) >> geom.l2_shift) & (geom.table_entries - 1)
            for page in range(first // page_entries, last // page_entries + 1):
                pages.append((l2_offset, page))
        offset = span_end
    return pages


def map_range(geom: QedGeometry, l1: array.array[int],
              l2_pages: Mapping[L2PageKey, array.array[int]], offset: int,
              length: int) -> Iterator[Run]:
    """Yield the runs of ``[offset, offset + length)``, one per cluster touched (or one per
    unallocated L1 entry). Pure: every L2 page it reads must be in ``l2_pages``."""
    cluster_size = geom.cluster_size
    page_entries = geom.l2_page_entries
    end = offset + length
    while offset < end:
        l1_index = offset >> geom.l1_shift
        l2_offset = l1[l1_index]
        if not l2_offset:
            span_end = min(end, (l1_index + 1) << geom.l1_shift)
            yield Run(RunKind.BACKING, offset, span_end - offset)
            offset = span_end
            continue
        l2_index = (offset >> geom.l2_shift) & (geom.table_entries - 1)
        page, in_page = divmod(l2_index, page_entries)
        entry = l2_pages[(l2_offset, page)][in_page]
        in_cluster = offset & (cluster_size - 1)
        n = min(cluster_size - in_cluster, end - offset)
        if entry == 0:
            yield Run(RunKind.BACKING, offset, n)
        elif entry == ZERO_CLUSTER:
            yield Run(RunKind.ZERO, offset, n)
        else:
            geom.check_cluster(entry, f"l2_table[{l1_index}][{l2_index}]")
            yield Run(RunKind.DATA, offset, n, entry + in_cluster)
        offset += n


@dataclass(slots=True)
class QedCounters(RunCounters):
    l2_cache_hits: int = 0
    l2_cache_misses: int = 0


@register
class QedNode(FormatNode):
    """A QED image with its optional backing file, read-only."""

    driver = "qed"
    counters_class = QedCounters
    counters: QedCounters
    supports_write: ClassVar[bool] = False

    def __init__(self, file: BlockNode, ctx: OpenContext) -> None:
        super().__init__(file, ctx)
        self._l2_cache: LruCache[L2PageKey, array.array[int]] = LruCache(L2_CACHE_PAGES)
        self.backing_filename: str | None = None
        self.backing_format: str | None = None

    @classmethod
    def probe(cls, head: bytes, tail: bytes, filename: str) -> int:
        if len(head) >= _HEADER.size and struct.unpack_from("<I", head)[0] == MAGIC:
            return 100
        return 0

    @property
    def backing(self) -> BlockNode | None:
        return self.child("backing")

    async def open(self) -> None:
        if not self.read_only:
            raise UnsupportedError("qed: writing is not supported yet (open read-only)",
                                   path=self.label)
        self.header = QedHeader.parse(await self.read_metadata(0, _HEADER.size, "header"))
        header = self.header
        self.geometry = validate_header(header, label=self.label, file_size=self.file.size)
        geom = self.geometry
        # Only the L1 entries the image size reaches are read: the rest map nothing.
        l1_entries = -(-header.image_size // (1 << geom.l1_shift))
        self.l1 = le_table(
            await self.read_metadata(header.l1_table_offset, 8 * l1_entries, "l1_table"), 8)
        if header.features & F_NEED_CHECK:
            self.ctx.warn(
                f"{self.label}: QED image was not closed cleanly (need-check flag set); reading "
                "it as is, without repair (table entries pointing outside the file are errors)"
            )
        if header.features & F_BACKING_FILE:
            raw_name = await self.read_metadata(
                header.backing_filename_offset, header.backing_filename_size, "backing_filename")
            self.backing_filename = os.fsdecode(raw_name)
            if header.features & F_BACKING_FORMAT_NO_PROBE:
                self.backing_format = "raw"
            if self.ctx.options.backing:
                backing = await self.ctx.open_child(
                    self.backing_filename,
                    role="backing",
                    field_name="backing_filename",
                    format=self.backing_format,
                )
                self.add_child("backing", backing)
        self.size = header.image_size

    def info(self) -> dict[str, Any]:
        info: dict[str, Any] = {"cluster-size": self.header.cluster_size}
        if self.header.features & F_NEED_CHECK:
            info["dirty-flag"] = True
        if self.backing_filename is not None:
            info["backing-filename"] = self.backing_filename
            if self.backing_format is not None:
                info["backing-filename-format"] = self.backing_format
        return info

    async def _load_l2_pages(self, keys: list[L2PageKey]) -> dict[L2PageKey, array.array[int]]:
        geom = self.geometry
        page_bytes = 8 * geom.l2_page_entries
        pages: dict[L2PageKey, array.array[int]] = {}
        for key in keys:
            if key in pages:
                continue
            page = self._l2_cache.get(key)
            if page is None:
                self.counters.l2_cache_misses += 1
                l2_offset, number = key
                raw = await self.read_metadata(l2_offset + number * page_bytes, page_bytes,
                                               "l2_table")
                page = le_table(raw, 8)
                self._l2_cache.put(key, page)
            else:
                self.counters.l2_cache_hits += 1
            pages[key] = page
        return pages

    async def _map(self, offset: int, length: int) -> Iterator[Run]:
        pages = await self._load_l2_pages(l2_pages_needed(self.geometry, self.l1, offset, length))
        return map_range(self.geometry, self.l1, pages, offset, length)

    async def _pread(self, offset: int, length: int) -> Buffer:
        runs = coalesce(await self._map(offset, length))
        return await read_runs(runs, self.file, self.backing, self.counters)

    async def _block_status(self, offset: int, length: int) -> tuple[BlockStatus, int]:
        # Map no further than the end of one L2 page's reach: one table read at most.
        geom = self.geometry
        page_span = geom.l2_page_entries << geom.l2_shift
        window = min(length, page_span - offset % page_span)
        run = first_run(await self._map(offset, window))
        return run_status(run, self.backing)

    async def _close(self) -> None:
        self._l2_cache.clear()
