"""The vpc (VHD) driver against QEMU: fixed, dynamic, force_size, creator-app sizing, and
hand-built differencing disks with parent locators."""

from __future__ import annotations

import random
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.conformance import check_block_node
from tests.support.images import create, info, random_bytes, reference_raw
from tests.support.probe_corpus import assert_claims_only_its_own, probe_scores
from tests.support.vpc_images import (
    Block,
    Locator,
    VhdSpec,
    build_vhd,
    make_vhd,
    patch_footer,
    read_footer,
)
from vdiskfs.block.context import OpenOptions, open_image
from vdiskfs.block.node import BlockNode, BlockStatus
from vdiskfs.drivers.format.vpc import VpcNode
from vdiskfs.drivers.format.vpc.structs import (
    MAX_GEOMETRY_SECTORS,
    DynamicHeader,
    ParentLocator,
    parent_candidates,
)

MiB = 1 << 20
BLOCK = 64 * 1024
WRITES = (
    "write -P 0xab 0 64k",
    "write -P 0x11 1900k 300k",  # across the 2 MiB block boundary
    "write -z 4M 64k",
    "write -P 0x22 5M 1M",
)


@dataclass
class Image:
    path: Path
    reference: bytes


def _qemu_image(path: Path, size: int | str, subformat: str, force_size: bool) -> Image:
    make_vhd(path, size, subformat, force_size=force_size, io=WRITES)
    raw = reference_raw(path, path.with_suffix(".raw"), fmt="vpc")
    return Image(path, raw.read_bytes())


def _differencing_blocks(seed: int) -> dict[int, Block]:
    """Blocks of a differencing child: whole, partial (bitmap), first and last sector only."""
    rng = random.Random(seed)
    return {
        0: Block(rng.randbytes(BLOCK)),
        3: Block(rng.randbytes(BLOCK), sectors={0, 1, 2, 50, 127}),
        4: Block(rng.randbytes(BLOCK), sectors=set(range(10, 118))),
        31: Block(rng.randbytes(BLOCK), sectors={127}),
    }


def _overlay(parent: bytes, blocks: dict[int, Block]) -> bytes:
    """What a differencing disk reads: its sectors where the bitmap says, the parent's else."""
    out = bytearray(parent)
    for index, block in blocks.items():
        for sector in range(BLOCK // 512):
            if block.sectors is None or sector in block.sectors:
                at = index * BLOCK + sector * 512
                out[at : at + 512] = block.data[sector * 512 : (sector + 1) * 512]
    return bytes(out)


def _build_all(root: Path) -> dict[str, Image]:
    images = {
        "dynamic": _qemu_image(root / "dynamic.vhd", 6 * MiB + 3 * 512, "dynamic", False),
        "dynamic-force-size": _qemu_image(root / "dyn-fs.vhd", 6 * MiB + 3 * 512, "dynamic",
                                          True),
        "fixed": _qemu_image(root / "fixed.vhd", 6 * MiB + 3 * 512, "fixed", False),
        "fixed-force-size": _qemu_image(root / "fixed-fs.vhd", 6 * MiB + 3 * 512, "fixed", True),
    }
    # A hand-built dynamic disk: checked against QEMU, it validates the builder.
    parent_blocks = {i: Block(random_bytes(100 + i, BLOCK)) for i in (0, 1, 3, 7, 30)}
    parent_blocks[7] = Block(random_bytes(107, BLOCK), sectors={5})  # QEMU ignores the bitmap
    parent_uuid = uuid.uuid4()
    parent = build_vhd(root / "parent.vhd", VhdSpec(size=2 * MiB, block_size=BLOCK,
                                                    disk_uuid=parent_uuid), parent_blocks)
    raw = reference_raw(parent, root / "parent.raw", fmt="vpc")
    images["hand-built-dynamic"] = Image(parent, raw.read_bytes())

    # Differencing children, each naming the parent a different way.
    child_blocks = _differencing_blocks(7)
    expected = _overlay(images["hand-built-dynamic"].reference, child_blocks)
    for name, locators, parent_name in (
        ("diff-w2ru", [Locator(b"W2ku", "C:\\vms\\elsewhere\\parent.vhd".encode("utf-16-le")),
                       Locator(b"W2ru", ".\\parent.vhd".encode("utf-16-le"))], ""),
        ("diff-w2ku", [Locator(b"W2ku", "D:\\old\\parent.vhd".encode("utf-16-le"))], ""),
        ("diff-macx", [Locator(b"MacX", f"file://localhost{root}/parent.vhd".encode())], ""),
        ("diff-name-only", [], "parent.vhd"),
    ):
        path = build_vhd(root / f"{name}.vhd", VhdSpec(size=2 * MiB, block_size=BLOCK,
                                                       disk_type=4, parent_uuid=parent_uuid,
                                                       parent_name=parent_name,
                                                       locators=locators), child_blocks)
        images[name] = Image(path, expected)
    return images


@pytest.fixture(scope="session")
def vpc_images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Image]:
    return _build_all(tmp_path_factory.mktemp("vpc"))


