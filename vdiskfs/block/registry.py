"""Drivers declare themselves here; opening a path builds the whole tree.

A driver registers with :func:`register`; a format driver also implements
``probe(head, tail, filename) -> score`` (0: not mine). As in QEMU's ``bdrv_probe_all``, the
highest score wins, and ``raw`` scores lowest, so it wins only when nothing else matches; when raw
was probed the caller is warned, because a guest can write another format's header into a raw
disk and turn it into something else at the next open.

Format drivers never open files themselves: they ask the :class:`OpenContext` for a child
(backing file, external data file, extent), which resolves the name relative to the parent image,
enforces the path policy, detects loops and bounds the chain depth.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import urllib.parse
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Protocol, TypeVar

import trio

from vdiskfs.block.jsonref import parse_json_reference, redact_json_reference
from vdiskfs.errors import ChainError, FormatError, HostIOError, UnsupportedError, VdiskError

if TYPE_CHECKING:
    from vdiskfs.block.node import BlockNode

__all__ = [
    "PROTOCOL_ONLY",
    "FormatDriver",
    "OpenContext",
    "OpenOptions",
    "driver_names",
    "get_driver",
    "is_network_name",
    "open_image",
    "probe",
    "read_only_protocol",
    "redact_reference",
    "redact_url",
    "register",
    "register_protocol",
    "run_blocking",
    "url_scheme",
]

log = logging.getLogger(__name__)

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

T = TypeVar("T")


def register(cls: T) -> T:
    """Class decorator: make a format driver known by its ``driver`` name."""
    name = cls.driver  # type: ignore[attr-defined]
    if name in _FORMATS:
        raise RuntimeError(f"format driver {name!r} registered twice")
    _FORMATS[name] = cls  # type: ignore[assignment]
    return cls


#: ``scheme -> opener`` of the network protocol nodes (``nbd``, ``https``...): what opens a
#: URL instead of a local path. An opener returns the protocol node, open.
ProtocolOpener = Callable[[str, "OpenOptions"], "Awaitable[BlockNode]"]
_PROTOCOLS: dict[str, ProtocolOpener] = {}
_READ_ONLY_PROTOCOLS: set[str] = set()
#: Schemes named as ``scheme:rest`` without ``//`` (QEMU's ``rbd:pool/image``).
_BARE_SCHEMES: set[str] = set()
#: Schemes whose node caches and reads ahead itself: no ``cache`` filter over it.
_SELF_CACHED_SCHEMES: set[str] = set()
#: ``scheme://userinfo@`` at the start of a URL (the authority ends at ``/``, ``?`` or ``#``).
_USERINFO = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://)([^/?#]*)@")


def register_protocol(
    *schemes: str, read_only: bool = False, bare: bool = False, self_cached: bool = False
) -> Callable[[ProtocolOpener], ProtocolOpener]:
    """Decorator of a protocol driver's opener: URLs of these schemes (``nbd``, ``nbd+unix``)
    open with it, as QEMU's ``bdrv_find_protocol`` picks a driver by the URL's prefix.
    ``read_only``: the driver cannot write at all (see :func:`read_only_protocol`).
    ``bare``: names are ``scheme:rest``, without ``//`` (``rbd:pool/image``).
    ``self_cached``: the node has its own cache and readahead (librbd's), so no ``cache``
    filter goes over it, as QEMU puts none over its rbd driver."""

    def decorate(opener: ProtocolOpener) -> ProtocolOpener:
        for scheme in schemes:
            if scheme in _PROTOCOLS:
                raise RuntimeError(f"protocol {scheme!r} registered twice")
            _PROTOCOLS[scheme] = opener
            if read_only:
                _READ_ONLY_PROTOCOLS.add(scheme)
            if bare:
                _BARE_SCHEMES.add(scheme)
            if self_cached:
                _SELF_CACHED_SCHEMES.add(scheme)
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
        _load_drivers()
        return scheme if scheme in _BARE_SCHEMES else None
    _load_drivers()
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


def _load_drivers() -> None:
    # Importing the package runs every driver module's @register.
    import vdiskfs.drivers  # noqa: F401


def driver_names() -> list[str]:
    _load_drivers()
    return sorted(_FORMATS)


def get_driver(name: str) -> FormatDriver:
    _load_drivers()
    try:
        return _FORMATS[name]
    except KeyError:
        known = ", ".join(sorted(_FORMATS))
        raise UnsupportedError(f"unknown format {name!r} (known: {known})") from None


def probe(head: bytes, tail: bytes, filename: str) -> tuple[FormatDriver, int]:
    """Best-scoring format driver for these bytes; raw (score 1) when nothing else matches."""
    _load_drivers()
    best: tuple[FormatDriver, int] | None = None
    for cls in _FORMATS.values():
        score = cls.probe(head, tail, filename)
        if score > 0 and (best is None or score > best[1]):
            best = (cls, score)
    if best is None:  # pragma: no cover - raw always answers
        raise FormatError("no driver recognises the image", path=filename)
    return best


@dataclass
class OpenOptions:
    """What the user asked for when opening an image (``vdiskfs mount`` flags)."""

    read_only: bool = True
    #: Force the top image's format (``--format``); children use their own recorded format.
    format: str | None = None
    #: Open backing files; off only to inspect one layer on its own.
    backing: bool = True
    #: Longest backing chain accepted. QEMU has no limit; a hostile image must not make us
    #: recurse or hold thousands of files open.
    max_chain_depth: int = 64
    #: Follow backing/extent references that lead outside the referring image's directory.
    #: QEMU does; a forensic user may refuse it (``--no-follow-outside``).
    follow_outside: bool = True
    #: Take QEMU-compatible image locks (off only for tests of the locking itself).
    locking: bool = True
    #: Callback for warnings meant for the user (probed raw, damaged partition entries...).
    warn: Callable[[str], None] | None = None
    #: ``https``: a CA certificate file (PEM) to verify the server with instead of the
    #: system's store (``--ca-file``), and whether to verify at all (``--no-verify-tls``).
    ca_file: str | None = None
    verify_tls: bool = True
    #: Put a read cache (the ``cache`` filter) over the protocol node of a URL; off with
    #: ``--no-cache``.
    cache: bool = True
    #: A directory where the cache also keeps the blocks of remote images whose content a
    #: validator pins (``--cache-dir``), for the next open of the same URL.
    cache_dir: str | None = None
    #: Open the top image at this internal snapshot, read-only (an ID or a name, IDs first,
    #: as QEMU's ``bdrv_snapshot_load_tmp_by_id_or_name``); backing files open as they are.
    snapshot: str | None = None

    def tell(self, message: str) -> None:
        """A warning for the user, as it arises: logged (the mount's log, boot's stderr) and
        given to :attr:`warn` (the terminal of ``vdiskfs mount``). Callers that show a node's
        ``warnings`` afterwards (``info``) silence the log instead."""
        log.warning("%s", message)
        if self.warn is not None:
            self.warn(message)


@dataclass
class OpenContext:
    """State shared by every open in one tree: options, the chain being opened, warnings."""

    options: OpenOptions
    #: The image this context opens children for (used to resolve relative names).
    path: str
    #: Real paths from the root image down to this one: a loop is a path seen twice.
    chain: tuple[str, ...] = ()
    warnings: list[str] = field(default_factory=list)
    #: The URL of an image opened by URL, credentials included: what names in it resolve
    #: against. ``path`` is then its redacted form, which messages show.
    url: str | None = None
    #: The internal snapshot (ID or name) the format node opens instead of the current state;
    #: set for the top image only (:attr:`OpenOptions.snapshot`).
    snapshot: str | None = None

    @property
    def read_only(self) -> bool:
        return self.options.read_only

    def warn(self, message: str) -> None:
        self.warnings.append(message)
        self.options.tell(message)

    def resolve(self, reference: str, *, field_name: str) -> str:
        """Turn a name recorded in the image into a path, relative to the image's directory,
        or a URL.

        Touches the file system (``realpath``) only under ``--no-follow-outside``; a coroutine
        uses :meth:`exists` or :meth:`realpath`, which run it in a thread.
        """
        return self.locate(reference, field_name=field_name)[0]

    def locate(self, reference: str, *, field_name: str) -> tuple[str, str | None]:
        """:meth:`resolve`, and the format that a ``json:`` reference states (else None).

        A URL (``https://``, ``nbd://``..., or one that a ``json:`` reference spells out) is
        followed as QEMU follows it, unless ``--no-follow-outside``: it always leads outside
        the image's directory. A ``file:`` name is always a path.
        """
        shown = redact_reference(reference)
        fmt: str | None = None
        if reference.startswith("json:"):
            parsed = parse_json_reference(reference, formats=driver_names(), path=self.path,
                                          field=field_name)
            reference, fmt = parsed.name, parsed.format
        if not reference:
            raise FormatError("reference is an empty name", path=self.path, field=field_name)
        if "\0" in reference:
            raise FormatError("reference contains a NUL byte", path=self.path, field=field_name)
        if self.url is not None and url_scheme(self.url) in _BARE_SCHEMES:
            if is_network_name(reference):
                return self._remote(reference, shown, field_name), fmt
            # A relative name has no meaning inside an rbd: image (QEMU would paste it into
            # the pool, options and all): only a full name (rbd:..., nbd://...) is followed.
            raise UnsupportedError(
                f"{shown!r}: a name inside an image opened as {self.url.partition(':')[0]}: "
                "must be a full rbd: or nbd:// name",
                path=self.path, field=field_name)
        if reference.startswith("file:"):
            reference = reference[len("file:") :]
        elif url_scheme(reference) is not None:
            return self._remote(reference, shown, field_name), fmt
        elif reference.startswith(_PROTOCOL_PREFIXES) or _URL_PREFIX.match(reference):
            raise UnsupportedError(
                f"{shown!r}: this protocol reference is not supported (URLs: "
                f"{', '.join(f'{s}://' for s in sorted(_PROTOCOLS))}, and json:)",
                path=self.path,
                field=field_name,
            )
        if self.url is not None:
            return self._resolve_url(self.url, reference, field_name), fmt
        base = os.path.dirname(os.path.abspath(self.path))
        resolved = os.path.normpath(os.path.join(base, reference))
        if not self.options.follow_outside:
            real_base = os.path.realpath(base)
            real = os.path.realpath(resolved)
            if os.path.commonpath([real_base, real]) != real_base:
                raise ChainError(
                    f"{shown!r} leads outside the image's directory {real_base} "
                    "(refused by --no-follow-outside)",
                    path=self.path,
                    field=field_name,
                    errno=errno.EPERM,
                )
        return resolved, fmt

    def _remote(self, url: str, shown: str, field_name: str) -> str:
        """A URL that the image names, checked against the policy."""
        if not self.options.follow_outside:
            raise ChainError(f"{shown!r} is a network URL (refused by --no-follow-outside)",
                             path=self.path, field=field_name, errno=errno.EPERM)
        query = urllib.parse.parse_qs(urllib.parse.urlsplit(url).query)
        if "0" in query.get("tls-verify-peer", ()):
            # Only the user may switch verification off, never an image.
            raise UnsupportedError(f"{shown!r}: an image may not switch off TLS verification",
                                   path=self.path, field=field_name)
        return url

    def _resolve_url(self, url: str, reference: str, field_name: str) -> str:
        """A name recorded in an image opened by URL, resolved against that URL (credentials
        included), as QEMU combines a backing name with its overlay's URL. An absolute name
        is taken from the server's root: a remote image never names a local file."""
        resolved = urllib.parse.urljoin(url, urllib.parse.quote(reference, safe="/"))
        directory = urllib.parse.urljoin(url, ".")
        if not self.options.follow_outside and not resolved.startswith(directory):
            raise ChainError(
                f"{reference!r} leads outside the image's directory on the server "
                "(refused by --no-follow-outside)",
                path=self.path,
                field=field_name,
                errno=errno.EPERM,
            )
        return resolved

    async def exists(self, reference: str, *, field_name: str, role: str = "parent") -> bool:
        """Whether something exists where ``reference`` resolves (a candidate parent path).

        Only a missing file is "no": any other failure (a name too long, a symlink loop, a
        component that is no directory) is an error naming the chain, as :meth:`open_child`
        would raise it, rather than a silent "not found".
        """
        target = await run_blocking(lambda: self.resolve(reference, field_name=field_name))
        if url_scheme(target) is not None:
            try:
                await (await _open_file(target, read_only=True, locking=False,
                                        options=replace(self.options, cache=False))).aclose()
            except VdiskError as exc:
                if exc.errno == errno.ENOENT:
                    return False
                raise self._child_error(exc, reference, redact_url(target), role,
                                        field_name) from exc
            return True

        def check() -> bool:
            try:
                os.stat(target)
            except FileNotFoundError:
                return False
            except OSError as exc:
                raise self._child_error(HostIOError.wrap(exc, target, "cannot open"), reference,
                                        target, role, field_name) from exc
            return True

        return await run_blocking(check)

    async def realpath(self, reference: str, *, field_name: str) -> str:
        """The real path (or URL) that ``reference`` resolves to (to tell two names of one
        file)."""
        return (await run_blocking(lambda: _resolve_real(self, reference, field_name)))[1]

    async def open_child(
        self,
        reference: str,
        *,
        role: str,
        field_name: str,
        format: str | None = None,
        format_field: str | None = None,
        read_only: bool = True,
    ) -> BlockNode:
        """Open a backing file, data file or extent named by the image, as a full subtree.

        Children are read-only unless the parent asks otherwise (an external data file of an
        image opened for writing). ``format=PROTOCOL_ONLY`` returns the protocol node itself,
        with no format layer above it (a VMDK extent file); a ``format`` recorded in the image
        (in its ``format_field``) must name a known driver.

        Any failure to open the child's file -- every errno, and a child that is not a disk --
        is raised naming this image, the field and the reference: the chain that led there.
        """
        if format is not None and format != PROTOCOL_ONLY:
            try:
                get_driver(format)
            except UnsupportedError as exc:
                raise UnsupportedError(f"{role} file {redact_reference(reference)!r}: "
                                       f"{exc.message}",
                                       path=self.path, field=format_field or field_name) from None
        if role == "backing" and len(self.chain) >= self.options.max_chain_depth:
            raise ChainError(
                f"backing chain deeper than {self.options.max_chain_depth} images",
                path=self.path,
                field=field_name,
            )
        # realpath stats every component of the path: on a hung file system that waits for
        # ever, so it runs in a thread that a cancellation (SIGTERM) abandons.
        path, real, stated = await run_blocking(lambda: _resolve_real(self, reference,
                                                                      field_name))
        shown = redact_reference(reference)
        if stated is not None:
            format = self._stated_format(stated, format, role, shown, field_name)
        if real in self.chain:
            raise ChainError(
                f"backing chain loops: {shown!r} is already in the chain", path=self.path,
                field=field_name,
            )
        if self.url is None and url_scheme(path) is not None:
            # A local image that pulls a remote file: the user may not expect the network.
            self.warn(f"{self.path}: {role} file {redact_url(path)} is remote: reads go over "
                      "the network")
        try:
            file = await _open_file(path, read_only=read_only, locking=self.options.locking,
                                    options=self.options)
        except VdiskError as exc:
            raise self._child_error(exc, reference, redact_url(path), role, field_name) from exc
        return await _open_tree(
            file,
            real=real,
            options=self.options,
            format=format,
            read_only=read_only,
            chain=self.chain,
            warnings=self.warnings,
        )

    def _stated_format(self, stated: str, format: str | None, role: str, shown: str,
                       field_name: str) -> str | None:
        """The format of a child whose ``json:`` reference states ``stated``, where the image
        asks for ``format``. A backing format recorded in the image wins, as in QEMU (whose
        ``bdrv_open_backing_file`` puts it into the options that the json: ones are merged
        under); a data file or extent that its reference calls another format is refused,
        as it is always read as it is."""
        if format is None:
            return stated
        if role != "backing" and stated not in ("raw", format):
            raise UnsupportedError(f"{role} file {shown!r} names format {stated!r}; a "
                                   f"{role} file is read as it is", path=self.path,
                                   field=field_name)
        return format

    def _child_error(self, exc: VdiskError, reference: str, path: str, role: str,
                     field_name: str) -> VdiskError:
        """``exc`` from opening the child's file, told from the referring image's side."""
        reference = redact_reference(reference)
        if exc.errno == errno.ENOENT:
            return FormatError(
                f"{role} file {reference!r} not found (looked for {path})",
                path=self.path,
                field=field_name,
            )
        where = repr(reference) if reference == path else f"{reference!r} ({path})"
        # The class and errno of the cause survive: a locked child is still a LockedError.
        return type(exc)(f"{role} file {where}: {exc.message}", path=self.path,
                         field=field_name, errno=exc.errno)


def _resolve_real(ctx: OpenContext, reference: str,
                  field_name: str) -> tuple[str, str, str | None]:
    """Where ``reference`` leads, its real path (a URL is its own), and the format that a
    ``json:`` reference states."""
    path, fmt = ctx.locate(reference, field_name=field_name)
    return path, path if url_scheme(path) is not None else os.path.realpath(path), fmt


async def run_blocking(fn: Callable[[], T]) -> T:
    """Run a file system call that may block for ever (a hung mount) in an abandonable thread.

    A cancelled caller (SIGTERM during ``vdiskfs mount``) returns at once; the thread finishes
    or dies with the process.
    """
    return await trio.to_thread.run_sync(fn, abandon_on_cancel=True)


async def _read_probe_bytes(file: BlockNode) -> tuple[bytes, bytes]:
    head = bytes(await file.pread(0, min(PROBE_HEAD, file.size)))
    tail_len = min(PROBE_TAIL, file.size)
    tail = bytes(await file.pread(file.size - tail_len, tail_len))
    return head, tail


async def _open_file(path: str, *, read_only: bool, locking: bool,
                     options: OpenOptions | None = None) -> BlockNode:
    """The protocol node of ``path``, open: a registered protocol's for a URL (under a
    ``cache`` filter unless ``options.cache`` is off), else the file (a regular file or block
    device, else refused)."""
    scheme = url_scheme(path)
    if scheme is not None:
        options = _with_read_only(options or OpenOptions(), read_only)
        node = await _PROTOCOLS[scheme](path, options)
        if not options.cache or scheme in _SELF_CACHED_SCHEMES:
            return node
        # Every request to a remote node is a round trip: a read cache sits under the format.
        from vdiskfs.drivers.filter.cache import CacheNode

        try:
            cache = CacheNode(node, cache_dir=options.cache_dir)
        except BaseException:
            await node.aclose()
            raise
        try:
            await cache.open()
        except BaseException:
            await cache.aclose()
            raise
        for message in cache.warnings:
            options.tell(message)
        return cache
    from vdiskfs.drivers.protocol.file import FileNode

    file = FileNode(path, read_only=read_only, locking=locking)
    await file.open()
    return file


async def _open_tree(
    file: BlockNode,
    *,
    real: str,
    options: OpenOptions,
    format: str | None,
    read_only: bool,
    chain: tuple[str, ...],
    warnings: list[str],
    snapshot: str | None = None,
) -> BlockNode:
    """The format tree above ``file`` (open; closed here on failure), whose real path is
    ``real``; at the internal ``snapshot`` when one is given (the top image only)."""
    path = file.label
    try:
        ctx = OpenContext(
            options=_with_read_only(options, read_only),
            path=path,
            chain=(*chain, real),
            warnings=warnings,
            url=real if url_scheme(real) is not None else None,
            snapshot=snapshot,
        )
        lock_warning = getattr(file, "lock_warning", None)
        if lock_warning is not None:
            ctx.warn(lock_warning)
        if format == PROTOCOL_ONLY:
            # The protocol node alone, without a format layer: what QEMU opens for the extent
            # files of a VMDK (bdrv_open_child with no format), which grow as grains are added.
            file.warnings = warnings
            return file
        if format is None:
            head, tail = await _read_probe_bytes(file)
            cls, _score = probe(head, tail, path)
            if cls.driver == "raw":
                ctx.warn(
                    f"{path}: image format was not specified and probing guessed raw; "
                    "give --format raw to silence this (a guest can write another format's "
                    "header into a raw disk)"
                )
        else:
            cls = get_driver(format)
        if snapshot is not None and not getattr(cls, "supports_snapshots", False):
            raise UnsupportedError(
                f"{cls.driver} images have no internal snapshots (asked for {snapshot!r})",
                path=path,
                field="snapshot",
            )
        if snapshot is not None and not read_only:
            raise UnsupportedError(
                f"snapshot {snapshot!r}: an internal snapshot opens read-only",
                path=path,
                field="snapshot",
                errno=errno.EROFS,
            )
        if not read_only and not getattr(cls, "supports_write", False):
            raise UnsupportedError(
                f"{cls.driver}: writing is not supported; open the image read-only",
                path=path,
                errno=errno.EROFS,
            )
        node = cls(file, ctx)
    except BaseException:
        await file.aclose()
        raise
    try:
        await node.open()
    except BaseException:
        # The format node owns the file child (and any child opened so far): close through it.
        await node.aclose()
        raise
    node.warnings = warnings
    return node


def _with_read_only(options: OpenOptions, read_only: bool) -> OpenOptions:
    return options if options.read_only == read_only else replace(options, read_only=read_only)


async def open_image(path: str, options: OpenOptions | None = None) -> BlockNode:
    """Open ``path`` as a tree: file protocol node, probed (or forced) format, its children.

    Raises :class:`~vdiskfs.errors.VdiskError` naming the file and field on any problem; an
    ``OSError`` from opening the top file is wrapped the same way.
    """
    options = options or OpenOptions()
    try:
        if url_scheme(path) is not None:
            real = path
        else:
            real = await run_blocking(lambda: os.path.realpath(path))
        file = await _open_file(path, read_only=options.read_only, locking=options.locking,
                                options=options)
        return await _open_tree(
            file,
            real=real,
            options=options,
            format=options.format,
            read_only=options.read_only,
            chain=(),
            warnings=[],
            snapshot=options.snapshot,
        )
    except VdiskError:
        raise
    except OSError as exc:
        raise HostIOError.wrap(exc, path, "cannot open") from exc
