"""Filter ``cache``: a read cache under the format node of a remote image (http, nbd).

Every request to a remote child costs a round trip, and format drivers read in small pieces
(a qcow2 L2 table, a cluster, a FUSE request of 128 KiB). This filter keeps aligned blocks of
the child (:data:`BLOCK_SIZE`) in an LRU bounded in bytes (:data:`MAX_BYTES`), as QEMU's
``block/curl.c`` keeps a few read buffers and nbdkit's ``filters/cache`` keeps blocks:

- **single flight**: a block is fetched once however many readers want it; the readers of a
  block being fetched wait on its :class:`trio.Event`;
- **coalescing and concurrency**: the adjacent missing blocks of one read are fetched in one
  child read of up to :data:`MAX_RUN_BLOCKS` blocks, and the runs of one read all at once;
- **readahead**: a read that starts where the previous one ended is sequential; it prefetches
  the next ``readahead_blocks`` blocks in the background;
- **writes** (nbd) pass through and drop the blocks they cover, before and after the child's
  write, so that no fetch that overlapped the write can put stale bytes back; ``zero`` and
  ``discard`` do the same; ``block_status`` passes through.

With ``cache_dir`` (``--cache-dir``), blocks also go to a sparse file there
(:mod:`vdiskfs.drivers.filter.cache_file`) when the child names its content
(:meth:`~vdiskfs.block.node.BlockNode.content_key`: an http(s) file with an ETag or
Last-Modified), and a later open of the same content reads them from there instead of the
server.

Fetches belong to the node, not to the reader that asked first. A reader fetches the last run
of its misses itself (no task to spawn for a random miss: that cost a spawn and a scheduler
pass); readahead, its other runs and disk reads run in a nursery that the node owns (hosted by
a trio system task from :meth:`CacheNode.open` until :meth:`aclose`). A reader cancelled while
it fetches hands its run to that nursery, so the blocks still arrive for any other reader
waiting for them. A failed fetch is raised to every reader of it and caches nothing.

Counters (the node's ``stats/<n>-cache`` file): ``hits``, ``misses`` and ``waits`` (blocks
found cached, fetched, or joined while another reader's fetch was in flight), ``bytes_fetched``,
``readahead_bytes``, ``readahead_wasted_bytes`` (prefetched, then evicted or dropped unread),
``evictions`` and ``cached_bytes``; with a cache directory ``disk_hits`` (blocks read from it)
and ``disk_bytes_written``.
"""

from __future__ import annotations

import errno
import logging
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import trio

from vdiskfs.block.node import BlockNode, Buffer, FilterNode
from vdiskfs.block.stats import Counters
from vdiskfs.drivers.filter.cache_file import BlockFile
from vdiskfs.errors import HostIOError

__all__ = ["BLOCK_SIZE", "MAX_BYTES", "CacheCounters", "CacheNode"]

log = logging.getLogger(__name__)

#: Bytes of one cached block, and so of the fetch of a random miss: a qcow2 cluster (QEMU's
#: default), so that a format reading a cluster or a table costs one block. Sequential reads
#: still go in long runs (readahead). With 256 KiB, a random 4 KiB read over loopback
#: (``scripts/bench/remote.py``) waited for 256 KiB from the server: about 1 ms more per miss
#: from qemu-nbd on the 2-core machine, which fetches 4 KiB.
BLOCK_SIZE = 64 * 1024
#: Default bound of the cached blocks, in bytes.
MAX_BYTES = 64 * 1024 * 1024
#: Blocks prefetched ahead of a sequential reader (2 MiB). Measured by
#: ``scripts/bench/cache.py`` (a server answering after 10 ms, a 2-core machine): 8 MiB read in
#: 128 KiB requests takes 0.75 s and 65 requests without the cache, 0.09 s and 27 with it
#: (256 KiB blocks, 8 of them ahead, runs of 4: the same bytes as now).
READAHEAD_BLOCKS = 32
#: Most blocks in one child read (1 MiB): longer runs are split so that their parts go out at
#: once (an http pool and an nbd connection both serve several requests in flight).
MAX_RUN_BLOCKS = 16
#: Seconds that closing waits for the fetches in flight to end once cancelled.
CLOSE_TIMEOUT = 5.0


