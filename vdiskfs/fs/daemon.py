"""``vdiskfs mount``: open every image, build the exports, serve them until unmounted.

Like other FUSE tools, ``mount`` returns once the mount is ready and leaves a daemon behind.
The daemon is a fresh ``python -m vdiskfs mount --foreground`` process (not a fork of a process
that may already run trio or threads); it reports back on a pipe: ``W <text>`` for a warning,
``E <text>`` for the error that stopped it, ``R`` once the mount is ready. So every problem
in opening an image reaches the user's terminal, with a non-zero exit, before anything is
mounted.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import select
import signal
import subprocess
import sys
import time
import urllib.parse
from collections.abc import AsyncIterator, Callable, Iterator, Sequence

import trio

from vdiskfs.block.context import open_image
from vdiskfs.block.node import BlockNode
from vdiskfs.block.registry import redact_url, url_scheme
from vdiskfs.drivers.filter.throttle import ThrottleGroups, throttled
from vdiskfs.drivers.filter.throttle_buckets import parse_throttle
from vdiskfs.drivers.protocol.rbd.spec import parse_spec
from vdiskfs.errors import VdiskError
from vdiskfs.fs.mount import serve, terminate
from vdiskfs.fs.operations import VdiskOperations
from vdiskfs.fs.tree import Export, snapshot_file_names
from vdiskfs.mountargs import MountRequest
from vdiskfs.overlay import open_overlay
from vdiskfs.partitions import open_window, scan_disk

__all__ = ["MountRequest", "image_stem", "open_exports", "run_foreground", "spawn_daemon"]

log = logging.getLogger(__name__)

#: Seconds that closing the images opened so far may take when opening the rest failed or was
#: interrupted.
CLOSE_TIMEOUT = 5.0
#: Seconds the daemon gets to end after SIGTERM before it is killed.
TERM_GRACE = 3.0


def image_stem(path: str) -> str:
    """``debian.qcow2`` -> ``debian``: the file name without its last extension; for a URL,
    its path's last component without the extension (``https://h/d/x.qcow2?s=1`` -> ``x``),
    or the host when the path has none; for an RBD image, its name and snapshot
    (``rbd:pool/vm@s1:conf=F`` -> ``vm@s1``)."""
    scheme = url_scheme(path)
    if scheme == "rbd":
        return parse_spec(path).stem  # rbd:pool/img@snap -> img@snap
    if scheme is not None:
        parts = urllib.parse.urlsplit(path)
        name = urllib.parse.unquote(parts.path.rstrip("/").rpartition("/")[2])
        name = name.replace("/", "_").replace("\0", "_")
        if name in ("", ".", ".."):
            return parts.hostname or "disk"
        return os.path.splitext(name)[0] or name
    return os.path.splitext(os.path.basename(path))[0] or os.path.basename(path)


async def open_exports(
    request: MountRequest, warn: Callable[[str], None] | None = None
) -> tuple[list[Export], list[BlockNode]]:
    """Open every image of ``request``; returns the exports and the roots to close.

    On any error everything opened so far is closed and the error propagates.
    """
    stems: dict[str, str] = {}
    for path in request.images:
        stem = image_stem(path)
        if stem in stems:
            raise VdiskError(
                f"{redact_url(path)}: would appear as {stem}.raw, like "
                f"{redact_url(stems[stem])}; rename or link one of them"
            )
        stems[stem] = path
    options = request.remote.open_options(
        read_only=not request.writable,
        format=request.format,
        follow_outside=request.follow_outside,
        warn=warn,
    )
    if request.overlay is not None and len(request.images) != 1:
        raise VdiskError("--overlay takes exactly one IMAGE")
    throttle = None if request.throttle is None else parse_throttle(request.throttle)
    # The mount's own groups: its images share a budget only when they name one.
    groups = ThrottleGroups()
    roots: list[BlockNode] = []
    exports: list[Export] = []
    try:
        for path in request.images:
            if request.overlay is not None:
                top = await open_overlay(path, request.overlay, options)
            else:
                top = await open_image(path, options)
            node = top
            if throttle is not None:
                # At the top of the image's tree, as QEMU puts its throttle filter: the
                # partition windows above it share the disk's budget.
                node = await throttled(top, groups, throttle, image_stem(path))
            roots.append(node)
            writable = request.writable or request.overlay is not None
            exports.append(Export(image_stem(path), node, writable=writable))
            if request.show_snapshots:
                # The snapshots of IMAGE: under --overlay, the overlay's backing node.
                image = top.child("backing") if request.overlay is not None else top
                views = await _snapshot_exports(image_stem(path), image, set(stems))
                if throttle is not None:
                    # They read the image's files: the image's budget (the same group,
                    # the same limits: joining it cannot fail).
                    for view in views:
                        view.node = await throttled(view.node, groups, throttle,
                                                    image_stem(path))
                exports += views
                # Views read through their image's nodes: closed before it.
                roots[-1:-1] = [view.node for view in views]
        if request.partitions:
            exports = await _with_partitions(exports, warn)
    except BaseException:
        # Shielded, so that a SIGTERM during the open still closes (and flushes) what opened;
        # bounded, so that a close on a hung file system cannot keep the process for ever.
        with trio.CancelScope(shield=True, deadline=trio.current_time() + CLOSE_TIMEOUT):
            await close_all(roots)
        raise
    return exports, roots


async def _snapshot_exports(stem: str, image: BlockNode | None,
                            taken: set[str]) -> list[Export]:
    """A read-only ``<stem>@<name>`` export for every snapshot of ``image``: a qcow2's
    internal ones, or its protocol's (an RBD image's) through a format without its own.

    They stay read-only whatever the mount's mode: a write to the image never changes what
    they show, because the writer copies clusters that a snapshot shares (refcount > 1), and
    librbd copies an object on its first write after a snapshot.
    """
    if image is None:
        return []
    snapshots = image.internal_snapshots()
    exports: list[Export] = []
    try:
        for index, name in enumerate(snapshot_file_names(stem, snapshots, taken)):
            # By position, not by ID or name: either may be duplicated in a damaged table.
            view = await image.open_snapshot(index)
            exports.append(Export(name, view, writable=False))
    except BaseException:
        for export in exports:
            await export.node.aclose()
        raise
    return exports


async def _with_partitions(
    exports: list[Export], warn: Callable[[str], None] | None
) -> list[Export]:
    """Add a ``<stem>-part<N>`` export after each disk that has a partition table.

    Each partition is an offset filter onto the disk's node (not owned: closing the disk
    closes what it needs), in the disk's mode.
    """

    out: list[Export] = []
    for export in exports:
        out.append(export)
        table = await scan_disk(export.node, warn)
        for part in table.partitions:
            window = await open_window(export.node, part)
            out.append(
                Export(f"{export.name}-part{part.number}", window, writable=export.writable)
            )
    return out


async def close_all(roots: Sequence[BlockNode]) -> None:
    """Close every tree, flushing writable ones; the first error is raised after all closed."""
    first: BaseException | None = None
    for node in roots:
        try:
            await node.aclose()
        except BaseException as exc:  # keep closing the others
            log.error("closing %s: %s", node.label, exc)
            first = first or exc
    if first is not None:
        raise first


async def run_foreground(
    request: MountRequest,
    *,
    ready: Callable[[], None] = lambda: None,
    warn: Callable[[str], None] | None = None,
) -> None:
    """Open, mount, serve until unmounted or signalled (SIGINT/SIGTERM/SIGHUP), close."""
    mountpoint = os.path.abspath(request.mountpoint)
    if not os.path.isdir(mountpoint):
        raise VdiskError(
            f"{request.mountpoint}: mount point is not a directory", errno=errno.ENOTDIR
        )
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
        exports, roots = await _open_unless_signalled(request, warn, signals)
        try:
            operations = VdiskOperations(exports)
            async with trio.open_nursery() as nursery:

                async def serve_then_stop(task_status: trio.TaskStatus[None]) -> None:
                    try:
                        await serve(
                            operations,
                            mountpoint,
                            # A throttle's control file is written while mounted, so the
                            # mount is not "ro" then; every image file stays read-only.
                            read_only=not (request.writable or request.overlay
                                           or request.throttle),
                            allow_other=request.allow_other,
                            debug=request.debug,
                            task_status=task_status,
                        )
                    finally:
                        nursery.cancel_scope.cancel()

                await nursery.start(serve_then_stop)
                log.info("mounted %d file(s) at %s", len(exports), mountpoint)
                ready()
                async for signum in signals:
                    log.info("%s: unmounting", signal.Signals(signum).name)
                    terminate()
                    break
                # Serving ends when the mount goes away; then the nursery is cancelled.
                await trio.sleep_forever()
        finally:
            with trio.CancelScope(shield=True):
                await close_all(roots)
    log.info("closed all images")


async def _open_unless_signalled(
    request: MountRequest,
    warn: Callable[[str], None] | None,
    signals: AsyncIterator[int],
) -> tuple[list[Export], list[BlockNode]]:
    """:func:`open_exports`, given up at the first signal.

    Opening can wait on a hung file system (an image or a file it names on a stopped FUSE
    mount, an unreachable NFS server). Such waits happen in abandonable threads (the file
    protocol's open), so the event loop still runs this watcher: SIGTERM ends the mount within
    a second instead of never.
    """
    signalled: int | None = None
    opened: tuple[list[Export], list[BlockNode]] | None = None
    failure: Exception | None = None
    opening = trio.CancelScope()
    async with trio.open_nursery() as nursery:

        async def watch() -> None:
            nonlocal signalled
            async for signum in signals:
                signalled = signum
                opening.cancel()
                return

        nursery.start_soon(watch)
        try:
            with opening:
                opened = await open_exports(request, warn)
        except Exception as exc:
            # Raised below, outside the nursery, so that it is not wrapped in an ExceptionGroup
            # and reaches the user as the one-line error it is.
            failure = exc
        nursery.cancel_scope.cancel()
    if failure is not None:
        raise failure
    if signalled is None:
        assert opened is not None
        return opened
    if opened is not None:  # the signal came just as the last image opened
        with trio.CancelScope(shield=True):
            await close_all(opened[1])
    name = signal.Signals(signalled).name
    log.info("%s while opening the images: not mounting", name)
    raise VdiskError(f"{name} while opening the images: gave up, nothing mounted",
                     errno=errno.EINTR)


def spawn_daemon(argv: list[str], log_file: str | None, timeout: float | None, *,
                 stdin: bytes | None = None) -> int:
    """Start ``vdiskfs mount --foreground`` in the background; relay its report; exit status.

    ``argv`` are the mount arguments without ``--foreground``; ``stdin``, when given, is
    written to the daemon's standard input (else it reads /dev/null). A daemon that has not mounted
    after ``timeout`` seconds (None: no limit) is stopped -- SIGTERM, which it obeys even while
    an open waits on a hung file system, then SIGKILL -- and the mount fails with a message,
    rather than the command waiting for ever.
    """
    read_fd, write_fd = os.pipe()
    log = open(log_file, "ab") if log_file else None  # noqa: SIM115
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "vdiskfs", "mount", "--foreground",
             f"--ready-fd={write_fd}", *argv],
            stdin=subprocess.DEVNULL if stdin is None else subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL if log is None else log,
            pass_fds=(write_fd,),
            start_new_session=True,
        )
    finally:
        os.close(write_fd)
        if log is not None:
            log.close()
    if stdin is not None:
        assert proc.stdin is not None
        # Small: it fits the pipe, so this never waits for the daemon. A daemon that died
        # already has its report read below.
        with contextlib.suppress(BrokenPipeError), proc.stdin:
            proc.stdin.write(stdin)
    ready = reported = timed_out = False
    deadline = None if timeout is None else time.monotonic() + timeout
    try:
        for line in _report_lines(read_fd, deadline):
            kind, _, text = line.partition(" ")
            if kind == "R":
                ready = True
                break
            reported |= kind == "E"
            print(f"vdiskfs: {'warning: ' if kind == 'W' else ''}{text}", file=sys.stderr)
    except TimeoutError:
        timed_out = True
    finally:
        os.close(read_fd)
    if ready:
        return 0
    if timed_out:
        _stop(proc)
        print(f"vdiskfs: the daemon did not mount within {timeout:g} s (is an image, or a file "
              "it names, on a hung file system?); stopped it, nothing mounted",
              file=sys.stderr)
        return 1
    status = proc.wait()
    if status == 0 or not reported:
        hint = f"; see {log_file}" if log_file else "; run with --foreground to see why"
        print(f"vdiskfs: the daemon exited with status {status} before mounting{hint}",
              file=sys.stderr)
    return status or 1


def _report_lines(fd: int, deadline: float | None) -> Iterator[str]:
    """The daemon's report lines until it closes the pipe; TimeoutError past ``deadline``."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    pending = b""
    while True:
        wait_ms = None
        if deadline is not None:
            wait_ms = max(0, int((deadline - time.monotonic()) * 1000))
        if not poller.poll(wait_ms):
            raise TimeoutError
        chunk = os.read(fd, 4096)
        if not chunk:
            return
        pending += chunk
        *lines, pending = pending.split(b"\n")
        for line in lines:
            yield line.decode(errors="replace")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM the daemon; SIGKILL it if it has not ended after :data:`TERM_GRACE`."""
    proc.terminate()
    try:
        proc.wait(TERM_GRACE)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
