"""Protocol driver ``file``: the only layer that touches the host's files.

Every request is positional (``pread``/``pwrite`` at an offset), so concurrent requests never
race on a shared file position, and none blocks the event loop: a read that the page cache
holds (``cachestat(2)`` says so) is made inline with ``preadv2(RWF_NOWAIT)``, a few
microseconds; every other read, every write and ``fdatasync`` go to the asynchronous engine
(:mod:`.engine`: io_uring, or a thread pool where io_uring is unavailable), which keeps many
host requests in flight. Before the engine, reads ran inline and waited for the disk one at a
time: a queue depth of 16 ran at depth-1 speed (about 10k IOPS at both, issue 9); a hop to
``trio.to_thread`` per miss had cost more than it saved, so the engine is built for it
(``scripts/bench/io_engines.py``).

Only regular files and block devices are opened: a FIFO, a socket, a character device or a
directory that an image names is refused (:class:`~vdiskfs.errors.NotADiskError`) without a
single read, because reading one could wait for ever (issue 10). The open runs in a worker
thread, so that a hung file system blocks only that thread, never the event loop.

Image locking is QEMU's (``block/file-posix.c``), so vdiskfs and QEMU see each other: open file
description locks on byte ``100 + i`` for each permission bit ``i`` the opener holds, and on
``200 + i`` for each one it does not share with others. A writer holds read, write, unchanged
write and resize and shares only read and unchanged write; a reader holds read and does not
share write or resize. A writer that meets a conflict is refused; a reader is warned and then
shares everything (QEMU's ``-U``), because looking at an image in use is still useful.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import trio

from vdiskfs.block.node import BlockNode, BlockStatus, Buffer, NodeKind
from vdiskfs.block.stats import StatsSnapshot
from vdiskfs.drivers.protocol import _linux
from vdiskfs.drivers.protocol.engine import HostFile, IoCounters, IoEngine, current_engine
from vdiskfs.errors import HostIOError, LockedError, NotADiskError

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
class FileCounters(IoCounters):
    """``syscalls`` counts every system call on the file (reads, writes, syncs, fallocate,
    lseek, ftruncate); the engine's counters come from :class:`~.engine.IoCounters`."""

    #: Read, write and sync requests this node served (each one or more system calls).
    pread_calls: int = 0
    pwrite_calls: int = 0
    sync_calls: int = 0


#: What each refused kind of file is called in the error, and its errno (a directory keeps
#: EISDIR, as ``open(2)`` of a directory for writing would say).
_REFUSED_KINDS = (
    (stat.S_ISFIFO, "a FIFO (named pipe)", errno.ENODEV),
    (stat.S_ISSOCK, "a socket", errno.ENODEV),
    (stat.S_ISCHR, "a character device", errno.ENODEV),
    (stat.S_ISDIR, "a directory", errno.EISDIR),
)


def _punch_block(fd: int, offset: int, length: int) -> None:
    """Write zeroes that may deallocate: the kernel sends a write-zeroes request without
    NOUNMAP, or fails with EOPNOTSUPP when the device has none (no fallback)."""
    _linux.fallocate(fd, _linux.FALLOC_FL_PUNCH_HOLE | _linux.FALLOC_FL_KEEP_SIZE, offset, length)


def _zeroout_block(fd: int, offset: int, length: int) -> None:
    """BLKZEROOUT: write zeroes without deallocating (the kernel writes zero pages itself
    when the device has no write-zeroes command)."""
    _linux.blk_range_ioctl(fd, _linux.BLKZEROOUT, offset, length)


def _discard_block(fd: int, offset: int, length: int) -> None:
    _linux.blk_range_ioctl(fd, _linux.BLKDISCARD, offset, length)


#: What a block device answers for a discard or write-zeroes it does not have: EOPNOTSUPP
#: (no such command, or fallocate without write-zeroes), ENOTTY (a driver without the ioctl),
#: EINVAL (some device-mapper targets).
_BLOCK_UNSUPPORTED = frozenset({errno.EOPNOTSUPP, errno.ENOTTY, errno.EINVAL, errno.ENOSYS,
                                errno.ENODEV})


def _check_disk_mode(mode: int, path: str) -> None:
    """Refuse a file that is not a regular file or a block device (see NotADiskError)."""
    if stat.S_ISREG(mode) or stat.S_ISBLK(mode):
        return
    # Every file type Linux has is listed; the default stands for any other.
    kind, err = next(((k, e) for test, k, e in _REFUSED_KINDS if test(mode)),
                     (f"a file of type {stat.S_IFMT(mode):#o}", errno.ENODEV))
    raise NotADiskError(f"{kind}, not a disk image (only regular files and block devices are "
                        "opened)", path=path, errno=err)


