"""The BlockNode contract enforced by the base class, with a tiny in-memory driver."""

from __future__ import annotations

import pytest

from vdiskfs.block.node import BlockNode, BlockStatus, Buffer, FilterNode
from vdiskfs.errors import NoSpaceError, RangeError, ReadOnlyError, UnsupportedError


class MemoryNode(BlockNode):
    driver = "memory"

    def __init__(self, data: bytes, read_only: bool = False) -> None:
        super().__init__(read_only=read_only, label="mem")
        self.data = bytearray(data)
        self.size = len(data)
        self.closed = 0

    async def _pread(self, offset: int, length: int) -> Buffer:
        return bytes(self.data[offset : offset + length])

    async def _pwrite(self, offset: int, data: Buffer) -> None:
        self.data[offset : offset + len(data)] = data

    async def _close(self) -> None:
        self.closed += 1


class Failing(MemoryNode):
    async def _pread(self, offset: int, length: int) -> Buffer:
        raise UnsupportedError("nope")


async def test_ranges_are_checked_and_counted() -> None:
    node = MemoryNode(b"abcdef")
    for offset, length in ((-1, 1), (0, 7), (6, 1), (5, 2)):
        with pytest.raises(RangeError, match="outside the node"):
            await node.pread(offset, length)
    assert node.stats.invalid[0] == 4 and node.stats.ops[0] == 0
    with pytest.raises(NoSpaceError):
        await node.pwrite(5, b"xy")
    await node.pwrite(4, b"XY")
    assert await node.pread(0, 6) == b"abcdXY"
    assert node.stats_snapshot().as_dict()["wr_highest_offset"] == 6


async def test_read_only_and_failures() -> None:
    node = MemoryNode(b"abc", read_only=True)
    with pytest.raises(ReadOnlyError):
        await node.pwrite(0, b"x")
    with pytest.raises(ReadOnlyError):
        await node.zero(0, 1)
    await node.flush()  # nothing to flush on a read-only node
    failing = Failing(b"abc")
    with pytest.raises(UnsupportedError):
        await failing.pread(0, 1)
    assert failing.stats.failed[0] == 1 and failing.stats.in_flight == 0


async def test_generic_zero_and_default_status() -> None:
    node = MemoryNode(b"\xff" * (3 << 20))
    await node.zero(10, (2 << 20) + 5)
    assert await node.pread(0, 10) == b"\xff" * 10
    assert await node.pread(10, (2 << 20) + 5) == bytes((2 << 20) + 5)
    assert await node.block_status(0, 100) == (BlockStatus.DATA | BlockStatus.ALLOCATED, 100)


async def test_filter_passes_through_and_tree_closes_once() -> None:
    inner = MemoryNode(b"0123456789")
    outer = FilterNode(inner)
    await outer.open()
    assert outer.size == 10 and outer.read_only is False
    assert await outer.pread(2, 3) == b"234"
    await outer.pwrite(0, b"ab")
    assert inner.data[:2] == b"ab"
    assert inner.stats.ops[0] == 1 and outer.stats.ops[0] == 1  # both layers account
    assert [(d, r, n.driver) for d, r, n in outer.walk()] == [(0, "", "?"), (1, "file", "memory")]
    await outer.aclose()
    await outer.aclose()
    assert inner.closed == 1


class Cuttable(MemoryNode):
    async def truncate(self, size: int) -> None:
        del self.data[size:]
        self.size = size


async def test_truncate_is_refused_unless_a_file_does_it() -> None:
    """Only nodes that can cut themselves (``file``) truncate; filters pass it on unless they
    are read-only; everything else refuses."""
    with pytest.raises(UnsupportedError, match="truncating"):
        await MemoryNode(b"abcdef").truncate(3)
    cuttable = Cuttable(b"abcdef")
    window = FilterNode(cuttable)
    await window.open()
    await window.truncate(4)
    assert cuttable.data == b"abcd" and window.size == 4
    view = FilterNode(cuttable, read_only=True)
    await view.open()
    with pytest.raises(ReadOnlyError):
        await view.truncate(2)
    assert cuttable.data == b"abcd"
