"""The run executor and its parts, with bytes in memory: no image, no host I/O.

A :class:`MemoryNode` stands for a child (the image file, a backing file) and can make each read
wait, so that tests see how many child requests are in flight; :class:`RunsNode` is the smallest
format node: its mapping is whatever list of runs the test hands the executor.
"""

from __future__ import annotations

import pytest
import trio
import trio.testing

from vdiskfs.block.context import OpenContext, OpenOptions
from vdiskfs.block.format import FormatNode
from vdiskfs.block.node import BlockNode, BlockStatus, Buffer, NodeKind
from vdiskfs.drivers.format import runs as runs_module
from vdiskfs.drivers.format.runs import (
    MAX_FANOUT,
    LruCache,
    Run,
    RunCounters,
    RunKind,
    coalesce,
    read_runs,
    run_status,
    runs_status,
    write_runs,
)
from vdiskfs.errors import FormatError, HostIOError

DATA, ZERO, BACKING, COMPRESSED = RunKind.DATA, RunKind.ZERO, RunKind.BACKING, RunKind.COMPRESSED


@pytest.fixture
def unhurried(monkeypatch: pytest.MonkeyPatch) -> None:
    """Reads that do not wait stay inline however loaded the machine is: the executor decides
    by the time a piece took (INLINE_SECONDS, 50 us), and a preempted test process can take
    longer than that without waiting for anything."""
    monkeypatch.setattr(runs_module, "INLINE_SECONDS", 1.0)


class MemoryNode(BlockNode):
    """A child held in memory; each read sleeps ``delay`` seconds first (0: no checkpoint)."""

    driver = "memory"
    kind = NodeKind.PROTOCOL

    def __init__(self, data: bytes, *, delay: float = 0.0, fail_at: int | None = None) -> None:
        super().__init__(read_only=False, label="memory")
        self.data = bytearray(data)
        self.size = len(data)
        self.delay = delay
        self.fail_at = fail_at
        self.reads: list[tuple[int, int]] = []
        #: The buffer the last read returned (to check that it is handed on uncopied).
        self.last: Buffer = b""

    async def _pread(self, offset: int, length: int) -> Buffer:
        self.reads.append((offset, length))
        if self.delay:
            await trio.sleep(self.delay)
        if self.fail_at is not None and offset <= self.fail_at < offset + length:
            raise HostIOError("simulated read error", path=self.label, offset=offset)
        self.last = bytes(self.data[offset : offset + length])
        return self.last

    async def _pwrite(self, offset: int, data: Buffer) -> None:
        if self.delay:
            await trio.sleep(self.delay)
        self.data[offset : offset + len(data)] = data


class RunsNode(FormatNode):
    """A format node whose compressed payloads are bytes in a dict."""

    driver = "runs-test"
    counters_class = RunCounters
    counters: RunCounters

    def __init__(self, file: BlockNode, size: int, backing: BlockNode | None = None) -> None:
        super().__init__(file, OpenContext(OpenOptions(), path="runs-test"))
        self.size = size
        if backing is not None:
            self.add_child("backing", backing)
            self.backing = backing
        self.compressed: dict[int, bytes] = {}

    async def read_compressed(self, run: Run) -> Buffer:
        start = run.offset % 4096
        return self.compressed[run.payload][start : start + run.length]


def _pattern(n: int, seed: int = 1) -> bytes:
    return bytes((i * 7 + seed) & 0xFF for i in range(n))


# -- Run, coalesce ---------------------------------------------------------------------------------


def test_coalesce_merges_what_one_read_serves() -> None:
    other = MemoryNode(b"")
    runs = [
        Run(DATA, 0, 10, 100),
        Run(DATA, 10, 5, 110),  # host-contiguous: merged
        Run(DATA, 15, 5, 200),  # not contiguous on the host
        Run(DATA, 20, 5, 205, other),  # contiguous, but in another child
        Run(ZERO, 25, 0),  # empty: dropped
        Run(ZERO, 25, 5),
        Run(ZERO, 30, 5),
        Run(COMPRESSED, 35, 5, payload=1),
        Run(COMPRESSED, 40, 5, payload=1),  # compressed runs never merge
        Run(BACKING, 45, 5),
        Run(BACKING, 50, 5),
    ]
    assert coalesce(runs) == [
        Run(DATA, 0, 15, 100),
        Run(DATA, 15, 5, 200),
        Run(DATA, 20, 5, 205, other),
        Run(ZERO, 25, 10),
        Run(COMPRESSED, 35, 5, payload=1),
        Run(COMPRESSED, 40, 5, payload=1),
        Run(BACKING, 45, 10),
    ]
    assert runs[0].end == 10


