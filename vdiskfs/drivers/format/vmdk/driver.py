"""Format driver ``vmdk``: VMware virtual disks.

Variants read (``createType``): ``monolithicSparse``, ``streamOptimized`` (one sparse file with an
embedded descriptor), and the descriptor files ``monolithicFlat``, ``twoGbMaxExtentSparse``,
``twoGbMaxExtentFlat``, ``vmfs`` and friends, whose extents lie beside them. A delta disk names
its parent in ``parentFileNameHint``; the parent's ``CID`` must equal the delta's ``parentCID``.

The node keeps what it learned at open -- the descriptor, the extents as objects, one per kind
(:mod:`.extent`: flat and zero; :mod:`.sparse_extent`; :mod:`.stream_extent` for compressed
grains), each with its own map, write, zero and write-back -- and two caches its sparse extents
share: grain tables (``gt_cache_*`` counters) and decompressed grains of stream-optimized extents
(``grain_cache_*``), each loaded once however many readers miss on it together. The node finds
the extent of an offset by ``bisect``, splits every request at extent boundaries and hands each
piece to its extent; the format layer's run executor
(:func:`~vdiskfs.drivers.format.runs.read_runs`) reads the runs they map, concurrently.

Writing (every variant but ``streamOptimized``, which QEMU keeps read-only too): flat extents are
written in place; a sparse extent appends a grain for each unallocated or zeroed grain written,
filling the rest of the grain from the parent (or with zeros), and a grain table when the
directory has none, as QEMU's ``get_cluster_offset``. The order makes a crash leak space at
worst, never point at unwritten bytes:

1. the grain's bytes (copy-on-write head, the request, copy-on-write tail) are written;
2. the cached grain table is changed in memory and pinned as dirty;
3. :meth:`flush` (or too many dirty tables) writes back, in steps across all extents: a flush of
   the extent files (the grains are durable), then every dirty table, primary and redundant
   copy; then, if a table is new, another flush and the directory entries (primary and
   redundant) that name it.

QEMU writes the table entry right after each grain and flushes then (``vmdk_L2update``); keeping
tables dirty until a flush costs no safety -- nothing is promised durable before a flush -- and
spares a flush per allocation. As QEMU does, the first write after each open gives the image a
new random ``CID``, so deltas made from it no longer open against changed content; unlike QEMU,
vdiskfs writes (and flushes) it before the first byte of data changes, and in place, with as
many digits as the old one, so no other byte of the descriptor moves.
"""

from __future__ import annotations

import bisect
import errno
import secrets
from collections.abc import Iterable, Iterator
from typing import Any

import trio

from vdiskfs.block.context import OpenContext
from vdiskfs.block.format import FormatNode
from vdiskfs.block.node import BlockNode, BlockStatus, Buffer
from vdiskfs.block.registry import PROTOCOL_ONLY, redact_reference, register
from vdiskfs.drivers.format.runs import LruCache, Run, coalesce, read_runs
from vdiskfs.drivers.format.vmdk.descriptor import (
    DESCRIPTOR_CREATE_TYPES,
    EXTENT_TYPES_FLAT,
    MAX_DESCRIPTOR_SIZE,
    NO_PARENT_CID,
    Descriptor,
    ExtentLine,
    is_descriptor_text,
    locate_cid,
    looks_like_descriptor,
    parse_descriptor,
    replacement_cid,
)
from vdiskfs.drivers.format.vmdk.extent import (
    Extent,
    FlatExtent,
    SparseShared,
    VmdkCounters,
    ZeroExtent,
)
from vdiskfs.drivers.format.vmdk.sparse import (
    COWD_MAGIC,
    SECTOR,
    SPARSE_MAGIC,
    SparseHeader,
    parse_sparse_header,
)
from vdiskfs.drivers.format.vmdk.sparse_extent import SparseExtent, checked_header
from vdiskfs.drivers.format.vmdk.stream_extent import StreamExtent
from vdiskfs.errors import FormatError, UnsupportedError

__all__ = ["VmdkCounters", "VmdkNode"]

#: Decompressed grains kept per node (stream-optimized extents), in bytes.
GRAIN_CACHE_BYTES = 4 << 20
#: Largest virtual size accepted: offsets must fit the kernel's signed 64-bit off_t.
MAX_DISK_SIZE = (1 << 63) - 1
#: Dirty grain tables held before they are written back without waiting for a flush (2 KiB
#: each): bounds the memory a long run of writes without flushes can pin.
MAX_DIRTY_TABLES = 256


