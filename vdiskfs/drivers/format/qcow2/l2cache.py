"""The node's cache of decoded L2 slices: a :class:`~.metadata_cache.MetadataCache` keyed by the
slices' host offsets (QEMU's ``l2_table_cache``).

Keys are host offsets of slices, as QEMU keys its cache by table offset: a key stays right when
the active L1 table changes (a snapshot switch, or an L2 table copied on write), and a writer
updates a cached slice in place and marks it dirty (see :mod:`.metadata_cache` for write-back,
eviction and the single-load rule).

Sizing follows QEMU (``docs/qcow2-cache.txt``): slices of 4 KiB (one page; QEMU's default
``l2-cache-entry-size`` since 4.0), so a miss costs one small read however large the clusters;
and at most 32 MiB of slices (QEMU's default ``l2-cache-size`` maximum on Linux, enough to map
256 GiB of guest with 64 KiB clusters), but no more than the image's L2 tables can fill.
"""

from __future__ import annotations

from array import array
from collections.abc import Awaitable, Callable
from typing import TypeAlias

from vdiskfs.drivers.format.qcow2.metadata_cache import MetadataCache, MetadataCacheCounters

__all__ = ["DEFAULT_MAX_BYTES", "DEFAULT_SLICE_BYTES", "L2SliceCache"]

DEFAULT_SLICE_BYTES = 4096
DEFAULT_MAX_BYTES = 32 * 1024 * 1024
#: QEMU's MIN_L2_CACHE_SIZE: room for the slice in use and the one being loaded.
MIN_SLICES = 2

#: array('Q') of decoded entries (a string: array is subscriptable only from Python 3.12).
Slice: TypeAlias = "array[int]"


class L2SliceCache(MetadataCache[Slice]):
    """Decoded L2 slices by host offset, least recently used evicted first.

    ``slices`` is public so that the owning node's read fast path can look a slice up without a
    method call; everything that inserts goes through :meth:`get`.
    """

    def __init__(
        self,
        capacity: int,
        counters: MetadataCacheCounters,
        *,
        store: Callable[[int, bytes], Awaitable[None]] | None = None,
        encode: Callable[[Slice], bytes] | None = None,
        before_write_back: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        super().__init__(capacity, counters, store=store, encode=encode,
                         before_write_back=before_write_back, min_capacity=MIN_SLICES)

    @staticmethod
    def capacity_for(l2_bytes_needed: int, slice_bytes: int,
                     max_bytes: int = DEFAULT_MAX_BYTES) -> int:
        """Slices to keep: enough for all ``l2_bytes_needed`` bytes of L2 tables (to map the
        whole disk), but no more than ``max_bytes``."""
        return max(MIN_SLICES, -(-min(l2_bytes_needed, max_bytes) // slice_bytes))
