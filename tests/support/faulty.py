"""A filter node between a format node and its file that simulates what a disk does under
faults: a process killed, the power cut, the host out of space, requests overtaking each other.

:class:`FaultyFile` passes every request through to the real file, and on the side keeps what a
power cut would leave: ``durable`` (the file as of the last flush) and the writes since. After
``crash_after`` writes it raises on every request, as if the process had died there; then
:meth:`FaultyFile.crash_image` builds the file a disk could hold after the crash -- everything
flushed, plus any subset of the writes since, applied in order -- which a test checks with
``qemu-img check``. ``space_limit`` makes writes that would grow the file beyond it fail with
ENOSPC. ``jitter`` yields to other tasks inside requests, so concurrent requests interleave.

It also logs every write and sync (``log``): since a run does the same until it is killed
whether or not it will be, one uninterrupted run gives the crash images of every point in it
(:func:`crash_images`).
"""

from __future__ import annotations

import random

import trio

from vdiskfs.block.node import BlockNode, Buffer, FilterNode
from vdiskfs.errors import HostIOError, NoSpaceError

__all__ = ["LAST", "SUFFIX", "CrashedError", "FaultyFile", "crash_images"]

#: ``crash_images`` keep modes: the writes after a random cut, or the last write alone.
SUFFIX = -1.0
LAST = -2.0


class CrashedError(HostIOError):
    """The simulated process died: nothing reaches the file any more."""


class FaultyFile(FilterNode):
    def __init__(
        self,
        child: BlockNode,
        *,
        crash_after: int | None = None,
        space_limit: int | None = None,
        jitter: random.Random | None = None,
    ) -> None:
        super().__init__(child)
        self.crash_after = crash_after
        self.space_limit = space_limit
        self.jitter = jitter
        self.writes = 0
        self.flushes = 0
        self.crashed = False
        self.durable = bytearray()
        self.pending: list[tuple[int, bytes]] = []
        #: The file at open, then every write ``(offset, data)`` and sync (``None``), in order.
        self.initial = b""
        self.log: list[tuple[int, bytes] | None] = []

    async def open(self) -> None:
        self.size = self.file.size
        self.growable = self.file.growable
        self.initial = bytes(await self.file.pread(0, self.size)) if self.size else b""
        self.durable = bytearray(self.initial)

    async def _yield(self) -> None:
        if self.jitter is not None and self.jitter.random() < 0.5:
            await trio.sleep(0)

    def _count_write(self, offset: int, length: int) -> None:
        if self.crashed:
            raise CrashedError("the process is gone (simulated crash)", path=self.label)
        if self.crash_after is not None and self.writes >= self.crash_after:
            self.crashed = True
            raise CrashedError("the process is gone (simulated crash)", path=self.label)
        if self.space_limit is not None and offset + length > max(self.space_limit,
                                                                  self.file.size):
            raise NoSpaceError("no space left on device (simulated)", path=self.label,
                               offset=offset)
        self.writes += 1

    async def _pread(self, offset: int, length: int) -> Buffer:
        if self.crashed:
            raise CrashedError("the process is gone (simulated crash)", path=self.label)
        await self._yield()
        return await self.file.pread(offset, length)

    async def _pwrite(self, offset: int, data: Buffer) -> None:
        await self._yield()
        self._count_write(offset, len(data))
        self._record(offset, bytes(data))
        await self.file.pwrite(offset, data)
        self.size = self.file.size

    async def _zero(self, offset: int, length: int, may_unmap: bool) -> None:
        await self._yield()
        self._count_write(offset, length)
        self._record(offset, bytes(length))
        await self.file.zero(offset, length, may_unmap=may_unmap)
        self.size = self.file.size

    async def _discard(self, offset: int, length: int) -> None:
        # A hole punched, or not: the disk may hold either afterwards.
        self._count_write(offset, length)
        self._record(offset, bytes(length))
        await self.file.discard(offset, length)

    async def _flush(self) -> None:
        if self.crashed:
            raise CrashedError("the process is gone (simulated crash)", path=self.label)
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
