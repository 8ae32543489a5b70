"""Format driver ``raw``: the guest bytes are the child's bytes, optionally a window of them.

The window (``offset``/``size``) is what partition files are: a raw node over the whole-disk
node, as nbdkit's offset and partition filters are.
"""

from __future__ import annotations

import os
from typing import Any

from vdiskfs.block.format import FormatNode
from vdiskfs.block.node import BlockNode, BlockStatus, Buffer
from vdiskfs.block.registry import OpenContext, OpenOptions, register
from vdiskfs.errors import HostIOError, RangeError, UnsupportedError

__all__ = ["RawNode", "create_raw"]


@register
class RawNode(FormatNode):
    driver = "raw"
    supports_write = True

    def __init__(
        self,
        file: BlockNode,
        ctx: OpenContext | None = None,
        *,
        offset: int = 0,
        size: int | None = None,
        owned: bool = True,
    ) -> None:
        if ctx is None:
            ctx = OpenContext(OpenOptions(read_only=file.read_only), path=file.label)
        super().__init__(file, ctx)
        if not owned:
            self.children[0] = type(self.children[0])("file", file, owned=False)
        self.window_offset = offset
        self.window_size = size

    @classmethod
    def probe(cls, head: bytes, tail: bytes, filename: str) -> int:
        # Anything is raw; every other driver must outscore this.
        return 1

    async def open(self) -> None:
        child_size = self.file.size
        if self.window_size is None:
            self.window_size = max(0, child_size - self.window_offset)
        if self.window_offset < 0 or self.window_offset + self.window_size > child_size:
            raise RangeError(
                f"window of {self.window_size} bytes at {self.window_offset} exceeds the "
                f"underlying {child_size} bytes",
                path=self.label,
            )
        self.size = self.window_size

    def info(self) -> dict[str, Any]:
        if self.window_offset or self.window_size != self.file.size:
            return {"offset": self.window_offset, "size": self.window_size}
        return {}

    async def _pread(self, offset: int, length: int) -> Buffer:
        return await self.file.pread(self.window_offset + offset, length)

    async def _pwrite(self, offset: int, data: Buffer) -> None:
        await self.file.pwrite(self.window_offset + offset, data)

    async def _zero(self, offset: int, length: int, may_unmap: bool) -> None:
        await self.file.zero(self.window_offset + offset, length, may_unmap=may_unmap)

    async def _discard(self, offset: int, length: int) -> None:
        await self.file.discard(self.window_offset + offset, length)

    async def _block_status(self, offset: int, length: int) -> tuple[BlockStatus, int]:
        status, run = await self.file.block_status(self.window_offset + offset, length)
        if not status & (BlockStatus.DATA | BlockStatus.ZERO):
            # A window onto an image (a partition file) whose range reads from that image's
            # backing file: say so, and unallocated_source() leads there.
            return status, run
        # Raw has no backing file: everything else is allocated here.
        kind = BlockStatus.ZERO if status & BlockStatus.ZERO else BlockStatus.DATA
        return kind | BlockStatus.ALLOCATED, run

    def unallocated_source(self) -> tuple[BlockNode, int] | None:
        source = self.file.unallocated_source()
        if source is None:
            return None
        node, shift = source
        return node, shift + self.window_offset


async def create_raw(path: str, size: int, *, preallocation: str = "off") -> None:
    """A new raw image: sparse (``off``), allocated (``falloc``) or written with zeros (``full``).

    The file must not exist; on failure no partial file is left behind.
    """
    if preallocation not in ("off", "falloc", "full"):
        raise UnsupportedError(
            f"preallocation={preallocation!r} (valid: off, falloc, full)", path=path
        )
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        raise HostIOError.wrap(exc, path, "cannot create") from exc
    try:
        if preallocation == "falloc" and size:
            os.posix_fallocate(fd, 0, size)
        elif preallocation == "full":
            chunk = bytes(1 << 20)
            for offset in range(0, size, len(chunk)):
                os.pwrite(fd, chunk[: min(len(chunk), size - offset)], offset)
        os.ftruncate(fd, size)
        os.fsync(fd)
    except OSError as exc:
        os.close(fd)
        os.unlink(path)
        raise HostIOError.wrap(exc, path, "cannot create") from exc
    os.close(fd)
