"""A write-back cache of qcow2 metadata (L2 slices, refcount blocks), owned by one node.

Modelled on QEMU's ``block/qcow2-cache.c``: entries are keyed by their host offset, kept in LRU
order, and a writer changes an entry in place and marks it dirty; dirty entries reach the image
when the node flushes, when they are evicted, and when the node closes -- not once per guest
write.

What a dirty entry may reference must be on disk before the entry is (QEMU's
``qcow2_cache_set_dependency``: an L2 slice that points at a new cluster is written only after
the refcount block that counts it, and after the data written into it). Here the owner states
that once, as the cache's ``before_write_back`` hook, which the cache awaits before it writes any
dirty entry; the qcow2 writer's hook writes the refcount blocks and the refcount table back and
syncs the file (:mod:`.writer`).

Concurrency, on trio:

* Two tasks that miss on the same key must not both load it: the first registers a
  :class:`trio.Event` and loads, the others wait for it and look again. A failed load sets the
  event too, so a waiter retries the load itself and sees the error.
* Only the owner's metadata lock holder writes entries back (``write_back=True``). A reader that
  misses with no clean entry to evict lets the cache grow by its one entry instead: the overflow
  is clean, so the next eviction drops it; writing a dirty entry back from a reader could
  interleave with a writer's half-done metadata update.
* A caller modifies an entry only between a :meth:`MetadataCache.get` and its next ``await``: an
  entry can be evicted at any checkpoint, and a change to an evicted entry would be lost.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

import trio

from vdiskfs.block.stats import Counters

__all__ = ["MetadataCache", "MetadataCacheCounters"]

T = TypeVar("T")

#: How many least recently used entries eviction inspects for a clean one before it writes
#: dirty entries back.
_CLEAN_VICTIM_SCAN = 8


@dataclass(slots=True)
class MetadataCacheCounters(Counters):
    """The counters of one cache: a group field of its node's counters (``l2_cache``), which
    the node's statistics show as ``l2_cache_hits``, ``l2_cache_misses``...."""

    #: Lookups served from the cache (a task that waited for another's load counts).
    hits: int = 0
    #: Entries read from the image.
    misses: int = 0
    #: Entries dropped to make room.
    evictions: int = 0
    #: Dirty entries written to the image.
    writebacks: int = 0


