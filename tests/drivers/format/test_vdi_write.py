"""vdi writes: static images in place, dynamic ones allocating blocks; checked with qemu-img
check and compare after the shared random workload, and after simulated crashes."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.support.conformance import check_block_node
from tests.support.crash import run_crash
from tests.support.hostile import patch, read_field
from tests.support.images import create, qemu_img, qemu_io, random_bytes, reference_raw, sha256_file
from tests.support.workload import (
    assert_clean,
    assert_qemu_agrees,
    assert_same_as_model,
    assert_use_changes_nothing,
    make_block_workload,
    qemu_check,
    run_workload_checked,
    write_racing,
    write_reference,
)
from vdiskfs.block.context import OpenOptions, open_image
from vdiskfs.drivers.format.vdi import BLOCKS_ALLOCATED_OFFSET, DISCARDED, VdiNode
from vdiskfs.errors import FormatError, NoSpaceError

MIB = 1 << 20
BMAP_OFFSET = 0x154


@pytest.fixture(scope="session")
def vdi_templates(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Pre-filled images: writes then hit allocated, unallocated and partly written blocks."""
    d = tmp_path_factory.mktemp("vdi-write")
    dynamic = create(d / "dynamic.vdi", 6 * MIB + 512, "vdi")  # a partial last block
    qemu_io(dynamic, "write -P 0xab 0 64k", "write -P 0xcd 3M 1M", "write -z 1M 512k",
            "write -P 0x11 5M 100k", fmt="vdi")
    static = create(d / "static.vdi", 5 * MIB, "vdi", static=True)
    qemu_io(static, "write -P 0x22 100k 5k", "write -P 0x33 2M 1M", fmt="vdi")
    pattern = d / "pattern.raw"
    pattern.write_bytes(random_bytes(3, 2 * MIB) + bytes(MIB) + random_bytes(4, MIB))
    converted = d / "converted.vdi"
    qemu_img("convert", "-f", "raw", "-O", "vdi", pattern, converted)
    empty = create(d / "empty.vdi", 4 * MIB, "vdi")
    return {"dynamic": dynamic, "static": static, "converted": converted, "empty": empty}


VARIANTS = ["dynamic", "static", "converted", "empty"]


def _copy(templates: dict[str, Path], variant: str, tmp_path: Path) -> tuple[Path, Path]:
    """A copy of the template and QEMU's raw view of it (the reference the test updates)."""
    path = tmp_path / f"{variant}.vdi"
    shutil.copyfile(templates[variant], path)
    return path, reference_raw(path, tmp_path / f"{variant}.raw", "vdi")


async def _open_rw(path: Path) -> VdiNode:
    node = await open_image(str(path), OpenOptions(read_only=False, format="vdi"))
    assert isinstance(node, VdiNode)
    return node


@pytest.mark.parametrize("variant", VARIANTS)
async def test_workload_matches_qemu(vdi_templates: dict[str, Path], variant: str,
                                     tmp_path: Path) -> None:
    path, reference = _copy(vdi_templates, variant, tmp_path)
    ops = make_block_workload(reference.stat().st_size, seed=len(variant), unit=MIB)
    node = await run_workload_checked(path, "vdi", ops, reference)
    if variant == "static":
        assert node.counters.blocks_allocated == 0


@pytest.mark.parametrize("variant", VARIANTS)
async def test_conformance_writable(vdi_templates: dict[str, Path], variant: str,
                                    tmp_path: Path) -> None:
    path, reference = _copy(vdi_templates, variant, tmp_path)
    await check_block_node(lambda: _open_rw(path), reference.read_bytes(), writable=True)
    assert_clean(path, "vdi")


@pytest.mark.parametrize("variant", VARIANTS)
async def test_read_only_open_changes_nothing(vdi_templates: dict[str, Path], variant: str,
                                              tmp_path: Path) -> None:
    path, _ = _copy(vdi_templates, variant, tmp_path)
    await assert_use_changes_nothing(path)


async def test_writable_open_without_writes_changes_nothing(vdi_templates: dict[str, Path],
                                                            tmp_path: Path) -> None:
    path, _ = _copy(vdi_templates, "dynamic", tmp_path)
    await assert_use_changes_nothing(path, writable=True, fmt="vdi")


async def test_metadata_reaches_the_file_at_flush(vdi_templates: dict[str, Path],
                                                  tmp_path: Path) -> None:
    """The block map and header are written back by flush(), not by each write."""
    path, reference = _copy(vdi_templates, "empty", tmp_path)
    node = await _open_rw(path)
    try:
        await node.pwrite(MIB + 10, b"\x5a" * 3000)
        assert node.counters.blocks_allocated == 1
        assert node.counters.metadata_writebacks == 0
        write_reference(reference, MIB + 10, b"\x5a" * 3000)
        await node.flush()
        assert node.counters.metadata_writebacks == 1
        # QEMU now reads the allocation while we still hold the image.
        qemu_img("convert", "-U", "-f", "vdi", "-O", "raw", path, tmp_path / "now.raw")
        assert sha256_file(tmp_path / "now.raw") == sha256_file(reference)
        await node.flush()
        assert node.counters.metadata_writebacks == 1  # nothing new to write back
    finally:
        await node.aclose()
    assert_clean(path, "vdi")


