"""The asynchronous I/O engine under the file node: every engine, the caps, cancellation."""

from __future__ import annotations

import contextlib
import os
import random
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from tests.support.images import random_bytes
from vdiskfs.drivers.protocol import engine as engine_module
from vdiskfs.drivers.protocol._cachestat import PageCacheProbe
from vdiskfs.drivers.protocol.engine import (
    HostFile,
    InlineEngine,
    IoCounters,
    IoEngine,
    ThreadEngine,
    UringEngine,
    UringError,
    current_engine,
)
from vdiskfs.drivers.protocol.file import FileNode

ENGINES = ["io_uring", "threads", "inline"]


def _make(name: str, max_inflight_bytes: int = engine_module.DEFAULT_MAX_INFLIGHT_BYTES,
          nursery: trio.Nursery | None = None) -> IoEngine:
    if name == "io_uring":
        try:
            uring = UringEngine(max_inflight_bytes)
        except UringError as exc:  # pragma: no cover - io_uring disabled on this host
            pytest.skip(f"io_uring unavailable: {exc}")
        assert nursery is not None
        nursery.start_soon(uring.reap_forever)
        return uring
    if name == "threads":
        return ThreadEngine(max_inflight_bytes)
    return InlineEngine(max_inflight_bytes)


@pytest.fixture
def data_file(tmp_path: Path) -> Iterator[tuple[int, bytes]]:
    data = random_bytes(3, 4 << 20)
    path = tmp_path / "data"
    path.write_bytes(data)
    fd = os.open(path, os.O_RDWR)
    yield fd, data
    os.close(fd)


@pytest.mark.parametrize("name", ENGINES)
async def test_reads_writes_and_syncs(name: str, data_file: tuple[int, bytes]) -> None:
    fd, data = data_file
    async with trio.open_nursery() as nursery:
        engine = _make(name, nursery=nursery)
        f = HostFile(fd, IoCounters())
        rng = random.Random(1)
        reference = bytearray(data)

        async def reader() -> None:
            for _ in range(40):
                offset = rng.randrange(len(data) - 70000)
                length = rng.randrange(1, 70000)
                buf = bytearray(length)
                assert await engine.read(f, memoryview(buf), offset) == length
                assert buf == reference[offset : offset + length]

        async with trio.open_nursery() as readers:
            for _ in range(16):
                readers.start_soon(reader)
        # Writes land, including from a memoryview slice and a read-only buffer.
        payload = bytes(random_bytes(4, 100000))
        await engine.write(f, memoryview(payload)[10:90000], 12345)
        reference[12345 : 12345 + 89990] = payload[10:90000]
        await engine.fdatasync(f)
        buf = bytearray(len(reference))
        assert await engine.read(f, memoryview(buf), 0) == len(reference)
        assert buf == reference
        # The end of the file: a short count, not an error.
        tail = bytearray(100)
        assert await engine.read(f, memoryview(tail), len(reference) - 30) == 30
        assert engine.stats.in_flight == 0 and engine.stats.inflight_bytes == 0
        counters = f.counters
        assert counters.engine_in_flight == 0
        assert counters.engine_completed == counters.engine_submitted
        if name != "inline":
            assert engine.stats.max_in_flight > 1 or counters.inline_reads > 0
        engine.close()
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("name", ENGINES)
async def test_errors_come_back_as_oserror(name: str) -> None:
    async with trio.open_nursery() as nursery:
        engine = _make(name, nursery=nursery)
        r, w = os.pipe()
        os.close(r)
        os.close(w)
        f = HostFile(w, IoCounters())  # a closed descriptor
        with pytest.raises(OSError):
            await engine.read(f, memoryview(bytearray(10)), 0)
        with pytest.raises(OSError):
            await engine.write(f, memoryview(b"x"), 0)
        assert engine.stats.in_flight == 0
        engine.close()
        nursery.cancel_scope.cancel()


