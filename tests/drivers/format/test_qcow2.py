"""The qcow2 driver against QEMU: every recipe of tests/support/qcow2_images.py read byte for
byte, block status against ``qemu-img map``, ``info()`` against ``qemu-img info``, the counters,
the L2 cache, and the pure mapping and decompression underneath."""

from __future__ import annotations

import zlib
from array import array
from pathlib import Path

import pytest
import trio
import zstandard

from tests.support.conformance import check_block_node
from tests.support.qcow2_images import RECIPES, BuiltImage, Qcow2Images
from vdiskfs.block.context import OpenOptions, open_image
from vdiskfs.block.node import BlockNode, BlockStatus
from vdiskfs.drivers.format.qcow2 import Qcow2Node
from vdiskfs.drivers.format.qcow2.compression import DecompressionError, decompress_cluster
from vdiskfs.drivers.format.qcow2.header import COMPRESSION_ZLIB, COMPRESSION_ZSTD
from vdiskfs.drivers.format.qcow2.l2cache import DEFAULT_MAX_BYTES, L2SliceCache
from vdiskfs.drivers.format.qcow2.mapping import (
    OFLAG_COMPRESSED,
    OFLAG_COPIED,
    OFLAG_ZERO,
    Geometry,
)
from vdiskfs.drivers.format.qcow2.metadata_cache import MetadataCacheCounters
from vdiskfs.drivers.format.runs import Run, RunKind
from vdiskfs.errors import FormatError

ALL = sorted(RECIPES)
KiB = 1024
MiB = 1024 * KiB


@pytest.fixture(scope="session")
def qcow2_images(tmp_path_factory: pytest.TempPathFactory) -> Qcow2Images:
    return Qcow2Images(tmp_path_factory.mktemp("qcow2"))


async def _open(image: BuiltImage, **options: object) -> Qcow2Node:
    node = await open_image(str(image.path), OpenOptions(**options))  # type: ignore[arg-type]
    assert isinstance(node, Qcow2Node)
    return node


# -- every recipe: bytes, block status, info, counters -------------------------------------------


@pytest.mark.parametrize("name", ALL)
async def test_conformance(qcow2_images: Qcow2Images, name: str) -> None:
    image = qcow2_images.get(name)
    await check_block_node(lambda: open_image(str(image.path)), image.reference)


def _check_run_against_map(start: int, length: int, status: BlockStatus,
                           qemu_map: list[dict[str, object]]) -> None:
    end = start + length
    for entry in qemu_map:
        e_start, e_len = int(entry["start"]), int(entry["length"])  # type: ignore[call-overload]
        if e_start + e_len <= start or e_start >= end:
            continue
        where = f"our run {start}+{length} {status!r} vs qemu {entry}"
        if status == BlockStatus.DATA | BlockStatus.ALLOCATED:
            assert entry["depth"] == 0 and entry["data"], where
        elif status == BlockStatus.ZERO | BlockStatus.ALLOCATED:
            assert entry["depth"] == 0 and entry["zero"] and not entry["data"], where
        elif status == BlockStatus.ZERO:
            assert entry["zero"] and not entry["data"], where
            assert entry["depth"] != 0 or not entry["present"], where
        else:
            assert status == 0, where
            assert int(entry["depth"]) >= 1, where  # type: ignore[call-overload]


@pytest.mark.parametrize("name", ALL)
async def test_block_status_matches_qemu_map(qcow2_images: Qcow2Images, name: str) -> None:
    image = qcow2_images.get(name)
    qemu_map = image.qemu_map()
    node = await _open(image)
    try:
        offset = 0
        while offset < node.size:
            status, run = await node.block_status(offset, node.size - offset)
            _check_run_against_map(offset, run, status, qemu_map)
            offset += run
    finally:
        await node.aclose()


INFO_KEYS = ("cluster-size", "dirty-flag", "backing-filename", "backing-filename-format",
             "snapshots", "format-specific")


