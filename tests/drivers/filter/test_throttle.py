"""The throttle filter: the leaky-bucket arithmetic driven by a fake clock (exact numbers, no
timing), the option parser and QEMU's validation messages, and the node under trio's
MockClock -- FIFO order, cancellation, groups, new limits while requests wait, counters -- and
the conformance battery."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
import trio.testing

from tests.support.conformance import check_block_node
from tests.support.images import random_bytes
from vdiskfs.drivers.filter.throttle import (
    ThrottleGroup,
    ThrottleGroups,
    ThrottleNode,
    throttled,
)
from vdiskfs.drivers.filter.throttle_buckets import (
    NS_PER_SECOND,
    Direction,
    ThrottleLimits,
    ThrottleState,
    parse_throttle,
)
from vdiskfs.drivers.protocol.file import FileNode
from vdiskfs.errors import RangeError, VdiskError

MS = 1_000_000
READ, WRITE = Direction.READ, Direction.WRITE


def limits(text: str) -> ThrottleLimits:
    spec = parse_throttle(text)
    assert spec.limits is not None
    return spec.limits


# -- the buckets, with a fake clock -----------------------------------------------------------


def test_no_limit_never_waits() -> None:
    state = ThrottleState(ThrottleLimits(), 0)
    for i in range(100):
        assert state.wait_ns(READ, i) == 0
        state.account(READ, 1 << 30)


def test_a_bucket_holds_a_tenth_of_a_second_then_leaks_at_the_rate() -> None:
    state = ThrottleState(limits("bps-read=1000"), 0)
    # The bucket takes 100 bytes (0.1 s of the rate) before anything waits.
    assert state.wait_ns(READ, 0) == 0
    state.account(READ, 100)
    assert state.wait_ns(READ, 0) == 0  # level 100: full, not over
    state.account(READ, 100)
    assert state.wait_ns(READ, 0) == 100 * MS  # 100 bytes over at 1000 B/s
    assert state.wait_ns(READ, 50 * MS) == 50 * MS  # half of it leaked
    assert state.wait_ns(READ, 100 * MS) == 0
    # Writes fill and wait on their own bucket only.
    assert state.wait_ns(WRITE, 100 * MS) == 0
    state.account(WRITE, 10**9)
    assert state.wait_ns(READ, 100 * MS) == 0


def test_a_request_is_charged_in_full_when_it_starts() -> None:
    state = ThrottleState(limits("bps-total=1000"), 0)
    state.account(WRITE, 5000)  # one large request passes an empty bucket...
    # ...and the next of either direction waits until it has leaked to 100 bytes.
    assert state.wait_ns(READ, 0) == 4900 * MS
    assert state.wait_ns(WRITE, 4 * NS_PER_SECOND) == 900 * MS


def test_the_longest_wait_of_every_bucket_counts() -> None:
    state = ThrottleState(limits("bps-read=1000,iops-read=10"), 0)
    for _ in range(3):
        state.account(READ, 10)
    # iops: 3 requests in a bucket of 1: 2 over at 10/s = 200 ms; bytes: under.
    assert state.wait_ns(READ, 0) == 200 * MS
    state.account(READ, 1000)
    # bytes now 1030 in a bucket of 100: 930 over at 1000 B/s.
    assert state.wait_ns(READ, 0) == 930 * MS


def test_iops_size_counts_large_requests_as_several() -> None:
    state = ThrottleState(limits("iops-total=10,iops-size=4096"), 0)
    state.account(READ, 4 * 4096)  # 4 ios
    assert state.levels()[3] == 4.0
    state.account(WRITE, 100)  # small: 1 io
    assert state.levels()[3] == 5.0
    assert state.wait_ns(READ, 0) == 400 * MS


def test_burst_rate_for_a_burst_length() -> None:
    state = ThrottleState(limits("iops-total=10,iops-total-max=100,iops-total-max-length=2"), 0)
    # The main bucket takes 200 ios (max * length); the burst bucket 10 (a tenth of max), and
    # leaks at 100/s: a burst runs at 100 ios/s.
    t = 0
    for _ in range(10):
        assert state.wait_ns(READ, t) == 0
        state.account(READ, 512)
    state.account(READ, 512)
    assert state.wait_ns(READ, t) == 10 * MS  # 1 over the burst bucket, at 100/s
    # Keep issuing as fast as allowed: for the first 2 s the burst rate holds (the main
    # bucket fills at 100 - 10 ios/s, so it is full only after 2.2 s)...
    count, t = 11, 10 * MS
    while t < 2 * NS_PER_SECOND:
        t += state.wait_ns(READ, t)
        state.account(READ, 512)
        count += 1
    assert count == pytest.approx(11 + 199, abs=2)  # the burst bucket's, then 100/s
    while t < 5 * NS_PER_SECOND:
        t += state.wait_ns(READ, t)
        state.account(READ, 512)
    # ...then the average.
    start, count = t, 0
    while t < start + 10 * NS_PER_SECOND:
        t += state.wait_ns(READ, t)
        state.account(READ, 512)
        count += 1
    assert count == pytest.approx(100, abs=2)  # 10 s at 10 ios/s


@pytest.mark.parametrize("text, rate, bucket", [("bps-read=52428800", 50 << 20, 5 << 20),
                                                ("iops-read=2000", 2000, 200),
                                                ("bps-read=1M,bps-read-max=4M", 1 << 20, 4 << 20)])
def test_a_greedy_reader_gets_the_rate(text: str, rate: int, bucket: int) -> None:
    """Requests issued as soon as allowed, for 60 simulated seconds, get the configured
    average, plus the bucket's size once (what passes before the first wait)."""
    state = ThrottleState(limits(text), 0)
    t = bytes_done = ops = 0
    while t < 60 * NS_PER_SECOND:
        t += state.wait_ns(READ, t)
        state.account(READ, 65536)
        bytes_done += 65536
        ops += 1
    done = bytes_done if text.startswith("bps") else ops
    assert done == pytest.approx(rate * t / NS_PER_SECOND + bucket, rel=0.005)


