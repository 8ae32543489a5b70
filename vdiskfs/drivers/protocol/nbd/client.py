"""One NBD connection: the handshake, then many requests in flight at once.

The handshake is the fixed newstyle one with ``NBD_OPT_STRUCTURED_REPLY``,
``NBD_OPT_SET_META_CONTEXT base:allocation`` and ``NBD_OPT_GO`` asking for
``NBD_INFO_BLOCK_SIZE`` (falling back to ``NBD_OPT_EXPORT_NAME`` when the server has no
``NBD_OPT_GO``), as QEMU's ``nbd/client.c: nbd_receive_negotiate`` does. An ``nbds`` URI
first sends ``NBD_OPT_STARTTLS`` and runs everything after it over ``trio.SSLStream``.

In transmission, requests carry a cookie and replies come back in any order ("Transmission"),
so one reader task reads every reply and hands each to the request with its cookie, as QEMU's
``nbd_receive_replies`` does; senders take turns on the socket under a lock. The reader is a
trio *system task*: a node outlives the task that opened it, so no user nursery can own it;
it never raises, and :meth:`NbdConnection.aclose` cancels it.

Why shielded sends: a request half written when its caller is cancelled would leave the
server reading our next header from the middle of a payload. A send therefore always finishes
(bounded by the timeout; past it the connection is dropped). A cancelled *waiter* simply stops
waiting: its reply is read and dropped when it comes.

A dropped connection fails every request in flight with :class:`ConnectionLost`; the node
(not this class) reconnects and retries them.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import os
import ssl
import struct
from dataclasses import dataclass, field
from typing import Any

import trio

from vdiskfs.drivers.protocol._streams import StreamIO, acquire
from vdiskfs.drivers.protocol.nbd import wire
from vdiskfs.drivers.protocol.nbd.uri import NbdAddress
from vdiskfs.drivers.protocol.nbd.wire import ExportInfo, NbdProtocolError
from vdiskfs.errors import HostIOError, NoSpaceError, VdiskError

__all__ = ["ConnectionLost", "NbdConnection", "NbdRequest", "NbdRequestError"]

#: Requests one connection keeps in flight; more wait for a slot. QEMU's nbd client: 16.
MAX_IN_FLIGHT = 32
#: Largest structured chunk accepted: 32 MiB of data plus headers, or a block status reply of
#: 2^20 extents ("SHOULD NOT send more").
MAX_CHUNK = (1 << 25) + (1 << 16)


class ConnectionLost(HostIOError):
    """The connection broke (the server died, closed, or stopped answering)."""

    errno = errno.EIO


class NbdRequestError(HostIOError):
    """The server answered a request with an error."""


@dataclass(eq=False, slots=True)
class NbdRequest:
    """One request of a connection, and its reply as the reader fills it in."""

    command: int
    offset: int
    length: int
    done: trio.Event = field(default_factory=trio.Event)
    #: Read: the data, filled by OFFSET_DATA chunks (OFFSET_HOLE leaves zeros).
    buffer: bytearray | None = None
    covered: int = 0
    #: Block status: the extents of the base:allocation context.
    extents: list[tuple[int, int]] | None = None
    #: The first error: (NBD error, message, offset).
    error: tuple[int, str, int | None] | None = None
    failure: VdiskError | None = None
    #: When the watchdog gives up on the reply (trio clock).
    deadline: float = 0.0


class _Reader:
    """Exactly-n reads over a trio stream, with a buffer (replies arrive in pieces)."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.io = StreamIO(stream)
        self.buffer = bytearray()
        self._chunk = bytearray(1 << 16)

    async def read(self, n: int) -> bytes:
        while len(self.buffer) < n:
            view = memoryview(self._chunk)
            got = await self.io.receive_into(view)
            if not got:
                raise trio.BrokenResourceError("the server closed the connection")
            self.buffer += view[:got]
        data = bytes(self.buffer[:n])
        del self.buffer[:n]
        return data

    async def read_into(self, view: memoryview) -> None:
        """Fill ``view`` exactly: what is buffered, then straight from the socket (read data
        is most of the traffic: see :mod:`vdiskfs.drivers.protocol._streams`)."""
        n = min(len(self.buffer), len(view))
        view[:n] = self.buffer[:n]
        del self.buffer[:n]
        await self.io.receive_exactly_into(view[n:])


