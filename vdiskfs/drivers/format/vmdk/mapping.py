"""Guest ranges to runs, for sparse extents: pure functions, no I/O.

As QEMU's ``qcow2_get_host_offset`` and dissect's ``_yield_runs``, the node asks "what are these
guest bytes?" and gets a list of :class:`~vdiskfs.drivers.format.runs.Run` -- zero, backing,
data at a host offset of the extent's file, or a piece of a compressed grain -- that the format
layer's executor then serves with as few child reads as possible. The node loads the grain
table (through its cache) and hands it in; this module never reads.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from vdiskfs.block.node import BlockNode
from vdiskfs.drivers.format.runs import Run, RunKind, coalesce
from vdiskfs.drivers.format.vmdk.sparse import SECTOR, SparseHeader
from vdiskfs.errors import FormatError

__all__ = [
    "SparseGeometry",
    "gt_window",
    "map_grain_table",
]

#: Grain table entry of a zeroed grain (when the header sets the zeroed-grain flag).
GTE_ZEROED = 1

@dataclass(frozen=True, slots=True)
class SparseGeometry:
    """What mapping a sparse extent needs from its header, in bytes."""

    grain_size: int
    gtes_per_gt: int
    compressed: bool
    zero_grain: bool

    @classmethod
    def from_header(cls, header: SparseHeader) -> SparseGeometry:
        return cls(header.grain_size, header.gtes_per_gt, header.compressed, header.zero_grain)

    @property
    def gt_coverage(self) -> int:
        return self.grain_size * self.gtes_per_gt


def gt_window(geometry: SparseGeometry, offset: int, length: int) -> tuple[int, int]:
    """Index of the grain table mapping extent ``offset``, and how many of the ``length``
    bytes from there it maps (the rest belongs to the following tables)."""
    coverage = geometry.gt_coverage
    index = offset // coverage
    return index, min(length, (index + 1) * coverage - offset)


def map_grain_table(
    geometry: SparseGeometry,
    table: Sequence[int] | None,
    *,
    extent: int,
    child: BlockNode | None,
    guest_base: int,
    offset: int,
    length: int,
    file_size: int,
    table_offset: int,
    label: str,
) -> list[Run]:
    """Runs for extent bytes ``[offset, offset + length)``, all mapped by one grain ``table``.

    ``table`` is None when the grain directory has no table there (all unallocated).
    ``extent`` (the extent's number, the payload of COMPRESSED runs) and ``child`` (its file,
    where DATA and COMPRESSED bytes are) tag the runs. ``guest_base`` is the extent's first
    guest byte; ``file_size`` and ``table_offset`` (the table's place in the file) serve the
    error for an entry pointing outside the file.
    """
    guest = guest_base + offset
    if table is None:
        return [Run(RunKind.BACKING, guest, length)]
    grain_size = geometry.grain_size
    first_index = offset // grain_size - (offset // geometry.gt_coverage) * geometry.gtes_per_gt
    runs: list[Run] = []
    end = offset + length
    index = first_index
    while offset < end:
        in_grain = offset % grain_size
        n = min(end - offset, grain_size - in_grain)
        entry = table[index]
        if entry == 0:
            run = Run(RunKind.BACKING, guest, n)
        elif entry == GTE_ZEROED and geometry.zero_grain:
            run = Run(RunKind.ZERO, guest, n)
        else:
            host = entry * SECTOR
            if geometry.compressed:
                needed_end = host + 1  # the marker's length is checked when it is read
                run = Run(RunKind.COMPRESSED, guest, n, host, child, extent)
            else:
                host += in_grain
                needed_end = host + n
                run = Run(RunKind.DATA, guest, n, host, child)
            if needed_end > file_size:
                raise FormatError(
                    f"grain table entry {index} (sector {entry}) points outside the file "
                    f"({file_size} bytes)",
                    path=label,
                    field="grain table entry",
                    offset=table_offset + 4 * index,
                )
        runs.append(run)
        offset += n
        guest += n
        index += 1
    return coalesce(runs)
