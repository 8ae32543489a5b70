"""Runs: what a format driver's mapping says about a guest range, and the one executor that
serves them.

Every format answers one question for every guest byte: is it stored in this image (at which
host offset, plainly or compressed), is it zero by this image's say-so, or does this image not
define it (read the backing file; zeros past its end or without one)? As in QEMU's
``qcow2_get_host_offset`` and dissect's ``_yield_runs``, a driver's *mapping* turns a guest
range into a list of :class:`Run`, and the I/O is done here, once for every format:

* :func:`read_runs` serves a request's runs: DATA from the file child (or the child the run
  names: a vmdk extent, a qcow2 external data file), ZERO without I/O, BACKING through
  :meth:`FormatNode.read_backing <vdiskfs.block.format.FormatNode.read_backing>` (the one place
  that zero-fills past the backing file's end), COMPRESSED through the driver's
  :meth:`~vdiskfs.block.format.FormatNode.read_compressed` hook. The runs of one request are
  read concurrently once one of them has had to wait, at most :data:`MAX_FANOUT` child
  requests at a time (:func:`fan_out`).
* :func:`write_runs` writes DATA runs in place and hands the others to the driver's allocation.
* :func:`run_status` and :func:`runs_status` turn runs into block status.

Nothing here holds per-image state: the caches (:class:`LruCache`) and counters
(:class:`RunCounters`) are created by, and belong to, each node.
"""

from __future__ import annotations

import array
import enum
import sys
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Generic, Protocol, TypeVar

import trio

from vdiskfs.block.node import BlockNode, BlockStatus, Buffer
from vdiskfs.block.stats import Counters
from vdiskfs.errors import FormatError

if TYPE_CHECKING:
    from vdiskfs.block.format import FormatNode

__all__ = [
    "INLINE_SECONDS",
    "MAX_FANOUT",
    "LruCache",
    "Run",
    "RunCounters",
    "RunKind",
    "RunNode",
    "coalesce",
    "fan_out",
    "le_bytes",
    "le_table",
    "read_runs",
    "run_status",
    "runs_status",
    "write_runs",
]

#: Child requests that one :func:`read_runs` call keeps in flight at most. A 1 MiB read of a
#: fragmented image (16 clusters of 64 KiB) goes out at once; a read of thousands of runs does
#: not flood the host engine, whose own cap bounds the whole daemon.
MAX_FANOUT = 16
#: A piece of a request that took longer than this waited for the disk: the rest of the
#: request's pieces then go out concurrently (see :func:`fan_out`).
INLINE_SECONDS = 50e-6


class RunKind(enum.Enum):
    """Where the bytes of a guest range come from.

    There is no separate "unallocated, no backing file" kind: whether a BACKING run reads a
    backing file or zeros is decided when it is read (:meth:`FormatNode.read_backing`) or
    reported (:func:`run_status`), from the node's backing file -- the mapping does not need to
    know, and a backing file shorter than the image makes one run both.
    """

    #: Stored plainly in this image, at ``Run.host_offset`` in ``Run.child`` (or the file).
    DATA = "data"
    #: Zeros, because this image says so (a zero cluster, a zeroed grain, a discarded block).
    ZERO = "zero"
    #: Not defined by this image: the backing file's bytes, zeros past its end or without one.
    BACKING = "backing"
    #: Part of a compressed cluster or grain, described by ``Run.payload``; the driver's
    #: :meth:`~vdiskfs.block.format.FormatNode.read_compressed` serves it.
    COMPRESSED = "compressed"


_DATA, _ZERO, _BACKING, _COMPRESSED = RunKind.DATA, RunKind.ZERO, RunKind.BACKING, \
    RunKind.COMPRESSED


