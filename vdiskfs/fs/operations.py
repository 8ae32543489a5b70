"""The FUSE request handlers: the FUSE boundary of the driver stack.

They take and return pyfuse3's types (its ``Operations`` interface), so that vdiskfs's own
session (:mod:`.session`) and pyfuse3's serve the same handlers.

This is one of the two places where the stack's errors leave it (the other is the virtio-blk
device): a :class:`~vdiskfs.errors.VdiskError` becomes ``FUSEError(err.errno)`` here, once. Any
other exception is a bug: it is logged with its traceback and the request fails with EIO, because
an exception escaping a pyfuse3 handler would tear down the whole file system.

Caching: a read-only image may keep the kernel's page cache across opens (``keep_cache``); a
writable one drops it at open (all writes pass through this process, so the cache stays coherent
while it is open); a file whose node something else writes (a running guest) uses ``direct_io``
so no reader ever sees a stale page. Stats files use ``direct_io``: their content changes between
reads and their size is not known in advance. A stats file with a ``write`` is a node's setting
(the throttle's limits): a write from offset 0 replaces the setting; bad input is EINVAL, and the
reason goes to the log.

Holes: ``lseek(SEEK_DATA/SEEK_HOLE)`` comes from the block status of the whole chain
(:mod:`vdiskfs.block.holes`), ``st_blocks`` from the host allocation of the image's files;
``fallocate`` punches holes and zeroes ranges, and all-zero writes become write-zeroes
(:mod:`vdiskfs.block.zeroes`). pyfuse3 passes ``lseek`` and ``fallocate`` to the daemon only
with the project's patch (``scripts/pyfuse3/``).
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import time
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from dataclasses import dataclass
from typing import Any, ParamSpec, Protocol, TypeVar

import pyfuse3
import trio
from pyfuse3 import FUSEError

from vdiskfs.block.holes import seek_data, seek_hole
from vdiskfs.block.zeroes import write_detecting_zeroes
from vdiskfs.errors import VdiskError
from vdiskfs.fs.tree import (
    DirEntry,
    Entry,
    Export,
    FileSystemTree,
    ImageEntry,
    StatsEntry,
    StatsSource,
)

__all__ = ["VdiskOperations"]

log = logging.getLogger(__name__)

P = ParamSpec("P")
R = TypeVar("R")

#: The tree never changes while mounted, so the kernel may cache names and attributes long.
STATIC_TIMEOUT = 300.0
#: Seconds the kernel may cache an image's attributes when something may write the image: its
#: st_blocks (the allocation) changes.
ALLOCATION_TIMEOUT = 1.0

# fallocate(2) modes (linux/falloc.h). The kernel passes only these three to a FUSE daemon.
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10
_FALLOC_SUPPORTED = FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE


def _boundary(handler: Callable[P, Awaitable[R]]) -> Callable[P, Coroutine[Any, Any, R]]:
    """Translate the stack's errors to errnos for the kernel; never let a handler raise."""

    @functools.wraps(handler)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return await handler(*args, **kwargs)
        except FUSEError:
            raise
        except VdiskError as exc:
            log.warning("%s: %s", handler.__name__, exc)
            raise FUSEError(exc.errno) from None
        except OSError as exc:
            log.warning("%s: %s", handler.__name__, exc)
            raise FUSEError(exc.errno or errno.EIO) from None
        except Exception:
            log.exception("%s failed unexpectedly", handler.__name__)
            raise FUSEError(errno.EIO) from None

    return wrapper


class SetattrChanges(Protocol):
    """What a SETATTR changes: pyfuse3's ``SetattrFields``, or the own session's."""

    @property
    def update_mode(self) -> bool: ...
    @property
    def update_uid(self) -> bool: ...
    @property
    def update_gid(self) -> bool: ...
    @property
    def update_size(self) -> bool: ...


@dataclass(slots=True)
class _Handle:
    entry: ImageEntry | StatsEntry
    #: Stats files: the rendering taken at the last read at offset 0.
    snapshot: bytes = b""


