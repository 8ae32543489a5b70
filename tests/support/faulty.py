"""A filter node between a format node and its file that simulates what a disk does under
faults: a process killed, the power cut, the host out of space, requests overtaking each other.

:class:`FaultyFile` passes every request through to the real file, and on the side keeps what a
power cut would leave: ``durable`` (the file as of the last flush) and the writes since. After
``crash_after`` writes have reached the file, the crash happens, in one of two ways
(:class:`CrashMode`):

- ``KILL``: the process dies there: every later request raises :class:`CrashedError`. Then
  :meth:`FaultyFile.crash_image` builds the file a disk could hold after a power cut at that
  point -- everything flushed, plus any subset of the writes since, applied in order -- which
  a test checks with ``qemu-img check``.
- ``DROP``: the power fails, but the driver carries on unaware: every later write is lost
  although it succeeds, and reads see the lost writes all the same (a page cache that never
  reaches the disk), so the driver keeps a consistent view and flushes and closes as it would.
  What is on the file afterwards is what the disk holds.

``space_limit`` makes writes that would grow the file beyond it fail with ENOSPC. ``jitter``
yields to other tasks inside requests, so concurrent requests interleave.

It also logs every write and sync (``log``): since a run does the same until it is killed
whether or not it will be, one uninterrupted run gives the crash images of every point in it
(:func:`crash_images`).

:func:`open_faulty` opens a format node over a :class:`FaultyFile` of an image, for writing.
"""

from __future__ import annotations

import enum
import os
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import trio

from vdiskfs.block.context import OpenContext, OpenOptions
from vdiskfs.block.node import BlockNode, Buffer, FilterNode
from vdiskfs.drivers.protocol.file import FileNode
from vdiskfs.errors import HostIOError, NoSpaceError, UnsupportedError

__all__ = ["LAST", "SUFFIX", "CrashMode", "CrashedError", "FaultyFile", "crash_images",
           "open_faulty"]

#: ``crash_images`` keep modes: the writes after a random cut, or the last write alone.
SUFFIX = -1.0
LAST = -2.0


class CrashMode(enum.Enum):
    """What happens to the writes after the crash point of a :class:`FaultyFile`."""

    #: The process is killed: every later request fails with :class:`CrashedError`.
    KILL = "kill"
    #: The power fails unnoticed: later writes succeed but never reach the file.
    DROP = "drop"


class CrashedError(HostIOError):
    """The simulated process died: nothing reaches the file any more."""


