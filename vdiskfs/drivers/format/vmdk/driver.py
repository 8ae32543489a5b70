"""Format driver ``vmdk``: VMware virtual disks.

Variants read (``createType``): ``monolithicSparse``, ``streamOptimized`` (one sparse file with an
embedded descriptor), and the descriptor files ``monolithicFlat``, ``twoGbMaxExtentSparse``,
``twoGbMaxExtentFlat``, ``vmfs`` and friends, whose extents lie beside them. A delta disk names
its parent in ``parentFileNameHint``; the parent's ``CID`` must equal the delta's ``parentCID``.

The node keeps what it learned at open -- the extents, each sparse extent's grain directory -- and
two caches: grain tables (``gt_cache_*`` counters) and decompressed grains of stream-optimized
extents (``grain_cache_*``), each loaded once however many readers miss on it together. Mapping
a guest range to runs is :mod:`.mapping`'s pure work; this module loads grain tables and inflates
compressed grains (the executor's ``read_compressed`` hook), and the format layer's run executor
(:func:`~vdiskfs.drivers.format.runs.read_runs`) reads the runs, concurrently.

Writing (every variant but ``streamOptimized``, which QEMU keeps read-only too): flat extents are
written in place; a sparse extent appends a grain for each unallocated or zeroed grain written,
filling the rest of the grain from the parent (or with zeros), and a grain table when the
directory has none, as QEMU's ``get_cluster_offset``. The order makes a crash leak space at
worst, never point at unwritten bytes:

1. the grain's bytes (copy-on-write head, the request, copy-on-write tail) are written;
2. the cached grain table is changed in memory and pinned as dirty;
3. :meth:`flush` (or too many dirty tables) writes back: a flush of the extent file (the grains
   are durable), then every dirty table, primary and redundant copy; then, if a table is new,
   another flush and the directory entries (primary and redundant) that name it.

QEMU writes the table entry right after each grain and flushes then (``vmdk_L2update``); keeping
tables dirty until a flush costs no safety -- nothing is promised durable before a flush -- and
spares a flush per allocation. As QEMU does, the first write after each open gives the image a
new random ``CID``, so deltas made from it no longer open against changed content; unlike QEMU,
vdiskfs writes (and flushes) it before the first byte of data changes, and in place, with as
many digits as the old one, so no other byte of the descriptor moves.
"""

from __future__ import annotations

import bisect
import enum
import errno
import secrets
import struct
import zlib
from array import array
from collections.abc import Iterable
from dataclasses import dataclass, replace
from functools import partial
from typing import Any

import trio

from vdiskfs.block.format import FormatNode
from vdiskfs.block.node import BlockNode, BlockStatus, Buffer
from vdiskfs.block.registry import PROTOCOL_ONLY, OpenContext, redact_reference, register
from vdiskfs.drivers.format.runs import (
    LruCache,
    Run,
    RunCounters,
    RunKind,
    coalesce,
    le_table,
    read_runs,
    runs_status,
)
from vdiskfs.drivers.format.vmdk.alloc import SparseWriteState, check_directories, table_bytes
from vdiskfs.drivers.format.vmdk.descriptor import (
    DESCRIPTOR_CREATE_TYPES,
    EXTENT_TYPES_FLAT,
    MAX_DESCRIPTOR_SIZE,
    NO_PARENT_CID,
    Descriptor,
    is_descriptor_text,
    locate_cid,
    looks_like_descriptor,
    parse_descriptor,
    replacement_cid,
)
from vdiskfs.drivers.format.vmdk.mapping import (
    GTE_ZEROED,
    SparseGeometry,
    gt_window,
    map_grain_table,
)
from vdiskfs.drivers.format.vmdk.sparse import (
    COWD_MAGIC,
    GRAIN_MARKER,
    SECTOR,
    SPARSE_MAGIC,
    STREAM_FOOTER_SIZE,
    SparseHeader,
    check_header,
    parse_sparse_header,
    parse_stream_footer,
)
from vdiskfs.errors import FormatError, ReadOnlyError, UnsupportedError

__all__ = ["VmdkCounters", "VmdkNode"]

#: Grain tables kept per node: 512 entries (2 KiB) each, so 1 MiB maps 16 GiB of 64 KiB grains.
GT_CACHE_TABLES = 512
#: Decompressed grains kept per node (stream-optimized extents), in bytes.
GRAIN_CACHE_BYTES = 4 << 20
#: Largest virtual size accepted: offsets must fit the kernel's signed 64-bit off_t.
MAX_DISK_SIZE = (1 << 63) - 1
#: Dirty grain tables held before they are written back without waiting for a flush (2 KiB
#: each): bounds the memory a long run of writes without flushes can pin.
MAX_DIRTY_TABLES = 256
#: Largest piece of a parent read at once to fill a new grain (grains may be up to 1 GiB).
COW_CHUNK = 1 << 20
_GD_ENTRY = struct.Struct("<I")


