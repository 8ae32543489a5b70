"""Partition tables: MBR (with logical partitions) and GPT, read through any block node.

``await read_partition_table(node)`` returns a :class:`PartitionTable` whose partitions are
numbered as Linux numbers them (``/dev/sdaN``), in bytes, ready to become windows over the disk::

    table = await read_partition_table(disk)
    for part in table.partitions:
        window = await open_window(disk, part)

Numbering: MBR primaries 1-4 by slot (empty slots leave gaps), the extended partition as a 1 KiB
window at its slot number, logical partitions from 5 in EBR chain order; GPT entries by index + 1
(unused entries leave gaps); at most 255. A damaged table never raises: what is skipped, cut or
suspicious is in :attr:`PartitionTable.warnings` and logged. See :mod:`.mbr`, :mod:`.gpt` and
:mod:`.scan` for the exact rules and where they follow or depart from Linux.
"""

from collections.abc import Callable

from vdiskfs.block.node import BlockNode
from vdiskfs.drivers.filter.offset import OffsetNode
from vdiskfs.partitions.model import MAX_PARTITION_NUMBER, Partition, PartitionTable
from vdiskfs.partitions.scan import SECTOR_SIZES, read_partition_table

__all__ = [
    "MAX_PARTITION_NUMBER",
    "SECTOR_SIZES",
    "Partition",
    "PartitionTable",
    "open_window",
    "read_partition_table",
    "scan_disk",
]


async def scan_disk(disk: BlockNode, warn: Callable[[str], None] | None = None
                    ) -> PartitionTable:
    """The disk's partition table, its warnings kept with the disk's own (``info`` and the
    mount show them) and handed to ``warn``."""
    table = await read_partition_table(disk, label=disk.label)
    disk.warnings.extend(table.warnings)
    if warn is not None:
        for warning in table.warnings:
            warn(warning)
    return table


async def open_window(disk: BlockNode, part: Partition) -> OffsetNode:
    """The partition's bytes: an offset filter over ``disk``, in the disk's mode, open. The
    disk owns its tree: closing the window leaves the disk open, and the disk must outlive it."""
    window = OffsetNode(disk, offset=part.start, length=part.size, owns_child=False)
    await window.open()
    return window
