"""Format driver ``vmdk``: VMware virtual disks, read-only.

Variants read (``createType``): ``monolithicSparse``, ``streamOptimized`` (one sparse file with an
embedded descriptor), and the descriptor files ``monolithicFlat``, ``twoGbMaxExtentSparse``,
``twoGbMaxExtentFlat``, ``vmfs`` and friends, whose extents lie beside them. A delta disk names
its parent in ``parentFileNameHint``; the parent's ``CID`` must equal the delta's ``parentCID``.

The node keeps what it learned at open -- the extents, each sparse extent's grain directory -- and
two caches: grain tables (``gt_cache_*`` counters) and decompressed grains of stream-optimized
extents (``grain_cache_*``). Mapping a guest range to runs is :mod:`.mapping`'s pure work; this
module does the I/O: it loads grain tables, reads coalesced data runs from the extent files,
inflates compressed grains, and reads the backing file for unallocated grains.

Writing is not implemented. The structure leaves room for it: allocation would append a grain
to the extent file, then write the grain table entry (and its redundant copy) -- grain before
table, as QEMU's ``get_cluster_offset`` does -- updating the cached table in place under a lock.
"""

from __future__ import annotations

import bisect
import enum
import zlib
from array import array
from dataclasses import dataclass
from typing import Any

