"""Host I/O that never blocks the event loop: the asynchronous engine under the ``file`` node.

The daemon is one Python thread running trio. A ``pread`` that misses the page cache waits for
the disk; made inline, it stops every other request too, so a queue depth of 16 ran at the
speed of depth 1. The ``file`` node therefore serves what the page cache holds inline (asked
first with ``cachestat(2)``, then ``preadv2(RWF_NOWAIT)``: a few microseconds) and hands
everything that would wait -- reads that miss, writes, ``fdatasync`` -- to an engine that keeps
many host requests in flight and wakes the waiting task when one completes. Asking before
trying matters: a ``RWF_NOWAIT`` read that misses still starts the readahead I/O on the calling
thread (see :mod:`._cachestat`). Asking costs too, so a file whose last read was cached is
tried at once: hot files stay cheap, and a wrong guess costs one readahead start per change
from hot to cold. Three engines, chosen by ``VDISKFS_IO_ENGINE``:

``io_uring`` (the default where the kernel allows it)
    One ring per event loop. A request is one submission entry and one ``io_uring_enter``
    (flagged ``IOSQE_ASYNC``: it goes to a kernel io-wq worker, up to 256 of them); the
    kernel signals completions on an eventfd that a trio system task waits on, and that task
    drains the completion ring and reschedules the waiting tasks. No threads, no GIL hand-offs.
    Written against the kernel ABI with ctypes (:mod:`._uring_abi`): the PyPI binding that was
    measured returned stale completion results and takes no memoryviews.
``threads``
    A pool of OS threads (grown on demand up to :data:`MAX_THREADS`) that make the blocking
    system calls; a finished thread queues its result and, unless a wake-up is already pending,
    posts one ``run_sync_soon`` callback that hands every queued result back to its task. This is
    the fallback where io_uring is unavailable (``kernel.io_uring_disabled``, seccomp, an old
    kernel, a CPU that is not x86-64). ``trio.to_thread`` per request was measured too slow.
``inline``
    The old behaviour: every system call made on the trio thread. For measurements only.

``scripts/bench/io_engines.py`` measures the three against each other.

Memory is bounded: at most :data:`DEFAULT_MAX_INFLIGHT_BYTES` of request data and
:data:`MAX_INFLIGHT_OPS` requests are in the engine at once; a request beyond either waits for
room (a single request larger than the cap is let through alone). Every request in the tree
reaches the host through here, so this caps the daemon's I/O buffers whatever the queue depth
above.

Cancellation: a task cancelled while its *read* is in the engine returns at once; the engine
keeps the buffer alive (pinned) until the kernel or the thread is done with it and then drops
the result. A write or a sync is not abandoned: the caller waits for it, so that nobody above
believes a write did not happen while it is still going to the disk.

The engine lives in a :class:`trio.lowlevel.RunVar`, one per event loop: it is a host resource
like trio's own thread cache, shared by every ``file`` node of the loop; each node keeps its
own counters (:class:`~.file.FileCounters`).
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import errno
import logging
import mmap
import os
import platform
import queue
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

import outcome
import trio
from trio.lowlevel import Abort, ParkingLot, RunVar, current_task, reschedule

from vdiskfs.block.stats import Counters
from vdiskfs.drivers.protocol import _uring_abi as abi
from vdiskfs.drivers.protocol._cachestat import PageCacheProbe

__all__ = [
    "DEFAULT_MAX_INFLIGHT_BYTES",
    "ENGINE_NAMES",
    "EngineStats",
    "HostFile",
    "IoCounters",
    "IoEngine",
    "current_engine",
]

log = logging.getLogger(__name__)

#: Request data the engine holds in flight at most (reads' buffers, writes' payloads).
DEFAULT_MAX_INFLIGHT_BYTES = 64 << 20
#: Requests in the engine at most; also the io_uring submission ring's size.
MAX_INFLIGHT_OPS = 256
#: Threads of the ``threads`` engine at most (one blocking system call each).
MAX_THREADS = 64
ENGINE_NAMES = ("auto", "io_uring", "threads", "inline")
_ENV = "VDISKFS_IO_ENGINE"

Buffer = bytes | bytearray | memoryview
T = TypeVar("T")
#: errnos with which preadv2/pwritev2 refuse RWF_NOWAIT itself (not the I/O): stop trying it.
_NOWAIT_UNSUPPORTED = (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS)

_READ, _WRITE, _SYNC = 0, 1, 2


@dataclass(slots=True)
class EngineStats:
    """What one engine did, for everything it served (every ``file`` node of the loop)."""

    submitted: int = 0
    completed: int = 0
    in_flight: int = 0
    max_in_flight: int = 0
    inflight_bytes: int = 0
    max_inflight_bytes: int = 0
    #: Requests that waited for room under the caps.
    budget_waits: int = 0
    #: Reads abandoned by a cancelled caller (their buffers freed once the I/O ended).
    abandoned: int = 0


@dataclass(slots=True)
class IoCounters(Counters):
    """What one file's I/O did in the engine (the ``file`` node's counters extend these)."""

    #: System calls made on the file.
    syscalls: int = 0
    #: Reads served from the page cache without waiting (RWF_NOWAIT, or an io_uring read that
    #: completed within its submission).
    inline_reads: int = 0
    #: Requests handed to the engine, those done, those in flight now, the most at once.
    engine_submitted: int = 0
    engine_completed: int = 0
    engine_in_flight: int = 0
    engine_max_in_flight: int = 0


class HostFile:
    """What the engine needs of one open file: its descriptor, its counters, and whether its
    file system takes ``RWF_NOWAIT`` (found out at the first try)."""

    __slots__ = ("counters", "fd", "last_read_cached", "nowait_reads", "nowait_writes")

    def __init__(self, fd: int, counters: IoCounters) -> None:
        self.fd = fd
        self.counters = counters
        self.nowait_reads = True
        self.nowait_writes = True
        #: The page cache answered this file's last read: try the next one at once, without
        #: asking cachestat first (see IoEngine.read).
        self.last_read_cached = False


class IoEngine:
    """Base: the byte and request caps, the counters, the loops over short transfers and the
    ``RWF_NOWAIT`` tries; subclasses make the system calls (``_read``, ``_write``, ``_sync``:
    one call's worth each, which may be short)."""

    name: ClassVar[str] = "?"
    #: Try reads (and writes) inline with RWF_NOWAIT before handing them to the engine.
    tries_nowait: ClassVar[bool] = True
    #: The same for writes (io_uring: no, its submission tries without waiting itself).
    tries_nowait_writes: ClassVar[bool] = True

    def __init__(self, max_inflight_bytes: int = DEFAULT_MAX_INFLIGHT_BYTES) -> None:
        self.max_inflight_bytes = max_inflight_bytes
        self.stats = EngineStats()
        self._room = ParkingLot()
        #: Asks the page cache before a read is tried inline (None: the kernel cannot say).
        self._cache = PageCacheProbe.create() if self.tries_nowait else None

    # -- the caps ---------------------------------------------------------------------------------

    async def _admit(self, nbytes: int) -> int:
        """Reserve room for a request of ``nbytes``; returns what was reserved."""
        stats = self.stats
        nbytes = min(nbytes, self.max_inflight_bytes)
        while stats.in_flight >= MAX_INFLIGHT_OPS or (
            stats.inflight_bytes and stats.inflight_bytes + nbytes > self.max_inflight_bytes
        ):
            stats.budget_waits += 1
            await self._room.park()
        stats.submitted += 1
        in_flight = stats.in_flight = stats.in_flight + 1
        if in_flight > stats.max_in_flight:
            stats.max_in_flight = in_flight
        held = stats.inflight_bytes = stats.inflight_bytes + nbytes
        if held > stats.max_inflight_bytes:
            stats.max_inflight_bytes = held
        return nbytes

    def _release(self, reserved: int) -> None:
        stats = self.stats
        stats.completed += 1
        stats.in_flight -= 1
        stats.inflight_bytes -= reserved
        if self._room:
            self._room.unpark_all()

    # -- the verbs --------------------------------------------------------------------------------

    async def read(self, f: HostFile, view: memoryview, offset: int) -> int:
        """Fill ``view`` from ``offset``; fewer bytes only where the file ends."""
        length = len(view)
        done = 0
        counters = f.counters
        cold = False
        if self.tries_nowait and f.nowait_reads:
            cache = self._cache
            # Asking costs a system call through ctypes (~8 us of the ~40 us a hot request
            # costs the daemon), so a file whose last read was cached is tried at once: a
            # wrong guess starts one readahead on the loop, once per change from hot to cold,
            # and the next read of the file asks again.
            if cache is not None and not f.last_read_cached:
                counters.syscalls += 1
                cold = not cache.all_cached(f.fd, offset, length)
            if not cold:
                counters.syscalls += 1
                try:
                    done = os.preadv(f.fd, (view,), offset, os.RWF_NOWAIT)
                except BlockingIOError:
                    pass  # nothing cached after all: all of it goes to the engine
                except OSError as exc:
                    if exc.errno not in _NOWAIT_UNSUPPORTED:
                        raise
                    f.nowait_reads = False
                if done == length:
                    f.last_read_cached = True
                    counters.inline_reads += 1
                    return done
                cold = True
            f.last_read_cached = False
        while done < length:
            n = await self._counted(counters, self._read(f, view[done:], offset + done, cold))
            if not n:
                break
            done += n
        return done

    async def write(self, f: HostFile, view: memoryview, offset: int) -> None:
        """Write all of ``view`` at ``offset``."""
        length = len(view)
        done = 0
        counters = f.counters
        if self.tries_nowait_writes and f.nowait_writes:
            counters.syscalls += 1
            try:
                done = os.pwritev(f.fd, (view,), offset, os.RWF_NOWAIT)
            except BlockingIOError:
                pass
            except OSError as exc:
                if exc.errno not in _NOWAIT_UNSUPPORTED:
                    raise
                f.nowait_writes = False  # ext4 and others: every write to the engine
        while done < length:
            done += await self._counted(counters, self._write(f, view[done:], offset + done))

    async def fdatasync(self, f: HostFile) -> None:
        await self._counted(f.counters, self._sync(f))

    @staticmethod
    async def _counted(counters: IoCounters, request: Awaitable[T]) -> T:
        counters.syscalls += 1
        counters.engine_submitted += 1
        in_flight = counters.engine_in_flight = counters.engine_in_flight + 1
        if in_flight > counters.engine_max_in_flight:
            counters.engine_max_in_flight = in_flight
        try:
            return await request
        finally:
            counters.engine_in_flight -= 1
            counters.engine_completed += 1

    async def _read(self, f: HostFile, view: memoryview, offset: int, cold: bool) -> int:
        raise NotImplementedError

    async def _write(self, f: HostFile, view: memoryview, offset: int) -> int:
        raise NotImplementedError

    async def _sync(self, f: HostFile) -> None:
        raise NotImplementedError

    def close(self) -> None:
        """Release the engine's host resources (the event loop is ending)."""


class InlineEngine(IoEngine):
    """Every system call on the trio thread, blocking it (the behaviour before the engine)."""

    name = "inline"
    tries_nowait = False
    tries_nowait_writes = False

    async def _read(self, f: HostFile, view: memoryview, offset: int, cold: bool) -> int:
        reserved = await self._admit(len(view))
        try:
            return os.preadv(f.fd, (view,), offset)
        finally:
            self._release(reserved)
            await trio.lowlevel.checkpoint()

    async def _write(self, f: HostFile, view: memoryview, offset: int) -> int:
        reserved = await self._admit(len(view))
        try:
            return os.pwrite(f.fd, view, offset)
        finally:
            self._release(reserved)
            await trio.lowlevel.checkpoint()

    async def _sync(self, f: HostFile) -> None:
        # Even inline, a sync waits for the disk for milliseconds: keep it off the loop.
        await trio.to_thread.run_sync(os.fdatasync, f.fd)


class _Job:
    """One request in the engine: who waits for it and what must live until it ends."""

    __slots__ = ("args", "call", "kind", "pin", "reserved", "result", "task")

    def __init__(self, kind: int, reserved: int) -> None:
        self.kind = kind
        self.reserved = reserved
        self.task: trio.lowlevel.Task | None = current_task()
        self.pin: Any = None
        self.call: Callable[..., Any] | None = None
        self.args: tuple[Any, ...] = ()
        #: io_uring: the result, when the request completed within its own submission.
        self.result: int | None = None


def _abort_for(job: _Job) -> Callable[[Any], Abort]:
    def abort(_raise_cancel: Any) -> Abort:
        if job.kind == _READ:
            # The I/O goes on; its completion finds no task and drops the result.
            job.task = None
            return Abort.SUCCEEDED
        return Abort.FAILED  # a write or sync is waited for (module doc)

    return abort


class ThreadEngine(IoEngine):
    """Blocking system calls in a pool of OS threads, results posted back to trio in batches."""

    name = "threads"

    def __init__(self, max_inflight_bytes: int = DEFAULT_MAX_INFLIGHT_BYTES) -> None:
        super().__init__(max_inflight_bytes)
        self._token = trio.lowlevel.current_trio_token()
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._done: collections.deque[tuple[_Job, outcome.Outcome[Any]]] = collections.deque()
        self._wakeup_pending = False
        self._threads: list[threading.Thread] = []
        #: Threads waiting for a job, less the jobs queued for them; below zero, a new thread
        #: is started. Changed by the trio thread and the workers, hence the lock.
        self._spare = 0
        self._spare_lock = threading.Lock()
        self._closed = False

    def _worker(self) -> None:
        get, done = self._jobs.get, self._done
        while True:
            job = get()
            if job is None:
                return
            assert job.call is not None
            result = outcome.capture(job.call, *job.args)
            job.args = ()
            done.append((job, result))
            # One wake-up for however many results queue up before trio runs it: the flag is
            # cleared by _deliver *before* it drains, so a result appended after the drain
            # always finds it clear and posts another.
            if not self._wakeup_pending:
                self._wakeup_pending = True
                try:
                    self._token.run_sync_soon(self._deliver)
                except trio.RunFinishedError:
                    return
            with self._spare_lock:
                self._spare += 1

    def _deliver(self) -> None:
        self._wakeup_pending = False
        done = self._done
        while done:
            job, result = done.popleft()
            self._release(job.reserved)
            if job.task is not None:
                reschedule(job.task, result)
            else:
                self.stats.abandoned += 1

    async def _run(self, kind: int, nbytes: int, call: Callable[..., T], *args: Any) -> T:
        job = _Job(kind, await self._admit(nbytes))
        job.call, job.args = call, args
        with self._spare_lock:
            self._spare -= 1
            start = self._spare < 0 and len(self._threads) < MAX_THREADS
            if start:
                self._spare += 1
        if start:
            thread = threading.Thread(target=self._worker, name="vdiskfs-io", daemon=True)
            self._threads.append(thread)
            thread.start()
        self._jobs.put(job)
        # _deliver reschedules the task with the outcome of call(*args).
        result: T = await trio.lowlevel.wait_task_rescheduled(_abort_for(job))
        return result

    async def _read(self, f: HostFile, view: memoryview, offset: int, cold: bool) -> int:
        return await self._run(_READ, len(view), os.preadv, f.fd, (view,), offset)

    async def _write(self, f: HostFile, view: memoryview, offset: int) -> int:
        return await self._run(_WRITE, len(view), os.pwrite, f.fd, view, offset)

    async def _sync(self, f: HostFile) -> None:
        await self._run(_SYNC, 0, os.fdatasync, f.fd)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for _ in self._threads:
            self._jobs.put(None)


class UringError(OSError):
    """io_uring cannot be set up here; the caller falls back to threads."""


def _check(ret: int, what: str) -> int:
    if ret < 0:
        err = ctypes.get_errno()
        raise UringError(err, f"{what}: {os.strerror(err)}")
    return ret


class UringEngine(IoEngine):
    """io_uring through the kernel ABI: one ring, completions signalled on an eventfd."""

    name = "io_uring"
    # A read the page cache holds (cachestat says so) is made inline like every engine's:
    # preadv2 costs ~2.5 us there against ~11.5 us for a submission through the ring from
    # Python, and the ring's own eventfd wake-up would follow each one (measured in
    # scripts/bench/io_engines.py). Reads that miss go to io-wq workers (IOSQE_ASYNC).
    tries_nowait_writes = False

    def __init__(self, max_inflight_bytes: int = DEFAULT_MAX_INFLIGHT_BYTES) -> None:
        super().__init__(max_inflight_bytes)
        if platform.machine() not in ("x86_64", "AMD64"):
            # The rings are shared memory read and written with plain loads and stores; only
            # x86's ordering (stores not reordered with stores, loads not with loads) makes
            # that correct without barriers that Python cannot issue.
            raise UringError(errno.ENOTSUP, f"io_uring engine needs x86-64, not "
                                            f"{platform.machine()}")
        params = abi.Params()
        params.flags = abi.IORING_SETUP_CLAMP
        self._fd = _check(abi.io_uring_setup(MAX_INFLIGHT_OPS, params), "io_uring_setup")
        self._maps: list[mmap.mmap] = []
        self._efd = -1
        try:
            self._setup(params)
        except BaseException:
            self.close()
            raise
        self._jobs: dict[int, _Job] = {}
        self._next_id = 1

    def _map(self, length: int, offset: int) -> mmap.mmap:
        area = mmap.mmap(self._fd, length, mmap.MAP_SHARED | mmap.MAP_POPULATE,
                         mmap.PROT_READ | mmap.PROT_WRITE, offset=offset)
        self._maps.append(area)
        return area

    def _setup(self, params: abi.Params) -> None:
        sq_off, cq_off = params.sq_off, params.cq_off
        if not params.features & abi.IORING_FEAT_NODROP:
            # Without NODROP a full completion ring loses completions (before Linux 5.5).
            raise UringError(errno.ENOTSUP, "io_uring without IORING_FEAT_NODROP")
        sq_bytes = sq_off.array + params.sq_entries * 4
        cq_bytes = cq_off.cqes + params.cq_entries * abi.CQE.size
        if params.features & abi.IORING_FEAT_SINGLE_MMAP:
            sq_ring = cq_ring = self._map(max(sq_bytes, cq_bytes), abi.IORING_OFF_SQ_RING)
        else:
            sq_ring = self._map(sq_bytes, abi.IORING_OFF_SQ_RING)
            cq_ring = self._map(cq_bytes, abi.IORING_OFF_CQ_RING)
        self._sqes = self._map(params.sq_entries * abi.SQE.size, abi.IORING_OFF_SQES)
        self.entries = params.sq_entries
        # 32-bit views of the rings: each index read is a fresh load of the shared memory.
        self._sq = memoryview(sq_ring).cast("I")
        self._cq = memoryview(cq_ring).cast("I")
        self._cq_bytes = cq_ring
        self._sq_tail = sq_off.tail // 4
        self._sq_mask = self._sq[sq_off.ring_mask // 4]
        self._sq_array = sq_off.array // 4
        self._cq_head = cq_off.head // 4
        self._cq_tail = cq_off.tail // 4
        self._cq_mask = self._cq[cq_off.ring_mask // 4]
        self._cqes = cq_off.cqes
        self._efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        fd = ctypes.c_int(self._efd)
        _check(abi.io_uring_register(self._fd, abi.IORING_REGISTER_EVENTFD, ctypes.byref(fd), 1),
               "IORING_REGISTER_EVENTFD")
        # Reads that miss the cache are run by io-wq workers, by default at most 4 per CPU:
        # let as many block as the engine admits. (Best effort: before Linux 5.15 the kernel
        # keeps its default.)
        workers = (ctypes.c_uint * 2)(MAX_INFLIGHT_OPS, 0)  # bounded, unbounded (0: unchanged)
        abi.io_uring_register(self._fd, abi.IORING_REGISTER_IOWQ_MAX_WORKERS, workers, 2)

    # -- submission -------------------------------------------------------------------------------

    async def _submit(self, kind: int, opcode: int, f: HostFile, buffer: Buffer | None,
                      offset: int, rw_flags: int, sqe_flags: int = 0) -> int:
        job = _Job(kind, await self._admit(len(buffer) if buffer is not None else 0))
        addr = length = 0
        if buffer is not None:
            # Pin the buffer (its memory stays put and alive) until the completion arrives,
            # whatever happens to the caller meanwhile.
            pin = abi.PyBuffer()
            flags = abi.PYBUF_WRITABLE if kind == _READ else abi.PYBUF_SIMPLE
            try:
                if abi.PyObject_GetBuffer(buffer, ctypes.byref(pin), flags) != 0:
                    raise BufferError("cannot pin the I/O buffer")  # pragma: no cover
            except BaseException:
                self._release(job.reserved)
                raise
            job.pin = pin
            addr, length = pin.buf or 0, pin.len
        user_data = self._next_id
        self._next_id = user_data + 1
        sq = self._sq
        tail = sq[self._sq_tail]
        index = tail & self._sq_mask
        abi.SQE.pack_into(self._sqes, index * abi.SQE.size, opcode, sqe_flags, 0, f.fd, offset,
                          addr, length, rw_flags, user_data, 0, 0, 0, 0, 0)
        sq[self._sq_array + index] = index
        # The entry is written before the tail that publishes it (x86 keeps stores in order).
        sq[self._sq_tail] = (tail + 1) & 0xFFFFFFFF
        while True:
            ret = abi.io_uring_enter(self._fd, 1, 0, 0)
            if ret >= 0 or ctypes.get_errno() != errno.EINTR:
                break
        if ret != 1:
            # Nothing was consumed: take the entry back so that it is never submitted later
            # with a buffer that is gone.
            sq[self._sq_tail] = tail
            self._finish(job)
            err = ctypes.get_errno() if ret < 0 else errno.EAGAIN
            raise OSError(err, f"io_uring_enter: {os.strerror(err)}")
        self._jobs[user_data] = job
        # The kernel tries a request at once within io_uring_enter and completes it there when
        # it need not wait (a read from the page cache): then the answer is in the ring now,
        # and waiting for the eventfd round trip would cost more than the read did.
        self._reap(job)
        res = job.result
        if res is None:
            # _reap reschedules the task with the request's result (or its OSError).
            done: int = await trio.lowlevel.wait_task_rescheduled(_abort_for(job))
            return done
        if kind == _READ:
            f.counters.inline_reads += 1
        if res < 0:
            raise OSError(-res, os.strerror(-res))
        return res

    def _finish(self, job: _Job) -> None:
        pin, job.pin = job.pin, None
        if pin is not None:
            abi.PyBuffer_Release(ctypes.byref(pin))
        self._release(job.reserved)

    # -- completion -------------------------------------------------------------------------------

    async def reap_forever(self) -> None:
        """The system task: wait for the eventfd, then hand every completion to its task."""
        try:
            # Checked before every wait: close() may run before this task first does, and its
            # notify_closing only wakes a task already waiting.
            while (efd := self._efd) >= 0:
                await trio.lowlevel.wait_readable(efd)
                if self._efd < 0:
                    break  # closed while this task was waking up
                with contextlib.suppress(BlockingIOError):
                    os.eventfd_read(efd)
                self._reap()
        except trio.ClosedResourceError:
            pass  # closed by close()
        finally:
            self.close()

    def _reap(self, own: _Job | None = None) -> None:
        """Hand every completion in the ring to its task; the one of ``own`` (the caller's,
        which is running, not waiting) is left in ``own.result``."""
        cq = self._cq
        head = cq[self._cq_head]
        tail = cq[self._cq_tail]
        if head == tail:
            return
        unpack, ring, jobs = abi.CQE.unpack_from, self._cq_bytes, self._jobs
        mask, base, size = self._cq_mask, self._cqes, abi.CQE.size
        done: list[tuple[_Job, int]] = []
        while head != tail:
            user_data, res, _flags = unpack(ring, base + (head & mask) * size)
            head = (head + 1) & 0xFFFFFFFF
            job = jobs.pop(user_data, None)
            if job is not None:
                done.append((job, res))
        # Entries are read before the head that frees their slots.
        cq[self._cq_head] = head
        for job, res in done:
            self._finish(job)
            task = job.task
            if job is own:
                job.result = res
            elif task is None:
                self.stats.abandoned += 1
            elif res < 0:
                reschedule(task, outcome.Error(OSError(-res, os.strerror(-res))))
            else:
                reschedule(task, outcome.Value(res))

    # -- the verbs --------------------------------------------------------------------------------

    async def _read(self, f: HostFile, view: memoryview, offset: int, cold: bool) -> int:
        # A read known to miss the page cache goes straight to an io-wq worker: tried inline,
        # the kernel would start its I/O on this thread first (see _cachestat).
        return await self._submit(_READ, abi.IORING_OP_READ, f, view, offset, 0,
                                  abi.IOSQE_ASYNC if cold else 0)

    async def _write(self, f: HostFile, view: memoryview, offset: int) -> int:
        return await self._submit(_WRITE, abi.IORING_OP_WRITE, f, view, offset, 0)

    async def _sync(self, f: HostFile) -> None:
        await self._submit(_SYNC, abi.IORING_OP_FSYNC, f, None, 0, abi.IORING_FSYNC_DATASYNC)

    def close(self) -> None:
        jobs = getattr(self, "_jobs", {})
        if jobs:
            # The kernel may still write into these buffers: never free them.
            _NEVER_FREED.extend(jobs.values())
            jobs.clear()
        # The views onto the rings go first: a map with exported views cannot close.
        for name in ("_sq", "_cq"):
            view = getattr(self, name, None)
            if view is not None:
                view.release()
                setattr(self, name, None)
        for area in getattr(self, "_maps", []):
            # A view still exported would keep the map until it is garbage: harmless.
            with contextlib.suppress(BufferError):
                area.close()
        self._maps = []
        if getattr(self, "_efd", -1) >= 0:
            # The reaper may be waiting on it: wake it (ClosedResourceError) before closing.
            with contextlib.suppress(RuntimeError):
                trio.lowlevel.notify_closing(self._efd)
        for fd_name in ("_efd", "_fd"):
            fd = getattr(self, fd_name, -1)
            if fd >= 0:
                os.close(fd)
                setattr(self, fd_name, -1)


#: Jobs whose I/O was still in the kernel when their ring closed (see UringEngine.close).
_NEVER_FREED: list[_Job] = []

_ENGINE: RunVar[IoEngine] = RunVar("vdiskfs_io_engine")


def _wanted() -> str:
    wanted = os.environ.get(_ENV, "auto").strip() or "auto"
    if wanted not in ENGINE_NAMES:
        raise ValueError(f"{_ENV}={wanted!r}: expected one of {', '.join(ENGINE_NAMES)}")
    return wanted


def current_engine() -> IoEngine:
    """The engine of the running event loop, created on first use (``VDISKFS_IO_ENGINE``)."""
    try:
        return _ENGINE.get()
    except LookupError:
        pass
    wanted = _wanted()
    engine: IoEngine
    if wanted in ("auto", "io_uring"):
        try:
            uring = UringEngine()
        except OSError as exc:
            if wanted == "io_uring":
                raise
            log.info("io_uring unavailable (%s); using the thread engine", exc)
            engine = _start_threads()
        else:
            trio.lowlevel.spawn_system_task(uring.reap_forever, name="vdiskfs-io_uring")
            engine = uring
    elif wanted == "threads":
        engine = _start_threads()
    else:
        engine = InlineEngine()
    _ENGINE.set(engine)
    return engine


def _start_threads() -> ThreadEngine:
    engine = ThreadEngine()

    async def close_at_exit() -> None:
        try:
            await trio.sleep_forever()
        finally:
            engine.close()

    trio.lowlevel.spawn_system_task(close_at_exit, name="vdiskfs-io-threads")
    return engine