def test_new_limits_start_from_empty_buckets() -> None:
    state = ThrottleState(limits("bps-read=1000"), 0)
    state.account(READ, 10_000)
    assert state.wait_ns(READ, 0) > 0
    state.configure(limits("bps-read=2000"), 0)
    assert state.wait_ns(READ, 0) == 0
    assert state.levels() == (0.0,) * 6


# -- options -------------------------------------------------------------------------------------


def test_parse_sizes_numbers_and_group() -> None:
    spec = parse_throttle("bps-read=50M, iops-total=2000,iops-total-max=3000,"
                          "iops-total-max-length=5,iops-size=4k,group=web")
    assert spec.group == "web"
    assert spec.limits is not None
    assert spec.limits.buckets[1].avg == 50 << 20
    assert spec.limits.buckets[3].avg == 2000
    assert spec.limits.buckets[3].max == 3000
    assert spec.limits.buckets[3].max_length == 5
    assert spec.limits.iops_size == 4096
    again = parse_throttle(spec.limits.options())
    assert again.limits == spec.limits
    assert parse_throttle("group=g").limits is None


@pytest.mark.parametrize("text, option, message", [
    ("bps-read=-1", "bps-read", "negative"),
    ("iops-total=-5", "iops-total", "negative"),
    ("iops-total=1.5", "iops-total", "not a whole number"),
    ("bps-write=0", "bps-write", "is zero"),
    ("iops-size=0", "iops-size", "is zero"),
    ("bps-read=fast", "bps-read", "invalid"),
    ("speed=1", "speed", "unknown throttle option"),
    ("bps-read", "bps-read", "needs a value"),
    ("bps-read=", "bps-read", "needs a value"),
    ("bps-read=1,bps-read=2", "bps-read", "given twice"),
    ("bps-read=2000000000000000", "bps-read", r"within \[0, 1000000000000000\]"),
    ("bps-read=1E", "bps-read", "within"),
    ("iops-read=10,iops-read-max=5", "iops-read-max", "cannot be lower than"),
    ("iops-read-max=5", "iops-read-max", "require corresponding"),
    ("iops-read=10,iops-read-max-length=3", "iops-read-max-length", "without burst rate"),
    ("iops-read=1,iops-read-max=2,iops-read-max-length=0", "iops-read-max-length",
     "is zero"),
    ("iops-read=1,iops-read-max=2,iops-read-max-length=4294967296", "iops-read-max-length",
     "range"),
    ("bps-read=1,bps-read-max=1000000000000,bps-read-max-length=100000", "bps-read-max-length",
     "too high"),
    ("bps-total=1,bps-read=1", "bps-total", "cannot be used at the same time"),
    ("iops-total=1,iops-total-max=2,iops-write=1,iops-write-max=2", "iops-total",
     "same time"),
    ("bps-read=1,iops-size=4k", "iops-size", "requires an iops value"),
    ("group=a/b", "group", "not a group name"),
    ("group=" + "x" * 200, "group", "not a group name"),
])
def test_bad_options_name_the_option(text: str, option: str, message: str) -> None:
    with pytest.raises(RangeError, match=message) as info:
        parse_throttle(text, source="--throttle")
    assert info.value.field == option
    assert str(info.value).startswith(f"--throttle: field {option}: ")