VARIANTS = ["dynamic", "dynamic-force-size", "fixed", "fixed-force-size", "hand-built-dynamic",
            "diff-w2ru", "diff-w2ku", "diff-macx", "diff-name-only"]


@pytest.mark.parametrize("variant", VARIANTS)
async def test_conformance(vpc_images: dict[str, Image], variant: str) -> None:
    image = vpc_images[variant]
    await check_block_node(lambda: open_image(str(image.path)), image.reference)


async def _open(path: Path, **options: object) -> BlockNode:
    return await open_image(str(path), OpenOptions(**options))  # type: ignore[arg-type]


@pytest.mark.parametrize("variant", ["dynamic", "dynamic-force-size", "fixed",
                                     "fixed-force-size", "hand-built-dynamic"])
async def test_info_matches_qemu(vpc_images: dict[str, Image], variant: str) -> None:
    path = vpc_images[variant].path
    expected = info(path, "-f", "vpc")
    node = await _open(path)
    try:
        assert node.driver == "vpc"
        assert node.size == expected["virtual-size"]
        assert node.info().get("cluster-size") == expected.get("cluster-size")
    finally:
        await node.aclose()


async def test_fixed_vhd_is_probed_and_shown_without_footer(vpc_images: dict[str, Image]
                                                            ) -> None:
    """QEMU probes a fixed VHD as raw (its footer is at the end); vdiskfs recognises it."""
    image = vpc_images["fixed"]
    assert info(image.path)["format"] == "raw"
    node = await _open(image.path)
    try:
        assert node.driver == "vpc"
        assert node.size == image.path.stat().st_size - 512
        assert node.warnings == []
    finally:
        await node.aclose()


CREATORS = [b"vpc ", b"qemu", b"qem2", b"win ", b"d2v ", b"CTXS", b"tap\0", b"xyz1", b"d2v\0"]


@pytest.mark.parametrize("creator", CREATORS, ids=[c.decode().strip("\0 ") for c in CREATORS])
@pytest.mark.parametrize("geometry", [(200, 4, 17), (65535, 16, 255)], ids=["chs", "max-chs"])
async def test_virtual_size_follows_qemu(tmp_path: Path, creator: bytes,
                                         geometry: tuple[int, int, int]) -> None:
    """The CHS-vs-current-size rule, for each creator app QEMU knows and one it does not."""
    path = make_vhd(tmp_path / "d.vhd", 8 * MiB, "dynamic", force_size=True)
    cylinders, heads, sectors = geometry
    patch_footer(path, creator_app=creator, cylinders=cylinders, heads=heads, sectors=sectors,
                 current_size=7 * MiB + 4096)
    expected = info(path, "-f", "vpc")["virtual-size"]
    node = await _open(path)
    try:
        assert node.size == expected
        if geometry == (65535, 16, 255) or creator in (b"qem2", b"win ", b"d2v ", b"CTXS",
                                                         b"tap\0"):
            assert node.size == 7 * MiB + 4096
        else:
            assert node.size == 200 * 4 * 17 * 512
    finally:
        await node.aclose()
    assert MAX_GEOMETRY_SECTORS == 65535 * 16 * 255


def test_probe_against_every_format(tmp_path: Path) -> None:
    """vpc claims vpc images only; nothing else outscores it on one."""
    assert_claims_only_its_own("vpc", tmp_path)


def test_tail_footer_yields_to_a_header_magic(tmp_path: Path) -> None:
    """A qcow2 file that ends with a fixed VHD's footer is still qcow2."""
    vhd = make_vhd(tmp_path / "f.vhd", MiB, "fixed")
    qcow2 = create(tmp_path / "q.qcow2", "1M", "qcow2")
    with open(qcow2, "ab") as f:
        f.write(vhd.read_bytes()[-512:])
    scores = probe_scores(qcow2)
    assert scores["vpc"] == 50
    assert max(scores, key=lambda k: scores[k]) != "vpc"


