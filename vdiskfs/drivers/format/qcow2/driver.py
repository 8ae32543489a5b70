"""Format driver ``qcow2``: QEMU's copy-on-write image format.

The node owns the parsed header, the active L1 table, an LRU cache of decoded L2 slices and its
children: ``file`` (the image), ``data-file`` (an external data file, when the image has one) and
``backing``. Pure work lives beside it: :mod:`.header` parses, :mod:`.mapping` turns guest offsets
into runs, :mod:`.compression` decodes clusters. The node does the I/O and the accounting; opened
for writing, it hands writes, zeroing, discards, flushes and close to its :mod:`.writer`.

A read maps the request into runs (``_map``), merging neighbours of one kind -- data runs only
when contiguous on the host, so each becomes one child read -- and the format layer's run
executor (:func:`~vdiskfs.drivers.format.runs.read_runs`) serves them, concurrently: data from
the data file, zeros without I/O, the backing file (zeros past its end), or a decompressed
cluster (this node's ``read_compressed`` hook). A request inside one plain data cluster whose L2
slice is cached skips all of that (``_pread`` fast path): a few integer operations, two dict
operations, one child read.
"""

from __future__ import annotations

from array import array
from collections import OrderedDict
from dataclasses import dataclass, replace
from functools import partial
from typing import Any

from vdiskfs.block.format import FormatNode, SnapshotEntry
from vdiskfs.block.node import BlockNode, BlockStatus, Buffer, opened
from vdiskfs.block.registry import OpenContext, register
from vdiskfs.drivers.format.qcow2.compression import DecompressionError, decompress_cluster
from vdiskfs.drivers.format.qcow2.header import (
    MAGIC,
    QCOW_MAX_L1_SIZE,
    Header,
    check_table,
    header_probe_length,
    parse_header,
)
from vdiskfs.drivers.format.qcow2.l2cache import DEFAULT_SLICE_BYTES, L2SliceCache
from vdiskfs.drivers.format.qcow2.mapping import (
    L1E_OFFSET_MASK,
    L2E_OFFSET_MASK,
    OFLAG_COMPRESSED,
    OFLAG_ZERO,
    Geometry,
    decode_table,
)
from vdiskfs.drivers.format.qcow2.snapshots import (
    MAX_TABLE_SIZE,
    NeedMoreData,
    Snapshot,
    find_snapshot,
    parse_snapshot_table,
    shown_text,
)
from vdiskfs.drivers.format.qcow2.writer import Qcow2Writer
from vdiskfs.drivers.format.runs import (
    LruCache,
    Run,
    RunCounters,
    RunKind,
    coalesce,
    read_runs,
    run_status,
)
from vdiskfs.errors import FormatError

__all__ = ["Qcow2Counters", "Qcow2Node"]

#: Bytes read first when opening: the header and, for clusters up to 64 KiB, all extensions.
_FIRST_READ = 64 * 1024
#: A block-status call merges at most this many mapping runs (each at least a subcluster), so
#: one call on a huge fragmented image stays short; the caller simply asks again.
_STATUS_MERGE_RUNS = 1024
#: Extended L2 bitmap of a cluster whose 32 subclusters are all allocated data.
_ALL_ALLOCATED = 0xFFFFFFFF

#: Decompressed clusters kept (by L2 entry), in bytes: small sequential reads of a compressed
#: cluster, and concurrent readers of one, decompress it once.
_DECOMPRESSED_CACHE_BYTES = 4 << 20