# -- the backing rule and block status -------------------------------------------------------------


async def test_read_backing_zero_fills_past_the_end_and_without_one() -> None:
    backing = MemoryNode(_pattern(100))
    node = RunsNode(MemoryNode(b""), 300, backing)
    assert node.backing_length(50, 100) == 50
    assert node.backing_length(100, 10) == 0
    got = await node.read_backing(60, 80)
    assert bytes(got) == _pattern(100)[60:] + bytes(40)
    whole = await node.read_backing(10, 20)
    assert whole is backing.last  # covered whole: the backing file's buffer, uncopied
    assert await node.read_backing(150, 10) == bytes(10)
    alone = RunsNode(MemoryNode(b""), 300)
    assert alone.backing_length(0, 10) == 0
    assert await alone.read_backing(0, 10) == bytes(10)


def test_run_status_and_its_extent() -> None:
    node = RunsNode(MemoryNode(b""), 1000, MemoryNode(bytes(100)))
    data = BlockStatus.DATA | BlockStatus.ALLOCATED
    assert run_status(node, Run(DATA, 0, 10, 0)) == (data, 10)
    assert run_status(node, Run(COMPRESSED, 0, 10, payload=3)) == (data, 10)
    assert run_status(node, Run(ZERO, 0, 10)) == (BlockStatus.ZERO | BlockStatus.ALLOCATED, 10)
    # Clipped where the backing file ends; past it, zeros that are not allocated here.
    assert run_status(node, Run(BACKING, 90, 50)) == (BlockStatus(0), 10)
    assert run_status(node, Run(BACKING, 100, 50)) == (BlockStatus.ZERO, 50)

    runs = [Run(DATA, 0, 10, 0), Run(DATA, 10, 10, 500), Run(BACKING, 20, 100),
            Run(DATA, 120, 10, 0)]
    assert runs_status(node, runs) == (data, 20)  # the same status merges, wherever the host
    assert runs_status(node, runs[2:]) == (BlockStatus(0), 80)  # stops at the backing's end
    assert runs_status(node, runs, max_runs=1) == (data, 10)

    def broken_after_first() -> object:
        yield Run(ZERO, 0, 10)
        raise FormatError("corrupt entry", path="x")

    # An error past the first run ends the extent; the request that reaches it reports it.
    assert runs_status(node, broken_after_first()) == (  # type: ignore[arg-type]
        BlockStatus.ZERO | BlockStatus.ALLOCATED, 10)

    def broken() -> object:
        raise FormatError("corrupt entry", path="x")
        yield

    with pytest.raises(FormatError, match="corrupt entry"):
        runs_status(node, broken())  # type: ignore[arg-type]


# -- read_runs -------------------------------------------------------------------------------------


async def test_one_data_run_hands_back_the_childs_buffer(unhurried: None) -> None:
    file = MemoryNode(_pattern(8192))
    node = RunsNode(file, 4096)
    got = await read_runs(node, [Run(DATA, 0, 4096, 1000)])
    assert got is file.last
    assert node.counters.data_reads == 1 and node.counters.data_bytes == 4096
    assert node.counters.fanout_requests == 0