async def test_the_byte_cap_holds() -> None:
    """Reads of empty pipes wait in the engine until written: 8 of 100 kB under a 256 KiB cap
    are admitted two at a time; a read larger than the cap goes alone."""
    cap = 256 * 1024
    async with trio.open_nursery() as nursery:
        engine = _make("io_uring", cap, nursery=nursery)
        pipes = [os.pipe() for _ in range(9)]
        try:
            async def read(r: int, length: int) -> None:
                buf = bytearray(length)
                assert await engine.read(HostFile(r, IoCounters()), memoryview(buf), 0) > 0

            async with trio.open_nursery() as readers:
                # Trio may run tasks started together in any order: the large read starts
                # once the small ones are in, so that it is the one that must wait.
                for r, _w in pipes[:8]:
                    readers.start_soon(read, r, 100000)
                await trio.sleep(0.1)
                readers.start_soon(read, pipes[8][0], 1 << 20)
                await trio.sleep(0.1)
                assert engine.stats.in_flight == 2 and engine.stats.budget_waits > 0
                # A byte and then the end of the pipe: each read is short, then at its end.
                for _r, w in pipes:
                    os.write(w, b"x")
                    os.close(w)
            assert engine.stats.max_inflight_bytes <= cap
            assert engine.stats.inflight_bytes == 0 and engine.stats.in_flight == 0
        finally:
            for r, w in pipes:
                os.close(r)
                with contextlib.suppress(OSError):
                    os.close(w)
        engine.close()
        nursery.cancel_scope.cancel()


async def test_uring_read_cancelled_while_pending_is_abandoned_safely() -> None:
    async with trio.open_nursery() as nursery:
        engine = _make("io_uring", nursery=nursery)
        r, w = os.pipe()  # a read of an empty pipe waits until something is written
        try:
            f = HostFile(r, IoCounters())
            buf = bytearray(16)
            with trio.move_on_after(0.2) as scope:
                await engine.read(f, memoryview(buf), 0)
            assert scope.cancelled_caught
            # The kernel still holds the buffer: the engine keeps it in flight until it ends.
            assert engine.stats.in_flight == 1 and f.counters.engine_in_flight == 0
            os.write(w, b"late")
            with trio.fail_after(5):
                while engine.stats.in_flight:
                    await trio.sleep(0.01)
            assert engine.stats.abandoned == 1 and engine.stats.inflight_bytes == 0
        finally:
            os.close(r)
            os.close(w)
        engine.close()
        nursery.cancel_scope.cancel()


async def test_uring_write_is_waited_for_when_cancelled() -> None:
    async with trio.open_nursery() as nursery:
        engine = _make("io_uring", nursery=nursery)
        r, w = os.pipe()
        try:
            os.set_blocking(w, False)
            with pytest.raises(BlockingIOError):
                while True:  # fill the pipe: the next write waits
                    os.write(w, bytes(65536))
            f = HostFile(w, IoCounters())
            done = trio.Event()

            async def write() -> None:
                with trio.CancelScope() as scope:
                    scope.cancel()  # cancelled from the start: the write still completes
                    await engine.write(f, memoryview(b"x" * 10), 0)
                done.set()

            nursery.start_soon(write)
            await trio.sleep(0.2)
            assert not done.is_set() and engine.stats.in_flight == 1
            while os.read(r, 65536 * 4):
                if engine.stats.in_flight == 0:
                    break
                await trio.sleep(0.01)
            with trio.fail_after(5):
                await done.wait()
            assert engine.stats.in_flight == 0 and engine.stats.abandoned == 0
        finally:
            os.close(r)
            os.close(w)
        engine.close()
        nursery.cancel_scope.cancel()


async def test_thread_read_cancelled_while_running_is_abandoned() -> None:
    engine = ThreadEngine()
    release = threading.Event()
    started = threading.Event()

    def blocking_read() -> int:
        started.set()
        release.wait(10)
        return 7

    with trio.move_on_after(0.5) as scope:
        await engine._run(engine_module._READ, 100, blocking_read)
    assert scope.cancelled_caught and started.is_set()
    assert engine.stats.in_flight == 1
    release.set()
    with trio.fail_after(5):
        while engine.stats.in_flight:
            await trio.sleep(0.01)
    assert engine.stats.abandoned == 1
    engine.close()


async def test_engine_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VDISKFS_IO_ENGINE", "threads")
    engine = current_engine()
    assert engine.name == "threads" and current_engine() is engine  # one per event loop


