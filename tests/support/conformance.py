"""The conformance battery that every driver runs, as trio's ``check_two_way_stream`` does.

``await check_block_node(open_node, reference)`` opens a node with ``open_node()`` and checks the
whole BlockNode contract against ``reference`` (the guest bytes, from ``qemu-img convert``):
size, whole and ranged reads, range errors, block status, concurrency, statistics, read-only
refusal; with ``writable=True`` also write/read-back, zero, discard and flush.

Concurrency is checked on freshly opened nodes, whose metadata caches are cold, so that readers
meet in table loads and in the run executor: many readers of overlapping and disjoint ranges
at once; with ``writable=True`` also writers of disjoint ranges among readers of the ranges in
between (ranges that may share a cluster with a write: the reader must not see the allocation
half done).
"""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable

import pytest
import trio

from vdiskfs.block.node import BlockNode, BlockStatus
from vdiskfs.errors import NoSpaceError, RangeError, ReadOnlyError

OpenNode = Callable[[], Awaitable[BlockNode]]


async def _read_all(node: BlockNode, chunk: int = 1 << 20) -> bytes:
    parts = []
    for offset in range(0, node.size, chunk):
        parts.append(bytes(await node.pread(offset, min(chunk, node.size - offset))))
    return b"".join(parts)


async def check_block_node(open_node: OpenNode, reference: bytes, *, writable: bool = False,
                           seed: int = 1) -> None:
    rng = random.Random(seed)
    await _check_cold_readers(open_node, reference, rng)
    node = await open_node()
    try:
        await _check_reads(node, reference, rng)
        await _check_block_status(node, reference)
        await _check_stats(node)
        if writable:
            model = await _check_writes(node, bytearray(reference), rng)
        else:
            with pytest.raises(ReadOnlyError):
                await node.pwrite(0, b"x")
    finally:
        await node.aclose()
    await node.aclose()  # idempotent
    if writable:
        await _check_cold_writers(open_node, model, rng)