@dataclass(slots=True)
class Qcow2Counters(RunCounters):
    """The run counters (``data_reads``, ``backing_reads``, ``zero_bytes_read``...) and qcow2's."""

    #: L2 slice lookups served from the cache (a task that waited for another's load counts).
    l2_cache_hits: int = 0
    #: L2 slices read from the image.
    l2_cache_misses: int = 0
    #: Slices dropped to make room (the cache holds at most 32 MiB of L2 entries).
    l2_cache_evictions: int = 0
    #: Compressed clusters read and decompressed.
    compressed_clusters_read: int = 0
    # -- writing (all zero on a read-only node) --
    #: Write steps that went to clusters the image owns, without metadata changes.
    in_place_writes: int = 0
    #: Write steps that allocated clusters or changed their L2 entries (then linked them).
    allocating_writes: int = 0
    #: Host clusters allocated for guest data, and new L2 tables.
    clusters_allocated: int = 0
    l2_tables_allocated: int = 0
    #: Allocations that copied data on write, and the bytes copied (read from the backing
    #: file, an old or compressed cluster, or zeros written into a reused cluster).
    cow_operations: int = 0
    cow_bytes: int = 0
    #: Clusters or subclusters marked zero instead of written.
    zero_clusters_written: int = 0
    #: Writes whose whole (sub)clusters of zeros became zero clusters.
    zero_writes_detected: int = 0
    #: Clusters deallocated by discard; host clusters whose refcount was decremented.
    clusters_discarded: int = 0
    clusters_freed: int = 0
    #: Writers that waited for an allocation in flight on the same clusters.
    allocation_waits: int = 0
    #: Refcount blocks allocated, and refcount tables replaced by larger ones.
    refcount_blocks_allocated: int = 0
    refcount_table_growths: int = 0
    #: Metadata writes (L2 slices, refcount blocks and table, L1 entries) and the syncs that
    #: order them.
    metadata_writebacks: int = 0
    metadata_flushes: int = 0
    l2_cache_writebacks: int = 0
    refcount_cache_hits: int = 0
    refcount_cache_misses: int = 0
    refcount_cache_evictions: int = 0
    refcount_cache_writebacks: int = 0
    #: Dirty images whose refcounts were rebuilt when opened for writing.
    refcount_rebuilds: int = 0


