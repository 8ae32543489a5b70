"""Runs: what a format driver's mapping says about a guest range, and the I/O that serves them.

A block-table format (vdi, qed, vhdx) answers one question for every guest byte: is it stored
in this image (at which host offset), is it zero by this image's say-so, or does this image not
define it (read the backing file, or zeros without one)? As in QEMU's
``qcow2_get_host_offset`` and dissect's ``_yield_runs``, a driver's *mapping* is a pure function
from a guest range to a list of :class:`Run`; the node then does the I/O with
:func:`read_runs`, which turns each run into at most one child read after :func:`coalesce` has
merged neighbours (adjacent data runs whose host ranges touch become one read); a write goes
through :func:`write_runs`, which writes DATA runs in place and hands the others to the
driver's allocation.

Nothing here holds per-image state: the caches (:class:`LruCache`) and counters
(:class:`RunCounters`) are created by, and belong to, each node.
"""

from __future__ import annotations

import array
import enum
import sys
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Generic, TypeVar

from vdiskfs.block.node import BlockNode, BlockStatus, Buffer
from vdiskfs.block.stats import Counters

__all__ = [
    "LruCache",
    "Run",
    "RunCounters",
    "RunKind",
    "coalesce",
    "first_run",
    "le_bytes",
    "le_table",
    "read_runs",
    "run_status",
    "write_runs",
]


class RunKind(enum.Enum):
    """Where the bytes of a guest range come from."""

    #: Stored in this image, at ``Run.host_offset`` in the ``file`` child.
    DATA = "data"
    #: Zeros, because this image says so (a zero block/cluster, a discarded block).
    ZERO = "zero"
    #: Not defined by this image: the backing file's bytes, zeros past its end or without one.
    BACKING = "backing"


@dataclass(frozen=True, slots=True)
class Run:
    """A guest range of one kind; ``host_offset`` is meaningful for DATA runs only."""

    kind: RunKind
    offset: int
    length: int
    host_offset: int = -1

    @property
    def end(self) -> int:
        return self.offset + self.length


def coalesce(runs: Iterable[Run]) -> list[Run]:
    """Merge neighbouring runs of one kind; DATA runs only where the host ranges touch too."""
    out: list[Run] = []
    for run in runs:
        if run.length == 0:
            continue
        if out:
            last = out[-1]
            if (
                last.kind is run.kind
                and last.end == run.offset
                and (run.kind is not RunKind.DATA or last.host_offset + last.length
                     == run.host_offset)
            ):
                out[-1] = Run(last.kind, last.offset, last.length + run.length, last.host_offset)
                continue
        out.append(run)
    return out


def first_run(runs: Iterable[Run]) -> Run:
    """The first coalesced run of a lazily produced mapping, consuming no more than needed.

    ``block_status`` wants only the run at the start of a range; mapping a whole terabyte to
    throw all but one run away would be waste, so mappings are generators and this stops at
    the first run that does not continue the current one.
    """
    current: Run | None = None
    for run in runs:
        if run.length == 0:
            continue
        if current is None:
            current = run
            continue
        merged = coalesce((current, run))
        if len(merged) != 1:
            break
        current = merged[0]
    if current is None:
        raise ValueError("empty mapping")
    return current


def run_status(run: Run, backing: BlockNode | None) -> tuple[BlockStatus, int]:
    """The BlockStatus of the start of ``run``, and how far it holds, as node.py defines them.

    A range this image does not define reads from the backing file (neither DATA nor ZERO);
    past the backing file's end, or without one, it reads as zeros and is still not ALLOCATED
    here -- as QEMU reports an unallocated qcow2 cluster.
    """
    if run.kind is RunKind.DATA:
        return BlockStatus.DATA | BlockStatus.ALLOCATED, run.length
    if run.kind is RunKind.ZERO:
        return BlockStatus.ZERO | BlockStatus.ALLOCATED, run.length
    if backing is None or run.offset >= backing.size:
        return BlockStatus.ZERO, run.length
    return BlockStatus(0), min(run.length, backing.size - run.offset)


@dataclass(slots=True)
class RunCounters(Counters):
    """Counters every run-serving driver keeps; drivers subclass it to add their caches'."""

    #: Reads issued to the file child for DATA runs (after coalescing), and their bytes.
    data_reads: int = 0
    data_bytes: int = 0
    #: Reads issued to the backing file, and their bytes.
    backing_reads: int = 0
    backing_bytes: int = 0
    #: Bytes served as zeros without any I/O (zero runs, unbacked ranges, past a backing end).
    zero_bytes: int = 0


async def write_runs(runs: Iterable[Run], offset: int, data: memoryview, file: BlockNode,
                     allocate: Callable[[Run, memoryview], Awaitable[None]]) -> None:
    """Write ``data``, the guest bytes from ``offset`` on, through their mapping ``runs``: DATA
    runs in place in ``file``, every other run by ``allocate(run, its bytes of data)``.

    A driver maps a write without its allocation lock and, when every run is DATA, calls this
    at once (nothing is allocated: nothing to serialise); otherwise it takes the lock, maps
    again -- an allocating write that held the lock meanwhile may have mapped these blocks --
    and calls this under it.
    """
    for run in runs:
        chunk = data[run.offset - offset : run.end - offset]
        if run.kind is RunKind.DATA:
            await file.pwrite(run.host_offset, chunk)
        else:
            await allocate(run, chunk)


async def read_runs(runs: list[Run], file: BlockNode, backing: BlockNode | None,
                    counters: RunCounters) -> Buffer:
    """Serve ``runs`` (contiguous, in guest order) into one buffer.

    A BACKING run reads the backing file where it has bytes; past its end (a backing file
    smaller than this image, as QEMU allows for qcow2 and qed) and without one, it reads zeros.
    """
    if not runs:
        return bytearray()
    if len(runs) == 1 and runs[0].kind is RunKind.DATA:
        # The common case of a sequential reader: the child's buffer as it is, without
        # zero-filling and copying into a new one (measured: 15% of the daemon's time).
        run = runs[0]
        counters.data_reads += 1
        counters.data_bytes += run.length
        return await file.pread(run.host_offset, run.length)
    base = runs[0].offset
    buf = bytearray(runs[-1].end - base)
    view = memoryview(buf)
    for run in runs:
        start = run.offset - base
        if run.kind is RunKind.DATA:
            counters.data_reads += 1
            counters.data_bytes += run.length
            view[start : start + run.length] = await file.pread(run.host_offset, run.length)
        elif run.kind is RunKind.BACKING and backing is not None and run.offset < backing.size:
            n = min(run.length, backing.size - run.offset)
            counters.backing_reads += 1
            counters.backing_bytes += n
            view[start : start + n] = await backing.pread(run.offset, n)
            counters.zero_bytes += run.length - n
        else:
            counters.zero_bytes += run.length
    return buf


K = TypeVar("K")
V = TypeVar("V")


class LruCache(Generic[K, V]):
    """A bounded least-recently-used map; the owner counts hits and misses in its counters.

    Used for metadata tables (qed L2 pages, vhdx BAT pages and sector bitmaps). Two concurrent
    misses on one key may both load it: harmless while the tables are read-only, and the later
    ``put`` simply replaces an equal value. A writable node must not let a load that raced an
    update put a stale page back: qed and vhdx count their updates and cache a loaded page only
    when none happened while it was read.
    """

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError("cache capacity must be at least 1")
        self.capacity = capacity
        self._entries: OrderedDict[K, V] = OrderedDict()

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

    def clear(self) -> None:
        self._entries.clear()

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
