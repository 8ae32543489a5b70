"""A bounded keep-alive pool of HTTP/1.1 connections to one origin, on trio streams and h11.

One :class:`ConnectionPool` serves one ``scheme://host:port``. A request takes an idle
connection (or opens one, up to ``max_connections``: the rest wait), sends one request, reads
the whole response, and puts the connection back when h11 says both sides may start a new
cycle; anything else (an error, a cancellation, ``Connection: close``, a response whose body
was not read) closes it, because its state is no longer known. So many requests are in flight
at once over several connections, as QEMU's curl driver keeps several ``CURL`` states, and a
random read at queue depth 16 is not 16 serial round trips.

Requests here are idempotent (HEAD and ranged GET), so a connection lost before a response
arrived is retried: at once when the connection was an idle one that the server had closed
(keep-alive timeouts make that common), after a backoff otherwise. A request that does not
complete within ``timeout`` seconds fails with ETIMEDOUT and is not retried: a server that
stopped answering should surface as an error, not as minutes of silent retries.
"""

from __future__ import annotations

import errno
import re
import ssl
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import h11
import trio

from vdiskfs.block.stats import Counters
from vdiskfs.drivers.protocol._streams import StreamIO, acquire
from vdiskfs.errors import VdiskError

__all__ = ["ConnectionPool", "HttpCounters", "HttpError", "Response", "Signer"]

#: Bytes read from the socket at a time for h11 (a response's head, and bodies other than a
#: ``206``'s): small, so that little of a ``206`` body goes through h11's buffer -- the rest is
#: read straight into the body's buffer (`_receive_body`). With 256 KiB, a 256 KiB range was
#: copied four times on its way through h11.
RECEIVE_SIZE = 16 * 1024


#: What the head of a request written past h11 may hold: a token for a header's name, visible
#: ASCII (and inner blanks) for a value and the target. A request with anything else goes
#: through h11, which refuses what it must.
_TOKEN = re.compile(r"[-!#$%&'*+.^_`|~0-9A-Za-z]+")
_VALUE = re.compile(r"([\x21-\x7e]([\x20\x09\x21-\x7e]*[\x21-\x7e])?)?")
_TARGET = re.compile(r"[\x21-\x7e]+")


def _format_request(method: str, target: str, headers: list[tuple[str, str]]) -> bytes | None:
    """The bytes of a bodiless HTTP/1.1 request as h11 would write them, or None when a part
    is not what h11 accepts (h11 then makes the error)."""
    if not _TARGET.fullmatch(target):
        return None
    lines = [f"{method} {target} HTTP/1.1"]
    for name, value in headers:
        if not _TOKEN.fullmatch(name) or not _VALUE.fullmatch(value):
            return None
        lines.append(f"{name}: {value}")
    lines.append("\r\n")
    return "\r\n".join(lines).encode("ascii")


def _parse_head(head: bytes) -> tuple[bytes, int, dict[str, str]] | None:
    """A response's head (status line and headers, without the blank line): its version,
    status and headers (names in lower case, a repeated one keeping its last value); None for
    anything unusual (a folded line, a malformed field), which h11 then reads."""
    status_line, *lines = head.split(b"\r\n")
    version, _, rest = status_line.partition(b" ")
    code = rest[:3]
    if version not in (b"HTTP/1.1", b"HTTP/1.0") or not code.isdigit() \
            or rest[3:4] not in (b"", b" "):
        return None
    headers: dict[str, str] = {}
    for line in lines:
        name, colon, value = line.partition(b":")
        if not colon or not name or name != name.strip() or line[:1] in (b" ", b"\t"):
            return None
        headers[name.decode("latin-1").lower()] = value.strip(b" \t").decode("latin-1")
    return version[5:], int(code), headers


def _body_past_h11(status: int, headers: dict[str, str]) -> int | None:
    """The length of a response body read past h11 (``_receive_body``): a ``206`` with a
    Content-Length and no Transfer-Encoding; None for any other response."""
    announced = headers.get("content-length")
    if status == 206 and announced is not None and announced.isdigit() \
            and "transfer-encoding" not in headers:
        return int(announced)
    return None


#: A hook that authenticates each request by its content (S3's Signature V4): given the method,
#: the target and every header (``Host`` included), the headers to send.
Signer = Callable[[str, str, list[tuple[str, str]]], list[tuple[str, str]]]