class NbdConnection:
    """A connected, negotiated NBD client. Use :meth:`connect`, then :meth:`request`."""

    def __init__(self, stream: trio.abc.Stream, reader: _Reader, label: str, info: ExportInfo,
                 structured: bool, context_id: int | None, timeout: float) -> None:
        self.label = label
        self.info = info
        self.structured = structured
        #: The id of base:allocation, or None when the server has no block status.
        self.context_id = context_id
        self.timeout = timeout
        self._stream = stream
        self._reader = reader
        self._send_lock = trio.Lock()
        self._slots = trio.Semaphore(MAX_IN_FLIGHT)
        self._cookies = itertools.count(1)
        self._pending: dict[int, NbdRequest] = {}
        self._broken: VdiskError | None = None
        self._closed = False
        self._io = reader.io
        self._reader_scope = trio.CancelScope()
        self._watchdog_scope = trio.CancelScope()
        #: Counters the node shows: requests sent, most in flight at once.
        self.requests = 0
        self.max_in_flight = 0

    # -- connecting ------------------------------------------------------------------------------

    @classmethod
    async def connect(cls, address: NbdAddress, label: str) -> NbdConnection:
        """Connect and negotiate; raises :class:`HostIOError` naming ``label`` on failure.

        The whole connect and handshake is bounded by the address's timeout."""
        stream: trio.abc.Stream | None = None
        try:
            with trio.fail_after(address.timeout):
                if address.socket is not None:
                    stream = await trio.open_unix_socket(address.socket)
                else:
                    assert address.host is not None
                    stream = await trio.open_tcp_stream(address.host, address.port)
                reader = _Reader(stream)
                stream, reader, info, structured, context_id = await _negotiate(
                    stream, reader, address, label)
        except BaseException as exc:
            if stream is not None:
                await trio.aclose_forcefully(stream)
            if isinstance(exc, trio.TooSlowError):
                raise ConnectionLost(f"no answer within {address.timeout:g} s while connecting",
                                     path=label, errno=errno.ETIMEDOUT) from None
            if isinstance(exc, OSError):
                raise HostIOError.wrap(_connect_cause(exc), label, "cannot connect") from exc
            if isinstance(exc, trio.BrokenResourceError | trio.ClosedResourceError):
                raise ConnectionLost(f"connection lost during the handshake: {exc}",
                                     path=label) from exc
            if isinstance(exc, VdiskError) and exc.path is None:
                exc.path = label
            raise
        conn = cls(stream, reader, label, info, structured, context_id, address.timeout)
        trio.lowlevel.spawn_system_task(conn._read_replies, name=f"nbd reader {label}")
        trio.lowlevel.spawn_system_task(conn._watch_deadlines, name=f"nbd watchdog {label}")
        return conn

    # -- requests --------------------------------------------------------------------------------

    async def request(self, command: int, offset: int = 0, length: int = 0, *, flags: int = 0,
                      data: bytes | bytearray | memoryview | None = None) -> NbdRequest:
        """Send one request and wait for its whole reply; raises on an error reply
        (:class:`NbdRequestError`) or a lost connection (:class:`ConnectionLost`).

        A request that finds a free slot and an idle socket is sent without yielding (module
        docstring), and then waits once, for its reply; its timeout is kept by the
        connection's watchdog, not by a cancel scope of its own."""
        if self._broken is not None:
            raise _fresh(self._broken)
        slots = self._slots
        await acquire(slots)
        try:
            req = NbdRequest(command, offset, length)
            if command == wire.CMD_READ:
                req.buffer = bytearray(length)
            try:
                await self._send(req, flags, data)
                await req.done.wait()
            finally:
                if not req.done.is_set():
                    # Cancelled while waiting: the reader drops the reply when it comes.
                    req.buffer = None
        finally:
            slots.release()
        if req.failure is not None:
            raise _fresh(req.failure)
        if req.error is not None:
            error, message, at = req.error
            what = wire.CMD_NAMES[command]
            reason = message or os.strerror(wire.errno_of(error))
            text = f"{what} of {length} bytes failed: {reason}"
            err = wire.errno_of(error)
            # ENOSPC is NoSpaceError everywhere in the stack (as HostIOError.wrap makes it).
            cls = NoSpaceError if err == errno.ENOSPC else NbdRequestError
            raise cls(text, path=self.label, offset=offset if at is None else at, errno=err)
        return req

    async def _send(self, req: NbdRequest, flags: int,
                    data: bytes | bytearray | memoryview | None) -> None:
        """Register ``req`` under a new cookie and send it. Waiting for the socket can be
        cancelled (nothing is sent yet); the rest of a send that the kernel did not take at
        once is shielded, because a half-sent request would desynchronise the stream (module
        docstring)."""
        lock = self._send_lock
        await acquire(lock)
        try:
            if self._broken is not None:
                raise _fresh(self._broken)
            cookie = next(self._cookies)
            # Registered before the first byte goes out: the reply may come at once.
            self._pending[cookie] = req
            req.deadline = trio.current_time() + self.timeout
            self.requests += 1
            self.max_in_flight = max(self.max_in_flight, len(self._pending))
            header = wire.pack_request(req.command, cookie, req.offset, req.length, flags)
            parts: list[bytes | bytearray | memoryview] = [header]
            if data is not None:
                parts.append(data)
            try:
                sent = self._io.try_send(parts)
                if sent < len(header) + (len(data) if data is not None else 0):
                    with trio.CancelScope(shield=True), trio.fail_after(self.timeout):
                        await self._io.send_rest(parts, sent)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError,
                    trio.TooSlowError) as exc:
                self._fail(ConnectionLost(f"sending failed: {exc or type(exc).__name__}",
                                          path=self.label))
                assert self._broken is not None
                raise _fresh(self._broken) from exc
        finally:
            lock.release()

    def _fail(self, error: VdiskError) -> None:
        """Drop the connection: every request in flight, and every later one, gets ``error``."""
        if self._broken is None:
            self._broken = error
        for req in self._pending.values():
            if req.failure is None:
                req.failure = error
            req.done.set()
        self._pending.clear()
        self._reader_scope.cancel()
        self._watchdog_scope.cancel()

    @property
    def broken(self) -> bool:
        return self._broken is not None

    # -- the system tasks ------------------------------------------------------------------------

    async def _watch_deadlines(self) -> None:
        """Drop the connection when its oldest request has had no answer within the timeout.

        One task sleeping until the oldest deadline costs one wake-up per timeout period
        instead of a cancel scope per request; ``_pending`` keeps the order requests were
        sent in, so its first entry is the oldest."""
        with self._watchdog_scope:
            while self._broken is None:
                oldest = next(iter(self._pending.values()), None)
                if oldest is None:
                    await trio.sleep(self.timeout)
                elif oldest.deadline > trio.current_time():
                    await trio.sleep_until(oldest.deadline)
                else:
                    self._fail(ConnectionLost(
                        f"{wire.CMD_NAMES[oldest.command]}: no answer within "
                        f"{self.timeout:g} s", path=self.label, offset=oldest.offset))


    async def _read_replies(self) -> None:
        with self._reader_scope:
            try:
                while True:
                    await self._read_one()
            except NbdProtocolError as exc:
                exc.path = self.label
                self._fail(exc)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                self._fail(ConnectionLost(f"connection lost: {exc or type(exc).__name__}",
                                          path=self.label))
            except Exception as exc:  # never let a system task crash the run
                self._fail(NbdProtocolError(f"reply reader failed: {exc!r}", path=self.label))
        if self._broken is None:
            self._fail(ConnectionLost("connection closed", path=self.label))
        with trio.CancelScope(shield=True):
            await trio.aclose_forcefully(self._stream)

    async def _read_one(self) -> None:
        read = self._reader.read
        (magic,) = wire.REPLY_MAGIC.unpack(await read(4))
        if magic == wire.SIMPLE_REPLY_MAGIC:
            error, cookie = wire.SIMPLE_REPLY_REST.unpack(await read(12))
            req = self._pending.get(cookie)
            if req is None:
                raise NbdProtocolError(f"simple reply to unknown cookie {cookie}")
            if req.command == wire.CMD_READ:
                if self.structured:
                    raise NbdProtocolError("simple reply to a read after structured replies "
                                           "were negotiated")
                if not error:
                    await self._receive_data(req, 0, req.length)
            if error:
                req.error = (error, "", None)
            self._finish(cookie, req)
            return
        if magic != wire.STRUCTURED_REPLY_MAGIC or not self.structured:
            raise NbdProtocolError(f"bad reply magic {magic:#x}")
        flags, kind, cookie, length = wire.STRUCTURED_REPLY_REST.unpack(await read(16))
        if length > MAX_CHUNK:
            raise NbdProtocolError(f"structured reply chunk of {length} bytes")
        req = self._pending.get(cookie)
        if req is None:
            raise NbdProtocolError(f"structured reply to unknown cookie {cookie}")
        if kind == wire.REPLY_TYPE_OFFSET_DATA and req.command == wire.CMD_READ and length > 8:
            (offset,) = struct.unpack(">Q", await read(8))
            start, size = offset - req.offset, length - 8
            if start < 0 or start + size > req.length:
                raise NbdProtocolError(f"read chunk {offset}+{size} outside the request "
                                       f"{req.offset}+{req.length}")
            await self._receive_data(req, start, size)
        else:
            self._chunk(req, kind, await read(length) if length else b"")
        if flags & wire.REPLY_FLAG_DONE:
            if (req.command == wire.CMD_READ and req.error is None
                    and req.covered != req.length):
                raise NbdProtocolError(f"read reply covers {req.covered} of {req.length} bytes")
            if (req.command == wire.CMD_BLOCK_STATUS and req.error is None
                    and not req.extents):
                raise NbdProtocolError("block status reply without base:allocation extents")
            self._finish(cookie, req)

    def _chunk(self, req: NbdRequest, kind: int, payload: bytes) -> None:
        if kind & wire.REPLY_TYPE_FLAG_ERROR:
            if req.error is None:
                req.error = wire.parse_error_chunk(kind, payload)
            return
        if kind == wire.REPLY_TYPE_NONE:
            if payload:
                raise NbdProtocolError("NBD_REPLY_TYPE_NONE with a payload")
            return
        if kind in (wire.REPLY_TYPE_OFFSET_DATA, wire.REPLY_TYPE_OFFSET_HOLE):
            if req.command != wire.CMD_READ:
                raise NbdProtocolError("read data in the reply to a "
                                       f"{wire.CMD_NAMES.get(req.command, '?')}")
            if kind == wire.REPLY_TYPE_OFFSET_DATA:
                offset, data = wire.parse_offset_data(payload)
                size = len(data)
            else:
                offset, size = wire.parse_offset_hole(payload)
                data = None
            start = offset - req.offset
            if start < 0 or start + size > req.length:
                raise NbdProtocolError(f"read chunk {offset}+{size} outside the request "
                                       f"{req.offset}+{req.length}")
            if data is not None and req.buffer is not None:
                req.buffer[start : start + size] = data
            # Chunks must not overlap, so their sizes add up to the request when it is whole.
            req.covered += size
            return
        if kind == wire.REPLY_TYPE_BLOCK_STATUS:
            if req.command != wire.CMD_BLOCK_STATUS:
                raise NbdProtocolError("block status in the reply to a "
                                       f"{wire.CMD_NAMES.get(req.command, '?')}")
            context_id, extents = wire.parse_block_status(payload)
            if context_id == self.context_id:
                req.extents = extents
            return
        raise NbdProtocolError(f"unknown structured reply type {kind}")

    async def _receive_data(self, req: NbdRequest, start: int, size: int) -> None:
        """Read ``size`` bytes of read data into the request's buffer at ``start``."""
        buffer = req.buffer
        if buffer is None:  # its caller was cancelled: read and drop
            await self._reader.read_into(memoryview(bytearray(size)))
        else:
            await self._reader.read_into(memoryview(buffer)[start : start + size])
        # Chunks must not overlap, so their sizes add up to the request when it is whole.
        req.covered += size

    def _finish(self, cookie: int, req: NbdRequest) -> None:
        del self._pending[cookie]
        req.done.set()

    # -- closing ---------------------------------------------------------------------------------

    async def aclose(self) -> None:
        """Soft disconnect (``NBD_CMD_DISC``) when the connection is healthy, then close."""
        if self._closed:
            return
        self._closed = True
        with trio.CancelScope(shield=True):
            if self._broken is None:
                with trio.move_on_after(min(self.timeout, 5.0)):
                    async with self._send_lock:
                        with contextlib.suppress(trio.BrokenResourceError,
                                                 trio.ClosedResourceError, OSError):
                            await self._stream.send_all(wire.pack_request(wire.CMD_DISC, 0))
            self._fail(ConnectionLost("connection closed", path=self.label))
            await trio.aclose_forcefully(self._stream)


