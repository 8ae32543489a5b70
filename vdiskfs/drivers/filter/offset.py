"""Filter ``offset``: a window of ``length`` bytes at ``offset`` of the child, as nbdkit's
``filters/offset`` (its ``offset=`` and ``range=``).

A partition file is one: a window onto the whole-disk node, whatever format that disk is. The
filter only shifts offsets; every verb goes to the child's public verb (which checks and counts
it), block status passes through as the child reports it, as QEMU's filters do with
``bdrv_co_block_status_from_file``, and a range the child leaves to its backing file leads
there through :meth:`OffsetNode.unallocated_source`, shifted.
"""

from __future__ import annotations

from typing import Any

from vdiskfs.block.node import BlockNode, BlockStatus, Buffer, FilterNode
from vdiskfs.errors import RangeError, UnsupportedError

__all__ = ["OffsetNode"]


class OffsetNode(FilterNode):
    """The bytes ``[offset, offset + length)`` of ``child``; ``length`` None: to its end.

    ``owns_child`` False for a window onto a node that something else owns and closes (a
    partition onto its disk): closing the window leaves the child open.
    """

    driver = "offset"

    def __init__(self, child: BlockNode, *, offset: int = 0, length: int | None = None,
                 owns_child: bool = True) -> None:
        super().__init__(child, owns_child=owns_child)
        self.offset = offset
        self.length = length

    async def open(self) -> None:
        # The child is open already (a filter is put over an open node): check against its
        # size now, as nbdkit's offset_get_size does, so a bad window fails at open, naming it.
        child_size = self.file.size
        length = max(0, child_size - self.offset) if self.length is None else self.length
        if self.offset < 0 or length < 0 or self.offset + length > child_size:
            raise RangeError(
                f"window of {length} bytes at {self.offset} exceeds the underlying "
                f"{child_size} bytes",
                path=self.label,
            )
        self.length = length
        self.size = length

    def info(self) -> dict[str, Any]:
        return {"offset": self.offset, "range": self.length}

    def content_key(self) -> str | None:
        # A window shows part of the child's content: its name must differ from the child's.
        key = self.file.content_key()
        return None if key is None else f"{key}#offset={self.offset},range={self.length}"

    def unallocated_source(self) -> tuple[BlockNode, int] | None:
        source = self.file.unallocated_source()
        if source is None:
            return None
        node, shift = source
        return node, shift + self.offset

    async def truncate(self, size: int) -> None:
        # Resizing a window would move the bytes after it in the child (the next partition).
        raise UnsupportedError("offset: a window cannot be truncated", path=self.label)

    async def _pread(self, offset: int, length: int) -> Buffer:
        return await self.file.pread(self.offset + offset, length)

    async def _pwrite(self, offset: int, data: Buffer) -> None:
        await self.file.pwrite(self.offset + offset, data)

    async def _zero(self, offset: int, length: int, may_unmap: bool) -> None:
        await self.file.zero(self.offset + offset, length, may_unmap=may_unmap)

    async def _discard(self, offset: int, length: int) -> None:
        await self.file.discard(self.offset + offset, length)

    async def _block_status(self, offset: int, length: int) -> tuple[BlockStatus, int]:
        return await self.file.block_status(self.offset + offset, length)
