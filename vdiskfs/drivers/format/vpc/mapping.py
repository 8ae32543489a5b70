"""Guest ranges to runs for dynamic and differencing VHDs: pure functions, no I/O.

A guest byte lies in block ``offset // block_size``. An unallocated block (BAT entry
``0xFFFFFFFF``) is not defined by this image. An allocated block starts with its sector bitmap;
its data follows. In a differencing disk, a sector whose bitmap bit is clear is not defined here
either (the parent's bytes show through). In a dynamic disk QEMU ignores the bitmap and reads
the block's data; vdiskfs does the same, so its bytes equal ``qemu-img convert``'s.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from vdiskfs.drivers.format.runs import Run, RunKind
from vdiskfs.drivers.format.vpc.structs import BAT_UNALLOCATED, SECTOR
from vdiskfs.errors import FormatError

__all__ = [
    "BlockGeometry",
    "block_window",
    "check_bat",
    "check_block_layout",
    "map_block",
    "merge_ranges",
    "sectors_present",
    "set_sectors",
]


@dataclass(frozen=True, slots=True)
class BlockGeometry:
    block_size: int
    bitmap_size: int
    #: Differencing disks honour the sector bitmap; dynamic disks ignore it, as QEMU does.
    uses_bitmap: bool

    def data_offset(self, entry: int) -> int:
        """File offset of the first data byte of the block whose BAT entry is ``entry``."""
        return entry * SECTOR + self.bitmap_size


def block_window(geometry: BlockGeometry, offset: int, length: int) -> tuple[int, int]:
    """Index of the block holding guest ``offset``, and how many of ``length`` bytes it holds."""
    index = offset // geometry.block_size
    return index, min(length, (index + 1) * geometry.block_size - offset)


def check_bat(bat: Sequence[int], geometry: BlockGeometry, file_size: int, bat_offset: int,
              label: str) -> None:
    """Every allocated block (bitmap and data) must lie inside the file, as QEMU checks at open
    (``free_data_block_offset points after the end of file``)."""
    span = geometry.bitmap_size + geometry.block_size
    limit = (file_size - span) // SECTOR  # the largest entry whose block fits
    for index, entry in enumerate(bat):
        if entry != BAT_UNALLOCATED and entry > limit:
            raise FormatError(
                f"BAT entry {index} (sector {entry}) places a block of {span} bytes outside "
                f"the file ({file_size} bytes)",
                path=label,
                field="BAT",
                offset=bat_offset + 4 * index,
            )


def map_block(geometry: BlockGeometry, entry: int, bitmap: bytes | bytearray | None, offset: int,
              length: int) -> list[Run]:
    """Runs for guest ``[offset, offset + length)``, which lies in the block of BAT ``entry``.

    ``bitmap`` is the block's sector bitmap, needed only when ``geometry.uses_bitmap`` and the
    block is allocated. Bit 7 of byte 0 is the block's first sector.
    """
    if entry == BAT_UNALLOCATED:
        return [Run(RunKind.BACKING, offset, length)]
    block_size = geometry.block_size
    data_start = geometry.data_offset(entry)
    if not geometry.uses_bitmap:
        return [Run(RunKind.DATA, offset, length, data_start + offset % block_size)]
    if bitmap is None:
        raise ValueError("a differencing block needs its sector bitmap")
    runs: list[Run] = []
    end = offset + length
    run_start = offset
    run_present: bool | None = None
    pos = offset
    while pos < end:
        in_block = pos % block_size
        sector = in_block // SECTOR
        present = bool(bitmap[sector >> 3] & (0x80 >> (sector & 7)))
        if present != run_present:
            if run_present is not None:
                runs.append(_run(run_present, run_start, pos, data_start, block_size))
            run_start, run_present = pos, present
        pos = min(end, pos - in_block % SECTOR + SECTOR)
    assert run_present is not None
    runs.append(_run(run_present, run_start, end, data_start, block_size))
    return runs


def _run(present: bool, start: int, end: int, data_start: int, block_size: int) -> Run:
    if present:
        return Run(RunKind.DATA, start, end - start, data_start + start % block_size)
    return Run(RunKind.BACKING, start, end - start)


def merge_ranges(ranges: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted, disjoint ``[start, end)`` ranges covering the same bytes (empty ones dropped)."""
    out: list[tuple[int, int]] = []
    for start, end in sorted(r for r in ranges if r[1] > r[0]):
        if out and start <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], end))
        else:
            out.append((start, end))
    return out


def check_block_layout(bat: Sequence[int], geometry: BlockGeometry,
                       metadata: Sequence[tuple[int, int]], bat_offset: int,
                       label: str) -> int:
    """Before writing through the BAT: no block may overlap another or the image's metadata
    (``metadata``: sorted disjoint ranges, from :func:`merge_ranges`) -- a hostile entry
    would otherwise turn guest writes into writes over the BAT or another block. Returns the
    end of the last block (0 without any)."""
    span = geometry.bitmap_size + geometry.block_size
    blocks = sorted((entry, index) for index, entry in enumerate(bat)
                    if entry != BAT_UNALLOCATED)
    previous_end = 0
    previous_index = -1
    meta = 0
    for entry, index in blocks:
        start = entry * SECTOR
        end = start + span
        if start < previous_end:
            raise FormatError(
                f"BAT entries {previous_index} and {index} place overlapping blocks",
                path=label, field="BAT", offset=bat_offset + 4 * index,
            )
        while meta < len(metadata) and metadata[meta][1] <= start:
            meta += 1
        if meta < len(metadata) and metadata[meta][0] < end:
            raise FormatError(
                f"BAT entry {index} places a block (sector {entry}) over the image's metadata "
                f"at {metadata[meta][0]:#x}",
                path=label, field="BAT", offset=bat_offset + 4 * index,
            )
        previous_end, previous_index = end, index
    return previous_end


def sectors_present(bitmap: bytes | bytearray, first: int, end: int) -> bool:
    """Whether the bitmap marks every sector in ``[first, end)`` present."""
    return all(bitmap[s >> 3] & (0x80 >> (s & 7)) for s in range(first, end))


def set_sectors(bitmap: bytearray, first: int, end: int) -> bool:
    """Mark sectors ``[first, end)`` present; whether any bit changed."""
    changed = False
    for sector in range(first, end):
        mask = 0x80 >> (sector & 7)
        if not bitmap[sector >> 3] & mask:
            bitmap[sector >> 3] |= mask
            changed = True
    return changed
