"""vhdx: images made by qemu-img (dynamic, fixed, block and log sizes), a pending log replayed
in memory, and differencing files built by hand (qemu-img cannot make them)."""

from __future__ import annotations

import shutil
import struct
from pathlib import Path

import pytest

from tests.support import vhdx_build as vb
from tests.support.conformance import check_block_node
from tests.support.images import (
    QEMU_IMG,
    create,
    info,
    qemu_img,
    qemu_io,
    random_bytes,
    reference_raw,
    run,
    sha256_file,
)
from vdiskfs.block.context import OpenOptions, open_image
from vdiskfs.block.node import BlockStatus
from vdiskfs.errors import ChainError, FormatError

MIB = 1 << 20


@pytest.fixture(scope="session")
def vhdx_images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, bytes]]:
    d = tmp_path_factory.mktemp("vhdx")
    writes = ("write -P 0xab 64k 64k", "write -z 1M 512k", "write -P 0x33 3M 1M",
              "write -P 0x44 11M 100k")
    images: dict[str, Path] = {}
    for name, options in {
        "dynamic": {},
        "block-1m-log-1m": {"block_size": "1M", "log_size": "1M"},
        "block-32m": {"block_size": "32M"},
        "no-zero-state": {"block_state_zero": False},
        "fixed": {"subformat": "fixed", "block_size": "4M"},
    }.items():
        path = create(d / f"{name}.vhdx", 12 * MIB, "vhdx", **options)
        qemu_io(path, *writes, fmt="vhdx")
        images[name] = path
    pattern = d / "pattern.raw"
    pattern.write_bytes(random_bytes(21, 2 * MIB) + bytes(3 * MIB) + random_bytes(22, MIB))
    converted = d / "converted.vhdx"
    qemu_img("convert", "-f", "raw", "-O", "vhdx", "-o", "subformat=dynamic,block_size=1M",
             pattern, converted)
    images["converted"] = converted
    # 4096-byte logical sectors: qemu-img 7.2 can neither make nor read them. Change the
    # metadata item of a small image (fewer blocks than a chunk, so the BAT layout holds): the
    # guest bytes of a non-differencing image do not depend on the sector size, so QEMU's view
    # of the image before the change is the reference.
    sector4k = create(d / "sector4k.vhdx", 8 * MIB, "vhdx", block_size="1M")
    qemu_io(sector4k, "write -P 0x61 4k 8k", "write -P 0x62 5M 1M", fmt="vhdx")
    references = {
        name: reference_raw(path, d / f"{name}.ref", "vhdx").read_bytes()
        for name, path in [*images.items(), ("sector-4096", sector4k)]
    }
    layout = vb.read_layout(sector4k)
    vb.set_metadata_item(sector4k, layout, vb.LOGICAL_SECTOR, struct.pack("<I", 4096))
    images["sector-4096"] = sector4k
    return {name: (path, references[name]) for name, path in images.items()}


VARIANTS = ["dynamic", "block-1m-log-1m", "block-32m", "no-zero-state", "fixed", "converted",
            "sector-4096"]


@pytest.mark.parametrize("variant", VARIANTS)
async def test_conformance(vhdx_images: dict[str, tuple[Path, bytes]], variant: str) -> None:
    path, reference = vhdx_images[variant]
    await check_block_node(lambda: open_image(str(path)), reference)


@pytest.mark.parametrize("variant", ["dynamic", "block-32m", "fixed"])
async def test_info(vhdx_images: dict[str, tuple[Path, bytes]], variant: str) -> None:
    path, _ = vhdx_images[variant]
    node = await open_image(str(path))
    try:
        assert node.driver == "vhdx"
        assert node.info()["cluster-size"] == info(path)["cluster-size"]
        assert node.warnings == []
    finally:
        await node.aclose()


async def test_bat_cache_counters(vhdx_images: dict[str, tuple[Path, bytes]]) -> None:
    path, _ = vhdx_images["block-1m-log-1m"]
    node = await open_image(str(path))
    try:
        await node.pread(0, 4096)
        await node.pread(5 * MIB, 4096)
        assert node.counters.bat_cache_misses == 1
        assert node.counters.bat_cache_hits == 1
    finally:
        await node.aclose()


# -- the log --


