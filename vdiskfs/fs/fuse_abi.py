"""The FUSE kernel protocol, as far as vdiskfs speaks it: opcodes, flags and struct layouts.

From ``include/uapi/linux/fuse.h`` (protocol 7.31, which every kernel since 5.4 accepts; the
kernel adapts to the minor version the daemon answers INIT with). All little-endian on the
machines FUSE runs on here; every struct is packed as the kernel lays it out (no implicit
padding: the explicit ``padding`` fields are there).
"""

from __future__ import annotations

import enum
import struct

#: What vdiskfs answers INIT with. 7.31 has ``max_pages`` (requests up to 1 MiB) and
#: FUSE_ASYNC_DIO; nothing vdiskfs uses came later.
KERNEL_VERSION = 7
KERNEL_MINOR_VERSION = 31
#: The kernel refuses a read() of /dev/fuse with a smaller buffer.
MIN_READ_BUFFER = 8192


class Opcode(enum.IntEnum):
    LOOKUP = 1
    FORGET = 2
    GETATTR = 3
    SETATTR = 4
    OPEN = 14
    READ = 15
    WRITE = 16
    STATFS = 17
    RELEASE = 18
    FSYNC = 20
    FLUSH = 25
    INIT = 26
    OPENDIR = 27
    READDIR = 28
    RELEASEDIR = 29
    FSYNCDIR = 30
    INTERRUPT = 36
    DESTROY = 38
    BATCH_FORGET = 42
    FALLOCATE = 43
    READDIRPLUS = 44
    LSEEK = 46


#: Requests the kernel sends without waiting for a reply.
NO_REPLY = frozenset({Opcode.FORGET, Opcode.BATCH_FORGET, Opcode.INTERRUPT})

# INIT flags (fuse_init_in.flags / fuse_init_out.flags)
FUSE_ASYNC_READ = 1 << 0
FUSE_ATOMIC_O_TRUNC = 1 << 3
FUSE_BIG_WRITES = 1 << 5
FUSE_DO_READDIRPLUS = 1 << 13
FUSE_READDIRPLUS_AUTO = 1 << 14
FUSE_ASYNC_DIO = 1 << 15
FUSE_PARALLEL_DIROPS = 1 << 18
FUSE_MAX_PAGES = 1 << 22

# fuse_open_out.open_flags
FOPEN_DIRECT_IO = 1 << 0
FOPEN_KEEP_CACHE = 1 << 1

# fuse_setattr_in.valid
FATTR_MODE = 1 << 0
FATTR_UID = 1 << 1
FATTR_GID = 1 << 2
FATTR_SIZE = 1 << 3
FATTR_ATIME = 1 << 4
FATTR_MTIME = 1 << 5
FATTR_FH = 1 << 6
FATTR_CTIME = 1 << 10

#: fuse_in_header: len, opcode, unique, nodeid, uid, gid, pid, total_extlen, padding
IN_HEADER = struct.Struct("<IIQQIIIHH")
#: fuse_out_header: len, error (a negative errno), unique
OUT_HEADER = struct.Struct("<IiQ")
#: fuse_init_in: major, minor, max_readahead, flags (the rest is newer than 7.31)
INIT_IN = struct.Struct("<IIII")
#: fuse_init_out (64 bytes): major, minor, max_readahead, flags, max_background,
#: congestion_threshold, max_write, time_gran, max_pages, map_alignment, flags2, 7 unused
INIT_OUT = struct.Struct("<IIIIHHIIHHI28x")
#: fuse_attr: ino, size, blocks, atime, mtime, ctime, atimensec, mtimensec, ctimensec, mode,
#: nlink, uid, gid, rdev, blksize, flags
ATTR = struct.Struct("<QQQQQQIIIIIIIIII")
#: fuse_entry_out without its attr: nodeid, generation, entry_valid, attr_valid,
#: entry_valid_nsec, attr_valid_nsec
ENTRY_OUT = struct.Struct("<QQQQII")
#: fuse_attr_out without its attr: attr_valid, attr_valid_nsec, dummy
ATTR_OUT = struct.Struct("<QII")
#: fuse_getattr_in: getattr_flags, dummy, fh
GETATTR_IN = struct.Struct("<IIQ")
#: fuse_setattr_in: valid, padding, fh, size, lock_owner, atime, mtime, ctime, atimensec,
#: mtimensec, ctimensec, mode, unused4, uid, gid, unused5
SETATTR_IN = struct.Struct("<IIQQQQQQIIIIIIII")
#: fuse_open_in: flags, open_flags
OPEN_IN = struct.Struct("<II")
#: fuse_open_out: fh, open_flags, backing_id
OPEN_OUT = struct.Struct("<QIi")
#: fuse_read_in: fh, offset, size, read_flags, lock_owner, flags, padding
READ_IN = struct.Struct("<QQIIQII")
#: fuse_write_in: fh, offset, size, write_flags, lock_owner, flags, padding
WRITE_IN = struct.Struct("<QQIIQII")
#: fuse_write_out: size, padding
WRITE_OUT = struct.Struct("<II")
#: fuse_release_in: fh, flags, release_flags, lock_owner
RELEASE_IN = struct.Struct("<QIIQ")
#: fuse_flush_in: fh, unused, padding, lock_owner
FLUSH_IN = struct.Struct("<QIIQ")
#: fuse_fsync_in: fh, fsync_flags, padding
FSYNC_IN = struct.Struct("<QII")
#: fuse_kstatfs: blocks, bfree, bavail, files, ffree, bsize, namelen, frsize, padding, spare[6]
STATFS_OUT = struct.Struct("<QQQQQIIII24x")
#: fuse_fallocate_in: fh, offset, length, mode, padding
FALLOCATE_IN = struct.Struct("<QQQII")
#: fuse_lseek_in: fh, offset, whence, padding
LSEEK_IN = struct.Struct("<QQII")
#: fuse_lseek_out: offset
LSEEK_OUT = struct.Struct("<Q")
#: fuse_dirent without its name: ino, off, namelen, type
DIRENT = struct.Struct("<QQII")
#: fuse_forget_in: nlookup; fuse_batch_forget_in: count, dummy
FORGET_IN = struct.Struct("<Q")