async def test_every_kind_of_run_into_one_buffer(unhurried: None) -> None:
    image = _pattern(64 * 1024, 3)
    base = _pattern(20_000, 9)
    file = MemoryNode(image)
    backing = MemoryNode(base)
    data_file = MemoryNode(_pattern(4096, 5))
    node = RunsNode(file, 64 * 1024, backing)
    node.compressed[7] = _pattern(4096, 11)
    runs = [
        Run(DATA, 0, 1000, 5000),
        Run(ZERO, 1000, 500),
        Run(BACKING, 1500, 500),
        Run(COMPRESSED, 4096, 4096, payload=7),
        Run(DATA, 8192, 100, 0, data_file),
        Run(BACKING, 19_900, 300),  # 100 bytes of backing file, then zeros
        Run(BACKING, 20_200, 800),  # all past its end: no read
    ]
    # Fill the gaps so that the runs are contiguous.
    runs = coalesce(_contiguous(runs))
    got = await read_runs(node, runs)
    expected = bytearray()
    for run in runs:
        if run.kind is DATA:
            source = data_file.data if run.child is data_file else image
            expected += source[run.host_offset : run.host_offset + run.length]
        elif run.kind is ZERO:
            expected += bytes(run.length)
        elif run.kind is BACKING:
            have = base[run.offset : run.offset + run.length]
            expected += have + bytes(run.length - len(have))
        else:
            expected += node.compressed[7][run.offset % 4096 :][: run.length]
    assert bytes(got) == bytes(expected)
    counters = node.counters
    assert counters.backing_reads == 2  # the run past the end reads nothing
    assert counters.backing_bytes == 500 + 100
    assert counters.compressed_bytes == 4096
    assert counters.fanout_requests == 0  # nothing waited: read inline
    assert backing.reads == [(1500, 500), (19_900, 100)]


def _contiguous(runs: list[Run]) -> list[Run]:
    out: list[Run] = []
    pos = runs[0].offset
    for run in runs:
        if run.offset > pos:
            out.append(Run(ZERO, pos, run.offset - pos))
        out.append(run)
        pos = run.end
    return out


async def test_runs_are_read_concurrently_and_bounded(
        autojump_clock: trio.testing.MockClock) -> None:
    """20 scattered clusters, each read taking a second: the first shows that reads wait, the
    other 19 go out together in at most 16 requests -- 3 seconds, not 20."""
    cluster = 4096
    file = MemoryNode(_pattern(64 * cluster), delay=1.0)
    node = RunsNode(file, 20 * cluster)
    runs = [Run(DATA, i * cluster, cluster, (2 * i + 1) * cluster) for i in range(20)]
    start = trio.current_time()
    got = await read_runs(node, runs)
    assert trio.current_time() - start == pytest.approx(3.0)
    assert got == b"".join(file.data[(2 * i + 1) * cluster : (2 * i + 2) * cluster]
                           for i in range(20))
    assert file.stats.max_in_flight == MAX_FANOUT
    assert node.counters.max_fanout == MAX_FANOUT
    assert node.counters.fanout_requests == 1
    assert node.counters.data_reads == 20


async def test_runs_that_do_not_wait_are_read_inline(unhurried: None) -> None:
    """Reads that return at once (page-cache hits) are not worth a nursery."""
    file = MemoryNode(_pattern(64 * 4096))
    node = RunsNode(file, 8 * 4096)
    runs = [Run(DATA, i * 4096, 4096, (2 * i + 1) * 4096) for i in range(8)]
    await read_runs(node, runs)
    assert node.counters.fanout_requests == 0
    assert file.stats.max_in_flight == 1


async def test_a_failed_run_raises_itself_not_a_group(
        autojump_clock: trio.testing.MockClock) -> None:
    file = MemoryNode(_pattern(16 * 4096), delay=1.0, fail_at=5 * 4096)
    node = RunsNode(file, 8 * 4096)
    runs = [Run(DATA, i * 4096, 4096, 2 * i * 4096 + 4096) for i in range(2)] + [
        Run(DATA, 2 * 4096, 4096, 5 * 4096)] + [
        Run(DATA, i * 4096, 4096, (2 * i + 1) * 4096 + 8192) for i in range(3, 5)]
    with pytest.raises(HostIOError, match="simulated read error"):
        await read_runs(node, runs)
    assert file.stats.in_flight == 0


async def test_a_cancelled_read_leaves_nothing_in_flight(
        autojump_clock: trio.testing.MockClock) -> None:
    file = MemoryNode(_pattern(64 * 4096), delay=10.0)
    node = RunsNode(file, 8 * 4096)
    runs = [Run(DATA, i * 4096, 4096, (2 * i + 1) * 4096) for i in range(8)]
    with trio.move_on_after(1.0) as scope:
        await read_runs(node, runs)
    assert scope.cancelled_caught
    assert file.stats.in_flight == 0
    assert bytes(await read_runs(node, runs[:1])) == bytes(file.data[4096:8192])


