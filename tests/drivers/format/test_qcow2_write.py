"""The qcow2 write path against QEMU: a random workload over every kind of image, each result
checked with ``qemu-img check`` (no corruption, no leak) and ``qemu-img compare`` against a raw
model; then the particular behaviours (copy on write from every source, zero clusters, discard,
subclusters, external data files, snapshots, dirty images, concurrency) and the pure layers."""

from __future__ import annotations

import itertools
import os
import random
import struct
from array import array
from pathlib import Path

import pytest
import trio

from tests.support.conformance import check_block_node
from tests.support.faulty import open_faulty
from tests.support.images import qemu_img, qemu_io, reference_raw
from tests.support.qcow2_images import INCOMPATIBLE_FEATURES_OFFSET, Qcow2Images
from tests.support.workload import (
    apply_workload,
    assert_clean,
    assert_same_as_model,
    make_workload,
    qemu_check,
    written_bytes,
)
from vdiskfs.block.context import OpenOptions, open_image
from vdiskfs.block.node import BlockStatus
from vdiskfs.drivers.format.qcow2 import Qcow2Node
from vdiskfs.drivers.format.qcow2.alloc import (
    ALL_SUBCLUSTERS,
    Action,
    ClusterWrite,
    InflightList,
    linked_entry,
    plan_cluster,
)
from vdiskfs.drivers.format.qcow2.mapping import (
    OFLAG_COMPRESSED,
    OFLAG_COPIED,
    OFLAG_ZERO,
    Geometry,
)
from vdiskfs.drivers.format.qcow2.metadata_cache import MetadataCache, MetadataCacheCounters
from vdiskfs.drivers.format.qcow2.refcount_codec import RefcountCodec
from vdiskfs.drivers.format.runs import RunKind
from vdiskfs.errors import FormatError, NoSpaceError

KiB = 1024
MiB = 1024 * KiB

#: Recipes whose workload runs in the fast suite: one of each mechanism.
FAST = ["v2", "v3", "cluster_512", "refcount_1", "refcount_64", "chain_3", "zstd_write",
        "extended_l2", "extended_l2_backing", "data_file_raw", "snapshots", "odd_size"]
#: The rest of the recipes (slower in total, same checks).
SLOW = ["cluster_4k", "cluster_2m", "chain_raw_base", "backing_probed", "backing_shorter",
        "zlib_convert", "zlib_convert_4k", "zstd_convert", "zlib_write", "data_file",
        "snapshots_v2", "odd_header_size", "dirty", "preallocated", "empty"]


@pytest.fixture(scope="session")
def qcow2_images(tmp_path_factory: pytest.TempPathFactory) -> Qcow2Images:
    return Qcow2Images(tmp_path_factory.mktemp("qcow2-write"))


async def _open_rw(path: Path, **options: object) -> Qcow2Node:
    node = await open_image(str(path), OpenOptions(read_only=False, **options))  # type: ignore[arg-type]
    assert isinstance(node, Qcow2Node)
    return node


async def _hot_spots(node: Qcow2Node) -> tuple[int, ...]:
    """Starts of the image's runs of every kind: where the workload should hit on purpose."""
    spots: dict[RunKind, list[int]] = {}
    for run in await node.state.map_range(0, node.size):
        spots.setdefault(run.kind, []).append(run.offset)
    return tuple(offset for offsets in spots.values() for offset in offsets[:8])


async def _run_workload(path: Path, seed: int, tmp_path: Path, **kwargs: object) -> bytearray:
    node = await _open_rw(path)
    try:
        model = bytearray(await node.pread(0, node.size))
        ops = make_workload(node.size, seed, cluster_size=node.header.cluster_size,
                            hot_spots=await _hot_spots(node), **kwargs)  # type: ignore[arg-type]
        await apply_workload(node, ops, model)
        assert await node.pread(0, node.size) == model
    finally:
        await node.aclose()
    assert_clean(path, "qcow2")
    assert_same_as_model(path, "qcow2", model, tmp_path / "model.raw")
    return model


# -- the workload over every recipe --------------------------------------------------------------


