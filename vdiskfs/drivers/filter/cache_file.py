"""The on-disk tier of the ``cache`` filter (``--cache-dir``): blocks of a remote image kept in
a sparse file, so that a second open of the same URL reads them locally.

One image is two files in the cache directory, named by a SHA-256 of the child's
:meth:`~vdiskfs.block.node.BlockNode.content_key` (which names the content: the URL without
credentials, the pinned ETag or Last-Modified, the size): ``<hash>.data``, a sparse file of the
image's size holding the blocks fetched so far, and ``<hash>.map``, a header and one byte per
block (1: present). No name or content of the directory shows the URL or its credentials.

Crash order: a block's bytes are written to ``.data`` before it counts as present, and the map
is written (to a temporary file, renamed) only at close, after an ``fdatasync`` of the data; a
crash loses the blocks since the last close, never claims a block whose bytes are missing. Two
opens of one image at once may each write the map; the later one wins, and a block that only
the other one wrote is fetched again: a loss, never a lie, because every writer of a map wrote
or found the bytes of the blocks it claims, and the content of a key never changes.
"""

from __future__ import annotations

import hashlib
import logging
import os
import struct

import trio

__all__ = ["BlockFile"]

log = logging.getLogger(__name__)

_MAGIC = b"VDKCACHE"
_HEADER = struct.Struct("<8sQQ")  # magic, block size, image size


class BlockFile:
    """The blocks of one image on disk; its methods that touch the disk run in threads."""

    def __init__(self, directory: str, key: str, size: int, block_size: int) -> None:
        name = hashlib.sha256(key.encode()).hexdigest()
        self.data_path = os.path.join(directory, f"{name}.data")
        self.map_path = os.path.join(directory, f"{name}.map")
        self.directory = directory
        self.size = size
        self.block_size = block_size
        self.present = bytearray(-(-size // block_size))
        self._fd = -1
        self._dirty = False

    @classmethod
    async def open(cls, directory: str, key: str, size: int, block_size: int) -> BlockFile:
        store = cls(directory, key, size, block_size)
        await trio.to_thread.run_sync(store._open)
        return store

    def _open(self) -> None:
        os.makedirs(self.directory, mode=0o700, exist_ok=True)
        self._fd = os.open(self.data_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            if os.fstat(self._fd).st_size != self.size:
                os.ftruncate(self._fd, self.size)
            self._load_map()
        except BaseException:
            os.close(self._fd)
            self._fd = -1
            raise

    def _load_map(self) -> None:
        try:
            with open(self.map_path, "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            return
        header = raw[: _HEADER.size]
        body = raw[_HEADER.size :]
        if (len(header) != _HEADER.size
                or _HEADER.unpack(header) != (_MAGIC, self.block_size, self.size)
                or len(body) != len(self.present)):
            log.info("%s: not a map of this image's blocks, starting afresh", self.map_path)
            return
        self.present[:] = body

    def has(self, index: int) -> bool:
        return self.present[index] == 1

    async def read(self, index: int) -> bytes:
        """The block ``index`` (which :meth:`has`)."""
        offset = index * self.block_size
        length = min(self.block_size, self.size - offset)
        data = await trio.to_thread.run_sync(os.pread, self._fd, length, offset)
        if len(data) != length:
            raise OSError(f"short read of a cached block ({len(data)} of {length} bytes)")
        return data

    async def write(self, index: int, data: bytes | bytearray | memoryview) -> None:
        """Store block ``index``; it counts as present once written."""
        def write() -> None:
            view = memoryview(data)
            offset = index * self.block_size
            while view:
                n = os.pwrite(self._fd, view, offset)
                view, offset = view[n:], offset + n

        await trio.to_thread.run_sync(write)
        self.present[index] = 1
        self._dirty = True

    async def close(self) -> None:
        """Make the data durable, then the map that claims it; close the file."""
        if self._fd < 0:
            return
        await trio.to_thread.run_sync(self._close)

    def _close(self) -> None:
        fd, self._fd = self._fd, -1
        try:
            if self._dirty:
                os.fdatasync(fd)
                tmp = f"{self.map_path}.{os.getpid()}.tmp"
                with open(tmp, "wb", opener=lambda p, f: os.open(p, f, 0o600)) as out:
                    out.write(_HEADER.pack(_MAGIC, self.block_size, self.size))
                    out.write(self.present)
                    out.flush()
                    os.fsync(out.fileno())
                os.replace(tmp, self.map_path)
        finally:
            os.close(fd)
