"""Refcounts: the qcow2 cluster allocator's bookkeeping (QEMU's ``block/qcow2-refcount.c``).

Every host cluster of the image file has a reference count: how many L1 tables (the active one
and each snapshot's) reach it, or 1 for the header, the tables and the refcount structures
themselves. Counts live in refcount blocks (one cluster each) found through the refcount table;
an entry is ``refcount_bits`` wide, 1 to 64 bits (``refcount_order`` 0..6):

* 1, 2 and 4 bits: packed into bytes, least significant bits first (QEMU's
  ``get_refcount_ro0``..``ro2``);
* 8, 16, 32 and 64 bits: big-endian integers.

:class:`.refcount_codec.RefcountCodec` is the pure part (read, write and search entries in a
block's bytes). :class:`Refcounts` owns the table and allocates: a free cluster is one whose
count is 0 (a cluster beyond every refcount block is free); the search starts at a hint, QEMU's
``free_cluster_index``. New refcount blocks are allocated as QEMU's ``alloc_refcount_block``
does -- a block that falls in the range it covers counts itself -- and when the table is full a
larger one is built at the end of the image with the blocks it needs (``qcow2_refcount_area``);
it replaces the old one through the header when the owner writes the metadata back.

Nothing here writes to the image: blocks are changed in the owner's write-back cache and the
table in memory; :mod:`.writeback` decides when and in which order they reach the disk.
"""

from __future__ import annotations

from array import array
from collections.abc import Awaitable, Callable

from vdiskfs.drivers.format.qcow2.counters import Qcow2Counters
from vdiskfs.drivers.format.qcow2.header import QCOW_MAX_REFTABLE_SIZE
from vdiskfs.drivers.format.qcow2.metadata_cache import MetadataCache
from vdiskfs.drivers.format.qcow2.refcount_codec import RefcountCodec
from vdiskfs.errors import FormatError, NoSpaceError

__all__ = ["REFTABLE_OFFSET_MASK", "Refcounts"]

#: Bits 9..63 of a refcount table entry: the refcount block's offset (QEMU's REFT_OFFSET_MASK).
REFTABLE_OFFSET_MASK = 0xFFFFFFFFFFFFFE00
#: A refcount block allocation recurses only while the block it needs lies in a range without a
#: block of its own; QEMU notes "at most twice". A bound turns a hostile table into an error.
_MAX_BLOCK_RECURSION = 8