def _fresh(error: VdiskError) -> VdiskError:
    """A new exception like ``error``: one error object shared by every failed request would
    collect all their tracebacks."""
    return type(error)(error.message, path=error.path, offset=error.offset, errno=error.errno)


def _connect_cause(exc: OSError) -> OSError:
    """The error that says why: ``trio.open_tcp_stream`` raises an OSError without errno
    ("all attempts to connect failed") caused by a group of each attempt's error."""
    if exc.errno is not None:
        return exc
    cause = exc.__cause__
    for inner in getattr(cause, "exceptions", (cause,)):
        if isinstance(inner, OSError) and inner.errno is not None:
            return inner
    return exc


# -- the handshake ---------------------------------------------------------------------------------


async def _option(stream: trio.abc.Stream, reader: _Reader, option: int,
                  message: bytes) -> list[tuple[int, bytes]]:
    """Send one option; the replies up to and including the final one (ACK or an error)."""
    await stream.send_all(message)
    replies = []
    while True:
        reply, length = wire.parse_option_reply_header(
            await reader.read(wire.OPTION_REPLY_HEADER.size), option)
        payload = await reader.read(length) if length else b""
        replies.append((reply, payload))
        if reply == wire.REP_ACK or reply & wire.REP_FLAG_ERROR:
            return replies


