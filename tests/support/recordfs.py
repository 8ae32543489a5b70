"""A FUSE file system that records the lseek and fallocate requests it gets: the test bed of
the project's pyfuse3 patch (``scripts/pyfuse3/``).

It shows one file, ``sparse``, of :data:`SIZE` bytes whose data are the :data:`EXTENTS` (the
rest are holes, read as zeros). Every ``lseek`` (SEEK_DATA/SEEK_HOLE), ``fallocate`` and
``write`` request is appended to a log file as a JSON line before it is answered, so a test
reads the log right after its system call returns. The connection limits are class attributes
(:class:`RecordingOperations`); ``--bare`` leaves out the lseek and fallocate handlers and the
limits, to check what the kernel does with pyfuse3's defaults. It runs in a process of its own
(``python -m tests.support.recordfs MOUNTPOINT LOG [--bare]``): see :func:`record_mount`.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import stat
import sys
from collections.abc import Iterator
from pathlib import Path

import pyfuse3
import trio

from tests.support.mount import child_fs_mounted

ROOT = pyfuse3.ROOT_INODE
FILE = ROOT + 1
NAME = b"sparse"
SIZE = 1 << 20
#: (offset, length) of the data; everything else is a hole.
EXTENTS = ((64 << 10, 64 << 10), (512 << 10, 64 << 10))


class BareOperations(pyfuse3.Operations):
    """One read-write file, no lseek or fallocate handler, no connection limits."""

    def __init__(self, log: Path) -> None:
        super().__init__()
        self.log = log
        self.data = bytearray(SIZE)
        for offset, length in EXTENTS:
            self.data[offset : offset + length] = b"\xa5" * length

    def record(self, **call: int | str) -> None:
        with self.log.open("a") as f:
            f.write(json.dumps(call) + "\n")

    def _attr(self, inode: int) -> pyfuse3.EntryAttributes:
        attr = pyfuse3.EntryAttributes()
        if inode == ROOT:
            attr.st_mode = stat.S_IFDIR | 0o755
            attr.st_nlink = 2
        else:
            attr.st_mode = stat.S_IFREG | 0o644
            attr.st_nlink = 1
            attr.st_size = SIZE
        attr.st_ino = inode
        attr.st_blksize = 4096
        attr.entry_timeout = attr.attr_timeout = 300
        return attr

    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext | None = None
                      ) -> pyfuse3.EntryAttributes:
        if inode not in (ROOT, FILE):
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attr(inode)

    async def lookup(self, parent_inode: int, name: bytes,
                     ctx: pyfuse3.RequestContext | None = None) -> pyfuse3.EntryAttributes:
        if parent_inode != ROOT or name != NAME:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attr(FILE)

    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        return inode

    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        if start_id == 0:
            pyfuse3.readdir_reply(token, NAME, self._attr(FILE), 1)

    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext
                   ) -> pyfuse3.FileInfo:
        if inode != FILE:
            raise pyfuse3.FUSEError(errno.EISDIR)
        # direct_io: every write reaches this process, split by max_write only.
        return pyfuse3.FileInfo(fh=FILE, direct_io=True)

    async def read(self, fh: int, off: int, size: int) -> bytes:
        return bytes(self.data[off : off + size])

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        self.record(op="write", off=off, size=len(buf))
        end = min(off + len(buf), SIZE)
        self.data[off:end] = buf[: end - off]
        return len(buf)

    async def release(self, fh: int) -> None:
        pass


class RecordingOperations(BareOperations):
    """Answers SEEK_DATA/SEEK_HOLE from :data:`EXTENTS` and records fallocate requests."""

    max_write = 64 << 10
    max_readahead = 64 << 10
    max_background = 40
    congestion_threshold = 30

    async def lseek(self, fh: int, off: int, whence: int) -> int:
        self.record(op="lseek", fh=fh, off=off, whence=whence)
        if off >= SIZE:
            raise pyfuse3.FUSEError(errno.ENXIO)
        for start, length in EXTENTS:
            if off < start + length:
                if whence == os.SEEK_DATA:
                    return max(off, start)
                return start + length if off >= start else off
        if whence == os.SEEK_DATA:
            raise pyfuse3.FUSEError(errno.ENXIO)
        return off

    async def fallocate(self, fh: int, mode: int, off: int, length: int) -> None:
        self.record(op="fallocate", fh=fh, mode=mode, off=off, length=length)


def main(mountpoint: str, log: str, *flags: str) -> None:
    cls = BareOperations if "--bare" in flags else RecordingOperations
    operations = cls(Path(log))
    pyfuse3.init(operations, mountpoint, ["fsname=recordfs", "default_permissions"])
    try:
        trio.run(pyfuse3.main)
    finally:
        pyfuse3.close(unmount=True)


def calls(log: Path, op: str) -> list[dict[str, int]]:
    """The recorded ``op`` requests, oldest first."""
    if not log.exists():
        return []
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    return [{k: v for k, v in call.items() if k != "op"} for call in lines if call["op"] == op]


@contextlib.contextmanager
def record_mount(mountpoint: Path, log: Path, *, bare: bool = False) -> Iterator[Path]:
    """Mount the file system at ``mountpoint`` (in a child process) recording into ``log``;
    unmount and end it afterwards. Yields the path of its file."""
    args = [str(mountpoint), str(log), *(["--bare"] if bare else [])]
    with child_fs_mounted("tests.support.recordfs", args, mountpoint, "recordfs"):
        yield mountpoint / os.fsdecode(NAME)

if __name__ == "__main__":
    main(*sys.argv[1:])