@register
class Qcow2Node(FormatNode):
    """A qcow2 image (version 2 or 3)."""

    driver = "qcow2"
    supports_write = True
    supports_snapshots = True
    counters_class = Qcow2Counters
    counters: Qcow2Counters

    def __init__(self, file: BlockNode, ctx: OpenContext, *,
                 view_of: tuple[Qcow2Node, Snapshot] | None = None) -> None:
        # A view (open_snapshot) reads through the image node's children, which that node owns.
        super().__init__(file, ctx, owns_file=view_of is None)
        self.header: Header | None = None
        self.geometry: Geometry | None = None
        self.snapshots: list[Snapshot] = []
        #: The internal snapshot this node shows instead of the current state (read-only).
        self.snapshot: Snapshot | None = None
        self.l2_cache: L2SliceCache | None = None
        self._view_of = view_of
        # The L1 table that maps guest offsets: the active one, or the snapshot's. Everything
        # below it -- L2 slices, subclusters, compressed clusters -- is read the same way.
        self._l1: array[int] = array("Q")
        self._l1_offset = 0
        self._data: BlockNode = file
        # Decompressed clusters by L2 entry; sized at open by the cluster size.
        self._decompressed: LruCache[int, bytes] = LruCache(1)
        # Read fast path parameters, copied from the geometry by _init_fast_path. Until then a
        # zero cluster size sends every read to the mapped path.
        self._slices: OrderedDict[int, array[int]] = OrderedDict()
        self._cluster_bits = self._cluster_size = self._cluster_mask = 0
        self._l2_bits = self._l2_index_mask = 0
        self._slice_bits = self._slice_mask = self._slice_shift = 0
        self._extended = self._has_data_file = False
        self._not_plain = 0
        #: The write half, on a writable node only.
        self._writer: Qcow2Writer | None = None

    @classmethod
    def probe(cls, head: bytes, tail: bytes, filename: str) -> int:
        # As QEMU's qcow2_probe: any version >= 2 is ours, so that an unsupported version is
        # refused by name at open instead of silently showing up as a raw disk.
        if len(head) >= 8 and head[:4] == MAGIC and int.from_bytes(head[4:8], "big") >= 2:
            return 100
        return 0

    # -- open -------------------------------------------------------------------------------------

    async def open(self) -> None:
        if self._view_of is not None:
            await self._open_view(*self._view_of)
            return
        file = self.file
        head = await self.read_metadata(0, min(file.size, _FIRST_READ), "header")
        wanted = min(file.size, header_probe_length(head))
        if wanted > len(head):
            head = await self.read_metadata(0, wanted, "header")
        header = parse_header(head, file.size, self.label)
        geometry = Geometry.from_header(header, self.label, DEFAULT_SLICE_BYTES)
        self.header, self.geometry = header, geometry
        self.size = header.virtual_size

        self.snapshots = await self._read_snapshots(header)
        if self.ctx.snapshot is not None:
            # The registry opens a snapshot read-only only, so no writer comes below.
            await self._load_snapshot(find_snapshot(self.snapshots, self.ctx.snapshot,
                                                    self.label))
        elif header.l1_size:
            self._l1_offset = header.l1_table_offset
            self._l1 = decode_table(
                await self.read_metadata(header.l1_table_offset, header.l1_size * 8, "L1 table")
            )
        if not self.read_only:
            # Before any cache exists: a dirty image gets its refcounts rebuilt here.
            self._writer = Qcow2Writer(self)
            header = self.header = await self._writer.prepare(header)

        self._init_caches(geometry)
        if self._writer is not None:
            await self._writer.open()

        if header.has_data_file:
            assert header.data_file is not None
            # Always raw: a guest could write an image header into its own data.
            self._data = self.add_child("data-file", await self.ctx.open_child(
                header.data_file, role="data-file", field_name="data_file", format="raw",
                read_only=self.read_only,
            ))
        if header.backing_file is not None:
            await self.open_backing(header.backing_file, field="backing_file",
                                    format=header.backing_format,
                                    format_field="backing format extension")

    async def _open_view(self, image: Qcow2Node, snapshot: Snapshot) -> None:
        """Open as a read-only view of ``snapshot`` of ``image`` (an open node): its header,
        geometry and children, the snapshot's L1 table, caches of its own.

        Sharing the image's L2 cache would be safe too (slices are keyed by host offset, and
        the writer never changes a table that a snapshot shares: refcount > 1 copies it), but
        a cache of its own keeps a busy view from evicting the writer's slices. The header is
        the image's as opened: what a reader uses of it (cluster size, compression, extended
        L2) never changes while the image is open.
        """
        assert image.header is not None and image.geometry is not None
        self.header, self.geometry, self.snapshots = image.header, image.geometry, image.snapshots
        await self._load_snapshot(snapshot)
        self._init_caches(image.geometry)
        if image._data is not image.file:
            self._data = self.add_child("data-file", image._data, owned=False)
        if image.backing is not None:
            self.backing = self.add_child("backing", image.backing, owned=False)

    async def _load_snapshot(self, snapshot: Snapshot) -> None:
        """Map guest offsets through ``snapshot``'s L1 table, at its disk size, as QEMU's
        ``qcow2_snapshot_load_tmp`` (which checks the table as ``qcow2_validate_table``)."""
        header, geometry = self.header, self.geometry
        assert header is not None and geometry is not None
        what = f"L1 table of snapshot {shown_text(snapshot.id)}"
        check_table(self.label, "snapshot L1 table", snapshot.l1_table_offset,
                    snapshot.l1_size * 8, QCOW_MAX_L1_SIZE, header.cluster_size, self.file.size,
                    what)
        size = snapshot.virtual_size(header.virtual_size)
        # The largest disk any L1 table may map, as parse_header bounds the active size.
        max_size = (QCOW_MAX_L1_SIZE // 8) << geometry.l2_coverage_bits
        if size > max_size:
            raise FormatError(
                f"snapshot {shown_text(snapshot.id)} has a disk size of {size} bytes, more "
                f"than a qcow2 image with {header.cluster_size}-byte clusters can map",
                path=self.label, field="snapshot disk_size")
        self._l1 = array("Q")
        if snapshot.l1_size:
            self._l1 = decode_table(await self.read_metadata(
                snapshot.l1_table_offset, snapshot.l1_size * 8, what))
        self._l1_offset = snapshot.l1_table_offset
        # QEMU keeps sizes in 512-byte sectors (see Header.virtual_size).
        self.size = size & ~511
        self.snapshot = snapshot

    def _init_caches(self, geometry: Geometry) -> None:
        # As QEMU: room for every L2 entry of the disk, up to 32 MiB of them.
        clusters = -(-self.size >> geometry.cluster_bits)
        self.l2_cache = L2SliceCache(
            L2SliceCache.capacity_for(clusters * geometry.entry_size, geometry.slice_bytes),
            self.counters,
        )
        self._init_fast_path(geometry)
        self._decompressed = LruCache(max(1, _DECOMPRESSED_CACHE_BYTES // geometry.cluster_size))

    def internal_snapshots(self) -> list[SnapshotEntry]:
        current = self.header.virtual_size if self.header is not None else 0
        return [SnapshotEntry(s.id, s.name, s.virtual_size(current) & ~511)
                for s in self.snapshots]

    async def open_snapshot(self, snapshot: str | int) -> BlockNode:
        if isinstance(snapshot, int):
            found = self.snapshots[snapshot]
        else:
            found = find_snapshot(self.snapshots, snapshot, self.label)
        options = replace(self.ctx.options, read_only=True, snapshot=None)
        return await opened(Qcow2Node(self.file, replace(self.ctx, options=options,
                                                          snapshot=found.id),
                                      view_of=(self, found)))

    async def _read_snapshots(self, header: Header) -> list[Snapshot]:
        count = header.nb_snapshots
        if not count:
            return []
        offset = header.snapshots_offset
        # parse_header checked that the fixed part of every entry lies in the file.
        available = min(self.file.size - offset, MAX_TABLE_SIZE)
        wanted = min(available, count * 128)
        while True:
            data = await self.read_metadata(offset, wanted, "snapshot table")
            try:
                return parse_snapshot_table(data, count, offset, self.label)
            except NeedMoreData as more:
                if more.needed > available:
                    raise FormatError(
                        f"snapshot table of {count} entries runs past the end of the file",
                        path=self.label,
                        field="snapshot table",
                        offset=offset,
                    ) from None
                wanted = min(available, max(more.needed, 2 * wanted))

    def _init_fast_path(self, g: Geometry) -> None:
        """Copy what the read fast path needs into plain attributes (no property calls)."""
        assert self.l2_cache is not None
        self._slices = self.l2_cache.slices
        self._cluster_bits = g.cluster_bits
        self._cluster_size = g.cluster_size
        self._cluster_mask = g.cluster_size - 1
        self._l2_bits = g.l2_bits
        self._l2_index_mask = (1 << g.l2_bits) - 1
        self._slice_bits = g.slice_bits
        self._slice_mask = g.slice_entries - 1
        self._slice_shift = g.slice_bytes.bit_length() - 1
        self._extended = g.extended_l2
        self._has_data_file = g.has_data_file
        # A plain data cluster has neither of these bits; bit 0 in a v2 image is corruption,
        # which the slow path reports.
        self._not_plain = OFLAG_COMPRESSED | (0 if g.extended_l2 else OFLAG_ZERO)

    async def _close(self) -> None:
        try:
            if self._writer is not None and self.l2_cache is not None:
                await self._writer.close()
        finally:
            if self.l2_cache is not None:
                self.l2_cache.invalidate()
            self._decompressed.clear()

    # -- information ------------------------------------------------------------------------------

    def info(self) -> dict[str, Any]:
        """Facts named as ``qemu-img info --output=json`` names them."""
        h = self.header
        if h is None:
            return {}
        specific: dict[str, Any] = {
            "compat": "0.10" if h.version == 2 else "1.1",
            "compression-type": h.compression_name,
            "refcount-bits": h.refcount_bits,
        }
        if h.version >= 3:
            specific["lazy-refcounts"] = h.lazy_refcounts
            specific["corrupt"] = h.corrupt
            specific["extended-l2"] = h.extended_l2
            if h.has_data_file:
                specific["data-file"] = h.data_file
                specific["data-file-raw"] = h.data_file_raw
        out: dict[str, Any] = {
            "cluster-size": h.cluster_size,
            "dirty-flag": h.dirty,
            "format-specific": {"type": "qcow2", "data": specific},
        }
        if h.backing_file is not None:
            out["backing-filename"] = h.backing_file
            if self.backing is not None:
                out["full-backing-filename"] = self.backing.label
            if h.backing_format is not None:
                out["backing-filename-format"] = h.backing_format
        if self.snapshots:
            out["snapshots"] = [snapshot.info() for snapshot in self.snapshots]
        return out

    # -- reading ----------------------------------------------------------------------------------

    async def _pread(self, offset: int, length: int) -> Buffer:
        # Fast path: the request lies in one cluster, its L2 slice is cached and the cluster is
        # plain data. Everything else, including every error report, takes _pread_mapped.
        in_cluster = offset & self._cluster_mask
        if in_cluster + length <= self._cluster_size:
            cluster = offset >> self._cluster_bits
            l1_index = cluster >> self._l2_bits
            if l1_index < len(self._l1):
                l2_offset = self._l1[l1_index] & L1E_OFFSET_MASK
                index = cluster & self._l2_index_mask
                key = l2_offset + ((index >> self._slice_bits) << self._slice_shift)
                table = self._slices.get(key) if l2_offset else None
                if table is not None:
                    if self._extended:
                        at = (index & self._slice_mask) << 1
                        entry = table[at] if table[at + 1] == _ALL_ALLOCATED else 0
                    else:
                        entry = table[index & self._slice_mask]
                    host = entry & L2E_OFFSET_MASK
                    if (
                        host
                        and not entry & self._not_plain
                        and not host & self._cluster_mask
                        and (not self._has_data_file or host == offset - in_cluster)
                    ):
                        start = host + in_cluster
                        data = self._data
                        if start + length <= data.size:
                            self._slices.move_to_end(key)
                            counters = self.counters
                            counters.l2_cache_hits += 1
                            counters.data_reads += 1
                            counters.data_bytes += length
                            writer = self._writer
                            if writer is None:
                                return await data.pread(start, length)
                            # The cluster may be freed by a concurrent write: keep it until
                            # this read is done.
                            token = writer.io_begin()
                            try:
                                return await data.pread(start, length)
                            finally:
                                writer.io_end(token)
        return await self._pread_mapped(offset, length)

    async def _pread_mapped(self, offset: int, length: int) -> Buffer:
        writer = self._writer
        if writer is None:
            return await read_runs(self, await self._map(offset, length), self._data)
        # Clusters this read maps may be freed by a concurrent write: keep them until it is done.
        token = writer.io_begin()
        try:
            return await read_runs(self, await self._map(offset, length), self._data)
        finally:
            writer.io_end(token)

    async def _reads_as_zero(self, offset: int, length: int) -> bool:
        """Whether the guest range reads as zeros by its mapping alone (zero clusters,
        unallocated with no backing data below), without reading anything."""
        for run in await self._map(offset, length):
            if run.kind is RunKind.ZERO:
                continue
            if run.kind is RunKind.BACKING and self.backing_length(run.offset, run.length) == 0:
                continue
            return False
        return True

    async def _map(self, offset: int, length: int) -> list[Run]:
        """The runs covering ``[offset, offset + length)``, neighbours of one kind merged (data
        only when contiguous on the host; compressed clusters never). Every data run is checked
        to lie inside the data file, so that a corrupt entry is named as such."""
        runs: list[Run] = []
        pos = offset
        end = offset + length
        while pos < end:
            run = await self._next_run(pos, end - pos)
            runs.append(run)
            pos += run.length
        runs = coalesce(runs) if len(runs) > 1 else runs
        data = self._data
        for run in runs:
            if run.kind is RunKind.DATA and run.host_offset + run.length > data.size:
                raise FormatError(
                    f"data cluster ({run.length} bytes at {run.host_offset:#x}) lies past the "
                    f"end of the {'external data file' if data is not self.file else 'file'} "
                    f"(size {data.size})",
                    path=self.label,
                    field="L2 entry",
                    offset=run.host_offset,
                )
        return runs

    async def _next_run(self, offset: int, nbytes: int) -> Run:
        """One mapping run at ``offset``: find the L2 slice (cache or image), then ask the
        geometry."""
        g = self.geometry
        assert g is not None and self.l2_cache is not None and self.header is not None
        l1_index = offset >> g.l2_coverage_bits
        if l1_index >= len(self._l1):
            return g.unmapped_run(offset, nbytes)
        l2_offset = self._l1[l1_index] & L1E_OFFSET_MASK
        if not l2_offset:
            return g.unmapped_run(offset, nbytes)
        if l2_offset & self._cluster_mask:
            raise FormatError(
                f"L2 table offset {l2_offset:#x} is not cluster aligned",
                path=self.label,
                field=f"L1 entry {l1_index}",
                offset=self._l1_offset + 8 * l1_index,
            )
        table = await self.l2_cache.get(g.slice_offset(l2_offset, offset), self._load_slice)
        return g.next_run(table, offset, nbytes)

    async def _load_slice(self, host_offset: int) -> array[int]:
        assert self.geometry is not None
        return decode_table(
            await self.read_metadata(host_offset, self.geometry.slice_bytes, "L2 table")
        )

    async def read_compressed(self, run: Run) -> Buffer:
        """The executor's hook: the bytes of ``run`` from its decompressed cluster."""
        cluster, hit = await self._decompressed.load(
            run.payload, partial(self._decompress, run.payload))
        if not hit:
            self.counters.compressed_clusters_read += 1
        start = run.offset & self._cluster_mask
        return memoryview(cluster)[start : start + run.length]

    async def _decompress(self, entry: int) -> bytes:
        g, header, file = self.geometry, self.header, self.file
        assert g is not None and header is not None
        host, stored = g.compressed(entry)
        if host >= file.size:
            raise FormatError(
                f"compressed cluster at {host:#x} lies past the end of the file "
                f"(size {file.size})",
                path=self.label,
                field="L2 entry",
                offset=host,
            )
        # The descriptor counts whole sectors, which may run past the end of the file; QEMU
        # reads that tail as zeros, i.e. the stream ends before it. Read what exists.
        stored = min(stored, file.size - host)
        raw = await file.pread(host, stored)
        try:
            return decompress_cluster(header.compression_type, bytes(raw), g.cluster_size)
        except DecompressionError as exc:
            raise FormatError(
                f"compressed cluster ({stored} bytes at {host:#x}): {exc}",
                path=self.label,
                field="compressed cluster",
                offset=host,
            ) from None

    # -- writing: the writer does it -------------------------------------------------------------

    async def _pwrite(self, offset: int, data: Buffer) -> None:
        assert self._writer is not None
        await self._writer.pwrite(offset, data)

    async def _zero(self, offset: int, length: int, may_unmap: bool) -> None:
        assert self._writer is not None
        await self._writer.zero(offset, length, may_unmap=may_unmap)

    async def _discard(self, offset: int, length: int) -> None:
        assert self._writer is not None
        await self._writer.discard(offset, length)

    async def _flush(self) -> None:
        # The metadata, in order; the base class then syncs the children.
        assert self._writer is not None
        await self._writer.flush()

    # -- block status -----------------------------------------------------------------------------

    async def _block_status(self, offset: int, length: int) -> tuple[BlockStatus, int]:
        run = await self._next_run(offset, length)
        status, n = run_status(self, run)
        end = offset + length
        pos = offset + n
        merged = 0
        # Extend over following runs with the same status (a clipped run ends the extent).
        while n == run.length and pos < end and merged < _STATUS_MERGE_RUNS:
            run = await self._next_run(pos, end - pos)
            next_status, n = run_status(self, run)
            if next_status != status:
                break
            pos += n
            merged += 1
        return status, pos - offset