@pytest.mark.parametrize("name", FAST)
async def test_workload(qcow2_images: Qcow2Images, name: str, tmp_path: Path) -> None:
    await _run_workload(qcow2_images.copy(name, tmp_path), 11, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("name", SLOW)
async def test_workload_more_recipes(qcow2_images: Qcow2Images, name: str,
                                     tmp_path: Path) -> None:
    await _run_workload(qcow2_images.copy(name, tmp_path), 12, tmp_path)


async def test_workload_is_several_mib() -> None:
    ops = make_workload(24 * MiB, 11)
    assert written_bytes(ops) > 4 * MiB
    assert {op.kind for op in ops} == {"write", "zero", "discard", "flush"}
    assert any(op.kind == "write" and op.seed is None for op in ops)
    assert make_workload(24 * MiB, 11) == ops


async def test_workload_on_raw(tmp_path: Path) -> None:
    path = tmp_path / "disk.raw"
    path.write_bytes(random.Random(3).randbytes(5 * MiB + 512))
    node = await open_image(str(path), OpenOptions(read_only=False, format="raw"))
    model = bytearray(path.read_bytes())
    try:
        await apply_workload(node, make_workload(node.size, 3), model)
    finally:
        await node.aclose()
    assert_same_as_model(path, "raw", model, tmp_path / "model.raw")


async def test_tiny_caches_keep_the_order(qcow2_images: Qcow2Images, tmp_path: Path) -> None:
    """Caches of two entries: every miss evicts, so dirty L2 slices and refcount blocks are
    written back mid-workload, each after what it depends on."""
    path = qcow2_images.copy("cluster_512", tmp_path)  # a refcount block per 128 KiB
    node = await _open_rw(path)
    try:
        assert node.writer is not None
        node.state.l2_cache.capacity = 2
        node.writer.refcounts.cache.capacity = 2
        model = bytearray(await node.pread(0, node.size))
        await apply_workload(node, make_workload(node.size, 5, cluster_size=512), model)
        counters = node.stats_snapshot().driver
        assert counters["l2_cache_writebacks"] > 0 and counters["refcount_cache_evictions"] > 0
    finally:
        await node.aclose()
    assert_clean(path, "qcow2")
    assert_same_as_model(path, "qcow2", model, tmp_path / "model.raw")


async def test_refcount_table_grows(tmp_path: Path) -> None:
    """512-byte clusters and 64-bit refcounts: a refcount block covers 32 KiB and the first
    table 2 MiB, so writing 8 MiB adds blocks and moves the table, twice."""
    path = tmp_path / "disk.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=512,refcount_bits=64", path,
             "16M")
    node = await _open_rw(path)
    try:
        data = random.Random(1).randbytes(8 * MiB)
        for offset in range(0, len(data), 256 * KiB):
            await node.pwrite(offset, data[offset : offset + 256 * KiB])
        counters = node.stats_snapshot().driver
        assert counters["refcount_table_growths"] >= 2
        assert counters["refcount_blocks_allocated"] > 100
    finally:
        await node.aclose()
    assert_clean(path, "qcow2")
    assert_same_as_model(path, "qcow2", data + bytes(8 * MiB), tmp_path / "model.raw")


@pytest.mark.parametrize("name", ["v3", "extended_l2_backing", "zlib_write"])
async def test_conformance_writable(qcow2_images: Qcow2Images, name: str,
                                    tmp_path: Path) -> None:
    path = qcow2_images.copy(name, tmp_path)
    await check_block_node(lambda: _open_rw(path), qcow2_images.get(name).reference,
                           writable=True)
    assert_clean(path, "qcow2")


# -- particular behaviour ------------------------------------------------------------------------


def _map(path: Path) -> list[dict[str, object]]:
    import json
    return json.loads(qemu_img("map", "--output=json", path))


def _entry_at(entries: list[dict[str, object]], offset: int) -> dict[str, object]:
    for entry in entries:
        start, length = int(entry["start"]), int(entry["length"])  # type: ignore[call-overload]
        if start <= offset < start + length:
            return entry
    raise AssertionError(f"no map entry at {offset}")


async def test_open_and_close_leave_the_header_alone(qcow2_images: Qcow2Images,
                                                     tmp_path: Path) -> None:
    path = qcow2_images.copy("v3", tmp_path)
    before = path.read_bytes()
    node = await _open_rw(path)
    await node.pread(0, node.size)
    await node.flush()
    await node.aclose()
    assert path.read_bytes() == before


async def test_lazy_refcounts_mark_dirty_while_open(tmp_path: Path) -> None:
    path = tmp_path / "disk.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", "lazy_refcounts=on", path, "4M")
    node = await _open_rw(path)
    try:
        assert not _dirty(path)  # nothing allocated yet: nothing to mark
        await node.pwrite(100, b"x" * 5000)
        assert _dirty(path)
        await node.flush()
        assert _dirty(path)  # flushed, still open: still dirty, as QEMU
    finally:
        await node.aclose()
    assert not _dirty(path)
    assert_clean(path, "qcow2")


def _dirty(path: Path) -> bool:
    with open(path, "rb") as f:
        f.seek(INCOMPATIBLE_FEATURES_OFFSET)
        return bool(struct.unpack(">Q", f.read(8))[0] & 1)