class FaultyFile(FilterNode):
    """See the module's docstring. ``crash_after``: writes (``pwrite``, ``zero``, ``discard``)
    that reach the file before the crash, counted from the filter's creation (None: no crash;
    :meth:`crash_in` counts from now); ``jitter``: the chance that a request first yields to
    other tasks (1.0: every one), drawn from ``rng``."""

    def __init__(
        self,
        child: BlockNode,
        *,
        crash_after: int | None = None,
        mode: CrashMode = CrashMode.KILL,
        space_limit: int | None = None,
        jitter: float = 0.0,
        rng: random.Random | None = None,
    ) -> None:
        super().__init__(child)
        self.crash_after = crash_after
        self.mode = mode
        self.space_limit = space_limit
        self.jitter = jitter
        self.rng = rng if rng is not None else random.Random(0)
        #: Writes that reached the file; writes lost after the crash (``DROP``).
        self.writes = 0
        self.dropped = 0
        self.flushes = 0
        self.crashed = False
        self.durable = bytearray()
        self.pending: list[tuple[int, bytes]] = []
        #: The file at open, then every write ``(offset, data)`` and sync (``None``), in order.
        self.initial = b""
        self.log: list[tuple[int, bytes] | None] = []
        #: ``DROP``: the file as the driver wrote it, lost writes included (what reads return).
        self.mirror: bytearray | None = None

    async def open(self) -> None:
        self.size = self.file.size
        self.growable = self.file.growable
        self.initial = bytes(await self.file.pread(0, self.size)) if self.size else b""
        self.durable = bytearray(self.initial)
        if self.mode is CrashMode.DROP:
            self.mirror = bytearray(self.initial)

    def crash_in(self, writes: int | None) -> None:
        """Crash once ``writes`` more writes have reached the file (None: never)."""
        self.crash_after = None if writes is None else self.writes + writes

    def _dead(self) -> CrashedError:
        return CrashedError("the process is gone (simulated crash)", path=self.label)

    async def _yield(self) -> None:
        if self.jitter and self.rng.random() < self.jitter:
            await trio.sleep(0)

    def _admit(self, offset: int, length: int) -> bool:
        """Count a write; False if the crash loses it, raises if the crash kills it."""
        if self.crashed or (self.crash_after is not None and self.writes >= self.crash_after):
            self.crashed = True
            if self.mode is CrashMode.KILL:
                raise self._dead()
            self.dropped += 1
            return False
        if self.space_limit is not None and offset + length > max(self.space_limit,
                                                                  self.file.size):
            raise NoSpaceError("no space left on device (simulated)", path=self.label,
                               offset=offset)
        self.writes += 1
        return True

    def _written(self, offset: int, data: bytes) -> None:
        """The driver's view after a write (whether or not it reached the file)."""
        if self.mirror is not None:
            _apply(self.mirror, offset, data)
        self.size = max(self.size, self.file.size, offset + len(data))

    async def _pread(self, offset: int, length: int) -> Buffer:
        if self.crashed and self.mode is CrashMode.KILL:
            raise self._dead()
        await self._yield()
        if self.mirror is not None:
            return bytes(self.mirror[offset : offset + length])
        return await self.file.pread(offset, length)

    async def _pwrite(self, offset: int, data: Buffer) -> None:
        await self._yield()
        data = bytes(data)
        if self._admit(offset, len(data)):
            self._record(offset, data)
            await self.file.pwrite(offset, data)
        self._written(offset, data)

    async def _zero(self, offset: int, length: int, may_unmap: bool) -> None:
        await self._yield()
        if self._admit(offset, length):
            self._record(offset, bytes(length))
            await self.file.zero(offset, length, may_unmap=may_unmap)
        self._written(offset, bytes(length))

    async def _discard(self, offset: int, length: int) -> None:
        # A hole punched, or not: the disk may hold either afterwards.
        if self._admit(offset, length):
            self._record(offset, bytes(length))
            await self.file.discard(offset, length)
        if self.mirror is not None:
            _apply(self.mirror, offset, bytes(length))

    async def truncate(self, size: int) -> None:
        # The log holds writes and syncs only: a file that shrinks is not modelled. Refused,
        # as a file that cannot be cut (a block device) refuses; drivers then reuse the space.
        raise UnsupportedError("truncating is not simulated", path=self.label)

    async def _flush(self) -> None:
        if self.crashed:
            if self.mode is CrashMode.KILL:
                raise self._dead()
            return  # the power is gone: nothing becomes durable any more
        await self._yield()
        for offset, data in self.pending:
            _apply(self.durable, offset, data)
        self.pending.clear()
        self.log.append(None)
        self.flushes += 1

    def _record(self, offset: int, data: bytes) -> None:
        self.pending.append((offset, data))
        self.log.append((offset, data))

    def crash_image(self, rng: random.Random, keep: float = 0.5) -> bytes:
        """The file after a power cut now: flushed data, and each later write kept with
        probability ``keep`` (in order: a kept write lands over the earlier ones)."""
        image = bytearray(self.durable)
        for offset, data in self.pending:
            if rng.random() < keep:
                _apply(image, offset, data)
        return bytes(image)


def _apply(image: bytearray, offset: int, data: bytes) -> None:
    end = offset + len(data)
    if end > len(image):
        image.extend(bytes(end - len(image)))
    image[offset:end] = data


def crash_images(initial: bytes, log: list[tuple[int, bytes] | None], points: list[int],
                 rng: random.Random, keep: float = 0.5) -> list[tuple[int, bytes]]:
    """``(point, image)`` for a crash just before log entry ``point`` of each of ``points``
    (increasing): the syncs before it applied, and of the writes since the last of them each
    kept with probability ``keep``. Two special values keep later writes without earlier
    ones, what a missing sync needs to show: ``SUFFIX`` keeps those after a random cut,
    ``LAST`` only the last one."""
    durable = bytearray(initial)
    applied = 0  # log entries folded into `durable`
    last_sync = 0
    out: list[tuple[int, bytes]] = []
    for point in points:
        for at in range(last_sync, point):
            if log[at] is None:
                last_sync = at + 1
        while applied < last_sync:
            entry = log[applied]
            if entry is not None:
                _apply(durable, *entry)
            applied += 1
        image = bytearray(durable)
        pending = log[last_sync:point]
        if keep == SUFFIX:
            cut = rng.randrange(len(pending) + 1)
        elif keep == LAST:
            cut = max(0, len(pending) - 1)
        for index, entry in enumerate(pending):
            if entry is not None and (index >= cut if keep < 0 else rng.random() < keep):
                _apply(image, *entry)
        out.append((point, bytes(image)))
    return out


NodeT = TypeVar("NodeT", bound=BlockNode)


async def open_faulty(path: Path, node_class: Callable[[BlockNode, OpenContext], NodeT],
                      **fault: Any) -> tuple[NodeT, FaultyFile]:
    """Open ``path`` writable with ``node_class`` over a :class:`FaultyFile` of its file
    (``fault``: the filter's options). Backing files open as usual, without faults."""
    file = FileNode(str(path), read_only=False)
    await file.open()
    faulty = FaultyFile(file, **fault)
    await faulty.open()
    ctx = OpenContext(OpenOptions(read_only=False), path=str(path),
                      chain=(os.path.realpath(path),))
    node = node_class(faulty, ctx)
    try:
        await node.open()
    except BaseException:
        await node.aclose()
        raise
    return node, faulty
