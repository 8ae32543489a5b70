"""NBD URIs (``doc/uri.md`` of the NBD project): ``nbd://host[:port]/export`` and
``nbd+unix:///export?socket=PATH``. Pure parsing, no I/O."""

from __future__ import annotations

import errno
import urllib.parse
from dataclasses import dataclass

from vdiskfs.drivers.protocol.nbd.wire import NBD_DEFAULT_PORT
from vdiskfs.errors import UnsupportedError, VdiskError

__all__ = ["DEFAULT_TIMEOUT", "NbdAddress", "parse_uri"]

#: Seconds a request (or the connection and handshake) may take before the server counts as
#: gone: a dead or hung server gives EIO, never a hang. ``x-timeout=SECONDS`` changes it.
DEFAULT_TIMEOUT = 30.0

_TLS_PARAMETERS = ("tls-type", "tls-hostname", "tls-verify-peer")


@dataclass(frozen=True, slots=True)
class NbdAddress:
    """Where an export is: a TCP ``host``/``port`` or a Unix ``socket``, and its name."""

    export: str
    host: str | None = None
    port: int = NBD_DEFAULT_PORT
    socket: str | None = None
    timeout: float = DEFAULT_TIMEOUT


def parse_uri(url: str) -> NbdAddress:
    """Parse an NBD URI; refuse what this client cannot honour (TLS) or does not know (an
    unknown query parameter, which the URI spec says "SHOULD be diagnosed")."""

    def bad(message: str, err: int = errno.EINVAL) -> VdiskError:
        return VdiskError(f"bad NBD URI: {message}", path=url, errno=err)

    parts = urllib.parse.urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme in ("nbds", "nbds+unix"):
        raise UnsupportedError(f"{scheme}: NBD over TLS is not supported yet", path=url)
    if scheme not in ("nbd", "nbd+unix"):
        raise bad(f"scheme {parts.scheme!r} is not nbd or nbd+unix")
    if parts.fragment:
        raise bad("a fragment (#...) has no meaning in an NBD URI")
    # The export name is the path without its leading "/", percent-decoded.
    export = urllib.parse.unquote(parts.path[1:] if parts.path.startswith("/") else parts.path)
    if "\0" in export:
        raise bad("export name contains a NUL")
    query = urllib.parse.parse_qs(parts.query, keep_blank_values=True, strict_parsing=False)
    socket: str | None = None
    timeout = DEFAULT_TIMEOUT
    for key, values in query.items():
        value = values[-1]
        if key == "socket":
            socket = value
        elif key == "x-timeout":
            try:
                timeout = float(value)
            except ValueError:
                raise bad(f"x-timeout={value!r} is not a number of seconds") from None
            if not timeout > 0:
                raise bad(f"x-timeout={value!r} must be positive")
        elif key in _TLS_PARAMETERS:
            raise UnsupportedError(f"{key}: NBD over TLS is not supported yet", path=url)
        else:
            raise bad(f"unknown query parameter {key!r}")
    if parts.username is not None:
        raise UnsupportedError("a user name is only used by TLS, which is not supported yet",
                               path=url)
    if scheme == "nbd+unix":
        if not socket:
            raise bad("nbd+unix needs ?socket=PATH")
        if parts.netloc:
            raise bad("nbd+unix takes no host (nbd+unix:///export?socket=PATH)")
        return NbdAddress(export=export, socket=socket, timeout=timeout)
    if socket is not None:
        raise bad("socket= is only for nbd+unix")
    try:
        port = parts.port
    except ValueError:
        raise bad("port is not a number from 0 to 65535") from None
    host = parts.hostname or "localhost"
    return NbdAddress(export=export, host=host,
                      port=NBD_DEFAULT_PORT if port is None else port, timeout=timeout)
