"""Protocol driver ``http``/``https``: a read-only image on a web server, read with ``Range``.

Opening sends ``HEAD`` (following up to :data:`MAX_REDIRECTS` redirects) and requires what
QEMU's curl driver requires: a ``Content-Length`` (the size) and ``Accept-Ranges: bytes``. The
validators of the answer are pinned: every read is a ``GET`` with ``Range: bytes=a-b`` and
``If-Match: <etag>`` (a strong ETag) or else ``If-Unmodified-Since: <last-modified>``, so a
file replaced on the server gives ``412`` -- EIO, "changed on the server since it was opened"
-- instead of a mix of old and new bytes; the ETag and total size of each ``206`` are checked
too, for servers that ignore the conditions. A ``200`` to a ranged request (a server that
ignores ``Range``) is refused without reading its body.

TLS is verified against the system CA store by default (``ca_file`` for a private CA,
``verify_tls=False`` to opt out). Credentials come from the URL (``https://user:pass@host/``)
or a netrc file (``$NETRC``, else ``~/.netrc``) and are sent as Basic authentication; the
node's label, and so every error, log line, stats file and ``info`` output, shows the URL
with the password replaced by ``***``.
"""

from __future__ import annotations

import base64
import errno
import logging
import netrc
import os
import ssl
import urllib.parse
from typing import Any, ClassVar

from vdiskfs.block.context import OpenOptions
from vdiskfs.block.node import BlockNode, Buffer, NodeKind
from vdiskfs.block.registry import redact_url, register_protocol
from vdiskfs.drivers.protocol.http.pool import (
    ConnectionPool,
    HttpCounters,
    HttpError,
    Response,
    Signer,
)
from vdiskfs.errors import UnsupportedError

__all__ = ["HttpNode", "open_http", "opened", "redact_url"]

log = logging.getLogger(__name__)

MAX_REDIRECTS = 10
_REDIRECTS = frozenset({301, 302, 303, 307, 308})


class _Origin:
    """Where requests go: the pool of ``scheme://host:port``, the target and credentials
    (the node's: a ``Basic`` header, or a signer that authenticates each request)."""

    def __init__(self, url: str, node: HttpNode) -> None:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise HttpError(f"not an http(s) URL with a host: {redact_url(url)}",
                            path=node.label, errno=errno.EINVAL)
        self.url = url
        self.scheme = parts.scheme
        self.host = parts.hostname
        try:
            self.port = parts.port or (443 if parts.scheme == "https" else 80)
        except ValueError:
            raise HttpError("invalid port in the URL", path=node.label,
                            errno=errno.EINVAL) from None
        self.target = urllib.parse.urlunsplit(("", "", parts.path or "/", parts.query, ""))
        self.authorization = node.authorization(parts)
        self.pool = ConnectionPool(
            self.host,
            self.port,
            ssl_context=node.ssl_context if parts.scheme == "https" else None,
            name=node.label,
            counters=node.counters,
            max_connections=node.max_connections,
            timeout=node.timeout,
            retries=node.retries,
            sign=node.signer(),
        )

    def headers(self, *extra: tuple[str, str]) -> list[tuple[str, str]]:
        headers = list(extra)
        if self.authorization is not None:
            headers.append(("Authorization", self.authorization))
        return headers


def _basic(user: str, password: str) -> str:
    token = base64.b64encode(f"{user}:{password}".encode()).decode("ascii")
    return f"Basic {token}"


def _netrc_authorization(host: str) -> str | None:
    """Basic credentials for ``host`` from ``$NETRC`` or ``~/.netrc``, if it has an entry."""
    path = os.environ.get("NETRC") or os.path.expanduser("~/.netrc")
    if not os.path.isfile(path):
        return None
    try:
        entry = netrc.netrc(path).authenticators(host)
    except (netrc.NetrcParseError, OSError) as exc:
        # The message of a parse error may quote the file: only its name and line go out.
        line = getattr(exc, "lineno", None)
        log.warning("%s: ignored, cannot be parsed%s", path,
                    f" (line {line})" if line else "")
        return None
    if entry is None:
        return None
    login, _account, password = entry
    return _basic(login or "", password or "")


