"""Protocol driver ``rbd``: an image of a Ceph cluster (RADOS Block Device) through librbd.

``rbd:POOL[/NAMESPACE]/IMAGE[@SNAP][:conf=FILE][:id=USER][:keyring=FILE]`` (:mod:`.spec`,
QEMU's syntax) opens with :func:`open_rbd`; a format (probed, or ``--format``) then opens on
top, as on a file: an image that ``rbd import`` filled with a qcow2 file is read by vdiskfs's
qcow2 driver.

librbd's own Python binding (Debian's ``python3-rbd``/``python3-rados``, which must match the
cluster's release) is imported at the first open, so that vdiskfs works without it. Connecting
and opening are blocking librados calls and run in a thread (:func:`run_blocking`). Requests use
librbd's asynchronous API (``aio_read``, ``aio_write``...): librbd runs them and calls back on
one of its own threads, which queues the result for the trio thread and touches nothing else;
one write to the node's eventfd wakes the waiting task that watches it for all the completions
queued until it runs (the ``wakeups`` counter) -- so any number of requests are in flight with
no thread per request, as QEMU's ``block/rbd.c`` does with its AIO completions.

A cancelled request is abandoned, not stopped (librbd cannot cancel one): the caller returns at
once, librbd still owns the buffer (the binding keeps a reference) and the late completion is
dropped. A cluster that does not answer gives ETIMEDOUT after ``rados_osd_op_timeout`` (30 s
here unless the conf file or the name sets it), never a hang; the same bound applies to reaching
the monitors at open (``client_mount_timeout``).

Writers: an image opened for writing takes librbd's exclusive lock and keeps it (``lock_acquire``
turns off the cooperative hand-over, so another client's write fails instead of stealing it);
another client that has the image open for writing -- a watcher, since read-only opens do not
watch -- or holds the lock makes the open fail with :class:`~vdiskfs.errors.LockedError`.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import trio

from vdiskfs.block.context import OpenOptions, run_blocking
from vdiskfs.block.node import (
    BlockNode,
    BlockStatus,
    Buffer,
    NodeKind,
    SnapshotEntry,
    opened,
)
from vdiskfs.block.registry import register_protocol
from vdiskfs.block.stats import Counters
from vdiskfs.drivers.protocol.rbd.spec import RbdSpec, parse_spec, snapshot_name
from vdiskfs.errors import HostIOError, LockedError, UnsupportedError, VdiskError

__all__ = ["RbdNode", "open_rbd"]

log = logging.getLogger(__name__)

#: Seconds librados waits for the monitors at connect and for an OSD per request, unless the
#: conf file or the name sets ``client_mount_timeout``/``rados_osd_op_timeout``: a cluster
#: that is gone gives an error, never a hang (librados's defaults are 300 s and for ever).
DEFAULT_TIMEOUT = 30

#: Longest range one ``diff_iterate`` call looks at for block status. With fast-diff it reads
#: the object map (a few bits per 4 MiB object), so this bounds only the work per call.
_STATUS_WINDOW = 1 << 30


@dataclass(slots=True)
class RbdCounters(Counters):
    """``requests``: librbd requests sent; ``max_requests_in_flight``: most of them waiting at
    once; ``abandoned``: requests whose caller was cancelled before librbd completed them;
    ``wakeups``: hand-overs of completions to the trio loop (one carries every completion
    that arrived while it was pending, so fewer than ``requests`` under load)."""

    requests: int = 0
    max_requests_in_flight: int = 0
    abandoned: int = 0
    wakeups: int = 0


class _ThreadFlag(threading.local):
    done = False


_pinned = _ThreadFlag()


def _pin_thread_state() -> None:
    """Keep the calling thread's Python thread state for good.

    librbd calls back on its own threads, and the binding takes the GIL there with
    ``PyGILState_Ensure``, which creates a thread state when the thread has none and deletes it
    again at the matching release: per completion a thread state, a 16 KiB frame stack mapped
    and unmapped, and a ``gettid``. One more ``PyGILState_Ensure``, never released, keeps the
    state: later callbacks only take the GIL. The thread state goes with the interpreter.
    """
    ctypes.pythonapi.PyGILState_Ensure()
    _pinned.done = True


@functools.cache
def _bindings() -> tuple[Any, Any]:
    try:
        import rados
        import rbd
    except ImportError as exc:
        raise UnsupportedError(
            f"rbd: needs python3-rbd and python3-rados (librbd's binding; scripts/setup.sh "
            f"installs them and shows them to the venv): {exc}", errno=errno.ENOTSUP) from None
    return rados, rbd


def _errno(exc: BaseException) -> int:
    err = getattr(exc, "errno", None)
    return abs(err) if isinstance(err, int) and err else errno.EIO


class _Request:
    """A librbd request in flight: the task that waits for it, and its completion's
    ``(return value, data)`` once delivered (:meth:`RbdNode._wait`)."""

    __slots__ = ("abandoned", "result", "task")

    def __init__(self, task: trio.lowlevel.Task) -> None:
        self.task = task
        self.result: tuple[int, Any] | None = None
        self.abandoned = False


class RbdNode(BlockNode):
    """An RBD image (or one of its snapshots, read-only). ``label`` is the name as given: it
    carries no secret (:func:`~.spec.parse_spec` refuses ``key=``)."""

    driver = "rbd"
    kind = NodeKind.PROTOCOL
    counters_class = RbdCounters
    counters: RbdCounters

    def __init__(self, name: str, *, read_only: bool = True,
                 view_of: RbdNode | None = None) -> None:
        super().__init__(read_only=read_only, label=name)
        #: The open image node whose snapshot this node shows (:meth:`open_snapshot`): its
        #: connection and pool are shared, and closed by it, not here.
        self._view_of = view_of
        self.spec: RbdSpec = parse_spec(name)
        if self.spec.snapshot is not None and not read_only:
            raise VdiskError(f"snapshot {self.spec.snapshot!r} is read-only; open the image "
                             "without @SNAP to write", path=name, errno=errno.EROFS)
        self._cluster: Any = None
        self._ioctx: Any = None
        self._image: Any = None
        self._in_flight = 0
        #: Completions that librbd's threads handed over and the trio thread has not delivered
        #: yet, and whether the event descriptor was written for them (both under
        #: ``_completed_lock``).
        self._completed: list[tuple[_Request, tuple[int, Any]]] = []
        self._delivery_pending = False
        self._completed_lock = threading.Lock()
        #: Written by librbd's threads when completions wait (:meth:`_wait`); closed once the
        #: image is closed, when librbd calls back no more.
        self._events = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        #: Whether a waiting task watches ``_events``, and the other waiting tasks.
        self._collecting = False
        self._waiting: set[_Request] = set()
        self._features = 0
        self._facts: dict[str, Any] = {}

    # -- life cycle ------------------------------------------------------------------------------

    def _error(self, exc: BaseException, what: str) -> VdiskError:
        """A librados/librbd error as a VdiskError naming the image, errno kept."""
        return HostIOError(f"{what}: {exc}", path=self.label, errno=_errno(exc))

    async def open(self) -> None:
        rados, rbd = _bindings()
        # Blocking librados calls (the monitors, the image header): in a thread that a
        # cancelled open abandons.
        parent = self._view_of
        if parent is not None:
            self._cluster, self._ioctx = parent._cluster, parent._ioctx
            await run_blocking(lambda: self._open_image(rbd))
            return
        await run_blocking(lambda: self._connect(rados, rbd))
        if not self.read_only:
            await run_blocking(lambda: self._lock(rbd))

    def _connect(self, rados: Any, rbd: Any) -> None:
        spec = self.spec
        # Defaults that the conf file, then the name's options, override.
        cluster = rados.Rados(rados_id=spec.user, conf_defaults={
            "client_mount_timeout": str(DEFAULT_TIMEOUT),
            "rados_osd_op_timeout": str(DEFAULT_TIMEOUT),
            "rados_mon_op_timeout": str(DEFAULT_TIMEOUT)})
        try:
            # Without conf=, librados's search path (CEPH_CONF, /etc/ceph...), whose absence
            # is no error: the name's options may say all (mon_host=...), as in QEMU.
            cluster.conf_read_file(spec.conf)
        except rados.Error as exc:
            if spec.conf is not None:
                cluster.shutdown()
                raise HostIOError(f"cannot read conf={spec.conf}: {exc}", path=self.label,
                                  field="conf", errno=_errno(exc)) from None
        options = list(spec.options)
        if spec.keyring is not None:
            options.append(("keyring", spec.keyring))
        for key, value in options:
            try:
                cluster.conf_set(key, value)
            except rados.Error as exc:
                cluster.shutdown()
                raise VdiskError(f"bad Ceph option {key}={value!r}: {exc}", path=self.label,
                                 field=key, errno=errno.EINVAL) from None
        self._cluster = cluster
        try:
            cluster.connect()
        except rados.Error as exc:
            err = _errno(exc)
            if err in (errno.ETIMEDOUT, errno.EINTR):
                raise HostIOError(f"cannot reach the cluster's monitors within "
                                  f"{cluster.conf_get('client_mount_timeout')} s "
                                  f"(mon host {cluster.conf_get('mon_host')!r})",
                                  path=self.label, errno=errno.ETIMEDOUT) from None
            if not cluster.conf_get("mon_host"):
                raise HostIOError("no monitor address: give conf=FILE (a ceph.conf), set "
                                  "CEPH_CONF, or give mon_host=ADDRESS", path=self.label,
                                  errno=err) from None
            raise self._error(exc, "cannot connect to the cluster") from None
        try:
            self._ioctx = cluster.open_ioctx(spec.pool)
        except rados.Error as exc:
            if _errno(exc) == errno.ENOENT:
                raise HostIOError(f"no pool {spec.pool!r} in the cluster", path=self.label,
                                  errno=errno.ENOENT) from None
            raise self._error(exc, f"cannot open pool {spec.pool!r}") from None
        if spec.namespace:
            self._ioctx.set_namespace(spec.namespace)
        self._open_image(rbd)

    def _open_image(self, rbd: Any) -> None:
        spec = self.spec
        try:
            self._image = rbd.Image(self._ioctx, spec.image, snapshot=spec.snapshot,
                                    read_only=self.read_only)
        except rbd.Error as exc:
            if _errno(exc) == errno.ENOENT:
                raise HostIOError(self._missing(rbd), path=self.label,
                                  errno=errno.ENOENT) from None
            raise self._error(exc, f"cannot open image {spec.where}") from None
        image = self._image
        self.size = image.size()
        self._features = image.features()
        stat = image.stat()
        self._facts = {
            "pool": spec.pool,
            "namespace": spec.namespace,
            "image": spec.image,
            "snapshot": spec.snapshot,
            "object_size": stat["obj_size"],
            "features": rbd.RBD().features_to_string(self._features).split(",")
            if self._features else [],
            "snapshots": self._snapshots(image),
        }

    def _missing(self, rbd: Any) -> str:
        """Why opening the image gave ENOENT: the image or its snapshot is missing."""
        spec = self.spec
        if spec.snapshot is not None:
            try:
                with rbd.Image(self._ioctx, spec.image, read_only=True) as head:
                    names = [snap["name"] for snap in head.list_snaps()]
            except rbd.Error:
                pass
            else:
                known = ", ".join(names) or "none"
                return f"image {spec.image!r} has no snapshot {spec.snapshot!r} (it has: {known})"
        ns = f" namespace {spec.namespace!r}" if spec.namespace else ""
        return f"no image {spec.image!r} in pool {spec.pool!r}{ns}"

    def internal_snapshots(self) -> list[SnapshotEntry]:
        """The image's snapshots (none when this node shows one of them already)."""
        if self.spec.snapshot is not None:
            return []
        return [SnapshotEntry(snap["id"], snap["name"], snap["size"])
                for snap in self._facts.get("snapshots", [])]

    async def open_snapshot(self, snapshot: str | int) -> BlockNode:
        """``rbd:POOL/IMAGE@SNAP`` over this node's connection (no second one to the
        monitors), chosen by position, ID or name (IDs first, as QEMU)."""
        snapshots = self.internal_snapshots()
        if isinstance(snapshot, int):
            found = snapshots[snapshot]
        else:
            matches = ([s for s in snapshots if s.id == snapshot]
                       or [s for s in snapshots if s.name == snapshot])
            if not matches:
                known = ", ".join(s.name for s in snapshots) or "none"
                raise VdiskError(f"image {self.spec.where} has no snapshot {snapshot!r} "
                                 f"(it has: {known})", path=self.label, field="snapshot",
                                 errno=errno.ENOENT)
            found = matches[0]
        return await opened(RbdNode(snapshot_name(self.label, found.name), view_of=self))

    @staticmethod
    def _snapshots(image: Any) -> list[dict[str, Any]]:
        snaps = []
        for snap in image.list_snaps():
            when = image.get_snap_timestamp(snap["id"])
            snaps.append({"id": str(snap["id"]), "name": snap["name"], "vm-state-size": 0,
                          "size": snap["size"], "date-sec": int(when.timestamp()),
                          "date-nsec": 0, "vm-clock-sec": 0, "vm-clock-nsec": 0})
        return snaps

    def _lock(self, rbd: Any) -> None:
        """Keep out every other writer, or refuse to open (see the module's docstring)."""
        image = self._image
        if not self._features & rbd.RBD_FEATURE_EXCLUSIVE_LOCK:
            self.lock_warning = (f"{self.label}: the image has no exclusive-lock feature, so "
                                 "another writer is not kept out")
            return
        # Our own open is one of the watchers: the others are other clients' writers.
        ours = self._cluster.get_instance_id()
        others = [w["addr"] for w in image.watchers_list() if w["id"] != ours]
        owners = [o["owner"] for o in image.lock_get_owners()]
        if others or owners:
            who = ", ".join(owners or others)
            raise LockedError(f"image {self.spec.where} is open for writing by another client "
                              f"({who}); refusing a second writer", path=self.label)
        try:
            image.lock_acquire(rbd.RBD_LOCK_MODE_EXCLUSIVE)
        except rbd.Error as exc:
            owners = [o["owner"] for o in image.lock_get_owners()]
            raise LockedError(f"image {self.spec.where}: cannot take the exclusive lock "
                              f"(held by {', '.join(owners) or 'another client'}): {exc}",
                              path=self.label) from None

    lock_warning: str | None = None

    async def _close(self) -> None:
        image, ioctx, cluster = self._image, self._ioctx, self._cluster
        self._image = self._ioctx = self._cluster = None
        if self._view_of is not None:
            ioctx = cluster = None  # the image node's, which closes them

        events, self._events = self._events, -1

        def close() -> None:
            # Image.close flushes librbd's cache, waits for requests still in flight and
            # releases the exclusive lock.
            try:
                if image is not None:
                    image.close()
                # librbd calls back no more: the descriptor its callbacks write can go (not
                # before: its number could be another file's by then).
                os.close(events)
            finally:
                if ioctx is not None:
                    ioctx.close()
                if cluster is not None:
                    cluster.shutdown()

        if image is None and cluster is None:
            os.close(events)
            return
        try:
            await run_blocking(close)
        except Exception as exc:
            raise self._error(exc, "closing the image") from None

    def info(self) -> dict[str, Any]:
        return {"filename": self.label, **self._facts}

    async def allocated_size(self) -> int:
        """Unknown without reading every object's size (QEMU reports it unavailable): 0."""
        return 0

    # -- librbd's asynchronous requests ----------------------------------------------------------

    async def _submit(self, what: str, offset: int, start: Callable[[Callable[..., None]], Any]
                      ) -> tuple[int, Any]:
        """Start a librbd request (``start(oncomplete)``) and wait for its completion: the
        ``(return value, data)`` it gave. A negative return value raises naming ``what``."""
        assert self._image is not None, "RbdNode used before open()"
        request = _Request(trio.lowlevel.current_task())

        def oncomplete(completion: Any, data: Any = None) -> None:
            # On a librados thread, maybe before start() returned: hand over, touch nothing
            # else. One write to the event descriptor per batch, not per completion: with
            # many requests in flight, completions arrive together.
            if not _pinned.done:
                _pin_thread_state()
            result = (completion.get_return_value(), data)
            with self._completed_lock:
                self._completed.append((request, result))
                if self._delivery_pending:
                    return
                self._delivery_pending = True
            os.eventfd_write(self._events, 1)

        _, rbd = _bindings()
        try:
            start(oncomplete)
        except rbd.Error as exc:
            raise self._error(exc, f"{what} at {offset}") from None
        self._in_flight += 1
        counters = self.counters
        counters.requests += 1
        if self._in_flight > counters.max_requests_in_flight:
            counters.max_requests_in_flight = self._in_flight
        ret, data = await self._wait(request)
        if ret < 0:
            err = -ret
            if err == errno.EROFS and not self.read_only:
                raise LockedError(f"{what} at {offset}: another client took the image's "
                                  "exclusive lock", path=self.label, errno=errno.EROFS)
            raise HostIOError(f"{what} at {offset}: {errno.errorcode.get(err, err)} "
                              f"({os.strerror(err)}) on image {self.spec.where}",
                              path=self.label, offset=offset, errno=err)
        return ret, data

    async def _wait(self, request: _Request) -> tuple[int, Any]:
        """Wait for ``request``'s completion. One waiting task at a time is the collector:
        it waits on the event descriptor and delivers every completion handed over, its own
        or not; the others sleep until theirs is delivered, or until the collector leaves and
        one of them must take over. At depth 1 the one request's own task is woken by the
        descriptor: no other task runs between librbd's callback and the reply (trio's
        ``run_sync_soon`` cost a wake-up socket and a pass of its entry-queue task)."""

        waiting = self._waiting

        def abort(_: Any) -> trio.lowlevel.Abort:
            # Out of the set at once: nobody may reschedule a task that is being cancelled.
            waiting.discard(request)
            return trio.lowlevel.Abort.SUCCEEDED

        try:
            while request.result is None:
                if self._collecting:
                    # Whoever wakes this task has taken it out of the set: the delivery, the
                    # collector that left (pop), or the abort.
                    waiting.add(request)
                    await trio.lowlevel.wait_task_rescheduled(abort)
                    continue
                self._collecting = True
                try:
                    await trio.lowlevel.wait_readable(self._events)
                finally:
                    self._collecting = False
                self._deliver_completed()
        finally:
            if request.result is None:  # cancelled: the completion is dropped when it comes
                request.abandoned = True
                self.counters.abandoned += 1
            # Leaving (done or cancelled) while others wait: one of them collects now.
            if not self._collecting and waiting:
                successor = waiting.pop()
                trio.lowlevel.reschedule(successor.task)
        result = request.result
        assert result is not None
        return result

    def _deliver_completed(self) -> None:
        """On the trio thread: deliver every completion handed over so far."""
        with contextlib.suppress(BlockingIOError):
            os.eventfd_read(self._events)
        with self._completed_lock:
            # A completion after this point writes the descriptor again.
            self._delivery_pending = False
            batch, self._completed = self._completed, []
        self.counters.wakeups += 1
        waiting = self._waiting
        for request, result in batch:
            self._in_flight -= 1
            if request.abandoned:
                continue
            request.result = result
            if request in waiting:
                waiting.discard(request)
                trio.lowlevel.reschedule(request.task)

    async def _pread(self, offset: int, length: int) -> Buffer:
        data: bytes | None  # what librbd hands a read's callback
        _, data = await self._submit(
            "read", offset, lambda cb: self._image.aio_read(offset, length, cb))
        if data is None or len(data) != length:
            got = 0 if data is None else len(data)
            raise HostIOError(f"read at {offset}: {got} of {length} bytes (the image shrank?)",
                              path=self.label, offset=offset, errno=errno.EIO)
        return data

    async def _pwrite(self, offset: int, data: Buffer) -> None:
        # The binding takes bytes only (not a memoryview): one copy, which it keeps alive
        # until librbd is done with it.
        payload = data if isinstance(data, bytes) else bytes(data)
        await self._submit("write", offset,
                           lambda cb: self._image.aio_write(payload, offset, cb))

    async def _flush(self) -> None:
        await self._submit("flush", 0, lambda cb: self._image.aio_flush(cb))

    async def _discard(self, offset: int, length: int) -> None:
        await self._submit("discard", offset,
                           lambda cb: self._image.aio_discard(offset, length, cb))

    async def _zero(self, offset: int, length: int, may_unmap: bool) -> None:
        _, rbd = _bindings()
        # As QEMU: without may_unmap the range stays allocated (thick-provisioned zeros).
        flags = 0 if may_unmap else rbd.RBD_WRITE_ZEROES_FLAG_THICK_PROVISION
        await self._submit("write-zeroes", offset, lambda cb: self._image.aio_write_zeroes(
            offset, length, cb, zero_flags=flags))

    async def _block_status(self, offset: int, length: int) -> tuple[BlockStatus, int]:
        """From librbd's diff iteration over the object map, as QEMU's
        ``qemu_rbd_co_block_status``: whole objects, the parent image included; an object
        never written reads as zeros. Without a valid fast-diff map everything is data."""
        _, rbd = _bindings()
        data = BlockStatus.DATA | BlockStatus.ALLOCATED
        if not self._features & rbd.RBD_FEATURE_FAST_DIFF:
            return data, length
        image = self._image
        window = min(length, _STATUS_WINDOW)

        def extents() -> list[tuple[int, int]] | None:
            if image.flags() & rbd.RBD_FLAG_FAST_DIFF_INVALID:
                return None
            found: list[tuple[int, int]] = []

            def seen(start: int, size: int, exists: bool) -> None:
                if exists:
                    found.append((start, size))

            image.diff_iterate(offset, window, None, seen, include_parent=True,
                               whole_object=True)
            return found

        try:
            found = await run_blocking(extents)
        except rbd.Error as exc:
            raise self._error(exc, f"block status at {offset}") from None
        if found is None:
            return data, length
        end = offset + window
        runs = sorted((max(start, offset), min(start + size, end)) for start, size in found
                      if start + size > offset and start < end)
        if not runs:
            return BlockStatus.ZERO | BlockStatus.ALLOCATED, window
        if runs[0][0] > offset:
            return BlockStatus.ZERO | BlockStatus.ALLOCATED, runs[0][0] - offset
        run_end = runs[0][1]
        for start, stop in runs[1:]:  # adjacent extents make one run of data
            if start > run_end:
                break
            run_end = max(run_end, stop)
        return data, run_end - offset


# No read cache filter over it: librbd reads ahead on sequential reads itself, and the filter's
# 256 KiB block fetches cost more than they save on a cluster a LAN away. Measured with
# scripts/bench/rbd.py (2 cores, loaded): with the filter, 4 KiB random reads at qd1 and qd16
# went at 0.20-0.24x and 0.08-0.11x of QSD's rbd driver and 1 MiB sequential ones at
# 0.40-0.68x; without it, 0.77-1.00x, 0.25x and 0.72-1.09x.
@register_protocol("rbd", bare=True, read_cache=False)
async def open_rbd(name: str, options: OpenOptions) -> BlockNode:
    """Open the RBD image that ``name`` (``rbd:POOL/IMAGE...``) names."""
    node = await opened(RbdNode(name, read_only=options.read_only))
    if node.lock_warning is not None:
        # Said here rather than by the tree's context: the read cache sits between the two.
        options.tell(node.lock_warning)
    return node