@pytest.fixture(scope="session")
def dirty_log_image(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, bytes]:
    """A dynamic image whose log holds two pending entries, and QEMU's replay of it."""
    return vb.dirty_log_image(tmp_path_factory.mktemp("vhdx-log"))


async def test_log_replayed_in_memory(dirty_log_image: tuple[Path, bytes]) -> None:
    path, reference = dirty_log_image
    # QEMU refuses to read it without replaying; the replayed copy differs from the file.
    assert run(QEMU_IMG, "convert", "-O", "raw", path, "/dev/null",
               check=False).returncode != 0
    assert reference[MIB : MIB + 4096] == b"\x77" * 4096
    digest = sha256_file(path)
    await check_block_node(lambda: open_image(str(path)), reference)
    node = await open_image(str(path))
    try:
        assert any("replayed 2 pending VHDX log entries" in w for w in node.warnings)
        assert node.counters.log_entries_replayed == 2
        assert node.child("file").driver == "vhdx-log-replay"
    finally:
        await node.aclose()
    assert sha256_file(path) == digest  # never written


async def test_log_entry_into_headers_refused(tmp_path: Path) -> None:
    path = create(tmp_path / "evil.vhdx", 4 * MIB, "vhdx")
    vb.write_pending_log(path, [[vb.LogUpdate(64 * 1024, b"\0" * 4096)]])
    with pytest.raises(FormatError, match="into the headers") as exc:
        await open_image(str(path))
    assert exc.value.field is not None and exc.value.field.startswith("log_entry")


async def test_log_guid_without_entries(tmp_path: Path) -> None:
    """A log GUID but no valid entry for it: nothing to replay (QEMU agrees)."""
    path = create(tmp_path / "empty-log.vhdx", 4 * MIB, "vhdx")
    qemu_io(path, "write -P 0x42 0 64k", fmt="vhdx")
    reference = reference_raw(path, tmp_path / "ref", "vhdx").read_bytes()
    import uuid

    vb.rewrite_headers(path, vb.read_layout(path), log_guid=uuid.uuid4())
    await check_block_node(lambda: open_image(str(path)), reference)


# -- differencing --


def _diff_spec(parent: Path, sector: int = 512) -> vb.DiffSpec:
    layout = vb.read_layout(parent)
    per_block = MIB // sector
    return vb.DiffSpec(
        virtual_size=8 * MIB,
        logical_sector_size=sector,
        states={0: vb.PARTIALLY_PRESENT, 1: vb.FULLY_PRESENT, 2: vb.ZERO, 4: vb.PARTIALLY_PRESENT,
                5: vb.UNMAPPED, 6: vb.UNDEFINED},
        blocks={0: random_bytes(31, MIB), 1: random_bytes(32, MIB), 4: random_bytes(33, MIB)},
        sectors={0: set(range(8)) | set(range(100, 200)), 4: {per_block - 1}},
        locator={
            "parent_linkage": "{" + str(layout.data_write_guid) + "}",
            "relative_path": parent.name,
            "absolute_win32_path": "\\\\?\\C:\\nowhere\\parent.vhdx",
        },
    )


@pytest.fixture(scope="session")
def parent_image(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, bytes]:
    d = tmp_path_factory.mktemp("vhdx-diff")
    parent = create(d / "parent.vhdx", 8 * MIB, "vhdx", block_size="1M")
    qemu_io(parent, "write -P 0xa1 0 8M", fmt="vhdx")
    return parent, reference_raw(parent, d / "parent.ref", "vhdx").read_bytes()


@pytest.mark.parametrize("sector", [512, 4096])
async def test_differencing(parent_image: tuple[Path, bytes], sector: int) -> None:
    parent, parent_bytes = parent_image
    child = parent.parent / f"child-{sector}.vhdx"
    spec = _diff_spec(parent, sector)
    vb.build_differencing(child, spec)
    expected = vb.expected_differencing(parent_bytes, spec)
    await check_block_node(lambda: open_image(str(child)), expected)
    node = await open_image(str(child))
    try:
        assert node.child("backing").driver == "vhdx"
        assert node.info()["backing-filename"] == "parent.vhdx"
        # Block 0: 8 sectors here, then the parent's.
        assert await node.block_status(0, MIB) == (BlockStatus.DATA | BlockStatus.ALLOCATED,
                                                   8 * sector)
        assert await node.block_status(8 * sector, MIB - 8 * sector) == (
            BlockStatus(0), 92 * sector)
        assert await node.block_status(2 * MIB, MIB) == (
            BlockStatus.ZERO | BlockStatus.ALLOCATED, MIB)
        assert await node.block_status(3 * MIB, MIB) == (BlockStatus(0), MIB)
        assert node.counters.bitmap_cache_misses >= 1
    finally:
        await node.aclose()


