"""The table of drivers: each declares itself here, and :func:`probe` picks a format.

A driver registers with :func:`register`; a format driver also implements
``probe(head, tail, filename) -> score`` (0: not mine). As in QEMU's ``bdrv_probe_all``, the
highest score wins, and ``raw`` scores lowest, so it wins only when nothing else matches; when raw
was probed the caller is warned, because a guest can write another format's header into a raw
disk and turn it into something else at the next open.

The modules of the drivers are listed here by name (:data:`FORMAT_MODULES`,
:data:`PROTOCOL_MODULES`) and imported the first time a lookup needs them: a command that opens
no image (``vdiskfs unmount``) loads none, and the drivers, which import this module to
register, never find it half-initialised. Opening an image (``open_image``) and the context a
format driver opens its children with live in :mod:`vdiskfs.block.context`.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Protocol, TypeVar

from vdiskfs.block.jsonref import redact_json_reference
from vdiskfs.errors import FormatError, UnsupportedError

if TYPE_CHECKING:
    from vdiskfs.block.context import OpenContext, OpenOptions
    from vdiskfs.block.node import BlockNode

__all__ = [
    "FORMAT_MODULES",
    "PROTOCOL_MODULES",
    "PROTOCOL_ONLY",
    "FormatDriver",
    "driver_names",
    "get_driver",
    "is_bare_scheme",
    "is_network_name",
    "looks_like_url",
    "probe",
    "protocol_opener",
    "protocol_schemes",
    "read_only_protocol",
    "redact_reference",
    "redact_url",
    "register",
    "register_protocol",
    "url_scheme",
    "wants_read_cache",
]

#: Every format driver: its ``driver`` name and the module whose ``@register`` declares it.
#: A new format adds its line here (``tests/block/test_registry.py`` checks the two agree).
FORMAT_MODULES = {
    "qcow2": "vdiskfs.drivers.format.qcow2",
    "qed": "vdiskfs.drivers.format.qed",
    "raw": "vdiskfs.drivers.format.raw",
    "vdi": "vdiskfs.drivers.format.vdi",
    "vhdx": "vdiskfs.drivers.format.vhdx",
    "vmdk": "vdiskfs.drivers.format.vmdk",
    "vpc": "vdiskfs.drivers.format.vpc",
}
#: Every network protocol driver's module (its ``@register_protocol`` names the schemes).
PROTOCOL_MODULES = (
    "vdiskfs.drivers.protocol.http",
    "vdiskfs.drivers.protocol.nbd",
    "vdiskfs.drivers.protocol.rbd",
    "vdiskfs.drivers.protocol.s3",
)

#: The ``format`` that :meth:`OpenContext.open_child` gives to get the protocol node itself.
PROTOCOL_ONLY = "file"

#: Bytes of the image's start and end handed to ``probe``. VMDK descriptors are text of a few
#: KiB; a fixed VHD is recognised by the 512-byte footer at its end.
PROBE_HEAD = 64 * 1024
PROBE_TAIL = 512


class FormatDriver(Protocol):
    """What a format driver class offers the registry (besides being a BlockNode)."""

    driver: str

    @classmethod
    def probe(cls, head: bytes, tail: bytes, filename: str) -> int: ...

    def __call__(self, file: BlockNode, ctx: OpenContext) -> BlockNode: ...


_FORMATS: dict[str, FormatDriver] = {}

D = TypeVar("D", bound=FormatDriver)


def register(cls: D) -> D:
    """Class decorator: make a format driver known by its ``driver`` name."""
    name = cls.driver
    if name in _FORMATS:
        raise RuntimeError(f"format driver {name!r} registered twice")
    _FORMATS[name] = cls
    return cls


#: ``scheme -> opener`` of the network protocol nodes (``nbd``, ``https``...): what opens a
#: URL instead of a local path. An opener returns the protocol node, open.
ProtocolOpener = Callable[[str, "OpenOptions"], "Awaitable[BlockNode]"]
_PROTOCOLS: dict[str, ProtocolOpener] = {}
_READ_ONLY_PROTOCOLS: set[str] = set()
#: Schemes named as ``scheme:rest`` without ``//`` (QEMU's ``rbd:pool/image``).
_BARE_SCHEMES: set[str] = set()
#: Schemes that get no ``cache`` filter over their node (see :func:`register_protocol`).
_UNCACHED_SCHEMES: set[str] = set()
#: ``scheme://userinfo@`` at the start of a URL (the authority ends at ``/``, ``?`` or ``#``).
_USERINFO = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://)([^/?#]*)@")


def register_protocol(
    *schemes: str, read_only: bool = False, bare: bool = False, read_cache: bool = True
) -> Callable[[ProtocolOpener], ProtocolOpener]:
    """Decorator of a protocol driver's opener: URLs of these schemes (``nbd``, ``nbd+unix``)
    open with it, as QEMU's ``bdrv_find_protocol`` picks a driver by the URL's prefix.
    ``read_only``: the driver cannot write at all (see :func:`read_only_protocol`).
    ``bare``: names are ``scheme:rest``, without ``//`` (``rbd:pool/image``).
    ``read_cache``: whether a ``cache`` filter goes over the node by default. Not over a node
    that caches and reads ahead itself (librbd), nor over one whose server answers from its
    own page cache in about the time the filter takes (NBD: on loopback the filter cost 65 us
    of CPU per 4 KiB read and fetched 64 KiB per miss); QEMU puts none over either."""

    def decorate(opener: ProtocolOpener) -> ProtocolOpener:
        for scheme in schemes:
            if scheme in _PROTOCOLS:
                raise RuntimeError(f"protocol {scheme!r} registered twice")
            _PROTOCOLS[scheme] = opener
            if read_only:
                _READ_ONLY_PROTOCOLS.add(scheme)
            if bare:
                _BARE_SCHEMES.add(scheme)
            if not read_cache:
                _UNCACHED_SCHEMES.add(scheme)
        return opener

    return decorate


def url_scheme(name: str) -> str | None:
    """The scheme of ``name`` if it is a URL of a registered protocol (``nbd://host/x``, or
    ``rbd:pool/image`` for a bare scheme), else None: a local path (which may contain a colon;
    ``./rbd:x`` is a file)."""
    scheme, sep, _ = name.partition("://")
    if not sep:
        scheme, sep, _ = name.partition(":")
        if not sep or "/" in scheme:
            return None
        _load_protocols()
        return scheme if scheme in _BARE_SCHEMES else None
    _load_protocols()
    return scheme.lower() if scheme.lower() in _PROTOCOLS else None


def is_network_name(name: str) -> bool:
    """Whether ``name`` is a URL with no credentials in it and nothing to resolve it against
    (``nbd``, ``rbd``): what an overlay may record as given, and all that an rbd: image may
    name. (An https URL can carry credentials: an image may name one, which is followed, but
    vdiskfs never writes one into an overlay.)"""
    scheme = url_scheme(name) or ""
    return scheme.startswith("nbd") or scheme in _BARE_SCHEMES


def redact_url(name: str) -> str:
    """``name`` with the credentials of a URL hidden, safe to show: ``https://user:***@host/x``
    (a user name alone, which may be a token, becomes ``***``); anything else unchanged. A URL
    inside a longer text (``--disk=https://...``, a command line) is redacted too."""

    def hide(match: re.Match[str]) -> str:
        user, colon, _ = match.group(2).partition(":")
        shown = f"{user}:***" if colon and user else "***"
        return f"{match.group(1)}{shown}@"

    return _USERINFO.sub(hide, name)


def read_only_protocol(name: str) -> bool:
    """Whether ``name`` is a URL of a protocol that can only read (``https``): opened
    writable it is refused, so a caller with no explicit mode opens it read-only, as QEMU's
    ``auto-read-only`` does for ``-drive``."""
    return url_scheme(name) in _READ_ONLY_PROTOCOLS


def is_bare_scheme(scheme: str | None) -> bool:
    """Whether names of ``scheme`` are ``scheme:rest``, without ``//`` (``rbd:pool/image``)."""
    _load_protocols()
    return scheme in _BARE_SCHEMES


def wants_read_cache(scheme: str) -> bool:
    """Whether a ``cache`` filter goes over the node of ``scheme`` (unless ``--no-cache``)."""
    _load_protocols()
    return scheme not in _UNCACHED_SCHEMES


def protocol_opener(scheme: str) -> ProtocolOpener:
    """The opener of a scheme that :func:`url_scheme` returned."""
    _load_protocols()
    return _PROTOCOLS[scheme]


def protocol_schemes() -> list[str]:
    """Every registered scheme, sorted (for messages)."""
    _load_protocols()
    return sorted(_PROTOCOLS)


def looks_like_url(reference: str) -> bool:
    """Whether ``reference`` names a protocol, known or not (``ssh://``, ``nbd:host``): such a
    name is refused when no driver opens it, never read as a local file."""
    return reference.startswith(_PROTOCOL_PREFIXES) or _URL_PREFIX.match(reference) is not None


def redact_reference(reference: str) -> str:
    """A name recorded in an image (a path, a URL, a ``json:{...}`` reference), safe to show:
    the credentials of every URL in it hidden."""
    if reference.startswith("json:"):
        return redact_json_reference(reference, redact_url)
    return redact_url(reference)


#: Prefixes of QEMU protocol references that are not a URL we open (``nbd:host:port``,
#: ``https:x``): refused by name rather than read as a local file called ``nbd:host``.
_PROTOCOL_PREFIXES = ("json:", "nbd:", "nbds:", "nbd+unix:", "http:", "https:")
#: Any other ``scheme://``: a protocol we lack (``ssh://``, ``gluster://``), as QEMU's
#: ``path_has_protocol`` tells one, never a local directory called ``ssh:``.
_URL_PREFIX = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")


def _load_formats() -> None:
    # Importing a driver's module runs its @register; Python imports each module once, so after
    # the first call this is a few dictionary lookups.
    for module in FORMAT_MODULES.values():
        importlib.import_module(module)


def _load_protocols() -> None:
    for module in PROTOCOL_MODULES:
        importlib.import_module(module)


def driver_names() -> list[str]:
    """The format names (``--format``'s choices), from the table: no driver is loaded."""
    return sorted(FORMAT_MODULES)


def get_driver(name: str) -> FormatDriver:
    _load_formats()
    try:
        return _FORMATS[name]
    except KeyError:
        known = ", ".join(sorted(_FORMATS))
        raise UnsupportedError(f"unknown format {name!r} (known: {known})") from None


def probe(head: bytes, tail: bytes, filename: str) -> tuple[FormatDriver, int]:
    """Best-scoring format driver for these bytes; raw (score 1) when nothing else matches."""
    _load_formats()
    best: tuple[FormatDriver, int] | None = None
    for cls in _FORMATS.values():
        score = cls.probe(head, tail, filename)
        if score > 0 and (best is None or score > best[1]):
            best = (cls, score)
    if best is None:  # pragma: no cover - raw always answers
        raise FormatError("no driver recognises the image", path=filename)
    return best