def test_disk_options_keep_their_prefix() -> None:
    with pytest.raises(VdiskError, match=r"field throttle\.iops-total"):
        parse_throttle("iops-total=-1", source="--disk", prefix="throttle.")


# -- the node, on trio's mock clock --------------------------------------------------------------


async def _file(tmp_path: Path, size: int = 1 << 20, read_only: bool = True) -> FileNode:
    path = tmp_path / "disk"
    if not path.exists():
        path.write_bytes(random_bytes(7, size))
    node = FileNode(str(path), read_only=read_only)
    await node.open()
    return node


async def _node(tmp_path: Path, text: str, groups: ThrottleGroups | None = None,
                name: str = "g") -> ThrottleNode:
    return await throttled(await _file(tmp_path), groups or ThrottleGroups(),
                           parse_throttle(text), name)


async def _drain(clock: trio.testing.MockClock, step: float, done: list[int], n: int) -> None:
    for _ in range(10_000):
        await trio.testing.wait_all_tasks_blocked()
        if len(done) == n:
            return
        clock.jump(step)
    raise AssertionError("requests never finished")


async def test_waiting_requests_start_in_arrival_order(
        tmp_path: Path, mock_clock: trio.testing.MockClock) -> None:
    node = await _node(tmp_path, "iops-read=10")
    done: list[int] = []
    async with node, trio.open_nursery() as nursery:

        async def read(i: int) -> None:
            await node.pread(i * 4096, 4096)
            done.append(i)

        for i in range(8):
            nursery.start_soon(read, i)
            await trio.testing.wait_all_tasks_blocked()
        assert node.counters.queued_reads == 6  # two fit the bucket (a tenth of a second)
        assert node.group.queue_length(READ) == 6
        await _drain(mock_clock, 0.01, done, 8)
    assert done == list(range(8))
    assert node.counters.queued_reads == 0
    assert node.counters.throttled_reads == 6
    # Waits of 100, 200, ... 600 ms, as the clock moved in steps of 10 ms.
    assert node.counters.throttled_ns == pytest.approx(2100 * MS, abs=60 * MS)


async def test_a_cancelled_waiter_leaves_the_queue_and_hands_on_its_turn(
        tmp_path: Path, mock_clock: trio.testing.MockClock) -> None:
    node = await _node(tmp_path, "iops-read=10")
    done: list[int] = []
    async with node, trio.open_nursery() as nursery:
        scopes: dict[int, trio.CancelScope] = {}

        async def read(i: int) -> None:
            with trio.CancelScope() as scopes[i]:
                await node.pread(0, 512)
                done.append(i)

        for i in range(5):
            nursery.start_soon(read, i)
            await trio.testing.wait_all_tasks_blocked()
        assert node.group.queue_length(READ) == 3  # 2, 3 and 4 wait; 2 is the head
        levels = node.group._buckets().levels()
        scopes[2].cancel()  # the head
        scopes[3].cancel()  # one in the middle
        await trio.testing.wait_all_tasks_blocked()
        assert node.group.queue_length(READ) == 1
        assert node.group._buckets().levels() == levels  # nothing charged
        await _drain(mock_clock, 0.01, done, 3)
    assert done == [0, 1, 4]
    assert node.counters.queued_reads == 0


