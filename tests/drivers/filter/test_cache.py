"""The read cache filter (``cache``) over a file node behind a :class:`Counting` filter that
records every child read and can hold them: bytes as the reference, one fetch per block however
many readers, the memory bound, readahead, writes that keep reads right, and readers cancelled
in the middle of a fetch."""

from __future__ import annotations

import contextlib
import os
import random
from pathlib import Path

import pytest
import trio
import trio.testing

from tests.support.conformance import check_block_node
from tests.support.images import random_bytes
from vdiskfs.block.node import BlockNode, Buffer, FilterNode
from vdiskfs.drivers.filter.cache import MAX_RUN_BLOCKS, CacheNode
from vdiskfs.drivers.protocol.file import FileNode
from vdiskfs.errors import HostIOError

KiB = 1 << 10
BS = 64 * KiB
TIMEOUT = 30


class Counting(FilterNode):
    """Records each read ``(offset, length)``; holds reads while :attr:`gate` is unset."""

    def __init__(self, child: BlockNode) -> None:
        super().__init__(child)
        self.reads: list[tuple[int, int]] = []
        self.gate: trio.Event | None = None
        self.waiting = 0
        self.fail: Exception | None = None

    async def _pread(self, offset: int, length: int) -> Buffer:
        self.reads.append((offset, length))
        if self.gate is not None:
            self.waiting += 1
            try:
                await self.gate.wait()
            finally:
                self.waiting -= 1
        if self.fail is not None:
            raise self.fail
        return await self.file.pread(offset, length)


async def _open(path: Path, *, read_only: bool = True, **kwargs: int) -> CacheNode:
    file = FileNode(str(path), read_only=read_only)
    await file.open()
    counting = Counting(file)
    await counting.open()
    node = CacheNode(counting, **kwargs)
    await node.open()
    return node


async def _settle(node: CacheNode) -> None:
    """Wait until the fetches started so far (prefetches included) have landed: the child's
    reads may run in threads, which ``wait_all_tasks_blocked`` does not wait for."""
    with trio.fail_after(TIMEOUT):
        await trio.testing.wait_all_tasks_blocked()
        while node.file.stats.in_flight:
            await trio.sleep(0.001)
        await trio.testing.wait_all_tasks_blocked()


def _counting(node: CacheNode) -> Counting:
    file = node.file
    assert isinstance(file, Counting)
    return file


@pytest.fixture
def image(tmp_path: Path) -> tuple[Path, bytes]:
    data = random_bytes(3, 2 * 1024 * KiB + 777)  # a short last block
    path = tmp_path / "disk.raw"
    path.write_bytes(data)
    return path, data


async def test_conformance_read_only(image: tuple[Path, bytes]) -> None:
    path, data = image
    await check_block_node(lambda: _open(path, block_size=BS, max_bytes=8 * BS), data)


async def test_conformance_writable(image: tuple[Path, bytes]) -> None:
    path, data = image
    await check_block_node(lambda: _open(path, read_only=False, block_size=BS,
                                         max_bytes=8 * BS), data, writable=True)


async def test_conformance_default_sizes(image: tuple[Path, bytes]) -> None:
    path, data = image
    await check_block_node(lambda: _open(path), data, seed=2)