def _concurrent_ranges(size: int, rng: random.Random, count: int) -> list[tuple[int, int]]:
    """Ranges for concurrent readers: random ones, some repeated exactly, some overlapping
    their neighbour, some small ones inside one spot (readers of the same table or cluster)."""
    ranges: list[tuple[int, int]] = []
    spot = rng.randrange(0, size)
    for i in range(count):
        if i % 4 == 0 or not ranges:
            offset = rng.randrange(0, size)
            length = rng.randrange(1, 300_000)
        elif i % 4 == 1:
            offset, length = ranges[-1]  # the same range again
        elif i % 4 == 2:
            offset = min(size - 1, ranges[-1][0] + ranges[-1][1] // 2)  # overlapping
            length = rng.randrange(1, 70_000)
        else:
            offset = min(size - 1, spot + rng.randrange(0, 8192))
            length = rng.randrange(1, 4096)
        ranges.append((offset, min(length, size - offset)))
    return ranges


async def _read_concurrently(node: BlockNode, ranges: list[tuple[int, int]]) -> list[bytes]:
    results: list[bytes] = [b""] * len(ranges)

    async def reader(i: int, offset: int, length: int) -> None:
        results[i] = bytes(await node.pread(offset, length))

    async with trio.open_nursery() as nursery:
        for i, (offset, length) in enumerate(ranges):
            nursery.start_soon(reader, i, offset, length)
    return results


async def _check_cold_readers(open_node: OpenNode, reference: bytes,
                              rng: random.Random) -> None:
    node = await open_node()
    try:
        ranges = _concurrent_ranges(len(reference), rng, 48)
        results = await _read_concurrently(node, ranges)
        for (offset, length), got in zip(ranges, results, strict=True):
            assert got == reference[offset : offset + length], (
                f"concurrent read at {offset}+{length} differs from the reference")
        assert node.stats.in_flight == 0
    finally:
        await node.aclose()


async def _check_cold_writers(open_node: OpenNode, model: bytearray,
                              rng: random.Random) -> None:
    """Writers of disjoint ranges and readers of the ranges between them, all at once, on a
    freshly opened node; then everything reads back as the model, there and after reopening."""
    size = len(model)
    node = await open_node()
    try:
        cuts = sorted(rng.sample(range(1, size), min(size - 1, 31)))
        pieces = list(zip([0, *cuts], [*cuts, size], strict=True))
        writes = [(start, rng.randbytes(end - start)) for start, end in pieces[0::2]]
        reads = [(start, end - start) for start, end in pieces[1::2]]
        expected = [bytes(model[start : start + length]) for start, length in reads]
        results: list[bytes] = [b""] * len(reads)

        async def writer(offset: int, data: bytes) -> None:
            await node.pwrite(offset, data)

        async def reader(i: int, offset: int, length: int) -> None:
            results[i] = bytes(await node.pread(offset, length))

        async with trio.open_nursery() as nursery:
            for i, (offset, length) in enumerate(reads):
                nursery.start_soon(reader, i, offset, length)
                if i < len(writes):
                    nursery.start_soon(writer, *writes[i])
            for offset, data in writes[len(reads):]:
                nursery.start_soon(writer, offset, data)
        for (offset, length), got, want in zip(reads, results, expected, strict=True):
            assert got == want, f"read at {offset}+{length} among concurrent writes differs"
        for offset, data in writes:
            model[offset : offset + len(data)] = data
        assert await _read_all(node) == bytes(model)
        await node.flush()
        assert node.stats.in_flight == 0
    finally:
        await node.aclose()
    node = await open_node()
    try:
        assert await _read_all(node) == bytes(model)
    finally:
        await node.aclose()


async def _check_reads(node: BlockNode, reference: bytes, rng: random.Random) -> None:
    size = len(reference)
    assert node.size == size, f"size {node.size} != reference {size}"
    assert await _read_all(node) == reference
    assert await node.pread(0, 0) == b""
    assert await node.pread(size, 0) == b""
    for _ in range(200):
        offset = rng.randrange(0, size)
        length = rng.randrange(0, min(size - offset, 300_000) + 1)
        got = await node.pread(offset, length)
        assert len(got) == length
        assert got == reference[offset : offset + length], f"mismatch at {offset}+{length}"
    # Past the end, straddling the end, negative: refused, and counted as invalid.
    invalid_before = node.stats.invalid[0]
    for offset, length in ((size, 1), (size - 1, 2), (-1, 1), (0, size + 1)):
        with pytest.raises(RangeError):
            await node.pread(offset, length)
    assert node.stats.invalid[0] == invalid_before + 4
    # Many concurrent readers see exactly the reference.
    results: dict[int, bytes] = {}
    ranges = [(rng.randrange(0, size), rng.randrange(1, 70_000)) for _ in range(64)]

    async def reader(i: int, offset: int, length: int) -> None:
        length = min(length, size - offset)
        results[i] = bytes(await node.pread(offset, length))

    async with trio.open_nursery() as nursery:
        for i, (offset, length) in enumerate(ranges):
            nursery.start_soon(reader, i, offset, length)
    for i, (offset, length) in enumerate(ranges):
        length = min(length, size - offset)
        assert results[i] == reference[offset : offset + length]


async def _check_block_status(node: BlockNode, reference: bytes) -> None:
    offset = 0
    runs = 0
    while offset < node.size:
        status, run = await node.block_status(offset, node.size - offset)
        assert 0 < run <= node.size - offset
        if status & BlockStatus.ZERO:
            assert reference[offset : offset + run] == bytes(run), f"ZERO run at {offset} not zero"
        offset += run
        runs += 1
        assert runs <= node.size  # terminates
    with pytest.raises(RangeError):
        await node.block_status(node.size, 1)


async def _check_stats(node: BlockNode) -> None:
    before = node.stats_snapshot()
    await node.pread(0, min(4096, node.size))
    after = node.stats_snapshot().as_dict()
    assert after["rd_operations"] == before.as_dict()["rd_operations"] + 1
    assert after["rd_bytes"] == before.as_dict()["rd_bytes"] + min(4096, node.size)
    assert after["rd_total_time_ns"] >= before.as_dict()["rd_total_time_ns"]


async def _check_writes(node: BlockNode, model: bytearray, rng: random.Random) -> bytearray:
    size = len(model)
    for _ in range(50):
        offset = rng.randrange(0, size)
        length = rng.randrange(1, min(size - offset, 200_000) + 1)
        data = rng.randbytes(length)
        await node.pwrite(offset, data)
        model[offset : offset + length] = data
    offset = rng.randrange(0, size // 2)
    length = min(size - offset, 100_000)
    await node.zero(offset, length)
    model[offset : offset + length] = bytes(length)
    await _check_discard(node, model, random.Random(rng.random()))
    await node.flush()
    assert await _read_all(node) == bytes(model)
    with pytest.raises(NoSpaceError):
        await node.pwrite(size, b"x")
    with pytest.raises(NoSpaceError):
        await node.pwrite(size - 1, b"xy")
    for verb in (node.zero, node.discard):
        with pytest.raises(NoSpaceError):
            await verb(size - 1, 2)
        with pytest.raises(RangeError):
            await verb(-1, 1)
    return model


async def _check_discard(node: BlockNode, model: bytearray, rng: random.Random) -> None:
    """A discard changes nothing outside its range, and inside leaves each byte as it was or
    zero (what a driver cannot deallocate it keeps); the model takes what the node reads."""
    size = len(model)
    offset = rng.randrange(0, size)
    length = min(size - offset, rng.randrange(1, 300_000))
    await node.discard(offset, length)
    end = offset + length
    got = bytes(await node.pread(max(0, offset - 4096), min(size, end + 4096)
                                 - max(0, offset - 4096)))
    start = max(0, offset - 4096)
    assert got[: offset - start] == model[start:offset], "discard changed bytes before it"
    assert got[end - start :] == model[end : min(size, end + 4096)], "discard changed bytes after"
    inside = got[offset - start : end - start]
    old = model[offset:end]
    assert inside == old or not any(inside) or all(
        b == 0 or b == o for b, o in zip(inside, old, strict=True)), (
        "discarded bytes read as neither old nor zero")
    model[offset:end] = inside