class HttpNode(BlockNode):
    """An image served over HTTP(S), read-only.

    A protocol that is HTTP underneath (S3) subclasses it and changes only how requests are
    authenticated (:meth:`authorization`, :meth:`signer`), whether redirects are followed and
    how a refusal reads (:meth:`refusal`): the pool, retries, TLS, validators and range checks
    stay these.
    """

    driver = "http"
    kind = NodeKind.PROTOCOL
    counters_class = HttpCounters
    counters: HttpCounters
    #: Follow redirects at open (a signed request cannot be: its signature names the host).
    follow_redirects: ClassVar[bool] = True

    def __init__(
        self,
        url: str,
        *,
        ca_file: str | None = None,
        verify_tls: bool = True,
        max_connections: int = 8,
        timeout: float = 30.0,
        retries: int = 3,
        label: str | None = None,
    ) -> None:
        super().__init__(read_only=True, label=label or redact_url(url))
        self.max_connections = max_connections
        self.timeout = timeout
        self.retries = retries
        self.ssl_context: ssl.SSLContext | None = None
        if url.lower().startswith("https:"):
            try:
                context = ssl.create_default_context(cafile=ca_file)
            except (OSError, ssl.SSLError) as exc:
                raise HttpError(f"cannot load the CA file {ca_file}: {exc}",
                                path=self.label) from None
            if not verify_tls:
                context.check_hostname = False
                context.verify_mode = ssl.CERT_NONE
            self.ssl_context = context
        self._url = url
        self._origin: _Origin | None = None
        #: The validators pinned at open.
        self.etag: str | None = None
        self.last_modified: str | None = None

    @property
    def origin(self) -> _Origin:
        assert self._origin is not None, "HttpNode used before open()"
        return self._origin

    def authorization(self, parts: urllib.parse.SplitResult) -> str | None:
        """The ``Authorization`` header of every request to the URL of ``parts``: ``Basic``
        with the URL's credentials, else a netrc file's for its host, else none."""
        user = parts.username
        if user is not None:
            password = urllib.parse.unquote(parts.password or "")
            return _basic(urllib.parse.unquote(user), password)
        return _netrc_authorization(parts.hostname or "")

    def signer(self) -> Signer | None:
        """What signs each request (:data:`~.pool.Signer`); none for plain HTTP."""
        return None

    async def refusal(self, response: Response, method: str,
                      offset: int | None = None) -> HttpError:
        """The error for an answer of ``response.status`` (not 2xx) to ``method``."""
        status = response.status
        if method == "HEAD" and status in (401, 403):
            return HttpError(f"HEAD answered {status}: access denied (credentials go in the URL "
                             "or a netrc file)", path=self.label, errno=errno.EACCES)
        if method == "HEAD" and status == 404:
            return HttpError("HEAD answered 404: no such file on the server", path=self.label,
                             errno=errno.ENOENT)
        return HttpError(f"{method} answered {status}", path=self.label, offset=offset)

    async def open(self) -> None:
        """``HEAD`` the URL, following redirects; take the size and pin the validators."""
        origin = _Origin(self._url, self)
        try:
            for _ in range(MAX_REDIRECTS + 1):
                response = await origin.pool.request("HEAD", origin.target, origin.headers())
                if response.status not in _REDIRECTS or not self.follow_redirects:
                    break
                location = response.headers.get("location")
                if not location:
                    raise HttpError(f"HEAD answered {response.status} without a Location",
                                    path=self.label)
                origin = await self._redirected(origin, location)
            else:
                raise HttpError(f"more than {MAX_REDIRECTS} redirects", path=self.label)
            self._origin = origin
            if response.status != 200:
                raise await self.refusal(response, "HEAD")
        except BaseException:
            await origin.pool.aclose()
            raise
        self._check_head(response)

    async def _redirected(self, origin: _Origin, location: str) -> _Origin:
        """The origin that ``location`` (relative to ``origin``) names; credentials are kept
        only on the same scheme, host and port, as curl does."""
        self.counters.redirects += 1
        url = urllib.parse.urljoin(origin.url, location)
        new = urllib.parse.urlsplit(url)
        same = (new.scheme, new.hostname, new.port or (443 if new.scheme == "https" else 80)) \
            == (origin.scheme, origin.host, origin.port)
        if same and new.username is None:  # the same pool and credentials
            origin.target = urllib.parse.urlunsplit(("", "", new.path or "/", new.query, ""))
            origin.url = url
            return origin
        await origin.pool.aclose()
        if new.scheme == "http" and origin.scheme == "https":
            raise HttpError("refusing a redirect from https to plain http", path=self.label)
        return _Origin(url, self)

    def _check_head(self, response: Response) -> None:
        headers = response.headers
        length = headers.get("content-length", "")
        if not length.isdigit():
            raise HttpError("the server gives no Content-Length: the image's size is unknown",
                            path=self.label)
        if headers.get("accept-ranges", "").strip().lower() != "bytes":
            # As QEMU's curl driver: "Server does not support 'range' (byte ranges)".
            raise HttpError("the server does not support byte ranges (no 'Accept-Ranges: "
                            "bytes' in its answer to HEAD): images are read in ranges",
                            path=self.label, errno=errno.ENOTSUP)
        self.size = int(length)
        etag = headers.get("etag")
        self.etag = etag if etag and not etag.startswith("W/") else None
        self.last_modified = headers.get("last-modified")
        if self.etag is None and self.last_modified is None:
            self.warnings.append(f"{self.label}: the server gives neither a strong ETag nor "
                                 "Last-Modified: a file replaced on the server will not be "
                                 "noticed")

    async def _close(self) -> None:
        if self._origin is not None:
            await self._origin.pool.aclose()

    def info(self) -> dict[str, Any]:
        return {"filename": self.label}

    def content_key(self) -> str | None:
        """The URL without credentials (it still selects the same file), the pinned ETag or
        Last-Modified and the size; None when the server gives no validator."""
        if self.etag is None and self.last_modified is None:
            return None
        origin = self.origin
        return "\n".join(["http", origin.scheme, origin.host, str(origin.port), origin.target,
                          self.etag or "", self.last_modified or "", str(self.size)])

    async def allocated_size(self) -> int:
        return self.size

    async def _pread(self, offset: int, length: int) -> Buffer:
        origin = self.origin
        end = offset + length - 1
        extra = [("Range", f"bytes={offset}-{end}")]
        if self.etag is not None:
            extra.append(("If-Match", self.etag))
        elif self.last_modified is not None:
            extra.append(("If-Unmodified-Since", self.last_modified))
        response = await origin.pool.request("GET", origin.target, origin.headers(*extra),
                                             body_limit=length)
        status = response.status
        if status == 412:
            raise HttpError("the file changed on the server since it was opened (ETag or "
                            "Last-Modified no longer match)", path=self.label, offset=offset)
        if status == 200:
            raise HttpError("the server ignores Range (answered 200 with the whole file to a "
                            "ranged request)", path=self.label, offset=offset,
                            errno=errno.ENOTSUP)
        if status != 206:
            raise await self.refusal(response, f"GET of bytes {offset}-{end}", offset)
        self._check_partial(response, offset, end)
        return response.body

    def _check_partial(self, response: Response, offset: int, end: int) -> None:
        headers = response.headers
        etag = headers.get("etag")
        if self.etag is not None and etag is not None and etag != self.etag:
            raise HttpError("the file changed on the server since it was opened (ETag "
                            "differs)", path=self.label, offset=offset)
        content_range = headers.get("content-range", "")
        unit, _, spec = content_range.partition(" ")
        span, _, total = spec.partition("/")
        first, _, last = span.partition("-")
        if unit != "bytes" or not (first.isdigit() and last.isdigit()):
            raise HttpError(f"206 answer without a valid Content-Range ({content_range!r})",
                            path=self.label, offset=offset)
        if total.isdigit() and int(total) != self.size:
            raise HttpError(f"the file changed on the server since it was opened (its size "
                            f"is now {total}, was {self.size})", path=self.label, offset=offset)
        if (int(first), int(last)) != (offset, end) or len(response.body) != end - offset + 1:
            raise HttpError(f"asked for bytes {offset}-{end}, got {first}-{last} "
                            f"({len(response.body)} bytes)", path=self.label, offset=offset)


@register_protocol("http", "https", read_only=True)
async def open_http(url: str, options: OpenOptions) -> BlockNode:
    """The open protocol node of ``url`` (read-only: writing is refused with EROFS)."""
    if not options.read_only:
        raise UnsupportedError("http(s) images are read-only (mount without --rw)",
                               path=redact_url(url), errno=errno.EROFS)
    return await opened(HttpNode(url, ca_file=options.ca_file, verify_tls=options.verify_tls),
                        options)


async def opened(node: HttpNode, options: OpenOptions) -> HttpNode:
    """``node`` open, its warnings given to the user; closed if the open fails."""
    try:
        await node.open()
    except BaseException:
        await node.aclose()
        raise
    for message in node.warnings:
        options.tell(message)
    return node