from vdiskfs.block.format import FormatNode
from vdiskfs.block.node import BlockNode, BlockStatus, Buffer
from vdiskfs.block.registry import OpenContext, register
from vdiskfs.drivers.format.runs import LruCache, RunCounters, le_table
from vdiskfs.drivers.format.vmdk.descriptor import (
    DESCRIPTOR_CREATE_TYPES,
    EXTENT_TYPES_FLAT,
    MAX_DESCRIPTOR_SIZE,
    NO_PARENT_CID,
    Descriptor,
    is_descriptor_text,
    looks_like_descriptor,
    parse_descriptor,
)
from vdiskfs.drivers.format.vmdk.mapping import (
    Run,
    RunKind,
    SparseGeometry,
    append_run,
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
from vdiskfs.errors import FormatError, UnsupportedError

__all__ = ["VmdkCounters", "VmdkNode"]

#: Grain tables kept per node: 512 entries (2 KiB) each, so 1 MiB maps 16 GiB of 64 KiB grains.
GT_CACHE_TABLES = 512
#: Decompressed grains kept per node (stream-optimized extents), in bytes.
GRAIN_CACHE_BYTES = 4 << 20
#: Largest virtual size accepted: offsets must fit the kernel's signed 64-bit off_t.
MAX_DISK_SIZE = (1 << 63) - 1


@dataclass(slots=True)
class VmdkCounters(RunCounters):
    """The run counters (``data_reads``, ``backing_reads``, ``zero_bytes``...) and the caches'."""

    #: Grain table lookups served from the cache, and tables read from an extent file.
    gt_cache_hits: int = 0
    gt_cache_misses: int = 0
    #: Compressed-grain lookups served inflated from the cache, and grains read and inflated.
    grain_cache_hits: int = 0
    grain_cache_misses: int = 0
    #: Compressed bytes read from extent files.
    compressed_bytes_read: int = 0


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
    #: SPARSE: the grain directory, one grain-table sector per entry.
    gd: array[int] | None = None

    @property
    def guest_end(self) -> int:
        return self.guest_start + self.size


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
        self.backing: BlockNode | None = None
        # (extent index, grain table sector) -> table.
        self._gt_cache: LruCache[tuple[int, int], array[int]] = LruCache(GT_CACHE_TABLES)
        # (extent index, grain marker offset) -> inflated grain; sized at open by grain size.
        self._grain_cache: LruCache[tuple[int, int], bytes] = LruCache(1)

    @classmethod
    def probe(cls, head: bytes, tail: bytes, filename: str) -> int:
        if head[:4] in (SPARSE_MAGIC, COWD_MAGIC):
            return 100
        return 100 if looks_like_descriptor(head) else 0

    # -- open ---------------------------------------------------------------------------------

    async def open(self) -> None:
        if not self.read_only:
            raise UnsupportedError("vmdk: writing is not supported; open the image read-only",
                                   path=self.label)
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
            await self._open_descriptor(parse_descriptor(text, self.label))
        size = self.extents[-1].guest_end if self.extents else 0
        if size > MAX_DISK_SIZE:
            raise self.format_error(f"virtual size {size} is larger than {MAX_DISK_SIZE}",
                                    field="capacity")
        self.size = size
        largest_grain = max((e.geometry.grain_size for e in self.extents
                             if e.geometry is not None and e.geometry.compressed), default=0)
        if largest_grain:
            self._grain_cache = LruCache(max(1, GRAIN_CACHE_BYTES // largest_grain))
        await self._open_backing()

    async def _open_monolithic(self) -> None:
        """A single sparse file: its header, grain directory and embedded descriptor."""
        header = parse_sparse_header(await self._first_sector(self.file, self.label), self.label)
        if header.capacity == 0 and header.desc_offset:
            # QEMU's reading too: an empty sparse header whose embedded descriptor lists the
            # extents is opened as that descriptor.
            text = await self._embedded_descriptor(header)
            await self._open_descriptor(parse_descriptor(text, self.label))
            return
        extent = await self._load_sparse(self.file, header, self.label, guest_start=0,
                                         type_name="")
        self._add_extent(extent)
        # QEMU reports the type from the header, whatever the embedded text says.
        self.create_type = "monolithicSparse"
        if extent.geometry is not None and extent.geometry.compressed:
            self.create_type = "streamOptimized"
        if header.desc_offset:
            descriptor = parse_descriptor(await self._embedded_descriptor(header), self.label)
            self._take_descriptor_facts(descriptor)

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

    def _take_descriptor_facts(self, descriptor: Descriptor) -> None:
        self.descriptor = descriptor
        self.cid = descriptor.cid
        self.parent_cid = descriptor.parent_cid
        self.parent_filename_hint = descriptor.parent_filename_hint

    async def _open_descriptor(self, descriptor: Descriptor) -> None:
        """A descriptor file (or an embedded one standing for it): open every extent."""
        create_type = descriptor.create_type
        if create_type is None:
            raise self.format_error("descriptor has no createType", field="createType")
        if create_type not in DESCRIPTOR_CREATE_TYPES:
            raise UnsupportedError(f"createType {create_type!r} is not supported",
                                   path=self.label, field="createType")
        if not descriptor.extents:
            raise self.format_error("descriptor lists no extent", field="extent")
        self.create_type = create_type
        self._take_descriptor_facts(descriptor)
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
            assert line.filename is not None  # the parser requires one for other types
            node = await self.ctx.open_child(line.filename, role="extent", field_name=field_name,
                                             format="raw")
            self.add_child("extent", node)
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
                                file_offset=start)
            else:
                header = parse_sparse_header(await self._first_sector(node, node.label),
                                             node.label)
                if header.capacity == 0:
                    raise FormatError("sparse extent of capacity 0", path=node.label,
                                      field="capacity")
                extent = await self._load_sparse(node, header, node.label, guest_start=guest,
                                                 type_name=line.type)
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

    async def _open_backing(self) -> None:
        hint = self.parent_filename_hint
        if hint is None or not self.ctx.options.backing:
            return
        node = await self.ctx.open_child(hint, role="backing", field_name="parentFileNameHint",
                                         format="vmdk")
        self.add_child("backing", node)
        self.backing = node
        parent_cid = getattr(node, "cid", None)
        if (self.parent_cid is not None and self.parent_cid != NO_PARENT_CID
                and parent_cid is not None and parent_cid != self.parent_cid):
            # QEMU refuses to read through a parent whose content changed since the delta was
            # made (vmdk_is_cid_valid); refuse at open, where the message can say why.
            raise self.format_error(
                f"parentCID {self.parent_cid:08x} does not match CID {parent_cid:08x} of the "
                f"backing file {hint!r}: the parent changed after this delta was made",
                field="parentCID",
            )

    # -- mapping --------------------------------------------------------------------------------

    async def _grain_table(self, index: int, gd_index: int) -> tuple[array[int] | None, int]:
        """The grain table ``gd_index`` of extent ``index`` and its file offset (None: none)."""
        extent = self.extents[index]
        assert extent.gd is not None and extent.geometry is not None and extent.file is not None
        sector = extent.gd[gd_index]
        if sector == 0:
            return None, 0
        key = (index, sector)
        table = self._gt_cache.get(key)
        if table is not None:
            self.counters.gt_cache_hits += 1
            return table, sector * SECTOR
        self.counters.gt_cache_misses += 1
        assert extent.header is not None
        data = await _read_checked(
            extent.file,
            sector * SECTOR,
            extent.geometry.gtes_per_gt * 4,
            f"grain table {gd_index}",
            extent.label,
            field="grain directory entry",
            field_offset=extent.header.gd_offset * SECTOR + 4 * gd_index,
        )
        # Two readers may both miss and load the same table; both get equal tables.
        table = le_table(data, 4)
        self._gt_cache.put(key, table)
        return table, sector * SECTOR

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
                append_run(runs, Run(RunKind.DATA, offset, n, index,
                                     extent.file_offset + relative))
            elif extent.kind is ExtentKind.ZERO:
                append_run(runs, Run(RunKind.ZERO, offset, n))
            else:
                assert extent.geometry is not None and extent.file is not None
                gd_index, n = gt_window(extent.geometry, relative, n)
                table, table_offset = await self._grain_table(index, gd_index)
                for run in map_grain_table(
                    extent.geometry,
                    table,
                    extent=index,
                    guest_base=extent.guest_start,
                    offset=relative,
                    length=n,
                    file_size=extent.file.size,
                    table_offset=table_offset,
                    label=extent.label,
                ):
                    append_run(runs, run)
            offset += n
            if first_window:
                break
        return runs

    # -- I/O ------------------------------------------------------------------------------------

    async def _pread(self, offset: int, length: int) -> Buffer:
        runs = await self._map(offset, length)
        if len(runs) == 1 and runs[0].kind is RunKind.DATA:
            return await self._read_data(runs[0])
        buf = bytearray(length)
        view = memoryview(buf)
        for run in runs:
            start = run.guest_offset - offset
            piece = view[start : start + run.length]
            if run.kind is RunKind.DATA:
                piece[:] = await self._read_data(run)
            elif run.kind is RunKind.COMPRESSED:
                piece[:] = await self._read_compressed(run)
            elif run.kind is RunKind.BACKING:
                await self._read_backing(run.guest_offset, piece)
            else:
                # ZERO: the buffer is zeros already.
                self.counters.zero_bytes += run.length
        return buf

    async def _read_data(self, run: Run) -> Buffer:
        node = self.extents[run.extent].file
        assert node is not None
        self.counters.data_reads += 1
        self.counters.data_bytes += run.length
        return await node.pread(run.host_offset, run.length)

    async def _read_backing(self, offset: int, piece: memoryview) -> None:
        """Fill ``piece`` (zeroed) from the backing file; past its end, or without one, it
        stays zero, as QEMU reads a parent shorter than the delta."""
        backing = self.backing
        length = len(piece)
        available = 0 if backing is None else max(0, min(length, backing.size - offset))
        if available:
            assert backing is not None
            self.counters.backing_reads += 1
            self.counters.backing_bytes += available
            piece[:available] = await backing.pread(offset, available)
        self.counters.zero_bytes += length - available

    async def _read_compressed(self, run: Run) -> bytes:
        grain = await self._inflated_grain(run.extent, run.host_offset)
        end = run.grain_offset + run.length
        if end > len(grain):
            extent = self.extents[run.extent]
            raise FormatError(
                f"compressed grain inflates to {len(grain)} bytes; {end} are needed",
                path=extent.label,
                field="grain",
                offset=run.host_offset,
            )
        return grain[run.grain_offset : end]

    async def _inflated_grain(self, index: int, host_offset: int) -> bytes:
        key = (index, host_offset)
        cached = self._grain_cache.get(key)
        if cached is not None:
            self.counters.grain_cache_hits += 1
            return cached
        self.counters.grain_cache_misses += 1
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
        grain = self._inflate(compressed, grain_size, extent.label, host_offset)
        self._grain_cache.put(key, grain)
        return grain

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

    # -- block status ---------------------------------------------------------------------------

    def _status(self, kind: RunKind) -> BlockStatus:
        if kind is RunKind.ZERO:
            return BlockStatus.ZERO | BlockStatus.ALLOCATED
        if kind is RunKind.BACKING:
            # Without a backing file, unallocated grains read as zeros.
            return BlockStatus(0) if self.backing is not None else BlockStatus.ZERO
        return BlockStatus.DATA | BlockStatus.ALLOCATED

    async def _block_status(self, offset: int, length: int) -> tuple[BlockStatus, int]:
        runs = await self._map(offset, length, first_window=True)
        first = runs[0]
        extent = self.extents[first.extent] if first.extent >= 0 else None
        if extent is not None and extent.kind is ExtentKind.FLAT:
            # A flat extent is as sparse as its file: ask the file, as QEMU's RECURSE does.
            assert extent.file is not None
            status, run = await extent.file.block_status(first.host_offset, first.length)
            kind = BlockStatus.ZERO if status & BlockStatus.ZERO else BlockStatus.DATA
            return kind | BlockStatus.ALLOCATED, run
        status = self._status(first.kind)
        total = first.length
        for run in runs[1:]:
            if self._status(run.kind) != status:
                break
            total += run.length
        return status, total

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
