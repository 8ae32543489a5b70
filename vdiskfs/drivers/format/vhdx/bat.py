"""The VHDX block allocation table and the mapping of guest ranges (MS-VHDX 2.5).

The BAT is an array of 64-bit entries: bits 0-2 a state, bits 20-63 a file offset in MiB.
Payload block entries and sector bitmap entries are interleaved: every ``chunk_ratio`` payload
entries are followed by the sector bitmap entry of their chunk, where ``chunk_ratio = 2**23 *
logical_sector_size / block_size`` (a sector bitmap block is 1 MiB: one bit per sector of a
chunk).

Payload states and what a read returns (QEMU's choices where the spec lets the reader choose):

=========================  ================================================================
NOT_PRESENT (0)            the parent's bytes (differencing), else zeros: BACKING
UNDEFINED (1)              zeros ("arbitrary data" in the spec; QEMU returns zeros): ZERO
ZERO (2)                   zeros: ZERO
UNMAPPED (3), v0.95's 5    zeros (the spec allows the old contents or zeros): ZERO
FULLY_PRESENT (6)          the payload block in this file: DATA
PARTIALLY_PRESENT (7)      per sector, from the sector bitmap: DATA where the bit is set,
                           else the parent's bytes (differencing files only)
=========================  ================================================================

The mapping is pure: the node loads the BAT entries and sector bitmaps the functions below ask
for (:func:`payload_indices`, :func:`bitmap_needs`), then :func:`map_range` yields the runs.
"""

from __future__ import annotations

import enum
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

from vdiskfs.drivers.format.runs import Run, RunKind
from vdiskfs.drivers.format.vhdx.headers import HEADER_SECTION_SIZE, MIB
from vdiskfs.errors import FormatError

__all__ = [
    "BatGeometry",
    "PayloadState",
    "bitmap_needs",
    "map_range",
    "payload_index",
    "payload_indices",
    "sector_bitmap_index",
]

#: Sectors one sector bitmap block describes (2**23: 1 MiB of bits).
SECTORS_PER_BITMAP_BLOCK = 1 << 23
SECTOR_BITMAP_BLOCK_SIZE = MIB
STATE_MASK = 0x7
OFFSET_MASK = ~(MIB - 1) & 0xFFFFFFFFFFFFFFFF
SB_BLOCK_PRESENT = 6


class PayloadState(enum.IntEnum):
    NOT_PRESENT = 0
    UNDEFINED = 1
    ZERO = 2
    UNMAPPED = 3
    #: The VHDX 0.95 draft's value for UNMAPPED; QEMU still reads it as zeros.
    UNMAPPED_V095 = 5
    FULLY_PRESENT = 6
    PARTIALLY_PRESENT = 7


_ZERO_STATES = frozenset({PayloadState.UNDEFINED, PayloadState.ZERO, PayloadState.UNMAPPED,
                          PayloadState.UNMAPPED_V095})


