"""Data and holes over whole chains (``vdiskfs.block.holes``) against ``qemu-img map``.

For every image of the read corpus the data ranges that ``seek_data``/``seek_hole`` find equal
the ranges ``qemu-img map --output=json`` marks ``"data": true``, and every hole reads as zeros
(checked against ``qemu-img convert -O raw``). vhdx is the one exception QEMU makes: its vhdx
driver has no block status, so ``qemu-img map`` calls every byte data; there the holes must be
exactly the blocks whose BAT entry is not "fully present".
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.holes import (
    Ranges,
    assert_agrees_with_qemu,
    assert_holes_read_zero,
    merge,
    qemu_data_ranges,
)
from tests.support.images import create, qemu_img, qemu_io, reference_raw
from tests.support.qcow2_images import RECIPES, Qcow2Images
from vdiskfs.block.context import OpenOptions, open_image
from vdiskfs.block.holes import read_status, seek_data, seek_hole
from vdiskfs.block.node import BlockNode
from vdiskfs.drivers.filter.offset import OffsetNode

MiB = 1 << 20


async def seek_ranges(node: BlockNode) -> Ranges:
    """The data ranges as a sparse copy finds them: SEEK_DATA, then SEEK_HOLE, repeatedly."""
    out: Ranges = []
    offset = 0
    while True:
        start = await seek_data(node, offset)
        if start is None:
            return merge(out)
        end = await seek_hole(node, start)
        assert end > start
        out.append((start, end))
        offset = end


@pytest.fixture(scope="module")
def qcow2_images(tmp_path_factory: pytest.TempPathFactory) -> Qcow2Images:
    return Qcow2Images(tmp_path_factory.mktemp("qcow2-holes"))


@pytest.mark.parametrize("name", sorted(RECIPES))
async def test_qcow2_corpus_matches_qemu_img_map(qcow2_images: Qcow2Images, name: str) -> None:
    image = qcow2_images.get(name)
    expected = qemu_data_ranges(image.path)
    node = await open_image(str(image.path))
    try:
        found = await seek_ranges(node)
        assert found == expected
    finally:
        await node.aclose()
    assert_holes_read_zero(found, image.reference)


def _source(tmp_path: Path) -> Path:
    source = create(tmp_path / "source.qcow2", 8 * MiB)
    qemu_io(source, "write -P 0x5a 0 1M", "write -P 0xa5 3M 1536k", "write -z 5M 64k",
            "write -P 7 7M 4k")
    return source


@pytest.mark.parametrize(("fmt", "options"), [
    ("raw", {}),
    ("vmdk", {"subformat": "monolithicSparse"}),
    ("vmdk", {"subformat": "monolithicFlat"}),
    ("vmdk", {"subformat": "streamOptimized"}),
    ("vpc", {"subformat": "dynamic"}),
    ("vpc", {"subformat": "fixed"}),
    ("vdi", {}),
    ("qed", {}),
    ("vhdx", {"block_size": "1M"}),
])
async def test_other_formats_match_qemu_img_map(fmt: str, options: dict[str, str],
                                                tmp_path: Path) -> None:
    image = tmp_path / f"disk.{fmt}"
    opts = ["-o", ",".join(f"{k}={v}" for k, v in options.items())] if options else []
    qemu_img("convert", "-O", fmt, *opts, _source(tmp_path), image)
    reference = reference_raw(image, tmp_path / "ref.raw", fmt=fmt).read_bytes()
    node = await open_image(str(image), OpenOptions(format=fmt))
    try:
        found = await seek_ranges(node)
    finally:
        await node.aclose()
    assert_holes_read_zero(found, reference)
    if fmt == "vhdx":
        # qemu-img map: all data (no block status in QEMU's vhdx); ours: the 1 MiB blocks
        # that qemu-img convert wrote.
        assert found == [(0, MiB), (3 * MiB, 5 * MiB), (7 * MiB, 8 * MiB)]
    else:
        assert_agrees_with_qemu(found, image, fmt=fmt)


@pytest.mark.parametrize("fmt", ["qcow2", "qed", "vmdk"])
async def test_chains_follow_the_backing_file(fmt: str, tmp_path: Path) -> None:
    """Data in the backing file shows through unallocated ranges of the top; zeros written in
    the top hide it; past a shorter backing file's end is a hole."""
    base = create(tmp_path / f"base.{fmt}", 2 * MiB, fmt=fmt)
    qemu_io(base, "write -P 1 0 1M", "write -P 2 1536k 64k", fmt=fmt)
    top = create(tmp_path / f"top.{fmt}", 4 * MiB, fmt=fmt, backing=f"base.{fmt}",
                 backing_fmt=fmt)
    qemu_io(top, "write -P 3 3M 64k", "write -z 0 64k", fmt=fmt)
    reference = reference_raw(top, tmp_path / "ref.raw", fmt=fmt).read_bytes()
    node = await open_image(str(top))
    try:
        found = await seek_ranges(node)
    finally:
        await node.aclose()
    assert_holes_read_zero(found, reference)
    assert_agrees_with_qemu(found, top, fmt=fmt)


async def test_partition_window_translates_and_follows_the_chain(tmp_path: Path) -> None:
    base = create(tmp_path / "base.qcow2", 4 * MiB)
    qemu_io(base, "write -P 1 1M 64k")
    top = create(tmp_path / "top.qcow2", 4 * MiB, backing="base.qcow2", backing_fmt="qcow2")
    qemu_io(top, "write -P 2 2M 64k")
    disk = await open_image(str(top))
    try:
        window = OffsetNode(disk, offset=512 * 1024, length=3 * MiB, owns_child=False)
        await window.open()
        assert await seek_ranges(window) == [(512 * 1024, 576 * 1024),
                                             (1536 * 1024, 1600 * 1024)]
        assert await seek_data(window, 1600 * 1024) is None
        assert await seek_hole(window, 0) == 0
        assert await read_status(window, 512 * 1024, 64 * 1024) == (True, 64 * 1024)
    finally:
        await disk.aclose()
