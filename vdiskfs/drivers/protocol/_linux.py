"""Linux system calls that the ``os`` module lacks (transcribed constants, no logic)."""

from __future__ import annotations

import ctypes
import fcntl
import os
import struct

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10

# Block device ioctls (include/uapi/linux/fs.h): _IO(0x12, n), no size encoded.
BLKSSZGET = 0x1268  # _IO(0x12, 104): logical sector size, an int
BLKDISCARD = 0x1277  # _IO(0x12, 119): uint64 range[2] = {start, length}
BLKZEROOUT = 0x127F  # _IO(0x12, 127): uint64 range[2] = {start, length}
_BLK_RANGE = struct.Struct("=QQ")
_INT = struct.Struct("=i")

_libc = ctypes.CDLL(None, use_errno=True)
_fallocate = _libc.fallocate
_fallocate.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong)
_fallocate.restype = ctypes.c_int


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """fallocate(2) with flags; raises OSError like the os module does."""
    if _fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def blk_logical_sector_size(fd: int) -> int:
    """BLKSSZGET: the block device's logical sector size in bytes."""
    size: int = _INT.unpack(fcntl.ioctl(fd, BLKSSZGET, bytes(_INT.size)))[0]
    return size


def blk_range_ioctl(fd: int, request: int, offset: int, length: int) -> None:
    """BLKDISCARD or BLKZEROOUT of ``length`` bytes at ``offset`` (both sector-aligned)."""
    fcntl.ioctl(fd, request, _BLK_RANGE.pack(offset, length))


# struct flock on x86_64/aarch64 Linux: short l_type, short l_whence, (pad), off_t l_start,
# off_t l_len, pid_t l_pid, (pad) -- 32 bytes. Open file description locks need l_pid == 0.
_FLOCK = struct.Struct("hhxxxxqqixxxx")


def ofd_lock(fd: int, offset: int, lock_type: int) -> None:
    """Set (F_RDLCK/F_WRLCK) or release (F_UNLCK) an OFD lock on one byte, without waiting."""
    fcntl.fcntl(fd, fcntl.F_OFD_SETLK, _FLOCK.pack(lock_type, os.SEEK_SET, offset, 1, 0))


def ofd_conflicts(fd: int, offset: int) -> bool:
    """Whether another open file description holds any lock on one byte (F_OFD_GETLK)."""
    answer = fcntl.fcntl(fd, fcntl.F_OFD_GETLK,
                         _FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, offset, 1, 0))
    return bool(_FLOCK.unpack(answer)[0] != fcntl.F_UNLCK)