@dataclass(slots=True)
class Run:
    """A guest range of one kind. Treated as immutable (not frozen: a frozen dataclass costs
    twice as much to build, and mappings build one per cluster on the read path)."""

    kind: RunKind
    #: Guest offset and length.
    offset: int
    length: int
    #: DATA: where the bytes are in the child (-1 for other kinds unless the driver says).
    host_offset: int = -1
    #: DATA: the child that holds the bytes when it is not the node's ``file`` (a vmdk extent,
    #: a qcow2 external data file). None: the ``file`` argument of :func:`read_runs`.
    child: BlockNode | None = None
    #: COMPRESSED: the driver's descriptor of the compressed payload (the qcow2 L2 entry; the
    #: vmdk extent's number). Compressed runs never merge.
    payload: int = 0

    @property
    def end(self) -> int:
        return self.offset + self.length


def _merged(last: Run, run: Run) -> Run | None:
    """``last`` extended by ``run`` when one read (or none) serves both, else None."""
    kind = run.kind
    if last.kind is not kind or last.offset + last.length != run.offset:
        return None
    if kind is _DATA:
        if last.host_offset + last.length != run.host_offset or last.child is not run.child:
            return None
    elif kind is _COMPRESSED:
        # Each compressed run is one cluster or grain, decompressed on its own.
        return None
    return Run(kind, last.offset, last.length + run.length, last.host_offset, last.child,
               last.payload)


def coalesce(runs: Iterable[Run]) -> list[Run]:
    """Merge neighbouring runs of one kind: DATA only where the host ranges touch in the same
    child, COMPRESSED never (one run per cluster or grain). Empty runs are dropped."""
    out: list[Run] = []
    for run in runs:
        if run.length == 0:
            continue
        if out:
            merged = _merged(out[-1], run)
            if merged is not None:
                out[-1] = merged
                continue
        out.append(run)
    return out


# -- block status ----------------------------------------------------------------------------------

_DATA_STATUS = BlockStatus.DATA | BlockStatus.ALLOCATED
_ZERO_STATUS = BlockStatus.ZERO | BlockStatus.ALLOCATED
_UNALLOCATED_ZERO = BlockStatus.ZERO
_FROM_BACKING = BlockStatus(0)


def run_status(node: FormatNode, run: Run) -> tuple[BlockStatus, int]:
    """The BlockStatus of the start of ``run``, and how far it holds, as node.py defines them.

    A range this image does not define reads from the backing file (neither DATA nor ZERO);
    past the backing file's end, or without one, it reads as zeros and is still not ALLOCATED
    here -- as QEMU reports an unallocated qcow2 cluster. A compressed cluster is data.
    """
    kind = run.kind
    if kind is _DATA or kind is _COMPRESSED:
        return _DATA_STATUS, run.length
    if kind is _ZERO:
        return _ZERO_STATUS, run.length
    present = node.backing_length(run.offset, run.length)
    if present == 0:
        return _UNALLOCATED_ZERO, run.length
    return _FROM_BACKING, present


def runs_status(node: FormatNode, runs: Iterable[Run], *,
                max_runs: int = 1024) -> tuple[BlockStatus, int]:
    """The status of the first run of a mapping, extended over the following runs of the same
    status (at most ``max_runs``: one call on a huge fragmented image stays short, the caller
    asks again). A run clipped by the backing file's end ends the extent.

    Consumes the runs lazily, so a mapping may be a generator; a mapping error past the first
    run ends the extent instead of failing it (it is reported when a request reaches there).
    """
    it = iter(runs)
    status: BlockStatus | None = None
    total = 0
    count = 0
    while count < max_runs:
        try:
            run = next(it)
        except StopIteration:
            break
        except FormatError:
            if status is None:
                raise
            break
        if run.length == 0:
            continue
        flags, n = run_status(node, run)
        if status is None:
            status = flags
        elif flags != status:
            break
        total += n
        count += 1
        if n < run.length:
            break
    if status is None:
        raise ValueError("empty mapping")
    return status, total


# -- the executor ----------------------------------------------------------------------------------


