"""Deciding how a write lands in one cluster, and tracking allocations in flight: the pure half
of the qcow2 write path (QEMU's ``handle_copied``/``handle_alloc``/``calculate_l2_meta`` and its
``cluster_allocs`` list, ``block/qcow2-cluster.c``).

A write into a cluster is one of three :class:`Action`:

* ``IN_PLACE``: the cluster is this image's own (``COPIED``, or in an external data file) and
  every subcluster written is allocated: the data goes to the host cluster, no metadata changes.
* ``KEEP``: the image's own cluster, but a written subcluster is not allocated yet (extended L2)
  or the cluster is a preallocated zero cluster: written in place, then the L2 entry changes.
* ``NEW``: the cluster is unallocated, zero, compressed or shared with a snapshot: a new host
  cluster receives the data, and the old one loses a reference once the L2 entry points away.

Where the data written does not cover whole (sub)clusters, the rest of them is copied on write
from what the guest saw there before (backing file, zeros, the old or compressed cluster):
:attr:`ClusterWrite.cow_from` and :attr:`ClusterWrite.cow_to` bound the region the new state
covers, QEMU's ``cow_start``/``cow_end``.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import trio

from vdiskfs.drivers.format.qcow2.mapping import (
    L2E_OFFSET_MASK,
    OFLAG_COMPRESSED,
    OFLAG_COPIED,
    OFLAG_ZERO,
    Geometry,
)

__all__ = [
    "ALL_SUBCLUSTERS",
    "ALL_ZERO_BITMAP",
    "Action",
    "ClusterWrite",
    "Inflight",
    "InflightList",
    "is_allocated",
    "linked_entry",
    "needs_new_cluster",
    "plan_cluster",
    "subcluster_bits",
]

ALL_SUBCLUSTERS = 0xFFFFFFFF
#: Extended L2 bitmap of a cluster whose 32 subclusters all read as zeros (QEMU's
#: QCOW_L2_BITMAP_ALL_ZEROES).
ALL_ZERO_BITMAP = ALL_SUBCLUSTERS << 32


class Action(enum.IntEnum):
    IN_PLACE = 0
    KEEP = 1
    NEW = 2


@dataclass(frozen=True, slots=True)
class ClusterWrite:
    """How a write of ``[write_from, write_to)`` (offsets in the cluster) lands."""

    action: Action
    #: The existing host cluster for IN_PLACE and KEEP; 0 for NEW.
    host: int
    #: The region, in the cluster, that holds written or copied data afterwards.
    cow_from: int
    cow_to: int


def subcluster_bits(g: Geometry) -> int:
    """log2 of the unit that allocation and zero flags track: a subcluster or a cluster."""
    return g.cluster_bits - 5 if g.extended_l2 else g.cluster_bits


def is_allocated(g: Geometry, entry: int) -> bool:
    """Whether a (non-compressed) L2 entry points at a host cluster (QEMU's NORMAL and
    ZERO_ALLOC, and UNALLOCATED_ALLOC with extended L2)."""
    if entry & OFLAG_COMPRESSED:
        return False
    return bool(entry & L2E_OFFSET_MASK) or (g.has_data_file and bool(entry & OFLAG_COPIED))


def needs_new_cluster(g: Geometry, entry: int) -> bool:
    """QEMU's ``cluster_needs_new_alloc``: only the image's own allocated clusters are written
    in place. With an external data file every cluster sits at its guest offset anyway."""
    if not is_allocated(g, entry):
        return True
    return not (g.has_data_file or entry & OFLAG_COPIED)


def _allocated_mask(g: Geometry, entry: int, bitmap: int) -> int:
    if g.extended_l2:
        return bitmap & ALL_SUBCLUSTERS
    if entry & OFLAG_ZERO or not is_allocated(g, entry):
        return 0
    return 1


def _ctz32(value: int) -> int:
    return 32 if not value else (value & -value).bit_length() - 1


def _clz32(value: int) -> int:
    return 32 - value.bit_length()


def plan_cluster(g: Geometry, entry: int, bitmap: int, write_from: int,
                 write_to: int) -> ClusterWrite:
    """How a write of ``[write_from, write_to)`` lands in the cluster with this L2 entry (and
    extended L2 bitmap, 0 without). As QEMU's ``calculate_l2_meta``."""
    sc_bits = subcluster_bits(g)
    cluster_size = 1 << g.cluster_bits
    first_sc = write_from >> sc_bits
    last_sc = (write_to - 1) >> sc_bits
    allocated = _allocated_mask(g, entry, bitmap)
    if not needs_new_cluster(g, entry):
        host = entry & L2E_OFFSET_MASK
        written = ((1 << (last_sc + 1)) - 1) & ~((1 << first_sc) - 1)
        if not written & ~allocated:
            return ClusterWrite(Action.IN_PLACE, host, write_from, write_to)
        cow_from = write_from if allocated >> first_sc & 1 else first_sc << sc_bits
        cow_to = write_to if allocated >> last_sc & 1 else (last_sc + 1) << sc_bits
        return ClusterWrite(Action.KEEP, host, cow_from, cow_to)
    if entry & OFLAG_COMPRESSED:
        return ClusterWrite(Action.NEW, 0, 0, cluster_size)
    if is_allocated(g, entry):
        # Shared with a snapshot: the new cluster takes over every allocated subcluster.
        if not g.extended_l2:
            return ClusterWrite(Action.NEW, 0, 0, cluster_size)
        cow_from = min(first_sc, _ctz32(allocated)) << sc_bits
        cow_to = cluster_size - (min(31 - last_sc, _clz32(allocated)) << sc_bits)
        return ClusterWrite(Action.NEW, 0, cow_from, cow_to)
    return ClusterWrite(Action.NEW, 0, first_sc << sc_bits, (last_sc + 1) << sc_bits)