@pytest.mark.parametrize("name", ["dirty", "snapshots", "zlib_write", "extended_l2",
                                  "data_file", "refcount_1", "cluster_512", "chain_3"])
async def test_dirty_image_is_repaired_on_writable_open(qcow2_images: Qcow2Images, name: str,
                                                        tmp_path: Path) -> None:
    """The dirty bit set and the first refcount block lost entirely -- far worse than a crash
    with lazy refcounts can do: a writable open recounts everything (snapshots, compressed
    clusters sharing host clusters, subclusters, an external data file, backing files)."""
    path = qcow2_images.copy(name, tmp_path)
    expected = qcow2_images.get(name).reference
    with open(path, "r+b") as f:
        f.seek(20)
        cluster_size = 1 << struct.unpack(">I", f.read(4))[0]
        f.seek(48)
        (table_offset,) = struct.unpack(">Q", f.read(8))
        f.seek(table_offset)
        (block_offset,) = struct.unpack(">Q", f.read(8))
        f.seek(block_offset)
        f.write(bytes(cluster_size))
        f.seek(INCOMPATIBLE_FEATURES_OFFSET)
        (features,) = struct.unpack(">Q", f.read(8))
        f.seek(INCOMPATIBLE_FEATURES_OFFSET)
        f.write(struct.pack(">Q", features | 1))
    assert qemu_check(path, "qcow2").get("corruptions", 0) > 0
    node = await _open_rw(path)
    try:
        assert node.stats_snapshot().driver["refcount_rebuilds"] == 1
        assert node.info()["dirty-flag"] is False
        assert await node.pread(0, node.size) == expected
        await node.pwrite(12345, b"after the repair")
    finally:
        await node.aclose()
    assert not _dirty(path)
    assert_clean(path, "qcow2")


async def test_zero_buffers_become_zero_clusters(tmp_path: Path) -> None:
    path = tmp_path / "disk.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", path, "4M")
    qemu_io(path, "write -q -P 0x55 0 1M")
    node = await _open_rw(path)
    try:
        await node.pwrite(64 * KiB, bytes(128 * KiB))  # two whole clusters
        await node.pwrite(300 * KiB + 7, bytes(1000))  # partial: written as data
        counters = node.stats_snapshot().driver
        assert counters["zero_writes_detected"] == 1
        assert counters["zero_clusters_written"] == 2
    finally:
        await node.aclose()
    entries = _map(path)
    assert _entry_at(entries, 64 * KiB)["zero"] and not _entry_at(entries, 64 * KiB)["data"]
    assert _entry_at(entries, 300 * KiB)["data"]
    assert_clean(path, "qcow2")


async def test_zero_requests_follow_qemu(tmp_path: Path) -> None:
    path = tmp_path / "disk.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", path, "4M")
    qemu_io(path, "write -q -P 0x55 0 1M", "write -q -c -P 0x66 2M 64k")
    node = await _open_rw(path)
    try:
        await node.zero(0, 64 * KiB, may_unmap=False)  # keeps its cluster: a zero cluster
        await node.zero(64 * KiB, 64 * KiB, may_unmap=True)  # gives it back
        await node.zero(2 * MiB, 64 * KiB, may_unmap=False)  # compressed: always given back
        await node.zero(200 * KiB, 10, may_unmap=True)  # partial: zeros as data
        assert await node.pread(0, 128 * KiB) == bytes(128 * KiB)
        assert await node.block_status(0, 128 * KiB) == (
            BlockStatus.ZERO | BlockStatus.ALLOCATED, 128 * KiB)
        before = node.stats_snapshot().driver["clusters_allocated"]
        await node.pwrite(4096, b"y" * 100)  # into the kept zero cluster: in place
        assert node.stats_snapshot().driver["clusters_allocated"] == before
    finally:
        await node.aclose()
    entries = _map(path)
    assert _entry_at(entries, 0)["data"]  # the reused cluster holds data again
    assert not _entry_at(entries, 64 * KiB)["data"]
    assert _entry_at(entries, 2 * MiB)["zero"]
    assert_clean(path, "qcow2")


async def test_discard_follows_qemu(tmp_path: Path) -> None:
    base = tmp_path / "base.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", base, "2M")
    qemu_io(base, "write -q -P 0x11 0 2M")
    # v2 with a backing file: QEMU refuses (the cluster would show stale backing data).
    for compat, expected in (("1.1", bytes(64 * KiB)), ("0.10", b"\x22" * 64 * KiB)):
        top = tmp_path / f"top-{compat}.qcow2"
        qemu_img("create", "-q", "-f", "qcow2", "-o", f"compat={compat}", "-b", base.name,
                 "-F", "qcow2", top)
        qemu_io(top, "write -q -P 0x22 0 256k")
        node = await _open_rw(top)
        try:
            await node.discard(1000, 128 * KiB)  # only the cluster at 64 KiB is whole
            assert await node.pread(0, 1000) == b"\x22" * 1000
            assert await node.pread(64 * KiB, 64 * KiB) == expected
            assert node.stats_snapshot().driver["clusters_discarded"] == (compat == "1.1")
        finally:
            await node.aclose()
        assert_clean(top, "qcow2")
        raw = reference_raw(top, tmp_path / "out.raw")
        assert raw.read_bytes()[64 * KiB : 128 * KiB] == expected