async def test_random_reads_match_and_hit(image: tuple[Path, bytes]) -> None:
    path, data = image
    async with await _open(path, block_size=BS, max_bytes=64 * BS, readahead_blocks=0) as node:
        rng = random.Random(5)
        for _ in range(300):
            offset = rng.randrange(len(data))
            length = rng.randrange(1, min(len(data) - offset, 200 * KiB) + 1)
            assert await node.pread(offset, length) == data[offset : offset + length]
        c = node.counters
        blocks = -(-len(data) // BS)
        # Everything fits: each block was fetched at most once, every byte at most once.
        assert c.bytes_fetched <= len(data)
        assert c.misses <= blocks and c.evictions == 0
        assert c.hits > c.misses
        assert sum(n for _, n in _counting(node).reads) == c.bytes_fetched
        # Every child read is block aligned and at most MAX_RUN_BLOCKS long.
        for offset, length in _counting(node).reads:
            assert offset % BS == 0 and length <= 4 * BS


async def test_concurrent_readers_fetch_once(image: tuple[Path, bytes]) -> None:
    path, data = image
    async with await _open(path, block_size=BS, readahead_blocks=0) as node:
        counting = _counting(node)
        counting.gate = trio.Event()
        results: list[bytes] = []

        async def reader(offset: int, length: int) -> None:
            results.append(bytes(await node.pread(offset, length)))

        with trio.fail_after(TIMEOUT):
            async with trio.open_nursery() as nursery:
                for i in range(10):
                    nursery.start_soon(reader, BS + i * 1000, 500)
                await trio.testing.wait_all_tasks_blocked()
                assert counting.waiting == 1
                counting.gate.set()
        assert counting.reads == [(BS, BS)]
        assert sorted(results) == sorted(data[BS + i * 1000 : BS + i * 1000 + 500]
                                         for i in range(10))
        assert node.counters.misses == 1 and node.counters.waits == 9


async def test_adjacent_missing_blocks_coalesced(image: tuple[Path, bytes]) -> None:
    path, data = image
    async with await _open(path, block_size=BS, readahead_blocks=0) as node:
        counting = _counting(node)
        await node.pread(2 * BS + 5, 10)  # block 2 cached
        counting.reads.clear()
        # Blocks 0-1 and 3-(M+4) are missing: a run of 2, then runs of M = MAX_RUN_BLOCKS and
        # 2, fetched concurrently.
        end = 3 + MAX_RUN_BLOCKS + 2
        counting.gate = trio.Event()
        with trio.fail_after(TIMEOUT):
            async with trio.open_nursery() as nursery:
                async def read() -> None:
                    assert await node.pread(10, end * BS - 20) == data[10 : end * BS - 10]

                nursery.start_soon(read)
                await trio.testing.wait_all_tasks_blocked()
                assert counting.waiting == 3
                counting.gate.set()
        assert sorted(counting.reads) == [(0, 2 * BS), (3 * BS, MAX_RUN_BLOCKS * BS),
                                          ((3 + MAX_RUN_BLOCKS) * BS, 2 * BS)]


async def test_memory_bound_and_lru(image: tuple[Path, bytes]) -> None:
    path, data = image
    async with await _open(path, block_size=BS, max_bytes=4 * BS, readahead_blocks=0) as node:
        for index in range(20):
            assert await node.pread(index * BS, 100) == data[index * BS : index * BS + 100]
            assert node.counters.cached_bytes <= 4 * BS
        assert node.counters.evictions == 16
        counting = _counting(node)
        # The last four are cached; touching 16 keeps it over 20, which evicts 17.
        counting.reads.clear()
        await node.pread(16 * BS, 10)
        await node.pread(20 * BS, 10)
        assert counting.reads == [(20 * BS, BS)]
        await node.pread(16 * BS, 10)
        await node.pread(17 * BS, 10)
        assert counting.reads == [(20 * BS, BS), (17 * BS, BS)]


async def test_sequential_reads_read_ahead(image: tuple[Path, bytes]) -> None:
    path, data = image
    async with await _open(path, block_size=BS, max_bytes=64 * BS,
                           readahead_blocks=4) as node:
        chunk = 16 * KiB
        for offset in range(0, len(data), chunk):
            length = min(chunk, len(data) - offset)
            assert await node.pread(offset, length) == data[offset : offset + length]
            await _settle(node)  # let the prefetches land
        c = node.counters
        assert c.readahead_bytes > 0
        # Only block 0 was a miss: the readahead stayed ahead of a reader that waits for it.
        assert c.misses == 1
        assert c.bytes_fetched == len(data)
        fetched = c.bytes_fetched
        # A second pass is served from memory.
        for offset in range(0, len(data), chunk):
            length = min(chunk, len(data) - offset)
            assert await node.pread(offset, length) == data[offset : offset + length]
        assert c.bytes_fetched == fetched
        assert c.readahead_wasted_bytes == 0


async def test_wasted_readahead_counted(image: tuple[Path, bytes]) -> None:
    path, _data = image
    async with await _open(path, block_size=BS, max_bytes=8 * BS,
                           readahead_blocks=2) as node:
        await node.pread(0, 100)
        await node.pread(100, 100)  # sequential: prefetches blocks 1 and 2
        await _settle(node)
        assert node.counters.readahead_bytes == 2 * BS
        for index in range(10, 20):  # random reads evict them unread
            await node.pread(index * BS + 7, 1)
        assert node.counters.readahead_wasted_bytes == 2 * BS


async def test_writes_zero_discard_keep_reads_right(image: tuple[Path, bytes]) -> None:
    path, data = image
    model = bytearray(data)
    async with await _open(path, read_only=False, block_size=BS, max_bytes=16 * BS) as node:
        rng = random.Random(9)
        for step in range(200):
            offset = rng.randrange(len(model))
            length = rng.randrange(1, min(len(model) - offset, 3 * BS) + 1)
            action = rng.choice(["read", "read", "write", "zero", "discard"])
            if action == "write":
                blob = rng.randbytes(length)
                await node.pwrite(offset, blob)
                model[offset : offset + length] = blob
            elif action == "zero":
                await node.zero(offset, length)
                model[offset : offset + length] = bytes(length)
            elif action == "discard":
                await node.discard(offset, length)
                # The file punches what it can: the model takes what the child reads.
                model[offset : offset + length] = await node.file.pread(offset, length)
            assert await node.pread(offset, length) == model[offset : offset + length], step
        assert await node.pread(0, len(model)) == model


async def test_write_during_fetch_not_cached_stale(image: tuple[Path, bytes]) -> None:
    path, data = image
    async with await _open(path, read_only=False, block_size=BS, readahead_blocks=0) as node:
        counting = _counting(node)
        counting.gate = trio.Event()
        got: list[bytes] = []
        with trio.fail_after(TIMEOUT):
            async with trio.open_nursery() as nursery:
                async def read() -> None:
                    got.append(bytes(await node.pread(0, 10)))

                nursery.start_soon(read)
                await trio.testing.wait_all_tasks_blocked()
                await node.pwrite(0, b"new")  # while the fetch of block 0 is held
                counting.gate.set()
        assert got[0] in (data[:10], b"new" + data[3:10])
        # The held fetch (possibly older than the write) was not cached.
        assert await node.pread(0, 10) == b"new" + data[3:10]


async def test_cancelled_reader_leaves_node_usable(image: tuple[Path, bytes]) -> None:
    path, data = image
    async with await _open(path, block_size=BS, readahead_blocks=0) as node:
        counting = _counting(node)
        counting.gate = trio.Event()
        with trio.fail_after(TIMEOUT):
            with trio.move_on_after(0.05) as scope:
                await node.pread(BS, 100)
        assert scope.cancelled_caught
        assert node.stats.in_flight == 0
        # It fetched the block itself; cancelled, it handed the fetch to the node, which made
        # it again: a new reader joins that one.
        async with trio.open_nursery() as nursery:
            async def read() -> None:
                assert await node.pread(BS + 50, 100) == data[BS + 50 : BS + 150]

            nursery.start_soon(read)
            await trio.testing.wait_all_tasks_blocked()
            counting.gate.set()
        assert counting.reads == [(BS, BS), (BS, BS)]
        assert await node.pread(BS, 100) == data[BS : BS + 100]


async def test_failed_fetch_raises_to_every_reader_and_caches_nothing(
        image: tuple[Path, bytes]) -> None:
    path, data = image
    async with await _open(path, block_size=BS, readahead_blocks=0) as node:
        counting = _counting(node)
        counting.fail = HostIOError("boom", path="x")
        counting.gate = trio.Event()
        errors: list[BaseException] = []

        async def reader() -> None:
            try:
                await node.pread(0, 10)
            except HostIOError as exc:
                errors.append(exc)

        async with trio.open_nursery() as nursery:
            for _ in range(3):
                nursery.start_soon(reader)
            await trio.testing.wait_all_tasks_blocked()
            counting.gate.set()
        assert len(errors) == 3 and len(counting.reads) == 1
        counting.gate = None
        counting.fail = None
        assert await node.pread(0, 10) == data[:10]


async def test_close_with_fetch_in_flight(image: tuple[Path, bytes]) -> None:
    path, _data = image
    node = await _open(path, block_size=BS, readahead_blocks=0)
    counting = _counting(node)
    counting.gate = trio.Event()
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            async def read() -> None:
                with pytest.raises(HostIOError, match="closed"):
                    await node.pread(0, 10)

            nursery.start_soon(read)
            await trio.testing.wait_all_tasks_blocked()
            await node.aclose()
    assert counting.waiting == 0


async def test_open_cancelled_leaves_no_task(image: tuple[Path, bytes]) -> None:
    path, _data = image
    file = FileNode(str(path))
    await file.open()
    node = CacheNode(file)
    with trio.CancelScope() as scope:
        scope.cancel()
        await node.open()
    assert scope.cancelled_caught
    await node.aclose()
    await trio.testing.wait_all_tasks_blocked()
    assert node._stopped.is_set()  # the task hosting the fetches started, and ended at once


class Keyed(Counting):
    """A child that names its content, as an http node with an ETag does."""

    key = "https://host/disk.raw etag-1"

    def content_key(self) -> str | None:
        return self.key


async def _open_keyed(path: Path, cache_dir: Path, key: str = Keyed.key) -> CacheNode:
    file = FileNode(str(path))
    await file.open()
    keyed = Keyed(file)
    keyed.key = key
    await keyed.open()
    node = CacheNode(keyed, block_size=BS, cache_dir=str(cache_dir))
    await node.open()
    return node


async def test_cache_dir_serves_a_second_open(image: tuple[Path, bytes], tmp_path: Path) -> None:
    path, data = image
    cache_dir = tmp_path / "cache"
    blocks = -(-len(data) // BS)
    async with await _open_keyed(path, cache_dir) as node:
        assert await node.pread(0, len(data)) == data
    assert node.counters.disk_bytes_written == len(data)  # closing waits for the writes
    names = sorted(p.name for p in cache_dir.iterdir())
    assert len(names) == 2 and all("host" not in n and "etag" not in n for n in names)
    async with await _open_keyed(path, cache_dir) as node:
        rng = random.Random(1)
        for _ in range(50):
            offset = rng.randrange(len(data))
            length = rng.randrange(1, min(len(data) - offset, 300 * KiB) + 1)
            assert await node.pread(offset, length) == data[offset : offset + length]
        assert _counting(node).reads == []
        assert 0 < node.counters.disk_hits <= blocks and node.counters.bytes_fetched == 0
    # Another validator is another content: fetched again, into other files.
    async with await _open_keyed(path, cache_dir, key="https://host/disk.raw etag-2") as node:
        assert await node.pread(0, 100) == data[:100]
        assert _counting(node).reads
    assert len(list(cache_dir.iterdir())) == 4


async def test_cache_dir_ignores_a_foreign_map(image: tuple[Path, bytes], tmp_path: Path) -> None:
    path, data = image
    cache_dir = tmp_path / "cache"
    async with await _open_keyed(path, cache_dir) as node:
        await node.pread(0, 3 * BS)
    (map_file,) = cache_dir.glob("*.map")
    map_file.write_bytes(b"garbage")
    async with await _open_keyed(path, cache_dir) as node:
        assert await node.pread(0, 3 * BS) == data[: 3 * BS]
        assert node.counters.disk_hits == 0 and node.counters.misses == 3


async def test_cache_dir_unused_without_a_content_key(image: tuple[Path, bytes],
                                                      tmp_path: Path) -> None:
    path, data = image
    async with await _open(path, block_size=BS) as node:
        assert node.info()["on_disk"] is False
    file = FileNode(str(path))
    await file.open()
    node = CacheNode(file, cache_dir=str(tmp_path / "cache"))
    await node.open()
    async with node:
        assert await node.pread(0, 10) == data[:10]
    assert not (tmp_path / "cache").exists()


async def test_open_cancelled_closes_the_cache_file(image: tuple[Path, bytes],
                                                    tmp_path: Path) -> None:
    path, _data = image
    file = FileNode(str(path))
    await file.open()
    keyed = Keyed(file)
    await keyed.open()
    node = CacheNode(keyed, cache_dir=str(tmp_path / "cache"))
    with trio.CancelScope() as scope:
        scope.cancel()
        await node.open()
    assert scope.cancelled_caught
    await node.aclose()

    def open_cache_files() -> list[str]:
        targets = []
        for fd in os.listdir("/proc/self/fd"):
            with contextlib.suppress(FileNotFoundError):  # the listing's own descriptor
                targets.append(os.readlink(f"/proc/self/fd/{fd}"))
        return [t for t in targets if t.startswith(str(tmp_path / "cache"))]

    assert open_cache_files() == []