def _open_checked(path: str, read_only: bool) -> tuple[int, bool, int]:
    """Open ``path`` as a disk: ``(fd, is_block_device, size)``. Blocking; run in a thread.

    ``stat`` first, so that a character device is never even opened (opening some has side
    effects: a tape rewinds, a watchdog arms). ``O_NONBLOCK`` then makes the open itself return
    at once for a FIFO or a terminal that replaced the file in between (a FIFO opened for
    reading, or even read-write, does not wait for a peer with it), and ``fstat`` of the
    descriptor is the answer that counts. ``O_NOCTTY``: a terminal never becomes ours.
    """
    try:
        _check_disk_mode(os.stat(path).st_mode, path)
        flags = os.O_RDONLY if read_only else os.O_RDWR
        fd = os.open(path, flags | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY)
    except OSError as exc:
        raise HostIOError.wrap(exc, path, "cannot open") from exc
    try:
        st = os.fstat(fd)
        _check_disk_mode(st.st_mode, path)
        # io_uring answers EAGAIN instead of waiting on an O_NONBLOCK file: clear the flag.
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
        is_block_device = stat.S_ISBLK(st.st_mode)
        size = os.lseek(fd, 0, os.SEEK_END) if is_block_device else st.st_size
    except BaseException as exc:
        os.close(fd)
        if isinstance(exc, OSError):
            raise HostIOError.wrap(exc, path, "cannot open") from exc
        raise
    return fd, is_block_device, size


