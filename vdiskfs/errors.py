"""The exception hierarchy of vdiskfs.

Every error that the driver stack raises on purpose is a :class:`VdiskError`. Each carries an
``errno`` so that the two boundaries where errors leave the stack -- the FUSE operations and the
virtio-blk device -- translate them in one place, and a message that names the file and, where
one is known, the offset or header field at fault.

Nothing below the boundaries catches an ``OSError`` and turns it into zeros: an I/O error from the
host is wrapped in :class:`HostIOError` (keeping its errno) and travels up.
"""

from __future__ import annotations

import errno as _errno


class VdiskError(Exception):
    """Base class: a message for humans and an errno for the kernel."""

    errno: int = _errno.EIO

    def __init__(
        self,
        message: str,
        *,
        path: str | None = None,
        offset: int | None = None,
        field: str | None = None,
        errno: int | None = None,
    ) -> None:
        self.message = message
        self.path = path
        self.offset = offset
        self.field = field
        if errno is not None:
            self.errno = errno
        super().__init__(str(self))

    def __str__(self) -> str:
        where = []
        if self.path is not None:
            where.append(self.path)
        if self.field is not None:
            where.append(f"field {self.field}")
        if self.offset is not None:
            where.append(f"offset {self.offset:#x}")
        return f"{': '.join(where)}: {self.message}" if where else self.message


class FormatError(VdiskError):
    """The image is corrupt or not what its header claims: bad magic, offsets out of the file."""

    errno = _errno.EIO


class NotADiskError(FormatError):
    """A file the stack was asked to open (an image, or a backing file, data file, extent or
    parent that an image names) is not a regular file or a block device: a FIFO, a socket, a
    character device or a directory. Such a file is refused before it is read, because reading
    it could block for ever (a FIFO without a writer, a terminal) or have side effects."""

    errno = _errno.ENODEV


class UnsupportedError(VdiskError):
    """The image uses a feature vdiskfs refuses (unknown incompatible bit, encryption...)."""

    errno = _errno.ENOTSUP


class ReadOnlyError(VdiskError):
    """A write to a node opened read-only."""

    errno = _errno.EROFS


class RangeError(VdiskError):
    """A request outside the node: negative, overflowing, or past the end of a fixed-size node."""

    errno = _errno.EINVAL


class NoSpaceError(VdiskError):
    """A write past the end of a disk that cannot grow, or the host ran out of space."""

    errno = _errno.ENOSPC


class ChainError(VdiskError):
    """A backing chain that loops, is too deep, or points somewhere the policy forbids."""

    errno = _errno.ELOOP


class LockedError(VdiskError):
    """Another process holds a conflicting lock on the image."""

    errno = _errno.EBUSY


class HostIOError(VdiskError):
    """An ``OSError`` from the host, wrapped with the file it happened on."""

    @classmethod
    def wrap(cls, exc: OSError, path: str, what: str, offset: int | None = None) -> VdiskError:
        err = exc.errno if exc.errno is not None else _errno.EIO
        if err == _errno.ENOSPC:
            return NoSpaceError(f"{what}: {exc.strerror or exc}", path=path, offset=offset)
        return cls(f"{what}: {exc.strerror or exc}", path=path, offset=offset, errno=err)