# -- write_runs ------------------------------------------------------------------------------------


async def test_write_runs_in_place_and_through_the_allocation(
        autojump_clock: trio.testing.MockClock) -> None:
    file = MemoryNode(bytes(16 * 4096), delay=1.0)
    data = memoryview(_pattern(3 * 4096, 21))
    in_place = [Run(DATA, 0, 4096, 8192), Run(DATA, 4096, 4096, 0), Run(DATA, 8192, 4096, 4096 * 9)]
    start = trio.current_time()
    await write_runs(in_place, 0, data, file, _no_allocation)
    # Parts of one guest write have no order between them: once the first has shown that
    # writes wait, the other two go out together.
    assert trio.current_time() - start == pytest.approx(2.0)
    assert file.data[8192:12288] == data[:4096]
    assert file.data[0:4096] == data[4096:8192]
    assert file.data[9 * 4096 : 10 * 4096] == data[8192:]

    calls: list[tuple[Run, bytes]] = []

    async def allocate(run: Run, chunk: memoryview) -> None:
        calls.append((run, bytes(chunk)))

    mixed = [Run(DATA, 0, 4096, 8192), Run(BACKING, 4096, 4096), Run(ZERO, 8192, 4096)]
    await write_runs(mixed, 0, data, file, allocate)
    assert calls == [(mixed[1], bytes(data[4096:8192])), (mixed[2], bytes(data[8192:]))]


async def _no_allocation(run: Run, chunk: memoryview) -> None:
    raise AssertionError("nothing to allocate")


# -- LruCache: single-flight loads ---------------------------------------------------------------


async def test_concurrent_misses_load_once() -> None:
    cache: LruCache[int, bytes] = LruCache(4)
    loads = 0

    async def loader() -> bytes:
        nonlocal loads
        loads += 1
        await trio.sleep(0.01)
        return b"table"

    results: list[tuple[bytes, bool]] = []

    async def reader() -> None:
        results.append(await cache.load(1, loader))

    async with trio.open_nursery() as nursery:
        for _ in range(10):
            nursery.start_soon(reader)
    assert loads == 1
    assert sorted(hit for _, hit in results) == [False] + [True] * 9
    assert all(value == b"table" for value, _ in results)
    assert not cache.loading(1)
    assert await cache.load(1, loader) == (b"table", True)


async def test_a_failed_load_is_seen_by_every_waiter() -> None:
    cache: LruCache[int, bytes] = LruCache(4)
    loads = 0

    async def loader() -> bytes:
        nonlocal loads
        loads += 1
        await trio.sleep(0.01)
        raise FormatError("bad table", path="x")

    errors = 0

    async def reader() -> None:
        nonlocal errors
        try:
            await cache.load(1, loader)
        except FormatError:
            errors += 1

    async with trio.open_nursery() as nursery:
        for _ in range(3):
            nursery.start_soon(reader)
    # Each waiter retried itself (they are serialised: one load in flight per key).
    assert errors == 3 and loads == 3
    assert len(cache) == 0 and not cache.loading(1)


async def test_a_load_that_overlaps_a_change_is_not_cached() -> None:
    cache: LruCache[int, str] = LruCache(4)
    on_disk = "old"
    started = trio.Event()
    release = trio.Event()

    async def slow_loader() -> str:
        started.set()
        value = on_disk  # read before the change reaches the disk
        await release.wait()
        return value

    async def fast_loader() -> str:
        return on_disk

    async with trio.open_nursery() as nursery:
        first: list[tuple[str, bool]] = []
        waiter: list[tuple[str, bool]] = []

        async def load_first() -> None:
            first.append(await cache.load(1, slow_loader))

        async def load_waiting() -> None:
            waiter.append(await cache.load(1, fast_loader))

        nursery.start_soon(load_first)
        await started.wait()
        nursery.start_soon(load_waiting)
        await trio.testing.wait_all_tasks_blocked()
        with cache.updating():
            on_disk = "new"
        release.set()
    # The first load serves its own request (concurrent with the change) but is not kept; its
    # waiter loaded again and got the new value, which is cached.
    assert first == [("old", False)]
    assert waiter == [("new", False)]
    assert cache.get(1) == "new"
    cache.clear()
    assert len(cache) == 0