@dataclass(slots=True)
class CacheCounters(Counters):
    hits: int = 0
    misses: int = 0
    waits: int = 0
    bytes_fetched: int = 0
    readahead_bytes: int = 0
    readahead_wasted_bytes: int = 0
    evictions: int = 0
    cached_bytes: int = 0
    #: ``--cache-dir``: blocks read from the cache file, bytes written to it.
    disk_hits: int = 0
    disk_bytes_written: int = 0


class _Load:
    """One block being fetched: its waiters wait on ``done``, then read ``data`` or ``error``."""

    __slots__ = ("data", "done", "error", "index", "readahead", "stale", "used")

    def __init__(self, index: int, readahead: bool) -> None:
        self.index = index
        self.done = trio.Event()
        self.data: Buffer | None = None
        self.error: BaseException | None = None
        #: A write covered the block while it was fetched: its bytes must not be cached.
        self.stale = False
        self.readahead = readahead
        #: A reader asked for the block (a prefetch that was not wasted).
        self.used = not readahead


class CacheNode(FilterNode):
    """A read cache over ``child``; see the module's docstring."""

    driver = "cache"
    counters_class = CacheCounters
    counters: CacheCounters

    def __init__(
        self,
        child: BlockNode,
        *,
        block_size: int = BLOCK_SIZE,
        max_bytes: int = MAX_BYTES,
        readahead_blocks: int = READAHEAD_BLOCKS,
        cache_dir: str | None = None,
    ) -> None:
        super().__init__(child)
        if block_size <= 0 or max_bytes < block_size or readahead_blocks < 0:
            raise ValueError("cache: block_size > 0, max_bytes >= block_size, "
                             "readahead_blocks >= 0")
        self.block_size = block_size
        self.max_bytes = max_bytes
        # Never prefetch more than a quarter of the cache: it would evict what it fetched.
        self.readahead_blocks = min(readahead_blocks, max_bytes // block_size // 4)
        self._blocks: OrderedDict[int, Buffer] = OrderedDict()
        self._loading: dict[int, _Load] = {}
        #: Blocks prefetched and not read yet (evicted so: wasted readahead).
        self._prefetched: set[int] = set()
        self._readahead_in_flight = 0
        #: ``(first, end)`` block ranges of the writes, zeroes and discards in flight.
        self._changing: list[tuple[int, int]] = []
        #: Where the last read ended: a read starting there is sequential.
        self._next_offset = -1
        self._nursery: trio.Nursery | None = None
        #: ``--cache-dir``: where the on-disk tier goes, and the tier once open.
        self.cache_dir = cache_dir
        self._disk: BlockFile | None = None
        self._scope = trio.CancelScope()
        self._stopped = trio.Event()
        #: The cancel scopes of the fetches that readers make themselves (see _fetch).
        self._inline_fetches: set[trio.CancelScope] = set()

    # -- life cycle ------------------------------------------------------------------------------

    async def open(self) -> None:
        await super().open()
        cache_dir = self.cache_dir
        key = self.file.content_key() if cache_dir is not None else None
        if cache_dir is not None and key is not None and self.file.read_only:
            try:
                self._disk = await BlockFile.open(cache_dir, key, self.size, self.block_size)
            except OSError as exc:
                self.warnings.append(f"{self.label}: no on-disk cache in {self.cache_dir}: "
                                     f"{exc.strerror or exc}")
        elif self.cache_dir is not None:
            log.info("%s: no on-disk cache (no validator pins the content, or writable)",
                     self.label)
        ready = trio.Event()
        # The fetches outlive the reader that started them, so they need a nursery of their
        # own that lives as long as the node: a system task hosts it (trio has no other way to
        # hold a nursery open between calls).
        trio.lowlevel.spawn_system_task(self._host, ready, name=f"cache {self.label}")
        await ready.wait()

    async def _host(self, ready: trio.Event) -> None:
        try:
            with self._scope:
                async with trio.open_nursery() as nursery:
                    self._nursery = nursery
                    ready.set()
                    await trio.sleep_forever()
        except Exception:  # a system task must not raise: that would crash the whole run
            log.exception("%s: the cache's fetch tasks failed", self.label)
        finally:
            self._nursery = None
            ready.set()
            self._stopped.set()

    async def _close(self) -> None:
        # Cancelled even when the host task has not started yet (an open that was cancelled
        # while waiting for it): it then enters a cancelled scope and ends at once.
        self._scope.cancel()
        for fetch in self._inline_fetches:
            fetch.cancel()
        # Shielded: a cancelled closer still waits for the fetches to end before the base
        # class closes the child under them.
        with trio.move_on_after(CLOSE_TIMEOUT) as wait:
            wait.shield = True
            if self._nursery is not None:
                await self._stopped.wait()
            # Only when no task is left (the host ended, or never started any): no thread may
            # write to a closed descriptor.
            if self._disk is not None and self._nursery is None:
                try:
                    await self._disk.close()
                except OSError as exc:
                    log.warning("%s: the on-disk cache was not saved: %s", self.label, exc)
        self._drop_all()

    def info(self) -> dict[str, Any]:
        return {"block_size": self.block_size, "max_bytes": self.max_bytes,
                "readahead_blocks": self.readahead_blocks,
                "on_disk": self._disk is not None}

    # -- reads -------------------------------------------------------------------------------------

    async def _pread(self, offset: int, length: int) -> Buffer:
        bs = self.block_size
        first = offset // bs
        last = (offset + length - 1) // bs
        counters = self.counters
        parts: list[Buffer | _Load] = []
        runs: list[list[_Load]] = []
        run: list[_Load] = []
        for index in range(first, last + 1):
            data = self._blocks.get(index)
            if data is not None:
                self._blocks.move_to_end(index)
                self._prefetched.discard(index)
                counters.hits += 1
                parts.append(data)
                continue
            load = self._loading.get(index)
            if load is not None:
                counters.waits += 1
                load.used = True
                parts.append(load)
                continue
            counters.misses += 1
            load = self._start_load(index, readahead=False)
            parts.append(load)
            if run and (run[-1].index != index - 1 or len(run) == MAX_RUN_BLOCKS):
                runs.append(run)
                run = []
            run.append(load)
        if run:
            runs.append(run)
        # The last run is fetched by this reader itself, the others (and a disk tier's reads)
        # by tasks of the node: a task per random miss cost a spawn and a scheduler pass.
        inline = runs.pop() if runs and self._disk is None and self._nursery is not None \
            else None
        for other in runs:
            self._fetch_soon(other)
        if offset == self._next_offset:
            self._read_ahead(last + 1)
        self._next_offset = offset + length

        if inline is not None:
            await self._fetch(inline, inline=True)
        for part in parts:
            if isinstance(part, _Load) and not part.done.is_set():
                await part.done.wait()
        if first == last:
            return self._piece(parts[0], first)[offset - first * bs : offset - first * bs + length]
        out = bytearray(length)
        pos = 0
        for index, part in zip(range(first, last + 1), parts, strict=True):
            block = self._piece(part, index)
            lo = max(offset - index * bs, 0)
            hi = min(offset + length - index * bs, len(block))
            out[pos : pos + hi - lo] = block[lo:hi]
            pos += hi - lo
        return out

    def _piece(self, part: Buffer | _Load, index: int) -> Buffer:
        if not isinstance(part, _Load):
            return part
        if part.error is not None:
            raise part.error
        assert part.data is not None
        return part.data

    def _start_load(self, index: int, *, readahead: bool) -> _Load:
        load = _Load(index, readahead)
        self._loading[index] = load
        return load

    def _fetch_soon(self, run: list[_Load]) -> None:
        nursery = self._nursery
        if nursery is None:
            error = HostIOError("the cache is closed", path=self.label, errno=errno.EBADF)
            for load in run:
                self._finish(load, error=error)
            return
        disk = self._disk
        if disk is None:
            nursery.start_soon(self._fetch, run)
            return
        # Blocks on disk are read from there, one by one; the others still go in runs.
        missing: list[_Load] = []
        for load in run:
            if disk.has(load.index):
                nursery.start_soon(self._read_disk, disk, load)
                continue
            if missing and missing[-1].index != load.index - 1:
                nursery.start_soon(self._fetch, missing)
                missing = []
            missing.append(load)
        if missing:
            nursery.start_soon(self._fetch, missing)

    async def _read_disk(self, disk: BlockFile, load: _Load) -> None:
        try:
            data = await disk.read(load.index)
        except OSError as exc:
            log.warning("%s: block %d of the on-disk cache unreadable (%s): fetched again",
                        self.label, load.index, exc)
            await self._fetch([load])
            return
        except BaseException:
            self._finish(load, error=HostIOError("the cache was closed during the read",
                                                 path=self.label, errno=errno.EBADF))
            raise
        self.counters.disk_hits += 1
        self._finish(load, data=data)

    async def _write_disk(self, disk: BlockFile, index: int, data: Buffer) -> None:
        try:
            # Shielded: a block fetched before the node closes is still kept (closing waits).
            with trio.CancelScope(shield=True):
                await disk.write(index, data)
        except OSError as exc:
            log.warning("%s: cannot store block %d in the on-disk cache: %s", self.label,
                        index, exc)
            return
        self.counters.disk_bytes_written += len(data)

    def _read_ahead(self, start: int) -> None:
        """Prefetch the blocks of the ``readahead_blocks`` from ``start`` that are neither
        cached nor being fetched, in runs, within the bound of prefetched blocks in flight --
        once at least half of that window is missing, so that a reader advancing a block or
        two at a time starts long runs rather than one short one per read."""
        stop = min(start + self.readahead_blocks, -(-self.size // self.block_size))
        missing = [i for i in range(start, stop)
                   if i not in self._blocks and i not in self._loading]
        if not missing or len(missing) * 2 < stop - start:
            return
        missing = missing[: max(self.readahead_blocks - self._readahead_in_flight, 0)]
        run: list[_Load] = []
        for index in missing:
            if run and (run[-1].index != index - 1 or len(run) == MAX_RUN_BLOCKS):
                self._fetch_soon(run)
                run = []
            run.append(self._start_load(index, readahead=True))
            self._readahead_in_flight += 1
        if run:
            self._fetch_soon(run)

    async def _fetch(self, run: list[_Load], *, inline: bool = False) -> None:
        """One child read for the consecutive blocks of ``run``: in the node's nursery, or
        ``inline`` in the reader that wants them. A cancelled inline reader hands the run to
        the nursery (another reader may be waiting for its blocks), which fetches it again."""
        bs = self.block_size
        start = run[0].index * bs
        end = min((run[-1].index + 1) * bs, self.size)
        # What the waiters get unless the read succeeds: a cancellation is the node closing.
        error: BaseException = HostIOError("the cache was closed during the read",
                                           path=self.label, offset=start, errno=errno.EBADF)
        data: Buffer | None = None
        # An inline fetch is cancelled by the node's closing too, as the nursery's fetches are.
        closing = trio.CancelScope()
        if inline:
            self._inline_fetches.add(closing)
        try:
            with closing:
                data = await self.file.pread(start, end - start)
        except Exception as exc:
            error = exc
        except trio.Cancelled:
            if inline:
                self._fetch_soon(run)
                run = []
            raise
        finally:
            self._inline_fetches.discard(closing)
            if data is not None:
                self.counters.bytes_fetched += len(data)
                view = memoryview(data)
                disk, nursery = self._disk, self._nursery
                for i, load in enumerate(run):
                    # A run of one block is cached as the child returned it (no 256 KiB
                    # copy per random miss); the blocks of a longer run are copied out, so
                    # that one cached block never keeps its whole run alive past the bound.
                    block = data if len(run) == 1 else bytes(view[i * bs : (i + 1) * bs])
                    self._finish(load, data=block)
                    if disk is not None and nursery is not None and not disk.has(load.index):
                        nursery.start_soon(self._write_disk, disk, load.index, block)
            else:
                for load in run:
                    self._finish(load, error=error)

    def _finish(self, load: _Load, *, data: Buffer | None = None,
                error: BaseException | None = None) -> None:
        """Hand the block to its waiters, and cache it unless a write overlapped its fetch."""
        load.data, load.error = data, error
        index = load.index
        if self._loading.get(index) is load:
            del self._loading[index]
        if load.readahead:
            self._readahead_in_flight -= 1
            if data is not None:
                self.counters.readahead_bytes += len(data)
        if data is not None and not load.stale and not self._is_changing(index):
            self._insert(index, data, prefetched=not load.used)
        load.done.set()

    def _insert(self, index: int, data: Buffer, *, prefetched: bool) -> None:
        counters = self.counters
        old = self._blocks.pop(index, None)
        if old is not None:
            counters.cached_bytes -= len(old)
        self._blocks[index] = data
        counters.cached_bytes += len(data)
        if prefetched:
            self._prefetched.add(index)
        while counters.cached_bytes > self.max_bytes:
            victim, block = self._blocks.popitem(last=False)
            counters.cached_bytes -= len(block)
            counters.evictions += 1
            if victim in self._prefetched:
                self._prefetched.discard(victim)
                counters.readahead_wasted_bytes += len(block)

    # -- changes -----------------------------------------------------------------------------------

    def _is_changing(self, index: int) -> bool:
        return any(first <= index < end for first, end in self._changing)

    def _invalidate(self, first: int, end: int) -> None:
        """Drop the cached blocks of ``[first, end)``, and forget the fetches of them in flight
        (their waiters still get their bytes; a later reader fetches anew)."""
        if end - first <= len(self._blocks):
            cached = [i for i in range(first, end) if i in self._blocks]
        else:
            cached = [i for i in self._blocks if first <= i < end]
        for index in cached:
            self._drop(index)
        if end - first <= len(self._loading):
            loading = [i for i in range(first, end) if i in self._loading]
        else:
            loading = [i for i in self._loading if first <= i < end]
        for index in loading:
            self._loading.pop(index).stale = True

    def _drop(self, index: int) -> None:
        block = self._blocks.pop(index)
        self.counters.cached_bytes -= len(block)
        if index in self._prefetched:
            self._prefetched.discard(index)
            self.counters.readahead_wasted_bytes += len(block)

    def _drop_all(self) -> None:
        for index in list(self._blocks):
            self._drop(index)
        for load in self._loading.values():
            load.stale = True
        self._loading.clear()

    async def _changed(self, offset: int, length: int, call: Any, *args: Any) -> None:
        """Run the child's ``call`` with the blocks of the range invalidated before and after
        it: a fetch that overlapped the change never reaches the cache (see _finish)."""
        bs = self.block_size
        span = (offset // bs, -(-(offset + length) // bs))
        self._invalidate(*span)
        self._changing.append(span)
        try:
            await call(*args)
        finally:
            self._changing.remove(span)
            self._invalidate(*span)

    async def _pwrite(self, offset: int, data: Buffer) -> None:
        await self._changed(offset, len(data), self.file.pwrite, offset, data)

    async def _zero(self, offset: int, length: int, may_unmap: bool) -> None:
        async def zero() -> None:
            await self.file.zero(offset, length, may_unmap=may_unmap)

        await self._changed(offset, length, zero)

    async def _discard(self, offset: int, length: int) -> None:
        await self._changed(offset, length, self.file.discard, offset, length)

    async def truncate(self, size: int) -> None:
        try:
            await super().truncate(size)
        finally:
            self._drop_all()