def _holes(path: Path, offsets: list[int], length: int) -> list[bool]:
    """For each host offset: whether ``[offset, offset + length)`` is a hole in the file."""
    with open(path, "rb") as f:
        out = []
        for offset in offsets:
            try:
                out.append(os.lseek(f.fileno(), offset, os.SEEK_DATA) >= offset + length)
            except OSError:  # ENXIO: nothing but holes from there to the end
                out.append(True)
        return out


def _host_offsets(path: Path, start: int, end: int) -> list[int]:
    """Host offsets of the data clusters (64 KiB) mapping guest ``[start, end)``."""
    hosts = []
    for entry in _map(path):
        if entry["data"] and "offset" in entry:
            lo = max(start, int(entry["start"]))  # type: ignore[call-overload]
            hi = min(end, int(entry["start"]) + int(entry["length"]))  # type: ignore[call-overload]
            for guest in range(lo, hi, 64 * KiB):
                hosts.append(int(entry["offset"]) + guest - int(entry["start"]))  # type: ignore[call-overload]
    return hosts


async def test_discarded_clusters_are_freed_punched_and_reused(tmp_path: Path) -> None:
    """A discard drops the refcounts (no leak), punches the host clusters once the L2 entries
    that used them are on disk, and later allocations take the freed clusters -- in the same
    session and after reopening -- instead of growing the file."""
    path = tmp_path / "disk.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", path, "8M")
    qemu_io(path, "write -q -P 0x55 0 1M")
    model = bytearray(8 * MiB)
    model[: 1 * MiB] = b"\x55" * MiB
    hosts = _host_offsets(path, 0, 512 * KiB)
    assert len(hosts) == 8
    size = path.stat().st_size
    node = await _open_rw(path)
    try:
        await node.discard(0, 512 * KiB)
        await node.zero(512 * KiB, 128 * KiB, may_unmap=True)
        model[: 640 * KiB] = bytes(640 * KiB)
        await node.flush()
        assert all(_holes(path, hosts, 64 * KiB))
        assert node.stats_snapshot().driver["clusters_freed"] == 10
        await node.pwrite(4 * MiB, b"\x66" * (256 * KiB))  # takes four freed clusters
        model[4 * MiB : 4 * MiB + 256 * KiB] = b"\x66" * (256 * KiB)
    finally:
        await node.aclose()
    assert path.stat().st_size == size
    assert_clean(path, "qcow2")
    assert_same_as_model(path, "qcow2", model, tmp_path / "model.raw")
    node = await _open_rw(path)
    try:
        await node.pwrite(6 * MiB, b"\x77" * (384 * KiB))  # the other six, after reopening
        model[6 * MiB : 6 * MiB + 384 * KiB] = b"\x77" * (384 * KiB)
    finally:
        await node.aclose()
    assert path.stat().st_size == size
    assert_clean(path, "qcow2")
    assert_same_as_model(path, "qcow2", model, tmp_path / "model.raw")


async def test_discarding_compressed_clusters_frees_their_host_clusters(tmp_path: Path) -> None:
    """Compressed clusters share host clusters: each reference drops with the cluster that
    made it, a host cluster is punched once nothing uses it, and partial requests leave a
    compressed cluster alone (discard) or copy it (zero)."""
    path = tmp_path / "disk.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", path, "4M")
    rng = random.Random(5)
    model = bytearray(4 * MiB)
    for i in range(16):  # about 20 KiB each once compressed, packed together
        data = rng.randbytes(20 * KiB) + bytes(44 * KiB)
        (tmp_path / "c.raw").write_bytes(data)
        qemu_io(path, f"write -q -c -s {tmp_path / 'c.raw'} {i * 64 * KiB} 64k")
        model[i * 64 * KiB : (i + 1) * 64 * KiB] = data
    blocks = path.stat().st_blocks
    node = await _open_rw(path)
    try:
        await node.discard(0, 8 * 64 * KiB)
        await node.zero(8 * 64 * KiB, 4 * 64 * KiB, may_unmap=False)  # compressed: unmapped
        await node.discard(12 * 64 * KiB + 512, 64 * KiB)  # partial: left alone
        await node.zero(13 * 64 * KiB + 4096, 4096)  # partial: written as data
        model[: 12 * 64 * KiB] = bytes(12 * 64 * KiB)
        model[13 * 64 * KiB + 4096 : 13 * 64 * KiB + 8192] = bytes(4096)
        assert await node.pread(0, node.size) == model
        assert node.stats_snapshot().driver["clusters_discarded"] == 8
    finally:
        await node.aclose()
    assert_clean(path, "qcow2")
    assert_same_as_model(path, "qcow2", model, tmp_path / "model.raw")
    entries = _map(path)
    assert not _entry_at(entries, 0)["data"] and _entry_at(entries, 8 * 64 * KiB)["zero"]
    assert _entry_at(entries, 14 * 64 * KiB)["data"]
    # 12 x 20 KiB gone: at least three host clusters held nothing else and are holes now.
    assert blocks - path.stat().st_blocks >= 3 * 64 * KiB // 512