async def test_members_of_a_group_share_one_budget(
        tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    groups = ThrottleGroups()
    a = await _node(tmp_path, "iops-total=10,group=shared", groups)
    b = await throttled(await _file(tmp_path), groups, parse_throttle("group=shared"), "other")
    assert a.group is b.group
    async with a, b:
        await a.pread(0, 512)
        await a.pread(0, 512)  # the bucket is full now
        with trio.move_on_after(0.05):
            await b.pread(0, 512)
        assert b.counters.throttled_reads == 0  # cancelled before it could start
        before = trio.current_time()
        await b.pread(0, 512)
        assert trio.current_time() - before == pytest.approx(0.05, abs=0.01)
        assert b.counters.throttled_reads == 1
    # A separate group, or other limits for the same one, are refused or separate.
    other = await _node(tmp_path, "iops-total=10", groups, name="c")
    assert other.group is not a.group
    await other.aclose()
    with pytest.raises(RangeError, match="has the limits"):
        await _node(tmp_path, "iops-total=20,group=shared", groups)


async def test_new_limits_wake_the_waiting_requests(
        tmp_path: Path, mock_clock: trio.testing.MockClock) -> None:
    node = await _node(tmp_path, "bps-read=1000")
    done: list[int] = []
    async with node, trio.open_nursery() as nursery:

        async def read(i: int) -> None:
            await node.pread(0, 4096)
            done.append(i)

        for i in range(4):
            nursery.start_soon(read, i)
            await trio.testing.wait_all_tasks_blocked()
        assert done == [0]  # 4096 bytes at 1000 B/s: seconds for each of the others
        control = node.controls()[0]
        assert control.name == "throttle"
        assert control.read() == "bps-read=1000,group=g\n"
        with pytest.raises(RangeError, match="cannot change while open"):
            control.write("bps-read=1M,group=other")
        with pytest.raises(RangeError, match="negative"):
            control.write("bps-read=-1M")
        assert control.read() == "bps-read=1000,group=g\n"
        control.write("bps-read=1G\n")
        await trio.testing.wait_all_tasks_blocked()
        assert done == [0, 1, 2, 3]  # without the clock moving
        assert node.counters.throttled_reads == 3 and node.counters.throttled_ns == 0
        assert control.read() == "bps-read=1073741824,group=g\n"
        control.write("")
        assert not node.group.limits.enabled


async def test_writes_zeroes_and_discards_count_as_writes(
        tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    groups = ThrottleGroups()
    node = await throttled(await _file(tmp_path, read_only=False), groups,
                           parse_throttle("iops-write=10"), "w")
    async with node:
        await node.pwrite(0, b"x" * 512)
        await node.zero(4096, 4096)
        await node.discard(8192, 4096)
        await node.pread(0, 512)  # reads are not limited
        assert node.counters.throttled_writes == 1
        assert node.counters.throttled_reads == 0
        assert trio.current_time() == pytest.approx(0.1)
        await node.flush()


async def test_conformance(tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    data = random_bytes(11, 2 * 1024 * 1024 + 77)
    path = tmp_path / "f"
    path.write_bytes(data)
    groups = ThrottleGroups()
    spec = parse_throttle("bps-total=4M,iops-total=100,iops-total-max=200")

    async def open_node(read_only: bool = True) -> ThrottleNode:
        file = FileNode(str(path), read_only=read_only)
        await file.open()
        return await throttled(file, groups, spec, "conformance")

    await check_block_node(open_node, data)
    await check_block_node(lambda: open_node(False), data, writable=True)
    assert isinstance(groups.join("conformance", None, who="t"), ThrottleGroup)