class HttpError(VdiskError):
    """A request to an HTTP server failed: it could not be made, it timed out, or the answer
    was not what the protocol node needs. The message names the (redacted) URL."""

    errno = errno.EIO


class _ConnectionLost(Exception):
    """The connection broke before a complete response arrived (retryable)."""

    def __init__(self, cause: BaseException, reused: bool) -> None:
        super().__init__(str(cause))
        self.cause = cause
        self.reused = reused


@dataclass(slots=True)
class HttpCounters(Counters):
    """Counters of an HTTP protocol node (its pool's, and the node's own)."""

    #: Requests sent (HEAD and GET, each retry counted again).
    requests: int = 0
    #: Requests sent again after a lost connection.
    retries: int = 0
    #: TCP (and TLS) connections opened.
    connections_opened: int = 0
    #: Body bytes received.
    bytes_fetched: int = 0
    #: Redirects followed at open.
    redirects: int = 0


@dataclass(frozen=True, slots=True)
class Response:
    status: int
    #: Header names in lower case; a repeated header keeps its last value.
    headers: dict[str, str]
    #: A bytearray when read: handed on as it is, never copied again.
    body: bytes | bytearray


class _Connection:
    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        #: The socket, read and written without scheduler passes where the kernel need not
        #: wait (see :mod:`vdiskfs.drivers.protocol._streams`).
        self.io = StreamIO(stream)
        self.h11 = h11.Connection(h11.CLIENT)
        #: Whether h11 is at the start of a cycle with nothing buffered: a request may then
        #: skip it (``ConnectionPool._exchange``).
        self.fresh = True
        #: What the socket gives h11 is read into (h11 copies it into its own buffer).
        self.buffer = bytearray(RECEIVE_SIZE)
        #: Whether it already served a request (an idle connection the server may have closed).
        self.used = False

    async def aclose(self) -> None:
        await trio.aclose_forcefully(self.stream)


