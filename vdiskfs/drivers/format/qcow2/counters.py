"""The counters of a qcow2 node (reads, caches, and the writer's allocation and write-back)."""

from __future__ import annotations

from dataclasses import dataclass, field

from vdiskfs.drivers.format.qcow2.metadata_cache import MetadataCacheCounters
from vdiskfs.drivers.format.runs import RunCounters

__all__ = ["Qcow2Counters"]


@dataclass(slots=True)
class Qcow2Counters(RunCounters):
    """The run counters (``data_reads``, ``backing_reads``, ``zero_bytes_read``...) and qcow2's."""

    #: The L2 slice cache (``l2_cache_hits``, ``_misses``, ``_evictions``, ``_writebacks``): it
    #: holds at most 32 MiB of L2 entries; the read fast path counts its hits here too.
    l2_cache: MetadataCacheCounters = field(default_factory=MetadataCacheCounters)
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
    #: The refcount block cache (``refcount_cache_hits``...).
    refcount_cache: MetadataCacheCounters = field(default_factory=MetadataCacheCounters)
    #: Dirty images whose refcounts were rebuilt when opened for writing.
    refcount_rebuilds: int = 0