async def test_partial_zeros_mark_the_unit_when_the_rest_reads_zero(tmp_path: Path) -> None:
    """QEMU's head and tail rule: zeroing part of a (sub)cluster that stores nothing and
    whose rest reads as zeros marks it zero (v3) or leaves it unallocated (v2) -- no cluster
    allocated; anywhere else the zeros are written as data."""
    for options in ("compat=1.1", "compat=0.10", "extended_l2=on,cluster_size=64k"):
        path = tmp_path / "disk.qcow2"
        path.unlink(missing_ok=True)
        qemu_img("create", "-q", "-f", "qcow2", "-o", options, path, "4M")
        qemu_io(path, "write -q -P 0x55 1M 64k", "write -q -z 2M 64k")
        node = await _open_rw(path)
        try:
            await node.zero(100, 1000)  # unallocated, no backing file
            await node.zero(2 * MiB + 3000, 5000)  # inside a zero cluster
            await node.pwrite(3 * MiB + 512, bytes(4096))  # a zero buffer: the same
            assert node.stats_snapshot().driver["clusters_allocated"] == 0
            await node.zero(1 * MiB + 100, 1000)  # into data: zeros written there
            assert await node.pread(1 * MiB, 2000) == (
                b"\x55" * 100 + bytes(1000) + b"\x55" * 900)
        finally:
            await node.aclose()
        entries = _map(path)
        for guest in (0, 2 * MiB, 3 * MiB):
            assert not _entry_at(entries, guest)["data"], (options, guest)
        assert_clean(path, "qcow2")
    # Over a backing file's data the rest does not read as zeros: data.
    base = tmp_path / "base.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", base, "4M")
    qemu_io(base, "write -q -P 0x11 0 4M")
    top = tmp_path / "top.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", base.name, "-F", "qcow2", top)
    node = await _open_rw(top)
    try:
        await node.zero(100, 1000)
        assert await node.pread(0, 2000) == b"\x11" * 100 + bytes(1000) + b"\x11" * 900
        assert node.stats_snapshot().driver["clusters_allocated"] == 1
    finally:
        await node.aclose()
    assert_clean(top, "qcow2")


async def test_discard_punches_the_external_data_file(tmp_path: Path) -> None:
    path = tmp_path / "disk.qcow2"
    data = tmp_path / "disk.data"
    qemu_img("create", "-q", "-f", "qcow2", "-o", f"data_file={data}", path, "4M")
    qemu_io(path, "write -q -P 0x55 0 1M")
    node = await _open_rw(path)
    try:
        await node.discard(64 * KiB, 128 * KiB)
        await node.zero(512 * KiB, 64 * KiB, may_unmap=True)
        await node.zero(768 * KiB, 64 * KiB, may_unmap=False)  # keeps its cluster
        assert await node.pread(0, 1 * MiB) == (
            b"\x55" * (64 * KiB) + bytes(128 * KiB) + b"\x55" * (320 * KiB)
            + bytes(64 * KiB) + b"\x55" * (192 * KiB) + bytes(64 * KiB)
            + b"\x55" * (192 * KiB))
    finally:
        await node.aclose()
    assert _holes(data, [64 * KiB, 128 * KiB, 512 * KiB], 64 * KiB) == [True, True, True]
    assert _holes(data, [0, 768 * KiB], 64 * KiB) == [False, False]
    assert_clean(path, "qcow2")