@dataclass(slots=True)
class RunCounters(Counters):
    """Counters of the run executor, kept by every format driver that maps runs; drivers
    subclass it to add their caches' and writers'."""

    #: Reads issued to a data child for DATA runs (after coalescing), and their bytes.
    data_reads: int = 0
    data_bytes: int = 0
    #: Reads issued to the backing file, and their bytes.
    backing_reads: int = 0
    backing_bytes: int = 0
    #: Guest bytes served from compressed clusters or grains.
    compressed_bytes: int = 0
    #: Bytes served as zeros without any I/O (zero runs, unbacked ranges, past a backing end).
    zero_bytes_read: int = 0
    #: Requests whose runs were read concurrently (more than one child request), and the most
    #: child requests one of them had in flight.
    fanout_requests: int = 0
    max_fanout: int = 0


class RunNode(Protocol):
    """What :func:`read_runs` uses of a format node: :class:`FormatNode`'s hooks, and counters
    that are :class:`RunCounters`."""

    @property
    def counters(self) -> RunCounters: ...

    @property
    def file(self) -> BlockNode: ...

    def backing_length(self, offset: int, length: int) -> int: ...

    async def read_backing(self, offset: int, length: int) -> Buffer: ...

    async def read_compressed(self, run: Run) -> Buffer: ...


async def read_runs(node: RunNode, runs: Sequence[Run], file: BlockNode | None = None) -> Buffer:
    """Serve ``runs`` (contiguous, in guest order, as :func:`coalesce` leaves them) into one
    buffer; DATA runs without a ``child`` read from ``file`` (default: ``node.file``).

    One run that needs one child read hands back that child's buffer as it is -- the common
    case of a sequential reader, and measured at 15% of the daemon's time when it copied.
    Otherwise the runs that need I/O are read into one buffer (zero runs are zeros already),
    concurrently once one has had to wait (:func:`fan_out`): a cold request spanning clusters
    scattered on the host waits for about two of them, not for the sum of them.
    """
    counters = node.counters
    if file is None:
        file = node.file
    if len(runs) == 1:
        run = runs[0]
        kind = run.kind
        if kind is _DATA:
            counters.data_reads += 1
            counters.data_bytes += run.length
            return await (run.child or file).pread(run.host_offset, run.length)
        if kind is _ZERO:
            counters.zero_bytes_read += run.length
            return bytes(run.length)
        if kind is _BACKING:
            _count_backing(node, counters, run)
            return await node.read_backing(run.offset, run.length)
        counters.compressed_bytes += run.length
        return await node.read_compressed(run)
    if not runs:
        return bytearray()
    base = runs[0].offset
    buf = bytearray(runs[-1].end - base)
    view = memoryview(buf)
    jobs: list[Run] = []
    for run in runs:
        if run.kind is _ZERO:
            counters.zero_bytes_read += run.length
        elif run.kind is _BACKING and node.backing_length(run.offset, run.length) == 0:
            counters.zero_bytes_read += run.length  # nothing below: zeros, no I/O
        else:
            jobs.append(run)

    async def serve(run: Run) -> None:
        start = run.offset - base
        piece = view[start : start + run.length]
        kind = run.kind
        if kind is _DATA:
            counters.data_reads += 1
            counters.data_bytes += run.length
            piece[:] = await (run.child or file).pread(run.host_offset, run.length)
        elif kind is _BACKING:
            _count_backing(node, counters, run)
            piece[:] = await node.read_backing(run.offset, run.length)
        else:
            counters.compressed_bytes += run.length
            piece[:] = await node.read_compressed(run)

    await fan_out(serve, jobs, counters)
    return buf


def _count_backing(node: RunNode, counters: RunCounters, run: Run) -> None:
    present = node.backing_length(run.offset, run.length)
    if present:
        counters.backing_reads += 1
        counters.backing_bytes += present
    counters.zero_bytes_read += run.length - present


T = TypeVar("T")


