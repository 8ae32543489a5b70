"""The offset filter (nbdkit's ``filters/offset``): the conformance battery over windows of a
raw and a qcow2 disk, read-only and writable; a bad window refused at open; block status and the
backing chain seen through the window, shifted; ownership of the child."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from tests.support.conformance import check_block_node
from tests.support.images import create, qemu_io, random_bytes
from vdiskfs.block.context import OpenOptions, open_image
from vdiskfs.block.holes import read_status
from vdiskfs.block.node import BlockNode
from vdiskfs.drivers.filter.offset import OffsetNode
from vdiskfs.errors import RangeError, UnsupportedError

MiB = 1 << 20
#: Unaligned on purpose: a window need not start on a sector or cluster boundary.
OFFSET = 4096 * 3 + 512
LENGTH = MiB + 1000


@pytest.fixture
def raw_image(tmp_path: Path) -> tuple[Path, bytes]:
    data = random_bytes(7, 3 * MiB + 123)
    path = tmp_path / "disk.img"
    path.write_bytes(data)
    return path, data


def _window_opener(disk: BlockNode, offset: int, length: int | None
                   ) -> Callable[[], Awaitable[OffsetNode]]:
    async def open_window() -> OffsetNode:
        window = OffsetNode(disk, offset=offset, length=length, owns_child=False)
        await window.open()
        return window

    return open_window


@pytest.mark.parametrize("writable", [False, True])
async def test_conformance_over_raw(raw_image: tuple[Path, bytes], writable: bool) -> None:
    path, data = raw_image
    disk = await open_image(str(path), OpenOptions(format="raw", read_only=not writable))
    try:
        await check_block_node(_window_opener(disk, OFFSET, LENGTH),
                               data[OFFSET : OFFSET + LENGTH], writable=writable)
        # Closing a window leaves the disk open; the bytes around the window never changed.
        assert bytes(await disk.pread(0, OFFSET)) == data[:OFFSET]
        assert bytes(await disk.pread(OFFSET + LENGTH, 4096)) == \
            data[OFFSET + LENGTH : OFFSET + LENGTH + 4096]
    finally:
        await disk.aclose()


async def test_conformance_over_qcow2_writable(tmp_path: Path) -> None:
    image = create(tmp_path / "d.qcow2", 4 * MiB)
    qemu_io(image, "write -P 7 0 4M")
    disk = await open_image(str(image), OpenOptions(read_only=False))
    try:
        await check_block_node(_window_opener(disk, MiB, 2 * MiB), b"\x07" * 2 * MiB,
                               writable=True)
    finally:
        await disk.aclose()


async def test_the_rest_of_the_child_without_a_length(raw_image: tuple[Path, bytes]) -> None:
    path, data = raw_image
    async with await open_image(str(path), OpenOptions(format="raw")) as disk:
        window = await _window_opener(disk, OFFSET, None)()
        assert window.size == len(data) - OFFSET
        assert window.info() == {"offset": OFFSET, "range": len(data) - OFFSET}
        assert bytes(await window.pread(window.size - 10, 10)) == data[-10:]


@pytest.mark.parametrize(("offset", "length"), [(3 * MiB + 113, 20), (-1, 10),
                                                (3 * MiB + 124, None), (0, 3 * MiB + 124)])
async def test_a_window_past_the_child_is_refused(raw_image: tuple[Path, bytes], offset: int,
                                                  length: int | None) -> None:
    path, _ = raw_image
    async with await open_image(str(path), OpenOptions(format="raw")) as disk:
        with pytest.raises(RangeError, match=f"{path}: .*exceeds the underlying"):
            await _window_opener(disk, offset, length)()


async def test_a_window_is_never_truncated(raw_image: tuple[Path, bytes]) -> None:
    path, data = raw_image
    async with await open_image(str(path), OpenOptions(format="raw", read_only=False)) as disk:
        window = await _window_opener(disk, OFFSET, LENGTH)()
        with pytest.raises(UnsupportedError, match="cannot be truncated"):
            await window.truncate(10)
        assert disk.size == len(data)


async def test_block_status_and_the_backing_chain_shift(tmp_path: Path) -> None:
    base = create(tmp_path / "base.qcow2", 4 * MiB)
    qemu_io(base, "write -P 1 1M 64k")
    top = create(tmp_path / "top.qcow2", 4 * MiB, backing="base.qcow2", backing_fmt="qcow2")
    qemu_io(top, "write -P 2 2M 64k")
    async with await open_image(str(top)) as disk:
        window = await _window_opener(disk, 512 * 1024, 3 * MiB)()
        # The top's own data, at 2M of the disk: 1.5M of the window.
        assert await window.block_status(1536 * 1024, 64 * 1024) == \
            await disk.block_status(2 * MiB, 64 * 1024)
        # Left to the backing file: the window says so, and leads there, shifted by its offset.
        status, _ = await window.block_status(512 * 1024, 64 * 1024)
        assert status == (await disk.block_status(MiB, 64 * 1024))[0]
        source = window.unallocated_source()
        assert source is not None and source[1] == 512 * 1024
        assert await read_status(window, 512 * 1024, 64 * 1024) == (True, 64 * 1024)
        assert await read_status(window, 0, 64 * 1024) == (False, 64 * 1024)


async def test_the_child_edge_says_who_closes_it(raw_image: tuple[Path, bytes]) -> None:
    path, _ = raw_image
    async with await open_image(str(path), OpenOptions(format="raw")) as disk:
        window = await _window_opener(disk, OFFSET, LENGTH)()
        assert [(edge.role, edge.node, edge.owned) for edge in window.children] == \
            [("file", disk, False)]
        await window.aclose()
        assert len(await disk.pread(0, 10)) == 10
        assert [edge.owned for edge in OffsetNode(disk).children] == [True]