class MetadataCache(Generic[T]):
    """Entries of type ``T`` by host offset, least recently used evicted first.

    ``counters`` is the group the cache counts its hits, misses, evictions and write-backs in.
    ``encode`` turns an entry into the bytes written at its key by ``store``; a cache without
    ``store`` never holds dirty entries.
    """

    def __init__(
        self,
        capacity: int,
        counters: MetadataCacheCounters,
        *,
        store: Callable[[int, bytes], Awaitable[None]] | None = None,
        encode: Callable[[T], bytes] | None = None,
        before_write_back: Callable[[], Awaitable[None]] | None = None,
        min_capacity: int = 2,
    ) -> None:
        #: Most entries kept at once (readers may exceed it briefly by clean entries).
        self.capacity = max(min_capacity, capacity)
        #: Entries by key, least recently used first. Public for the read fast path.
        self.slices: OrderedDict[int, T] = OrderedDict()
        #: Keys of dirty entries, in the order they first became dirty.
        self.dirty: dict[int, None] = {}
        self.counters = counters
        self._store = store
        self._encode = encode
        self.before_write_back = before_write_back
        self._loading: dict[int, trio.Event] = {}

    def __len__(self) -> int:
        return len(self.slices)

    def enable_write_back(self, store: Callable[[int, bytes], Awaitable[None]],
                          encode: Callable[[T], bytes],
                          before_write_back: Callable[[], Awaitable[None]] | None) -> None:
        """Turn a read cache into a write-back one (a node opened for writing)."""
        self._store = store
        self._encode = encode
        self.before_write_back = before_write_back

    # -- lookups ----------------------------------------------------------------------------------

    def peek(self, key: int) -> T | None:
        """The cached entry at ``key`` without loading or reordering anything."""
        return self.slices.get(key)

    async def get(self, key: int, load: Callable[[int], Awaitable[T]], *,
                  write_back: bool = False) -> T:
        """The entry at ``key``, loading it with ``load(key)`` on a miss.

        ``write_back``: the caller holds the owner's metadata lock, so eviction may write dirty
        entries back to make room.
        """
        while True:
            found = self.slices.get(key)
            if found is not None:
                self.slices.move_to_end(key)
                self.counters.hits += 1
                return found
            pending = self._loading.get(key)
            if pending is None:
                break
            # Another task is loading this entry: wait for it rather than load it twice.
            await pending.wait()
        self.counters.misses += 1
        done = self._loading[key] = trio.Event()
        try:
            loaded = await load(key)
            await self._make_room(write_back)
            self.slices[key] = loaded
        finally:
            del self._loading[key]
            done.set()
        return loaded

    async def insert(self, key: int, entry: T, *, dirty: bool = True) -> None:
        """Add an entry that needs no load (a new refcount block), dirty by default.

        The caller holds the metadata lock and owns ``key`` (a cluster it just allocated).
        """
        await self._make_room(True)
        self.slices[key] = entry
        self.slices.move_to_end(key)
        if dirty:
            self.mark_dirty(key)

    def mark_dirty(self, key: int) -> None:
        """Record that the entry at ``key`` (which must be cached) differs from the image."""
        if self._store is None:
            raise RuntimeError("marking an entry of a read-only cache dirty")
        if key not in self.slices:
            raise RuntimeError(f"marking an uncached entry {key:#x} dirty")
        self.dirty.setdefault(key, None)

    # -- eviction and write-back ------------------------------------------------------------------

    async def _make_room(self, write_back: bool) -> None:
        while len(self.slices) >= self.capacity:
            victim = self._clean_victim()
            if victim is not None:
                del self.slices[victim]
                self.counters.evictions += 1
                continue
            if not write_back or not self.dirty:
                return  # a reader's clean overflow: dropped at the next eviction
            # Write back the oldest quarter of the dirty entries at once: the owner's hook (a
            # sync of the image) is paid once for many entries, not once per eviction.
            batch = max(1, self.capacity // 4)
            keys = list(self.dirty)[:batch]
            await self.write_back(keys)

    def _clean_victim(self) -> int | None:
        for scanned, key in enumerate(self.slices):
            if scanned >= _CLEAN_VICTIM_SCAN:
                break
            if key not in self.dirty and key not in self._loading:
                return key
        return None

    async def write_back(self, keys: list[int] | None = None) -> int:
        """Write the given dirty entries (default: all) to the image, in offset order, after
        the owner's ``before_write_back`` hook. Returns how many were written."""
        wanted = sorted(self.dirty if keys is None else (k for k in keys if k in self.dirty))
        if not wanted:
            return 0
        if self.before_write_back is not None:
            await self.before_write_back()
        assert self._store is not None and self._encode is not None
        written = 0
        for key in wanted:
            entry = self.slices.get(key)
            if entry is None or key not in self.dirty:
                continue  # dropped or written meanwhile
            # Encode and mark clean before the await: a change made while the write is in
            # flight marks the entry dirty again rather than being lost.
            data = self._encode(entry)
            del self.dirty[key]
            try:
                await self._store(key, data)
            except BaseException:
                self.dirty.setdefault(key, None)
                raise
            written += 1
        self.counters.writebacks += written
        return written

    def invalidate(self, key: int | None = None) -> None:
        """Forget one entry, or all of them. Dirty entries forgotten are lost: callers do this
        only for clusters that no longer hold metadata, or after writing everything back."""
        if key is None:
            self.slices.clear()
            self.dirty.clear()
        else:
            self.slices.pop(key, None)
            self.dirty.pop(key, None)

    def invalidate_range(self, start: int, end: int, step: int) -> None:
        """Forget every entry whose key lies in ``[start, end)``; keys are multiples of
        ``step`` (the entry size). Used when a freed cluster is reused for something else."""
        if not self.slices:
            return
        if (end - start) // step > len(self.slices):
            for key in [k for k in self.slices if start <= k < end]:
                self.invalidate(key)
            return
        for key in range(start, end, step):
            if key in self.slices:
                self.invalidate(key)