async def test_copy_on_write_from_each_source(qcow2_images: Qcow2Images,
                                              tmp_path: Path) -> None:
    """A small write into a cluster from the backing file, a compressed cluster, a zero cluster
    and a snapshot-shared cluster: each gets a new cluster with the rest copied, the old one
    left as it was. (The v3 image has a free cluster inside the file, which is reused: its
    zeros must be written; past the end of the file they would not be.)"""
    for name, offset, copies in (("chain_3", 2 * MiB + 5000, 1),
                                 ("zlib_write", 64 * KiB + 100, 1),
                                 ("v3", 3584 * KiB + 10, 1),
                                 ("snapshots", 6 * 64 * KiB + 3, 1)):
        path = qcow2_images.copy(name, tmp_path / "cow")
        expected = bytearray(qcow2_images.get(name).reference)
        node = await _open_rw(path)
        try:
            await node.pwrite(offset, b"new data")
            expected[offset : offset + 8] = b"new data"
            counters = node.stats_snapshot().driver
            assert counters["clusters_allocated"] == 1, name
            assert counters["cow_operations"] == copies, name
            assert await node.pread(0, node.size) == expected
        finally:
            await node.aclose()
        assert_clean(path, "qcow2")
        assert_same_as_model(path, "qcow2", expected, tmp_path / "model.raw")


async def test_snapshots_stay_intact(qcow2_images: Qcow2Images, tmp_path: Path) -> None:
    path = qcow2_images.copy("snapshots", tmp_path)
    snapshots = {}
    for name in ("first", "second"):
        out = tmp_path / f"{name}.raw"
        qemu_img("convert", "-l", f"snapshot.name={name}", "-O", "raw", path, out)
        snapshots[name] = out.read_bytes()
    await _run_workload(path, 21, tmp_path)
    for name, content in snapshots.items():
        out = tmp_path / f"{name}-after.raw"
        qemu_img("convert", "-l", f"snapshot.name={name}", "-O", "raw", path, out)
        assert out.read_bytes() == content, name


async def test_subclusters_allocated_one_by_one(qcow2_images: Qcow2Images,
                                                tmp_path: Path) -> None:
    path = qcow2_images.copy("extended_l2_backing", tmp_path)  # 32 KiB clusters, 1 KiB sc
    expected = bytearray(qcow2_images.get("extended_l2_backing").reference)
    offset = 1536 * KiB + 1024 + 100  # inside subcluster 1 of an unallocated cluster
    node = await _open_rw(path)
    try:
        await node.pwrite(offset, b"z" * 100)
        expected[offset : offset + 100] = b"z" * 100
        counters = node.stats_snapshot().driver
        assert counters["cow_bytes"] == 1024 - 100  # only the rest of that subcluster
        # The neighbours still come from the backing file.
        assert await node.block_status(1536 * KiB, 1024) == (BlockStatus(0), 1024)
        assert await node.block_status(1536 * KiB + 1024, 1024) == (
            BlockStatus.DATA | BlockStatus.ALLOCATED, 1024)
        await node.pwrite(1536 * KiB + 4096, bytes(2048))  # two whole zero subclusters
        expected[1536 * KiB + 4096 : 1536 * KiB + 6144] = bytes(2048)
        assert await node.block_status(1536 * KiB + 4096, 2048) == (
            BlockStatus.ZERO | BlockStatus.ALLOCATED, 2048)
    finally:
        await node.aclose()
    assert_clean(path, "qcow2")
    assert_same_as_model(path, "qcow2", expected, tmp_path / "model.raw")


async def test_external_data_file_raw_stays_the_disk(qcow2_images: Qcow2Images,
                                                     tmp_path: Path) -> None:
    path = qcow2_images.copy("data_file_raw", tmp_path)
    model = await _run_workload(path, 31, tmp_path)
    assert (path.parent / "disk.data").read_bytes()[: len(model)] == bytes(model)


async def test_preallocated_image_is_written_in_place(qcow2_images: Qcow2Images,
                                                      tmp_path: Path) -> None:
    path = qcow2_images.copy("preallocated", tmp_path)
    size_before = path.stat().st_size
    node = await _open_rw(path)
    try:
        data = random.Random(2).randbytes(node.size)
        for offset in range(0, node.size, 100_000):
            await node.pwrite(offset, data[offset : offset + 100_000])
        counters = node.stats_snapshot().driver
        assert counters["clusters_allocated"] == 0
        assert counters["allocating_writes"] == 0
    finally:
        await node.aclose()
    assert path.stat().st_size == size_before
    assert_clean(path, "qcow2")


async def test_writing_past_the_end_is_enospc(qcow2_images: Qcow2Images,
                                              tmp_path: Path) -> None:
    node = await _open_rw(qcow2_images.copy("odd_size", tmp_path))
    try:
        with pytest.raises(NoSpaceError):
            await node.pwrite(node.size - 10, b"x" * 11)
        await node.pwrite(node.size - 10, b"x" * 10)
        assert await node.pread(node.size - 10, 10) == b"x" * 10
    finally:
        await node.aclose()