async def test_differencing_without_backing(parent_image: tuple[Path, bytes]) -> None:
    parent, _ = parent_image
    child = parent.parent / "child-alone.vhdx"
    spec = _diff_spec(parent)
    vb.build_differencing(child, spec)
    node = await open_image(str(child), OpenOptions(backing=False))
    try:
        assert node.child("backing") is None
        assert await node.pread(3 * MIB, 512) == bytes(512)
    finally:
        await node.aclose()


async def test_differencing_parent_modified(parent_image: tuple[Path, bytes]) -> None:
    parent, _ = parent_image
    child = parent.parent / "child-stale.vhdx"
    spec = _diff_spec(parent)
    spec.locator["parent_linkage"] = "{01234567-89ab-cdef-0123-456789abcdef}"
    vb.build_differencing(child, spec)
    with pytest.raises(FormatError, match="DataWriteGuid") as exc:
        await open_image(str(child))
    assert exc.value.field == "parent_locator.parent_linkage"


async def test_differencing_parent_missing(tmp_path: Path,
                                           parent_image: tuple[Path, bytes]) -> None:
    parent, _ = parent_image
    spec = _diff_spec(parent)
    child = tmp_path / "orphan.vhdx"
    vb.build_differencing(child, spec)
    with pytest.raises(FormatError, match="parent not found"):
        await open_image(str(child))


async def test_differencing_loop(tmp_path: Path) -> None:
    spec = vb.DiffSpec(virtual_size=MIB, locator={
        "parent_linkage": "{01234567-89ab-cdef-0123-456789abcdef}", "relative_path": "b.vhdx"})
    vb.build_differencing(tmp_path / "a.vhdx", spec)
    spec.locator["relative_path"] = "a.vhdx"
    vb.build_differencing(tmp_path / "b.vhdx", spec)
    with pytest.raises(ChainError, match="loops"):
        await open_image(str(tmp_path / "a.vhdx"))
    spec.locator["relative_path"] = "self.vhdx"
    vb.build_differencing(tmp_path / "self.vhdx", spec)
    with pytest.raises(ChainError, match="loops"):
        await open_image(str(tmp_path / "self.vhdx"))


# -- headers and region tables --


async def test_damaged_active_header_falls_back(tmp_path: Path,
                                                vhdx_images: dict[str, tuple[Path, bytes]]) -> None:
    source, reference = vhdx_images["dynamic"]
    path = tmp_path / "header.vhdx"
    shutil.copyfile(source, path)
    layout = vb.read_layout(path)
    vb.write_at(path, vb.HEADER_OFFSETS[layout.active_header] + 100, b"\xff")  # breaks the CRC
    await check_block_node(lambda: open_image(str(path)), reference)


async def test_equal_sequence_numbers_differing(tmp_path: Path,
                                                vhdx_images: dict[str, tuple[Path, bytes]]) -> None:
    source, _ = vhdx_images["dynamic"]
    path = tmp_path / "seq.vhdx"
    shutil.copyfile(source, path)
    layout = vb.read_layout(path)
    layout.headers[0][16:32] = bytes(16)  # a different FileWriteGuid
    vb.rewrite_headers(path, layout, sequence0=5, sequence1=5)
    with pytest.raises(FormatError, match="both headers") as exc:
        await open_image(str(path))
    assert exc.value.field == "header.sequence_number"


async def test_damaged_region_table_uses_copy(tmp_path: Path,
                                              vhdx_images: dict[str, tuple[Path, bytes]]) -> None:
    source, reference = vhdx_images["dynamic"]
    path = tmp_path / "region.vhdx"
    shutil.copyfile(source, path)
    vb.write_at(path, vb.REGION_OFFSETS[0] + 1000, b"\xff")
    node = await open_image(str(path))
    try:
        assert any("region table 1 is damaged" in w for w in node.warnings)
        assert await node.pread(0, node.size) == reference
    finally:
        await node.aclose()