def _tls_context(address: NbdAddress) -> ssl.SSLContext:
    """The client's TLS context: the system's authorities, or ``tls-certificates``'s
    ``ca-cert.pem`` (and its client certificate, when there is one)."""
    cafile = None
    if address.tls_certificates is not None:
        cafile = os.path.join(address.tls_certificates, "ca-cert.pem")
    context = ssl.create_default_context(cafile=cafile)
    if address.tls_certificates is not None:
        cert = os.path.join(address.tls_certificates, "client-cert.pem")
        key = os.path.join(address.tls_certificates, "client-key.pem")
        if os.path.exists(cert) and os.path.exists(key):
            context.load_cert_chain(cert, key)
    if not address.tls_verify_peer:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    elif address.tls_hostname is None and address.host is None:
        # A Unix socket has no name to check; the chain is still verified.
        context.check_hostname = False
    return context


async def _start_tls(stream: trio.abc.Stream, reader: _Reader, address: NbdAddress,
                     label: str) -> tuple[trio.abc.Stream, _Reader]:
    """``NBD_OPT_STARTTLS``, then the TLS handshake; the rest of the negotiation runs over
    TLS ("TLS support": nothing negotiated before it survives)."""
    replies = await _option(stream, reader, wire.OPT_STARTTLS, wire.pack_option(wire.OPT_STARTTLS))
    final, payload = replies[-1]
    if final != wire.REP_ACK:
        raise HostIOError(f"TLS was required but the server refused it: "
                          f"{wire.option_error_text(final, payload)}", path=label,
                          errno=errno.EPROTO)
    if reader.buffer:
        raise NbdProtocolError("data after the server's NBD_OPT_STARTTLS acknowledgement")
    try:
        context = await trio.to_thread.run_sync(_tls_context, address)
    except (OSError, ssl.SSLError) as exc:
        raise HostIOError(f"TLS certificates: {exc}", path=label,
                          errno=getattr(exc, "errno", None) or errno.EIO) from exc
    tls = trio.SSLStream(stream, context,
                         server_hostname=address.tls_hostname or address.host)
    try:
        await tls.do_handshake()
    except trio.BrokenResourceError as exc:
        cause = exc.__cause__
        if isinstance(cause, ssl.SSLCertVerificationError):
            raise HostIOError(f"TLS: the server's certificate: {cause.verify_message}",
                              path=label, errno=errno.EACCES) from exc
        raise HostIOError(f"TLS handshake failed: {cause or exc}", path=label,
                          errno=errno.EPROTO) from exc
    return tls, _Reader(tls)


