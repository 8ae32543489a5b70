"""A synchronous, read-only file object over a :class:`~vdiskfs.block.node.BlockNode`, for
libraries that want ``read``/``seek`` (dissect's file-system readers) rather than the async
``pread`` of the stack.

The stack lives on the trio loop; such a library is synchronous and may read many times while
it parses. So it runs in a worker thread (``trio.to_thread.run_sync``) and every read of this
object hands one ``pread`` back to the loop with ``trio.from_thread.run``: the node keeps
being used only from its loop, as everywhere else, and the loop stays free to serve other
work meanwhile. Used from any other thread it raises ``RuntimeError`` (trio's own).
"""

from __future__ import annotations

import io
from typing import TYPE_CHECKING

import trio

from vdiskfs.block.node import BlockNode

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer

__all__ = ["NodeFile", "open_node_file"]

#: Read-ahead of the buffered object: a file system's parser reads a few bytes at a time
#: (superblock fields, directory entries); each read is a round trip to the trio loop.
BUFFER_SIZE = 128 << 10


class NodeFile(io.RawIOBase):
    """The bytes of ``node`` as a seekable raw file; reads past the end are short."""

    def __init__(self, node: BlockNode) -> None:
        super().__init__()
        self.node = node
        self.size = node.size
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if whence == io.SEEK_SET:
            pos = offset
        elif whence == io.SEEK_CUR:
            pos = self._pos + offset
        elif whence == io.SEEK_END:
            pos = self.size + offset
        else:
            raise ValueError(f"invalid whence {whence}")
        if pos < 0:
            raise ValueError(f"negative seek position {pos}")
        self._pos = pos
        return pos

    def readinto(self, buffer: WriteableBuffer) -> int:
        view = memoryview(buffer).cast("B")
        length = min(len(view), self.size - self._pos)
        if length <= 0:
            return 0
        data = trio.from_thread.run(self.node.pread, self._pos, length)
        view[:length] = data
        self._pos += length
        return length


    def readall(self) -> bytes:
        # RawIOBase's would read the rest 8 KiB at a time, a loop round trip each.
        data = bytearray(max(self.size - self._pos, 0))
        return bytes(data[:self.readinto(data)])


def open_node_file(node: BlockNode) -> io.BufferedReader:
    """``node`` as a buffered binary file, for a worker thread of the node's trio loop."""
    return io.BufferedReader(NodeFile(node), buffer_size=BUFFER_SIZE)
