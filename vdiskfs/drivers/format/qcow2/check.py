"""Rebuilding the refcounts of a dirty image (QEMU's ``qcow2_check_refcounts`` with repair, and
``rebuild_refcount_structure``, ``block/qcow2-refcount.c``).

An image with the dirty bit set -- opened with lazy refcounts and not closed cleanly -- may have
counts that lag behind its tables. Before writing to it, QEMU recomputes every count from what
references the clusters, and so does :func:`rebuild_refcounts`:

1. count the header cluster, the active L1 table, every L2 table and data cluster it reaches,
   the snapshot table and each snapshot's L1 tables and what they reach (compressed clusters
   count every host cluster their bytes touch);
2. write a new refcount table and blocks holding exactly those counts past the end of everything
   counted, sync, then point the header at the new table in one write and sync again (the old
   structures are then unreferenced: free space);
3. set the ``COPIED`` flags of the active tables to match (count == 1), as QEMU's
   ``check_oflag_copied`` repairs them.

A crash in the middle leaves the old table in place and the dirty bit set, so the next writable
open starts over. Nothing is read from the old refcount structures: they may be the damaged part.
"""

from __future__ import annotations

import struct
from array import array
from collections.abc import Awaitable, Callable
from dataclasses import replace

from vdiskfs.block.node import BlockNode
from vdiskfs.drivers.format.qcow2.header import QCOW_MAX_L1_SIZE, QCOW_MAX_REFTABLE_SIZE, Header
from vdiskfs.drivers.format.qcow2.mapping import (
    L1E_OFFSET_MASK,
    L2E_OFFSET_MASK,
    OFLAG_COMPRESSED,
    OFLAG_COPIED,
    Geometry,
    decode_table,
    encode_table,
)
from vdiskfs.drivers.format.qcow2.refcount_codec import RefcountCodec
from vdiskfs.drivers.format.qcow2.snapshots import Snapshot
from vdiskfs.errors import FormatError

__all__ = ["rebuild_refcounts"]

#: Header bytes 48..59: refcount_table_offset and refcount_table_clusters, written together.
_REFTABLE_FIELDS = struct.Struct(">QI")
_REFTABLE_FIELDS_OFFSET = 48
#: References may reach past the end of the file (an image truncated, or a crash before the
#: file grew), but not absurdly far: the counts are an array in memory.
_SLACK_CLUSTERS = 1 << 16
_MAX_CLUSTERS = 1 << 27

ReadMetadata = Callable[[int, int, str], Awaitable[bytes]]


class _Counts:
    """Reference counts per host cluster, growing as references are found (bounded)."""

    def __init__(self, cluster_bits: int, file_size: int, label: str) -> None:
        self.cluster_bits = cluster_bits
        self.label = label
        file_clusters = -(-file_size >> cluster_bits)
        self.limit = min(_MAX_CLUSTERS, max(2 * file_clusters, file_clusters + _SLACK_CLUSTERS))
        self.values = array("I", bytes(4 * file_clusters))

    def add(self, offset: int, length: int, what: str) -> None:
        first = offset >> self.cluster_bits
        last = (offset + length - 1) >> self.cluster_bits
        if last >= self.limit:
            raise FormatError(
                f"cannot rebuild refcounts: {what} at {offset:#x} lies far past the end of the "
                "file; repair the image with 'qemu-img check -r all'",
                path=self.label,
                field=what,
                offset=offset,
            )
        values = self.values
        if last >= len(values):
            values.extend([0] * (last + 1 - len(values)))
        for cluster in range(first, last + 1):
            values[cluster] += 1


async def rebuild_refcounts(
    *,
    file: BlockNode,
    header: Header,
    geometry: Geometry,
    l1: array[int],
    snapshots: list[Snapshot],
    read_metadata: ReadMetadata,
    label: str,
) -> Header:
    """Recount, write a new refcount structure, fix the active ``COPIED`` flags (updating
    ``l1`` in place). Returns the header pointing at the new table; the dirty bit is the
    caller's to clear once this returns."""
    cluster_bits = header.cluster_bits
    cluster_size = header.cluster_size
    counts = _Counts(cluster_bits, file.size, label)
    counts.add(0, cluster_size, "header")
    if header.l1_size:
        counts.add(header.l1_table_offset, header.l1_size * 8, "active L1 table")
    await _count_l1(l1, counts, geometry, header, read_metadata, label, "active L1 table")
    if snapshots:
        counts.add(header.snapshots_offset, snapshots[-1].entry_end, "snapshot table")
    for snapshot in snapshots:
        if snapshot.l1_size > QCOW_MAX_L1_SIZE // 8 or snapshot.l1_table_offset & (
                cluster_size - 1):
            raise FormatError(f"snapshot {snapshot.id}: bad L1 table", path=label,
                              field="snapshot L1 table", offset=snapshot.l1_table_offset)
        if not snapshot.l1_size:
            continue
        table = decode_table(await read_metadata(snapshot.l1_table_offset,
                                                 snapshot.l1_size * 8, "snapshot L1 table"))
        counts.add(snapshot.l1_table_offset, snapshot.l1_size * 8, "snapshot L1 table")
        await _count_l1(table, counts, geometry, header, read_metadata, label,
                        f"snapshot {snapshot.id} L1 table")

    table_offset, table_clusters = await _write_structure(file, header, counts, label)
    await file.flush()
    await file.pwrite(_REFTABLE_FIELDS_OFFSET, _REFTABLE_FIELDS.pack(table_offset,
                                                                    table_clusters))
    await file.flush()
    await _fix_copied(file, header, geometry, l1, counts.values, read_metadata)
    await file.flush()
    return replace(header, refcount_table_offset=table_offset,
                   refcount_table_clusters=table_clusters)


