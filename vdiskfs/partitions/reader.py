"""Whole logical sectors from a node: the only I/O a partition table scan does."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from vdiskfs.block.node import BlockNode

__all__ = ["SectorReader"]


class SectorReader:
    """Reads logical sectors of ``sector_size`` bytes through ``node.pread``.

    Offsets read from a table are untrusted: :meth:`read` answers ``None`` for any range not
    wholly inside the disk instead of raising, so that a parser skips the entry with a warning.
    A partial sector at the end of the disk (a size that is not a multiple of the sector size)
    is not a sector, as for Linux's ``last_lba``.
    """

    def __init__(self, node: BlockNode, sector_size: int) -> None:
        self.node = node
        self.sector_size = sector_size
        #: Whole sectors on the disk.
        self.sectors = node.size // sector_size

    @property
    def disk_size(self) -> int:
        """Bytes of the disk (partitions are checked against this, not the whole sectors)."""
        return self.node.size

    @property
    def last_lba(self) -> int:
        """Last whole sector, -1 on a disk smaller than one sector."""
        return self.sectors - 1

    def contains(self, lba: int, count: int = 1) -> bool:
        return lba >= 0 and count > 0 and lba + count <= self.sectors

    async def read(self, lba: int, count: int = 1) -> bytes | None:
        """``count`` sectors from ``lba``, or ``None`` when they are not all on the disk."""
        if not self.contains(lba, count):
            return None
        return bytes(await self.node.pread(lba * self.sector_size, count * self.sector_size))
