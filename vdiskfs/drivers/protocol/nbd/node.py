"""Protocol driver ``nbd``: an export of a Network Block Device server as a protocol node.

``nbd://host[:port]/export`` and ``nbd+unix:///export?socket=PATH`` (:mod:`.uri`) open with
:func:`open_nbd`; a format (probed, or ``--format``) then opens on top, as on a file.

What the server offers decides what the verbs send, as QEMU's ``block/nbd.c``: write-zeroes
(``NO_HOLE`` unless the caller lets it unmap), trim, flush and ``base:allocation`` block status
only when the transmission flags (or the negotiated metadata context) say so; otherwise the
:class:`~vdiskfs.block.node.BlockNode` defaults (zeros written, discard ignored, everything
DATA). Requests longer than the server's maximum payload are split; with a minimum block size
above 1, reads are widened to it and writes read-modify-write the edge blocks.

A dropped connection (the server restarted, the network broke, no answer within the timeout)
is reconnected once and the failed requests are sent again -- each request at most twice;
a server that is really gone gives :class:`~vdiskfs.errors.HostIOError` with EIO, never a
hang.
"""

from __future__ import annotations

import bisect
import contextlib
import errno
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import trio

from vdiskfs.block.context import OpenOptions
from vdiskfs.block.node import BlockNode, BlockStatus, Buffer, NodeKind
from vdiskfs.block.registry import register_protocol
from vdiskfs.block.stats import Counters
from vdiskfs.drivers.protocol.nbd import wire
from vdiskfs.drivers.protocol.nbd.client import ConnectionLost, NbdConnection, NbdRequest
from vdiskfs.drivers.protocol.nbd.uri import NbdAddress, parse_uri
from vdiskfs.errors import HostIOError, ReadOnlyError

__all__ = ["NbdNode", "open_nbd"]

#: Longest write-zeroes or trim request: the 32-bit length, kept a multiple of 64 KiB (the
#: largest minimum block size).
_MAX_EFFECT = (1 << 32) - (1 << 16)


@dataclass(slots=True)
class NbdCounters(Counters):
    """``requests``: NBD requests sent; ``reconnects``: connections made again after one
    dropped; ``retried``: requests sent again on the new connection;
    ``max_requests_in_flight``: most requests in flight at once on one connection;
    ``block_status_cached``: block-status answers taken from an earlier reply's extents."""

    requests: int = 0
    reconnects: int = 0
    retried: int = 0
    max_requests_in_flight: int = 0
    #: Block-status answers taken from the extents of an earlier reply (no request sent).
    block_status_cached: int = 0


