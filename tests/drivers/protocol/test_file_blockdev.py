"""The file protocol node over a block device: discard and write-zeroes reach the kernel.

A loop device over a sparse file on the test machine stands in for a disk: the loop driver
turns a discard, and a write-zeroes that may unmap, into a hole punched in its backing file,
so the backing file's allocated blocks show what reached the device. ``--sector-size 4096``
gives partial sectors at the edges of unaligned requests.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.support.images import random_bytes
from tests.support.mount import loop_device
from vdiskfs.drivers.protocol import _linux
from vdiskfs.drivers.protocol.file import FileNode
from vdiskfs.errors import HostIOError

MiB = 1 << 20
SIZE = 8 * MiB


def _loop_usable() -> bool:
    if os.geteuid() != 0 or not shutil.which("losetup") or not os.path.exists(
            "/dev/loop-control"):
        return False
    return subprocess.run(["losetup", "--find"], capture_output=True).returncode == 0


pytestmark = pytest.mark.skipif(not _loop_usable(), reason="needs root and a free loop device")


def _allocated(path: Path) -> int:
    return os.stat(path).st_blocks * 512


def _backing(tmp_path: Path) -> tuple[Path, bytes]:
    """An 8 MiB file, its first 6 MiB written with random bytes (allocated), the rest a hole."""
    data = random_bytes(11, 6 * MiB)
    path = tmp_path / "disk.img"
    with open(path, "wb") as f:
        f.write(data)
        f.truncate(SIZE)
        os.fsync(f.fileno())
    return path, data + bytes(SIZE - len(data))


@pytest.fixture(params=[512, 4096], ids=["sector512", "sector4096"])
async def device(request: pytest.FixtureRequest,
                 tmp_path: Path) -> AsyncIterator[tuple[FileNode, Path, bytearray]]:
    """``(node, backing file, expected bytes)``: a writable FileNode on a loop device."""
    backing, data = _backing(tmp_path)
    with loop_device(backing, read_only=False, sector_size=request.param) as dev:
        node = FileNode(dev, read_only=False)
        await node.open()
        try:
            assert node.is_block_device and node.size == SIZE
            assert node.sector_size == request.param
            yield node, backing, bytearray(data)
        finally:
            await node.aclose()


async def test_discard_punches_the_backing_file(
        device: tuple[FileNode, Path, bytearray]) -> None:
    node, backing, expected = device
    before = _allocated(backing)
    syscalls = node.counters.syscalls
    await node.discard(1 * MiB, 2 * MiB)
    assert node.counters.syscalls == syscalls + 1  # one BLKDISCARD
    assert before - _allocated(backing) >= 2 * MiB
    # A loop device's discarded sectors read as zeros (the backing file's hole).
    expected[1 * MiB : 3 * MiB] = bytes(2 * MiB)
    assert await node.pread(0, SIZE) == expected
    stats = node.stats_snapshot().as_dict()
    assert stats["unmap_operations"] == 1 and stats["unmap_bytes"] == 2 * MiB
    assert stats["failed_unmap_operations"] == 0
    assert stats["zero_operations"] == 0 and stats["wr_operations"] == 0


async def test_discard_leaves_partial_sectors_alone(
        device: tuple[FileNode, Path, bytearray]) -> None:
    node, _, expected = device
    sector = node.sector_size
    offset, length = 3 * MiB + 100, 4 * sector
    await node.discard(offset, length)
    # Only the whole sectors inside the range are discarded: the partial ones at both ends
    # keep their bytes.
    start, end = 3 * MiB + sector, 3 * MiB + 4 * sector
    expected[start:end] = bytes(end - start)
    assert await node.pread(0, SIZE) == expected
    assert node.stats_snapshot().as_dict()["unmap_bytes"] == length  # what was asked


async def test_discard_smaller_than_a_sector_does_nothing(
        device: tuple[FileNode, Path, bytearray]) -> None:
    node, _, expected = device
    syscalls = node.counters.syscalls
    await node.discard(5 * MiB + 1, node.sector_size - 2)
    assert node.counters.syscalls == syscalls
    assert await node.pread(5 * MiB, MiB) == expected[5 * MiB : 6 * MiB]


@pytest.mark.parametrize("may_unmap", [False, True], ids=["zeroout", "unmap"])
async def test_zero_reads_back_zeros(device: tuple[FileNode, Path, bytearray],
                                     may_unmap: bool) -> None:
    node, backing, expected = device
    before = _allocated(backing)
    offset, length = 1 * MiB + 1000, 3 * MiB  # partial sectors at both ends
    await node.zero(offset, length, may_unmap=may_unmap)
    expected[offset : offset + length] = bytes(length)
    assert await node.pread(0, SIZE) == expected
    stats = node.stats_snapshot().as_dict()
    assert stats["zero_operations"] == 1 and stats["zero_bytes"] == length
    assert stats["failed_zero_operations"] == 0 and stats["unmap_operations"] == 0
    # The edges were written as zeros (two small writes), the middle zeroed by the kernel.
    assert node.counters.pwrite_calls == 2
    freed = before - _allocated(backing)
    if may_unmap:
        # The loop device punched the whole sectors out of its file.
        assert freed >= length - 2 * node.sector_size - 4096, freed
    else:
        assert freed < MiB, freed  # BLKZEROOUT keeps the blocks (zeroed in place)


async def test_zero_within_one_sector_is_written(
        device: tuple[FileNode, Path, bytearray]) -> None:
    node, _, expected = device
    offset = 2 * MiB + 10
    await node.zero(offset, 20, may_unmap=True)
    expected[offset : offset + 20] = bytes(20)
    assert await node.pread(2 * MiB, 4096) == expected[2 * MiB : 2 * MiB + 4096]
    assert node.counters.pwrite_calls == 1


async def test_unsupported_device_falls_back(device: tuple[FileNode, Path, bytearray],
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """A device without discard keeps its data; one without write-zeroes gets zeros written."""
    node, _, expected = device

    def unsupported(*args: object) -> None:
        raise OSError(errno.EOPNOTSUPP, os.strerror(errno.EOPNOTSUPP))

    monkeypatch.setattr(_linux, "blk_range_ioctl", unsupported)
    monkeypatch.setattr(_linux, "fallocate", unsupported)
    await node.discard(1 * MiB, 2 * MiB)
    assert await node.pread(0, SIZE) == expected
    await node.zero(4 * MiB, 2 * MiB, may_unmap=True)
    expected[4 * MiB : 6 * MiB] = bytes(2 * MiB)
    assert await node.pread(0, SIZE) == expected
    stats = node.stats_snapshot().as_dict()
    assert stats["unmap_operations"] == 1 and stats["failed_unmap_operations"] == 0
    assert stats["zero_operations"] == 1 and stats["failed_zero_operations"] == 0
    assert node.counters.pwrite_calls >= 2  # the fallback wrote the zeros (1 MiB chunks)


async def test_other_errors_fail_the_request(device: tuple[FileNode, Path, bytearray],
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    node, _, _ = device

    def broken(*args: object) -> None:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(_linux, "blk_range_ioctl", broken)
    with pytest.raises(HostIOError, match="discard failed"):
        await node.discard(0, MiB)
    assert node.stats_snapshot().as_dict()["failed_unmap_operations"] == 1