def _distinct(nodes: Iterable[BlockNode]) -> list[BlockNode]:
    """The nodes, each once, in first-seen order."""
    out: list[BlockNode] = []
    for node in nodes:
        if all(node is not seen for seen in out):
            out.append(node)
    return out


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
        # Each extent's first guest byte, in order: bisect finds the extent of an offset.
        self._extent_starts: list[int] = []
        self.create_type = ""
        self.cid: int | None = None
        self.parent_cid: int | None = None
        self.parent_filename_hint: str | None = None
        self.descriptor: Descriptor | None = None
        self._shared = SparseShared(self, self.counters)
        # Writes, zeroes and write-backs hold this lock for their whole duration, as QEMU's
        # s->lock: allocation decides from the tables and then changes them. Reads do not
        # take it; a write changes a table only after the grain's bytes are in place.
        self._write_lock = trio.Lock()
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
                             if isinstance(e, StreamExtent)), default=0)
        if largest_grain:
            self._shared.grain_cache = LruCache(max(1, GRAIN_CACHE_BYTES // largest_grain))
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
        extent = await self._open_sparse(self.file, header, self.label, type_name="",
                                         writable=True)
        # QEMU reports the type from the header, whatever the embedded text says.
        self.create_type = "monolithicSparse"
        if isinstance(extent, StreamExtent):
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

    def _next_extent(self) -> dict[str, Any]:
        """What every extent opened next is told: its number, where it starts, whose it is."""
        return {"number": len(self.extents) + 1, "image_label": self.label,
                "guest_start": self.extents[-1].guest_end if self.extents else 0}

    async def _open_sparse(self, file: BlockNode, header: SparseHeader, label: str, *,
                           type_name: str, writable: bool) -> SparseExtent:
        """Add the sparse extent of ``file`` (a stream-optimized one if compressed)."""
        header = await checked_header(file, header, label)
        kind = StreamExtent if header.compressed else SparseExtent
        extent = await kind.open(file, header, label, shared=self._shared, type_name=type_name,
                                 writable=writable, **self._next_extent())
        self._add_extent(extent)
        return extent

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
            found = await self.ctx.realpath(
                line.filename, field_name=f"extent {index + 1} (line {line.line_no})")
            resolved.append(found)
            if line.access == "RW":
                writable_files.add(found)
        opened: dict[str, BlockNode] = {}
        for index, line in enumerate(descriptor.extents):
            field_name = f"extent {index + 1} (line {line.line_no})"
            if line.access == "NOACCESS":
                raise UnsupportedError("NOACCESS extents cannot be read", path=self.label,
                                       field=field_name)
            if line.type == "ZERO":
                self._add_extent(ZeroExtent(size=line.sectors * SECTOR, type_name="ZERO",
                                            **self._next_extent()))
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
            if line.type in EXTENT_TYPES_FLAT:
                self._add_extent(self._flat_extent(line, node, field_name))
                continue
            extent = await self._descriptor_sparse(line, node)
            if isinstance(extent, StreamExtent):
                # As QEMU (vmdk_open_vmdk4): a compressed extent makes the image report
                # streamOptimized, so that info matches qemu-img's.
                self.create_type = "streamOptimized"

    def _flat_extent(self, line: ExtentLine, node: BlockNode, field_name: str) -> FlatExtent:
        start = line.offset * SECTOR
        size = line.sectors * SECTOR
        if start + size > node.size:
            raise FormatError(
                f"flat extent of {size} bytes at offset {start} runs past the end of "
                f"{line.filename!r} ({node.size} bytes)",
                path=self.label,
                field=field_name,
            )
        return FlatExtent(file=node, file_offset=start, size=size, type_name=line.type,
                          writable=line.access == "RW", **self._next_extent())

    async def _descriptor_sparse(self, line: ExtentLine, node: BlockNode) -> SparseExtent:
        header = parse_sparse_header(await self._first_sector(node, node.label), node.label)
        if header.capacity == 0:
            raise FormatError("sparse extent of capacity 0", path=node.label, field="capacity")
        extent = await self._open_sparse(node, header, node.label, type_name=line.type,
                                         writable=line.access == "RW")
        if header.capacity != line.sectors:
            # QEMU sizes the extent by its header; say so when the two disagree.
            self.ctx.warn(
                f"{self.label}: extent {line.filename!r} is {header.capacity} sectors, "
                f"the descriptor says {line.sectors}; using the extent's header"
            )
        return extent

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

    # -- requests, split at extent boundaries ---------------------------------------------------

    def _extent_at(self, offset: int) -> Extent:
        return self.extents[bisect.bisect_right(self._extent_starts, offset) - 1]

    def _pieces(self, offset: int, length: int) -> Iterator[tuple[Extent, int, int, int]]:
        """``(extent, offset in it, offset in the request, length)`` for each extent that
        guest ``[offset, offset + length)`` touches, in order."""
        done = 0
        while done < length:
            extent = self._extent_at(offset + done)
            relative = offset + done - extent.guest_start
            n = min(length - done, extent.size - relative)
            yield extent, relative, done, n
            done += n

    async def _map(self, offset: int, length: int) -> list[Run]:
        runs: list[Run] = []
        for extent, relative, _, n in self._pieces(offset, length):
            runs.extend(await extent.map(relative, n))
        return coalesce(runs)

    async def _pread(self, offset: int, length: int) -> Buffer:
        return await read_runs(self, await self._map(offset, length))

    async def read_compressed(self, run: Run) -> bytes:
        """The executor's hook: the bytes of ``run`` from its inflated grain."""
        extent = self._extent_at(run.offset)
        assert isinstance(extent, StreamExtent)  # only they map COMPRESSED runs
        return await extent.read_compressed(run)

    async def _block_status(self, offset: int, length: int) -> tuple[BlockStatus, int]:
        extent, relative, _, n = next(self._pieces(offset, length))
        return await extent.block_status(relative, n)

    # -- writing --------------------------------------------------------------------------------

    async def _prepare_writes(self) -> None:
        """Refuse what cannot be written, as QEMU does, and let every sparse extent load what
        its writes need."""
        if any(isinstance(e, StreamExtent) for e in self.extents):
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
        for extent in self.extents:
            if not isinstance(extent, SparseExtent):
                continue
            if users[id(extent.file)] > 1:
                # Another extent's writes would land on this one's tables and grains.
                raise FormatError("a sparse extent's file is named by another extent too",
                                  path=extent.label, field="extent")
            await extent.prepare_writes()

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

    async def _pwrite(self, offset: int, data: Buffer) -> None:
        view = memoryview(data).cast("B")
        async with self._write_lock:
            await self._before_first_change()
            for extent, relative, done, n in self._pieces(offset, len(view)):
                await extent.write(relative, view[done : done + n])
            await self._write_back_if_many()

    async def _zero(self, offset: int, length: int, may_unmap: bool) -> None:
        async with self._write_lock:
            await self._before_first_change()
            for extent, relative, _, n in self._pieces(offset, length):
                await extent.zero(relative, n, may_unmap)
            await self._write_back_if_many()

    # -- write-back -----------------------------------------------------------------------------

    async def _flush(self) -> None:
        async with self._write_lock:
            await self._write_back()

    async def _close(self) -> None:
        if not self.read_only:
            # Everything durable on close: dirty tables, then every child's data.
            await self.flush()

    async def _write_back_if_many(self) -> None:
        if self._shared.dirty_tables > MAX_DIRTY_TABLES:
            await self._write_back()

    async def _write_back(self) -> None:
        """Write dirty grain tables, then new tables' directory entries, each step after a
        flush of what it points at (module docstring). Called with the write lock held."""
        dirty = [e for e in self.extents if isinstance(e, SparseExtent) and e.dirty]
        if not dirty:
            return
        # 1. The grains named by the changed entries are durable before any entry is written.
        for file in _distinct(e.file for e in dirty):
            await file.flush()
        for extent in dirty:
            await extent.write_tables()
        # 2. New tables are durable before the directory names them.
        new_tables = [e for e in dirty if e.new_tables]
        for file in _distinct(e.file for e in new_tables):
            await file.flush()
        for extent in new_tables:
            await extent.write_directory()
        for extent in dirty:
            extent.written()
        self._shared.dirty_tables = 0
        self._shared.gt_cache.changed()

    # -- information ----------------------------------------------------------------------------

    def _cluster_size(self) -> int | None:
        # As QEMU's vmdk_get_info: only when every extent is of the first one's kind.
        first = self.extents[0] if self.extents else None
        if not isinstance(first, SparseExtent):
            return None
        for extent in self.extents[1:]:
            if (not isinstance(extent, SparseExtent)
                    or extent.geometry.grain_size != first.geometry.grain_size
                    or extent.compressed != first.compressed):
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
        data["extents"] = [extent.info() for extent in self.extents]
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