@pytest.mark.parametrize("name", ALL)
async def test_info_matches_qemu_img(qcow2_images: Qcow2Images, name: str) -> None:
    image = qcow2_images.get(name)
    expected = image.qemu_info()
    node = await _open(image)
    try:
        ours = node.info()
    finally:
        await node.aclose()
    for key in INFO_KEYS:
        assert ours.get(key) == expected.get(key), key
    if "backing-filename" in expected:
        assert Path(ours["full-backing-filename"]).resolve() == (
            image.path.parent / expected["backing-filename"]
        ).resolve()


@pytest.mark.parametrize("name", ALL)
async def test_counters_move(qcow2_images: Qcow2Images, name: str) -> None:
    image = qcow2_images.get(name)
    recipe = RECIPES[name]
    node = await _open(image)
    try:
        assert bytes(await node.pread(0, node.size)) == image.reference
        first = node.stats_snapshot().driver
        assert bytes(await node.pread(0, node.size)) == image.reference
        second = node.stats_snapshot().driver
    finally:
        await node.aclose()
    if name != "empty":
        assert first["l2_cache_misses"] >= 1
        # The cache covers these small disks: the second pass reads no L2 slice.
        assert second["l2_cache_misses"] == first["l2_cache_misses"]
        assert second["l2_cache_hits"] > first["l2_cache_hits"]
    if recipe.compressed:
        assert first["compressed_clusters_read"] > 0
    if recipe.backing:
        assert first["backing_reads"] > 0 and first["backing_bytes"] > 0
    else:
        assert first["backing_reads"] == 0
    served = first["backing_bytes"] + first["zero_bytes_read"]
    assert served <= node.size
    assert set(second) >= {"l2_cache_hits", "l2_cache_misses", "compressed_clusters_read",
                           "backing_reads", "backing_bytes", "zero_bytes_read", "data_reads"}


# -- particular behaviour ------------------------------------------------------------------------


def _file_preads(node: Qcow2Node) -> int:
    return node.file.stats_snapshot().driver["pread_calls"]


async def test_fast_path_is_one_child_read(qcow2_images: Qcow2Images) -> None:
    image = qcow2_images.get("v2")  # clusters 0..2 are data
    node = await _open(image)
    try:
        await node.pread(0, 4096)  # loads the L2 slice
        before, counters = _file_preads(node), node.stats_snapshot().driver
        for offset in (8192, 65536 + 100, 3 * 65536 - 4096):
            assert await node.pread(offset, 4096) == image.reference[offset : offset + 4096]
        after = node.stats_snapshot().driver
        assert _file_preads(node) - before == 3
        assert after["data_reads"] - counters["data_reads"] == 3
        assert after["l2_cache_hits"] - counters["l2_cache_hits"] == 3
        assert after["l2_cache_misses"] == counters["l2_cache_misses"]
    finally:
        await node.aclose()


async def test_host_contiguous_clusters_are_one_read(qcow2_images: Qcow2Images) -> None:
    image = qcow2_images.get("v2")  # clusters 0..3 written in order, 6 and 7 in reverse
    cluster = 64 * KiB
    node = await _open(image)
    try:
        await node.pread(0, 1)
        before = _file_preads(node)
        assert await node.pread(100, 3 * cluster) == image.reference[100 : 100 + 3 * cluster]
        assert _file_preads(node) - before == 1
        before = _file_preads(node)
        got = await node.pread(6 * cluster, 2 * cluster)
        assert got == image.reference[6 * cluster : 8 * cluster]
        assert _file_preads(node) - before == 2
    finally:
        await node.aclose()


async def test_l2_cache_evicts_least_recently_used(qcow2_images: Qcow2Images) -> None:
    image = qcow2_images.get("cluster_512")  # 32 L2 tables of 512 bytes
    node = await _open(image)
    try:
        node.state.l2_cache.capacity = 2
        for offset in range(0, node.size, 100_000):
            length = min(70_000, node.size - offset)
            assert await node.pread(offset, length) == image.reference[offset : offset + length]
        counters = node.stats_snapshot().driver
        assert counters["l2_cache_evictions"] > 0
        assert len(node.state.l2_cache) <= 2
    finally:
        await node.aclose()


