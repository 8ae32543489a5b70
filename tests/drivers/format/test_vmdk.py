"""The vmdk driver against QEMU: every variant qemu-img writes, hand-built streams, deltas."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.support.conformance import check_block_node
from tests.support.images import info, qemu_img, qemu_io, random_bytes, reference_raw
from tests.support.probe_corpus import assert_claims_only_its_own
from tests.support.vmdk_images import (
    build_stream_optimized,
    embed_descriptor,
    make_vmdk,
    write_descriptor,
)
from vdiskfs.block.context import OpenOptions, open_image
from vdiskfs.block.node import BlockNode, BlockStatus
from vdiskfs.drivers.format.runs import Run, RunKind
from vdiskfs.drivers.format.vmdk import VmdkNode
from vdiskfs.drivers.format.vmdk.descriptor import looks_like_descriptor, parse_descriptor
from vdiskfs.drivers.format.vmdk.mapping import SparseGeometry, map_grain_table

MiB = 1 << 20
# Writes with qemu-io patterns: data, data spanning grains and grain tables, zeros.
WRITES = (
    "write -P 0xab 0 64k",
    "write -P 0x11 100k 300k",
    "write -P 0x22 3M 1M",
    "write -z 3200k 64k",
    "write -P 0x33 5M 1536",
)
SIZE = 5 * MiB + 1536


@dataclass
class Image:
    path: Path
    reference: bytes


def _with_reference(path: Path) -> Image:
    raw = path.with_name(path.name + ".raw")
    reference_raw(path, raw, fmt="vmdk")
    return Image(path, raw.read_bytes())


def _variant_dir(root: Path, name: str) -> Path:
    directory = root / name
    directory.mkdir()
    return directory


def _build_all(root: Path) -> dict[str, Image]:
    images: dict[str, Image] = {}
    for subformat in ("monolithicSparse", "monolithicFlat", "twoGbMaxExtentSparse",
                      "twoGbMaxExtentFlat"):
        path = _variant_dir(root, subformat) / "disk.vmdk"
        images[subformat] = _with_reference(make_vmdk(path, SIZE, subformat, io=WRITES))

    # Zeroed grains (GTE 1): 'write -z' over data leaves a zero grain, not zero data.
    path = _variant_dir(root, "zeroed-grain") / "disk.vmdk"
    make_vmdk(path, SIZE, zeroed_grain=True, io=(*WRITES, "write -z 0 128k"))
    images["zeroed-grain"] = _with_reference(path)

    # streamOptimized as QEMU writes it (grain directory in place), from a raw source.
    directory = _variant_dir(root, "streamOptimized")
    source = directory / "source.raw"
    data = bytearray(SIZE)
    for offset in (0, 70_000, 2 * MiB + 5, SIZE - 3000):
        data[offset : offset + 3000] = random_bytes(offset, 3000)
    source.write_bytes(bytes(data))
    path = directory / "disk.vmdk"
    qemu_img("convert", "-f", "raw", "-O", "vmdk", "-o", "subformat=streamOptimized", source,
             path)
    images["streamOptimized"] = _with_reference(path)

    # streamOptimized as VMware writes it: grain directory at the end, found via the footer.
    path = _variant_dir(root, "stream-gd-at-end") / "disk.vmdk"
    images["stream-gd-at-end"] = _with_reference(build_stream_optimized(path, bytes(data)))

    # One descriptor mixing a sparse extent, a flat extent at an offset, a compressed extent.
    directory = _variant_dir(root, "mixed-extents")
    make_vmdk(directory / "a.vmdk", MiB, io=("write -P 0x41 4k 200k",))
    (directory / "b.bin").write_bytes(random_bytes(2, 2048 + MiB + 4096))
    # (QEMU reads the stream footer of an extent at the descriptor's size: GD in place here.)
    (directory / "c.raw").write_bytes(random_bytes(3, MiB))
    qemu_img("convert", "-f", "raw", "-O", "vmdk", "-o", "subformat=streamOptimized",
             directory / "c.raw", directory / "c.vmdk")
    write_descriptor(directory / "disk.vmdk", create_type="twoGbMaxExtentSparse", extents=[
        f'RW {MiB // 512} SPARSE "a.vmdk"',
        f'RW {MiB // 512} FLAT "b.bin" 4',
        f'RW {MiB // 512} SPARSE "c.vmdk"',
    ])
    images["mixed-extents"] = _with_reference(directory / "disk.vmdk")

    # A sparse header of capacity 0 whose embedded descriptor lists the extents (QEMU reads
    # it as a descriptor file).
    directory = _variant_dir(root, "embedded-descriptor")
    (directory / "data.bin").write_bytes(random_bytes(4, MiB))
    make_vmdk(directory / "disk.vmdk", MiB)
    embed_descriptor(directory / "disk.vmdk", (
        "# Disk DescriptorFile\nversion=1\nCID=11112222\nparentCID=ffffffff\n"
        'createType="monolithicFlat"\n'
        f'RW {MiB // 512} FLAT "data.bin" 0\n'
        f'RW {SIZE // 512} SPARSE "../monolithicSparse/disk.vmdk"\n'
    ), capacity=0)
    images["embedded-descriptor"] = _with_reference(directory / "disk.vmdk")

    # A delta over a flat base, with a zeroed grain hiding base data, and a third layer.
    directory = _variant_dir(root, "delta")
    base = make_vmdk(directory / "base.vmdk", 4 * MiB, "monolithicFlat",
                     io=("write -P 0x5a 0 4M",))
    mid = directory / "mid.vmdk"
    qemu_img("create", "-q", "-f", "vmdk", "-o", "zeroed_grain=on", "-b", base.name, "-F",
             "vmdk", mid)
    qemu_io(mid, "write -P 0x33 512k 64k", "write -z 1M 64k", "write -P 0x44 130k 10k",
            fmt="vmdk")
    images["delta"] = _with_reference(mid)
    top = directory / "top.vmdk"
    qemu_img("create", "-q", "-f", "vmdk", "-b", mid.name, "-F", "vmdk", top)
    qemu_io(top, "write -P 0x77 1M 4k", "write -P 0x78 3M 200k", fmt="vmdk")
    images["delta-chain"] = _with_reference(top)
    return images


@pytest.fixture(scope="session")
def vmdk_images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Image]:
    return _build_all(tmp_path_factory.mktemp("vmdk"))


VARIANTS = ["monolithicSparse", "monolithicFlat", "twoGbMaxExtentSparse", "twoGbMaxExtentFlat",
            "zeroed-grain", "streamOptimized", "stream-gd-at-end", "mixed-extents",
            "embedded-descriptor", "delta", "delta-chain"]


@pytest.mark.parametrize("variant", VARIANTS)
async def test_conformance(vmdk_images: dict[str, Image], variant: str) -> None:
    image = vmdk_images[variant]
    await check_block_node(lambda: open_image(str(image.path)), image.reference)


async def _open(path: Path, **options: Any) -> BlockNode:
    return await open_image(str(path), OpenOptions(**options))


@pytest.mark.parametrize("variant", VARIANTS)
async def test_info_matches_qemu(vmdk_images: dict[str, Image], variant: str) -> None:
    path = vmdk_images[variant].path
    expected = info(path)
    node = await _open(path)
    try:
        ours = node.info()
        assert node.size == expected["virtual-size"]
        assert ours.get("cluster-size") == expected.get("cluster-size")
        assert ours.get("backing-filename") == expected.get("backing-filename")
        want = expected["format-specific"]
        got = ours["format-specific"]
        assert got["type"] == want["type"] == "vmdk"
        for key in ("cid", "parent-cid", "create-type"):
            assert got["data"][key] == want["data"][key], key
        assert len(got["data"]["extents"]) == len(want["data"]["extents"])
        for mine, theirs in zip(got["data"]["extents"], want["data"]["extents"], strict=True):
            # QEMU prints the path as it opened it; compare the file each names.
            assert os.path.samefile(mine.pop("filename"), path.parent / theirs.pop("filename"))
            assert mine == theirs
    finally:
        await node.aclose()


async def test_probe_picks_vmdk_for_every_variant(vmdk_images: dict[str, Image]) -> None:
    for variant in VARIANTS:
        node = await _open(vmdk_images[variant].path)
        try:
            assert node.driver == "vmdk", variant
            assert node.warnings == []
        finally:
            await node.aclose()


def test_probe_against_every_format(tmp_path: Path) -> None:
    """vmdk claims vmdk images only; no other driver outscores it on one."""
    assert_claims_only_its_own("vmdk", tmp_path)


def test_descriptor_probe_follows_qemu() -> None:
    assert looks_like_descriptor(b"# Disk DescriptorFile\nversion=1\nCID=1\n")
    assert looks_like_descriptor(b"# c\r\n  \r\nversion=3\r\n")
    assert not looks_like_descriptor(b"version=4\n")
    assert not looks_like_descriptor(b"# Disk DescriptorFile\nCID=1\nversion=1\n")
    assert not looks_like_descriptor(b"#\0\nversion=1\n")
    assert not looks_like_descriptor(b"QFI\xfb\0\0\0\3")
    assert not looks_like_descriptor(b"# only a comment")


def test_descriptor_parser() -> None:
    text = (
        b"# Disk DescriptorFile\nversion=1\nCID=0x1a2b\nparentCID=ffffffff\n"
        b'createType="twoGbMaxExtentFlat"\nparentFileNameHint="../base dir/b.vmdk"\n'
        b'RW 100 FLAT "a b.vmdk" 7\r\nRDONLY 20 SPARSE "s.vmdk"\nRW 5 ZERO\n'
        b'ddb.geometry.heads = "16"\n\0\0garbage after the NUL'
    )
    desc = parse_descriptor(text, "d.vmdk")
    assert (desc.version, desc.cid, desc.parent_cid) == (1, 0x1A2B, 0xFFFFFFFF)
    assert desc.parent_filename_hint == "../base dir/b.vmdk"
    assert [(e.access, e.sectors, e.type, e.filename, e.offset) for e in desc.extents] == [
        ("RW", 100, "FLAT", "a b.vmdk", 7),
        ("RDONLY", 20, "SPARSE", "s.vmdk", 0),
        ("RW", 5, "ZERO", None, 0),
    ]
    assert desc.ddb == {"ddb.geometry.heads": "16"}


async def test_zero_extent_reads_zeros(tmp_path: Path) -> None:
    """ZERO extents (which QEMU skips) read as zeros and report ZERO|ALLOCATED."""
    (tmp_path / "f.bin").write_bytes(b"\x99" * 4096)
    write_descriptor(tmp_path / "d.vmdk", create_type="monolithicFlat",
                     extents=['RW 8 FLAT "f.bin" 0', "RW 16 ZERO", 'RW 8 FLAT "f.bin" 0'])
    node = await _open(tmp_path / "d.vmdk")
    try:
        assert node.size == 32 * 512
        data = bytes(await node.pread(0, node.size))
        assert data == b"\x99" * 4096 + bytes(8192) + b"\x99" * 4096
        assert await node.block_status(4096, 8192) == (
            BlockStatus.ZERO | BlockStatus.ALLOCATED, 8192)
    finally:
        await node.aclose()


async def test_delta_block_status(vmdk_images: dict[str, Image]) -> None:
    node = await _open(vmdk_images["delta"].path)
    try:
        # Not allocated in the delta: neither DATA nor ZERO (the base shows through).
        assert await node.block_status(0, 64 * 1024) == (BlockStatus(0), 64 * 1024)
        assert await node.block_status(512 * 1024, 64 * 1024) == (
            BlockStatus.DATA | BlockStatus.ALLOCATED, 64 * 1024)
        # The zeroed grain hides the base's 0x5a bytes.
        assert await node.block_status(MiB, 64 * 1024) == (
            BlockStatus.ZERO | BlockStatus.ALLOCATED, 64 * 1024)
        assert bytes(await node.pread(MiB, 64 * 1024)) == bytes(64 * 1024)
    finally:
        await node.aclose()


async def test_delta_without_backing_reads_zeros(vmdk_images: dict[str, Image]) -> None:
    image = vmdk_images["delta"]
    node = await _open(image.path, backing=False)
    try:
        assert node.child("backing") is None
        assert bytes(await node.pread(0, 4096)) == bytes(4096)  # the base holds 0x5a here
        assert await node.block_status(0, 4096) == (BlockStatus.ZERO, 4096)
        assert bytes(await node.pread(512 * 1024, 4096)) == image.reference[
            512 * 1024 : 512 * 1024 + 4096]
    finally:
        await node.aclose()


async def test_counters_and_coalescing(vmdk_images: dict[str, Image]) -> None:
    image = vmdk_images["monolithicSparse"]
    node = await _open(image.path)
    try:
        assert isinstance(node, VmdkNode)
        # 3M..4M was written in one go: 16 grains laid out one after the other, one read.
        assert bytes(await node.pread(3 * MiB, MiB)) == image.reference[3 * MiB : 4 * MiB]
        counters = node.stats_snapshot().driver
        assert counters["data_reads"] == 1
        assert counters["gt_cache_misses"] == 1
        await node.pread(3 * MiB, 4096)
        assert node.stats_snapshot().driver["gt_cache_hits"] >= 1
    finally:
        await node.aclose()


async def test_compressed_grain_cache(vmdk_images: dict[str, Image]) -> None:
    image = vmdk_images["stream-gd-at-end"]
    node = await _open(image.path)
    try:
        for offset in range(0, 4096, 512):  # eight reads inside one compressed grain
            assert bytes(await node.pread(offset, 512)) == image.reference[offset : offset + 512]
        counters = node.stats_snapshot().driver
        assert counters["grain_cache_misses"] == 1
        assert counters["grain_cache_hits"] == 7
        assert counters["compressed_bytes_read"] > 0
    finally:
        await node.aclose()


@pytest.mark.parametrize("subformat", ["twoGbMaxExtentSparse", "twoGbMaxExtentFlat"])
async def test_two_gib_extents(tmp_path: Path, subformat: str) -> None:
    """A disk just over 2 GiB, mostly sparse: two extents, data across their boundary."""
    boundary = 2 << 30
    path = make_vmdk(tmp_path / "big.vmdk", "2049M", subformat, io=(
        f"write -P 0xab {boundary - 65536} 131072",
        "write -P 0x11 0 65536",
        f"write -P 0x22 {boundary + 512 * 1024} 4096",
    ))
    raw = reference_raw(path, tmp_path / "big.raw", fmt="vmdk")
    expected = info(path)
    node = await _open(path)
    try:
        assert node.size == expected["virtual-size"] == raw.stat().st_size
        assert len(node.children) == 3  # the descriptor and two extents
        with open(raw, "rb") as reference:
            for offset, length in ((0, 70_000), (boundary - 70_000, 140_000),
                                   (boundary - 1, 2), (boundary + 500_000, 30_000),
                                   (node.size - 4096, 4096), (MiB, 4 * MiB)):
                assert bytes(await node.pread(offset, length)) == os.pread(
                    reference.fileno(), length, offset), (offset, length)
        status, _ = await node.block_status(boundary - 65536, 131072)
        assert status & BlockStatus.DATA
    finally:
        await node.aclose()


def test_map_grain_table_is_pure_and_coalesces() -> None:
    """Grains adjacent in the guest and in the file become one DATA run; a zeroed grain, an
    unallocated one and a compressed one each keep their kind."""
    geometry = SparseGeometry(grain_size=4096, gtes_per_gt=8, compressed=False, zero_grain=True)
    table = [100, 108, 0, 1, 0, 300, 200, 208]  # sectors; 108 = 100 + one 4 KiB grain
    runs = map_grain_table(geometry, table, extent=2, child=None, guest_base=1 << 20,
                           offset=8 * 4096 + 10, length=8 * 4096 - 20, file_size=1 << 20,
                           table_offset=512, label="x.vmdk")
    # offset 8*4096 is grain 0 of the *second* table: indexes restart at 0.
    assert runs == [
        Run(RunKind.DATA, (1 << 20) + 8 * 4096 + 10, 2 * 4096 - 10, 100 * 512 + 10),
        Run(RunKind.BACKING, (1 << 20) + 10 * 4096, 4096),
        Run(RunKind.ZERO, (1 << 20) + 11 * 4096, 4096),
        Run(RunKind.BACKING, (1 << 20) + 12 * 4096, 4096),
        Run(RunKind.DATA, (1 << 20) + 13 * 4096, 4096, 300 * 512),
        Run(RunKind.DATA, (1 << 20) + 14 * 4096, 2 * 4096 - 10, 200 * 512),
    ]
    assert map_grain_table(geometry, None, extent=0, child=None, guest_base=0, offset=5,
                           length=7,
                           file_size=0, table_offset=0, label="x") == [
        Run(RunKind.BACKING, 5, 7)]
    compressed = SparseGeometry(4096, 8, compressed=True, zero_grain=False)
    assert map_grain_table(compressed, [7, 1, 0, 0, 0, 0, 0, 0], extent=3, child=None,
                           guest_base=0,
                           offset=100, length=5000, file_size=1 << 20, table_offset=0,
                           label="x") == [
        Run(RunKind.COMPRESSED, 100, 3996, 7 * 512, None, 3),
        # Without the zeroed-grain flag, entry 1 is a grain at sector 1, as QEMU reads it.
        Run(RunKind.COMPRESSED, 4096, 1004, 512, None, 3),
    ]