@dataclass(slots=True)
class VmdkCounters(RunCounters):
    """The run counters (``data_reads``, ``backing_reads``, ``zero_bytes_read``...) and the
    caches'."""

    #: Grain table lookups served from the cache, and tables read from an extent file.
    gt_cache_hits: int = 0
    gt_cache_misses: int = 0
    #: Compressed-grain lookups served inflated from the cache, and grains read and inflated.
    grain_cache_hits: int = 0
    grain_cache_misses: int = 0
    #: Compressed bytes read from extent files.
    compressed_bytes_read: int = 0
    #: Grains and grain tables appended to extent files by writes.
    grains_allocated: int = 0
    gts_allocated: int = 0
    #: Bytes of new grains not covered by the request: filled from the parent or with zeros
    #: (``cow_backing_bytes`` of them read from the parent).
    cow_bytes: int = 0
    cow_backing_bytes: int = 0
    #: Grain table entries set to "zeroed grain" by write-zeroes requests.
    zeroed_grains: int = 0
    #: Grain tables written back (primary and redundant copy count once), and directory
    #: entries written for new tables.
    gt_writebacks: int = 0
    gd_writebacks: int = 0
    #: New CIDs written (the first write after a writable open).
    cid_updates: int = 0


class ExtentKind(enum.Enum):
    FLAT = "flat"
    SPARSE = "sparse"
    ZERO = "zero"


@dataclass(frozen=True, slots=True)
class Extent:
    """One extent, as opened: where it sits in the guest and where its bytes come from."""

    kind: ExtentKind
    guest_start: int
    size: int
    #: Type as the descriptor writes it (``SPARSE``, ``FLAT``...); ``""`` for a monolithic file.
    type_name: str
    #: The node holding the extent's bytes (None for ZERO extents).
    file: BlockNode | None = None
    label: str = ""
    #: FLAT: where the extent's first byte lies in the file.
    file_offset: int = 0
    header: SparseHeader | None = None
    geometry: SparseGeometry | None = None
    #: SPARSE: the grain directory, one grain-table sector per entry (changed in memory when a
    #: write allocates a grain table).
    gd: array[int] | None = None
    #: False for an ``RDONLY`` extent line: the extent refuses writes.
    writable: bool = True
    #: SPARSE extents of a writable image: allocation and write-back state.
    write: SparseWriteState | None = None

    @property
    def guest_end(self) -> int:
        return self.guest_start + self.size


def _distinct(nodes: Iterable[BlockNode | None]) -> list[BlockNode]:
    """The nodes, each once, in first-seen order."""
    out: list[BlockNode] = []
    for node in nodes:
        if node is not None and all(node is not seen for seen in out):
            out.append(node)
    return out


async def _read_checked(node: BlockNode, offset: int, length: int, what: str, label: str,
                        *, field: str | None = None, field_offset: int | None = None) -> bytes:
    """Read a structure from an extent file; a range outside the file is a FormatError."""
    if offset < 0 or length < 0 or offset + length > node.size:
        raise FormatError(
            f"{what} ({length} bytes at {offset:#x}) lies outside the file ({node.size} bytes)",
            path=label,
            field=field or what,
            offset=offset if field_offset is None else field_offset,
        )
    return bytes(await node.pread(offset, length))


