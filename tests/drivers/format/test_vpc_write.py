"""Writing VHD (vpc) images, checked by QEMU: the random workload on fixed and dynamic disks,
then ``qemu-img compare`` against a raw reference (QEMU has no check for vpc); differencing
disks against their own model; crash simulation; refusals of hostile layouts."""

from __future__ import annotations

import errno
import random
import shutil
import struct
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.conformance import check_block_node
from tests.support.crash import run_concurrent, run_crash, run_power_cut, write_back_crash_points
from tests.support.images import qemu_img, reference_raw, sha256_file
from tests.support.vpc_images import Block, Locator, VhdSpec, build_vhd, make_vhd, read_footer
from tests.support.workload import (
    apply_workload,
    assert_image_matches,
    assert_same_as_model,
    assert_use_changes_nothing,
    make_block_workload,
    qemu_compare,
    run_workload_checked,
    write_reference,
)
from vdiskfs.block.context import OpenOptions, open_image
from vdiskfs.block.node import BlockNode, BlockStatus
from vdiskfs.drivers.format.vpc import VpcNode
from vdiskfs.drivers.format.vpc.structs import probe_footer
from vdiskfs.errors import FormatError, UnsupportedError

MiB = 1 << 20
BLOCK = 2 * MiB
SMALL_BLOCK = 64 * 1024
SIZE = 6 * MiB + 3 * 512
PREFILL = (
    "write -P 0xab 0 64k",
    "write -P 0x11 1900k 300k",  # across the first block boundary
    "write -z 4M 64k",
    "write -P 0x22 5M 1M",
)


@dataclass
class Image:
    path: Path
    reference: Path
    #: The block size the workload should straddle.
    unit: int
    parents: tuple[Path, ...] = ()


async def _our_reading(path: Path, out: Path) -> Path:
    """The guest bytes as vdiskfs reads them (QEMU cannot read differencing VHDs)."""
    node = await open_image(str(path))
    try:
        out.write_bytes(bytes(await node.pread(0, node.size)))
    finally:
        await node.aclose()
    return out


def _small_blocks_spec(seed: int, **fields: object) -> tuple[VhdSpec, dict[int, Block]]:
    rng = random.Random(seed)
    spec = VhdSpec(size=4 * MiB + 1536, block_size=SMALL_BLOCK, **fields)  # type: ignore[arg-type]
    blocks = {i: Block(rng.randbytes(SMALL_BLOCK)) for i in (0, 1, 5, 20, 64)}
    blocks[7] = Block(rng.randbytes(SMALL_BLOCK), sectors={0, 1, 2, 60})  # partial bitmap
    return spec, blocks