async def test_bitmaps_autoclear_bit_is_cleared(tmp_path: Path) -> None:
    path = tmp_path / "disk.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", path, "4M")
    qemu_img("bitmap", "--add", path, "b0")
    node = await _open_rw(path)
    try:
        await node.pwrite(0, b"x")
    finally:
        await node.aclose()
    with open(path, "rb") as f:
        f.seek(88)
        assert struct.unpack(">Q", f.read(8))[0] == 0
    # The bitmap's clusters are now unreferenced: leaked, not corrupt.
    assert_clean(path, "qcow2", leaks_allowed=True)


# -- concurrency ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["chain_3", "extended_l2_backing", "zlib_write", "snapshots"])
async def test_concurrent_writers_of_one_cluster(qcow2_images: Qcow2Images, name: str,
                                                 tmp_path: Path) -> None:
    """Many tasks write disjoint pieces of the same clusters (backing data, subclusters,
    compressed and shared clusters underneath) while readers check that every byte they read is
    the old or the new one: never stale data of another cluster, never a half-copied one.

    (A write is not atomic as a whole, on a disk either: one that lands partly on allocated
    subclusters, in place, and partly on unallocated ones, which appear at the L2 update, can be
    seen half done. A cluster moved by copy on write appears all at once.)"""
    path = qcow2_images.copy(name, tmp_path)
    old = qcow2_images.get(name).reference
    node, _faulty = await open_faulty(path, Qcow2Node, jitter=0.5, rng=random.Random(4))
    rng = random.Random(5)
    cluster = node.header.cluster_size
    pieces: list[tuple[int, bytes]] = []
    for base in (0, 2 * cluster, 7 * cluster, node.size - 2 * cluster):
        base = base // cluster * cluster
        cuts = sorted(rng.sample(range(1, 2 * cluster), 12))
        bounds = [0, *cuts, 2 * cluster]
        for start, stop in itertools.pairwise(bounds):
            pieces.append((base + start, rng.randbytes(stop - start)))
    expected = bytearray(old)
    for offset, data in pieces:
        expected[offset : offset + len(data)] = data
    torn: list[int] = []

    async def write(offset: int, data: bytes) -> None:
        await node.pwrite(offset, data)

    async def read(offset: int, data: bytes) -> None:
        before = old[offset : offset + len(data)]
        for _ in range(3):
            got = bytes(await node.pread(offset, len(data)))
            if got not in (data, before) and any(
                    g not in (n, b) for g, n, b in zip(got, data, before, strict=True)):
                torn.append(offset)
            await trio.sleep(0)

    try:
        async with trio.open_nursery() as nursery:
            for offset, data in pieces:
                nursery.start_soon(write, offset, data)
                nursery.start_soon(read, offset, data)
        assert not torn
        assert await node.pread(0, node.size) == expected
        assert node.stats_snapshot().driver["allocation_waits"] > 0
    finally:
        await node.aclose()
    assert_clean(path, "qcow2")
    assert_same_as_model(path, "qcow2", expected, tmp_path / "model.raw")


# -- the pure layers -----------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [1, 2, 4, 8, 16, 32, 64])
def test_refcount_codec_reads_qemu_blocks(bits: int, tmp_path: Path) -> None:
    path = tmp_path / "disk.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", f"refcount_bits={bits},cluster_size=4k",
             path, "1M")
    qemu_io(path, "write -q -P 1 0 12k")  # clusters 4..6 (the L2 table, then data)
    data = path.read_bytes()
    block = bytearray(data[2 * 4096 : 3 * 4096])
    codec = RefcountCodec(bits.bit_length() - 1, 12)
    assert [codec.get(block, i) for i in range(9)] == [1] * 8 + [0]
    assert codec.find_free(block, 0, codec.entries_per_block) == 8
    assert codec.free_run(block, 8, 100) == 100
    codec.set(block, 3, codec.max_value)
    codec.set(block, 4, 0)
    assert [codec.get(block, i) for i in range(6)] == [1, 1, 1, codec.max_value, 0, 1]
    assert codec.find_free(block, 0, 8) == 4
    assert codec.encode_block([1] * 8) == bytearray(data[2 * 4096 : 3 * 4096])


def _geometry(*, extended: bool = False, data_file: bool = False,
              version: int = 3) -> Geometry:
    bits = 16
    entry_bits = 4 if extended else 3
    return Geometry(path="t", cluster_bits=bits, l2_bits=bits - entry_bits,
                    slice_bits=12 - entry_bits, extended_l2=extended, has_data_file=data_file,
                    zero_flag=version >= 3 and not extended)


