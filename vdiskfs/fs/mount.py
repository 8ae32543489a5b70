"""Mounting and unmounting: the FUSE session around a :class:`VdiskOperations`.

vdiskfs's own session (:mod:`.session`) serves by default; ``VDISKFS_FUSE=pyfuse3`` serves
through pyfuse3's instead, for comparisons. One process serves one mount (pyfuse3 keeps one
session per process; the daemon never needs more). The source field of the
mount (``fsname``) is ``vdiskfs:<pid>``: ``vdiskfs unmount`` reads it from
``/proc/self/mountinfo`` to wait for that daemon to finish closing the images (flushes, the
qcow2 dirty bit) before it returns.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import subprocess
import time
from dataclasses import dataclass

import pyfuse3
import trio

from vdiskfs.errors import VdiskError
from vdiskfs.fs.capabilities import pyfuse3_has_init_limits, pyfuse3_has_lseek_fallocate
from vdiskfs.fs.operations import VdiskOperations
from vdiskfs.fs.session import FSTYPE, FuseSession

__all__ = ["MountInfo", "find_mount", "process_alive", "serve", "unmount"]

log = logging.getLogger(__name__)

#: Concurrent FUSE requests in flight (worker tasks of either session): a queue depth of 64
#: reaches the stack whole. Each worker holds a receive buffer of up to 1 MiB (a write's
#: payload), so this also bounds what the kernel can make the daemon hold.
#:
#: The kernel sends a FUSE daemon at most ``max_background`` asynchronous requests (reads ahead,
#: O_DIRECT aio) at once, 12 by default: a queue depth of 16 or 64 would reach the daemon as 12.
#: ``VdiskOperations.max_background`` raises it to the number of workers, with its
#: ``congestion_threshold`` at the kernel's own ratio (3/4). The patched pyfuse3 sets both at
#: FUSE INIT; with an unpatched one they are written into the connection's fusectl files after
#: mounting. ``max_write`` and ``max_readahead`` stay libfuse's: INIT can only lower them (the
#: readahead is raised afterwards: READAHEAD_KB). libfuse already proposes its whole 1 MiB
#: buffer as max_write and derives the largest read request from it. A 256 MiB raw image,
#: ``dd bs=4M`` with O_DIRECT (writes best of 3, 2026-12-03): max_write 1 MiB wrote 950 MB/s
#: and read 3.1 GB/s, 256 KiB 735 MB/s and 1.8 GB/s, 128 KiB 520 MB/s and 1.2 GB/s.
MAX_TASKS = 64
FUSECTL = "/sys/fs/fuse/connections"
#: Readahead of the mount's backing device info. The kernel's default, 128 KiB, makes a
#: sequential reader (cat, dd, a loop device) send 128 KiB requests, and each request costs
#: this Python daemon far more than its bytes do; with 4 MiB the kernel sends 1 MiB requests
#: (libfuse's max_pages) ahead of the reader. Measured on a 3-layer qcow2 chain
#: (scripts/bench/read.py): 401 MB/s at 128 KiB, 637 at 1 MiB, 772 at 4 MiB. Random readers
#: are not affected: the kernel stops reading ahead for them.
READAHEAD_KB = 4096
#: The session being served (one per process), for :func:`terminate`.
_session: FuseSession | None = None


async def serve(
    operations: VdiskOperations,
    mountpoint: str,
    *,
    read_only: bool = True,
    allow_other: bool = False,
    debug: bool = False,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Mount ``operations`` at ``mountpoint`` and serve until unmounted or cancelled.

    ``task_status.started()`` fires once the kernel has the mount, so
    ``await nursery.start(serve, ...)`` returns when the files can be opened. On return or
    cancellation the file system is unmounted (lazily if it is still busy).
    """
    global _session
    mountpoint = os.path.abspath(mountpoint)  # no stat: see _raise_readahead
    if os.environ.get("VDISKFS_FUSE") == "pyfuse3":
        await _serve_with_pyfuse3(operations, mountpoint, read_only=read_only,
                                  allow_other=allow_other, debug=debug, task_status=task_status)
        return
    session = FuseSession(operations, mountpoint, read_only=read_only, allow_other=allow_other,
                          debug=debug, max_workers=MAX_TASKS)
    session.mount()
    _session = session
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_tune_after_init, operations, mountpoint, True)
            task_status.started()
            await session.serve()
            nursery.cancel_scope.cancel()
    finally:
        _session = None
        session.close()


async def _serve_with_pyfuse3(
    operations: VdiskOperations,
    mountpoint: str,
    *,
    read_only: bool,
    allow_other: bool,
    debug: bool,
    task_status: trio.TaskStatus[None],
) -> None:
    """:func:`serve` through pyfuse3's session (libfuse's loop): kept for comparisons."""
    options = set(pyfuse3.default_options)
    options |= {f"fsname=vdiskfs:{os.getpid()}", "subtype=vdiskfs", "noatime"}
    if read_only:
        options.add("ro")
    if allow_other:
        options.add("allow_other")
    if debug:
        options.add("debug")
    if not pyfuse3_has_lseek_fallocate():
        _note_unpatched_pyfuse3()
    pyfuse3.init(operations, mountpoint, options)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_tune_after_init, operations, mountpoint,
                               pyfuse3_has_init_limits())
            task_status.started()
            await pyfuse3.main(min_tasks=1, max_tasks=MAX_TASKS)
            nursery.cancel_scope.cancel()
    finally:
        pyfuse3.close(unmount=True)


