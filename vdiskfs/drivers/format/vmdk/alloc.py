"""Bookkeeping for writes to hosted sparse extents: no I/O here.

Where new grains and grain tables go, what an extent's metadata occupies, and which tables and
directory entries wait to be written back -- the node does the I/O (:mod:`.driver`).

Allocation follows QEMU's ``get_cluster_offset``: a new grain is appended to the extent file,
grain-aligned (QEMU starts at the file's size rounded up to a grain), and a grain table whose
directory entry is 0 is appended too, with its redundant copy, as QEMU did before it began
preallocating every table at creation. A grain table entry holds a 32-bit sector, so an extent
file cannot grow past 2 TiB (QEMU's ``VMDK_EXTENT_MAX_SECTORS``).
"""

from __future__ import annotations

import bisect
import sys
from array import array
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from vdiskfs.drivers.format.vmdk.sparse import SECTOR, SparseHeader
from vdiskfs.errors import FormatError, NoSpaceError

__all__ = [
    "MAX_EXTENT_FILE",
    "MetadataMap",
    "SparseWriteState",
    "check_directories",
    "table_bytes",
]

#: First byte an extent file may not reach: grain table entries are 32-bit sector numbers.
MAX_EXTENT_FILE = (1 << 32) * SECTOR


class MetadataMap:
    """The byte ranges of an extent file that hold metadata (header, descriptor, directories,
    grain tables): a write of guest data must never land there.

    A hostile grain table entry may point into the grain directory; QEMU would write the guest's
    bytes over it. The node asks :meth:`find` before every in-place write and refuses instead.
    """

    def __init__(self, ranges: Iterable[tuple[int, int]] = ()) -> None:
        self._starts: list[int] = []
        self._ends: list[int] = []
        self._rebuild(list(ranges))

    def _rebuild(self, ranges: list[tuple[int, int]]) -> None:
        starts: list[int] = []
        ends: list[int] = []
        for start, end in sorted(r for r in ranges if r[1] > r[0]):
            if ends and start <= ends[-1]:
                ends[-1] = max(ends[-1], end)
            else:
                starts.append(start)
                ends.append(end)
        self._starts, self._ends = starts, ends

    def add(self, start: int, end: int) -> None:
        if end <= start:
            return
        if not self._ends or start > self._ends[-1]:
            # New tables are appended at the end of the file: the common, cheap case.
            self._starts.append(start)
            self._ends.append(end)
            return
        self._rebuild([*zip(self._starts, self._ends, strict=True), (start, end)])

    def find(self, start: int, end: int) -> tuple[int, int] | None:
        """The first metadata range overlapping ``[start, end)``, or None."""
        index = bisect.bisect_right(self._ends, start)
        if index < len(self._starts) and self._starts[index] < end:
            return self._starts[index], self._ends[index]
        return None


@dataclass(slots=True)
class SparseWriteState:
    """What a writable sparse extent needs beyond its reading state."""

    #: The redundant grain directory (QEMU's ``l1_backup_table``); None if the extent has none.
    rgd: array[int] | None
    #: Where the next allocation goes (bytes); the end of everything allocated so far.
    next_free: int
    metadata: MetadataMap
    #: Grain tables changed since the last write-back, by directory index. Pinned here (not in
    #: the node's LRU cache) until written, so they can never be evicted unwritten.
    dirty_tables: dict[int, array[int]] = field(default_factory=dict)
    #: Directory indexes whose (primary and redundant) entries name a newly allocated table.
    dirty_directory: set[int] = field(default_factory=set)

    @property
    def dirty(self) -> bool:
        return bool(self.dirty_tables or self.dirty_directory)

    def allocate(self, size: int, align: int, label: str) -> int:
        """Reserve ``size`` bytes at the end of the extent file, ``align``-aligned."""
        start = -(-self.next_free // align) * align
        end = start + size
        if end > MAX_EXTENT_FILE:
            raise NoSpaceError(
                f"the extent file would grow past {MAX_EXTENT_FILE} bytes, the most a grain "
                "table entry can address",
                path=label,
            )
        self.next_free = end
        return start


def check_directories(header: SparseHeader, gd: Sequence[int], rgd: Sequence[int] | None,
                      file_size: int, label: str) -> MetadataMap:
    """Check the grain directories before writing through them, and map the metadata.

    Every table an entry names must lie inside the file, and no table may be named twice
    (within a directory or across the two): two cached copies of one table would each be
    written back over the other's entries.
    """
    table_bytes_ = header.gtes_per_gt * 4
    gd_bytes = header.gd_entries * 4
    ranges = [(0, header.grain_offset * SECTOR),
              (header.gd_offset * SECTOR, header.gd_offset * SECTOR + gd_bytes)]
    if rgd is not None:
        ranges.append((header.rgd_offset * SECTOR, header.rgd_offset * SECTOR + gd_bytes))
    seen: dict[int, str] = {}
    for name, directory in (("grain directory", gd), ("redundant grain directory", rgd)):
        if directory is None:
            continue
        for index, sector in enumerate(directory):
            if sector == 0:
                continue
            where = f"{name} entry {index}"
            start = sector * SECTOR
            if start + table_bytes_ > file_size:
                raise FormatError(
                    f"{where} (sector {sector}) places a grain table outside the file "
                    f"({file_size} bytes)",
                    path=label,
                    field=name,
                )
            if sector in seen:
                raise FormatError(
                    f"{seen[sector]} and {where} name the same grain table (sector {sector})",
                    path=label,
                    field=name,
                )
            seen[sector] = where
            ranges.append((start, start + table_bytes_))
    return MetadataMap(ranges)


def table_bytes(table: array[int]) -> bytes:
    """A grain table (or directory) as stored: little-endian 32-bit entries."""
    if sys.byteorder == "big":  # pragma: no cover - little-endian hosts only in CI
        swapped = array(table.typecode, table)
        swapped.byteswap()
        return swapped.tobytes()
    return table.tobytes()