class ConnectionPool:
    """Keep-alive connections to ``host:port`` (TLS when ``ssl_context`` is given).

    ``name`` (the redacted URL) is what errors name; the pool never sees credentials except in
    the headers its caller passes and those ``sign`` adds, which it neither logs nor puts in a
    message. ``sign`` runs at every attempt, so a request retried after a backoff carries a
    fresh date.
    """

    def __init__(
        self,
        host: str,
        port: int,
        *,
        ssl_context: ssl.SSLContext | None,
        name: str,
        counters: HttpCounters,
        max_connections: int = 8,
        timeout: float = 30.0,
        retries: int = 3,
        backoff: float = 0.1,
        sign: Signer | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.ssl_context = ssl_context
        self.name = name
        self.counters = counters
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self.sign = sign
        self._idle: list[_Connection] = []
        # Bounds the connections open at once, idle ones included: a request holds a token
        # from before it takes a connection until it gives it back.
        self._slots = trio.Semaphore(max_connections)
        self._closed = False

    async def aclose(self) -> None:
        self._closed = True
        idle, self._idle = self._idle, []
        for conn in idle:
            await conn.aclose()

    async def request(self, method: str, target: str, headers: Iterable[tuple[str, str]], *,
                      body_limit: int | None = None) -> Response:
        """Send one idempotent request and return the whole response.

        ``body_limit``: the most body bytes accepted; a response announcing or sending more
        closes the connection and returns what was announced with an empty body (the caller
        refuses it anyway: a server that ignored ``Range``).
        """
        host_header = self.host if ":" not in self.host else f"[{self.host}]"
        default_port = 443 if self.ssl_context is not None else 80
        if self.port != default_port:
            host_header += f":{self.port}"
        all_headers = [("Host", host_header), ("User-Agent", "vdiskfs"), *headers]
        attempt = 0
        while True:
            sent = all_headers if self.sign is None else self.sign(method, target, all_headers)
            try:
                return await self._once(method, target, sent, body_limit)
            except trio.TooSlowError:
                raise HttpError(f"{method} timed out after {self.timeout:g} s (no complete "
                                "answer from the server)", path=self.name,
                                errno=errno.ETIMEDOUT) from None
            except _ConnectionLost as lost:
                if attempt >= self.retries:
                    raise HttpError(f"{method} failed: connection lost ({lost.cause}); gave up "
                                    f"after {attempt + 1} attempts", path=self.name) from None
                attempt += 1
                self.counters.retries += 1
                if not lost.reused:
                    await trio.sleep(self.backoff * 2 ** (attempt - 1))

    async def _once(self, method: str, target: str, headers: list[tuple[str, str]],
                    body_limit: int | None) -> Response:
        # The timeout starts once a connection slot is ours: waiting behind other requests of
        # a deep queue is not the server being slow.
        await acquire(self._slots)
        try:
            with trio.fail_after(self.timeout):
                conn = self._idle.pop() if self._idle else await self._connect()
                reused = conn.used
                conn.used = True
                keep = False
                try:
                    response, keep = await self._exchange(conn, method, target, headers,
                                                          body_limit, reused)
                    return response
                finally:
                    # A cancelled or failed exchange leaves the connection in an unknown
                    # state: only a cleanly finished one goes back to the pool.
                    if keep and not self._closed:
                        self._idle.append(conn)
                    else:
                        await conn.aclose()
        finally:
            self._slots.release()

    async def _connect(self) -> _Connection:
        try:
            stream: trio.abc.Stream = await trio.open_tcp_stream(self.host, self.port)
        except OSError as exc:
            raise _ConnectionLost(exc, reused=False) from exc
        self.counters.connections_opened += 1
        if self.ssl_context is not None:
            tls = trio.SSLStream(stream, self.ssl_context, server_hostname=self.host,
                                 https_compatible=True)
            try:
                await tls.do_handshake()
            except BaseException as exc:
                await trio.aclose_forcefully(stream)
                if isinstance(exc, trio.BrokenResourceError) and isinstance(
                    exc.__cause__, ssl.SSLCertVerificationError
                ):
                    raise HttpError(
                        f"TLS certificate verification failed: {exc.__cause__.verify_message} "
                        "(give --ca-file for a server with a private CA, or --no-verify-tls "
                        "to skip the check)",
                        path=self.name,
                    ) from None
                if isinstance(exc, trio.BrokenResourceError) and isinstance(
                    exc.__cause__, ssl.SSLError
                ):
                    raise HttpError(f"TLS handshake failed: {exc.__cause__}",
                                    path=self.name) from None
                if isinstance(exc, trio.BrokenResourceError | OSError):
                    raise _ConnectionLost(exc, reused=False) from exc
                raise
            stream = tls
        return _Connection(stream)

    async def _exchange(self, conn: _Connection, method: str, target: str,
                        headers: list[tuple[str, str]], body_limit: int | None,
                        reused: bool) -> tuple[Response, bool]:
        """One request and its response on ``conn``; whether the connection may be kept.

        A ranged GET on a fresh connection skips h11 (it cost more CPU than the rest of a
        4 KiB read): the request is written here, and a ``206`` with a length is read here.
        Any other answer is handed to h11 as it came, after the request was shown to it, and
        read as before: h11 keeps the protocol's rules for everything unusual.
        """
        self.counters.requests += 1
        try:
            data = _format_request(method, target, headers) \
                if method == "GET" and conn.fresh else None
            if data is not None:
                await conn.io.send_all([data])
                fast = await self._fast_response(conn, method, target, headers, body_limit,
                                                 reused)
                if fast is not None:
                    return fast
            else:
                request = h11.Request(method=method, target=target, headers=headers)
                conn.fresh = False
                # One send (no body: EndOfMessage adds nothing but h11's state change).
                await conn.io.send_all([conn.h11.send(request) + conn.h11.send(h11.EndOfMessage())])
            head = await self._next_event(conn)
            while isinstance(head, h11.InformationalResponse):
                head = await self._next_event(conn)
            if not isinstance(head, h11.Response):
                raise _ConnectionLost(ConnectionError("connection closed before a response"),
                                      reused)
            response_headers = {name.decode("latin-1").lower(): value.decode("latin-1")
                                for name, value in head.headers}
            announced = response_headers.get("content-length")
            if body_limit is not None and announced is not None and announced.isdigit() \
                    and int(announced) > body_limit:
                # Not read: the connection is closed instead.
                return Response(head.status_code, response_headers, b""), False
            length = _body_past_h11(head.status_code, response_headers)
            if length is not None:
                leftover, _closed = conn.h11.trailing_data
                return await self._receive_body(conn, head.http_version, response_headers,
                                                length, leftover,
                                                h11_done=conn.h11.our_state is h11.DONE)
            body = bytearray()
            while True:
                event = await self._next_event(conn)
                if isinstance(event, h11.Data):
                    body += event.data
                    self.counters.bytes_fetched += len(event.data)
                    if body_limit is not None and len(body) > body_limit:
                        return Response(head.status_code, response_headers, b""), False
                elif isinstance(event, h11.EndOfMessage):
                    break
                else:
                    raise _ConnectionLost(ConnectionError("connection closed in the body"),
                                          reused=False)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError,
                h11.RemoteProtocolError) as exc:
            raise _ConnectionLost(exc, reused) from exc
        keep = conn.h11.our_state is h11.DONE and conn.h11.their_state is h11.DONE
        if keep:
            conn.h11.start_next_cycle()
            conn.fresh = not conn.h11.trailing_data[0]
        return Response(head.status_code, response_headers, body), keep

    async def _fast_response(self, conn: _Connection, method: str, target: str,
                             headers: list[tuple[str, str]], body_limit: int | None,
                             reused: bool) -> tuple[Response, bool] | None:
        """Read the head of the response to a request sent past h11; a ``206`` with a length
        is read whole and returned. Anything else: h11 is told the request, given the bytes
        read so far, and None returned (the caller reads the rest through h11)."""
        buffer = conn.buffer
        view = memoryview(buffer)
        filled = 0
        end = -1
        while filled < len(buffer):
            got = await conn.io.receive_into(view[filled:])
            if not got:
                raise _ConnectionLost(ConnectionError("connection closed before a response"),
                                      reused)
            end = buffer.find(b"\r\n\r\n", max(0, filled - 3), filled + got)
            filled += got
            if end >= 0:
                break
        parsed = _parse_head(bytes(buffer[:end])) if end >= 0 else None
        if parsed is not None:
            version, status, response_headers = parsed
            length = _body_past_h11(status, response_headers)
            if length is not None:
                if body_limit is not None and length > body_limit:
                    return Response(status, response_headers, b""), False
                return await self._receive_body(conn, version, response_headers, length,
                                                bytes(buffer[end + 4:filled]), h11_done=True)
        # The rest as before, through h11: it must see the request to read the response.
        conn.fresh = False
        conn.h11.send(h11.Request(method=method, target=target, headers=headers))
        conn.h11.send(h11.EndOfMessage())
        conn.h11.receive_data(bytes(buffer[:filled]))
        return None

    async def _receive_body(self, conn: _Connection, version: bytes,
                            headers: dict[str, str], length: int, leftover: bytes, *,
                            h11_done: bool) -> tuple[Response, bool]:
        """The body of a ``206`` of known length (the image's bytes: nearly all the traffic),
        read past h11 straight into the buffer returned; ``leftover``: what came after the
        head in the same read.

        Through h11 every piece is copied three times (into its buffer, out as an event, into
        ours), which cost more CPU than the rest of a 256 KiB read. h11 never sees this body,
        so a connection kept alive (HTTP/1.1, no ``Connection: close``) starts its next
        request with a fresh h11 state.
        """
        body = bytearray(length)
        view = memoryview(body)
        got = min(len(leftover), length)
        view[:got] = memoryview(leftover)[:got]
        try:
            await conn.io.receive_exactly_into(view[got:])
        except trio.BrokenResourceError as exc:
            raise _ConnectionLost(ConnectionError("connection closed in the body"),
                                  reused=False) from exc
        self.counters.bytes_fetched += length
        tokens = {t.strip() for t in headers.get("connection", "").lower().split(",")}
        # Bytes past the body were never asked for (no pipelining): the stream is not ours.
        keep = (h11_done and version >= b"1.1" and "close" not in tokens
                and len(leftover) <= length)
        if keep and not conn.fresh:
            conn.h11 = h11.Connection(h11.CLIENT)
            conn.fresh = True
        return Response(206, headers, body), keep

    async def _next_event(self, conn: _Connection) -> Any:
        while True:
            event = conn.h11.next_event()
            if event is h11.NEED_DATA:
                view = memoryview(conn.buffer)
                got = await conn.io.receive_into(view)
                # 0: the server closed its side (h11 takes b"" as the end).
                conn.h11.receive_data(view[:got])  # type: ignore[arg-type]
                continue
            return event