async def fan_out(serve: Callable[[T], Awaitable[None]], jobs: Sequence[T],
                  counters: RunCounters | None = None, limit: int = MAX_FANOUT) -> None:
    """Await ``serve(job)`` for every job, concurrently once they prove slow, at most
    ``limit`` at a time.

    Jobs run inline, one after the other, while each finishes within :data:`INLINE_SECONDS`:
    a page-cache hit costs a few microseconds, and a trio nursery with its tasks costs tens
    (measured: 33 us for an empty nursery, 78 us with two tasks, on the 2-core development
    machine), so a request whose pieces are all cached would only pay for concurrency. The
    first job that takes longer has waited for the disk (or the network), and so will its
    neighbours, likely: the rest then start together, in ``min(limit, remaining)`` workers
    that take jobs from one iterator (a task per job would cost a task per cluster on a
    large fragmented read). The first failure cancels the others and is raised as itself,
    not wrapped in an exception group: callers and the FUSE layer map our errors to errnos
    by type.
    """
    count = len(jobs)
    done = 0
    now = trio.current_time
    while done < count:
        started = now()
        await serve(jobs[done])
        done += 1
        if now() - started > INLINE_SECONDS:
            break
    if count - done <= 1:
        if done < count:
            await serve(jobs[done])
        return
    workers = min(limit, count - done)
    if counters is not None:
        counters.fanout_requests += 1
        if workers > counters.max_fanout:
            counters.max_fanout = workers
    pending: Iterator[T] = iter(jobs[done:])

    async def worker() -> None:
        # Sharing one iterator is safe: trio switches tasks only at an await.
        for job in pending:
            await serve(job)

    try:
        async with trio.open_nursery() as nursery:
            for _ in range(workers):
                nursery.start_soon(worker)
    except BaseExceptionGroup as group:
        error = _first_error(group)
        if error is None:
            raise  # only Cancelled: the enclosing cancel scope handles the group
        raise error from None


def _first_error(group: BaseExceptionGroup) -> BaseException | None:
    """The first exception of ``group`` (depth first) that is not a trio.Cancelled."""
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            found = _first_error(exc)
            if found is not None:
                return found
        elif not isinstance(exc, trio.Cancelled):
            return exc
    return None


async def write_runs(runs: Sequence[Run], offset: int, data: memoryview, file: BlockNode,
                     allocate: Callable[[Run, memoryview], Awaitable[None]]) -> None:
    """Write ``data``, the guest bytes from ``offset`` on, through their mapping ``runs``: DATA
    runs in place (in ``run.child`` or ``file``), every other run by ``allocate(run, its bytes
    of data)``.

    A driver maps a write without its allocation lock and, when every run is DATA, calls this
    at once: nothing is allocated, nothing to serialise, and the in-place writes go out
    concurrently (the parts of one guest write have no order between them). Otherwise it takes
    the lock, maps again -- an allocating write that held the lock meanwhile may have mapped
    these blocks -- and calls this under it; then the runs are written in order, because an
    allocation's metadata order is the driver's to keep.
    """

    async def write_in_place(run: Run) -> None:
        await (run.child or file).pwrite(run.host_offset,
                                         data[run.offset - offset : run.end - offset])

    if all(run.kind is _DATA for run in runs):
        await fan_out(write_in_place, runs)
        return
    for run in runs:
        if run.kind is _DATA:
            await write_in_place(run)
        else:
            await allocate(run, data[run.offset - offset : run.end - offset])


# -- caches ----------------------------------------------------------------------------------------

K = TypeVar("K")
V = TypeVar("V")


class _Load(Generic[V]):
    """A load in flight: waiters share its value when it was cached."""

    __slots__ = ("done", "value")

    def __init__(self) -> None:
        self.done = trio.Event()
        #: The loaded value, once it is known good for later readers too; else None.
        self.value: V | None = None