class Refcounts:
    """The refcount table and blocks of one image, and the cluster allocator on top of them.

    ``cache`` holds the blocks (raw bytes, loaded with ``load_block``); the caller must hold the
    owner's metadata lock around every method that changes anything, so that a search and the
    count it then sets are never interleaved with another allocation.
    """

    def __init__(
        self,
        *,
        codec: RefcountCodec,
        cluster_bits: int,
        table: array[int],
        table_offset: int,
        table_clusters: int,
        cache: MetadataCache[bytearray],
        load_block: Callable[[int], Awaitable[bytearray]],
        counters: Qcow2Counters,
        label: str,
        guard: Callable[[int, int], None] | None = None,
    ) -> None:
        self.codec = codec
        self.cluster_bits = cluster_bits
        self.cluster_size = 1 << cluster_bits
        #: The refcount table (decoded), possibly not yet where the header says (``relocated``).
        self.table = table
        #: Offsets of the refcount blocks the table points at (for the overlap check).
        self.block_offsets = {entry & REFTABLE_OFFSET_MASK for entry in table} - {0}
        self.table_offset = table_offset
        self.table_clusters = table_clusters
        #: Table indices changed since the table was last written.
        self.dirty_entries: set[int] = set()
        #: The table moved to ``table_offset`` (a larger one); the header must follow.
        self.relocated = False
        #: Table clusters that held a replaced refcount table, to free once the header points at
        #: the new one (the owner frees them after writing the header).
        self.retired_tables: list[tuple[int, int]] = []
        self.cache = cache
        self._load_block = load_block
        self._counters = counters
        self.label = label
        #: QEMU's free_cluster_index: no free cluster lies below it (a hint, only lowered by
        #: frees).
        self.free_cluster_index = 0
        self._recursion = 0
        #: Called with every range about to be allocated; raises if the range holds metadata
        #: (refcounts that say "free" about a cluster in use mean a corrupt image).
        self._guard = guard

    # -- lookups ----------------------------------------------------------------------------------

    def _block_offset(self, table_index: int) -> int:
        if table_index >= len(self.table):
            return 0
        offset = self.table[table_index] & REFTABLE_OFFSET_MASK
        if offset & (self.cluster_size - 1):
            raise FormatError(
                f"refcount block offset {offset:#x} is not cluster aligned",
                path=self.label,
                field=f"refcount table entry {table_index}",
            )
        return offset

    async def _block(self, offset: int) -> bytearray:
        return await self.cache.get(offset, self._load_block, write_back=True)

    async def get(self, cluster_index: int) -> int:
        """The refcount of host cluster ``cluster_index`` (0 where no block covers it)."""
        bits = self.codec.block_bits
        offset = self._block_offset(cluster_index >> bits)
        if not offset:
            return 0
        block = await self._block(offset)
        return self.codec.get(block, cluster_index & (self.codec.entries_per_block - 1))

    # -- changing counts --------------------------------------------------------------------------

    async def change(self, offset: int, length: int, addend: int) -> None:
        """Add ``addend`` to the count of every cluster that ``[offset, offset + length)``
        touches (QEMU's ``update_refcount``), allocating refcount blocks for increments.

        A count that would leave ``0..max`` is corruption (or a refcount width too narrow for
        the image's snapshots): :class:`FormatError`, with nothing changed for that cluster.
        """
        if length <= 0:
            return
        codec = self.codec
        mask = codec.entries_per_block - 1
        first = offset >> self.cluster_bits
        last = (offset + length - 1) >> self.cluster_bits
        cluster = first
        while cluster <= last:
            table_index = cluster >> codec.block_bits
            block_offset = self._block_offset(table_index)
            if not block_offset:
                if addend < 0:
                    raise self._range_error(cluster, 0, addend)
                block_offset = await self._allocate_block(table_index)
            block = await self._block(block_offset)
            # Every cluster of this request that the same block counts, without an await.
            stop = min(last + 1, (table_index + 1) << codec.block_bits)
            for index in range(cluster, stop):
                at = index & mask
                value = codec.get(block, at) + addend
                if not 0 <= value <= codec.max_value:
                    raise self._range_error(index, value - addend, addend)
                codec.set(block, at, value)
                if value == 0 and index < self.free_cluster_index:
                    self.free_cluster_index = index
            self.cache.mark_dirty(block_offset)
            cluster = stop

    def _range_error(self, cluster: int, value: int, addend: int) -> FormatError:
        return FormatError(
            f"refcount of cluster {cluster} ({cluster << self.cluster_bits:#x}) would go from "
            f"{value} to {value + addend} (refcount_bits {self.codec.bits})",
            path=self.label,
            field="refcount block",
            offset=cluster << self.cluster_bits,
        )

    # -- allocation -------------------------------------------------------------------------------

    async def find_free(self, count: int, start: int | None = None) -> int:
        """First run of ``count`` free clusters at or after ``start`` (default: the hint).

        Reserves nothing; :meth:`allocate` moves the hint past what it takes.
        """
        codec = self.codec
        mask = codec.entries_per_block - 1
        cluster = self.free_cluster_index if start is None else start
        while True:
            # The first free cluster at or after `cluster`.
            table_index = cluster >> codec.block_bits
            block_offset = self._block_offset(table_index)
            if block_offset:
                block = await self._block(block_offset)
                found = codec.find_free(block, cluster & mask, codec.entries_per_block)
                if found < 0:
                    cluster = (table_index + 1) << codec.block_bits
                    continue
                cluster = (table_index << codec.block_bits) | found
            # Is the run long enough?
            run_end = cluster
            while run_end - cluster < count:
                table_index = run_end >> codec.block_bits
                block_end = (table_index + 1) << codec.block_bits
                block_offset = self._block_offset(table_index)
                wanted = min(count - (run_end - cluster), block_end - run_end)
                if not block_offset:
                    run_end += wanted
                    continue
                block = await self._block(block_offset)
                free = codec.free_run(block, run_end & mask, wanted)
                run_end += free
                if free < wanted:
                    break
            if run_end - cluster >= count:
                return cluster
            cluster = run_end + 1

    async def allocate(self, count: int) -> int:
        """Allocate ``count`` contiguous clusters (count 1 each); returns the host offset."""
        start = await self.find_free(count)
        self._check_limit(start + count)
        if self._guard is not None:
            self._guard(start << self.cluster_bits, count << self.cluster_bits)
        self.free_cluster_index = start + count
        await self.change(start << self.cluster_bits, count << self.cluster_bits, 1)
        return start << self.cluster_bits

    def _check_limit(self, end_cluster: int) -> None:
        # Host offsets are 56 bits in L2 entries; refuse long before a table could not say it.
        if end_cluster << self.cluster_bits > 1 << 56:
            raise NoSpaceError("the image file reached the largest size qcow2 can address",
                               path=self.label)

    async def _allocate_block(self, table_index: int) -> int:
        """A new, empty refcount block for ``table_index`` (QEMU's alloc_refcount_block)."""
        codec = self.codec
        if table_index >= len(self.table):
            await self._grow_table(table_index + 1)
            offset = self._block_offset(table_index)
            if offset:
                return offset  # the new table came with a block for this index
        if self._recursion >= _MAX_BLOCK_RECURSION:
            raise FormatError("refcount block allocation does not converge", path=self.label,
                              field="refcount table")
        self._recursion += 1
        try:
            cluster = await self.find_free(1)
            self._check_limit(cluster + 1)
            if self._guard is not None:
                self._guard(cluster << self.cluster_bits, self.cluster_size)
            self.free_cluster_index = cluster + 1
            block = bytearray(self.cluster_size)
            if cluster >> codec.block_bits == table_index:
                # The block lies in the range it covers: it counts itself.
                codec.set(block, cluster & (codec.entries_per_block - 1), 1)
            else:
                # Counted by another block (which this may allocate in turn).
                await self.change(cluster << self.cluster_bits, self.cluster_size, 1)
        finally:
            self._recursion -= 1
        offset = cluster << self.cluster_bits
        if table_index >= len(self.table):  # the table grew during the recursion
            await self._grow_table(table_index + 1)
        existing = self._block_offset(table_index)
        if existing:
            # The recursion already made a block for this index; give this cluster back.
            await self.change(offset, self.cluster_size, -1)
            return existing
        await self.cache.insert(offset, block)
        self.table[table_index] = offset
        self.block_offsets.add(offset)
        self.dirty_entries.add(table_index)
        self._counters.refcount_blocks_allocated += 1
        return offset

    async def _grow_table(self, min_entries: int) -> None:
        """Replace the table by a larger one at the end of the image, with the refcount blocks
        that its own clusters need (QEMU's qcow2_refcount_area, simplified).

        The new table and blocks are counted in memory; the owner writes the blocks, then the
        table, then the header that points at it, syncing between the steps.
        """
        codec = self.codec
        per_cluster = self.cluster_size // 8
        old_len = len(self.table)
        new_len = max(min_entries, old_len + max(1, old_len // 2))
        new_blocks = 0
        while True:
            table_clusters = -(-new_len // per_cluster)
            if table_clusters * self.cluster_size > QCOW_MAX_REFTABLE_SIZE:
                raise NoSpaceError(
                    f"the refcount table would exceed {QCOW_MAX_REFTABLE_SIZE} bytes",
                    path=self.label,
                )
            entries = table_clusters * per_cluster
            start = await self.find_free(table_clusters + new_blocks)
            end = start + table_clusters + new_blocks
            self._check_limit(end)
            needed = [
                index
                for index in range(start >> codec.block_bits, ((end - 1) >> codec.block_bits) + 1)
                if not self._block_offset(index)
            ]
            if needed and needed[-1] >= entries:
                new_len = needed[-1] + 1
                continue
            if len(needed) <= new_blocks:
                break
            new_blocks = len(needed)
        if self._guard is not None:
            self._guard(start << self.cluster_bits, (end - start) << self.cluster_bits)
        table = array("Q", self.table)
        table.extend([0] * (entries - old_len))
        block_at = start + table_clusters
        fresh: dict[int, bytearray] = {}
        for index in needed:
            table[index] = (block_at + len(fresh)) << self.cluster_bits
            fresh[index] = bytearray(self.cluster_size)
        used = table_clusters + len(fresh)
        # Count the new table and blocks: in the new blocks directly, else in existing ones.
        mask = codec.entries_per_block - 1
        for cluster in range(start, start + used):
            index = cluster >> codec.block_bits
            if index in fresh:
                codec.set(fresh[index], cluster & mask, 1)
            else:
                await self.change(cluster << self.cluster_bits, self.cluster_size, 1)
        for index, block in fresh.items():
            self.block_offsets.add(table[index])
            await self.cache.insert(table[index], block)
            self._counters.refcount_blocks_allocated += 1
        self.retired_tables.append((self.table_offset, self.table_clusters))
        self.table = table
        self.table_offset = start << self.cluster_bits
        self.table_clusters = table_clusters
        self.relocated = True
        self.dirty_entries.clear()
        self.free_cluster_index = max(self.free_cluster_index, start + used)
        self._counters.refcount_table_growths += 1
