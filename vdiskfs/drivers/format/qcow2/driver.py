"""Format driver ``qcow2``: QEMU's copy-on-write image format.

``open`` reads the header, the snapshot table and the L1 table, opens the children -- ``file``
(the image), ``data-file`` (an external data file, when the image has one) and ``backing`` --
and builds one :class:`~.state.Qcow2State` (QEMU's ``BDRVQcow2State``) that the node and, opened
for writing, its :mod:`.writer` share. Pure work lives beside it: :mod:`.header` parses,
:mod:`.mapping` decodes L2 entries into runs, :mod:`.compression` decodes clusters. The node
does the reads and the accounting; it hands writes, zeroing, discards, flushes and close to the
writer.

A read maps the request into runs (:meth:`.state.Qcow2State.map_range`), merging neighbours of
one kind -- data runs only when contiguous on the host, so each becomes one child read -- and
the format layer's run executor (:func:`~vdiskfs.drivers.format.runs.read_runs`) serves them,
concurrently: data from the data file, zeros without I/O, the backing file (zeros past its end),
or a decompressed cluster (this node's ``read_compressed`` hook). A request inside one plain
data cluster whose L2 slice is cached skips all of that (``_pread`` fast path,
:meth:`.state.Qcow2State.cached_host`): a few integer operations, two dict operations, one
child read.
"""

from __future__ import annotations

from array import array
from dataclasses import replace
from functools import partial
from typing import Any

from vdiskfs.block.context import OpenContext
from vdiskfs.block.format import FormatNode, SnapshotEntry
from vdiskfs.block.node import BlockNode, BlockStatus, Buffer, opened
from vdiskfs.block.registry import register
from vdiskfs.drivers.format.qcow2.compression import DecompressionError, decompress_cluster
from vdiskfs.drivers.format.qcow2.counters import Qcow2Counters
from vdiskfs.drivers.format.qcow2.header import (
    MAGIC,
    QCOW_MAX_L1_SIZE,
    Header,
    header_probe_length,
)
from vdiskfs.drivers.format.qcow2.header_checks import check_table, parse_header
from vdiskfs.drivers.format.qcow2.l2cache import DEFAULT_SLICE_BYTES
from vdiskfs.drivers.format.qcow2.mapping import Geometry, decode_table
from vdiskfs.drivers.format.qcow2.snapshots import (
    MAX_TABLE_SIZE,
    NeedMoreData,
    Snapshot,
    find_snapshot,
    parse_snapshot_table,
    shown_text,
)
from vdiskfs.drivers.format.qcow2.state import Qcow2State
from vdiskfs.drivers.format.qcow2.writeback import prepare
from vdiskfs.drivers.format.qcow2.writer import Qcow2Writer
from vdiskfs.drivers.format.runs import Run, RunKind, read_runs, run_status
from vdiskfs.errors import FormatError

__all__ = ["Qcow2Counters", "Qcow2Node"]

