"""vdiskfs's own FUSE session: requests read from /dev/fuse and answered by trio tasks.

pyfuse3 hands every request through libfuse's session loop, its C callbacks and a read lock
passed between worker tasks: measured on this machine (2 cores, 4 KiB reads of a file whose
answer costs nothing), about 34-48 us of daemon CPU per request, where reading the request and
writing the reply in Python cost 11-21 us, and starting a trio task per request 30 us more. So
this session, like QEMU 10.1's FUSE export, parses the kernel's requests itself (the protocol is
a few fixed structs: :mod:`.fuse_abi`) and keeps a pool of worker tasks that each read a request
and run its handler to the end, without a task per request:

- /dev/fuse is non-blocking. A worker reads until the kernel has nothing, then either waits for
  the descriptor (one worker at a time may: trio allows one waiter per descriptor) or parks.
  A worker that takes a request while no other worker is reading or waiting first wakes a
  parked one (or starts a new one, up to :attr:`FuseSession.max_workers`), so that a handler
  that waits for the disk or the network never keeps the next request from being read; a
  handler that does not wait comes back and reads the next request itself.
- The handlers are :class:`~vdiskfs.fs.operations.VdiskOperations`' own, called with the
  arguments pyfuse3 would pass, so the two sessions share every rule of the file system.
  pyfuse3's session stays available (``VDISKFS_FUSE=pyfuse3``) for comparisons.

Mounting: as root, mount(2) with the descriptor, as libfuse does; otherwise ``fusermount3``
mounts and passes the descriptor back over a socket (libfuse's ``_FUSE_COMMFD`` protocol).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import logging
import mmap
import os
import socket
import stat
import subprocess
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import pyfuse3
import trio
from pyfuse3 import FUSEError

from vdiskfs.errors import VdiskError
from vdiskfs.fs import fuse_abi as abi
from vdiskfs.fs.fuse_abi import Opcode
from vdiskfs.fs.operations import VdiskOperations

__all__ = ["FuseSession"]

log = logging.getLogger(__name__)

#: The largest write the kernel may send (libfuse's default too): 256 pages.
MAX_WRITE = 1 << 20
#: A request is its header, its fixed part and at most MAX_WRITE bytes of data.
BUFFER_SIZE = MAX_WRITE + 4096
FSTYPE = "fuse.vdiskfs"

_MS_RDONLY = 0x1
_MS_NOSUID = 0x2
_MS_NODEV = 0x4
_MS_NOATIME = 0x400
_MNT_DETACH = 0x2

#: What vdiskfs asks for at INIT, of what the kernel offers.
_WANTED_FLAGS = (abi.FUSE_ASYNC_READ | abi.FUSE_ATOMIC_O_TRUNC | abi.FUSE_BIG_WRITES
                 | abi.FUSE_DO_READDIRPLUS | abi.FUSE_READDIRPLUS_AUTO | abi.FUSE_ASYNC_DIO
                 | abi.FUSE_PARALLEL_DIROPS | abi.FUSE_MAX_PAGES)

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)

Payload = memoryview
Reply = bytes | bytearray | memoryview
Handler = Callable[[int, Payload], Awaitable[tuple[Reply, ...]]]


@dataclass
class _SetattrFields:
    """What a SETATTR changes, shaped like pyfuse3.SetattrFields for the shared handler."""

    update_atime: bool = False
    update_mtime: bool = False
    update_ctime: bool = False
    update_mode: bool = False
    update_uid: bool = False
    update_gid: bool = False
    update_size: bool = False


def _split_ns(ns: int) -> tuple[int, int]:
    return ns // 1_000_000_000, ns % 1_000_000_000


def _valid(seconds: float) -> tuple[int, int]:
    whole = int(seconds)
    return whole, int((seconds - whole) * 1e9)


def _attr(attr: pyfuse3.EntryAttributes) -> bytes:
    atime, atime_ns = _split_ns(attr.st_atime_ns)
    mtime, mtime_ns = _split_ns(attr.st_mtime_ns)
    ctime, ctime_ns = _split_ns(attr.st_ctime_ns)
    return abi.ATTR.pack(attr.st_ino, attr.st_size, attr.st_blocks, atime, mtime, ctime,
                         atime_ns, mtime_ns, ctime_ns, attr.st_mode, attr.st_nlink, attr.st_uid,
                         attr.st_gid, attr.st_rdev, attr.st_blksize, 0)


def _entry_out(attr: pyfuse3.EntryAttributes) -> bytes:
    entry_s, entry_ns = _valid(attr.entry_timeout)
    attr_s, attr_ns = _valid(attr.attr_timeout)
    return abi.ENTRY_OUT.pack(attr.st_ino, attr.generation, entry_s, attr_s, entry_ns,
                              attr_ns) + _attr(attr)


def _attr_out(attr: pyfuse3.EntryAttributes) -> bytes:
    attr_s, attr_ns = _valid(attr.attr_timeout)
    return abi.ATTR_OUT.pack(attr_s, attr_ns, 0) + _attr(attr)


def _dirent(name: bytes, attr: pyfuse3.EntryAttributes, offset: int) -> bytes:
    record = abi.DIRENT.pack(attr.st_ino, offset, len(name), stat.S_IFMT(attr.st_mode) >> 12)
    record += name
    return record + bytes(-len(record) % 8)


def _c_string(payload: Payload) -> bytes:
    return bytes(payload).partition(b"\0")[0]


class FuseSession:
    """One mount of a :class:`VdiskOperations`, served from /dev/fuse by worker tasks."""

    def __init__(self, operations: VdiskOperations, mountpoint: str, *, read_only: bool,
                 allow_other: bool, debug: bool = False, max_workers: int = 64) -> None:
        self.operations = operations
        #: Worker tasks at most: how many requests can be in the handlers at once. A queue
        #: depth of 64 reaches the stack whole; each worker's receive buffer is mapped memory
        #: that only a large write makes resident.
        self.max_workers = max_workers
        self.mountpoint = mountpoint
        self.read_only = read_only
        self.allow_other = allow_other
        self.debug = debug
        self._fd = -1
        self._connected = False
        self._waiter = False
        self._idle = trio.lowlevel.ParkingLot()
        self._workers = 0
        self._reading = 0
        self._nursery: trio.Nursery | None = None
        self._handlers: dict[int, Handler] = {
            Opcode.LOOKUP: self._lookup,
            Opcode.GETATTR: self._getattr,
            Opcode.SETATTR: self._setattr,
            Opcode.OPEN: self._open,
            Opcode.WRITE: self._write,
            Opcode.STATFS: self._statfs,
            Opcode.RELEASE: self._release,
            Opcode.FSYNC: self._fsync,
            Opcode.FLUSH: self._flush,
            Opcode.INIT: self._init,
            Opcode.OPENDIR: self._opendir,
            Opcode.READDIR: self._readdir,
            Opcode.READDIRPLUS: self._readdirplus,
            Opcode.RELEASEDIR: self._releasedir,
            Opcode.FSYNCDIR: self._nothing,
            Opcode.DESTROY: self._nothing,
            Opcode.FALLOCATE: self._fallocate,
            Opcode.LSEEK: self._lseek,
        }

    # -- mounting ---------------------------------------------------------------------------------

    def mount(self) -> None:
        """Mount; afterwards the kernel queues requests (INIT first) until :meth:`serve`."""
        source = f"vdiskfs:{os.getpid()}"
        try:
            mode = os.stat(self.mountpoint).st_mode  # not ours yet: no request to answer
            fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError as exc:
            where = exc.filename or self.mountpoint
            raise VdiskError(f"{where}: {exc.strerror} (is the fuse module loaded?)"
                             if where == "/dev/fuse" else f"{where}: {exc.strerror}",
                             errno=exc.errno or errno.EIO) from None
        options = [f"fd={fd}", f"rootmode={stat.S_IFMT(mode):o}", f"user_id={os.getuid()}",
                   f"group_id={os.getgid()}", "default_permissions"]
        if self.allow_other:
            options.append("allow_other")
        flags = _MS_NOSUID | _MS_NODEV | _MS_NOATIME | (_MS_RDONLY if self.read_only else 0)
        if _libc.mount(source.encode(), os.fsencode(self.mountpoint), FSTYPE.encode(), flags,
                       ",".join(options).encode()) == 0:
            self._fd = fd
        else:
            err = ctypes.get_errno()
            os.close(fd)
            if err != errno.EPERM:
                raise VdiskError(f"{self.mountpoint}: mount: {os.strerror(err)}", errno=err)
            self._fd = self._mount_with_fusermount(source)
        self._connected = True

    def _mount_with_fusermount(self, source: str) -> int:
        """Not root: ``fusermount3`` mounts and sends the /dev/fuse descriptor back."""
        options = ["ro" if self.read_only else "rw", "nosuid", "nodev", "noatime",
                   f"fsname={source}", "subtype=vdiskfs", "default_permissions"]
        if self.allow_other:
            options.append("allow_other")
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        with ours, theirs:
            proc = subprocess.run(
                ["fusermount3", "-o", ",".join(options), "--", self.mountpoint],
                env={**os.environ, "_FUSE_COMMFD": str(theirs.fileno())},
                pass_fds=(theirs.fileno(),), capture_output=True, text=True)
            theirs.close()
            if proc.returncode != 0:
                message = proc.stderr.strip() or f"fusermount3 exited with {proc.returncode}"
                raise VdiskError(f"{self.mountpoint}: {message}", errno=errno.EPERM)
            _, fds, _, _ = socket.recv_fds(ours, 1, 1)
        if not fds:
            raise VdiskError(f"{self.mountpoint}: fusermount3 sent no descriptor",
                             errno=errno.EIO)
        os.set_blocking(fds[0], False)
        os.set_inheritable(fds[0], False)
        return fds[0]

    def close(self) -> None:
        """Close the connection and, unless the kernel ended it (unmounted), unmount lazily."""
        if self._fd < 0:
            return
        os.close(self._fd)
        self._fd = -1
        if not self._connected:
            return
        self._connected = False
        if os.geteuid() == 0:
            if _libc.umount2(os.fsencode(self.mountpoint), _MNT_DETACH) == 0:
                return
            if ctypes.get_errno() == errno.EINVAL:  # not mounted (any more)
                return
        subprocess.run(["fusermount3", "-u", "-z", "--", self.mountpoint],
                       capture_output=True)

    # -- serving ----------------------------------------------------------------------------------

    async def serve(self) -> None:
        """Answer requests until the file system is unmounted or :meth:`terminate` is called."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            self._add_reader()
        self._nursery = None

    def terminate(self) -> None:
        """End :meth:`serve` (from the trio thread); :meth:`close` unmounts."""
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()

    def _add_reader(self) -> None:
        """Make one more worker read /dev/fuse: a parked one, or a new one."""
        if self._idle:
            self._reading += 1
            self._idle.unpark()
        elif self._workers < self.max_workers and self._nursery is not None:
            self._workers += 1
            self._reading += 1
            self._nursery.start_soon(self._worker)

    async def _worker(self) -> None:
        # Each worker is reading (counted in _reading: it will see the next request), parked,
        # the one waiting for /dev/fuse (_waiter), or handling a request. Whoever takes a
        # request while nobody else is reading or waiting adds a reader first, so a handler
        # that waits for the disk or the network never keeps the next request unread; a
        # handler that does not wait comes back and reads the next request itself, so a busy
        # mount serves a queue with few wake-ups.
        buffer = mmap.mmap(-1, BUFFER_SIZE)
        view = memoryview(buffer)
        fd = self._fd
        while True:
            try:
                length = os.readv(fd, (buffer,))
            except BlockingIOError:
                self._reading -= 1
                if self._waiter:
                    await self._idle.park()
                    # Unparked as a reader; if the waiter is back already, it sees whatever
                    # comes: park again without a read.
                    while self._waiter:
                        self._reading -= 1
                        await self._idle.park()
                    continue
                self._waiter = True
                try:
                    await trio.lowlevel.wait_readable(fd)
                finally:
                    self._waiter = False
                self._reading += 1
                continue
            except (InterruptedError, FileNotFoundError):
                continue  # a signal; a request that was interrupted before it was read
            except OSError as exc:
                if exc.errno != errno.ENODEV:
                    log.error("reading /dev/fuse: %s", exc)
                # ENODEV: unmounted, or the connection was aborted: serving ends.
                self._connected = False
                self.terminate()
                return
            self._reading -= 1
            if not self._reading and not self._waiter:
                self._add_reader()
            await self._handle(view, length)
            self._reading += 1

    async def _handle(self, view: memoryview, length: int) -> None:
        _, opcode, unique, nodeid, _, _, _, _, _ = abi.IN_HEADER.unpack_from(view)
        if self.debug:
            log.debug("request %d: %s node %d, %d bytes", unique, _opcode_name(opcode),
                      nodeid, length)
        if opcode == Opcode.READ:
            # The hot path: no handler lookup, no tuple of parts.
            fh, offset, size, *_ = abi.READ_IN.unpack_from(view, abi.IN_HEADER.size)
            try:
                data = await self.operations.read(fh, offset, size)
            except FUSEError as exc:
                self._reply_error(unique, exc.errno)
            except Exception:
                log.exception("READ failed unexpectedly")
                self._reply_error(unique, errno.EIO)
            else:
                self._write_reply([abi.OUT_HEADER.pack(abi.OUT_HEADER.size + len(data), 0,
                                                       unique), data])
            return
        handler = self._handlers.get(opcode)
        if handler is None:
            if opcode not in abi.NO_REPLY:
                self._reply_error(unique, errno.ENOSYS)
            return
        try:
            parts = await handler(nodeid, view[abi.IN_HEADER.size:length])
        except FUSEError as exc:
            self._reply_error(unique, exc.errno)
        except Exception:
            # A bug: the request fails, the file system stays.
            log.exception("%s failed unexpectedly", _opcode_name(opcode))
            self._reply_error(unique, errno.EIO)
        else:
            self._reply(unique, parts)

    def _reply(self, unique: int, parts: tuple[Reply, ...]) -> None:
        size = abi.OUT_HEADER.size + sum(len(part) for part in parts)
        self._write_reply([abi.OUT_HEADER.pack(size, 0, unique), *parts])

    def _reply_error(self, unique: int, err: int) -> None:
        self._write_reply([abi.OUT_HEADER.pack(abi.OUT_HEADER.size, -err, unique)])

    def _write_reply(self, parts: list[Reply]) -> None:
        try:
            os.writev(self._fd, parts)
        except FileNotFoundError:
            # The kernel no longer waits for this request (interrupted, or the connection was
            # aborted): nothing to do.
            log.debug("reply to a request the kernel gave up")
        except OSError as exc:
            if exc.errno != errno.ENODEV:
                log.error("replying on /dev/fuse: %s", exc)

    # -- the requests -----------------------------------------------------------------------------

    async def _init(self, nodeid: int, body: Payload) -> tuple[Reply, ...]:
        major, minor, max_readahead, offered = abi.INIT_IN.unpack_from(body)
        if major != abi.KERNEL_VERSION or minor < 12:
            log.error("FUSE protocol %d.%d: not supported", major, minor)
            raise FUSEError(errno.EPROTO)
        ops = self.operations
        max_background = ops.max_background or 12
        threshold = ops.congestion_threshold or max_background * 3 // 4
        ops.init()
        return (abi.INIT_OUT.pack(abi.KERNEL_VERSION, abi.KERNEL_MINOR_VERSION, max_readahead,
                                  offered & _WANTED_FLAGS, max_background, threshold, MAX_WRITE,
                                  1, MAX_WRITE // 4096, 0, 0),)

    async def _nothing(self, nodeid: int, body: Payload) -> tuple[Reply, ...]:
        return ()

    async def _lookup(self, nodeid: int, body: Payload) -> tuple[Reply, ...]:
        attr = await self.operations.lookup(nodeid, _c_string(body), None)
        return (_entry_out(attr),)

    async def _getattr(self, nodeid: int, body: Payload) -> tuple[Reply, ...]:
        return (_attr_out(await self.operations.getattr(nodeid, None)),)

    async def _setattr(self, nodeid: int, body: Payload) -> tuple[Reply, ...]:
        valid, _, fh, size, *_ = abi.SETATTR_IN.unpack_from(body)
        fields = _SetattrFields(
            update_atime=bool(valid & abi.FATTR_ATIME), update_mtime=bool(valid & abi.FATTR_MTIME),
            update_ctime=bool(valid & abi.FATTR_CTIME), update_mode=bool(valid & abi.FATTR_MODE),
            update_uid=bool(valid & abi.FATTR_UID), update_gid=bool(valid & abi.FATTR_GID),
            update_size=bool(valid & abi.FATTR_SIZE))
        attr = pyfuse3.EntryAttributes()
        attr.st_size = size
        handle = fh if valid & abi.FATTR_FH else None
        result = await self.operations.setattr(nodeid, attr, fields, handle, None)
        return (_attr_out(result),)

    async def _open(self, nodeid: int, body: Payload) -> tuple[Reply, ...]:
        flags, _ = abi.OPEN_IN.unpack_from(body)
        info = await self.operations.open(nodeid, flags, None)
        open_flags = (abi.FOPEN_DIRECT_IO if info.direct_io else 0) | (
            abi.FOPEN_KEEP_CACHE if info.keep_cache else 0)
        return (abi.OPEN_OUT.pack(info.fh, open_flags, 0),)

    async def _write(self, nodeid: int, body: Payload) -> tuple[Reply, ...]:
        fh, offset, size, *_ = abi.WRITE_IN.unpack_from(body)
        start = abi.WRITE_IN.size
        # A copy: the handler's layers may keep the data after this request (and the buffer is
        # the next request's).
        data = bytes(body[start:start + size])
        written = await self.operations.write(fh, offset, data)
        return (abi.WRITE_OUT.pack(written, 0),)

    async def _statfs(self, nodeid: int, body: Payload) -> tuple[Reply, ...]:
        st = await self.operations.statfs(None)
        return (abi.STATFS_OUT.pack(st.f_blocks, st.f_bfree, st.f_bavail, st.f_files,
                                    st.f_ffree, st.f_bsize, st.f_namemax, st.f_frsize, 0),)

    async def _release(self, nodeid: int, body: Payload) -> tuple[Reply, ...]:
        fh, *_ = abi.RELEASE_IN.unpack_from(body)
        await self.operations.release(fh)
        return ()

    async def _fsync(self, nodeid: int, body: Payload) -> tuple[Reply, ...]:
        fh, flags, _ = abi.FSYNC_IN.unpack_from(body)
        await self.operations.fsync(fh, bool(flags & 1))
        return ()

    async def _flush(self, nodeid: int, body: Payload) -> tuple[Reply, ...]:
        fh, *_ = abi.FLUSH_IN.unpack_from(body)
        await self.operations.flush(fh)
        return ()

    async def _opendir(self, nodeid: int, body: Payload) -> tuple[Reply, ...]:
        fh = await self.operations.opendir(nodeid, None)
        return (abi.OPEN_OUT.pack(fh, 0, 0),)

    async def _readdir(self, nodeid: int, body: Payload) -> tuple[Reply, ...]:
        return await self._directory(body, plus=False)

    async def _readdirplus(self, nodeid: int, body: Payload) -> tuple[Reply, ...]:
        return await self._directory(body, plus=True)

    async def _directory(self, body: Payload, *, plus: bool) -> tuple[Reply, ...]:
        fh, offset, size, *_ = abi.READ_IN.unpack_from(body)
        out = bytearray()
        for name, inode, cookie in self.operations.directory(fh, offset):
            attr = await self.operations.attributes(inode)
            record = _dirent(name, attr, cookie)
            if plus:
                record = _entry_out(attr) + record
            if len(out) + len(record) > size:
                break
            out += record
        return (out,)

    async def _releasedir(self, nodeid: int, body: Payload) -> tuple[Reply, ...]:
        fh, *_ = abi.RELEASE_IN.unpack_from(body)
        await self.operations.releasedir(fh)
        return ()

    async def _fallocate(self, nodeid: int, body: Payload) -> tuple[Reply, ...]:
        fh, offset, length, mode, _ = abi.FALLOCATE_IN.unpack_from(body)
        await self.operations.fallocate(fh, mode, offset, length)
        return ()

    async def _lseek(self, nodeid: int, body: Payload) -> tuple[Reply, ...]:
        fh, offset, whence, _ = abi.LSEEK_IN.unpack_from(body)
        return (abi.LSEEK_OUT.pack(await self.operations.lseek(fh, offset, whence)),)


def _opcode_name(opcode: int) -> str:
    try:
        return Opcode(opcode).name
    except ValueError:
        return f"opcode {opcode}"
