"""Format driver ``qed``: the QEMU Enhanced Disk format.

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

L2 tables are read in pages of at most :data:`L2_PAGE_ENTRIES` entries through an LRU cache on
the node, so a hostile 1 GiB table (64 MiB clusters, 16 per table) costs one 32 KiB read per
page touched, not a 1 GiB allocation.

Writes follow QEMU's ``qed_aio_write_alloc`` path, one allocating write at a time:

* a write to an allocated cluster goes in place;
* otherwise new clusters are taken at the end of the file (QEMU's ``s->file_size``, the file
  size rounded down to a cluster), filled with the data and, around it, the bytes the cluster
  read as before (copy-on-write from the backing file, or zeros), in one write;
* then the L2 entries are written; when the L1 entry had no table, a new zeroed table is taken
  at the end of the file, written with the entries and flushed, and only then is the L1 entry
  written. Metadata is written through: :meth:`~QedNode.flush` only flushes the file.

A write whose caller is cancelled (QEMU never abandons one; a trio caller may) leaks nothing:
cancelled before its L2 entries are decided, it gives its clusters back (the next allocation
takes them, and a file it grew is cut back); once they are decided -- in memory, at once --
the write has happened for readers, and the table writes it did not finish stay queued, their
pages pinned, until the next allocation, flush or close writes them (in the same order).

Crash safety is QEMU's. With a backing file the new clusters are flushed before the L2 entry
that points at them (a crash can only leak them). Without one that flush is skipped, as QEMU
skips it: a cluster is always new space at the end of the file, so if its data did not reach the
disk it reads as zeros, what the unallocated cluster read, or lies past the end of the file --
which ``QED_F_NEED_CHECK`` covers: it is set (and, unlike QEMU, flushed) before the first
allocation, and the check it demands clears entries that point past the end. QEMU clears the
flag from a timer five seconds after the last allocating write and on close; vdiskfs has no
timer and clears it on the first flush at least :attr:`QedNode.need_check_delay` seconds after
the last allocation, and on close.

A writable open of an image with ``QED_F_NEED_CHECK`` runs QEMU's ``qed_check`` with repair:
table and cluster entries that point outside the file are cleared, then the flag; an image with
a cluster used twice is refused (QEMU opens it and leaves the flag set). A read-only open reads
the image as is and warns: the checks above make a dangling entry an error, never a read of
bytes outside the file.

Two deliberate differences from QEMU 7.2: a partial write into a zero cluster fills the rest of
the new cluster with zeros (QEMU copies the backing file's bytes there, which the guest never
saw), and zeroing (``zero()``) marks whole unallocated clusters as zero clusters only when a
backing file shows through them -- without one they read as zeros already.
"""

from __future__ import annotations

import array
import contextlib
import dataclasses
import os
import struct
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any, ClassVar

import trio

from vdiskfs.block.context import OpenContext
from vdiskfs.block.format import FormatNode
from vdiskfs.block.node import BlockNode, BlockStatus, Buffer
from vdiskfs.block.registry import register
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
from vdiskfs.errors import FormatError, UnsupportedError, VdiskError

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
#: QEMU's QED_NEED_CHECK_TIMEOUT: seconds after the last allocating write before the
#: need-check flag is cleared.
NEED_CHECK_TIMEOUT = 5.0
#: Tables are written back in whole 512-byte sectors, as QEMU does.
SECTOR_SIZE = 512

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

    def pack(self) -> bytes:
        return _HEADER.pack(*dataclasses.astuple(self))


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

    def is_valid_cluster(self, offset: int) -> bool:
        """QEMU's ``qed_check_cluster_offset``."""
        return (offset % self.cluster_size == 0 and self.header_bytes <= offset
                and offset < self.file_size)

    def is_valid_table(self, offset: int) -> bool:
        """QEMU's ``qed_check_table_offset``: all ``table_size`` clusters inside the file."""
        return self.is_valid_cluster(offset) and offset + self.table_bytes <= self.file_size

    def check_cluster(self, offset: int, field: str) -> None:
        """QEMU's ``qed_check_cluster_offset``, raising instead of returning false."""
        if not self.is_valid_cluster(offset):
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


