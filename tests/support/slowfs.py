"""A FUSE file system whose reads and writes take as long as a test says: slow host I/O for
the tests of requests cancelled while the host works on them.

It shows the regular files of a source directory (those there at mount time), passing every
request through to them, each read and write first sleeping for the number of seconds written
in a control file (read at every request: a test changes the delay while mounted; no file or an
empty one: no delay). Every open uses ``direct_io``, so each read reaches this process rather
than the page cache. It runs in a process of its own (``python -m tests.support.slowfs SOURCE
MOUNTPOINT CONTROL``): see :func:`slow_mount`.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import sys
from collections.abc import Iterator
from pathlib import Path

import pyfuse3
import trio

from tests.support.mount import child_fs_mounted

ROOT = pyfuse3.ROOT_INODE


class SlowOperations(pyfuse3.Operations):
    enable_writeback_cache = False

    def __init__(self, source: Path, control: Path) -> None:
        super().__init__()
        self.source = source
        self.control = control
        names = sorted(p.name for p in source.iterdir() if p.is_file())
        self.inodes = {os.fsencode(name): ROOT + 1 + i for i, name in enumerate(names)}
        self.paths = {inode: source / os.fsdecode(name) for name, inode in self.inodes.items()}
        self.fds: dict[int, int] = {}

    def _delay(self) -> float:
        try:
            return float(self.control.read_text().strip() or 0)
        except (OSError, ValueError):
            return 0.0

    def _attr(self, inode: int) -> pyfuse3.EntryAttributes:
        attr = pyfuse3.EntryAttributes()
        if inode == ROOT:
            attr.st_mode = stat.S_IFDIR | 0o755
            attr.st_nlink = 2
        else:
            st = os.stat(self.paths[inode])
            attr.st_mode = st.st_mode
            attr.st_nlink = 1
            attr.st_size = st.st_size
            attr.st_blocks = st.st_blocks
            attr.st_mtime_ns = st.st_mtime_ns
        attr.st_ino = inode
        attr.st_blksize = 4096
        attr.entry_timeout = attr.attr_timeout = 0
        return attr

    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext | None = None
                      ) -> pyfuse3.EntryAttributes:
        if inode != ROOT and inode not in self.paths:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attr(inode)

    async def lookup(self, parent_inode: int, name: bytes,
                     ctx: pyfuse3.RequestContext | None = None) -> pyfuse3.EntryAttributes:
        inode = self.inodes.get(name)
        if parent_inode != ROOT or inode is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attr(inode)

    async def setattr(self, inode: int, attr: pyfuse3.EntryAttributes,
                      fields: pyfuse3.SetattrFields, fh: int | None,
                      ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        if fields.update_size:
            os.truncate(self.paths[inode], attr.st_size)
        return self._attr(inode)

    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        return inode

    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        entries = list(self.inodes.items())
        for position in range(start_id, len(entries)):
            name, inode = entries[position]
            if not pyfuse3.readdir_reply(token, name, self._attr(inode), position + 1):
                break

    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext
                   ) -> pyfuse3.FileInfo:
        fd = os.open(self.paths[inode], flags & ~(os.O_CREAT | os.O_EXCL | os.O_TRUNC))
        self.fds[fd] = inode
        return pyfuse3.FileInfo(fh=fd, direct_io=True)

    async def read(self, fh: int, off: int, size: int) -> bytes:
        await trio.sleep(self._delay())
        return os.pread(fh, size, off)

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        await trio.sleep(self._delay())
        return os.pwrite(fh, buf, off)

    async def fsync(self, fh: int, datasync: bool) -> None:
        os.fdatasync(fh)

    async def release(self, fh: int) -> None:
        self.fds.pop(fh, None)
        os.close(fh)


def main(source: str, mountpoint: str, control: str) -> None:
    operations = SlowOperations(Path(source), Path(control))
    pyfuse3.init(operations, mountpoint, ["fsname=slowfs", "default_permissions"])
    try:
        trio.run(pyfuse3.main)
    finally:
        pyfuse3.close(unmount=True)


@contextlib.contextmanager
def slow_mount(source: Path, mountpoint: Path, control: Path) -> Iterator[Path]:
    """Mount ``source`` slowed by ``control`` at ``mountpoint`` (in a child process); unmount
    and end it afterwards."""
    args = [str(source), str(mountpoint), str(control)]
    with child_fs_mounted("tests.support.slowfs", args, mountpoint, "slowfs"):
        yield mountpoint

if __name__ == "__main__":
    main(*sys.argv[1:4])
