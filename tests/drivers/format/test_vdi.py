"""vdi: static and dynamic images made by qemu-img, read byte for byte as QEMU reads them."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from tests.support.conformance import check_block_node
from tests.support.images import create, info, qemu_img, qemu_io, random_bytes, reference_raw
from vdiskfs.block.context import open_image
from vdiskfs.block.node import BlockStatus
from vdiskfs.drivers.format.vdi import DISCARDED, UNALLOCATED

MIB = 1 << 20


@pytest.fixture(scope="session")
def vdi_images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, bytes]]:
    """Each variant with the bytes qemu-img convert -O raw gives for it."""
    d = tmp_path_factory.mktemp("vdi")
    images: dict[str, Path] = {}
    dynamic = create(d / "dynamic.vdi", 6 * MIB + 512, "vdi")
    qemu_io(dynamic, "write -P 0xab 0 64k", "write -P 0xcd 3M 1M", "write -z 1M 512k",
            "write -P 0x11 5M 100k", fmt="vdi")
    images["dynamic"] = dynamic
    static = create(d / "static.vdi", 3 * MIB, "vdi", static=True)
    qemu_io(static, "write -P 0x22 100k 5k", "write -P 0x33 2M 1M", fmt="vdi")
    images["static"] = static
    raw = d / "pattern.raw"
    raw.write_bytes(random_bytes(3, 2 * MIB) + bytes(MIB) + random_bytes(4, MIB))
    converted = d / "converted.vdi"
    qemu_img("convert", "-f", "raw", "-O", "vdi", raw, converted)
    images["converted"] = converted
    empty = create(d / "empty.vdi", 2 * MIB, "vdi")
    images["empty"] = empty
    return {
        name: (path, reference_raw(path, d / f"{name}.ref", "vdi").read_bytes())
        for name, path in images.items()
    }


@pytest.mark.parametrize("variant", ["dynamic", "static", "converted", "empty"])
async def test_conformance(vdi_images: dict[str, tuple[Path, bytes]], variant: str) -> None:
    path, reference = vdi_images[variant]
    await check_block_node(lambda: open_image(str(path)), reference)


async def test_probe_and_info(vdi_images: dict[str, tuple[Path, bytes]]) -> None:
    path, _ = vdi_images["dynamic"]
    node = await open_image(str(path))
    try:
        assert node.driver == "vdi"
        assert node.warnings == []
        assert node.info()["cluster-size"] == info(path)["cluster-size"]
    finally:
        await node.aclose()


async def test_block_status_and_coalescing(vdi_images: dict[str, tuple[Path, bytes]]) -> None:
    path, reference = vdi_images["converted"]
    node = await open_image(str(path))
    try:
        # Blocks 0 and 1 were allocated in order: one child read serves both.
        before = node.counters.data_reads
        assert await node.pread(MIB - 10, 20) == reference[MIB - 10 : MIB + 10]
        assert node.counters.data_reads == before + 1
        status, _run = await node.block_status(0, node.size)
        assert status == BlockStatus.DATA | BlockStatus.ALLOCATED
    finally:
        await node.aclose()
    path, _ = vdi_images["empty"]
    node = await open_image(str(path))
    try:
        # Never allocated: zeros, but not defined by this image.
        assert await node.block_status(0, node.size) == (BlockStatus.ZERO, node.size)
    finally:
        await node.aclose()


def _bmap_entry_offset(path: Path, block: int) -> int:
    with open(path, "rb") as f:
        header = f.read(512)
    offset_bmap = struct.unpack_from("<I", header, 0x154)[0]
    return offset_bmap + 4 * block


async def test_discarded_block_reads_zero(tmp_path: Path,
                                          vdi_images: dict[str, tuple[Path, bytes]]) -> None:
    source, reference = vdi_images["static"]
    path = tmp_path / "discarded.vdi"
    path.write_bytes(source.read_bytes())
    with open(path, "r+b") as f:
        f.seek(_bmap_entry_offset(path, 2))
        f.write(struct.pack("<I", DISCARDED))
        f.seek(_bmap_entry_offset(path, 1))
        f.write(struct.pack("<I", UNALLOCATED))
    expected = reference[:MIB] + bytes(2 * MIB)
    assert reference_raw(path, tmp_path / "ref", "vdi").read_bytes() == expected
    await check_block_node(lambda: open_image(str(path)), expected)
    node = await open_image(str(path))
    try:
        assert await node.block_status(2 * MIB, MIB) == (
            BlockStatus.ZERO | BlockStatus.ALLOCATED, MIB)
        assert await node.block_status(MIB, MIB) == (BlockStatus.ZERO, MIB)
    finally:
        await node.aclose()