async def test_engine_choice_rejects_unknown_names(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VDISKFS_IO_ENGINE", "aio")
    with pytest.raises(ValueError, match="VDISKFS_IO_ENGINE"):
        current_engine()


async def test_auto_falls_back_to_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    def unavailable(*args: object) -> None:
        raise UringError(1, "io_uring_setup: Operation not permitted")

    monkeypatch.setattr(UringEngine, "__init__", unavailable)
    monkeypatch.delenv("VDISKFS_IO_ENGINE", raising=False)
    assert current_engine().name == "threads"


async def test_file_node_keeps_requests_in_flight(tmp_path: Path) -> None:
    """Cold reads through the node overlap in the engine (the host sees a queue depth)."""
    path = tmp_path / "f"
    data = random_bytes(5, 8 << 20)
    path.write_bytes(data)
    node = FileNode(str(path))
    await node.open()
    try:
        os.fsync(node.fd)
        os.posix_fadvise(node.fd, 0, 0, os.POSIX_FADV_DONTNEED)  # drop it from the page cache

        async def read(offset: int) -> None:
            assert await node.pread(offset, 4096) == data[offset : offset + 4096]

        async with trio.open_nursery() as nursery:
            for i in range(32):
                nursery.start_soon(read, i * 200000)
        snapshot = node.stats_snapshot().as_dict()
        assert snapshot["max_in_flight"] > 1
        assert snapshot["engine_in_flight"] == 0
        assert snapshot["io_engine"] in ("io_uring", "threads", "inline")
        assert snapshot["engine_inflight_bytes_cap"] > 0
    finally:
        await node.aclose()


def test_the_page_cache_probe_tells_cached_from_cold(data_file: tuple[int, bytes]) -> None:
    probe = PageCacheProbe.create()
    if probe is None:  # pragma: no cover - a kernel before 6.5
        pytest.skip("no cachestat(2) here")
    fd, _data = data_file
    os.fsync(fd)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    assert not probe.all_cached(fd, 8192, 4096)
    os.pread(fd, 4096, 8192)
    assert probe.all_cached(fd, 8192, 4096)
    assert probe.all_cached(fd, 8192 + 100, 200)  # within the page
    # Spanning into a page that is not cached (the pread above read ahead at most 128 KiB).
    assert not probe.all_cached(fd, 8192, 2 << 20)


@pytest.mark.parametrize("name", ["io_uring", "threads"])
async def test_a_cold_read_goes_to_the_engine_and_a_cached_one_does_not(
        name: str, data_file: tuple[int, bytes]) -> None:
    fd, data = data_file
    os.fsync(fd)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    async with trio.open_nursery() as nursery:
        engine = _make(name, nursery=nursery)
        f = HostFile(fd, IoCounters())
        buf = bytearray(4096)
        assert await engine.read(f, memoryview(buf), 1 << 20) == 4096
        assert buf == data[1 << 20:(1 << 20) + 4096]
        assert f.counters.engine_submitted == 1 and f.counters.inline_reads == 0
        assert await engine.read(f, memoryview(buf), 1 << 20) == 4096
        assert f.counters.engine_submitted == 1 and f.counters.inline_reads == 1
        engine.close()
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("name", ["io_uring", "threads"])
async def test_after_a_cached_read_the_next_is_tried_without_asking(
        name: str, data_file: tuple[int, bytes]) -> None:
    if PageCacheProbe.create() is None:  # pragma: no cover - a kernel before 6.5
        pytest.skip("no cachestat(2) here")
    fd, data = data_file
    os.fsync(fd)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    os.pread(fd, 4096, 0)  # the first page hot, the rest cold
    async with trio.open_nursery() as nursery:
        engine = _make(name, nursery=nursery)
        counters = IoCounters()
        f = HostFile(fd, counters)
        buf = bytearray(4096)
        # Cold file state: asked (cachestat) and read inline: two system calls.
        assert await engine.read(f, memoryview(buf), 0) == 4096
        assert (counters.syscalls, counters.inline_reads) == (2, 1)
        # Hot: tried at once, one system call.
        assert await engine.read(f, memoryview(buf), 0) == 4096
        assert (counters.syscalls, counters.inline_reads) == (3, 2)
        # A read the page cache cannot answer (asked: this file's state is cold again) goes
        # to the engine...
        cold = HostFile(fd, counters)
        os.posix_fadvise(fd, 3 << 20, 1 << 20, os.POSIX_FADV_DONTNEED)
        assert await engine.read(cold, memoryview(buf), 3 << 20) == 4096
        assert buf == data[3 << 20:(3 << 20) + 4096]
        assert counters.engine_submitted == 1
        # ...and the next read of that file asks again first (cachestat, then the read).
        before = counters.syscalls
        assert await engine.read(cold, memoryview(buf), 0) == 4096
        assert counters.syscalls == before + 2 and counters.engine_submitted == 1
        engine.close()
        nursery.cancel_scope.cancel()
