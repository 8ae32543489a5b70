"""The state of one open qcow2 image, as QEMU's ``BDRVQcow2State``: built whole by the node's
``open`` and handed to both halves, the node (reads) and its writer.

It holds the header (as on disk: the writer replaces it when it changes a field), the geometry,
the L1 table that maps guest offsets (the active one, or a snapshot's), the L2 slice cache, the
cache of decompressed clusters, the data child (the image file, or its external data file) and
the constants of the read fast path. It also does the one thing both halves need of all of it:
mapping guest offsets to host clusters -- :meth:`Qcow2State.cached_host` for a request inside
one plain data cluster whose L2 slice is cached (the read fast path and in-place writes), and
:meth:`Qcow2State.next_run` / :meth:`Qcow2State.map_range` for everything else, as QEMU's
``qcow2_get_host_offset`` (the decoding itself is :meth:`.mapping.Geometry.next_run`).
"""

from __future__ import annotations

from array import array
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol

from vdiskfs.block.node import BlockNode, Buffer
from vdiskfs.drivers.format.qcow2.counters import Qcow2Counters
from vdiskfs.drivers.format.qcow2.header import Header
from vdiskfs.drivers.format.qcow2.l2cache import L2SliceCache
from vdiskfs.drivers.format.qcow2.mapping import (
    L1E_OFFSET_MASK,
    L2E_OFFSET_MASK,
    OFLAG_COMPRESSED,
    OFLAG_COPIED,
    OFLAG_ZERO,
    Geometry,
    decode_table,
)
from vdiskfs.drivers.format.qcow2.snapshots import Snapshot
from vdiskfs.drivers.format.runs import LruCache, Run, RunKind, coalesce
from vdiskfs.errors import FormatError

__all__ = ["Qcow2State", "ReadMetadata", "ReadSide"]

ReadMetadata = Callable[[int, int, str], Awaitable[bytes]]


class ReadSide(Protocol):
    """What the writer needs of its node's read side: copy on write reads through it."""

    @property
    def backing(self) -> BlockNode | None: ...

    def backing_length(self, offset: int, length: int) -> int: ...

    async def read_mapped(self, offset: int, length: int) -> Buffer: ...

    async def reads_as_zero(self, offset: int, length: int) -> bool: ...

#: Extended L2 bitmap of a cluster whose 32 subclusters are all allocated data (none zero).
_ALL_ALLOCATED = 0xFFFFFFFF
#: Decompressed clusters kept (by L2 entry), in bytes: small sequential reads of a compressed
#: cluster, and concurrent readers of one, decompress it once.
_DECOMPRESSED_CACHE_BYTES = 4 << 20


