"""Protocol driver ``file``: the only layer that touches the host's files.

Every request is one positional system call (``os.pread``/``os.pwrite``), so concurrent requests
never race on a shared file position. Reads and writes run inline on the trio thread, even when
they wait for the disk: the daemon is bound by the CPU of its one Python thread, and a hop to a
worker thread costs more CPU than it saves. Measured here (``scripts/bench/read.py``, cold
page cache, alternating runs): random 4 KiB reads through FUSE at queue depth 1 made 9.1k and
11.0k IOPS inline against 6.2k and 7.2k with cache misses sent to threads (preadv RWF_NOWAIT
first), and at queue depth 16 10.7k and 11.5k against 7.2k and 7.9k; a cached read inline
costs a sixth to a twelfth of a hop (``scripts/bench/file_inline_vs_thread.py``). Only
``fdatasync``, which blocks for milliseconds and is rare, runs in a worker thread.

Image locking is QEMU's (``block/file-posix.c``), so vdiskfs and QEMU see each other: open file
description locks on byte ``100 + i`` for each permission bit ``i`` the opener holds, and on
``200 + i`` for each one it does not share with others. A writer holds read, write, unchanged
write and resize and shares only read and unchanged write; a reader holds read and does not
share write or resize. A writer that meets a conflict is refused; a reader is warned and then
shares everything (QEMU's ``-U``), because looking at an image in use is still useful.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
from dataclasses import dataclass
from typing import Any

import trio

from vdiskfs.block.node import BlockNode, BlockStatus, Buffer, NodeKind
from vdiskfs.block.stats import Counters
from vdiskfs.drivers.protocol import _linux
from vdiskfs.errors import HostIOError, LockedError

__all__ = ["FileNode"]

# QEMU's permissions (include/block/block-common.h) and lock byte bases (block/file-posix.c).
PERM_CONSISTENT_READ = 0x1
PERM_WRITE = 0x2
PERM_WRITE_UNCHANGED = 0x4
PERM_RESIZE = 0x8
PERM_ALL = 0xF
PERM_NAMES = {
    PERM_CONSISTENT_READ: "consistent read",
    PERM_WRITE: "write",
    PERM_WRITE_UNCHANGED: "write unchanged",
    PERM_RESIZE: "resize",
}
LOCK_PERM_BASE = 100
LOCK_SHARED_BASE = 200


@dataclass(slots=True)
class FileCounters(Counters):
    #: System calls made on the file (pread, pwrite, fdatasync, fallocate, lseek, ftruncate).
    syscalls: int = 0
    pread_calls: int = 0
    pwrite_calls: int = 0
    sync_calls: int = 0


class FileNode(BlockNode):
    """A regular file or block device on the host."""

    driver = "file"
    kind = NodeKind.PROTOCOL
    counters_class = FileCounters
    counters: FileCounters

    def __init__(self, path: str, *, read_only: bool = True, locking: bool = True) -> None:
        super().__init__(read_only=read_only, label=path)
        self.path = path
        self.fd = -1
        self.is_block_device = False
        self.locking = locking
        #: Set when a read-only open found the image in use by a writer (see module doc).
        self.lock_warning: str | None = None

    async def open(self) -> None:
        flags = (os.O_RDONLY if self.read_only else os.O_RDWR) | os.O_CLOEXEC
        try:
            self.fd = os.open(self.path, flags)
            st = os.fstat(self.fd)
            if stat.S_ISDIR(st.st_mode):
                raise IsADirectoryError(errno.EISDIR, "is a directory")
            self.is_block_device = stat.S_ISBLK(st.st_mode)
            self.size = os.lseek(self.fd, 0, os.SEEK_END) if self.is_block_device else st.st_size
        except OSError as exc:
            self._close_fd()
            raise HostIOError.wrap(exc, self.path, "cannot open") from exc
        if self.locking:
            try:
                self._take_locks()
            except BaseException:
                self._close_fd()
                raise
        # A writable regular file grows when a format driver allocates past its end.
        self.growable = not self.read_only and not self.is_block_device

    def _close_fd(self) -> None:
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            os.close(fd)

    def _take_locks(self) -> None:
        if self.read_only:
            perm, shared = PERM_CONSISTENT_READ, PERM_ALL & ~(PERM_WRITE | PERM_RESIZE)
        else:
            perm = PERM_ALL
            shared = PERM_CONSISTENT_READ | PERM_WRITE_UNCHANGED
        try:
            # Lock first, then test: two openers racing both see each other's bytes.
            self._apply_locks(perm, shared)
            conflict = self._find_conflict(perm, shared)
        except OSError as exc:
            if exc.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                return  # a file system without OFD locks (some network file systems)
            raise HostIOError.wrap(exc, self.path, "cannot lock") from exc
        if conflict is None:
            return
        if not self.read_only:
            self._apply_locks(0, PERM_ALL)
            raise LockedError(
                f'failed to get "{conflict}" lock: is another process (QEMU, vdiskfs) '
                "using the image?",
                path=self.path,
            )
        # Reading an image that something writes: allowed, with a warning, sharing everything.
        self._apply_locks(perm, PERM_ALL)
        self.lock_warning = (
            f'{self.path}: another process is using the image ("{conflict}" lock held); '
            "reading it anyway, but what it shows may change or be inconsistent"
        )

    def _apply_locks(self, perm: int, shared: int) -> None:
        for bit in PERM_NAMES:
            _linux.ofd_lock(self.fd, LOCK_PERM_BASE + bit.bit_length() - 1,
                            fcntl.F_RDLCK if perm & bit else fcntl.F_UNLCK)
            _linux.ofd_lock(self.fd, LOCK_SHARED_BASE + bit.bit_length() - 1,
                            fcntl.F_UNLCK if shared & bit else fcntl.F_RDLCK)

    def _find_conflict(self, perm: int, shared: int) -> str | None:
        """The first permission another opener denies us, as QEMU's raw_check_lock_bytes."""
        for bit, name in PERM_NAMES.items():
            index = bit.bit_length() - 1
            if perm & bit and _linux.ofd_conflicts(self.fd, LOCK_SHARED_BASE + index):
                return name
            if not shared & bit and _linux.ofd_conflicts(self.fd, LOCK_PERM_BASE + index):
                return f"shared {name}"
        return None

    async def _close(self) -> None:
        # Closing the descriptor releases its OFD locks.
        self._close_fd()

    def info(self) -> dict[str, Any]:
        try:
            st = os.fstat(self.fd)
        except OSError:
            return {}
        return {"disk_size": st.st_blocks * 512, "filename": self.path}

    async def _pread(self, offset: int, length: int) -> Buffer:
        counters = self.counters
        counters.syscalls += 1
        counters.pread_calls += 1
        try:
            data = os.pread(self.fd, length, offset)
            if len(data) == length:
                return data
            # Short read: retry the rest; a file that shrank under us is an I/O error.
            buf = bytearray(data)
            while len(buf) < length:
                counters.syscalls += 1
                counters.pread_calls += 1
                more = os.pread(self.fd, length - len(buf), offset + len(buf))
                if not more:
                    raise OSError(errno.EIO, f"file ends at {offset + len(buf)} (shrunk?)")
                buf += more
            return buf
        except OSError as exc:
            raise HostIOError.wrap(exc, self.path, "read failed", offset) from exc

    async def _pwrite(self, offset: int, data: Buffer) -> None:
        counters = self.counters
        view = memoryview(data)
        done = 0
        try:
            while done < len(view):
                counters.syscalls += 1
                counters.pwrite_calls += 1
                done += os.pwrite(self.fd, view[done:], offset + done)
        except OSError as exc:
            raise HostIOError.wrap(exc, self.path, "write failed", offset + done) from exc
        end = offset + len(view)
        if end > self.size:
            self.size = end

    async def _flush(self) -> None:
        self.counters.syscalls += 1
        self.counters.sync_calls += 1
        try:
            await trio.to_thread.run_sync(os.fdatasync, self.fd)
        except OSError as exc:
            raise HostIOError.wrap(exc, self.path, "fdatasync failed") from exc

    async def truncate(self, size: int) -> None:
        """Set the file's length (a format driver preallocating or shrinking after a crash)."""
        self.counters.syscalls += 1
        try:
            os.ftruncate(self.fd, size)
        except OSError as exc:
            raise HostIOError.wrap(exc, self.path, "ftruncate failed", size) from exc
        self.size = size

    async def _zero(self, offset: int, length: int, may_unmap: bool) -> None:
        end = offset + length
        if end > self.size and not self.is_block_device:
            # Past the end: extending the file gives zeros without writing them.
            old_size = self.size
            await self.truncate(end)
            if offset >= old_size:
                return
            length = old_size - offset
        mode = (
            _linux.FALLOC_FL_PUNCH_HOLE | _linux.FALLOC_FL_KEEP_SIZE
            if may_unmap
            else _linux.FALLOC_FL_ZERO_RANGE | _linux.FALLOC_FL_KEEP_SIZE
        )
        self.counters.syscalls += 1
        try:
            _linux.fallocate(self.fd, mode, offset, length)
            return
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL, errno.ENODEV):
                raise HostIOError.wrap(exc, self.path, "fallocate failed", offset) from exc
        await super()._zero(offset, length, may_unmap)

    async def _discard(self, offset: int, length: int) -> None:
        self.counters.syscalls += 1
        try:
            _linux.fallocate(
                self.fd, _linux.FALLOC_FL_PUNCH_HOLE | _linux.FALLOC_FL_KEEP_SIZE, offset, length
            )
        except OSError as exc:
            # Discard is advisory: a file system without hole punching simply keeps the data.
            if exc.errno not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.ENODEV):
                raise HostIOError.wrap(exc, self.path, "discard failed", offset) from exc

    async def _block_status(self, offset: int, length: int) -> tuple[BlockStatus, int]:
        if self.is_block_device:
            return BlockStatus.DATA | BlockStatus.ALLOCATED, length
        self.counters.syscalls += 1
        try:
            data = os.lseek(self.fd, offset, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # only a hole until the end of the file
                return BlockStatus.ZERO | BlockStatus.ALLOCATED, length
            return BlockStatus.DATA | BlockStatus.ALLOCATED, length
        if data > offset:
            return BlockStatus.ZERO | BlockStatus.ALLOCATED, min(length, data - offset)
        self.counters.syscalls += 1
        try:
            hole = os.lseek(self.fd, offset, os.SEEK_HOLE)
        except OSError:
            return BlockStatus.DATA | BlockStatus.ALLOCATED, length
        return BlockStatus.DATA | BlockStatus.ALLOCATED, max(1, min(length, hole - offset))

