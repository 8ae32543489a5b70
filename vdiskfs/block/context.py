"""Opening an image: the options a user gives, the context a format driver opens children with.

:func:`open_image` builds the whole tree: the protocol node (a file, or a registered protocol's
node for a URL, under a ``cache`` filter), the format the registry probes or is told, and every
child that format asks for. Format drivers never open files themselves: they ask the
:class:`OpenContext` for a child (backing file, external data file, extent), which resolves the
name relative to the parent image, enforces the path policy, detects loops and bounds the chain
depth.

This module sits above the registry (:mod:`vdiskfs.block.registry`, the table of drivers) and
below the format drivers, which import it for :class:`OpenContext`; the registry loads the
drivers by name only when a lookup needs them, so no import here leads back to this module.
"""

from __future__ import annotations

import errno
import logging
import os
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TypeVar

import trio

from vdiskfs.block.jsonref import parse_json_reference
from vdiskfs.block.node import BlockNode
from vdiskfs.block.registry import (
    PROBE_HEAD,
    PROBE_TAIL,
    PROTOCOL_ONLY,
    driver_names,
    get_driver,
    is_bare_scheme,
    is_network_name,
    looks_like_url,
    probe,
    protocol_opener,
    protocol_schemes,
    redact_reference,
    redact_url,
    url_scheme,
    wants_read_cache,
)
from vdiskfs.drivers.filter.cache import CacheNode
from vdiskfs.drivers.protocol.file import FileNode
from vdiskfs.errors import ChainError, FormatError, HostIOError, UnsupportedError, VdiskError

__all__ = ["OpenContext", "OpenOptions", "open_image", "run_blocking"]

log = logging.getLogger(__name__)

T = TypeVar("T")


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
        if self.url is not None and is_bare_scheme(url_scheme(self.url)):
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
        elif looks_like_url(reference):
            raise UnsupportedError(
                f"{shown!r}: this protocol reference is not supported (URLs: "
                f"{', '.join(f'{s}://' for s in protocol_schemes())}, and json:)",
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
        node = await protocol_opener(scheme)(path, options)
        if not options.cache or not wants_read_cache(scheme):
            return node
        # Every request to a remote node is a round trip: a read cache sits under the format.
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
