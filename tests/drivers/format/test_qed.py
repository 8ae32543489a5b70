"""qed: images made by qemu-img (with raw and qcow2 backing files), read as QEMU reads them."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from tests.support.conformance import check_block_node
from tests.support.hostile import set_bits
from tests.support.images import (
    create,
    info,
    qemu_img,
    qemu_io,
    random_bytes,
    reference_raw,
    sha256_file,
)
from vdiskfs.block.context import OpenOptions, open_image
from vdiskfs.block.node import BlockStatus
from vdiskfs.block.registry import driver_names
from vdiskfs.drivers.format.qed import F_NEED_CHECK
from vdiskfs.errors import ChainError, FormatError

MIB = 1 << 20
FEATURES = 16  # offset of the feature bits in the header


@pytest.fixture(scope="session")
def qed_images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, bytes]]:
    d = tmp_path_factory.mktemp("qed")
    images: dict[str, Path] = {}
    plain = create(d / "plain.qed", 9 * MIB, "qed")
    qemu_io(plain, "write -P 0xab 64k 64k", "write -z 1M 256k", "write -P 0x33 7M 100k",
            "write -P 0x44 8M 1M", fmt="qed")
    images["plain"] = plain
    # A raw backing file shorter than the image: past its end the image reads zeros.
    base = d / "base.raw"
    base.write_bytes(random_bytes(11, 3 * MIB))
    backed = create(d / "backed.qed", 5 * MIB, "qed", backing="base.raw", backing_fmt="raw")
    qemu_io(backed, "write -P 0x66 1M 4k", "write -z 2M 64k", "write -P 0x77 4M 64k", fmt="qed")
    images["raw-backing"] = backed
    small = create(d / "small.qed", 3 * MIB, "qed", cluster_size=4096, table_size=2)
    qemu_io(small, "write -P 0x12 0 12k", "write -P 0x13 2M 300k", "write -z 1M 8k", fmt="qed")
    images["4k-clusters"] = small
    big = create(d / "big.qed", 70 * MIB, "qed", cluster_size=MIB, table_size=16)
    qemu_io(big, "write -P 0x21 0 1536k", "write -P 0x22 69M 1M", fmt="qed")
    images["1m-clusters"] = big
    pattern = d / "pattern.raw"
    pattern.write_bytes(random_bytes(12, MIB) + bytes(2 * MIB) + random_bytes(13, MIB))
    converted = d / "converted.qed"
    qemu_img("convert", "-f", "raw", "-O", "qed", pattern, converted)
    images["converted"] = converted
    return {
        name: (path, reference_raw(path, d / f"{name}.ref", "qed").read_bytes())
        for name, path in images.items()
    }


@pytest.mark.parametrize("variant",
                         ["plain", "raw-backing", "4k-clusters", "1m-clusters", "converted"])
async def test_conformance(qed_images: dict[str, tuple[Path, bytes]], variant: str) -> None:
    path, reference = qed_images[variant]
    await check_block_node(lambda: open_image(str(path)), reference)


async def test_qcow2_backing(tmp_path: Path) -> None:
    if "qcow2" not in driver_names():
        pytest.skip("no qcow2 driver registered")
    base = create(tmp_path / "base.qcow2", 4 * MIB, "qcow2")
    qemu_io(base, "write -P 0x31 0 4M", fmt="qcow2")
    top = create(tmp_path / "top.qed", 4 * MIB, "qed", backing="base.qcow2", backing_fmt="qcow2")
    qemu_io(top, "write -P 0x32 1M 64k", fmt="qed")
    reference = reference_raw(top, tmp_path / "ref", "qed").read_bytes()
    await check_block_node(lambda: open_image(str(top)), reference)
    node = await open_image(str(top))
    try:
        assert node.child("backing").driver == "qcow2"  # probed: qed records no format
    finally:
        await node.aclose()


async def test_info(qed_images: dict[str, tuple[Path, bytes]]) -> None:
    path, _ = qed_images["raw-backing"]
    expected = info(path)
    node = await open_image(str(path))
    try:
        got = node.info()
        for key in ("cluster-size", "backing-filename", "backing-filename-format"):
            assert got[key] == expected[key]
        assert node.child("backing").driver == "raw"
        assert node.warnings == []  # the raw backing file was not probed
    finally:
        await node.aclose()


async def test_block_status(qed_images: dict[str, tuple[Path, bytes]]) -> None:
    path, _ = qed_images["raw-backing"]
    node = await open_image(str(path))
    try:
        assert await node.block_status(0, MIB) == (BlockStatus(0), MIB)  # from the backing file
        assert await node.block_status(MIB, 4096) == (
            BlockStatus.DATA | BlockStatus.ALLOCATED, 4096)
        assert await node.block_status(2 * MIB, 64 * 1024) == (
            BlockStatus.ZERO | BlockStatus.ALLOCATED, 64 * 1024)
        # Unallocated past the end of the 3 MiB backing file: zeros, not allocated here.
        assert await node.block_status(3 * MIB, 64 * 1024) == (BlockStatus.ZERO, 64 * 1024)
    finally:
        await node.aclose()


async def test_l2_cache_counters(qed_images: dict[str, tuple[Path, bytes]]) -> None:
    path, _ = qed_images["plain"]
    node = await open_image(str(path))
    try:
        await node.pread(0, 4096)
        await node.pread(4096, 4096)
        snapshot = node.stats_snapshot().as_dict()
        assert snapshot["l2_cache_misses"] == 1
        assert snapshot["l2_cache_hits"] == 1
    finally:
        await node.aclose()


async def test_no_backing_option(qed_images: dict[str, tuple[Path, bytes]]) -> None:
    path, reference = qed_images["raw-backing"]
    node = await open_image(str(path), OpenOptions(backing=False))
    try:
        assert node.child("backing") is None
        assert await node.pread(0, 4096) == bytes(4096)
        assert await node.pread(MIB, 4096) == reference[MIB : MIB + 4096]
    finally:
        await node.aclose()


async def test_need_check_read_only(tmp_path: Path,
                                    qed_images: dict[str, tuple[Path, bytes]]) -> None:
    source, reference = qed_images["plain"]
    path = tmp_path / "dirty.qed"
    path.write_bytes(source.read_bytes())
    set_bits(path, FEATURES, "<Q", F_NEED_CHECK)
    digest = sha256_file(path)
    node = await open_image(str(path))
    try:
        assert any("not closed cleanly" in w for w in node.warnings)
        assert node.info()["dirty-flag"] is True
        assert await node.pread(0, node.size) == reference
    finally:
        await node.aclose()
    assert sha256_file(path) == digest  # read-only: not repaired, not touched


async def test_need_check_dangling_entry(tmp_path: Path,
                                         qed_images: dict[str, tuple[Path, bytes]]) -> None:
    """A crash between growing the L2 table and writing the cluster: the entry points past
    the end of the file. QEMU read-only fails the read; so do we, naming the entry."""
    source, _ = qed_images["plain"]
    path = tmp_path / "dangling.qed"
    path.write_bytes(source.read_bytes())
    set_bits(path, FEATURES, "<Q", F_NEED_CHECK)
    header = path.read_bytes()[:64]
    l1_offset = struct.unpack_from("<Q", header, 40)[0]
    data = bytearray(path.read_bytes())
    l2_offset = struct.unpack_from("<Q", data, l1_offset)[0]
    struct.pack_into("<Q", data, l2_offset + 8, len(data) + 64 * 1024)  # cluster 1
    path.write_bytes(bytes(data))
    node = await open_image(str(path))
    try:
        with pytest.raises(FormatError, match="end of the file") as exc:
            await node.pread(64 * 1024, 10)
        assert exc.value.field == "l2_table[0][1]"
    finally:
        await node.aclose()


async def test_backing_loop(tmp_path: Path) -> None:
    b = create(tmp_path / "b.qed", MIB, "qed")
    create(tmp_path / "a.qed", MIB, "qed", backing="b.qed", backing_fmt="qed")
    # Give b a backing file name "a.qed" inside its header cluster.
    data = bytearray(b.read_bytes())
    struct.pack_into("<II", data, 56, 64, 5)
    data[64:69] = b"a.qed"
    features = struct.unpack_from("<Q", data, FEATURES)[0]
    struct.pack_into("<Q", data, FEATURES, features | 0x01)
    b.write_bytes(bytes(data))
    with pytest.raises(ChainError, match="loops") as exc:
        await open_image(str(tmp_path / "a.qed"))
    assert exc.value.field == "backing_filename"