#: Bytes read first when opening: the header and, for clusters up to 64 KiB, all extensions.
_FIRST_READ = 64 * 1024
#: A block-status call merges at most this many mapping runs (each at least a subcluster), so
#: one call on a huge fragmented image stays short; the caller simply asks again.
_STATUS_MERGE_RUNS = 1024


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
        self._view_of = view_of
        self._state: Qcow2State | None = None
        #: The write half, on a writable node only.
        self.writer: Qcow2Writer | None = None

    @property
    def state(self) -> Qcow2State:
        """The open image (header, geometry, L1 table, caches, data child), built whole by
        :meth:`open` and shared with the writer."""
        state = self._state
        if state is None:
            raise RuntimeError(f"qcow2 node {self.label!r} is not open")
        return state

    @property
    def header(self) -> Header:
        return self.state.header

    @property
    def snapshots(self) -> list[Snapshot]:
        return self.state.snapshots

    @property
    def snapshot(self) -> Snapshot | None:
        """The internal snapshot this node shows instead of the current state (read-only)."""
        return self.state.snapshot

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

        snapshots = await self._read_snapshots(header)
        snapshot = None
        if self.ctx.snapshot is not None:
            # The registry opens a snapshot read-only only, so no writer comes below.
            snapshot = find_snapshot(snapshots, self.ctx.snapshot, self.label)
            l1, l1_offset, size = await self._load_snapshot(header, geometry, snapshot)
        else:
            l1, l1_offset, size = array("Q"), header.l1_table_offset, header.virtual_size
            if header.l1_size:
                l1 = decode_table(await self.read_metadata(header.l1_table_offset,
                                                           header.l1_size * 8, "L1 table"))
        data = file
        if header.has_data_file and header.data_file is not None:
            # Always raw: a guest could write an image header into its own data.
            data = self.add_child("data-file", await self.ctx.open_child(
                header.data_file, role="data-file", field_name="data_file", format="raw",
                read_only=self.read_only,
            ))
        state = self._state = Qcow2State(
            label=self.label, file=file, data=data, header=header, geometry=geometry,
            snapshots=snapshots, snapshot=snapshot, l1=l1, l1_offset=l1_offset, size=size,
            counters=self.counters, read_metadata=self.read_metadata)
        self.size = size
        if not self.read_only:
            # Before anything is cached: a dirty image gets its refcounts rebuilt here.
            await prepare(state)
            self.writer = await Qcow2Writer.open(state, self)
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
        shared = image.state
        l1, l1_offset, size = await self._load_snapshot(shared.header, shared.geometry, snapshot)
        data = shared.data
        if data is not shared.file:
            data = self.add_child("data-file", data, owned=False)
        if image.backing is not None:
            self.backing = self.add_child("backing", image.backing, owned=False)
        self._state = Qcow2State(
            label=self.label, file=shared.file, data=data, header=shared.header,
            geometry=shared.geometry, snapshots=shared.snapshots, snapshot=snapshot, l1=l1,
            l1_offset=l1_offset, size=size, counters=self.counters,
            read_metadata=self.read_metadata)
        self.size = size

    async def _load_snapshot(self, header: Header, geometry: Geometry,
                             snapshot: Snapshot) -> tuple[array[int], int, int]:
        """``snapshot``'s L1 table, where it lies, and its disk size, as QEMU's
        ``qcow2_snapshot_load_tmp`` (which checks the table as ``qcow2_validate_table``)."""
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
        l1 = array("Q")
        if snapshot.l1_size:
            l1 = decode_table(await self.read_metadata(
                snapshot.l1_table_offset, snapshot.l1_size * 8, what))
        # QEMU keeps sizes in 512-byte sectors (see Header.virtual_size).
        return l1, snapshot.l1_table_offset, size & ~511

    def internal_snapshots(self) -> list[SnapshotEntry]:
        current = self.header.virtual_size
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

    async def _close(self) -> None:
        state = self._state
        try:
            if self.writer is not None:
                await self.writer.close()
        finally:
            if state is not None:
                state.l2_cache.invalidate()
                state.decompressed.clear()

    # -- information ------------------------------------------------------------------------------

    def info(self) -> dict[str, Any]:
        """Facts named as ``qemu-img info --output=json`` names them."""
        h = self.header
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
        # plain data. Everything else, including every error report, takes read_mapped. (_state
        # rather than the checked property: None only before open, where read_mapped raises.)
        state = self._state
        if state is not None:
            host = state.cached_host(offset, length)
            data = state.data
            if host >= 0 and host + length <= data.size:
                counters = self.counters
                counters.l2_cache.hits += 1
                counters.data_reads += 1
                counters.data_bytes += length
                writer = self.writer
                if writer is None:
                    return await data.pread(host, length)
                # The cluster may be freed by a concurrent write: keep it until this read is
                # done.
                requests = writer.requests
                token = requests.begin()
                try:
                    return await data.pread(host, length)
                finally:
                    requests.end(token)
        return await self.read_mapped(offset, length)

    async def read_mapped(self, offset: int, length: int) -> Buffer:
        """Read through the full mapping (the writer's copy on write reads this way too)."""
        state = self.state
        writer = self.writer
        if writer is None:
            return await read_runs(self, await state.map_range(offset, length), state.data)
        # Clusters this read maps may be freed by a concurrent write: keep them until it is done.
        token = writer.requests.begin()
        try:
            return await read_runs(self, await state.map_range(offset, length), state.data)
        finally:
            writer.requests.end(token)

    async def reads_as_zero(self, offset: int, length: int) -> bool:
        """Whether the guest range reads as zeros by its mapping alone (zero clusters,
        unallocated with no backing data below), without reading anything."""
        for run in await self.state.map_range(offset, length):
            if run.kind is RunKind.ZERO:
                continue
            if run.kind is RunKind.BACKING and self.backing_length(run.offset, run.length) == 0:
                continue
            return False
        return True

    async def read_compressed(self, run: Run) -> Buffer:
        """The executor's hook: the bytes of ``run`` from its decompressed cluster."""
        state = self.state
        cluster, hit = await state.decompressed.load(
            run.payload, partial(self._decompress, state, run.payload))
        if not hit:
            self.counters.compressed_clusters_read += 1
        start = run.offset & (state.geometry.cluster_size - 1)
        return memoryview(cluster)[start : start + run.length]

    async def _decompress(self, state: Qcow2State, entry: int) -> bytes:
        g, file = state.geometry, state.file
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
            return decompress_cluster(state.header.compression_type, bytes(raw), g.cluster_size)
        except DecompressionError as exc:
            raise FormatError(
                f"compressed cluster ({stored} bytes at {host:#x}): {exc}",
                path=self.label,
                field="compressed cluster",
                offset=host,
            ) from None

    # -- writing: the writer does it -------------------------------------------------------------

    def _writable(self) -> Qcow2Writer:
        """The writer; the base class refuses writes to a read-only node before they come
        here, so a missing one is a bug, named as such."""
        writer = self.writer
        if writer is None:
            raise RuntimeError(f"qcow2 node {self.label!r} was opened read-only")
        return writer

    async def _pwrite(self, offset: int, data: Buffer) -> None:
        await self._writable().pwrite(offset, data)

    async def _zero(self, offset: int, length: int, may_unmap: bool) -> None:
        await self._writable().zero(offset, length, may_unmap=may_unmap)

    async def _discard(self, offset: int, length: int) -> None:
        await self._writable().discard(offset, length)

    async def _flush(self) -> None:
        # The metadata, in order; the base class then syncs the children.
        await self._writable().flush()

    # -- block status -----------------------------------------------------------------------------

    async def _block_status(self, offset: int, length: int) -> tuple[BlockStatus, int]:
        next_run = self.state.next_run
        run = await next_run(offset, length)
        status, n = run_status(self, run)
        end = offset + length
        pos = offset + n
        merged = 0
        # Extend over following runs with the same status (a clipped run ends the extent).
        while n == run.length and pos < end and merged < _STATUS_MERGE_RUNS:
            run = await next_run(pos, end - pos)
            next_status, n = run_status(self, run)
            if next_status != status:
                break
            pos += n
            merged += 1
        return status, pos - offset