async def test_differencing_block_status(vpc_images: dict[str, Image]) -> None:
    node = await _open(vpc_images["diff-w2ru"].path)
    try:
        data = BlockStatus.DATA | BlockStatus.ALLOCATED
        assert await node.block_status(0, BLOCK) == (data, BLOCK)
        # Block 1 is not in the child: the parent shows through.
        assert await node.block_status(BLOCK, BLOCK) == (BlockStatus(0), BLOCK)
        # Block 3 holds sectors 0-2 only.
        assert await node.block_status(3 * BLOCK, BLOCK) == (data, 3 * 512)
        assert await node.block_status(3 * BLOCK + 3 * 512, BLOCK) == (BlockStatus(0), 47 * 512)
        counters = node.stats_snapshot().driver
        assert counters["bitmap_cache_misses"] >= 2
        assert counters["bitmap_cache_hits"] >= 1
    finally:
        await node.aclose()


async def test_differencing_names_its_parent(vpc_images: dict[str, Image]) -> None:
    for variant, reference in (("diff-w2ru", "./parent.vhd"), ("diff-w2ku", "parent.vhd"),
                               ("diff-name-only", "parent.vhd")):
        node = await _open(vpc_images[variant].path)
        try:
            assert isinstance(node, VpcNode)
            assert node.info()["backing-filename"] == reference
            backing = node.child("backing")
            assert backing is not None and backing.driver == "vpc"
            assert Path(backing.label).name == "parent.vhd"
        finally:
            await node.aclose()


async def test_differencing_without_backing(vpc_images: dict[str, Image]) -> None:
    image = vpc_images["diff-w2ru"]
    node = await _open(image.path, backing=False)
    try:
        assert node.child("backing") is None
        assert bytes(await node.pread(BLOCK, BLOCK)) == bytes(BLOCK)
        assert await node.block_status(BLOCK, BLOCK) == (BlockStatus.ZERO, BLOCK)
        assert bytes(await node.pread(0, BLOCK)) == image.reference[:BLOCK]
    finally:
        await node.aclose()


def test_parent_candidates_order() -> None:
    locators = (
        ParentLocator(b"W2ku", 1, 0, 0, 0),
        ParentLocator(b"MacX", 1, 0, 0, 1),
        ParentLocator(b"W2ru", 1, 0, 0, 2),
        ParentLocator(b"Mac ", 1, 0, 0, 3),
    )
    header = DynamicHeader(0, 0, 0, 0, BLOCK, 0, uuid.UUID(int=0), 0, "p.vhd", locators)
    data = {
        0: "C:\\a\\p.vhd\0".encode("utf-16-le"),
        1: b"file://localhost/srv/my%20vms/p.vhd",
        2: "..\\base\\p.vhd".encode("utf-16-le"),
        3: b"\x00alias-record",
    }
    assert parent_candidates(header, data, label="c.vhd") == [
        "../base/p.vhd", "/srv/my vms/p.vhd", "p.vhd"]


def test_builder_footer_roundtrip(vpc_images: dict[str, Image]) -> None:
    footer = read_footer(vpc_images["diff-w2ru"].path.read_bytes()[:512])
    assert footer["cookie"] == b"conectix" and footer["disk_type"] == 4


def test_map_block_is_pure() -> None:
    from vdiskfs.drivers.format.runs import Run, RunKind
    from vdiskfs.drivers.format.vpc.mapping import BlockGeometry, map_block

    diff = BlockGeometry(block_size=4096, bitmap_size=512, uses_bitmap=True)
    bitmap = bytes([0b11000001]) + bytes(511)  # sectors 0, 1 and 7 of 8
    entry = 10  # the bitmap at sector 10, the data at 10 * 512 + 512
    assert map_block(diff, entry, bitmap, 8192 + 100, 4096 - 100) == [
        Run(RunKind.DATA, 8192 + 100, 1024 - 100, 5632 + 100),
        Run(RunKind.BACKING, 8192 + 1024, 5 * 512),
        Run(RunKind.DATA, 8192 + 3584, 512, 5632 + 3584),
    ]
    dynamic = BlockGeometry(block_size=4096, bitmap_size=512, uses_bitmap=False)
    assert map_block(dynamic, entry, None, 8192 + 100, 50) == [
        Run(RunKind.DATA, 8192 + 100, 50, 5632 + 100)]
    assert map_block(diff, 0xFFFFFFFF, None, 5, 6) == [Run(RunKind.BACKING, 5, 6)]
