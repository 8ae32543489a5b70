"""An LRU cache of decoded L2 slices, owned by one qcow2 node (QEMU's ``Qcow2Cache``).

Keys are host offsets of slices, as QEMU keys its cache by table offset: a key stays right when
the active L1 table changes (a snapshot switch, or an L2 table copied on write), and a writer can
update a cached slice in place.

Sizing follows QEMU (``docs/qcow2-cache.txt``): slices of 4 KiB (one page; QEMU's default
``l2-cache-entry-size`` since 4.0), so a miss costs one small read however large the clusters;
and at most 32 MiB of slices (QEMU's default ``l2-cache-size`` maximum on Linux, enough to map
256 GiB of guest with 64 KiB clusters), but no more than the image's L2 tables can fill.

Concurrency: on trio, two tasks that miss on the same slice must not both read it. The first
registers a :class:`trio.Event` for the key and loads; the others wait for the event and look
again. A failed load sets the event too, so a waiter retries the load itself and sees the error.
"""

from __future__ import annotations

from array import array
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Protocol

import trio

__all__ = ["DEFAULT_MAX_BYTES", "DEFAULT_SLICE_BYTES", "L2SliceCache"]

DEFAULT_SLICE_BYTES = 4096
DEFAULT_MAX_BYTES = 32 * 1024 * 1024
#: QEMU's MIN_L2_CACHE_SIZE: room for the slice in use and the one being loaded.
MIN_SLICES = 2

Slice = array  # array('Q') of decoded entries


class CacheCounters(Protocol):
    l2_cache_hits: int
    l2_cache_misses: int
    l2_cache_evictions: int


class L2SliceCache:
    """Decoded L2 slices by host offset, least recently used evicted first.

    ``slices`` is public so that the owning node's read fast path can look a slice up without a
    method call; everything that inserts goes through :meth:`get`.
    """

    def __init__(self, capacity: int, counters: CacheCounters) -> None:
        #: Most slices kept at once.
        self.capacity = max(MIN_SLICES, capacity)
        self.slices: OrderedDict[int, Slice] = OrderedDict()
        self._counters = counters
        self._loading: dict[int, trio.Event] = {}

    @staticmethod
    def capacity_for(l2_bytes_needed: int, slice_bytes: int,
                     max_bytes: int = DEFAULT_MAX_BYTES) -> int:
        """Slices to keep: enough for all ``l2_bytes_needed`` bytes of L2 tables (to map the
        whole disk), but no more than ``max_bytes``."""
        return max(MIN_SLICES, -(-min(l2_bytes_needed, max_bytes) // slice_bytes))

    def __len__(self) -> int:
        return len(self.slices)

    async def get(self, key: int, load: Callable[[int], Awaitable[Slice]]) -> Slice:
        """The slice at host offset ``key``, loading it with ``load(key)`` on a miss."""
        while True:
            found = self.slices.get(key)
            if found is not None:
                self.slices.move_to_end(key)
                self._counters.l2_cache_hits += 1
                return found
            pending = self._loading.get(key)
            if pending is None:
                break
            # Another task is reading this slice: wait for it rather than read it twice.
            await pending.wait()
        self._counters.l2_cache_misses += 1
        done = self._loading[key] = trio.Event()
        try:
            loaded = await load(key)
            self.slices[key] = loaded
            while len(self.slices) > self.capacity:
                self.slices.popitem(last=False)
                self._counters.l2_cache_evictions += 1
        finally:
            del self._loading[key]
            done.set()
        return loaded

    def invalidate(self, key: int | None = None) -> None:
        """Forget one slice, or all of them (a writer that moved or freed L2 tables)."""
        if key is None:
            self.slices.clear()
        else:
            self.slices.pop(key, None)