@dataclass(frozen=True, slots=True)
class BatGeometry:
    """The sizes the mapping needs, and the file ranges no payload block may overlap."""

    virtual_size: int
    block_size: int
    logical_sector_size: int
    has_parent: bool
    #: Size of the file (or of the log-replay overlay over it).
    file_size: int
    #: ``(start, end, what)`` of the BAT, the metadata region and the log.
    reserved: tuple[tuple[int, int, str], ...]
    label: str

    @property
    def chunk_ratio(self) -> int:
        return SECTORS_PER_BITMAP_BLOCK * self.logical_sector_size // self.block_size

    @property
    def sectors_per_block(self) -> int:
        return self.block_size // self.logical_sector_size

    @property
    def payload_blocks(self) -> int:
        return -(-self.virtual_size // self.block_size)

    @property
    def bat_entries(self) -> int:
        """QEMU's ``vhdx_calc_bat_entries``: a differencing file has every chunk's bitmap
        entry; otherwise the last chunk's may be left out."""
        blocks = self.payload_blocks
        if self.has_parent:
            return -(-blocks // self.chunk_ratio) * (self.chunk_ratio + 1)
        return blocks + (blocks - 1) // self.chunk_ratio if blocks else 0

    @property
    def bitmap_bytes_per_block(self) -> int:
        return self.sectors_per_block // 8

    def block_length(self, block: int) -> int:
        """Bytes of ``block`` inside the disk: the last block may be short."""
        return min(self.block_size, self.virtual_size - block * self.block_size)

    def check_payload(self, block: int, entry: int) -> int:
        """The file offset of a present payload block, checked to lie inside the file, past
        the header section and clear of the BAT, metadata and log."""
        offset = entry & OFFSET_MASK
        self._check_range(offset, self.block_length(block), f"bat[{payload_index(self, block)}]",
                          f"payload block {block}")
        return offset

    def check_sector_bitmap(self, chunk: int, entry: int) -> int:
        """The file offset of a chunk's sector bitmap block, checked like a payload block."""
        index = chunk * (self.chunk_ratio + 1) + self.chunk_ratio
        field = f"bat[{index}]"
        if entry & STATE_MASK != SB_BLOCK_PRESENT:
            raise FormatError(
                f"a block of chunk {chunk} is partially present but its sector bitmap entry "
                f"has state {entry & STATE_MASK}, not present ({SB_BLOCK_PRESENT})",
                path=self.label, field=field)
        offset = entry & OFFSET_MASK
        self._check_range(offset, SECTOR_BITMAP_BLOCK_SIZE, field,
                          f"sector bitmap block of chunk {chunk}")
        return offset

    def _check_range(self, offset: int, length: int, field: str, what: str) -> None:
        if offset < HEADER_SECTION_SIZE or offset + length > self.file_size:
            raise FormatError(
                f"{what} ({length} bytes at {offset:#x}) lies outside the file's data area "
                f"(header section, file size {self.file_size})",
                path=self.label, field=field, offset=offset)
        for start, end, name in self.reserved:
            if offset < end and start < offset + length:
                raise FormatError(f"{what} ({length} bytes at {offset:#x}) overlaps {name}",
                                  path=self.label, field=field, offset=offset)


def payload_index(geom: BatGeometry, block: int) -> int:
    """BAT index of payload block ``block``: past one bitmap entry per earlier chunk."""
    return block + block // geom.chunk_ratio


def sector_bitmap_index(geom: BatGeometry, chunk: int) -> int:
    return chunk * (geom.chunk_ratio + 1) + geom.chunk_ratio


def _blocks(geom: BatGeometry, offset: int, length: int) -> range:
    return range(offset // geom.block_size, (offset + length - 1) // geom.block_size + 1)


def payload_indices(geom: BatGeometry, offset: int, length: int) -> list[int]:
    """The BAT entries mapping ``[offset, offset + length)`` reads."""
    return [payload_index(geom, block) for block in _blocks(geom, offset, length)]


def _state(geom: BatGeometry, block: int, entry: int) -> PayloadState:
    raw = entry & STATE_MASK
    try:
        state = PayloadState(raw)
    except ValueError:
        raise FormatError(f"payload block {block} has reserved state {raw}", path=geom.label,
                          field=f"bat[{payload_index(geom, block)}]") from None
    if state is PayloadState.PARTIALLY_PRESENT and not geom.has_parent:
        raise FormatError(f"payload block {block} is partially present in a file without a "
                          "parent", path=geom.label, field=f"bat[{payload_index(geom, block)}]")
    return state


def bitmap_needs(geom: BatGeometry, entries: Mapping[int, int], offset: int,
                 length: int) -> list[int]:
    """The partially present blocks of the range, whose sector bitmaps the node must load."""
    return [
        block
        for block in _blocks(geom, offset, length)
        if _state(geom, block, entries[payload_index(geom, block)])
        is PayloadState.PARTIALLY_PRESENT
    ]


def map_range(geom: BatGeometry, entries: Mapping[int, int], bitmaps: Mapping[int, bytes],
              offset: int, length: int) -> Iterator[Run]:
    """Yield the runs of ``[offset, offset + length)``.

    ``entries`` holds the payload BAT entries of the blocks touched, ``bitmaps`` the sector
    bitmap bytes (``bitmap_bytes_per_block`` of them) of every partially present one.
    """
    end = offset + length
    while offset < end:
        block, in_block = divmod(offset, geom.block_size)
        n = min(geom.block_size - in_block, end - offset)
        entry = entries[payload_index(geom, block)]
        state = _state(geom, block, entry)
        if state is PayloadState.NOT_PRESENT:
            yield Run(RunKind.BACKING, offset, n)
        elif state in _ZERO_STATES:
            yield Run(RunKind.ZERO, offset, n)
        else:
            host = geom.check_payload(block, entry)
            if state is PayloadState.FULLY_PRESENT:
                yield Run(RunKind.DATA, offset, n, host + in_block)
            else:
                yield from _split_by_bitmap(geom, bitmaps[block], host, offset - in_block,
                                            in_block, n)
        offset += n


def _split_by_bitmap(geom: BatGeometry, bitmap: bytes, host: int, block_start: int,
                     in_block: int, length: int) -> Iterator[Run]:
    """Runs of a partially present block: bit ``i`` (LSB first) set means sector ``i`` of the
    block is in this file, clear means it comes from the parent."""
    sector = geom.logical_sector_size
    first = in_block // sector
    last = (in_block + length - 1) // sector
    bits = int.from_bytes(bitmap, "little") >> first
    count = last - first + 1
    pos = in_block
    end = in_block + length
    i = 0
    while i < count:
        present = (bits >> i) & 1
        # Length of the run of equal bits starting at i, found with integer tricks instead of
        # a loop over every bit: flip the bits if needed and count trailing zeros.
        rest = (bits >> i) if not present else ~(bits >> i)
        rest &= (1 << (count - i)) - 1
        same = (rest & -rest).bit_length() - 1 if rest else count - i
        run_end = min(end, (first + i + same) * sector)
        if present:
            yield Run(RunKind.DATA, block_start + pos, run_end - pos, host + pos)
        else:
            yield Run(RunKind.BACKING, block_start + pos, run_end - pos)
        pos = run_end
        i += same