async def _build(root: Path, name: str) -> Image:
    directory = root / name
    directory.mkdir()
    parents: tuple[Path, ...] = ()
    unit = BLOCK
    if name in ("dynamic", "fixed"):
        path = make_vhd(directory / "disk.vhd", SIZE, name, io=PREFILL)
    elif name == "dynamic-force-size":
        path = make_vhd(directory / "disk.vhd", SIZE, "dynamic", force_size=True, io=PREFILL)
    elif name == "small-blocks":
        spec, blocks = _small_blocks_spec(1)
        path = build_vhd(directory / "disk.vhd", spec, blocks)
        unit = SMALL_BLOCK
    elif name == "differencing":
        # The parent has data everywhere, so that every sector the child wrongly claimed
        # would read wrong.
        parent_uuid = uuid.uuid4()
        spec, _ = _small_blocks_spec(2, disk_uuid=parent_uuid)
        rng = random.Random(2)
        blocks = {i: Block(rng.randbytes(SMALL_BLOCK))
                  for i in range(-(-spec.size // SMALL_BLOCK))}
        parent = build_vhd(directory / "parent.vhd", spec, blocks)
        child_spec, child_blocks = _small_blocks_spec(
            3, disk_type=4, parent_uuid=parent_uuid,
            locators=[Locator(b"W2ru", ".\\parent.vhd".encode("utf-16-le"))])
        del child_blocks[5]
        child_blocks[9] = Block(random.Random(4).randbytes(SMALL_BLOCK), sectors={127})
        path = build_vhd(directory / "disk.vhd", child_spec, child_blocks)
        parents = (parent,)
        unit = SMALL_BLOCK
        return Image(path, await _our_reading(path, directory / "reference.raw"), unit,
                     parents)
    else:  # pragma: no cover - a typo in a parametrization
        raise ValueError(name)
    reference = reference_raw(path, directory / "reference.raw", fmt="vpc")
    return Image(path, reference, unit, parents)


TEMPLATES = ["dynamic", "dynamic-force-size", "fixed", "small-blocks", "differencing"]


@pytest.fixture(scope="session")
def vpc_templates(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Image]:
    import trio

    root = tmp_path_factory.mktemp("vpc-write")

    async def build_all() -> dict[str, Image]:
        return {name: await _build(root, name) for name in TEMPLATES}

    return trio.run(build_all)


def _copy(template: Image, tmp_path: Path) -> Image:
    directory = tmp_path / "image"
    shutil.copytree(template.path.parent, directory)  # (creates tmp_path too)
    return Image(directory / template.path.name, directory / template.reference.name,
                 template.unit, tuple(directory / p.name for p in template.parents))


async def _open_rw(path: Path, **options: object) -> BlockNode:
    return await open_image(str(path), OpenOptions(read_only=False, **options))  # type: ignore[arg-type]


def _assert_ends_with_footer(path: Path) -> None:
    data = path.read_bytes()
    assert probe_footer(data[-512:], fixed_only=False), "the file does not end with a footer"
    assert data[-512:] == data[:512] or read_footer(data[-512:])["disk_type"] == 2


# -- the workload ----------------------------------------------------------------------------


@pytest.mark.parametrize("variant", TEMPLATES)
async def test_workload_matches_qemu(vpc_templates: dict[str, Image], variant: str,
                                     tmp_path: Path) -> None:
    image = _copy(vpc_templates[variant], tmp_path)
    parent_hashes = [sha256_file(p) for p in image.parents]
    size = image.reference.stat().st_size
    ops = make_block_workload(size, seed=TEMPLATES.index(variant), unit=image.unit)
    # QEMU has no check for vpc, and cannot read differencing disks.
    node = await run_workload_checked(image.path, "vpc", ops, image.reference,
                                      qemu_check=False, qemu_reads=variant != "differencing")
    assert isinstance(node, VpcNode)
    if variant != "fixed":
        assert node.counters.blocks_allocated > 0
    if variant == "differencing":
        assert node.counters.cow_bytes > 0
    _assert_ends_with_footer(image.path)
    assert [sha256_file(p) for p in image.parents] == parent_hashes


@pytest.mark.parametrize("variant", ["dynamic", "fixed", "small-blocks", "differencing"])
async def test_conformance_writable(vpc_templates: dict[str, Image], variant: str,
                                    tmp_path: Path) -> None:
    image = _copy(vpc_templates[variant], tmp_path)
    await check_block_node(lambda: _open_rw(image.path), image.reference.read_bytes(),
                           writable=True)


async def test_flush_makes_writes_visible_to_qemu(vpc_templates: dict[str, Image],
                                                   tmp_path: Path) -> None:
    image = _copy(vpc_templates["small-blocks"], tmp_path)
    size = image.reference.stat().st_size
    node = await _open_rw(image.path)
    try:
        await apply_workload(node, make_block_workload(size, seed=9, unit=SMALL_BLOCK, count=40),
                             image.reference)
        await node.flush()
        qemu_img("convert", "-U", "-f", "vpc", "-O", "raw", image.path, tmp_path / "now.raw")
        assert sha256_file(tmp_path / "now.raw") == sha256_file(image.reference)
    finally:
        await node.aclose()


# -- crashes ---------------------------------------------------------------------------------


@pytest.mark.parametrize("budget", [0, 1, 2, 3, 5, 9, 20, 60])
@pytest.mark.parametrize("variant", ["dynamic", "small-blocks", "differencing"])
async def test_crash_keeps_flushed_data(vpc_templates: dict[str, Image], variant: str,
                                        budget: int, tmp_path: Path) -> None:
    image = _copy(vpc_templates[variant], tmp_path)
    size = image.reference.stat().st_size
    qemu_reads = variant != "differencing"
    got, _ = await run_crash(image.path, VpcNode, budget=budget, seed=budget, unit=image.unit,
                             count=25, warm_up=image.reference, stop_at_crash=True)
    if qemu_reads:
        assert_same_as_model(image.path, "vpc", got, tmp_path / "ours.raw")
    # The file still ends with a footer, and new allocations after the crash work.
    _assert_ends_with_footer(image.path)
    ours = await _our_reading(image.path, tmp_path / "after.raw")
    node = await _open_rw(image.path)
    try:
        await apply_workload(node, make_block_workload(size, seed=50, unit=image.unit, count=15),
                             ours)
    finally:
        await node.aclose()
    if qemu_reads:
        qemu_compare(image.path, "vpc", ours)
    else:
        await assert_image_matches(image.path, ours)
    _assert_ends_with_footer(image.path)


@pytest.mark.parametrize("variant", ["small-blocks", "differencing"])
async def test_concurrent_writes_and_reads(vpc_templates: dict[str, Image], variant: str,
                                          tmp_path: Path) -> None:
    image = _copy(vpc_templates[variant], tmp_path)
    size = image.reference.stat().st_size
    await run_concurrent(image.path, image.reference, VpcNode, size=size, unit=image.unit,
                         seed=3)
    await assert_image_matches(image.path, image.reference)


@pytest.mark.parametrize("crash_after", [0, 2, 9, 25, 60, 110])
@pytest.mark.parametrize("variant", ["dynamic", "small-blocks", "differencing"])
async def test_power_cut_with_reordered_writes(vpc_templates: dict[str, Image], variant: str,
                                               crash_after: int, tmp_path: Path) -> None:
    """A real disk may keep any subset of the writes since the last flush: each such image
    reads consistently and still ends with a footer."""
    image = _copy(vpc_templates[variant], tmp_path)
    size = image.reference.stat().st_size
    for crashed in await run_power_cut(
        image.path, VpcNode, crash_after=crash_after, size=size, unit=image.unit,
        seed=crash_after, qemu_fmt=None if variant == "differencing" else "vpc",
    ):
        _assert_ends_with_footer(crashed)


async def test_power_cut_during_write_back(vpc_templates: dict[str, Image],
                                           tmp_path: Path) -> None:
    """The power cut lands inside a write-back of a differencing disk: without the flush
    before it, a BAT entry could name a block whose bitmap never reached the disk (and the old
    footer's bytes there would claim sectors from the parent)."""
    template = vpc_templates["differencing"]
    size = template.reference.stat().st_size
    points = await write_back_crash_points(_copy(template, tmp_path / "dry").path, VpcNode,
                                           size=size, unit=SMALL_BLOCK, seed=7)
    assert points
    for point in points[:4]:
        image = _copy(template, tmp_path / f"at{point}")
        for crashed in await run_power_cut(image.path, VpcNode, crash_after=point, size=size,
                                           unit=SMALL_BLOCK, seed=7):
            _assert_ends_with_footer(crashed)


# -- specifics -------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", TEMPLATES)
async def test_read_only_open_changes_nothing(vpc_templates: dict[str, Image], variant: str,
                                              tmp_path: Path) -> None:
    image = _copy(vpc_templates[variant], tmp_path)
    files = sorted(image.path.parent.glob("*.vhd"))
    await assert_use_changes_nothing(image.path, files=files)
    # Writable, but nothing written.
    await assert_use_changes_nothing(image.path, files=files, writable=True)


async def test_dynamic_allocation_and_counters(vpc_templates: dict[str, Image],
                                               tmp_path: Path) -> None:
    image = _copy(vpc_templates["dynamic"], tmp_path)
    old_size = image.path.stat().st_size
    node = await _open_rw(image.path)
    assert isinstance(node, VpcNode)
    try:
        c = node.counters
        # Block 3, the partial last one, is unallocated.
        await node.pwrite(3 * BLOCK + 100, b"x" * 10)
        assert (c.blocks_allocated, c.footer_moves) == (1, 1)
        await node.pwrite(3 * BLOCK + 1000, b"y" * 10)  # in place now
        assert c.blocks_allocated == 1
        got = bytes(await node.pread(3 * BLOCK, 1100))
        assert got == bytes(100) + b"x" * 10 + bytes(890) + b"y" * 10 + bytes(90)
        assert c.bat_writebacks == 0
        await node.flush()
        assert c.bat_writebacks == 1
    finally:
        await node.aclose()
    # One block (bitmap + 2 MiB) more, the footer moved after it.
    assert image.path.stat().st_size == old_size + 512 + BLOCK
    _assert_ends_with_footer(image.path)
    write_reference(image.reference, 3 * BLOCK + 100, b"x" * 10)
    write_reference(image.reference, 3 * BLOCK + 1000, b"y" * 10)
    qemu_compare(image.path, "vpc", image.reference)


async def test_differencing_writes_only_the_sectors_written(vpc_templates: dict[str, Image],
                                                            tmp_path: Path) -> None:
    """A new block of a differencing disk holds the written sectors only; a partly written
    sector is completed from the parent; the other sectors still show the parent."""
    image = _copy(vpc_templates["differencing"], tmp_path)
    parent = await open_image(str(image.parents[0]))
    try:
        parent_block = bytes(await parent.pread(5 * SMALL_BLOCK, SMALL_BLOCK))
    finally:
        await parent.aclose()
    node = await _open_rw(image.path)
    assert isinstance(node, VpcNode)
    try:
        start = 5 * SMALL_BLOCK  # block 5: not in the child, data in the parent
        await node.pwrite(start + 600, b"z" * 100)  # inside sector 1
        c = node.counters
        assert c.blocks_allocated == 1
        assert c.cow_bytes == 512 - 100
        data = BlockStatus.DATA | BlockStatus.ALLOCATED
        assert await node.block_status(start, SMALL_BLOCK) == (BlockStatus(0), 512)
        assert await node.block_status(start + 512, SMALL_BLOCK) == (data, 512)
        assert (await node.block_status(start + 1024, SMALL_BLOCK - 1024))[0] == BlockStatus(0)
        expected = bytearray(parent_block)
        expected[600:700] = b"z" * 100
        assert bytes(await node.pread(start, SMALL_BLOCK)) == bytes(expected)
        # Block 7 of the child holds sectors 0, 1, 2 and 60: write across 2..4.
        block7 = 7 * SMALL_BLOCK
        await node.pwrite(block7 + 2 * 512 + 10, b"w" * 1500)
        assert (await node.block_status(block7, SMALL_BLOCK))[1] == 5 * 512
    finally:
        await node.aclose()
    node = await open_image(str(image.path))
    try:
        assert bytes(await node.pread(5 * SMALL_BLOCK, SMALL_BLOCK)) == bytes(expected)
        assert (await node.block_status(block7, SMALL_BLOCK))[1] == 5 * 512
    finally:
        await node.aclose()


async def test_fixed_writes_in_place(vpc_templates: dict[str, Image], tmp_path: Path) -> None:
    image = _copy(vpc_templates["fixed"], tmp_path)
    before = image.path.read_bytes()
    node = await _open_rw(image.path)
    try:
        await node.pwrite(node.size - 3, b"end")
        await node.zero(0, 4096)
        size = node.size
    finally:
        await node.aclose()
    after = image.path.read_bytes()
    assert len(after) == len(before) and after[-512:] == before[-512:]  # the footer stays
    assert after[size - 3 : size] == b"end" and after[:4096] == bytes(4096)


async def test_differencing_without_parent_is_read_only(vpc_templates: dict[str, Image],
                                                        tmp_path: Path) -> None:
    image = _copy(vpc_templates["differencing"], tmp_path)
    with pytest.raises(UnsupportedError, match="without its parent") as exc_info:
        await _open_rw(image.path, backing=False)
    assert exc_info.value.errno == errno.EROFS


def _bat_entries(path: Path) -> tuple[int, list[int]]:
    data = path.read_bytes()
    header_at = struct.unpack_from(">Q", data, 16)[0]
    table_at = struct.unpack_from(">Q", data, header_at + 16)[0]
    entries = struct.unpack_from(">I", data, header_at + 28)[0]
    return table_at, list(struct.unpack_from(f">{entries}I", data, table_at))


@pytest.mark.parametrize("damage", ["into-bat", "shared-block"])
async def test_hostile_bat_refused_for_writing(vpc_templates: dict[str, Image], damage: str,
                                               tmp_path: Path) -> None:
    """A BAT entry placing a block over the BAT, or two entries sharing a block: readable, but
    writes through them would corrupt the image, so a writable open is refused."""
    image = _copy(vpc_templates["small-blocks"], tmp_path)
    table_at, bat = _bat_entries(image.path)
    allocated = [i for i, e in enumerate(bat) if e != 0xFFFFFFFF]
    if damage == "into-bat":
        bat[allocated[-1]] = table_at // 512
        match = "metadata"
    else:
        bat[allocated[1]] = bat[allocated[0]]
        match = "overlapping"
    with open(image.path, "r+b") as f:
        f.seek(table_at)
        f.write(struct.pack(f">{len(bat)}I", *bat))
    with pytest.raises(FormatError, match=match):
        await _open_rw(image.path)
    node = await open_image(str(image.path))
    await node.aclose()