class VdiskOperations(pyfuse3.Operations):
    """Serve a :class:`FileSystemTree` of exports and statistics files."""

    supports_dot_lookup = False
    enable_writeback_cache = False
    max_background = 64
    congestion_threshold = 48

    def __init__(
        self,
        exports: list[Export],
        extra_stats: Mapping[str, StatsSource] | None = None,
    ) -> None:
        super().__init__()
        self.tree = FileSystemTree(exports, extra_stats)
        self.exports = exports
        self._handles: dict[int, _Handle] = {}
        self._next_fh = 1
        self._uid = os.getuid()
        self._gid = os.getgid()
        self._mount_time_ns = time.time_ns()
        #: Set once the kernel's INIT request has been handled (see mount.serve).
        self.initialized = trio.Event()

    def init(self) -> None:
        self.initialized.set()

    # -- attributes -------------------------------------------------------------------------------

    def _entry(self, inode: int) -> Entry:
        try:
            return self.tree.entries[inode]
        except KeyError:
            raise FUSEError(errno.ENOENT) from None

    def _attributes(self, entry: Entry, allocated: int | None = None) -> pyfuse3.EntryAttributes:
        attr = pyfuse3.EntryAttributes()
        attr.st_ino = entry.inode
        attr.st_mode = entry.mode
        attr.st_uid = self._uid
        attr.st_gid = self._gid
        attr.st_blksize = 4096
        stamp = self._mount_time_ns
        if isinstance(entry, DirEntry):
            attr.st_nlink = 2 + sum(
                isinstance(self.tree.entries[i], DirEntry) for i in entry.children.values()
            )
            attr.st_size = 0
            timeout = STATIC_TIMEOUT
        elif isinstance(entry, ImageEntry):
            attr.st_nlink = 1
            attr.st_size = entry.export.node.size
            timeout = ALLOCATION_TIMEOUT if entry.export.writable or entry.export.direct_io \
                else STATIC_TIMEOUT
        else:
            attr.st_nlink = 1
            attr.st_size = len(entry.render())
            stamp = time.time_ns()
            timeout = 0.0
        # st_blocks: what the image's own files take on the host, as qemu-storage-daemon's
        # export shows (a partition file: at most its size). Below the size, `cp --sparse=auto`
        # and `tar --sparse` look for the holes with SEEK_DATA/SEEK_HOLE; a stat costs no image
        # I/O (a walk of the whole map could take long on a slow or remote image).
        attr.st_blocks = ((attr.st_size if allocated is None else allocated) + 511) // 512
        attr.st_atime_ns = attr.st_mtime_ns = attr.st_ctime_ns = stamp
        attr.entry_timeout = STATIC_TIMEOUT
        attr.attr_timeout = timeout
        return attr

    async def _attributes_now(self, entry: Entry) -> pyfuse3.EntryAttributes:
        """:meth:`_attributes` with an image's allocation."""
        if not isinstance(entry, ImageEntry):
            return self._attributes(entry)
        node = entry.export.node
        try:
            allocated = min(await node.allocated_size(), node.size)
        except VdiskError as exc:
            log.warning("%s: %s", entry.name, exc)
            allocated = node.size
        return self._attributes(entry, allocated)

    @_boundary
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext | None = None) -> Any:
        return await self._attributes_now(self._entry(inode))

    @_boundary
    async def lookup(
        self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext | None = None
    ) -> Any:
        parent = self._entry(parent_inode)
        if not isinstance(parent, DirEntry):
            raise FUSEError(errno.ENOTDIR)
        inode = parent.children.get(os.fsdecode(name))
        if inode is None:
            raise FUSEError(errno.ENOENT)
        return await self._attributes_now(self.tree.entries[inode])

    @_boundary
    async def setattr(
        self,
        inode: int,
        attr: pyfuse3.EntryAttributes,
        fields: SetattrChanges,
        fh: int | None,
        ctx: pyfuse3.RequestContext | None = None,
    ) -> Any:
        entry = self._entry(inode)
        if fields.update_mode or fields.update_uid or fields.update_gid:
            raise FUSEError(errno.EPERM)
        if fields.update_size and isinstance(entry, StatsEntry) and entry.write is not None:
            # `echo ... > control` truncates first: the write that follows replaces it all.
            if attr.st_size != 0:
                raise FUSEError(errno.EINVAL)
        elif fields.update_size:
            if not isinstance(entry, ImageEntry) or not entry.export.writable:
                raise FUSEError(errno.EROFS if isinstance(entry, ImageEntry) else errno.EPERM)
            if attr.st_size != entry.export.node.size:
                # A disk has a fixed size; `truncate` would silently lose or invent data.
                raise FUSEError(errno.EPERM)
        # Time updates (touch) are accepted and forgotten: the tree has no stored times.
        return await self._attributes_now(entry)

    @_boundary
    async def statfs(self, ctx: pyfuse3.RequestContext | None = None) -> Any:
        stat = pyfuse3.StatvfsData()
        total = sum(e.export.node.size for e in self.tree.images())
        stat.f_bsize = stat.f_frsize = 4096
        stat.f_blocks = (total + 4095) // 4096
        stat.f_bfree = stat.f_bavail = 0
        stat.f_files = len(self.tree.entries)
        stat.f_ffree = stat.f_favail = 0
        stat.f_namemax = 255
        return stat

    # -- directories ------------------------------------------------------------------------------

    @_boundary
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext | None = None) -> int:
        if not isinstance(self._entry(inode), DirEntry):
            raise FUSEError(errno.ENOTDIR)
        return inode

    def directory(self, fh: int, start_id: int) -> list[tuple[bytes, int, int]]:
        """The entries of an open directory from ``start_id`` on: name, inode and the cookie
        of the next one. Children keep their insertion order, so a position is a stable
        cookie."""
        directory = self._entry(fh)
        if not isinstance(directory, DirEntry):
            raise FUSEError(errno.ENOTDIR)
        names = list(directory.children.items())
        return [(os.fsencode(name), inode, position + 1)
                for position, (name, inode) in enumerate(names) if position >= start_id]

    @_boundary
    async def attributes(self, inode: int) -> pyfuse3.EntryAttributes:
        """The attributes of ``inode`` as a directory listing shows them."""
        return await self._attributes_now(self._entry(inode))

    @_boundary
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        for name, inode, cookie in self.directory(fh, start_id):
            attr = await self._attributes_now(self.tree.entries[inode])
            if not pyfuse3.readdir_reply(token, name, attr, cookie):
                break

    async def releasedir(self, fh: int) -> None:
        return None

    # -- files ------------------------------------------------------------------------------------

    @_boundary
    async def open(self, inode: int, flags: int,
                   ctx: pyfuse3.RequestContext | None = None) -> Any:
        entry = self._entry(inode)
        if isinstance(entry, DirEntry):
            raise FUSEError(errno.EISDIR)
        wants_write = flags & os.O_ACCMODE != os.O_RDONLY
        if isinstance(entry, StatsEntry):
            if wants_write and entry.write is None:
                raise FUSEError(errno.EACCES)
            info = pyfuse3.FileInfo(direct_io=True, keep_cache=False)
        else:
            export = entry.export
            if wants_write and not export.writable:
                raise FUSEError(errno.EROFS)
            if flags & os.O_TRUNC and export.node.size:
                raise FUSEError(errno.EPERM)
            info = pyfuse3.FileInfo(
                direct_io=export.direct_io,
                keep_cache=not export.writable and not export.direct_io,
            )
        fh = self._next_fh
        self._next_fh += 1
        self._handles[fh] = _Handle(entry)
        info.fh = fh
        return info

    async def read(self, fh: int, off: int, size: int) -> bytes:
        # The hot path: no decorator, the minimum of Python between the kernel and the node.
        handle = self._handles.get(fh)
        if handle is None:
            raise FUSEError(errno.EBADF)
        entry = handle.entry
        if isinstance(entry, StatsEntry):
            return self._read_stats(handle, entry, off, size)
        node = entry.export.node
        end = node.size
        if off >= end:
            return b""
        if off + size > end:
            size = end - off
        try:
            # pyfuse3 declares bytes, but its read handler takes any contiguous buffer
            # (PyObject_GetBuffer): a node's bytearray or memoryview reaches the kernel uncopied.
            return await node.pread(off, size)  # type: ignore[return-value]
        except VdiskError as exc:
            log.warning("read %s at %d+%d: %s", entry.name, off, size, exc)
            raise FUSEError(exc.errno) from None
        except Exception:
            log.exception("read %s at %d+%d failed unexpectedly", entry.name, off, size)
            raise FUSEError(errno.EIO) from None

    def _read_stats(self, handle: _Handle, entry: StatsEntry, off: int, size: int) -> bytes:
        # A read from the start takes a fresh snapshot: `cat` always sees the numbers of now,
        # and a reader continuing at an offset sees one consistent rendering.
        if off == 0 or not handle.snapshot:
            try:
                handle.snapshot = entry.render()
            except Exception:
                log.exception("rendering %s failed", entry.name)
                raise FUSEError(errno.EIO) from None
        return handle.snapshot[off : off + size]

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        # A hot path like read: no decorator, errors translated inline.
        handle = self._handles.get(fh)
        if handle is None:
            raise FUSEError(errno.EBADF)
        entry = handle.entry
        if isinstance(entry, StatsEntry) and entry.write is not None:
            return self._write_control(entry, off, buf)
        if not isinstance(entry, ImageEntry) or not entry.export.writable:
            raise FUSEError(errno.EROFS if isinstance(entry, ImageEntry) else errno.EACCES)
        export = entry.export
        node = export.node
        if off >= node.size:
            raise FUSEError(errno.ENOSPC)
        # Like a block device: a write straddling the end writes what fits.
        length = min(len(buf), node.size - off)
        export.dirty = True
        try:
            await write_detecting_zeroes(
                node, off, buf if length == len(buf) else memoryview(buf)[:length]
            )
        except VdiskError as exc:
            log.warning("write %s at %d+%d: %s", entry.name, off, length, exc)
            raise FUSEError(exc.errno) from None
        except Exception:
            log.exception("write %s at %d+%d failed unexpectedly", entry.name, off, length)
            raise FUSEError(errno.EIO) from None
        return length

    def _write_control(self, entry: StatsEntry, off: int, buf: bytes) -> int:
        """A new setting: the whole text in one write from the start (a setting is a line;
        applying a piece of one could set something nobody asked for)."""
        assert entry.write is not None
        if off != 0:
            log.warning("%s: write the whole setting at once, from offset 0 (not %d)",
                        entry.name, off)
            raise FUSEError(errno.EINVAL)
        try:
            entry.write(buf.decode())
        except UnicodeDecodeError:
            log.warning("%s: the setting is not UTF-8 text", entry.name)
            raise FUSEError(errno.EINVAL) from None
        except VdiskError as exc:
            log.warning("%s: %s", entry.name, exc)
            raise FUSEError(exc.errno) from None
        return len(buf)

    # -- holes, discard and write-zeroes (pyfuse3 with the project's patch) -------------------

    @_boundary
    async def lseek(self, fh: int, off: int, whence: int) -> int:
        """SEEK_DATA / SEEK_HOLE (the kernel answers the other whences itself), from the block
        status of the whole chain, as qemu-storage-daemon's FUSE export does."""
        handle = self._handle(fh)
        entry = handle.entry
        if whence not in (os.SEEK_DATA, os.SEEK_HOLE):
            raise FUSEError(errno.EINVAL)
        if isinstance(entry, StatsEntry):
            # Never ENOSYS: the kernel would stop asking for every file of the mount.
            size = len(handle.snapshot or entry.render())
            if off < 0 or off >= size:
                raise FUSEError(errno.ENXIO)
            return off if whence == os.SEEK_DATA else size
        node = entry.export.node
        if off < 0 or off >= node.size:
            raise FUSEError(errno.ENXIO)
        if whence == os.SEEK_HOLE:
            return await seek_hole(node, off)
        found = await seek_data(node, off)
        if found is None:
            raise FUSEError(errno.ENXIO)
        return found

    @_boundary
    async def fallocate(self, fh: int, mode: int, off: int, length: int) -> None:
        """Punching a hole is write-zeroes that may deallocate (``fstrim`` through a loop device
        ends here): it must read back as zeros, which a plain discard does not promise (a qcow2
        v2 range with a backing file would show the backing file again). ZERO_RANGE keeps the
        range allocated, as on a regular file. A disk does not grow: what reaches past its end
        is cut with KEEP_SIZE and refused without."""
        entry = self._handle(fh).entry
        if not isinstance(entry, ImageEntry):
            raise FUSEError(errno.EACCES)
        export = entry.export
        if not export.writable:
            raise FUSEError(errno.EROFS)
        if mode & ~_FALLOC_SUPPORTED:
            raise FUSEError(errno.EOPNOTSUPP)
        punch = bool(mode & FALLOC_FL_PUNCH_HOLE)
        keep_size = bool(mode & FALLOC_FL_KEEP_SIZE)
        if (punch and (mode & FALLOC_FL_ZERO_RANGE or not keep_size)) or off < 0 or length <= 0:
            raise FUSEError(errno.EINVAL)
        node = export.node
        end = off + length
        if end > node.size:
            if not keep_size:
                raise FUSEError(errno.ENOSPC)
            end = node.size
        if off >= end or not mode & (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE):
            # Plain allocation: every byte of a disk exists already.
            return
        export.dirty = True
        await node.zero(off, end - off, may_unmap=punch)

    def _handle(self, fh: int) -> _Handle:
        handle = self._handles.get(fh)
        if handle is None:
            raise FUSEError(errno.EBADF)
        return handle

    @_boundary
    async def fsync(self, fh: int, datasync: bool) -> None:
        handle = self._handles.get(fh)
        if handle is not None and isinstance(handle.entry, ImageEntry):
            await self._flush_export(handle.entry.export)

    @_boundary
    async def flush(self, fh: int) -> None:
        # close(2): make what this file wrote durable, as closing a block device does.
        handle = self._handles.get(fh)
        if handle is not None and isinstance(handle.entry, ImageEntry):
            export = handle.entry.export
            if export.dirty:
                await self._flush_export(export)

    async def _flush_export(self, export: Export) -> None:
        if not export.writable:
            return
        export.dirty = False
        try:
            await export.node.flush()
        except BaseException:
            export.dirty = True
            raise

    async def release(self, fh: int) -> None:
        self._handles.pop(fh, None)