class NbdNode(BlockNode):
    """An NBD export. ``url`` is kept as given for messages (NBD URIs carry no secrets)."""

    driver = "nbd"
    kind = NodeKind.PROTOCOL
    counters_class = NbdCounters
    counters: NbdCounters

    def __init__(self, url: str, *, read_only: bool = True) -> None:
        super().__init__(read_only=read_only, label=url)
        self.url = url
        self.address: NbdAddress = parse_uri(url)
        self.info_: wire.ExportInfo | None = None
        self._conn: NbdConnection | None = None
        self._reconnect_lock = trio.Lock()
        #: Serialises writes on a server with a minimum block size > 1 (see _pwrite).
        self._write_lock = trio.Lock()
        # The extents of the last block-status reply, ``(start, end, state)`` in order, valid
        # while ``_changes`` is what it was (see _block_status).
        self._extents: list[tuple[int, int, int]] = []
        self._extent_starts: list[int] = []
        self._extents_changes = -1
        #: Bumped when a write, zero or discard starts and when it ends; ``_writing`` counts
        #: those in flight.
        self._changes = 0
        self._writing = 0

    # -- life cycle ------------------------------------------------------------------------------

    async def open(self) -> None:
        conn = await NbdConnection.connect(self.address, self.url)
        info = conn.info
        if not self.read_only and info.flags & wire.FLAG_READ_ONLY:
            await conn.aclose()
            raise ReadOnlyError("the NBD server exports it read-only", path=self.url)
        self._conn = conn
        self.info_ = info
        self.size = info.size

    async def _close(self) -> None:
        if self._conn is not None:
            await self._conn.aclose()

    def info(self) -> dict[str, Any]:
        info = self.info_
        if info is None:
            return {"filename": self.url}
        return {
            "filename": self.url,
            "export": self.address.export,
            "min_block": info.min_block,
            "preferred_block": info.preferred_block,
            "max_payload": info.max_payload,
            "flush": bool(info.flags & wire.FLAG_SEND_FLUSH),
            "trim": bool(info.flags & wire.FLAG_SEND_TRIM),
            "write_zeroes": bool(info.flags & wire.FLAG_SEND_WRITE_ZEROES),
            "block_status": self._conn is not None and self._conn.context_id is not None,
        }

    async def allocated_size(self) -> int:
        """Unknown over NBD (QEMU reports it unavailable): 0."""
        return 0

    # -- requests, with one reconnect ------------------------------------------------------------

    def _flag(self, flag: int) -> bool:
        assert self.info_ is not None
        return bool(self.info_.flags & flag)

    async def _call(self, command: int, offset: int = 0, length: int = 0, *, flags: int = 0,
                    data: Buffer | None = None) -> NbdRequest:
        conn = self._conn
        assert conn is not None, "NbdNode used before open()"
        self.counters.requests += 1
        try:
            return await conn.request(command, offset, length, flags=flags, data=data)
        except ConnectionLost:
            if self._closed:
                raise
        finally:
            self.counters.max_requests_in_flight = max(self.counters.max_requests_in_flight,
                                                      conn.max_in_flight)
        conn = await self._reconnect(conn)
        self.counters.retried += 1
        return await conn.request(command, offset, length, flags=flags, data=data)

    async def _reconnect(self, broken: NbdConnection) -> NbdConnection:
        """A new connection in place of ``broken`` -- made once however many requests failed
        with it (they all wait here and retry on the one new connection)."""
        async with self._reconnect_lock:
            if self._conn is not broken and self._conn is not None and not self._conn.broken:
                return self._conn
            try:
                conn = await NbdConnection.connect(self.address, self.url)
            except HostIOError as exc:
                # EIO, whatever the connect said (ECONNREFUSED...): to the reader of a disk
                # this is an I/O error; the message keeps the cause.
                raise HostIOError(f"connection lost, and reconnecting failed: {exc.message}",
                                  path=self.url, errno=errno.EIO) from exc
            if conn.info.size != self.size:
                await conn.aclose()
                raise HostIOError(f"after reconnecting the export's size is {conn.info.size}, "
                                  f"not {self.size}", path=self.url, errno=errno.EIO)
            old, self._conn = self._conn, conn
            self.info_ = conn.info
            self.counters.reconnects += 1
            if old is not None:
                await old.aclose()
            return conn

    # -- the verbs -------------------------------------------------------------------------------

    def _max_payload(self) -> int:
        assert self.info_ is not None
        align = self.info_.min_block
        cap = min(self.info_.max_payload, wire.DEFAULT_MAX_PAYLOAD)
        return max(align, cap // align * align)

    def _aligned(self, offset: int, length: int) -> tuple[int, int]:
        """The smallest range of whole minimum blocks around ``offset, length``."""
        assert self.info_ is not None
        align = self.info_.min_block
        start = offset // align * align
        end = min(self.size, -(-(offset + length) // align) * align)
        return start, end - start

    async def _pread(self, offset: int, length: int) -> Buffer:
        start, span = self._aligned(offset, length)
        if (start, span) != (offset, length):
            data = await self._read_aligned(start, span)
            return memoryview(data)[offset - start : offset - start + length]
        return await self._read_aligned(offset, length)

    async def _read_aligned(self, offset: int, length: int) -> bytearray:
        step = self._max_payload()
        if length <= step:
            return await self._read_one(offset, length)
        out = bytearray(length)
        for at in range(0, length, step):
            n = min(step, length - at)
            out[at : at + n] = await self._read_one(offset + at, n)
        return out

    async def _read_one(self, offset: int, length: int) -> bytearray:
        req = await self._call(wire.CMD_READ, offset, length)
        # A read that succeeded has the buffer its reply filled (request() gives it one).
        assert req.buffer is not None
        return req.buffer

    @contextlib.contextmanager
    def _changing(self) -> Iterator[None]:
        """Around every request that changes the export: cached extents stop counting."""
        self._changes += 1
        self._writing += 1
        try:
            yield
        finally:
            self._writing -= 1
            self._changes += 1

    async def _pwrite(self, offset: int, data: Buffer) -> None:
        with self._changing():
            await self._pwrite_now(offset, data)

    async def _pwrite_now(self, offset: int, data: Buffer) -> None:
        assert self.info_ is not None
        if self.info_.min_block == 1:
            await self._write_aligned(offset, memoryview(data))
            return
        # A server with a minimum block size > 1: read-modify-write of the edge blocks. Writes
        # take turns, so that two writes into one block never both read it before either
        # wrote it (the second would put the first's bytes back as they were).
        async with self._write_lock:
            view = memoryview(data)
            start, span = self._aligned(offset, len(view))
            if (start, span) != (offset, len(view)):
                merged = await self._read_aligned(start, span)
                merged[offset - start : offset - start + len(view)] = view
                offset, view = start, memoryview(merged)
            await self._write_aligned(offset, view)

    async def _write_aligned(self, offset: int, view: memoryview) -> None:
        step = self._max_payload()
        for at in range(0, len(view), step):
            piece = view[at : at + step]
            await self._call(wire.CMD_WRITE, offset + at, len(piece), data=piece)

    async def _flush(self) -> None:
        if self._flag(wire.FLAG_SEND_FLUSH):
            await self._call(wire.CMD_FLUSH)

    def _inner_blocks(self, offset: int, length: int) -> tuple[int, int]:
        """The whole minimum blocks inside the range: ``(start, end)``, start >= end if none."""
        assert self.info_ is not None
        align = self.info_.min_block
        end = offset + length
        inner_end = end if end == self.size else end // align * align
        return -(-offset // align) * align, inner_end

    async def _discard(self, offset: int, length: int) -> None:
        with self._changing():
            await self._discard_now(offset, length)

    async def _discard_now(self, offset: int, length: int) -> None:
        if not self._flag(wire.FLAG_SEND_TRIM):
            return  # advisory: a server without trim keeps the data
        start, end = self._inner_blocks(offset, length)
        for at in range(start, end, _MAX_EFFECT):
            await self._call(wire.CMD_TRIM, at, min(_MAX_EFFECT, end - at))

    async def _zero(self, offset: int, length: int, may_unmap: bool) -> None:
        with self._changing():
            await self._zero_now(offset, length, may_unmap)

    async def _zero_now(self, offset: int, length: int, may_unmap: bool) -> None:
        if not self._flag(wire.FLAG_SEND_WRITE_ZEROES):
            await super()._zero(offset, length, may_unmap)
            return
        start, end = self._inner_blocks(offset, length)
        if start >= end:
            await super()._zero(offset, length, may_unmap)
            return
        if offset < start:
            await super()._zero(offset, start - offset, may_unmap)
        flags = 0 if may_unmap else wire.CMD_FLAG_NO_HOLE
        for at in range(start, end, _MAX_EFFECT):
            await self._call(wire.CMD_WRITE_ZEROES, at, min(_MAX_EFFECT, end - at),
                             flags=flags)
        if end < offset + length:
            await super()._zero(end, offset + length - end, may_unmap)

    async def _block_status(self, offset: int, length: int) -> tuple[BlockStatus, int]:
        conn = self._conn
        if conn is None or conn.context_id is None:
            return await super()._block_status(offset, length)
        assert self.info_ is not None
        cached = self._cached_extent(offset)
        if cached is not None:
            self.counters.block_status_cached += 1
            end, state = cached
            return _status(state), min(length, end - offset)
        start, span = self._aligned(offset, min(length, _MAX_EFFECT))
        changes, quiet = self._changes, self._writing == 0
        req = await self._call(wire.CMD_BLOCK_STATUS, start, span)
        extents = req.extents
        # request() refuses a block status reply without base:allocation extents.
        assert extents is not None
        if quiet and self._writing == 0 and self._changes == changes:
            # No write ran during the request: the server's extents (all of them, not only
            # the first) describe the export until the next write. A walk over a sparse
            # export (SEEK_DATA, a copy) then costs a request per reply, not per extent.
            self._remember(start, extents)
        extent_length, state = extents[0]
        run = min(length, start + extent_length - offset)
        if run <= 0:  # an extent that ends inside the block before offset: one block, as data
            run = min(length, start + span - offset)
            state = 0
        return _status(state), run

    def _remember(self, start: int, extents: list[tuple[int, int]]) -> None:
        spans = []
        for extent_length, state in extents:
            end = min(self.size, start + extent_length)
            if end <= start:
                break
            spans.append((start, end, state))
            start = end
        self._extents = spans
        self._extent_starts = [s for s, _, _ in spans]
        self._extents_changes = self._changes

    def _cached_extent(self, offset: int) -> tuple[int, int] | None:
        """``(end, state)`` of the remembered extent holding ``offset``, if still valid."""
        if self._extents_changes != self._changes or self._writing:
            return None
        i = bisect.bisect_right(self._extent_starts, offset) - 1
        if i < 0:
            return None
        _, end, state = self._extents[i]
        return (end, state) if offset < end else None


def _status(state: int) -> BlockStatus:
    """A ``base:allocation`` state as a BlockStatus. ZERO means reads give zeros. HOLE alone
    (contents undefined) is still read from the server, so it is DATA here: a protocol node has
    nothing below it that a "not DATA" range could come from."""
    if state & wire.STATE_ZERO:
        status = BlockStatus.ZERO | BlockStatus.ALLOCATED
        if not state & wire.STATE_HOLE:
            status |= BlockStatus.DATA
        return status
    return BlockStatus.DATA | BlockStatus.ALLOCATED


@register_protocol("nbd", "nbd+unix", "nbds", "nbds+unix", read_cache=False)
async def open_nbd(url: str, options: OpenOptions) -> BlockNode:
    """Open the export that ``url`` names (``nbds`` schemes: over TLS)."""
    node = NbdNode(url, read_only=options.read_only)
    await node.open()
    return node