@register
class VmdkNode(FormatNode):
    """A VMDK image: its extents, its parent, and the caches for mapping."""

    driver = "vmdk"
    supports_write = True
    counters_class = VmdkCounters
    counters: VmdkCounters

    def __init__(self, file: BlockNode, ctx: OpenContext) -> None:
        super().__init__(file, ctx)
        self.extents: list[Extent] = []
        self._extent_starts: list[int] = []
        self.create_type = ""
        self.cid: int | None = None
        self.parent_cid: int | None = None
        self.parent_filename_hint: str | None = None
        self.descriptor: Descriptor | None = None
        # (extent index, grain directory index) -> table. Dirty tables live in their extent's
        # SparseWriteState until written back, and are looked up there first.
        self._gt_cache: LruCache[tuple[int, int], array[int]] = LruCache(GT_CACHE_TABLES)
        # (extent index, grain marker offset) -> inflated grain; sized at open by grain size.
        self._grain_cache: LruCache[tuple[int, int], bytes] = LruCache(1)
        # Writes, zeroes and write-backs hold this lock for their whole duration, as QEMU's
        # s->lock: allocation decides from the tables and then changes them. Reads do not
        # take it; a write changes a table only after the grain's bytes are in place.
        self._write_lock = trio.Lock()
        self._dirty_tables = 0
        # Where the CID's digits lie in self.file, and the digits, until the first write
        # replaces them (None: nothing to update, or already done).
        self._cid_at: tuple[int, bytes] | None = None

    @classmethod
    def probe(cls, head: bytes, tail: bytes, filename: str) -> int:
        if head[:4] in (SPARSE_MAGIC, COWD_MAGIC):
            return 100
        return 100 if looks_like_descriptor(head) else 0

    # -- open ---------------------------------------------------------------------------------

    async def open(self) -> None:
        file = self.file
        if file.size < 4:
            raise self.format_error(f"file of {file.size} bytes is too small for a VMDK image")
        magic = await self.read_metadata(0, 4, "magic")
        if magic in (SPARSE_MAGIC, COWD_MAGIC):
            await self._open_monolithic()
        else:
            if file.size > MAX_DESCRIPTOR_SIZE:
                raise self.format_error(
                    f"descriptor file of {file.size} bytes is larger than {MAX_DESCRIPTOR_SIZE}",
                    field="descriptor",
                )
            text = await self.read_metadata(0, file.size, "descriptor")
            if not is_descriptor_text(text):
                raise self.format_error(
                    f"not a VMDK image: no sparse magic {SPARSE_MAGIC!r} and no text descriptor",
                    field="magic",
                    offset=0,
                )
            await self._open_descriptor(parse_descriptor(text, self.label), text, 0)
        size = self.extents[-1].guest_end if self.extents else 0
        if size > MAX_DISK_SIZE:
            raise self.format_error(f"virtual size {size} is larger than {MAX_DISK_SIZE}",
                                    field="capacity")
        self.size = size
        largest_grain = max((e.geometry.grain_size for e in self.extents
                             if e.geometry is not None and e.geometry.compressed), default=0)
        if largest_grain:
            self._grain_cache = LruCache(max(1, GRAIN_CACHE_BYTES // largest_grain))
        await self._open_parent()
        if not self.read_only:
            await self._prepare_writes()

    async def _open_monolithic(self) -> None:
        """A single sparse file: its header, grain directory and embedded descriptor."""
        header = parse_sparse_header(await self._first_sector(self.file, self.label), self.label)
        if header.capacity == 0 and header.desc_offset:
            # QEMU's reading too: an empty sparse header whose embedded descriptor lists the
            # extents is opened as that descriptor.
            text = await self._embedded_descriptor(header)
            await self._open_descriptor(parse_descriptor(text, self.label), text,
                                        header.desc_offset * SECTOR)
            return
        extent = await self._load_sparse(self.file, header, self.label, guest_start=0,
                                         type_name="")
        self._add_extent(extent)
        # QEMU reports the type from the header, whatever the embedded text says.
        self.create_type = "monolithicSparse"
        if extent.geometry is not None and extent.geometry.compressed:
            self.create_type = "streamOptimized"
        if header.desc_offset:
            text = await self._embedded_descriptor(header)
            self._take_descriptor_facts(parse_descriptor(text, self.label), text,
                                        header.desc_offset * SECTOR)

    async def _first_sector(self, node: BlockNode, label: str) -> bytes:
        if node.size < SECTOR:
            raise FormatError(f"file of {node.size} bytes is too small for a sparse header",
                              path=label, field="header")
        return bytes(await node.pread(0, SECTOR))

    async def _embedded_descriptor(self, header: SparseHeader) -> bytes:
        length = header.desc_size * SECTOR
        if length > MAX_DESCRIPTOR_SIZE:
            raise self.format_error(
                f"embedded descriptor of {length} bytes is larger than {MAX_DESCRIPTOR_SIZE}",
                field="descriptorSize",
            )
        return await self.read_metadata(header.desc_offset * SECTOR, length, "descriptor")

    async def _load_sparse(self, file: BlockNode, header: SparseHeader, label: str, *,
                           guest_start: int, type_name: str) -> Extent:
        """Check a sparse extent's header (the stream footer's, if it has one) and read its
        grain directory."""
        if header.gd_at_end:
            if file.size < STREAM_FOOTER_SIZE + SECTOR:
                raise FormatError("file too small for a stream-optimized footer", path=label,
                                  field="footer")
            tail = bytes(await file.pread(file.size - STREAM_FOOTER_SIZE, STREAM_FOOTER_SIZE))
            header = parse_stream_footer(tail, label)
        check_header(header, file.size, label)
        gd_bytes = await _read_checked(file, header.gd_offset * SECTOR, header.gd_entries * 4,
                                       "grain directory", label, field="gdOffset")
        return Extent(
            kind=ExtentKind.SPARSE,
            guest_start=guest_start,
            size=header.capacity * SECTOR,
            type_name=type_name,
            file=file,
            label=label,
            header=header,
            geometry=SparseGeometry.from_header(header),
            gd=le_table(gd_bytes, 4),
        )

    def _take_descriptor_facts(self, descriptor: Descriptor, text: bytes, offset: int) -> None:
        """Keep the descriptor's facts, and where its CID's digits lie in ``self.file``
        (``text`` was read at ``offset``)."""
        self.descriptor = descriptor
        self.cid = descriptor.cid
        self.parent_cid = descriptor.parent_cid
        self.parent_filename_hint = descriptor.parent_filename_hint
        span = locate_cid(text)
        if span is not None and descriptor.cid is not None:
            start, end = span
            self._cid_at = (offset + start, text[start:end])

    async def _open_descriptor(self, descriptor: Descriptor, text: bytes, offset: int) -> None:
        """A descriptor file (or an embedded one standing for it, ``text`` read at ``offset``
        of ``self.file``): open every extent.

        Extent files are protocol children, as QEMU opens them; a file named by several lines
        (flat extents at different offsets) is opened once, writable if any line is ``RW``.
        """
        create_type = descriptor.create_type
        if create_type is None:
            raise self.format_error("descriptor has no createType", field="createType")
        if create_type not in DESCRIPTOR_CREATE_TYPES:
            raise UnsupportedError(f"createType {create_type!r} is not supported",
                                   path=self.label, field="createType")
        if not descriptor.extents:
            raise self.format_error("descriptor lists no extent", field="extent")
        self.create_type = create_type
        self._take_descriptor_facts(descriptor, text, offset)
        resolved: list[str | None] = []
        writable_files: set[str] = set()
        for index, line in enumerate(descriptor.extents):
            if line.filename is None:
                resolved.append(None)
                continue
            real = await self.ctx.realpath(
                line.filename, field_name=f"extent {index + 1} (line {line.line_no})")
            resolved.append(real)
            if line.access == "RW":
                writable_files.add(real)
        opened: dict[str, BlockNode] = {}
        guest = 0
        for index, line in enumerate(descriptor.extents):
            field_name = f"extent {index + 1} (line {line.line_no})"
            if line.access == "NOACCESS":
                raise UnsupportedError("NOACCESS extents cannot be read", path=self.label,
                                       field=field_name)
            if line.type == "ZERO":
                self._add_extent(Extent(ExtentKind.ZERO, guest, line.sectors * SECTOR, "ZERO"))
                guest += line.sectors * SECTOR
                continue
            real = resolved[index]
            assert line.filename is not None and real is not None  # required for other types
            node = opened.get(real)
            if node is None:
                node = await self.ctx.open_child(
                    line.filename, role="extent", field_name=field_name, format=PROTOCOL_ONLY,
                    read_only=self.read_only or real not in writable_files,
                )
                self.add_child("extent", node)
                opened[real] = node
            writable = line.access == "RW"
            if line.type in EXTENT_TYPES_FLAT:
                start = line.offset * SECTOR
                size = line.sectors * SECTOR
                if start + size > node.size:
                    raise FormatError(
                        f"flat extent of {size} bytes at offset {start} runs past the end of "
                        f"{line.filename!r} ({node.size} bytes)",
                        path=self.label,
                        field=field_name,
                    )
                extent = Extent(ExtentKind.FLAT, guest, size, line.type, node, node.label,
                                file_offset=start, writable=writable)
            else:
                header = parse_sparse_header(await self._first_sector(node, node.label),
                                             node.label)
                if header.capacity == 0:
                    raise FormatError("sparse extent of capacity 0", path=node.label,
                                      field="capacity")
                extent = await self._load_sparse(node, header, node.label, guest_start=guest,
                                                 type_name=line.type)
                extent = replace(extent, writable=writable)
                if header.capacity != line.sectors:
                    # QEMU sizes the extent by its header; say so when the two disagree.
                    self.ctx.warn(
                        f"{self.label}: extent {line.filename!r} is {header.capacity} sectors, "
                        f"the descriptor says {line.sectors}; using the extent's header"
                    )
            self._add_extent(extent)
            guest = extent.guest_end
            if extent.geometry is not None and extent.geometry.compressed:
                # As QEMU (vmdk_open_vmdk4): a compressed extent makes the image report
                # streamOptimized, so that info matches qemu-img's.
                self.create_type = "streamOptimized"

    def _add_extent(self, extent: Extent) -> None:
        self.extents.append(extent)
        self._extent_starts.append(extent.guest_start)

    async def _open_parent(self) -> None:
        hint = self.parent_filename_hint
        if hint is None:
            return
        node = await self.open_backing(hint, field="parentFileNameHint", format="vmdk")
        if node is None:
            return
        parent_cid = getattr(node, "cid", None)
        if (self.parent_cid is not None and self.parent_cid != NO_PARENT_CID
                and parent_cid is not None and parent_cid != self.parent_cid):
            # QEMU refuses to read through a parent whose content changed since the delta was
            # made (vmdk_is_cid_valid); refuse at open, where the message can say why.
            raise self.format_error(
                f"parentCID {self.parent_cid:08x} does not match CID {parent_cid:08x} of the "
                f"backing file {redact_reference(hint)!r}: the parent changed after this delta "
                "was made",
                field="parentCID",
            )

    # -- mapping --------------------------------------------------------------------------------

    async def _grain_table(self, index: int, gd_index: int) -> tuple[array[int] | None, int]:
        """The grain table ``gd_index`` of extent ``index`` and its file offset (None: none)."""
        extent = self.extents[index]
        assert extent.gd is not None and extent.geometry is not None and extent.file is not None
        state = extent.write
        if state is not None:
            dirty = state.dirty_tables.get(gd_index)
            if dirty is not None:
                self.counters.gt_cache_hits += 1
                return dirty, extent.gd[gd_index] * SECTOR
        sector = extent.gd[gd_index]
        if sector == 0:
            return None, 0
        # Single-flight: concurrent readers of one uncached table read it once. A table read
        # while a write changed tables is used by its own request only (LruCache's rules):
        # the changed table is found dirty, or cached after its write-back.
        table, hit = await self._gt_cache.load((index, gd_index),
                                               partial(self._read_grain_table, index, gd_index))
        if hit:
            self.counters.gt_cache_hits += 1
        else:
            self.counters.gt_cache_misses += 1
        return table, sector * SECTOR

    async def _read_grain_table(self, index: int, gd_index: int) -> array[int]:
        extent = self.extents[index]
        assert extent.gd is not None and extent.geometry is not None and extent.file is not None
        assert extent.header is not None
        data = await _read_checked(
            extent.file,
            extent.gd[gd_index] * SECTOR,
            extent.geometry.gtes_per_gt * 4,
            f"grain table {gd_index}",
            extent.label,
            field="grain directory entry",
            field_offset=extent.header.gd_offset * SECTOR + 4 * gd_index,
        )
        return le_table(data, 4)

    async def _map(self, offset: int, length: int, *, first_window: bool = False) -> list[Run]:
        """Runs for guest ``[offset, offset + length)``; with ``first_window``, only as far as
        one extent and one grain table reach (enough for block status)."""
        runs: list[Run] = []
        end = offset + length
        while offset < end:
            index = bisect.bisect_right(self._extent_starts, offset) - 1
            extent = self.extents[index]
            relative = offset - extent.guest_start
            n = min(end - offset, extent.size - relative)
            if extent.kind is ExtentKind.FLAT:
                runs.append(Run(RunKind.DATA, offset, n, extent.file_offset + relative,
                                extent.file))
            elif extent.kind is ExtentKind.ZERO:
                runs.append(Run(RunKind.ZERO, offset, n))
            else:
                assert extent.geometry is not None and extent.file is not None
                gd_index, n = gt_window(extent.geometry, relative, n)
                table, table_offset = await self._grain_table(index, gd_index)
                runs.extend(map_grain_table(
                    extent.geometry,
                    table,
                    extent=index,
                    child=extent.file,
                    guest_base=extent.guest_start,
                    offset=relative,
                    length=n,
                    file_size=extent.file.size,
                    table_offset=table_offset,
                    label=extent.label,
                ))
            offset += n
            if first_window:
                break
        return coalesce(runs)

    # -- I/O ------------------------------------------------------------------------------------

    async def _pread(self, offset: int, length: int) -> Buffer:
        return await read_runs(self, await self._map(offset, length))

    async def read_compressed(self, run: Run) -> bytes:
        """The executor's hook: the bytes of ``run`` from its inflated grain (``run.payload``
        is the extent index, ``run.host_offset`` the grain's place in the extent file)."""
        extent = self.extents[run.payload]
        assert extent.geometry is not None
        grain = await self._inflated_grain(run.payload, run.host_offset)
        start = (run.offset - extent.guest_start) % extent.geometry.grain_size
        end = start + run.length
        if end > len(grain):
            raise FormatError(
                f"compressed grain inflates to {len(grain)} bytes; {end} are needed",
                path=extent.label,
                field="grain",
                offset=run.host_offset,
            )
        return grain[start:end]

    async def _inflated_grain(self, index: int, host_offset: int) -> bytes:
        # Single-flight: readers of one grain (small sequential reads, in flight together)
        # read and inflate it once.
        grain, hit = await self._grain_cache.load(
            (index, host_offset), partial(self._read_grain, index, host_offset))
        if hit:
            self.counters.grain_cache_hits += 1
        else:
            self.counters.grain_cache_misses += 1
        return grain

    async def _read_grain(self, index: int, host_offset: int) -> bytes:
        extent = self.extents[index]
        assert extent.file is not None and extent.header is not None
        grain_size = extent.header.grain_size
        file = extent.file
        if extent.header.has_markers:
            marker = await _read_checked(file, host_offset, GRAIN_MARKER.size, "grain marker",
                                         extent.label)
            _lba, data_len = GRAIN_MARKER.unpack(marker)
            start = host_offset + GRAIN_MARKER.size
            # QEMU reads two grains' worth for the marker and the data; deflate of
            # incompressible data grows only slightly.
            if not 0 < data_len <= 2 * grain_size:
                raise FormatError(f"grain marker claims {data_len} compressed bytes",
                                  path=extent.label, field="grain marker", offset=host_offset)
        else:
            start = host_offset
            data_len = min(2 * grain_size, file.size - host_offset)
        compressed = await _read_checked(file, start, data_len, "compressed grain", extent.label,
                                         field_offset=host_offset)
        self.counters.compressed_bytes_read += len(compressed)
        return self._inflate(compressed, grain_size, extent.label, host_offset)

    @staticmethod
    def _inflate(compressed: bytes, grain_size: int, label: str, offset: int) -> bytes:
        inflater = zlib.decompressobj()
        try:
            # max_length bounds the output: a deflate bomb stops at one grain.
            grain = inflater.decompress(compressed, grain_size)
        except zlib.error as exc:
            raise FormatError(f"compressed grain does not inflate: {exc}", path=label,
                              field="grain", offset=offset) from None
        if inflater.unconsumed_tail:
            raise FormatError(f"compressed grain inflates to more than {grain_size} bytes",
                              path=label, field="grain", offset=offset)
        if not inflater.eof:
            raise FormatError("compressed grain is truncated", path=label, field="grain",
                              offset=offset)
        return grain

    # -- writing: preparation ------------------------------------------------------------------

    async def _prepare_writes(self) -> None:
        """Refuse what cannot be written, as QEMU does, and load what sparse writes need."""
        if any(e.geometry is not None and e.geometry.compressed for e in self.extents):
            raise UnsupportedError(
                "streamOptimized (compressed) VMDK images are read-only: QEMU also refuses "
                "to rewrite their compressed grains; convert the image to write to it",
                path=self.label, errno=errno.EROFS,
            )
        if self.parent_filename_hint is not None and self.backing is None:
            raise UnsupportedError(
                "a delta disk opened without its parent cannot be written: filling a new "
                "grain needs the parent's bytes",
                path=self.label, field="parentFileNameHint", errno=errno.EROFS,
            )
        users: dict[int, int] = {}
        for extent in self.extents:
            if extent.file is not None:
                users[id(extent.file)] = users.get(id(extent.file), 0) + 1
        for index, extent in enumerate(self.extents):
            if extent.kind is not ExtentKind.SPARSE:
                continue
            assert extent.file is not None and extent.header is not None
            if users[id(extent.file)] > 1:
                # Another extent's writes would land on this one's tables and grains.
                raise FormatError("a sparse extent's file is named by another extent too",
                                  path=extent.label, field="extent")
            if not extent.writable:
                continue
            header = extent.header
            if header.version == 3:
                # QEMU: version 3 adds changed block tracking, which a writer would have to
                # keep up to date ("VMDK version 3 must be read only").
                raise UnsupportedError(
                    "VMDK sparse version 3 (changed block tracking) is read-only, as in QEMU",
                    path=extent.label, field="version", errno=errno.EROFS,
                )
            rgd = None
            if header.has_redundant_gd:
                raw = await _read_checked(extent.file, header.rgd_offset * SECTOR,
                                          header.gd_entries * 4, "redundant grain directory",
                                          extent.label, field="rgdOffset")
                rgd = le_table(raw, 4)
            assert extent.gd is not None
            metadata = check_directories(header, extent.gd, rgd, extent.file.size,
                                         extent.label)
            # As QEMU's next_cluster_sector: new grains start at the file's end, grain-aligned.
            grain = header.grain_size
            next_free = -(-extent.file.size // grain) * grain
            self.extents[index] = replace(extent, write=SparseWriteState(rgd, next_free,
                                                                         metadata))

    async def _before_first_change(self) -> None:
        """Give the image a new CID before its content first changes (QEMU: on the first
        write after each open), so that deltas made from it stop matching it."""
        if self._cid_at is None:
            return
        offset, digits = self._cid_at
        cid, text = replacement_cid(digits, self.cid if self.cid is not None else -1,
                                    secrets.randbelow)
        await self.file.pwrite(offset, text)
        # Durable before any data changes: a crash must not leave new data under the old CID.
        await self.file.flush()
        self._cid_at = None
        self.cid = cid
        self.counters.cid_updates += 1

    # -- writing --------------------------------------------------------------------------------

    def _extent_at(self, offset: int) -> tuple[int, Extent]:
        index = bisect.bisect_right(self._extent_starts, offset) - 1
        return index, self.extents[index]

    def _check_writable(self, index: int, extent: Extent) -> None:
        if not extent.writable:
            raise ReadOnlyError(f"extent {index + 1} ({extent.label}) is RDONLY in the "
                                "descriptor", path=self.label, field="extent")

    async def _pwrite(self, offset: int, data: Buffer) -> None:
        view = memoryview(data).cast("B")
        async with self._write_lock:
            await self._before_first_change()
            done = 0
            while done < len(view):
                index, extent = self._extent_at(offset + done)
                relative = offset + done - extent.guest_start
                n = min(len(view) - done, extent.size - relative)
                piece = view[done : done + n]
                if extent.kind is ExtentKind.ZERO:
                    if bytes(piece).count(0) != n:
                        raise ReadOnlyError(
                            f"extent {index + 1} is a ZERO extent: it cannot store data",
                            path=self.label, field="extent", offset=offset + done,
                        )
                else:
                    self._check_writable(index, extent)
                    assert extent.file is not None
                    if extent.kind is ExtentKind.FLAT:
                        await extent.file.pwrite(extent.file_offset + relative, piece)
                    else:
                        await self._write_sparse(index, relative, piece)
                done += n
            await self._write_back_if_many()

    async def _write_sparse(self, index: int, relative: int, data: memoryview) -> None:
        """Write ``data`` at ``relative`` in sparse extent ``index``, one grain table at a
        time: in place where grains exist, into new grains elsewhere."""
        extent = self.extents[index]
        geometry = extent.geometry
        assert geometry is not None and extent.file is not None
        done = 0
        while done < len(data):
            gd_index, n = gt_window(geometry, relative + done, len(data) - done)
            table = await self._table_for_write(index, gd_index)
            for run in self._table_runs(index, table, gd_index, relative + done, n):
                start = run.offset - extent.guest_start - relative
                piece = data[start : start + run.length]
                if run.kind is RunKind.DATA:
                    self._check_not_metadata(extent, run.host_offset, run.length)
                    await extent.file.pwrite(run.host_offset, piece)
                else:
                    await self._allocate_grains(index, table, gd_index, run, piece)
            done += n

    def _table_runs(self, index: int, table: array[int] | None, gd_index: int, offset: int,
                    length: int) -> list[Run]:
        extent = self.extents[index]
        assert extent.geometry is not None and extent.file is not None and extent.gd is not None
        return map_grain_table(
            extent.geometry,
            table,
            extent=index,
            child=extent.file,
            guest_base=extent.guest_start,
            offset=offset,
            length=length,
            file_size=extent.file.size,
            table_offset=extent.gd[gd_index] * SECTOR,
            label=extent.label,
        )

    def _check_not_metadata(self, extent: Extent, host: int, length: int) -> None:
        assert extent.write is not None
        clash = extent.write.metadata.find(host, host + length)
        if clash is not None:
            raise FormatError(
                f"a grain table entry places guest data at {host:#x}, inside the extent's "
                f"metadata ({clash[0]:#x}-{clash[1]:#x}); refusing to write over it",
                path=extent.label, field="grain table entry", offset=host,
            )

    async def _table_for_write(self, index: int, gd_index: int) -> array[int]:
        """The grain table to change; a new one (and its redundant copy) when the directory
        has none -- reserved at the end of the file, written at the next write-back."""
        table, _ = await self._grain_table(index, gd_index)
        if table is not None:
            return table
        extent = self.extents[index]
        state, header, gd = extent.write, extent.header, extent.gd
        assert state is not None and header is not None and gd is not None
        size = header.gt_bytes
        primary = state.allocate(size, SECTOR, extent.label)
        state.metadata.add(primary, primary + size)
        gd[gd_index] = primary // SECTOR
        if state.rgd is not None:
            redundant = state.allocate(size, SECTOR, extent.label)
            state.metadata.add(redundant, redundant + size)
            state.rgd[gd_index] = redundant // SECTOR
        table = array("I", bytes(4 * header.gtes_per_gt))
        state.dirty_directory.add(gd_index)
        self._mark_dirty(index, gd_index, table)
        self.counters.gts_allocated += 1
        return table

    def _mark_dirty(self, index: int, gd_index: int, table: array[int]) -> None:
        state = self.extents[index].write
        assert state is not None
        if gd_index not in state.dirty_tables:
            state.dirty_tables[gd_index] = table
            self._dirty_tables += 1
        # Readers find the table dirty from now on; a load of it from the file in flight
        # may predate this change and must not be cached.
        self._gt_cache.changed()

    async def _allocate_grains(self, index: int, table: array[int], gd_index: int, run: Run,
                               data: memoryview | None) -> None:
        """Give the unallocated (or zeroed) grains of ``run`` new space at the end of the
        extent file and write them whole: the part of the first grain before the run and of
        the last one after it come from the parent (BACKING runs) or are zeros (zeroed grains,
        or no parent); ``data`` None writes zeros. Then, and only then, the table names them.
        """
        extent = self.extents[index]
        geometry, state, file = extent.geometry, extent.write, extent.file
        assert geometry is not None and state is not None and file is not None
        grain = geometry.grain_size
        start = run.offset - extent.guest_start
        end = start + run.length
        first = start // grain
        count = -(-end // grain) - first
        host = state.allocate(count * grain, grain, extent.label)
        from_backing = run.kind is RunKind.BACKING
        head = start - first * grain
        tail = (first + count) * grain - end
        if head:
            await self._fill_grain(extent, host, extent.guest_start + first * grain, head,
                                   from_backing)
        if data is None:
            await file.zero(host + head, run.length)
        else:
            await file.pwrite(host + head, data)
        if tail:
            await self._fill_grain(extent, host + head + run.length, run.end, tail,
                                   from_backing)
        slot = first - gd_index * geometry.gtes_per_gt
        for k in range(count):
            table[slot + k] = (host + k * grain) // SECTOR
        self._mark_dirty(index, gd_index, table)
        self.counters.grains_allocated += count

    async def _fill_grain(self, extent: Extent, host: int, guest: int, length: int,
                          from_backing: bool) -> None:
        """Copy-on-write: fill ``length`` bytes of a new grain at ``host`` with what guest
        ``guest`` read before -- the parent's bytes, zeros past its end (or the extent's)."""
        file = extent.file
        assert file is not None
        self.counters.cow_bytes += length
        end = guest + length
        pos = guest
        if from_backing:
            # The last grain may reach past the extent's end: only the extent's bytes are the
            # parent's; the rest of the grain is zeros.
            readable = guest + self.backing_length(guest, min(end, extent.guest_end) - guest)
            while pos < readable:
                n = min(COW_CHUNK, readable - pos)
                await file.pwrite(host + pos - guest, await self.read_backing(pos, n))
                self.counters.cow_backing_bytes += n
                pos += n
        if pos < end:
            # Zeros without writing them where the file is extended (a hole reads as zeros).
            await file.zero(host + pos - guest, end - pos)

    async def _zero(self, offset: int, length: int, may_unmap: bool) -> None:
        async with self._write_lock:
            await self._before_first_change()
            end = offset + length
            while offset < end:
                index, extent = self._extent_at(offset)
                relative = offset - extent.guest_start
                n = min(end - offset, extent.size - relative)
                if extent.kind is not ExtentKind.ZERO:
                    self._check_writable(index, extent)
                    assert extent.file is not None
                    if extent.kind is ExtentKind.FLAT:
                        await extent.file.zero(extent.file_offset + relative, n,
                                               may_unmap=may_unmap)
                    else:
                        await self._zero_sparse(index, relative, n)
                offset += n
            await self._write_back_if_many()

    async def _zero_sparse(self, index: int, relative: int, length: int) -> None:
        """Make a sparse range read as zeros with as little as possible: nothing where it
        already does, zeros in place in allocated grains, "zeroed grain" entries (when the
        extent has the feature) over parent data, new zero grains otherwise."""
        extent = self.extents[index]
        geometry = extent.geometry
        assert geometry is not None and extent.file is not None
        done = 0
        while done < length:
            gd_index, n = gt_window(geometry, relative + done, length - done)
            table, _ = await self._grain_table(index, gd_index)
            for run in self._table_runs(index, table, gd_index, relative + done, n):
                if run.kind is RunKind.ZERO:
                    continue
                if run.kind is RunKind.DATA:
                    self._check_not_metadata(extent, run.host_offset, run.length)
                    await extent.file.zero(run.host_offset, run.length)
                elif self.backing_length(run.offset, run.length):
                    table = await self._table_for_write(index, gd_index)
                    await self._hide_backing(index, table, gd_index, run)
                # else: unallocated and no parent bytes there: it reads as zeros already.
            done += n

    async def _hide_backing(self, index: int, table: array[int], gd_index: int,
                            run: Run) -> None:
        """Zeros over an unallocated run whose parent has data."""
        extent = self.extents[index]
        geometry = extent.geometry
        assert geometry is not None
        grain = geometry.grain_size
        start = run.offset - extent.guest_start
        end = start + run.length
        whole_start = -(-start // grain) * grain
        # The extent's last grain may be short: reaching the extent's end covers it whole.
        whole_end = end if end == extent.size else end // grain * grain
        if not geometry.zero_grain or whole_start >= whole_end:
            await self._allocate_grains(index, table, gd_index, run, None)
            return
        for part_start, part_end in ((start, whole_start), (whole_end, end)):
            if part_end > part_start:
                part = Run(RunKind.BACKING, extent.guest_start + part_start,
                           part_end - part_start)
                await self._allocate_grains(index, table, gd_index, part, None)
        slot = whole_start // grain - gd_index * geometry.gtes_per_gt
        count = -(-(whole_end - whole_start) // grain)
        for k in range(count):
            table[slot + k] = GTE_ZEROED
        self._mark_dirty(index, gd_index, table)
        self.counters.zeroed_grains += count

    # -- write-back -----------------------------------------------------------------------------

    async def _flush(self) -> None:
        async with self._write_lock:
            await self._write_back()

    async def _close(self) -> None:
        if not self.read_only:
            # Everything durable on close: dirty tables, then every child's data.
            await self.flush()

    async def _write_back_if_many(self) -> None:
        if self._dirty_tables > MAX_DIRTY_TABLES:
            await self._write_back()

    async def _write_back(self) -> None:
        """Write dirty grain tables, then new tables' directory entries, each step after a
        flush of what it points at (module docstring). Called with the write lock held."""
        dirty = [(i, e) for i, e in enumerate(self.extents) if e.write is not None
                 and e.write.dirty]
        if not dirty:
            return
        # 1. The grains named by the changed entries are durable before any entry is written.
        for file in _distinct(e.file for _, e in dirty):
            await file.flush()
        for _, extent in dirty:
            state, gd, file = extent.write, extent.gd, extent.file
            assert state is not None and gd is not None and file is not None
            for gd_index in sorted(state.dirty_tables):
                raw = table_bytes(state.dirty_tables[gd_index])
                await file.pwrite(gd[gd_index] * SECTOR, raw)
                if state.rgd is not None and state.rgd[gd_index]:
                    await file.pwrite(state.rgd[gd_index] * SECTOR, raw)
                self.counters.gt_writebacks += 1
        # 2. New tables are durable before the directory names them.
        new_tables = [(i, e) for i, e in dirty if e.write is not None
                      and e.write.dirty_directory]
        for file in _distinct(e.file for _, e in new_tables):
            await file.flush()
        for _, extent in new_tables:
            state, gd, file, header = extent.write, extent.gd, extent.file, extent.header
            assert state is not None and gd is not None and file is not None
            assert header is not None
            for gd_index in sorted(state.dirty_directory):
                await file.pwrite(header.gd_offset * SECTOR + 4 * gd_index,
                                  _GD_ENTRY.pack(gd[gd_index]))
                if state.rgd is not None:
                    await file.pwrite(header.rgd_offset * SECTOR + 4 * gd_index,
                                      _GD_ENTRY.pack(state.rgd[gd_index]))
                self.counters.gd_writebacks += 1
        # Written: the tables are ordinary cached tables again.
        for index, extent in dirty:
            state = extent.write
            assert state is not None
            for gd_index, table in state.dirty_tables.items():
                self._gt_cache.put((index, gd_index), table)
            state.dirty_tables.clear()
            state.dirty_directory.clear()
        self._dirty_tables = 0
        self._gt_cache.changed()

    # -- block status ---------------------------------------------------------------------------

    async def _block_status(self, offset: int, length: int) -> tuple[BlockStatus, int]:
        _index, extent = self._extent_at(offset)
        runs = await self._map(offset, length, first_window=True)
        if extent.kind is ExtentKind.FLAT:
            # A flat extent is as sparse as its file: ask the file, as QEMU's RECURSE does.
            assert extent.file is not None
            first = runs[0]
            status, run = await extent.file.block_status(first.host_offset, first.length)
            kind = BlockStatus.ZERO if status & BlockStatus.ZERO else BlockStatus.DATA
            return kind | BlockStatus.ALLOCATED, run
        return runs_status(self, runs)

    # -- information ----------------------------------------------------------------------------

    def _extent_info(self, extent: Extent) -> dict[str, Any]:
        # Keys in the order qemu-img prints them.
        info: dict[str, Any] = {}
        geometry = extent.geometry
        if geometry is not None and geometry.compressed:
            info["compressed"] = True
        info["virtual-size"] = extent.size
        info["filename"] = extent.label
        if geometry is not None:
            info["cluster-size"] = geometry.grain_size
        info["format"] = extent.type_name
        return info

    def _cluster_size(self) -> int | None:
        # As QEMU's vmdk_get_info: only when every extent is of the first one's kind.
        first = self.extents[0] if self.extents else None
        if first is None or first.kind is not ExtentKind.SPARSE or first.geometry is None:
            return None
        for extent in self.extents[1:]:
            other = extent.geometry
            if (other is None or other.grain_size != first.geometry.grain_size
                    or other.compressed != first.geometry.compressed):
                return None
        return first.geometry.grain_size

    def info(self) -> dict[str, Any]:
        """``qemu-img info --output=json`` keys: cluster-size, backing, format-specific."""
        data: dict[str, Any] = {}
        if self.cid is not None:
            data["cid"] = self.cid
        if self.parent_cid is not None:
            data["parent-cid"] = self.parent_cid
        data["create-type"] = self.create_type
        data["extents"] = [self._extent_info(extent) for extent in self.extents]
        info: dict[str, Any] = {}
        cluster_size = self._cluster_size()
        if cluster_size is not None:
            info["cluster-size"] = cluster_size
        if self.parent_filename_hint is not None:
            info["backing-filename"] = self.parent_filename_hint
            info["backing-filename-format"] = "vmdk"
            if self.backing is not None:
                info["full-backing-filename"] = self.backing.label
        info["format-specific"] = {"type": "vmdk", "data": data}
        return info
