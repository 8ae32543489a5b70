"""``vdiskfs mount``: open every image, build the exports, serve them until unmounted.

Like other FUSE tools, ``mount`` returns once the mount is ready and leaves a daemon behind.
The daemon is a fresh ``python -m vdiskfs mount --foreground`` process (not a fork of a process
that may already run trio or threads); it reports back on a pipe: ``W <text>`` for a warning,
``E <text>`` for the error that stopped it, ``R`` once the mount is ready. So every problem
in opening an image reaches the user's terminal, with a non-zero exit, before anything is
mounted.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import trio

from vdiskfs.block.node import BlockNode
from vdiskfs.block.registry import OpenOptions, open_image
from vdiskfs.drivers.format.raw import RawNode
from vdiskfs.errors import VdiskError
from vdiskfs.fs.mount import serve, terminate
from vdiskfs.fs.operations import VdiskOperations
from vdiskfs.fs.tree import Export
from vdiskfs.overlay import open_overlay

__all__ = ["MountRequest", "image_stem", "open_exports", "run_foreground", "spawn_daemon"]

log = logging.getLogger(__name__)


@dataclass
class MountRequest:
    images: list[str]
    mountpoint: str
    format: str | None = None
    writable: bool = False
    #: A qcow2 file that takes the writes; the single IMAGE becomes its read-only backing file.
    overlay: str | None = None
    partitions: bool = True
    allow_other: bool = False
    follow_outside: bool = True
    debug: bool = False


def image_stem(path: str) -> str:
    """``debian.qcow2`` -> ``debian``: the file name without its last extension."""
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
                f"{path}: would appear as {stem}.raw, like {stems[stem]}; "
                "rename or link one of them"
            )
        stems[stem] = path
    options = OpenOptions(
        read_only=not request.writable,
        format=request.format,
        follow_outside=request.follow_outside,
        warn=warn,
    )
    if request.overlay is not None and len(request.images) != 1:
        raise VdiskError("--overlay takes exactly one IMAGE")
    roots: list[BlockNode] = []
    exports: list[Export] = []
    try:
        for path in request.images:
            if request.overlay is not None:
                node = await open_overlay(path, request.overlay, options)
            else:
                node = await open_image(path, options)
            roots.append(node)
            writable = request.writable or request.overlay is not None
            exports.append(Export(image_stem(path), node, writable=writable))
        if request.partitions:
            exports = await _with_partitions(exports, warn)
    except BaseException:
        await close_all(roots)
        raise
    return exports, roots


async def _with_partitions(
    exports: list[Export], warn: Callable[[str], None] | None
) -> list[Export]:
    """Add a ``<stem>-part<N>`` export after each disk that has a partition table.

    Each partition is a raw window onto the disk's node (not owned: closing the disk closes
    what it needs), in the disk's mode.
    """
    from vdiskfs.partitions import scan_disk

    out: list[Export] = []
    for export in exports:
        out.append(export)
        table = await scan_disk(export.node, warn)
        for part in table.partitions:
            window = RawNode(export.node, offset=part.start, size=part.size, owned=False)
            await window.open()
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
        exports, roots = await open_exports(request, warn)
        try:
            operations = VdiskOperations(exports)
            async with trio.open_nursery() as nursery:

                async def serve_then_stop(task_status: trio.TaskStatus[None]) -> None:
                    try:
                        await serve(
                            operations,
                            mountpoint,
                            read_only=not (request.writable or request.overlay),
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


def spawn_daemon(argv: list[str], log_file: str | None) -> int:
    """Start ``vdiskfs mount --foreground`` in the background; relay its report; exit status.

    ``argv`` are the mount arguments without ``--foreground``.
    """
    read_fd, write_fd = os.pipe()
    stderr = open(log_file, "ab") if log_file else subprocess.DEVNULL  # noqa: SIM115
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "vdiskfs", "mount", "--foreground",
             f"--ready-fd={write_fd}", *argv],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            pass_fds=(write_fd,),
            start_new_session=True,
        )
    finally:
        os.close(write_fd)
        if stderr is not subprocess.DEVNULL:
            stderr.close()
    ready = reported = False
    with os.fdopen(read_fd, "r", errors="replace") as report:
        for line in report:
            kind, _, text = line.rstrip("\n").partition(" ")
            if kind == "R":
                ready = True
                break
            reported |= kind == "E"
            print(f"vdiskfs: {'warning: ' if kind == 'W' else ''}{text}", file=sys.stderr)
    if ready:
        return 0
    status = proc.wait()
    if status == 0 or not reported:
        hint = f"; see {log_file}" if log_file else "; run with --foreground to see why"
        print(f"vdiskfs: the daemon exited with status {status} before mounting{hint}",
              file=sys.stderr)
    return status or 1