async def test_zero_never_allocates(vdi_templates: dict[str, Path], tmp_path: Path) -> None:
    path, reference = _copy(vdi_templates, "dynamic", tmp_path)
    size = path.stat().st_size
    node = await _open_rw(path)
    try:
        # Block 1 is unallocated (qemu-io's write -z left it so), block 3 allocated.
        await node.zero(MIB, 2 * MIB + 1000)
        assert node.counters.blocks_allocated == 0
    finally:
        await node.aclose()
    assert path.stat().st_size == size
    write_reference(reference, MIB, bytes(2 * MIB + 1000))
    assert_qemu_agrees(path, "vdi", reference)


async def test_concurrent_writes_to_one_new_block(vdi_templates: dict[str, Path],
                                                  tmp_path: Path) -> None:
    """Writers racing into one unallocated block share a single allocation."""
    path, reference = _copy(vdi_templates, "empty", tmp_path)
    pieces = [(2 * MIB + i * 10_000, bytes([i + 1]) * 7000) for i in range(20)]
    node = await write_racing(path, "vdi", pieces, reference)
    assert node.counters.blocks_allocated == 1


async def test_leaked_top_block_repaired(vdi_templates: dict[str, Path],
                                         tmp_path: Path) -> None:
    """A crash between the header and the block map leaves blocks_allocated one too high:
    QEMU calls it a corruption it cannot repair; a writable open lowers it back."""
    path, reference = _copy(vdi_templates, "dynamic", tmp_path)
    allocated = read_field(path, BLOCKS_ALLOCATED_OFFSET, "<I")
    patch(path, BLOCKS_ALLOCATED_OFFSET, "<I", allocated + 1)
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size + MIB)
    result = qemu_check(path, "vdi")
    assert result["corruptions"] == 1 and "allocated blocks mismatch" in result["stderr"]
    node = await _open_rw(path)
    try:
        assert any("blocks_allocated lowered" in w for w in node.warnings)
        await node.pwrite(4 * MIB + 5, b"\x77" * 100)  # reuses the leaked data block
        assert node.blocks_allocated == allocated + 1
    finally:
        await node.aclose()
    write_reference(reference, 4 * MIB + 5, b"\x77" * 100)
    assert_qemu_agrees(path, "vdi", reference)


async def test_block_used_twice_refused(vdi_templates: dict[str, Path], tmp_path: Path) -> None:
    path, _ = _copy(vdi_templates, "dynamic", tmp_path)
    offset_bmap = read_field(path, BMAP_OFFSET, "<I")
    # Block 2 -> block 0's data block.
    patch(path, offset_bmap + 4 * 2, "<I", read_field(path, offset_bmap, "<I"))
    with pytest.raises(FormatError, match="twice") as exc:
        await _open_rw(path)
    assert exc.value.field == "block_map"
    node = await open_image(str(path))  # read-only is fine
    await node.aclose()


async def _crash(templates: dict[str, Path], variant: str, budget: int,
                 tmp_path: Path) -> None:
    path, _ = _copy(templates, variant, tmp_path)
    got, _ = await run_crash(path, VdiNode, budget=budget, seed=budget, unit=MIB)
    ours = tmp_path / "ours.raw"
    assert_same_as_model(path, "vdi", got, ours)  # QEMU reads the crashed image as we do
    result = qemu_check(path, "vdi")
    if result.get("corruptions"):
        # The one state a crash may leave: blocks_allocated above what the map uses (a
        # leak, though QEMU counts it as a corruption). A writable open repairs it.
        assert result["corruptions"] == 1, result
        found, expected = _mismatch(result["stderr"])
        assert found < expected, result
        node = await _open_rw(path)
        await node.aclose()
        assert_qemu_agrees(path, "vdi", ours)
    else:
        assert_clean(path, "vdi")


# Budgets 5, 11 and 15 cut the power between the header and the block map of a write-back.
async def test_full_data_area_refuses_allocation(vdi_templates: dict[str, Path],
                                                 tmp_path: Path) -> None:
    """A static image with a discarded block has no data block to give it back: vdiskfs
    allocates at the end only."""
    path, _ = _copy(vdi_templates, "static", tmp_path)
    patch(path, read_field(path, BMAP_OFFSET, "<I") + 4, "<I", DISCARDED)
    node = await _open_rw(path)
    try:
        await node.pwrite(0, b"in place")
        with pytest.raises(NoSpaceError, match="no data block left"):
            await node.pwrite(MIB + 5, b"needs a block")
        assert await node.pread(MIB, 100) == bytes(100)
    finally:
        await node.aclose()


@pytest.mark.parametrize("budget", [0, 1, 2, 3, 5, 8, 11, 15, 20, 30, 45])
@pytest.mark.parametrize("variant", ["dynamic", "static"])
async def test_crash_keeps_flushed_data(vdi_templates: dict[str, Path], variant: str,
                                        budget: int, tmp_path: Path) -> None:
    await _crash(vdi_templates, variant, budget, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("budget", range(0, 50))
async def test_crash_after_every_write(vdi_templates: dict[str, Path], budget: int,
                                       tmp_path: Path) -> None:
    await _crash(vdi_templates, "dynamic", budget, tmp_path)


def _mismatch(stderr: str) -> tuple[int, int]:
    """``ERROR: allocated blocks mismatch, is N, should be M``: (N, M)."""
    line = next(line for line in stderr.splitlines() if "allocated blocks mismatch" in line)
    is_part, should_part = line.split("is ")[1].split(", should be ")
    return int(is_part), int(should_part)