def test_plan_cluster_standard() -> None:
    g = _geometry()
    c = 1 << 16
    own = OFLAG_COPIED | 5 * c
    assert plan_cluster(g, own, 0, 10, 20) == ClusterWrite(Action.IN_PLACE, 5 * c, 10, 20)
    assert plan_cluster(g, own | OFLAG_ZERO, 0, 10, 20) == ClusterWrite(Action.KEEP, 5 * c, 0, c)
    assert plan_cluster(g, 5 * c, 0, 10, 20) == ClusterWrite(Action.NEW, 0, 0, c)  # shared
    assert plan_cluster(g, 0, 0, 10, 20) == ClusterWrite(Action.NEW, 0, 0, c)
    assert plan_cluster(g, OFLAG_COMPRESSED | 12345, 0, 0, c) == ClusterWrite(Action.NEW, 0, 0, c)
    # External data file: every allocated cluster is the image's own.
    d = _geometry(data_file=True)
    assert plan_cluster(d, OFLAG_COPIED, 0, 0, 1).action == Action.IN_PLACE


def test_plan_cluster_subclusters() -> None:
    g = _geometry(extended=True)
    c, sc = 1 << 16, 1 << 11
    own = OFLAG_COPIED | 5 * c
    # Subclusters 2..3 allocated: a write inside them is in place; one reaching subcluster 4
    # is kept in place but copies the rest of subcluster 4 (from backing or zeros).
    assert plan_cluster(g, own, 0b1100, 2 * sc + 1, 4 * sc).action == Action.IN_PLACE
    assert plan_cluster(g, own, 0b1100, 2 * sc + 1, 4 * sc + 5) == ClusterWrite(
        Action.KEEP, 5 * c, 2 * sc + 1, 5 * sc)
    # Unallocated cluster: only the partial subclusters at the edges are copied.
    assert plan_cluster(g, 0, 0, sc + 3, 3 * sc + 1) == ClusterWrite(Action.NEW, 0, sc, 4 * sc)
    # Shared cluster: the new one takes over every allocated subcluster around the write.
    assert plan_cluster(g, 5 * c, 0b1 | 1 << 20, 5 * sc, 6 * sc) == ClusterWrite(
        Action.NEW, 0, 0, 21 * sc)
    entry, bitmap = linked_entry(g, 9 * c, 0, 0b1 | (1 << 32) | (1 << 33), sc, 3 * sc)
    assert entry == 9 * c | OFLAG_COPIED
    assert bitmap == 0b111 | (1 << 32)  # subclusters 1-2 allocated, no longer zero
    assert linked_entry(g, 9 * c, OFLAG_COMPRESSED | 7, 0xDEAD, 0, c)[1] == ALL_SUBCLUSTERS


def test_inflight_list_waits_or_cuts() -> None:
    inflight = InflightList()
    item = inflight.add(64, 128)
    assert inflight.blocking(100, 10) == (item, 0)
    assert inflight.blocking(0, 100) == (None, 64)
    assert inflight.blocking(128, 10) == (None, 10)
    inflight.finish(item)
    assert item.done.is_set() and not inflight


async def test_metadata_cache_writes_dependencies_first() -> None:
    log: list[str] = []

    async def store(key: int, data: bytes) -> None:
        log.append(f"store {key}")

    async def before() -> None:
        log.append("dependencies")

    async def load(key: int) -> array[int]:
        return array("Q", [key])

    cache: MetadataCache[array[int]] = MetadataCache(
        2, MetadataCacheCounters(), store=store, encode=lambda a: a.tobytes(),
        before_write_back=before)
    await cache.get(1, load)
    cache.mark_dirty(1)
    await cache.get(2, load)
    # A reader that misses with only dirty or fresh entries grows the cache instead.
    cache.mark_dirty(2)
    await cache.get(3, load)
    assert len(cache) == 3 and not log
    # A writer makes room by writing back, dependencies first.
    await cache.get(4, load, write_back=True)
    assert log[0] == "dependencies" and "store 1" in log
    assert 1 not in cache.dirty
    await cache.write_back()
    assert cache.dirty == {}


async def test_refcounts_that_free_metadata_are_refused(tmp_path: Path) -> None:
    """A refcount of 0 on the L1 table's cluster: the allocator would hand it out. As QEMU's
    overlap check, the write is refused instead, and every write after it."""
    path = tmp_path / "disk.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", path, "4M")
    with open(path, "r+b") as f:  # refcount block at cluster 2, entry 3 (the L1 table)
        f.seek(2 * 65536 + 3 * 2)
        f.write(b"\0\0")
    node = await _open_rw(path)
    try:
        with pytest.raises(FormatError, match="hold the active L1 table"):
            await node.pwrite(0, b"x" * 100)
        with pytest.raises(FormatError, match="corrupt"):
            await node.pwrite(MiB, b"x" * 100)
    finally:
        await node.aclose()
    assert qemu_img("info", path)  # the image itself was not touched further