async def _count_l1(table: array[int], counts: _Counts, g: Geometry, header: Header,
                    read_metadata: ReadMetadata, label: str, what: str) -> None:
    cluster_size = header.cluster_size
    for index, l1_entry in enumerate(table):
        l2_offset = l1_entry & L1E_OFFSET_MASK
        if not l2_offset:
            continue
        if l2_offset & (cluster_size - 1):
            raise FormatError(f"L2 table offset {l2_offset:#x} is not cluster aligned",
                              path=label, field=f"{what} entry {index}")
        counts.add(l2_offset, cluster_size, "L2 table")
        l2 = decode_table(await read_metadata(l2_offset, cluster_size, "L2 table"))
        step = 2 if g.extended_l2 else 1
        for entry in l2[::step]:
            if entry & OFLAG_COMPRESSED:
                host, stored = g.compressed(entry)
                counts.add(host, stored, "compressed cluster")
                continue
            host = entry & L2E_OFFSET_MASK
            if not host or g.has_data_file:
                continue  # unallocated, zero, or data in the external data file
            if host & (cluster_size - 1):
                raise FormatError(f"data cluster offset {host:#x} is not cluster aligned",
                                  path=label, field="L2 entry", offset=l2_offset)
            counts.add(host, cluster_size, "data cluster")


async def _write_structure(file: BlockNode, header: Header, counts: _Counts,
                           label: str) -> tuple[int, int]:
    """Write refcount blocks and a table for ``counts`` (plus themselves) at the end."""
    codec = RefcountCodec(header.refcount_order, header.cluster_bits)
    cluster_size = header.cluster_size
    values = counts.values
    start = max(len(values), -(-file.size >> header.cluster_bits))
    table_clusters = blocks = 1
    while True:
        total = start + table_clusters + blocks
        need_blocks = -(-total // codec.entries_per_block)
        need_table = -(-need_blocks * 8 // cluster_size)
        if need_blocks <= blocks and need_table <= table_clusters:
            break
        blocks, table_clusters = max(blocks, need_blocks), max(table_clusters, need_table)
    if table_clusters * cluster_size > QCOW_MAX_REFTABLE_SIZE:
        raise FormatError("the image is too large for its refcount width", path=label,
                          field="refcount table")
    end = start + table_clusters + blocks
    if len(values) < end:
        values.extend([0] * (end - len(values)))
    for cluster in range(start, end):
        values[cluster] = 1
    over = next((i for i, v in enumerate(values) if v > codec.max_value), None)
    if over is not None:
        raise FormatError(
            f"cluster {over} has {values[over]} references, more than {codec.bits}-bit "
            "refcounts can hold",
            path=label,
            field="refcount_order",
        )
    table = array("Q", bytes(8 * (table_clusters * cluster_size // 8)))
    per_block = codec.entries_per_block
    block_start = start + table_clusters
    for index in range(blocks):
        block = codec.encode_block(values[index * per_block : (index + 1) * per_block])
        offset = (block_start + index) * cluster_size
        table[index] = offset
        await file.pwrite(offset, block)
    table_offset = start * cluster_size
    await file.pwrite(table_offset, encode_table(table))
    return table_offset, table_clusters


async def _fix_copied(file: BlockNode, header: Header, g: Geometry, l1: array[int],
                      values: array[int], read_metadata: ReadMetadata) -> None:
    cluster_bits = header.cluster_bits
    cluster_size = header.cluster_size
    step = 2 if g.extended_l2 else 1
    for index, l1_entry in enumerate(l1):
        l2_offset = l1_entry & L1E_OFFSET_MASK
        if not l2_offset:
            continue
        shared = values[l2_offset >> cluster_bits] != 1
        wanted = l1_entry & ~OFLAG_COPIED if shared else l1_entry | OFLAG_COPIED
        if wanted != l1_entry:
            l1[index] = wanted
            await file.pwrite(header.l1_table_offset + 8 * index,
                              wanted.to_bytes(8, "big"))
        if g.has_data_file:
            continue
        l2 = decode_table(await read_metadata(l2_offset, cluster_size, "L2 table"))
        changed = False
        for at in range(0, len(l2), step):
            entry = l2[at]
            host = entry & L2E_OFFSET_MASK
            if entry & OFLAG_COMPRESSED or not host:
                continue
            own = values[host >> cluster_bits] == 1
            fixed = entry | OFLAG_COPIED if own else entry & ~OFLAG_COPIED
            if fixed != entry:
                l2[at] = fixed
                changed = True
        if changed:
            await file.pwrite(l2_offset, encode_table(l2))