async def test_concurrent_misses_load_a_slice_once(qcow2_images: Qcow2Images) -> None:
    image = qcow2_images.get("v3")
    node = await _open(image)
    state = node.state
    read = state.read_metadata

    async def slow_read(offset: int, length: int, what: str) -> bytes:
        await trio.sleep(0.01)  # let every reader reach the cache while the load is running
        return await read(offset, length, what)

    state.read_metadata = slow_read
    results: list[bytes] = []

    async def reader(offset: int) -> None:
        results.append(bytes(await node.pread(offset, 1000)))

    try:
        async with trio.open_nursery() as nursery:
            for i in range(8):
                nursery.start_soon(reader, i * 1000)
        counters = node.stats_snapshot().driver
        assert counters["l2_cache_misses"] == 1
        assert counters["l2_cache_hits"] >= 7
        assert sorted(results) == sorted(image.reference[i * 1000 : i * 1000 + 1000]
                                         for i in range(8))
    finally:
        await node.aclose()


async def test_failed_slice_load_is_retried_by_waiters() -> None:
    cache = L2SliceCache(4, MetadataCacheCounters())
    calls = 0

    async def flaky(key: int) -> array[int]:
        nonlocal calls
        calls += 1
        await trio.sleep(0.01)
        if calls == 1:
            raise FormatError("first load fails")
        return array("Q", [key])

    outcomes: list[object] = []

    async def get() -> None:
        try:
            outcomes.append((await cache.get(4096, flaky))[0])
        except FormatError as exc:
            outcomes.append(exc)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(get)
        await trio.sleep(0.001)
        nursery.start_soon(get)
    assert calls == 2
    assert isinstance(outcomes[0], FormatError) and outcomes[1] == 4096


