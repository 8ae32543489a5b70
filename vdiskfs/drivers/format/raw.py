"""Format driver ``raw``: the guest bytes are the child's bytes.

A window of them (a partition file) is the ``offset`` filter's work
(:mod:`vdiskfs.drivers.filter.offset`), as nbdkit keeps it apart from its plugins. QEMU's raw
driver takes ``offset``/``size`` options too; nothing here names them (no ``json:`` filename,
no vmdk extent opens a raw node), so raw has none.
"""

from __future__ import annotations

import os

from vdiskfs.block.format import FormatNode
from vdiskfs.block.node import BlockNode, BlockStatus, Buffer
from vdiskfs.block.registry import register
from vdiskfs.errors import HostIOError, UnsupportedError

__all__ = ["RawNode", "create_raw"]


@register
class RawNode(FormatNode):
    driver = "raw"
    supports_write = True

    @classmethod
    def probe(cls, head: bytes, tail: bytes, filename: str) -> int:
        # Anything is raw; every other driver must outscore this.
        return 1

    async def open(self) -> None:
        self.size = self.file.size

    async def _pread(self, offset: int, length: int) -> Buffer:
        return await self.file.pread(offset, length)

    async def _pwrite(self, offset: int, data: Buffer) -> None:
        await self.file.pwrite(offset, data)

    async def _zero(self, offset: int, length: int, may_unmap: bool) -> None:
        await self.file.zero(offset, length, may_unmap=may_unmap)

    async def _discard(self, offset: int, length: int) -> None:
        await self.file.discard(offset, length)

    async def _block_status(self, offset: int, length: int) -> tuple[BlockStatus, int]:
        status, run = await self.file.block_status(offset, length)
        if not status & (BlockStatus.DATA | BlockStatus.ZERO):
            # A child that leaves the range to a node below it: say so, and
            # unallocated_source() leads there (as QEMU's raw driver recurses into its file).
            return status, run
        # Raw has no backing file: everything else is allocated here.
        kind = BlockStatus.ZERO if status & BlockStatus.ZERO else BlockStatus.DATA
        return kind | BlockStatus.ALLOCATED, run

    def unallocated_source(self) -> tuple[BlockNode, int] | None:
        return self.file.unallocated_source()


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
