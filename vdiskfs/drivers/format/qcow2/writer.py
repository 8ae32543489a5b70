"""The write half of a qcow2 node: the data path, with copy on write, over the parts that QEMU
splits the same way (``block/qcow2.c``, ``qcow2-cluster.c``, ``qcow2-refcount.c``,
``qcow2-cache.c``), all sharing the node's :class:`~.state.Qcow2State`:

* :mod:`.writeback`: the lock, the order in which metadata reaches the disk (the crash-safety
  argument is there), queued frees and the requests that delay them;
* :mod:`.allocate`: L2 tables, host clusters, the link, allocations in flight;
* :mod:`.zero`: zero clusters and discard;
* :mod:`.refcount`: the refcount table and blocks.

**A write** maps each cluster it touches (:func:`.alloc.plan_cluster`). Clusters the image owns
are written in place, with no metadata change -- and, when their L2 slice is cached, without the
lock at all (:meth:`.state.Qcow2State.cached_host`, the read fast path's lookup). Otherwise,
under the lock, the allocator allocates host clusters (refcount +1 in the refcount block cache),
records the guest range as in flight, and releases the lock; the writer writes the data together
with what must be copied on write around it (read through the node's own read path: backing
file, zeros, the old or the compressed cluster); then, under the lock again, the allocator points
the L2 entries at the new clusters ("links" them) and queues the old clusters for freeing.
"""

from __future__ import annotations

from vdiskfs.block.node import Buffer
from vdiskfs.drivers.format.qcow2.alloc import subcluster_bits
from vdiskfs.drivers.format.qcow2.allocate import Allocation, Allocator, MetadataGuard
from vdiskfs.drivers.format.qcow2.mapping import decode_table, encode_table
from vdiskfs.drivers.format.qcow2.metadata_cache import MetadataCache
from vdiskfs.drivers.format.qcow2.refcount import Refcounts
from vdiskfs.drivers.format.qcow2.refcount_codec import RefcountCodec
from vdiskfs.drivers.format.qcow2.state import Qcow2State, ReadSide
from vdiskfs.drivers.format.qcow2.writeback import ChildWrites, RequestEpochs, WriteBack
from vdiskfs.drivers.format.qcow2.zero import Zeroing
from vdiskfs.errors import FormatError

__all__ = ["Qcow2Writer"]

#: Refcount blocks kept: QEMU's default refcount cache is a quarter of the L2 cache; at least 4.
_REFCOUNT_CACHE_BYTES = 4 * 1024 * 1024
_MIN_REFCOUNT_BLOCKS = 4
#: Writes of at most this much data are merged with their copy-on-write regions into one
#: buffer (one host write); larger ones are written beside them, saving the copy.
_MERGE_LIMIT = 64 * 1024


