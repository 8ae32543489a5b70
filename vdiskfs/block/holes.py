"""Data and holes over a whole chain: what ``lseek(SEEK_DATA/SEEK_HOLE)`` says.

:meth:`BlockNode.block_status` answers for one node: a range it does not define reads from
somewhere below it (neither ``DATA`` nor ``ZERO``). These functions follow that down the chain,
as QEMU's ``bdrv_block_status_above`` does for its FUSE export's ``lseek``: a range is a *hole*
where every layer that decides it says it reads as zeros -- zero clusters, ranges unallocated
with no backing data below, past a shorter backing file's end, holes of the host file -- and
*data* everywhere else (stored bytes, even if they happen to be zeros; compressed clusters).

Like QEMU's ``fuse_lseek``, data is what carries the ``DATA`` flag: a range a layer reports
as both (an allocated cluster over a hole of its host file) counts as data.
"""

from __future__ import annotations

from vdiskfs.block.node import BlockNode, BlockStatus

__all__ = ["read_status", "seek_data", "seek_hole"]

_DATA = BlockStatus.DATA
_ZERO = BlockStatus.ZERO


async def read_status(node: BlockNode, offset: int, length: int) -> tuple[bool, int]:
    """``(is_data, run)``: whether ``[offset, offset + run)`` of ``node`` reads stored data
    (True) or zeros (False), over the whole chain below it; ``0 < run <= length``."""
    while True:
        status, run = await node.block_status(offset, length)
        if status & _DATA:
            return True, run
        if status & _ZERO:
            return False, run
        source = node.unallocated_source()
        if source is None:
            # Nothing below answers for it: it reads as zeros (QEMU's "unallocated, no
            # backing file").
            return False, run
        node, shift = source
        offset += shift
        length = run


async def seek_data(node: BlockNode, offset: int) -> int | None:
    """The first offset >= ``offset`` that holds data, or None if there is none (``ENXIO``)."""
    end = node.size
    while offset < end:
        is_data, run = await read_status(node, offset, end - offset)
        if is_data:
            return offset
        offset += run
    return None


async def seek_hole(node: BlockNode, offset: int) -> int:
    """The first offset >= ``offset`` in a hole; the end of the node counts as one (as
    ``lseek(SEEK_HOLE)`` on a file reports its size when it has no hole before it)."""
    end = node.size
    while offset < end:
        is_data, run = await read_status(node, offset, end - offset)
        if not is_data:
            return offset
        offset += run
    return end

