#!/usr/bin/env python3
"""RBD reads without FUSE: vdiskfs's rbd node (the official binding) against librbd's C API.

What a 4 KiB random read costs below the FUSE layer, in one process, on the throwaway cluster
of the tests (tests/support/ceph.py), in two ways, interleaved:

  node    vdiskfs's stack as a mount opens it (``open_image(rbd:rbd/IMAGE...)``, format raw):
          the rbd node's ``aio_read`` through librbd's Python binding, whose completion runs a
          Python callback on librbd's thread under the GIL, handed to trio by the eventfd
  c-api   librbd's C API through ctypes, with no Python on librbd's threads: the image's
          own event notification (``rbd_set_image_notification`` with an eventfd) and
          ``rbd_poll_io_events`` on the trio thread -- the path the issue's "official binding"
          rules out, measured to know what it would give

at queue depth 1 and 16 (that many trio tasks reading), printing reads per second and the
process's CPU per read (every thread, librbd's included): medians of --repeat runs. With
scripts/bench/rbd.py's FUSE figures it splits a mount's CPU per read into librbd, binding and
FUSE.

Usage: .venv/bin/python scripts/bench/rbd_paths.py [--reads N] [--repeat R]
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from common import MiB, random_file, require_root

from tests.support.ceph import Cluster, start_cluster
from vdiskfs.block.context import OpenOptions, open_image
from vdiskfs.block.node import BlockNode

# This directory has an rbd.py: librbd's binding, `import rbd`, must not find it.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

SIZE = 256 * MiB
BLOCK = 4096
#: librbd.h's EVENT_TYPE_EVENTFD.
EVENT_TYPE_EVENTFD = 2


class CApiImage:
    """An image opened read-only through librbd's C API, its completions polled by the trio
    thread: ``read`` submits with ``rbd_aio_read`` and sleeps until the poller wakes it."""

    def __init__(self, conf: Path, pool: str, image: str) -> None:
        self.rados = rados = ctypes.CDLL("librados.so.2")
        self.lib = ctypes.CDLL("librbd.so.1")
        # The calls of the data path keep the GIL: none of them blocks.
        held = ctypes.PyDLL("librbd.so.1")
        vp = ctypes.c_void_p
        self._create = held.rbd_aio_create_completion
        self._create.argtypes = (vp, vp, ctypes.POINTER(vp))
        self._read = held.rbd_aio_read
        self._read.argtypes = (vp, ctypes.c_uint64, ctypes.c_size_t, vp, vp)
        self._poll = held.rbd_poll_io_events
        self._poll.argtypes = (vp, vp, ctypes.c_int)
        self._value = held.rbd_aio_get_return_value
        self._value.argtypes = (vp,)
        self._value.restype = ctypes.c_ssize_t
        self._arg = held.rbd_aio_get_arg
        self._arg.argtypes = (vp,)
        self._arg.restype = vp
        self._release = held.rbd_aio_release
        self._release.argtypes = (vp,)
        self.cluster, self.ioctx, self.image = vp(), vp(), vp()
        for what, status in (
                ("rados_create", lambda: rados.rados_create(ctypes.byref(self.cluster),
                                                            b"admin")),
                ("rados_conf_read_file", lambda: rados.rados_conf_read_file(
                    self.cluster, os.fsencode(conf))),
                ("rados_connect", lambda: rados.rados_connect(self.cluster)),
                ("rados_ioctx_create", lambda: rados.rados_ioctx_create(
                    self.cluster, pool.encode(), ctypes.byref(self.ioctx))),
                ("rbd_open_read_only", lambda: self.lib.rbd_open_read_only(
                    self.ioctx, image.encode(), ctypes.byref(self.image), None))):
            if (err := status()) != 0:
                raise OSError(-err, f"{what}: {os.strerror(-err)}")
        self.events = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        if (err := self.lib.rbd_set_image_notification(self.image, self.events,
                                                       EVENT_TYPE_EVENTFD)) != 0:
            raise OSError(-err, f"rbd_set_image_notification: {os.strerror(-err)}")
        self._waiting: dict[int, trio.lowlevel.Task] = {}
        self._results: dict[int, int] = {}
        self._keys = iter(range(1, 1 << 62))
        self._polled = (ctypes.c_void_p * 64)()

    def close(self) -> None:
        self.lib.rbd_close(self.image)
        self.rados.rados_ioctx_destroy(self.ioctx)
        self.rados.rados_shutdown(self.cluster)
        os.close(self.events)

    async def poller(self) -> None:
        while True:
            await trio.lowlevel.wait_readable(self.events)
            with contextlib.suppress(BlockingIOError):
                os.eventfd_read(self.events)
            while (count := self._poll(self.image, self._polled, len(self._polled))) > 0:
                for completion in self._polled[:count]:
                    key = self._arg(completion)
                    self._results[key] = self._value(completion)
                    self._release(completion)
                    trio.lowlevel.reschedule(self._waiting.pop(key))

    async def read(self, offset: int, buffer: ctypes.Array[ctypes.c_char]) -> None:
        key = next(self._keys)
        completion = ctypes.c_void_p()
        if self._create(key, None, ctypes.byref(completion)) != 0:
            raise OSError("rbd_aio_create_completion failed")
        if (err := self._read(self.image, offset, BLOCK, buffer, completion)) < 0:
            raise OSError(-err, os.strerror(-err))
        self._waiting[key] = trio.lowlevel.current_task()
        await trio.lowlevel.wait_task_rescheduled(lambda _: trio.lowlevel.Abort.FAILED)
        if (got := self._results.pop(key)) != BLOCK:
            raise OSError(f"read at {offset}: {got}")


def timed(depth: int, reads: int, read: Callable[[int], Awaitable[object]],
          background: Callable[[], Awaitable[None]] | None = None) -> tuple[float, float]:
    """``reads`` calls of ``read`` at random offsets from ``depth`` tasks, with ``background``
    running beside them: (reads per second, process CPU seconds per read)."""
    rng = random.Random(depth)
    offsets = [rng.randrange(SIZE // BLOCK) * BLOCK for _ in range(reads)]
    measured: list[tuple[float, float]] = []

    async def reader(share: list[int]) -> None:
        for offset in share:
            await read(offset)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            if background is not None:
                nursery.start_soon(background)
            wall, cpu = time.perf_counter(), time.process_time()
            async with trio.open_nursery() as readers:
                for i in range(depth):
                    readers.start_soon(reader, offsets[i::depth])
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            measured.append((reads / wall, cpu / reads))
            nursery.cancel_scope.cancel()

    trio.run(main)
    return measured[0]


def node_reads(cluster: Cluster, image: str, depth: int, reads: int) -> tuple[float, float]:
    async def open_root() -> BlockNode:
        return await open_image(cluster.qemu_name(f"rbd/{image}"), OpenOptions(format="raw"))

    root = trio.run(open_root)
    try:
        return timed(depth, reads, lambda offset: root.pread(offset, BLOCK))
    finally:
        trio.run(root.aclose)


def c_api_reads(image: CApiImage, depth: int, reads: int) -> tuple[float, float]:
    buffers: dict[trio.lowlevel.Task, ctypes.Array[ctypes.c_char]] = {}

    async def read(offset: int) -> None:
        task = trio.lowlevel.current_task()
        buffer = buffers.get(task) or buffers.setdefault(task, ctypes.create_string_buffer(BLOCK))
        await image.read(offset, buffer)

    return timed(depth, reads, read, image.poller)


def main() -> None:
    require_root()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reads", type=int, default=20000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="rbd-paths-") as tmp, \
            start_cluster(Path(tmp) / "ceph") as cluster:
        raw = random_file(Path(tmp) / "paths.raw", SIZE, seed=3)
        cluster.rbd("import", raw, "rbd/paths")
        raw.unlink()
        c_image = CApiImage(cluster.conf, "rbd", "paths")
        results: dict[tuple[str, int], list[tuple[float, float]]] = {}
        try:
            for _ in range(args.repeat):
                for depth in (1, 16):
                    reads = args.reads // (4 if depth == 1 else 1)
                    results.setdefault(("node", depth), []).append(
                        node_reads(cluster, "paths", depth, reads))
                    results.setdefault(("c-api", depth), []).append(
                        c_api_reads(c_image, depth, reads))
        finally:
            c_image.close()
        print(f"4 KiB random reads of a {SIZE // MiB} MiB image, medians of {args.repeat}:")
        for (name, depth), runs in sorted(results.items(), key=lambda kv: (kv[0][1], kv[0][0])):
            rate = statistics.median(r for r, _ in runs)
            cpu = statistics.median(c for _, c in runs)
            print(f"  qd{depth:<3} {name:6} {rate:8.0f} reads/s  {cpu * 1e6:6.1f} us CPU per read")


if __name__ == "__main__":
    main()