@dataclass(eq=False, slots=True)
class Qcow2State:
    """Everything an open image's readers and writer share (see the module docstring)."""

    #: Names the image in errors.
    label: str
    #: The image file, and where data clusters live (the image file or its data file).
    file: BlockNode
    data: BlockNode
    header: Header
    geometry: Geometry
    snapshots: list[Snapshot]
    #: The internal snapshot shown instead of the current state (read-only), or None.
    snapshot: Snapshot | None
    #: The L1 table in use (decoded) and where it lies in the file.
    l1: array[int]
    l1_offset: int
    #: The guest disk size this state maps.
    size: int
    counters: Qcow2Counters
    #: The node's checked metadata read (a structure past the end of the file is named).
    read_metadata: ReadMetadata
    l2_cache: L2SliceCache = field(init=False)
    #: Decompressed clusters by L2 entry.
    decompressed: LruCache[int, bytes] = field(init=False)
    # The fast path's constants, copied from the geometry into plain slots (no property
    # calls on the hot path).
    _slices: OrderedDict[int, array[int]] = field(init=False)
    _cluster_bits: int = field(init=False)
    _cluster_size: int = field(init=False)
    _cluster_mask: int = field(init=False)
    _l2_bits: int = field(init=False)
    _l2_index_mask: int = field(init=False)
    _slice_bits: int = field(init=False)
    _slice_mask: int = field(init=False)
    _slice_shift: int = field(init=False)
    _extended: bool = field(init=False)
    _has_data_file: bool = field(init=False)
    _not_plain: int = field(init=False)

    def __post_init__(self) -> None:
        g = self.geometry
        # As QEMU: room for every L2 entry of the disk, up to 32 MiB of them.
        clusters = -(-self.size >> g.cluster_bits)
        self.l2_cache = L2SliceCache(
            L2SliceCache.capacity_for(clusters * g.entry_size, g.slice_bytes),
            self.counters.l2_cache)
        self.decompressed = LruCache(max(1, _DECOMPRESSED_CACHE_BYTES // g.cluster_size))
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
        # which the full mapping reports.
        self._not_plain = OFLAG_COMPRESSED | (0 if g.extended_l2 else OFLAG_ZERO)

    # -- the fast mapping -------------------------------------------------------------------------

    def cached_host(self, offset: int, length: int, owned: bool = False) -> int:
        """The host offset of guest ``[offset, offset + length)`` when it lies inside one plain
        data cluster (every subcluster allocated) whose L2 slice is cached; else -1, and the
        caller takes the full mapping, which also reports every corruption.

        ``owned``: the cluster must also be the image's own, to be written in place without
        metadata changes -- its L2 table and its entry carry ``COPIED`` (with an external data
        file the entry's ``COPIED`` is not needed: every cluster sits at its guest offset).
        A few integer operations and two dict operations: the read fast path runs this for
        every request.
        """
        in_cluster = offset & self._cluster_mask
        if in_cluster + length > self._cluster_size:
            return -1
        cluster = offset >> self._cluster_bits
        l1_index = cluster >> self._l2_bits
        l1 = self.l1
        if l1_index >= len(l1):
            return -1
        l1_entry = l1[l1_index]
        l2_offset = l1_entry & L1E_OFFSET_MASK
        if not l2_offset or (owned and not l1_entry & OFLAG_COPIED):
            return -1
        index = cluster & self._l2_index_mask
        key = l2_offset + ((index >> self._slice_bits) << self._slice_shift)
        table = self._slices.get(key)
        if table is None:
            return -1
        if self._extended:
            at = (index & self._slice_mask) << 1
            entry = table[at] if table[at + 1] == _ALL_ALLOCATED else 0
        else:
            entry = table[index & self._slice_mask]
        host = entry & L2E_OFFSET_MASK
        if entry & self._not_plain or host & self._cluster_mask:
            return -1
        if self._has_data_file:
            # Host offset 0 is a data cluster there only with COPIED (else unallocated).
            if host != offset - in_cluster or not (host or entry & OFLAG_COPIED):
                return -1
        elif not host or (owned and not entry & OFLAG_COPIED):
            return -1
        self._slices.move_to_end(key)
        return host + in_cluster

    # -- the full mapping -------------------------------------------------------------------------

    async def next_run(self, offset: int, nbytes: int) -> Run:
        """One mapping run at ``offset``: find the L2 slice (cache or image), then ask the
        geometry."""
        g = self.geometry
        l1_index = offset >> g.l2_coverage_bits
        if l1_index >= len(self.l1):
            return g.unmapped_run(offset, nbytes)
        l2_offset = self.l1[l1_index] & L1E_OFFSET_MASK
        if not l2_offset:
            return g.unmapped_run(offset, nbytes)
        self.check_l2_offset(l2_offset, l1_index)
        table = await self.l2_cache.get(g.slice_offset(l2_offset, offset), self.load_slice)
        return g.next_run(table, offset, nbytes)

    async def map_range(self, offset: int, length: int) -> list[Run]:
        """The runs covering ``[offset, offset + length)``, neighbours of one kind merged (data
        only when contiguous on the host; compressed clusters never). Every data run is checked
        to lie inside the data file, so that a corrupt entry is named as such."""
        runs: list[Run] = []
        pos = offset
        end = offset + length
        while pos < end:
            run = await self.next_run(pos, end - pos)
            runs.append(run)
            pos += run.length
        runs = coalesce(runs) if len(runs) > 1 else runs
        data = self.data
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

    def check_l2_offset(self, l2_offset: int, l1_index: int) -> None:
        """Refuse an L1 entry whose L2 table offset is not cluster aligned."""
        if l2_offset & self._cluster_mask:
            raise FormatError(
                f"L2 table offset {l2_offset:#x} is not cluster aligned",
                path=self.label,
                field=f"L1 entry {l1_index}",
                offset=self.l1_offset + 8 * l1_index,
            )

    async def load_slice(self, host_offset: int) -> array[int]:
        """Read and decode the L2 slice at ``host_offset`` (the L2 cache's loader)."""
        return decode_table(
            await self.read_metadata(host_offset, self.geometry.slice_bytes, "L2 table"))