@dataclasses.dataclass(slots=True)
class _L2Update:
    """An L2 update prepared (:meth:`QedNode._prepare_l2`): ``count`` entries from index
    ``first`` of the table at ``l2_offset`` (``new_table``: just allocated, for L1 entry
    ``l1_index``), in ``pages``."""

    l1_index: int
    l2_offset: int
    new_table: bool
    first: int
    count: int
    pages: dict[L2PageKey, array.array[int]]


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


def split_at_tables(geom: QedGeometry, run: Run) -> Iterator[Run]:
    """Cut ``run`` where one L2 table's reach ends: an allocation updates one table."""
    span = 1 << geom.l1_shift
    offset = run.offset
    while offset < run.end:
        end = min(run.end, (offset // span + 1) * span)
        yield Run(run.kind, offset, end - offset)
        offset = end


@dataclass(slots=True)
class QedCounters(RunCounters):
    l2_cache_hits: int = 0
    l2_cache_misses: int = 0
    #: Data clusters and L2 tables allocated by writes.
    clusters_allocated: int = 0
    l2_tables_allocated: int = 0
    #: Bytes written around partial-cluster writes into new clusters: the backing file's
    #: bytes or zeros (copy-on-write).
    cow_bytes: int = 0
    #: Unallocated clusters marked as zero clusters by ``zero()``.
    zero_clusters_marked: int = 0
    #: Times the need-check flag was set and cleared in the header.
    need_check_set: int = 0
    need_check_cleared: int = 0
    #: Table entries cleared by the repair of a writable open of a need-check image.
    entries_repaired: int = 0
    #: Clusters reserved by writes that were cancelled before they mapped them, given back.
    clusters_given_back: int = 0


@register
class QedNode(FormatNode):
    """A QED image with its optional backing file."""

    driver = "qed"
    counters_class = QedCounters
    counters: QedCounters
    supports_write: ClassVar[bool] = True

    def __init__(self, file: BlockNode, ctx: OpenContext) -> None:
        super().__init__(file, ctx)
        self._l2_cache: LruCache[L2PageKey, array.array[int]] = LruCache(L2_CACHE_PAGES)
        #: One allocating write at a time, as QEMU's ``allocating_acb``.
        self._alloc_lock = trio.Lock()
        #: Table updates decided but not yet written (their writer was cancelled): L2 pages
        #: (the page, and the entries ``[lo, hi)`` to write), then L1 entries. The pages are
        #: pinned here, so a reader never loads an older copy from the file meanwhile.
        self._pending_pages: dict[L2PageKey, tuple[array.array[int], int, int]] = {}
        self._pending_l1: set[int] = set()
        self._last_allocation = 0.0
        #: Seconds after the last allocation before a flush clears the need-check flag.
        self.need_check_delay = NEED_CHECK_TIMEOUT
        self.backing_filename: str | None = None
        self.backing_format: str | None = None
        self._writable_open = False

    @classmethod
    def probe(cls, head: bytes, tail: bytes, filename: str) -> int:
        if len(head) >= _HEADER.size and struct.unpack_from("<I", head)[0] == MAGIC:
            return 100
        return 0

    async def open(self) -> None:
        self.header = QedHeader.parse(await self.read_metadata(0, _HEADER.size, "header"))
        header = self.header
        self.geometry = validate_header(header, label=self.label, file_size=self.file.size)
        geom = self.geometry
        # Only the L1 entries the image size reaches are read: the rest map nothing.
        l1_entries = -(-header.image_size // (1 << geom.l1_shift))
        self.l1 = le_table(
            await self.read_metadata(header.l1_table_offset, 8 * l1_entries, "l1_table"), 8)
        if header.features & F_BACKING_FILE:
            if not self.read_only and not self.ctx.options.backing:
                raise UnsupportedError(
                    "an image with a backing file cannot be written without it: new clusters "
                    "must be filled with its bytes", path=self.label, field="backing_filename")
            raw_name = await self.read_metadata(
                header.backing_filename_offset, header.backing_filename_size, "backing_filename")
            self.backing_filename = os.fsdecode(raw_name)
            if header.features & F_BACKING_FORMAT_NO_PROBE:
                self.backing_format = "raw"
            await self.open_backing(self.backing_filename, field="backing_filename",
                                    format=self.backing_format)
        self.size = header.image_size
        #: Where the next cluster is allocated: QEMU's ``s->file_size``.
        self._file_end = geom.file_size
        if self.read_only:
            if header.features & F_NEED_CHECK:
                self.ctx.warn(
                    f"{self.label}: QED image was not closed cleanly (need-check flag set); "
                    "reading it as is, without repair (table entries pointing outside the file "
                    "are errors)")
            return
        if header.autoclear_features:
            # QEMU knocks out autoclear bits it does not know (it knows none): the features
            # they announced are no longer maintained once this program writes.
            self.header = dataclasses.replace(header, autoclear_features=0)
            await self._write_header()
            await self.file.flush()
        if self.header.features & F_NEED_CHECK:
            await self._check_and_repair()
        # From here on, closing flushes and marks the image clean; a refused open leaves the
        # flag as it found it.
        self._writable_open = True

    def info(self) -> dict[str, Any]:
        info: dict[str, Any] = {"cluster-size": self.header.cluster_size}
        if self.header.features & F_NEED_CHECK:
            info["dirty-flag"] = True
        if self.backing_filename is not None:
            info["backing-filename"] = self.backing_filename
            if self.backing_format is not None:
                info["backing-filename-format"] = self.backing_format
        return info

    # -- mapping and reads ------------------------------------------------------------------------

    async def _load_l2_pages(self, keys: list[L2PageKey]) -> dict[L2PageKey, array.array[int]]:
        pages: dict[L2PageKey, array.array[int]] = {}
        for key in keys:
            if key in pages:
                continue
            pending = self._pending_pages.get(key)
            if pending is not None:
                pages[key] = pending[0]
                continue
            # Single-flight: concurrent readers of one uncached page read it once; a page read
            # while an update ran is used by its own request only (LruCache's rules).
            page, hit = await self._l2_cache.load(key, partial(self._read_l2_page, key))
            if hit:
                self.counters.l2_cache_hits += 1
            else:
                self.counters.l2_cache_misses += 1
            pages[key] = page
        return pages

    async def _read_l2_page(self, key: L2PageKey) -> array.array[int]:
        l2_offset, number = key
        page_bytes = 8 * self.geometry.l2_page_entries
        raw = await self.read_metadata(l2_offset + number * page_bytes, page_bytes, "l2_table")
        return le_table(raw, 8)

    async def _map(self, offset: int, length: int) -> Iterator[Run]:
        pages = await self._load_l2_pages(l2_pages_needed(self.geometry, self.l1, offset, length))
        return map_range(self.geometry, self.l1, pages, offset, length)

    async def _pread(self, offset: int, length: int) -> Buffer:
        return await read_runs(self, coalesce(await self._map(offset, length)))

    async def _block_status(self, offset: int, length: int) -> tuple[BlockStatus, int]:
        # Map no further than the end of one L2 page's reach: one table read at most.
        geom = self.geometry
        page_span = geom.l2_page_entries << geom.l2_shift
        window = min(length, page_span - offset % page_span)
        return runs_status(self, await self._map(offset, window))

    # -- writes -----------------------------------------------------------------------------------

    async def _pwrite(self, offset: int, data: Buffer) -> None:
        view = memoryview(data)
        runs = coalesce(await self._map(offset, len(view)))
        if all(run.kind is RunKind.DATA for run in runs):
            await write_runs(runs, offset, view, self.file, self._allocate_per_table)
            return
        async with self._alloc_lock:
            # Mapped again under the lock: the allocating write before may have mapped these.
            runs = coalesce(await self._map(offset, len(view)))
            await write_runs(runs, offset, view, self.file, self._allocate_per_table)
            self._last_allocation = time.monotonic()

    async def _allocate_per_table(self, run: Run, data: memoryview) -> None:
        """:meth:`_allocate` each piece of ``run`` that one L2 table maps."""
        for piece in split_at_tables(self.geometry, run):
            await self._allocate(piece, data[piece.offset - run.offset : piece.end - run.offset])

    async def _allocate(self, run: Run, data: Buffer) -> None:
        """Write ``data`` (the guest range of ``run``, which one L2 table maps and which is not
        allocated) into new clusters, then map them: QEMU's ``qed_aio_write_alloc``."""
        geom = self.geometry
        start = run.offset - run.offset % geom.cluster_size
        end = -(-run.end // geom.cluster_size) * geom.cluster_size
        count = (end - start) // geom.cluster_size
        await self._set_need_check()
        host = self._allocate_clusters(count)
        try:
            head = await self._cow_bytes(run.kind, start, run.offset - start)
            tail = await self._cow_bytes(run.kind, run.end, end - run.end)
            await self.file.pwrite(host, b"".join((head, data, tail)))
            if self.backing is not None:
                # QEMU: without this flush a crash could leave the L2 entry pointing at a
                # cluster whose copied-on-write backing bytes never reached the disk.
                await self.file.flush()
            update = await self._prepare_l2(start, count)
        except BaseException:
            # Cancelled (or failed) before anything points at the clusters: give them back,
            # or they would leak (QEMU never abandons a request half way; a caller here may).
            await self._give_back(host)
            raise
        self.counters.clusters_allocated += count
        self._decide_l2(update, host)
        await self._write_updates()

    def _allocate_clusters(self, count: int) -> int:
        """QEMU's ``qed_alloc_clusters``: reserve space at the end of the file."""
        offset = self._file_end
        self._set_file_end(offset + count * self.geometry.cluster_size)
        return offset

    def _set_file_end(self, end: int) -> None:
        self._file_end = end
        self.geometry = dataclasses.replace(self.geometry, file_size=end)

    async def _give_back(self, offset: int) -> None:
        """Undo the reservations from ``offset`` on -- the latest ones: the caller holds the
        allocation lock, and nothing references them -- so that the next allocation takes
        them again; a file they already grew is cut back, so that none is left over at the
        end (a leak to ``qemu-img check``). Runs while its caller is being cancelled:
        shielded, and never through a request that could wait (truncating is a syscall)."""
        reserved = self._file_end - offset
        if reserved <= 0:
            return
        self.counters.clusters_given_back += reserved // self.geometry.cluster_size
        self._set_file_end(offset)
        if self.file.size <= offset:
            return
        # A file that cannot be cut (a block device, a filter that refuses) keeps the space:
        # the next allocation writes over it all the same.
        with trio.CancelScope(shield=True), contextlib.suppress(VdiskError):
            await self.file.truncate(offset)

    async def _cow_bytes(self, kind: RunKind, offset: int, length: int) -> bytes:
        """The ``length`` bytes at guest ``offset`` of a cluster about to be allocated, as it
        read before: zeros for a zero cluster, else the backing file's (zeros past its end)."""
        if length == 0:
            return b""
        self.counters.cow_bytes += length
        if kind is RunKind.ZERO:
            return bytes(length)
        return bytes(await self.read_backing(offset, length))

    async def _update_l2(self, start: int, count: int, value: int) -> None:
        """Point the L2 entries of the ``count`` clusters from guest ``start`` at ``value``
        (consecutive clusters from there; or the zero-cluster marker for every one), creating
        the L2 table first when the L1 entry has none. Caller holds the allocation lock."""
        mark = self._file_end
        try:
            update = await self._prepare_l2(start, count)
        except BaseException:
            await self._give_back(mark)  # a new table nothing points at yet
            raise
        self._decide_l2(update, value)
        await self._write_updates()

    async def _prepare_l2(self, start: int, count: int) -> _L2Update:
        """The pages an update of ``count`` entries from guest ``start`` changes: loaded, or
        those of a new table (allocated, and zeroed in the file). Changes nothing a reader or
        the file's tables see: a cancelled caller gives the new table back."""
        geom = self.geometry
        l1_index = start >> geom.l1_shift
        first = (start >> geom.l2_shift) & (geom.table_entries - 1)
        page_entries = geom.l2_page_entries
        keys_needed = range(first // page_entries, (first + count - 1) // page_entries + 1)
        l2_offset = self.l1[l1_index]
        new_table = l2_offset == 0
        if new_table:
            l2_offset = self._allocate_clusters(geom.table_size)
            # Zeros past the end of the file cost no write: the file just grows.
            await self.file.zero(l2_offset, geom.table_bytes)
            pages = {(l2_offset, n): array.array("Q", bytes(8 * page_entries))
                     for n in keys_needed}
        else:
            pages = await self._load_l2_pages([(l2_offset, n) for n in keys_needed])
        return _L2Update(l1_index, l2_offset, new_table, first, count, pages)

    def _decide_l2(self, update: _L2Update, value: int) -> None:
        """Make the update in memory, at once (no await: a reader sees each entry old or new)
        and queue its writes. From here on the write has happened as far as readers go; the
        tables reach the file in :meth:`_write_updates`, now or -- if its caller is cancelled
        -- at the next allocation, flush or close."""
        geom = self.geometry
        page_entries = geom.l2_page_entries
        step = 0 if value == ZERO_CLUSTER else geom.cluster_size
        first, count = update.first, update.count
        # A page being loaded now is not cached: it may predate this change.
        with self._l2_cache.updating():
            for i in range(count):
                number, in_page = divmod(first + i, page_entries)
                update.pages[(update.l2_offset, number)][in_page] = value + i * step
            for key, page in update.pages.items():
                self._l2_cache.put(key, page)
                number = key[1]
                lo = max(first, number * page_entries) - number * page_entries
                hi = min(first + count, (number + 1) * page_entries) - number * page_entries
                queued = self._pending_pages.get(key)
                if queued is not None:
                    lo, hi = min(lo, queued[1]), max(hi, queued[2])
                self._pending_pages[key] = (page, lo, hi)
        if update.new_table:
            self.l1[update.l1_index] = update.l2_offset
            self._pending_l1.add(update.l1_index)
            self.counters.l2_tables_allocated += 1

    async def _write_updates(self) -> None:
        """Write the queued table updates: L2 pages, then -- after a flush, so that an L1
        entry never points at a table that is not on the disk -- L1 entries. Caller holds the
        allocation lock (or closes). An entry leaves the queue once written; a cancelled
        caller leaves the rest queued."""
        page_bytes = 8 * self.geometry.l2_page_entries
        while self._pending_pages:
            key, (page, lo, hi) = next(iter(self._pending_pages.items()))
            await self._write_table_span(key[0] + key[1] * page_bytes, page, lo, hi)
            del self._pending_pages[key]
        if self._pending_l1:
            await self.file.flush()
            while self._pending_l1:
                index = min(self._pending_l1)
                await self._write_table_span(self.header.l1_table_offset, self.l1, index,
                                             index + 1)
                self._pending_l1.discard(index)

    async def _write_table_span(self, table_offset: int, table: array.array[int], lo: int,
                                hi: int) -> None:
        """Write entries ``[lo, hi)`` of ``table`` (stored at ``table_offset``) in whole
        sectors, as far as ``table`` reaches."""
        per_sector = SECTOR_SIZE // 8
        lo -= lo % per_sector
        hi = min(len(table), -(-hi // per_sector) * per_sector)
        await self.file.pwrite(table_offset + 8 * lo, le_bytes(table[lo:hi]))

    async def _zero(self, offset: int, length: int, may_unmap: bool) -> None:
        runs = coalesce(await self._map(offset, length))
        if all(run.kind is RunKind.DATA for run in runs):
            for run in runs:
                await self.file.zero(run.host_offset, run.length, may_unmap=may_unmap)
            return
        async with self._alloc_lock:
            for run in coalesce(await self._map(offset, length)):
                if run.kind is RunKind.DATA:
                    await self.file.zero(run.host_offset, run.length, may_unmap=may_unmap)
                elif run.kind is RunKind.BACKING:
                    for piece in split_at_tables(self.geometry, run):
                        await self._zero_unallocated(piece)
            self._last_allocation = time.monotonic()

    async def _zero_unallocated(self, run: Run) -> None:
        """Make the unallocated ``run`` (within one L2 table) read as zeros: whole clusters
        become zero clusters, partial ones are allocated with zeros, as QEMU does."""
        if self.backing_length(run.offset, run.length) == 0:
            return  # it reads as zeros already
        cluster_size = self.geometry.cluster_size
        first = -(-run.offset // cluster_size) * cluster_size
        # The image's last cluster counts as whole when the range reaches the image's end.
        last = run.end if run.end == self.size else run.end - run.end % cluster_size
        if first >= last:
            await self._allocate(run, bytes(run.length))
            return
        if run.offset < first:
            await self._allocate(Run(run.kind, run.offset, first - run.offset),
                                 bytes(first - run.offset))
        count = -(-(last - first) // cluster_size)
        await self._set_need_check()
        await self._update_l2(first, count, ZERO_CLUSTER)
        self.counters.zero_clusters_marked += count
        if last < run.end:
            await self._allocate(Run(run.kind, last, run.end - last), bytes(run.end - last))

    # -- the need-check flag ----------------------------------------------------------------------

    async def _write_header(self) -> None:
        # Only the 64-byte header: the backing file name after it is never rewritten.
        await self.file.pwrite(0, self.header.pack())

    async def _set_need_check(self) -> None:
        """Set the flag before the first metadata update it protects: QEMU's
        ``qed_should_set_need_check`` (never with a backing file, whose flush before each L2
        update keeps the tables consistent)."""
        if self.backing is not None or self.header.features & F_NEED_CHECK:
            return
        self.header = dataclasses.replace(self.header,
                                          features=self.header.features | F_NEED_CHECK)
        await self._write_header()
        # QEMU does not flush here; then a reordering disk may write the L2 entry first.
        await self.file.flush()
        self.counters.need_check_set += 1

    async def _clear_need_check(self) -> None:
        """QEMU's ``qed_need_check_timer_entry``: everything on disk, then the flag cleared."""
        await self.file.flush()
        self.header = dataclasses.replace(self.header,
                                          features=self.header.features & ~F_NEED_CHECK)
        await self._write_header()
        self.counters.need_check_cleared += 1

    async def _flush(self) -> None:
        # Tables are written through (what a cancelled writer left, here); the base class
        # flushes the file after this.
        async with self._alloc_lock:
            await self._write_updates()
            if (self.header.features & F_NEED_CHECK
                    and time.monotonic() - self._last_allocation >= self.need_check_delay):
                await self._clear_need_check()

    async def _close(self) -> None:
        self._l2_cache.clear()
        if not self._writable_open:
            return
        # QEMU's bdrv_qed_close: a clean shutdown needs no check at the next open.
        await self._write_updates()
        await self.file.flush()
        if self.header.features & F_NEED_CHECK:
            await self._clear_need_check()
            await self.file.flush()

    # -- check and repair -------------------------------------------------------------------------

    async def _check_and_repair(self) -> None:
        """QEMU's ``qed_check`` with ``fix``, run on a writable open of an image whose
        need-check flag is set: clear entries that point outside the file, then the flag.

        Clusters referenced twice cannot be repaired: the open is refused.
        """
        geom = self.geometry
        cluster_size = geom.cluster_size
        used = bytearray(-(-(geom.file_size // cluster_size) // 8))
        referenced_twice = 0

        def mark(offset: int, count: int) -> bool:
            fresh = True
            for cluster in range(offset // cluster_size, offset // cluster_size + count):
                byte, bit = divmod(cluster, 8)
                if used[byte] >> bit & 1:
                    fresh = False
                used[byte] |= 1 << bit
            return fresh

        mark(self.header.l1_table_offset, geom.table_size)
        repaired = 0
        page_entries = geom.l2_page_entries
        page_bytes = 8 * page_entries
        for l1_index, l2_offset in enumerate(self.l1):
            if not l2_offset:
                continue
            if not geom.is_valid_table(l2_offset):
                self.l1[l1_index] = 0
                await self._write_table_span(self.header.l1_table_offset, self.l1, l1_index,
                                             l1_index + 1)
                repaired += 1
                continue
            if not mark(l2_offset, geom.table_size):
                referenced_twice += 1
                continue
            for number in range(geom.table_entries // page_entries):
                page_offset = l2_offset + number * page_bytes
                page = le_table(await self.read_metadata(page_offset, page_bytes, "l2_table"), 8)
                for index, entry in enumerate(page):
                    if entry in (0, ZERO_CLUSTER):
                        continue
                    if not geom.is_valid_cluster(entry):
                        page[index] = 0
                        await self._write_table_span(page_offset, page, index, index + 1)
                        repaired += 1
                    elif not mark(entry, 1):
                        referenced_twice += 1
        self._l2_cache.clear()
        self.counters.entries_repaired += repaired
        if referenced_twice:
            raise self.format_error(
                f"{referenced_twice} clusters or tables are used twice: writing would corrupt "
                "data further (the need-check flag stays set); open the image read-only",
                field="l2_table")
        await self._clear_need_check()
        await self.file.flush()
        self.ctx.warn(f"{self.label}: QED image was not closed cleanly; checked it"
                      + (f" and cleared {repaired} table entries pointing outside the file"
                         if repaired else ", no repair needed"))
