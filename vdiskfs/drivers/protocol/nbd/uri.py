"""NBD URIs (``doc/uri.md`` of the NBD project): ``nbd://host[:port]/export``,
``nbd+unix:///export?socket=PATH``, and their TLS forms ``nbds://`` and ``nbds+unix://``.
Pure parsing, no I/O."""

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
    #: TLS (``nbds``, ``nbds+unix``): required; the connection fails without it.
    tls: bool = False
    #: The name the server's certificate must carry (``tls-hostname``; default the host).
    tls_hostname: str | None = None
    #: Verify the server's certificate (``tls-verify-peer``, default 1).
    tls_verify_peer: bool = True
    #: A directory with ``ca-cert.pem`` and optionally ``client-cert.pem`` and
    #: ``client-key.pem`` (``tls-certificates``, as libnbd and QEMU's ``tls-creds-x509`` lay
    #: it out); without it, the system's certificate authorities.
    tls_certificates: str | None = None


def parse_uri(url: str) -> NbdAddress:
    """Parse an NBD URI; refuse what this client cannot honour (TLS-PSK, TLS parameters on a
    URI that does not require TLS) or does not know (an unknown query parameter, which the
    URI spec says "SHOULD be diagnosed")."""

    def bad(message: str, err: int = errno.EINVAL) -> VdiskError:
        return VdiskError(f"bad NBD URI: {message}", path=url, errno=err)

    parts = urllib.parse.urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in ("nbd", "nbd+unix", "nbds", "nbds+unix"):
        raise bad(f"scheme {parts.scheme!r} is not nbd, nbd+unix, nbds or nbds+unix")
    tls = scheme.startswith("nbds")
    if parts.fragment:
        raise bad("a fragment (#...) has no meaning in an NBD URI")
    # The export name is the path without its leading "/", percent-decoded.
    export = urllib.parse.unquote(parts.path[1:] if parts.path.startswith("/") else parts.path)
    if "\0" in export:
        raise bad("export name contains a NUL")
    query = urllib.parse.parse_qs(parts.query, keep_blank_values=True, strict_parsing=False)
    socket: str | None = None
    timeout = DEFAULT_TIMEOUT
    tls_hostname: str | None = None
    tls_verify_peer = True
    tls_certificates: str | None = None
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
        elif key in _TLS_PARAMETERS or key == "tls-certificates":
            if not tls:
                # Opportunistic TLS over nbd:// invites a downgrade: ask for nbds:// instead.
                raise bad(f"{key} needs an nbds:// or nbds+unix:// URI")
            if key == "tls-type" and value != "x509":
                raise UnsupportedError(f"tls-type={value}: only x509 is supported", path=url)
            if key == "tls-hostname":
                tls_hostname = value
            elif key == "tls-verify-peer":
                if value not in ("0", "1"):
                    raise bad(f"tls-verify-peer={value!r} is not 0 or 1")
                tls_verify_peer = value == "1"
            elif key == "tls-certificates":
                tls_certificates = value
        else:
            raise bad(f"unknown query parameter {key!r}")
    if parts.username is not None:
        raise UnsupportedError("a user name is only used by TLS-PSK, which is not supported",
                               path=url)
    host: str | None = None
    port: int | None = None
    if scheme.endswith("+unix"):
        if not socket:
            raise bad("nbd+unix needs ?socket=PATH")
        if parts.netloc:
            raise bad(f"{scheme} takes no host ({scheme}:///export?socket=PATH)")
    else:
        if socket is not None:
            raise bad("socket= is only for nbd+unix and nbds+unix")
        try:
            port = parts.port
        except ValueError:
            raise bad("port is not a number from 0 to 65535") from None
        host = parts.hostname or "localhost"
    return NbdAddress(export=export, host=host, port=NBD_DEFAULT_PORT if port is None else port,
                      socket=socket, timeout=timeout, tls=tls, tls_hostname=tls_hostname,
                      tls_verify_peer=tls_verify_peer, tls_certificates=tls_certificates)