async def _open_abandonable(path: str, read_only: bool) -> tuple[int, bool, int]:
    """:func:`_open_checked` in a worker thread that a cancellation abandons.

    An abandoned thread may still succeed later: whichever of it and the cancelled caller comes
    second closes the descriptor, under a lock, so that it never leaks.
    """
    lock = threading.Lock()
    abandoned = False
    opened: int | None = None

    def work() -> tuple[int, bool, int]:
        nonlocal opened
        result = _open_checked(path, read_only)
        with lock:
            if abandoned:
                os.close(result[0])
            else:
                opened = result[0]
        return result

    try:
        return await trio.to_thread.run_sync(work, abandon_on_cancel=True)
    except BaseException:
        with lock:
            abandoned = True
            if opened is not None:
                # The thread finished, but its answer arrived after the cancellation.
                os.close(opened)
        raise


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
        #: A block device's logical sector size: the unit of BLKDISCARD and BLKZEROOUT.
        self.sector_size = 512
        self.locking = locking
        #: Set when a read-only open found the image in use by a writer (see module doc).
        self.lock_warning: str | None = None
        self._engine: IoEngine | None = None
        self._io: HostFile | None = None

    async def open(self) -> None:
        """Open the file, refusing anything that is not a regular file or a block device.

        The system calls run in a worker thread that a cancellation abandons: on a hung file
        system (a stopped FUSE daemon, an unreachable NFS server) ``open`` or ``stat`` can wait
        for ever even with ``O_NONBLOCK``, and the event loop must stay free to hear SIGTERM.
        """
        fd, self.is_block_device, self.size = await _open_abandonable(self.path, self.read_only)
        self.fd = fd
        if self.locking:
            try:
                self._take_locks()
            except BaseException:
                self._close_fd()
                raise
        if self.is_block_device:
            # Unknown: keep 512; misaligned ioctls then fail as unsupported and zeros are written.
            with contextlib.suppress(OSError):
                self.sector_size = _linux.blk_logical_sector_size(fd)
        # A writable regular file grows when a format driver allocates past its end.
        self.growable = not self.read_only and not self.is_block_device
        self._engine = current_engine()
        self._io = HostFile(self.fd, self.counters)

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

    async def allocated_size(self) -> int:
        fd = self.fd
        if fd < 0:
            return 0
        try:
            # fstat can wait on a network file system: off the event loop.
            st = await trio.to_thread.run_sync(os.fstat, fd, abandon_on_cancel=True)
        except OSError as exc:
            raise HostIOError.wrap(exc, self.path, "fstat failed") from exc
        return st.st_blocks * 512

    def stats_snapshot(self) -> StatsSnapshot:
        snapshot = super().stats_snapshot()
        engine = self._engine
        if engine is not None:
            # The engine's caps and bytes are shared by every file node of the daemon.
            snapshot.driver.update(
                io_engine=engine.name,
                engine_inflight_bytes_cap=engine.max_inflight_bytes,
                engine_max_inflight_bytes=engine.stats.max_inflight_bytes,
            )
        return snapshot

    async def _pread(self, offset: int, length: int) -> Buffer:
        self.counters.pread_calls += 1
        buf = bytearray(length)
        assert self._engine is not None and self._io is not None
        try:
            done = await self._engine.read(self._io, memoryview(buf), offset)
            if done < length:
                # A file that shrank under us is an I/O error, not zeros.
                raise OSError(errno.EIO, f"file ends at {offset + done} (shrunk?)")
        except OSError as exc:
            raise HostIOError.wrap(exc, self.path, "read failed", offset) from exc
        return buf

    async def _pwrite(self, offset: int, data: Buffer) -> None:
        self.counters.pwrite_calls += 1
        assert self._engine is not None and self._io is not None
        view = memoryview(data)
        try:
            await self._engine.write(self._io, view, offset)
        except OSError as exc:
            raise HostIOError.wrap(exc, self.path, "write failed", offset) from exc
        end = offset + len(view)
        if end > self.size:
            self.size = end

    async def _flush(self) -> None:
        self.counters.sync_calls += 1
        assert self._engine is not None and self._io is not None
        try:
            await self._engine.fdatasync(self._io)
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
        if self.is_block_device:
            await self._zero_block_device(offset, length, may_unmap)
            return
        end = offset + length
        if end > self.size:
            # Past the end: growing the file gives zeros without writing them. Grown by writing
            # its last byte, never by ftruncate: with writes in flight beyond self.size (which
            # counts only completed ones) ftruncate would cut them off (issue 9, found by
            # concurrent qcow2 allocations at the end of the file). A write only ever grows.
            old_size = self.size
            await self._pwrite(end - 1, b"\0")
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
        if self.is_block_device:
            # BLKDISCARD takes whole logical sectors: partial ones at the edges are left as
            # they are (discard is advisory), and a device without discard keeps its data.
            start, end = self._whole_sectors(offset, length)
            if start < end:
                await self._block_call((_discard_block,), start, end - start, "discard")
            return
        self.counters.syscalls += 1
        try:
            _linux.fallocate(
                self.fd, _linux.FALLOC_FL_PUNCH_HOLE | _linux.FALLOC_FL_KEEP_SIZE, offset, length
            )
        except OSError as exc:
            # Discard is advisory: a file system without hole punching simply keeps the data.
            if exc.errno not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.ENODEV):
                raise HostIOError.wrap(exc, self.path, "discard failed", offset) from exc

    # -- block devices: the kernel's discard and write-zeroes (as QEMU's file-posix) -----------

    def _whole_sectors(self, offset: int, length: int) -> tuple[int, int]:
        """The logical sectors that ``[offset, offset + length)`` covers whole (start >= end:
        none)."""
        sector = self.sector_size
        return -(-offset // sector) * sector, (offset + length) // sector * sector

    async def _zero_block_device(self, offset: int, length: int, may_unmap: bool) -> None:
        """Zero whole sectors in the kernel, writing zeros only where it cannot.

        ``may_unmap``: ``fallocate(PUNCH_HOLE)`` first, which the kernel turns into a
        write-zeroes request that may deallocate (a loop device punches its file, a virtio or
        NVMe disk unmaps) and refuses when the device has none; then, as without ``may_unmap``,
        ``BLKZEROOUT``, which writes zeroes without deallocating (the kernel writes zero pages
        itself when the device has no write-zeroes command). Partial sectors at the edges, and
        a device that refuses both, get zeros written. Both calls drop the range from the
        kernel's page cache of the device, so buffered reads see the zeros.
        """
        end = offset + length
        start, stop = self._whole_sectors(offset, length)
        if start >= stop:
            await super()._zero(offset, length, may_unmap)
            return
        calls = (_punch_block, _zeroout_block) if may_unmap else (_zeroout_block,)
        if offset < start:
            await super()._zero(offset, start - offset, may_unmap)
        if not await self._block_call(calls, start, stop - start, "write zeroes"):
            await super()._zero(start, stop - start, may_unmap)
        if stop < end:
            await super()._zero(stop, end - stop, may_unmap)

    async def _block_call(self, calls: tuple[Callable[[int, int, int], None], ...],
                          offset: int, length: int, what: str) -> bool:
        """Try ``calls`` in order on the sector-aligned range until one succeeds; False when
        the device supports none of them.

        In a worker thread: the kernel may take seconds (BLKZEROOUT writes the zeros itself
        on a device without write-zeroes). Not abandoned on cancellation, as a write is not:
        the device never sees the request after its caller gave up.
        """
        for call in calls:
            self.counters.syscalls += 1
            try:
                await trio.to_thread.run_sync(call, self.fd, offset, length)
                return True
            except OSError as exc:
                if exc.errno not in _BLOCK_UNSUPPORTED:
                    raise HostIOError.wrap(exc, self.path, f"{what} failed", offset) from exc
        return False

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

