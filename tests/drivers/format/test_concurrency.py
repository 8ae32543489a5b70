"""Concurrent readers of every format's metadata: a table, bitmap or compressed cluster that
several readers miss on together is read once, and every reader gets QEMU's bytes.

The image's file is wrapped in a filter whose every request first yields to the other tasks
(:class:`~tests.support.faulty.FaultyFile` with ``jitter=1.0``), as a host read that misses the
page cache does: without single-flight loads, every reader would start its own load of the
same table.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio

from tests.support.faulty import FaultyFile
from tests.support.images import create, qemu_img, qemu_io, random_bytes, reference_raw
from tests.support.vpc_images import Block, VhdSpec, build_vhd
from vdiskfs.block.context import OpenContext, OpenOptions
from vdiskfs.block.format import FormatNode
from vdiskfs.block.node import BlockNode, Buffer, FilterNode, opened
from vdiskfs.drivers.format.qcow2 import Qcow2Node
from vdiskfs.drivers.format.qed import QedNode
from vdiskfs.drivers.format.vhdx import VhdxNode
from vdiskfs.drivers.format.vmdk import VmdkNode
from vdiskfs.drivers.format.vpc import VpcNode
from vdiskfs.drivers.protocol.file import FileNode

KiB = 1024
MiB = 1024 * KiB
READERS = 16


@dataclass(frozen=True)
class Case:
    """An image whose range ``[offset, offset + 64 KiB)`` is mapped by one table (or lies in one
    compressed cluster) that no open reads; ``counter`` counts the loads of it."""

    build: Callable[[Path], tuple[Path, bytes]]
    node_class: Callable[[BlockNode, OpenContext], FormatNode]
    counter: str
    offset: int = 1 * MiB


def _with_reference(path: Path, fmt: str) -> tuple[Path, bytes]:
    return path, reference_raw(path, path.with_suffix(".raw"), fmt=fmt).read_bytes()


def _written(fmt: str, **options: object) -> Callable[[Path], tuple[Path, bytes]]:
    def build(d: Path) -> tuple[Path, bytes]:
        path = create(d / f"image.{fmt}", 4 * MiB, fmt, **options)
        qemu_io(path, "write -P 0x5a 512k 1M", "write -P 0xa5 1088k 4k", fmt=fmt)
        return _with_reference(path, fmt)
    return build


def _compressed(fmt: str, *options: str) -> Callable[[Path], tuple[Path, bytes]]:
    def build(d: Path) -> tuple[Path, bytes]:
        # Compressible (a short random pattern repeated), so that clusters are stored
        # compressed; varying per 64 KiB, so that a wrong cluster shows.
        source = d / "source.raw"
        source.write_bytes(b"".join(random_bytes(i, 512) * 128 for i in range(64)))
        path = d / f"image.{fmt}"
        qemu_img("convert", "-f", "raw", "-O", fmt, *options, source, path)
        return _with_reference(path, fmt)
    return build


def _vpc_differencing(d: Path) -> tuple[Path, bytes]:
    """A differencing VHD opened without its parent: the block's sector bitmap is loaded on
    the first read of the block (QEMU cannot write these; built by hand)."""
    block = 2 * MiB
    data = os.urandom(block)
    path = build_vhd(d / "child.vhd", VhdSpec(size=4 * MiB, block_size=block, disk_type=4),
                     {0: Block(data, sectors=set(range(0, block // 512, 2)))})
    expected = bytearray(4 * MiB)
    for sector in range(0, block // 512, 2):
        expected[sector * 512 : (sector + 1) * 512] = data[sector * 512 : (sector + 1) * 512]
    return path, bytes(expected)


CASES = {
    "qcow2": Case(_written("qcow2"), Qcow2Node, "l2_cache_misses"),
    "qcow2-compressed": Case(_compressed("qcow2", "-c"), Qcow2Node, "compressed_clusters_read"),
    "qed": Case(_written("qed"), QedNode, "l2_cache_misses"),
    "vhdx": Case(_written("vhdx"), VhdxNode, "bat_cache_misses"),
    "vmdk": Case(_written("vmdk"), VmdkNode, "gt_cache_misses"),
    "vmdk-stream": Case(_compressed("vmdk", "-o", "subformat=streamOptimized"), VmdkNode,
                        "grain_cache_misses"),
    "vpc-differencing": Case(_vpc_differencing, VpcNode, "bitmap_cache_misses", offset=0),
}


async def _open_slow(path: Path, node_class: Callable[[BlockNode, OpenContext], FormatNode]
                     ) -> FormatNode:
    file = FileNode(str(path))
    await file.open()
    slow = FaultyFile(file, jitter=1.0)
    await slow.open()
    ctx = OpenContext(OpenOptions(read_only=True, backing=False), path=str(path),
                      chain=(os.path.realpath(path),))
    return await opened(node_class(slow, ctx))


@pytest.mark.parametrize("name", sorted(CASES))
async def test_readers_of_one_uncached_table_load_it_once(tmp_path: Path, name: str) -> None:
    case = CASES[name]
    path, reference = case.build(tmp_path)
    node = await _open_slow(path, case.node_class)
    try:
        # By the statistics' name: qcow2 keeps it in a group (counters.l2_cache.misses).
        before = node.counters.snapshot()[case.counter]
        # Overlapping and identical ranges inside one table's (or one cluster's) reach.
        ranges = [(case.offset + (i % 5) * 4 * KiB + i * 100, 4 * KiB + (i % 3) * 1000)
                  for i in range(READERS)]
        results: list[bytes] = [b""] * READERS

        async def reader(i: int) -> None:
            offset, length = ranges[i]
            results[i] = bytes(await node.pread(offset, length))

        async with trio.open_nursery() as nursery:
            for i in range(READERS):
                nursery.start_soon(reader, i)
        for (offset, length), got in zip(ranges, results, strict=True):
            assert got == reference[offset : offset + length]
        grew = node.counters.snapshot()[case.counter] - before
        assert grew == 1, f"{READERS} concurrent readers made {case.counter} grow by {grew}, not 1"
        assert node.stats.in_flight == 0
    finally:
        await node.aclose()


class SlowFile(FilterNode):
    """Every read takes a millisecond, as a read that misses the page cache does."""

    async def _pread(self, offset: int, length: int) -> Buffer:
        await trio.sleep(0.001)
        return await self.file.pread(offset, length)


async def test_qcow2_read_spanning_scattered_clusters_fans_out(tmp_path: Path) -> None:
    """One read over clusters that lie apart on the host, whose reads wait for the disk, goes
    to the file as concurrent requests, and returns QEMU's bytes."""
    path = create(tmp_path / "scattered.qcow2", 4 * MiB, "qcow2", cluster_size=65536)
    # Written backwards: guest-adjacent clusters end up far apart (and reversed) in the file.
    qemu_io(path, *(f"write -P {i + 1} {i * 64}k 64k" for i in reversed(range(16))),
            fmt="qcow2")
    reference = reference_raw(path, tmp_path / "scattered.raw", fmt="qcow2").read_bytes()
    file = FileNode(str(path))
    await file.open()
    slow = SlowFile(file)
    await slow.open()
    node = Qcow2Node(slow, OpenContext(OpenOptions(), path=str(path)))
    try:
        await node.open()
        await node.pread(0, 512)  # the L2 slice, cached
        got = await node.pread(0, MiB)
        assert bytes(got) == reference[:MiB]
        counters = node.counters
        assert counters.fanout_requests == 1
        assert counters.max_fanout == 15  # the first cluster showed that reads wait
        assert counters.data_reads == 17
        assert slow.stats.max_in_flight == 15
    finally:
        await node.aclose()