async def _tune_after_init(operations: VdiskOperations, mountpoint: str,
                           limits_set_at_init: bool) -> None:
    # The kernel's FUSE INIT reply sets the readahead (to at most what the kernel proposed, its
    # 128 KiB default) and the connection's limits; pyfuse3 calls Operations.init() while
    # handling INIT and sends the reply before any other task runs, so by the time this task
    # wakes the reply has been applied and can be overridden.
    await operations.initialized.wait()
    info = find_mount(mountpoint, resolve=False)
    if info is None or info.device is None:
        return
    _raise_readahead(info.device)
    if not limits_set_at_init:
        _raise_max_background(info.device, operations)


@functools.cache
def _note_unpatched_pyfuse3() -> None:
    log.info(
        "pyfuse3 %s has no lseek and fallocate handlers (scripts/setup.sh builds it with "
        "vdiskfs's patch): holes (SEEK_DATA/SEEK_HOLE) and discard (fallocate) are unavailable",
        pyfuse3.__version__,
    )


def _write_setting(path: str, value: int) -> bool:
    try:
        with open(path, "w") as f:
            f.write(f"{value}\n")
    except OSError as exc:
        log.debug("cannot set %s: %s", path, exc)
        return False
    return True


def _raise_readahead(device: str) -> None:
    """Set READAHEAD_KB on the mount's own bdi (root only; otherwise the default stays).

    ``device`` is ``major:minor`` from mountinfo: stat() of the mount point would send this
    very process a FUSE request that nobody serves yet.
    """
    _write_setting(f"/sys/class/bdi/{device}/read_ahead_kb", READAHEAD_KB)


def _raise_max_background(device: str, operations: VdiskOperations) -> None:
    """Write the operations' ``max_background`` and ``congestion_threshold`` into the
    connection's fusectl files (root only), for a pyfuse3 that does not set them at INIT.

    fusectl names a connection by its device number, which for FUSE's anonymous devices is
    the minor number; it is mounted here when nothing has mounted it yet (Debian does not).
    """
    if operations.max_background is None:
        return
    directory = os.path.join(FUSECTL, device.partition(":")[2])
    if not os.path.isdir(directory) and os.path.isdir(FUSECTL):
        subprocess.run(["mount", "-t", "fusectl", "fusectl", FUSECTL], capture_output=True)
    # max_background first: the threshold may not exceed it on older kernels.
    if (_write_setting(os.path.join(directory, "max_background"), operations.max_background)
            and operations.congestion_threshold is not None):
        _write_setting(os.path.join(directory, "congestion_threshold"),
                       operations.congestion_threshold)


def terminate() -> None:
    """End :func:`serve` gracefully from the trio thread (a signal handler task)."""
    if _session is not None:
        _session.terminate()
    else:
        pyfuse3.terminate()


@dataclass(frozen=True)
class MountInfo:
    mountpoint: str
    source: str
    fstype: str
    #: ``major:minor`` of the mounted file system, as mountinfo gives it.
    device: str | None = None

    @property
    def daemon_pid(self) -> int | None:
        prefix = "vdiskfs:"
        if self.source.startswith(prefix) and self.source[len(prefix) :].isdigit():
            return int(self.source[len(prefix) :])
        return None


def _unescape(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo.
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and i + 3 < len(field) and field[i + 1 : i + 4].isdigit():
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def find_mount(mountpoint: str, *, resolve: bool = True) -> MountInfo | None:
    """The mount at ``mountpoint``, or None.

    ``resolve=False`` takes an absolute path as it is: resolving it stats the mount's root,
    which from inside the daemon, before it serves, would wait for itself forever.
    """
    target = os.path.realpath(mountpoint) if resolve else mountpoint
    try:
        with open("/proc/self/mountinfo") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    found = None
    for line in lines:
        left, _, right = line.partition(" - ")
        fields = left.split()
        rest = right.split()
        if len(fields) < 5 or len(rest) < 2:
            continue
        if _unescape(fields[4]) == target:
            # The last matching line is the mount on top.
            found = MountInfo(target, _unescape(rest[1]), rest[0], fields[2])
    return found


def unmount(mountpoint: str, *, lazy: bool = False, timeout: float = 60.0) -> None:
    """Unmount a vdiskfs mount and wait until its daemon has closed the images."""
    info = find_mount(mountpoint)
    if info is None:
        raise VdiskError(f"{mountpoint}: not mounted", errno=errno.EINVAL)
    if info.fstype != FSTYPE:
        raise VdiskError(
            f"{mountpoint}: not a vdiskfs mount (it is {info.fstype})", errno=errno.EINVAL
        )
    args = ["fusermount3", "-u"] + (["-z"] if lazy else []) + [info.mountpoint]
    proc = subprocess.run(args, capture_output=True, text=True)
    if proc.returncode != 0:
        message = proc.stderr.strip() or f"fusermount3 exited with {proc.returncode}"
        raise VdiskError(f"{mountpoint}: {message}", errno=errno.EBUSY)
    pid = info.daemon_pid
    if pid is None or pid == os.getpid():
        return
    deadline = time.monotonic() + timeout
    while process_alive(pid):
        if time.monotonic() > deadline:
            raise VdiskError(
                f"{mountpoint}: unmounted, but daemon {pid} is still closing the images after "
                f"{timeout:.0f} s",
                errno=errno.EBUSY,
            )
        time.sleep(0.02)


def process_alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie no longer counts: its parent may never reap it)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rpartition(")")[2].split()[0]
    except OSError:
        return False
    return state != "Z"