def linked_entry(g: Geometry, host: int, old_entry: int, old_bitmap: int, written_from: int,
                 written_to: int) -> tuple[int, int]:
    """The L2 entry (and bitmap) of a cluster once ``[written_from, written_to)`` of it holds
    data at ``host`` (QEMU's ``qcow2_alloc_cluster_link_l2``)."""
    entry = host | OFLAG_COPIED
    if not g.extended_l2:
        return entry, 0
    sc_bits = subcluster_bits(g)
    first_sc = written_from >> sc_bits
    last_sc = (written_to - 1) >> sc_bits
    span = ((1 << (last_sc + 1)) - 1) & ~((1 << first_sc) - 1)
    # A compressed cluster's bitmap is reserved: start from nothing.
    bitmap = 0 if old_entry & OFLAG_COMPRESSED else old_bitmap
    bitmap = (bitmap | span) & ~(span << 32)
    return entry, bitmap


@dataclass(eq=False, slots=True)
class Inflight:
    """An allocation between its planning and its L2 update (QEMU's QCowL2Meta in
    ``cluster_allocs``): guest clusters ``[start, end)``, which other writers must not touch."""

    start: int
    end: int
    done: trio.Event = field(default_factory=trio.Event)


class InflightList:
    """The allocations in flight. A request that starts inside one waits for it; a request
    that reaches one later is cut short before it (QEMU's ``handle_dependencies``)."""

    def __init__(self) -> None:
        self._items: list[Inflight] = []

    def __len__(self) -> int:
        return len(self._items)

    def __bool__(self) -> bool:
        return bool(self._items)

    def blocking(self, start: int, length: int) -> tuple[Inflight | None, int]:
        """``(allocation to wait for, None)`` if ``start`` lies in one; else ``(None, length)``
        with ``length`` cut to end before the first allocation it reaches."""
        end = start + length
        for item in self._items:
            if item.start <= start < item.end:
                return item, 0
            if start < item.start < end:
                end = item.start
        return None, end - start

    def overlaps(self, start: int, end: int) -> bool:
        return any(item.start < end and start < item.end for item in self._items)

    def add(self, start: int, end: int) -> Inflight:
        item = Inflight(start, end)
        self._items.append(item)
        return item

    def finish(self, item: Inflight) -> None:
        self._items.remove(item)
        item.done.set()