class LruCache(Generic[K, V]):
    """A bounded least-recently-used map of metadata (qed L2 pages, vhdx BAT pages, sector
    bitmaps, vmdk grain tables and inflated grains), with single-flight loads.

    Concurrency rules, the same for every driver:

    * :meth:`load` loads a missing entry once: a reader that misses while another task is
      loading the same key waits for that load and shares its value (``hit`` is true for it,
      as QEMU counts a waiter on ``qcow2_cache``). A failed load wakes the waiters, and each
      tries again itself, so each sees the error.
    * A writer that changes entries wraps the change and its write to the image in
      :meth:`updating`. A load that overlapped any of that may hold bytes from before the
      change: it serves its own request (which was concurrent with the write, so either answer
      is right) but is not cached, and its waiters load again.

    The owner counts hits and misses in its own counters from :meth:`load`'s result.
    """

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError("cache capacity must be at least 1")
        self.capacity = capacity
        self._entries: OrderedDict[K, V] = OrderedDict()
        self._loading: dict[K, _Load[V]] = {}
        #: Bumped when an update starts and when it ends (see :meth:`updating`).
        self.generation = 0

    def get(self, key: K) -> V | None:
        value = self._entries.get(key)
        if value is not None:
            self._entries.move_to_end(key)
        return value

    def put(self, key: K, value: V) -> None:
        self._entries[key] = value
        self._entries.move_to_end(key)
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)

    async def load(self, key: K, loader: Callable[[], Awaitable[V]]) -> tuple[V, bool]:
        """The entry at ``key`` and whether it was a hit; on a miss ``loader()`` reads it, once
        however many tasks miss on ``key`` together."""
        while True:
            value = self.get(key)
            if value is not None:
                return value, True
            pending = self._loading.get(key)
            if pending is None:
                break
            await pending.done.wait()
            if pending.value is not None:
                return pending.value, True
            # The load failed or may be stale: load it ourselves (or join a newer load).
        flight: _Load[V] = _Load()
        self._loading[key] = flight
        generation = self.generation
        try:
            value = await loader()
            if generation == self.generation:
                self.put(key, value)
                flight.value = value
        finally:
            del self._loading[key]
            flight.done.set()
        return value, False

    def changed(self) -> None:
        """Note a change of the image's tables made visible to readers at once (through this
        cache or the owner's dirty entries): loads in flight now are not cached."""
        self.generation += 1

    @contextmanager
    def updating(self) -> Iterator[None]:
        """Bracket a change of cached entries and its write to the image: loads that overlap
        any of it are not cached (see the class docstring)."""
        self.generation += 1
        try:
            yield
        finally:
            self.generation += 1

    def loading(self, key: K) -> bool:
        """Whether a load of ``key`` is in flight (for tests and statistics)."""
        return key in self._loading

    def clear(self) -> None:
        """Forget every entry; loads in flight are not cached either (the owner clears
        when the image's tables may differ from what was read)."""
        self._entries.clear()
        self.generation += 1

    def __len__(self) -> int:
        return len(self._entries)


_TYPECODES = {4: "I", 8: "Q"}


def le_table(data: bytes, itemsize: int) -> array.array[int]:
    """Decode a little-endian table of 32- or 64-bit entries (a block map, an L2 table)."""
    table = array.array(_TYPECODES[itemsize])
    if table.itemsize != itemsize:  # pragma: no cover - every Linux ABI has these sizes
        raise RuntimeError(f"array typecode {table.typecode} is not {itemsize} bytes here")
    table.frombytes(data[: len(data) - len(data) % itemsize])
    if sys.byteorder == "big":  # pragma: no cover - little-endian hosts only in CI
        table.byteswap()
    return table


def le_bytes(table: array.array[int]) -> bytes:
    """Encode entries of a table as :func:`le_table` decodes them: little-endian, for writing a
    block map, an L2 table or a BAT back to the image."""
    if sys.byteorder == "big":  # pragma: no cover - little-endian hosts only in CI
        table = array.array(table.typecode, table)
        table.byteswap()
    return table.tobytes()