async def _negotiate(stream: trio.abc.Stream, reader: _Reader, address: NbdAddress, label: str,
                     ) -> tuple[trio.abc.Stream, _Reader, ExportInfo, bool, int | None]:
    flags = wire.parse_greeting(await reader.read(wire.GREETING.size))
    await stream.send_all(wire.pack_client_flags(flags))
    no_zeroes = bool(flags & wire.FLAG_NO_ZEROES)
    if address.tls:
        stream, reader = await _start_tls(stream, reader, address, label)

    replies = await _option(stream, reader, wire.OPT_STRUCTURED_REPLY,
                            wire.pack_option(wire.OPT_STRUCTURED_REPLY))
    structured = replies[-1][0] == wire.REP_ACK

    context_id: int | None = None
    if structured:
        replies = await _option(stream, reader, wire.OPT_SET_META_CONTEXT,
                                wire.pack_set_meta_context(address.export,
                                                           (wire.META_BASE_ALLOCATION,)))
        if replies[-1][0] == wire.REP_ACK:
            for reply, payload in replies:
                if reply == wire.REP_META_CONTEXT:
                    cid, name = wire.parse_meta_context(payload)
                    if name == wire.META_BASE_ALLOCATION:
                        context_id = cid

    replies = await _option(stream, reader, wire.OPT_GO, wire.pack_go(address.export))
    final, payload = replies[-1]
    if final == wire.REP_ERR_UNSUP:
        # An old server: NBD_OPT_EXPORT_NAME, which ends the handshake without a reply header.
        await stream.send_all(wire.pack_export_name(address.export))
        old_size, old_flags = wire.parse_export_name_reply(await reader.read(10))
        if not no_zeroes:
            await reader.read(124)
        return stream, reader, ExportInfo(old_size, old_flags), structured, context_id
    if final & wire.REP_FLAG_ERROR:
        text = wire.option_error_text(final, payload)
        export = f"export {address.export!r}"
        if final == wire.REP_ERR_UNKNOWN:
            raise HostIOError(f"{export}: {text}", path=label, errno=errno.ENOENT)
        if final == wire.REP_ERR_TLS_REQD:
            raise HostIOError(f"{export}: {text}: use an nbds:// (or nbds+unix://) URI",
                              path=label, errno=errno.EACCES)
        raise HostIOError(f"{export}: the server refused it: {text}", path=label,
                          errno=errno.EACCES if final == wire.REP_ERR_POLICY else errno.EIO)
    size: int | None = None
    tflags = 0
    block: dict[str, Any] = {}
    for reply, body in replies[:-1]:
        if reply != wire.REP_INFO:
            raise NbdProtocolError(f"unexpected reply {reply} to NBD_OPT_GO")
        kind, rest = wire.parse_info(body)
        if kind == wire.INFO_EXPORT:
            size, tflags = wire.parse_info_export(rest)
        elif kind == wire.INFO_BLOCK_SIZE:
            minimum, preferred, maximum = wire.parse_info_block_size(rest)
            block = {"min_block": minimum, "preferred_block": preferred,
                     "max_payload": maximum}
    if size is None:
        raise NbdProtocolError("NBD_OPT_GO succeeded without NBD_INFO_EXPORT")
    return stream, reader, ExportInfo(size, tflags, **block), structured, context_id