def test_l2_cache_capacity_follows_qemu() -> None:
    # A small disk needs few slices; a large one is capped at 32 MiB of entries.
    assert L2SliceCache.capacity_for(4 * MiB // (64 * KiB) * 8, 4096) == 2
    assert L2SliceCache.capacity_for(1 * MiB, 4096) == 256
    assert L2SliceCache.capacity_for(1 << 40, 4096) == DEFAULT_MAX_BYTES // 4096


async def test_chain_is_a_tree_of_nodes(qcow2_images: Qcow2Images) -> None:
    image = qcow2_images.get("chain_3")
    node = await _open(image)
    try:
        tree = [(depth, role, n.driver, Path(n.label).name) for depth, role, n in node.walk()]
        assert tree == [
            (0, "", "qcow2", "top.qcow2"),
            (1, "file", "file", "top.qcow2"),
            (1, "backing", "qcow2", "mid.qcow2"),
            (2, "file", "file", "mid.qcow2"),
            (2, "backing", "qcow2", "base.qcow2"),
            (3, "file", "file", "base.qcow2"),
        ]
    finally:
        await node.aclose()


async def test_data_file_is_a_raw_child(qcow2_images: Qcow2Images) -> None:
    image = qcow2_images.get("data_file")
    node = await _open(image)
    try:
        data = node.child("data-file")
        assert data is not None and data.driver == "raw"
        assert Path(data.label) == image.path.parent / "disk.data"
        await node.pread(0, node.size)
        assert data.stats_snapshot().as_dict()["rd_operations"] > 0
    finally:
        await node.aclose()


async def test_without_backing_unallocated_reads_zeros(qcow2_images: Qcow2Images) -> None:
    image = qcow2_images.get("backing_shorter")
    node = await _open(image, backing=False)
    try:
        assert node.child("backing") is None
        assert await node.pread(0, 4096) == bytes(4096)
        assert await node.block_status(0, 4096) == (BlockStatus.ZERO, 4096)
    finally:
        await node.aclose()


async def test_snapshots_are_listed_and_active_l1_is_read(qcow2_images: Qcow2Images) -> None:
    image = qcow2_images.get("snapshots")
    node = await _open(image)
    try:
        assert [s.name for s in node.snapshots] == ["first", "second"]
        assert [s.id for s in node.snapshots] == ["1", "2"]
        assert all(s.l1_table_offset != node.header.l1_table_offset
                   for s in node.snapshots)
        assert await node.pread(0, node.size) == image.reference
    finally:
        await node.aclose()


async def test_dirty_image_reads_without_writing(qcow2_images: Qcow2Images) -> None:
    image = qcow2_images.get("dirty")
    before = image.path.read_bytes()
    node = await _open(image)
    try:
        assert node.info()["dirty-flag"] is True
        assert await node.pread(0, node.size) == image.reference
    finally:
        await node.aclose()
    assert image.path.read_bytes() == before


def test_probe() -> None:
    assert Qcow2Node.probe(b"QFI\xfb\0\0\0\x03" + bytes(100), b"", "x") == 100
    assert Qcow2Node.probe(b"QFI\xfb\0\0\0\x02" + bytes(100), b"", "x") == 100
    assert Qcow2Node.probe(b"QFI\xfb\0\0\0\x01" + bytes(100), b"", "x") == 0  # qcow version 1
    assert Qcow2Node.probe(b"QFI", b"", "x") == 0
    assert Qcow2Node.probe(bytes(512), b"", "x") == 0


# -- the pure layers -----------------------------------------------------------------------------


def _geometry(cluster_bits: int = 16, *, extended: bool = False, data_file: bool = False,
              version: int = 3, slice_bits: int | None = None) -> Geometry:
    entry_bits = 4 if extended else 3
    return Geometry(
        path="test.qcow2",
        cluster_bits=cluster_bits,
        l2_bits=cluster_bits - entry_bits,
        slice_bits=slice_bits if slice_bits is not None else 12 - entry_bits,
        extended_l2=extended,
        has_data_file=data_file,
        zero_flag=version >= 3 and not extended,
    )


@pytest.mark.parametrize("cluster_bits", [9, 12, 16, 21])
def test_compressed_descriptor_layout(cluster_bits: int) -> None:
    g = _geometry(cluster_bits, slice_bits=0)
    shift = 62 - (cluster_bits - 8)
    host = 0x123456789 & ((1 << min(shift, 48)) - 1)
    extra_sectors = (1 << (cluster_bits - 8)) - 1  # the largest the field holds
    entry = OFLAG_COMPRESSED | (extra_sectors << shift) | host
    assert g.compressed(entry) == (host, (extra_sectors + 1) * 512 - (host & 511))


def test_standard_runs() -> None:
    g = _geometry(16)
    c = 1 << 16
    table = array("Q", [0] * g.slice_entries)
    table[0] = OFLAG_COPIED | 5 * c
    table[1] = OFLAG_COPIED | 6 * c  # contiguous with 0
    table[2] = OFLAG_COPIED | 9 * c  # not
    table[3] = OFLAG_ZERO
    table[4] = OFLAG_ZERO | 7 * c  # zero, preallocated
    table[6] = OFLAG_COMPRESSED | 12345
    assert g.next_run(table, 100, 10 * c) == Run(RunKind.DATA, 100, 2 * c - 100, 5 * c + 100)
    assert g.next_run(table, 2 * c, 10 * c) == Run(RunKind.DATA, 2 * c, c, 9 * c)
    assert g.next_run(table, 3 * c + 1, 10 * c) == Run(RunKind.ZERO, 3 * c + 1, 2 * c - 1)
    assert g.next_run(table, 5 * c, 10 * c) == Run(RunKind.BACKING, 5 * c, c)
    assert g.next_run(table, 6 * c + 10, 10 * c) == (
        Run(RunKind.COMPRESSED, 6 * c + 10, c - 10, payload=table[6]))
    # Unallocated to the end of the slice, and never past the request.
    assert g.next_run(table, 7 * c, 1 << 40) == Run(RunKind.BACKING, 7 * c,
                                                    (g.slice_entries - 7) * c)
    assert g.next_run(table, 7 * c, 5) == Run(RunKind.BACKING, 7 * c, 5)


def test_standard_entry_errors() -> None:
    g = _geometry(16)
    table = array("Q", [0] * g.slice_entries)
    table[0] = (5 << 16) + 512  # not cluster aligned
    with pytest.raises(FormatError, match=r"test\.qcow2: field L2 entry: .*not cluster aligned"):
        g.next_run(table, 0, 1)
    table[0] = OFLAG_ZERO
    with pytest.raises(FormatError, match="zero cluster in a version 2 image"):
        _geometry(16, version=2).next_run(table, 0, 1)
    # With an external data file, offset 0 with COPIED is data, and must equal the guest offset.
    g = _geometry(16, data_file=True)
    table[0] = OFLAG_COPIED
    assert g.next_run(table, 0, 10) == Run(RunKind.DATA, 0, 10, 0)
    table[1] = OFLAG_COPIED | (7 << 16)
    with pytest.raises(FormatError, match="differs from the guest offset"):
        g.next_run(table, 1 << 16, 10)
    table[2] = OFLAG_COMPRESSED | 4096
    with pytest.raises(FormatError, match="compressed cluster in an image with an external"):
        g.next_run(table, 2 << 16, 10)


def test_extended_runs() -> None:
    g = _geometry(16, extended=True)
    c, sc = 1 << 16, 1 << 11
    table = array("Q", [0] * (2 * g.slice_entries))

    def put(index: int, entry: int, allocated: int, zero: int) -> None:
        table[2 * index], table[2 * index + 1] = entry, allocated | zero << 32

    put(0, OFLAG_COPIED | 5 * c, 0b0110, 0b1000)  # sc 1-2 data, 3 zero, rest unallocated
    put(1, OFLAG_COPIED | 6 * c, 0xFFFFFFFF, 0)  # all data, contiguous with cluster 0
    put(2, 0, 0, 0xFFFFFFFF)  # unallocated cluster, all zero
    put(3, 0, 0, 0)
    put(4, OFLAG_COPIED | 8 * c, 0xFFFFFFFF, 0)  # not contiguous with cluster 1's host
    assert g.next_run(table, 0, c) == Run(RunKind.BACKING, 0, sc)
    assert g.next_run(table, sc + 7, 10 * c) == (
        Run(RunKind.DATA, sc + 7, 2 * sc - 7, 5 * c + sc + 7))
    assert g.next_run(table, 3 * sc, 10 * c) == Run(RunKind.ZERO, 3 * sc, sc)
    assert g.next_run(table, 4 * sc, 10 * c) == Run(RunKind.BACKING, 4 * sc, c - 4 * sc)
    assert g.next_run(table, c, 10 * c) == Run(RunKind.DATA, c, c, 6 * c)
    assert g.next_run(table, 2 * c + 5, 10 * c) == Run(RunKind.ZERO, 2 * c + 5, c - 5)
    assert g.next_run(table, 3 * c, 10 * c) == Run(RunKind.BACKING, 3 * c, c)
    put(5, OFLAG_COPIED | 9 * c, 0xFFFFFFFF, 0)
    put(6, OFLAG_COPIED | 10 * c, 0xFFFF, 0)
    assert g.next_run(table, 4 * c, 10 * c) == Run(RunKind.DATA, 4 * c, 2 * c + 16 * sc, 8 * c)
    put(7, OFLAG_COPIED | 11 * c, 1, 1)
    with pytest.raises(FormatError, match="both allocated and reading as zeros"):
        g.next_run(table, 7 * c, 1)
    put(7, 0, 1, 0)
    with pytest.raises(FormatError, match="allocated subclusters in an unallocated cluster"):
        g.next_run(table, 7 * c, 1)


def test_zlib_output_is_bounded_to_one_cluster() -> None:
    cluster = 64 * KiB
    packer = zlib.compressobj(9, zlib.DEFLATED, -12)
    bomb = packer.compress(bytes(64 * MiB)) + packer.flush()
    assert decompress_cluster(COMPRESSION_ZLIB, bomb, cluster) == bytes(cluster)
    short = zlib.compressobj(9, zlib.DEFLATED, -12)
    data = short.compress(b"x" * 100) + short.flush()
    with pytest.raises(DecompressionError, match="decodes to 100 bytes"):
        decompress_cluster(COMPRESSION_ZLIB, data, cluster)
    with pytest.raises(DecompressionError, match="zlib"):
        decompress_cluster(COMPRESSION_ZLIB, b"\xff" * 64, cluster)


def test_zstd_output_is_bounded_to_one_cluster() -> None:
    cluster = 64 * KiB
    declared = zstandard.ZstdCompressor().compress(bytes(8 * MiB))
    with pytest.raises(DecompressionError, match="declares 8388608 bytes"):
        decompress_cluster(COMPRESSION_ZSTD, declared, cluster)
    # No size in the frame header: the reader still stops at one cluster.
    streamed = zstandard.ZstdCompressor(write_content_size=False).compressobj()
    undeclared = streamed.compress(bytes(8 * MiB)) + streamed.flush()
    assert decompress_cluster(COMPRESSION_ZSTD, undeclared, cluster) == bytes(cluster)
    # A cluster split over two frames is one cluster (QEMU reads across frames).
    two = (zstandard.ZstdCompressor().compress(b"a" * (cluster // 2))
           + zstandard.ZstdCompressor().compress(b"b" * (cluster // 2)))
    assert decompress_cluster(COMPRESSION_ZSTD, two, cluster) == (
        b"a" * (cluster // 2) + b"b" * (cluster // 2))
    with pytest.raises(DecompressionError, match="zstd"):
        decompress_cluster(COMPRESSION_ZSTD, b"\x28\xb5\x2f\xfd" + b"\xff" * 60, cluster)


async def test_backing_reads_past_the_backing_end_are_zeros(
        qcow2_images: Qcow2Images) -> None:
    image = qcow2_images.get("backing_shorter")
    node = await _open(image)
    try:
        backing = node.child("backing")
        assert isinstance(backing, BlockNode) and backing.size == 1 * MiB
        got = await node.pread(1 * MiB - 8192, 16384)
        assert got == image.reference[1 * MiB - 8192 : 1 * MiB + 8192]
        assert await node.block_status(1 * MiB + 500_000, 1000) == (BlockStatus.ZERO, 1000)
    finally:
        await node.aclose()


@pytest.mark.parametrize("name", ["v2", "v3", "cluster_512", "extended_l2",
                                  "extended_l2_backing", "data_file", "zlib_write", "chain_3"])
async def test_fast_lookup_agrees_with_the_mapping(qcow2_images: Qcow2Images, name: str) -> None:
    """The fast lookup (read fast path, in-place writes) answers only for plain data clusters,
    with the host offset the full mapping gives, and for every such cluster once cached."""
    node = await _open(qcow2_images.get(name))
    try:
        state = node.state
        cluster = state.geometry.cluster_size
        await node.pread(0, node.size)  # every slice cached (the cache holds the whole disk)
        hits = 0
        for offset in range(0, node.size - cluster + 1, cluster):
            host = state.cached_host(offset + 1, cluster - 1)
            run = await state.next_run(offset, cluster)
            plain = run.kind is RunKind.DATA and run.length == cluster
            assert (host >= 0) == plain, offset
            if plain:
                assert host == run.host_offset + 1
                hits += 1
            # Past the cluster's end is never the fast path's.
            assert state.cached_host(offset + 1, cluster) == -1
        assert hits > 0
    finally:
        await node.aclose()
