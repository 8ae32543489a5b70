"""The conformance battery that every driver runs, as trio's ``check_two_way_stream`` does.

``await check_block_node(open_node, reference)`` opens a node with ``open_node()`` and checks the
whole BlockNode contract against ``reference`` (the guest bytes, from ``qemu-img convert``):
size, whole and ranged reads, range errors, block status, concurrency, statistics, read-only
refusal; with ``writable=True`` also write/read-back, zero, discard and flush.
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
    node = await open_node()
    try:
        await _check_reads(node, reference, rng)
        await _check_block_status(node, reference)
        await _check_stats(node)
        if writable:
            await _check_writes(node, bytearray(reference), rng)
        else:
            with pytest.raises(ReadOnlyError):
                await node.pwrite(0, b"x")
    finally:
        await node.aclose()
    await node.aclose()  # idempotent


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


async def _check_writes(node: BlockNode, model: bytearray, rng: random.Random) -> None:
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
    await node.flush()
    assert await _read_all(node) == bytes(model)
    with pytest.raises(NoSpaceError):
        await node.pwrite(size, b"x")
    with pytest.raises(NoSpaceError):
        await node.pwrite(size - 1, b"xy")