class Qcow2Writer:
    """Everything a writable :class:`~.driver.Qcow2Node` adds, built whole by :meth:`open`."""

    def __init__(self, state: Qcow2State, reads: ReadSide, refcounts: Refcounts,
                 io: ChildWrites, write_back: WriteBack, guard: MetadataGuard) -> None:
        self._state = state
        self._reads = reads
        self._io = io
        self._wb = write_back
        #: The refcount table and blocks.
        self.refcounts = refcounts
        #: Requests that use a mapping looked up without the lock (reads included).
        self.requests: RequestEpochs = write_back.requests
        self._zeros = bytes(state.geometry.cluster_size)
        self._alloc = Allocator(state, io, write_back, refcounts, guard, self._zeros)
        self._zeroing = Zeroing(state, reads, io, write_back, self._alloc, self.write,
                                self._zeros)

    @classmethod
    async def open(cls, state: Qcow2State, reads: ReadSide) -> Qcow2Writer:
        """Load the refcount table and make the state's L2 cache write-back. The image was
        prepared (:func:`.writeback.prepare`) before anything was cached."""
        header = state.header
        table = decode_table(await state.read_metadata(
            header.refcount_table_offset, header.refcount_table_clusters * header.cluster_size,
            "refcount table"))
        io = ChildWrites(state)
        cache: MetadataCache[bytearray] = MetadataCache(
            max(_MIN_REFCOUNT_BLOCKS, _REFCOUNT_CACHE_BYTES // header.cluster_size),
            state.counters.refcount_cache,
            store=io.store_metadata,
            encode=bytes,
            min_capacity=_MIN_REFCOUNT_BLOCKS,
        )

        async def load_block(offset: int) -> bytearray:
            if offset & (header.cluster_size - 1):
                raise FormatError(f"refcount block offset {offset:#x} is not cluster aligned",
                                  path=state.label, field="refcount table entry")
            return bytearray(await state.read_metadata(offset, header.cluster_size,
                                                       "refcount block"))

        guard = MetadataGuard(state)

        def check_not_metadata(offset: int, length: int) -> None:
            guard.check(refcounts, offset, length)

        refcounts = Refcounts(
            codec=RefcountCodec(header.refcount_order, header.cluster_bits),
            cluster_bits=header.cluster_bits,
            table=table,
            table_offset=header.refcount_table_offset,
            table_clusters=header.refcount_table_clusters,
            cache=cache,
            load_block=load_block,
            counters=state.counters,
            label=state.label,
            guard=check_not_metadata,
        )
        write_back = WriteBack(state, io, refcounts)
        state.l2_cache.enable_write_back(io.store_metadata, encode_table,
                                         write_back.before_l2_write_back)
        return cls(state, reads, refcounts, io, write_back, guard)

    # -- the node's verbs -------------------------------------------------------------------------

    async def flush(self) -> None:
        await self._wb.flush()

    async def close(self) -> None:
        """Write everything back, sync, and clear the dirty bit this session set."""
        await self._wb.close()

    async def zero(self, offset: int, length: int, *, may_unmap: bool) -> None:
        await self._zeroing.zero(offset, length, may_unmap=may_unmap)

    async def discard(self, offset: int, length: int) -> None:
        await self._zeroing.discard(offset, length)

    async def pwrite(self, offset: int, data: Buffer) -> None:
        """Write ``data``; whole (sub)clusters of zeros become zero clusters (unallocated ones
        on a v2 image without a backing file), and so does a part of one whose rest reads as
        zeros with nothing stored (see :meth:`zero`): QEMU's ``detect-zeroes=on``. Everything
        else takes the data path."""
        state = self._state
        g = state.geometry
        view = memoryview(data).cast("B") if not isinstance(data, bytes) else memoryview(data)
        if g.zero_flag or g.extended_l2 or self._reads.backing is None:
            unit = 1 << subcluster_bits(g)
            end = offset + len(view)
            first = -(-offset // unit) * unit
            last = end if end == state.size else end // unit * unit
            zeros = self._zeros
            if (len(view) <= len(zeros) and view[0] == 0 and view[-1] == 0
                    and zeros.startswith(view) and self._in_place_host(offset, len(view)) < 0):
                # Up to a cluster of zeros, not into a cluster written in place (a file system
                # zeroing a 4 KiB block): a zero request, which allocates nothing where the
                # (sub)clusters read as zeros anyway.
                state.counters.zero_writes_detected += 1
                await self.zero(offset, len(view), may_unmap=False)
                return
            if first < last and len(view) >= unit:
                pos = offset
                chunk = first
                while chunk < last:
                    n = min(unit, last - chunk)
                    piece = view[chunk - offset : chunk - offset + n]
                    if piece[0] == 0 and piece[-1] == 0 and zeros.startswith(piece):
                        run_end = chunk + n
                        while run_end < last:
                            n2 = min(unit, last - run_end)
                            more = view[run_end - offset : run_end - offset + n2]
                            if not (more[0] == 0 and zeros.startswith(more)):
                                break
                            run_end += n2
                        if pos < chunk:
                            await self.write(pos, view[pos - offset : chunk - offset])
                        state.counters.zero_writes_detected += 1
                        await self.zero(chunk, run_end - chunk, may_unmap=False)
                        pos = chunk = run_end
                        continue
                    chunk += n
                if pos < end:
                    await self.write(pos, view[pos - offset :])
                return
        await self.write(offset, view)

    async def write(self, offset: int, data: memoryview) -> None:
        """The data path: in place, or allocating with copy on write."""
        end = offset + len(data)
        pos = offset
        while pos < end:
            pos += await self._write_step(pos, data[pos - offset :])

    # -- the data path ----------------------------------------------------------------------------

    def _in_place_host(self, offset: int, length: int) -> int:
        """The host offset for a write that lies in one cluster the image owns, fully
        allocated, whose L2 slice is cached and which no allocation holds; else -1."""
        host = self._state.cached_host(offset, length, owned=True)
        if host >= 0 and self._alloc.inflight:
            cluster = offset & ~(self._state.geometry.cluster_size - 1)
            if self._alloc.inflight.overlaps(cluster, cluster + self._state.geometry.cluster_size):
                return -1
        return host

    async def _write_step(self, pos: int, data: memoryview) -> int:
        """Write a prefix of ``data`` at guest ``pos``; returns its length."""
        state = self._state
        g = state.geometry
        length = len(data)
        host = self._in_place_host(pos, length)
        if host >= 0:
            # The common case once a cluster exists: no lock, no metadata.
            token = self.requests.begin()
            try:
                await self._io.write_data(host, data)
            finally:
                self.requests.end(token)
            state.counters.in_place_writes += 1
            return length

        slice_span = 1 << (g.cluster_bits + g.slice_bits)
        length = min(length, slice_span - (pos & (slice_span - 1)))
        async with self._alloc.claim(pos, length) as allowed:
            plan = await self._alloc.plan(pos, allowed)
        if isinstance(plan, Allocation):
            await self._perform(plan, pos, data[: plan.length])
            return plan.length
        try:
            await self._io.write_data(plan.host, data[: plan.length])
        finally:
            self.requests.end(plan.token)
        state.counters.in_place_writes += 1
        return plan.length

    async def _perform(self, plan: Allocation, pos: int, data: memoryview) -> None:
        """Write the data and what is copied around it, then link the L2 entries."""
        try:
            await self._write_with_cow(plan, pos, data)
        except BaseException:
            await self._alloc.cancel(plan)
            raise
        await self._alloc.link(plan)

    async def _write_with_cow(self, plan: Allocation, pos: int, data: memoryview) -> None:
        state = self._state
        counters = state.counters
        guest, host = plan.guest, plan.host
        write_end = pos + len(data)
        head = await self._cow_source(plan.cow_from, pos - plan.cow_from, plan)
        tail = await self._cow_source(write_end, plan.cow_to - write_end, plan)
        if head is not None or tail is not None:
            counters.cow_operations += 1
            counters.cow_bytes += (pos - plan.cow_from) + (plan.cow_to - write_end)
        if len(data) <= _MERGE_LIMIT and (head is not None or tail is not None):
            start = plan.cow_from if head is not None else pos
            stop = plan.cow_to if tail is not None else write_end
            buffer = bytearray(stop - start)
            if head is not None:
                buffer[: len(head)] = head
            buffer[pos - start : write_end - start] = data
            if tail is not None:
                buffer[write_end - start :] = tail
            await self._io.write_data(host + start - guest, buffer)
        else:
            if head is not None:
                await self._io.write_data(host + plan.cow_from - guest, head)
            await self._io.write_data(host + pos - guest, data)
            if tail is not None:
                await self._io.write_data(host + write_end - guest, tail)
        if plan.fresh:
            # Zeros left unwritten read back only if the file covers the cluster(s).
            data_node = state.data
            alloc_end = host + plan.clusters * state.geometry.cluster_size
            if data_node.size < alloc_end:
                start = max(data_node.size, host)
                await self._io.zero_data(start, alloc_end - start)

    async def _cow_source(self, guest: int, length: int, plan: Allocation) -> Buffer | None:
        """What the guest saw at ``[guest, guest + length)`` before this write, or None when
        nothing needs writing there (empty, or zeros into a fresh cluster)."""
        if length <= 0:
            return None
        reads = self._reads
        # Unallocated with nothing below reads as zeros: known without mapping it again.
        zero = (plan.unallocated and reads.backing_length(guest, length) == 0) or (
            await reads.reads_as_zero(guest, length))
        if zero:
            if plan.fresh:
                return None
            return self._zeros[:length] if length <= len(self._zeros) else bytes(length)
        return await reads.read_mapped(guest, length)
