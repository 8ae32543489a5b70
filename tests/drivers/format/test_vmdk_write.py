"""Writing VMDK images, checked by QEMU: the random workload on every writable variant, then
``qemu-img check`` and ``qemu-img compare`` against a raw reference; crash simulation; the
refusals (streamOptimized, version 3, RDONLY and ZERO extents, hostile tables)."""

from __future__ import annotations

import errno
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.conformance import check_block_node
from tests.support.crash import run_concurrent, run_crash, run_power_cut, write_back_crash_points
from tests.support.images import (
    QEMU_IMG,
    info,
    qemu_img,
    qemu_io,
    reference_raw,
    run,
    sha256_file,
)
from tests.support.vmdk_images import HEADER, make_vmdk, patch_header, write_descriptor
from tests.support.workload import (
    Operation,
    apply_op,
    apply_workload,
    assert_clean,
    assert_image_matches,
    assert_same_as_model,
    assert_use_changes_nothing,
    make_block_workload,
    qemu_compare,
    run_workload_checked,
    touched_ranges,
    write_reference,
)
from vdiskfs.block.context import OpenOptions, open_image
from vdiskfs.block.node import BlockNode, BlockStatus
from vdiskfs.drivers.format.vmdk import VmdkNode
from vdiskfs.errors import FormatError, ReadOnlyError, UnsupportedError

MiB = 1 << 20
GRAIN = 64 * 1024
#: Five MiB and a partial last grain of 1536 bytes.
SIZE = 5 * MiB + 1536
#: Leaves allocated, unallocated and partially allocated grains, and the partial last one.
PREFILL = (
    "write -P 0xab 0 64k",
    "write -P 0x11 100k 300k",
    "write -P 0x22 3M 1M",
    "write -z 3200k 64k",
    f"write -P 0x33 5M {SIZE - 5 * MiB}",
)
#: Three grain tables of 32 MiB; the middle one is removed from both directories.
HOLES_SIZE = 70 * MiB


@dataclass
class Image:
    path: Path
    reference: Path
    #: Files that must not change (a delta's parent).
    parents: tuple[Path, ...] = ()


def _gd_offsets(path: Path) -> tuple[int, int]:
    """(gdOffset, rgdOffset) in bytes, from the sparse header."""
    fields = HEADER.unpack(path.read_bytes()[: HEADER.size])
    return fields[9] * 512, fields[8] * 512


def assert_redundant_tables_match(directory: Path) -> None:
    """In every sparse extent of ``directory``, the redundant directory names a table wherever
    the primary does, holding the same entries (QEMU's check does not look at them)."""
    checked = 0
    for path in sorted(directory.glob("*.vmdk")):
        data = path.read_bytes()
        if data[:4] != b"KDMV":
            continue
        fields = HEADER.unpack(data[: HEADER.size])
        capacity, grain, gtes, rgd, gd = fields[3], fields[4], fields[7], fields[8], fields[9]
        entries = -(-capacity // (gtes * grain))
        primary = struct.unpack_from(f"<{entries}I", data, gd * 512)
        redundant = struct.unpack_from(f"<{entries}I", data, rgd * 512)
        for index, (p, r) in enumerate(zip(primary, redundant, strict=True)):
            assert (p == 0) == (r == 0), f"{path.name}: directory entry {index}"
            if p:
                assert data[p * 512 : p * 512 + 4 * gtes] == data[r * 512 : r * 512 + 4 * gtes], (
                    f"{path.name}: redundant grain table {index} differs")
        checked += 1
    assert checked


def _drop_grain_table(path: Path, index: int) -> None:
    """Zero directory entry ``index`` in both directories (its tables become leaked space),
    as in an image whose tables are allocated on demand."""
    gd, rgd = _gd_offsets(path)
    with open(path, "r+b") as f:
        for base in (gd, rgd):
            f.seek(base + 4 * index)
            f.write(bytes(4))


def _build(root: Path, name: str) -> Image:
    directory = root / name
    directory.mkdir()
    parents: tuple[Path, ...] = ()
    if name in ("monolithicSparse", "twoGbMaxExtentSparse", "monolithicFlat",
                "twoGbMaxExtentFlat"):
        path = make_vmdk(directory / "disk.vmdk", SIZE, name, io=PREFILL)
    elif name == "zeroed-grain":
        path = make_vmdk(directory / "disk.vmdk", SIZE, zeroed_grain=True,
                         io=(*PREFILL, "write -z 0 128k", "write -z 1M 192k"))
    elif name == "no-tables":
        # One grain table, removed: the first write must allocate it (the prefilled grains
        # become leaked space).
        path = make_vmdk(directory / "disk.vmdk", SIZE, io=PREFILL)
        _drop_grain_table(path, 0)
    elif name == "gd-holes":
        path = make_vmdk(directory / "disk.vmdk", HOLES_SIZE, io=(
            "write -P 0x41 31M 1M", "write -P 0x42 64M 100k", "write -P 0x43 68M 2M"))
        _drop_grain_table(path, 1)
    elif name == "delta":
        # A sparse delta over a flat base (QEMU writes no flat delta).
        base = make_vmdk(directory / "base.vmdk", SIZE, "monolithicFlat",
                         io=("write -P 0x5a 0 5M",))
        path = directory / "delta.vmdk"
        qemu_img("create", "-q", "-f", "vmdk", "-b", base.name, "-F", "vmdk", path)
        qemu_io(path, "write -P 0x33 512k 64k", "write -P 0x44 130k 10k", fmt="vmdk")
        parents = (base, directory / "base-flat.vmdk")
    elif name == "delta-zeroed":
        base = make_vmdk(directory / "base.vmdk", SIZE, io=PREFILL)
        path = directory / "delta.vmdk"
        qemu_img("create", "-q", "-f", "vmdk", "-o", "zeroed_grain=on", "-b", base.name,
                 "-F", "vmdk", path)
        qemu_io(path, "write -z 3M 128k", "write -P 0x44 130k 10k", fmt="vmdk")
        parents = (base,)
    else:  # pragma: no cover - a typo in a parametrization
        raise ValueError(name)
    reference = reference_raw(path, directory / "reference.raw", fmt="vmdk")
    return Image(path, reference, parents)


TEMPLATES = ["monolithicSparse", "zeroed-grain", "no-tables", "gd-holes",
             "twoGbMaxExtentSparse", "monolithicFlat", "twoGbMaxExtentFlat", "delta",
             "delta-zeroed"]


@pytest.fixture(scope="session")
def vmdk_templates(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Image]:
    root = tmp_path_factory.mktemp("vmdk-write")
    return {name: _build(root, name) for name in TEMPLATES}


def _copy(template: Image, tmp_path: Path) -> Image:
    """A private copy of a template's directory (writes change the files)."""
    directory = tmp_path / "image"
    shutil.copytree(template.path.parent, directory)  # (creates tmp_path too)
    return Image(directory / template.path.name, directory / template.reference.name,
                 tuple(directory / p.name for p in template.parents))


async def _open_rw(path: Path, **options: object) -> BlockNode:
    return await open_image(str(path), OpenOptions(read_only=False, **options))  # type: ignore[arg-type]


def _size(template: str) -> int:
    return HOLES_SIZE if template == "gd-holes" else SIZE


# -- the workload, checked by QEMU -----------------------------------------------------------


@pytest.mark.parametrize("variant", TEMPLATES)
async def test_workload_matches_qemu(vmdk_templates: dict[str, Image], variant: str,
                                     tmp_path: Path) -> None:
    image = _copy(vmdk_templates[variant], tmp_path)
    parent_hashes = [sha256_file(p) for p in image.parents]
    old_cid = info(image.path)["format-specific"]["data"]["cid"]
    size = _size(variant)
    hot = [(31 * MiB, 66 * MiB)] if variant == "gd-holes" else []
    ops = make_block_workload(size, seed=TEMPLATES.index(variant), unit=GRAIN, hot=hot)
    node = await run_workload_checked(image.path, "vmdk", ops, image.reference)
    assert isinstance(node, VmdkNode)
    counters = node.counters
    if variant in ("gd-holes", "no-tables"):
        assert counters.gts_allocated == 1
        assert counters.gd_writebacks == 1
    if "Flat" not in variant:
        assert counters.grains_allocated > 0 and counters.cow_bytes > 0
    assert counters.cid_updates == 1
    assert info(image.path)["format-specific"]["data"]["cid"] != old_cid
    assert [sha256_file(p) for p in image.parents] == parent_hashes
    if "Flat" not in variant:
        assert_redundant_tables_match(image.path.parent)


@pytest.mark.parametrize("variant", ["monolithicSparse", "zeroed-grain", "twoGbMaxExtentSparse",
                                     "monolithicFlat", "delta"])
async def test_conformance_writable(vmdk_templates: dict[str, Image], variant: str,
                                    tmp_path: Path) -> None:
    image = _copy(vmdk_templates[variant], tmp_path)
    await check_block_node(lambda: _open_rw(image.path), image.reference.read_bytes(),
                           writable=True)
    assert_clean(image.path, "vmdk")


@pytest.mark.parametrize("subformat", ["twoGbMaxExtentSparse", "twoGbMaxExtentFlat"])
async def test_workload_across_two_gib_extents(tmp_path: Path, subformat: str) -> None:
    """Just over 2 GiB, mostly holes: writes across the boundary of the two extent files."""
    boundary = 2 << 30
    path = make_vmdk(tmp_path / "big.vmdk", "2049M", subformat, io=(
        f"write -P 0xab {boundary - 65536} 131072", "write -P 0x11 0 65536"))
    reference = reference_raw(path, tmp_path / "big.raw", fmt="vmdk")
    size = reference.stat().st_size
    ops = make_block_workload(size, seed=5, unit=GRAIN, count=60,
                        hot=[(boundary - 3 * MiB, boundary + 3 * MiB)])
    ops = [op for op in ops if op.offset >= boundary - 3 * MiB or op.offset + op.length
           <= 4 * MiB] + [Operation.write(boundary - 100, b"\xee" * 200)]
    assert len(ops) > 20
    node = await _open_rw(path)
    try:
        await apply_workload(node, ops, reference)
    finally:
        await node.aclose()
    assert_clean(path, "vmdk")
    qemu_compare(path, "vmdk", reference)
    await assert_image_matches(path, reference, touched_ranges(ops, size, GRAIN))


# -- durability and crashes ------------------------------------------------------------------


async def test_flush_makes_writes_visible_to_qemu(vmdk_templates: dict[str, Image],
                                                   tmp_path: Path) -> None:
    """After flush() (no close), QEMU reads every completed write: the tables are written."""
    image = _copy(vmdk_templates["gd-holes"], tmp_path)
    ops = make_block_workload(HOLES_SIZE, seed=8, unit=GRAIN, count=40, hot=[(32 * MiB, 64 * MiB)])
    node = await _open_rw(image.path)
    try:
        await apply_workload(node, ops, image.reference)
        await node.flush()
        qemu_img("convert", "-U", "-f", "vmdk", "-O", "raw", image.path, tmp_path / "now.raw")
        assert sha256_file(tmp_path / "now.raw") == sha256_file(image.reference)
    finally:
        await node.aclose()


@pytest.mark.parametrize("budget", [0, 1, 2, 3, 5, 8, 13, 30, 80])
@pytest.mark.parametrize("variant", ["monolithicSparse", "no-tables"])
async def test_crash_keeps_flushed_data(vmdk_templates: dict[str, Image], variant: str,
                                        budget: int, tmp_path: Path) -> None:
    image = _copy(vmdk_templates[variant], tmp_path)
    got, _ = await run_crash(image.path, VmdkNode, budget=budget, seed=budget, unit=GRAIN,
                             count=25, warm_up=image.reference, stop_at_crash=True)
    assert_same_as_model(image.path, "vmdk", got, tmp_path / "ours.raw")
    # A crash leaks grains at worst: QEMU finds no corruption.
    assert_clean(image.path, "vmdk")


async def test_concurrent_writes_and_reads(vmdk_templates: dict[str, Image],
                                          tmp_path: Path) -> None:
    image = _copy(vmdk_templates["monolithicSparse"], tmp_path)
    await run_concurrent(image.path, image.reference, VmdkNode, size=SIZE, unit=GRAIN, seed=3)
    assert_clean(image.path, "vmdk")
    qemu_compare(image.path, "vmdk", image.reference)


@pytest.mark.parametrize("crash_after", [0, 2, 9, 25, 60, 110])
@pytest.mark.parametrize("variant", ["monolithicSparse", "no-tables", "delta-zeroed"])
async def test_power_cut_with_reordered_writes(vmdk_templates: dict[str, Image], variant: str,
                                               crash_after: int, tmp_path: Path) -> None:
    """A real disk may keep any subset of the writes since the last flush: the flushes
    between grains, tables and directory entries keep every such image consistent."""
    image = _copy(vmdk_templates[variant], tmp_path)
    for crashed in await run_power_cut(image.path, VmdkNode, crash_after=crash_after,
                                       size=_size(variant), unit=GRAIN, seed=crash_after,
                                       qemu_fmt="vmdk"):
        assert_clean(crashed, "vmdk")


@pytest.mark.parametrize("variant", ["no-tables", "delta-zeroed"])
async def test_power_cut_during_write_back(vmdk_templates: dict[str, Image], variant: str,
                                           tmp_path: Path) -> None:
    """The power cut lands between the first table written back and the rest: without the
    flush before it, a table could name a grain whose bytes never reached the disk."""
    template = vmdk_templates[variant]
    points = await write_back_crash_points(_copy(template, tmp_path / "dry").path, VmdkNode,
                                           size=_size(variant), unit=GRAIN, seed=7)
    assert points
    for point in points[:4]:
        image = _copy(template, tmp_path / f"at{point}")
        for crashed in await run_power_cut(image.path, VmdkNode, crash_after=point,
                                           size=_size(variant), unit=GRAIN, seed=7):
            assert_clean(crashed, "vmdk")


# -- metadata: CID, counters, untouched files ------------------------------------------------


@pytest.mark.parametrize("variant", TEMPLATES)
async def test_read_only_open_changes_nothing(vmdk_templates: dict[str, Image], variant: str,
                                              tmp_path: Path) -> None:
    image = _copy(vmdk_templates[variant], tmp_path)
    files = sorted(p for p in image.path.parent.iterdir() if p.is_file())
    await assert_use_changes_nothing(image.path, files=files)
    # A writable open that writes nothing changes nothing either (not even the CID).
    await assert_use_changes_nothing(image.path, files=files, writable=True)


@pytest.mark.parametrize("variant", ["monolithicSparse", "monolithicFlat"])
async def test_cid_renewed_in_place_on_first_write(vmdk_templates: dict[str, Image],
                                                   variant: str, tmp_path: Path) -> None:
    """As QEMU: a new CID on the first write, so a delta made before no longer matches."""
    image = _copy(vmdk_templates[variant], tmp_path)
    child = image.path.parent / "child.vmdk"
    if variant == "monolithicSparse":
        qemu_img("create", "-q", "-f", "vmdk", "-b", image.path.name, "-F", "vmdk", child)
    old_cid = info(image.path)["format-specific"]["data"]["cid"]
    before = image.path.read_bytes()
    node = await _open_rw(image.path)
    assert isinstance(node, VmdkNode)
    try:
        await node.pwrite(4096, b"new")
        await node.pwrite(8192, b"again")
        assert node.cid is not None and node.cid != old_cid
        new_cid = node.cid
    finally:
        await node.aclose()
    assert node.counters.cid_updates == 1
    assert info(image.path)["format-specific"]["data"]["cid"] == new_cid
    after = image.path.read_bytes()
    if variant == "monolithicFlat":
        assert len(after) == len(before)  # the descriptor file keeps its length
    descriptor_end = 21 * 512 if variant == "monolithicSparse" else len(before)
    changed = [i for i in range(descriptor_end) if before[i] != after[i]]
    # In the descriptor, only the CID's digits changed.
    assert changed and max(changed) - min(changed) < 8
    if variant == "monolithicSparse":
        proc = run(QEMU_IMG, "convert", "-O", "raw", child, tmp_path / "c.raw", check=False)
        assert proc.returncode != 0
        with pytest.raises(FormatError, match="parentCID"):
            await open_image(str(child))


async def test_counters_and_copy_on_write(vmdk_templates: dict[str, Image],
                                          tmp_path: Path) -> None:
    image = _copy(vmdk_templates["delta"], tmp_path)
    node = await _open_rw(image.path)
    assert isinstance(node, VmdkNode)
    try:
        # An unallocated grain (the base's 0x5a shows): one new grain, filled from the base.
        await node.pwrite(2 * MiB + 100, b"x" * 100)
        c = node.counters
        assert (c.grains_allocated, c.cow_bytes, c.cow_backing_bytes) == (1, GRAIN - 100,
                                                                          GRAIN - 100)
        # In place now.
        await node.pwrite(2 * MiB + 300, b"y" * 10)
        assert c.grains_allocated == 1
        got = bytes(await node.pread(2 * MiB, 512))
        assert got == b"\x5a" * 100 + b"x" * 100 + b"\x5a" * 100 + b"y" * 10 + b"\x5a" * 202
        # Write-zeroes over base data without zeroed grains: a zero grain is allocated.
        await node.zero(4 * MiB, GRAIN)
        assert c.grains_allocated == 2 and c.zeroed_grains == 0
        assert bytes(await node.pread(4 * MiB, GRAIN)) == bytes(GRAIN)
        assert c.gt_writebacks == 0  # nothing written back before a flush
        await node.flush()
        assert c.gt_writebacks == 1 and c.gd_writebacks == 0
    finally:
        await node.aclose()
    assert_clean(image.path, "vmdk")


async def test_zeroed_grains_for_write_zeroes(vmdk_templates: dict[str, Image],
                                              tmp_path: Path) -> None:
    """With the zeroed-grain feature, whole grains over parent data become GTE 1 entries."""
    image = _copy(vmdk_templates["delta-zeroed"], tmp_path)
    zero = Operation("zero", 4 * GRAIN + 100, 3 * GRAIN)  # partial, two whole, partial grains
    node = await _open_rw(image.path)
    assert isinstance(node, VmdkNode)
    try:
        await apply_op(node, zero)
        assert node.counters.zeroed_grains == 2
        assert node.counters.grains_allocated == 2
    finally:
        await node.aclose()
    write_reference(image.reference, zero.offset, zero.data())
    assert_clean(image.path, "vmdk")
    qemu_compare(image.path, "vmdk", image.reference)
    node = await open_image(str(image.path))
    try:
        assert await node.block_status(5 * GRAIN, 2 * GRAIN) == (
            BlockStatus.ZERO | BlockStatus.ALLOCATED, 2 * GRAIN)
    finally:
        await node.aclose()


# -- refusals --------------------------------------------------------------------------------


async def test_stream_optimized_is_read_only(tmp_path: Path) -> None:
    source = tmp_path / "s.raw"
    source.write_bytes(b"\x42" * MiB)
    path = tmp_path / "s.vmdk"
    qemu_img("convert", "-f", "raw", "-O", "vmdk", "-o", "subformat=streamOptimized", source,
             path)
    before = sha256_file(path)
    with pytest.raises(UnsupportedError, match=r"streamOptimized.*QEMU") as exc_info:
        await _open_rw(path)
    assert exc_info.value.errno == errno.EROFS
    assert sha256_file(path) == before


async def test_version_3_is_read_only(tmp_path: Path) -> None:
    path = make_vmdk(tmp_path / "d.vmdk", MiB)
    patch_header(path, version=3)
    with pytest.raises(UnsupportedError, match="version 3") as exc_info:
        await _open_rw(path)
    assert exc_info.value.errno == errno.EROFS
    node = await open_image(str(path))  # still readable
    await node.aclose()


async def test_delta_without_parent_is_read_only(vmdk_templates: dict[str, Image],
                                                 tmp_path: Path) -> None:
    image = _copy(vmdk_templates["delta"], tmp_path)
    with pytest.raises(UnsupportedError, match="without its parent") as exc_info:
        await _open_rw(image.path, backing=False)
    assert exc_info.value.errno == errno.EROFS


async def test_rdonly_and_zero_extents(tmp_path: Path) -> None:
    """RW extents are written, in place; RDONLY ones and ZERO ones (except with zeros) refuse.
    A file named by two extent lines is opened once."""
    (tmp_path / "a.bin").write_bytes(bytes(8192))
    (tmp_path / "b.bin").write_bytes(b"\x77" * 4096)
    write_descriptor(tmp_path / "d.vmdk", create_type="monolithicFlat", extents=[
        'RW 8 FLAT "a.bin" 0', 'RDONLY 8 FLAT "b.bin" 0', "RW 8 ZERO", 'RW 8 FLAT "a.bin" 8'])
    node = await _open_rw(tmp_path / "d.vmdk")
    try:
        assert len(node.children) == 3  # the descriptor, a.bin once, b.bin
        await node.pwrite(4000, b"A" * 96)
        await node.pwrite(3 * 4096 + 10, b"B" * 5)  # the second view of a.bin
        with pytest.raises(ReadOnlyError, match="RDONLY") as exc_info:
            await node.pwrite(4096 + 1, b"x")
        assert exc_info.value.errno == errno.EROFS
        await node.pwrite(2 * 4096, bytes(100))  # zeros into a ZERO extent: nothing to do
        with pytest.raises(ReadOnlyError, match="ZERO extent"):
            await node.pwrite(2 * 4096, b"z")
        assert bytes(await node.pread(0, 4 * 4096)) == (
            bytes(4000) + b"A" * 96 + b"\x77" * 4096 + bytes(4096) + bytes(10) + b"B" * 5
            + bytes(4096 - 15))
    finally:
        await node.aclose()
    a = (tmp_path / "a.bin").read_bytes()
    assert a[4000:4096] == b"A" * 96 and a[4096 + 10 : 4096 + 15] == b"B" * 5
    assert (tmp_path / "b.bin").read_bytes() == b"\x77" * 4096


async def test_hostile_grain_entry_into_metadata(vmdk_templates: dict[str, Image],
                                                 tmp_path: Path) -> None:
    """A grain table entry pointing at the grain directory: reads go there as QEMU's do, but
    a write is refused instead of overwriting the directory."""
    image = _copy(vmdk_templates["monolithicSparse"], tmp_path)
    gd, _ = _gd_offsets(image.path)
    data = bytearray(image.path.read_bytes())
    first_table = struct.unpack_from("<I", data, gd)[0] * 512
    struct.pack_into("<I", data, first_table, gd // 512)  # grain 0 -> the directory
    image.path.write_bytes(bytes(data))
    node = await _open_rw(image.path)
    try:
        with pytest.raises(FormatError, match="metadata"):
            await node.pwrite(10, b"boom")
    finally:
        await node.aclose()
    assert image.path.read_bytes()[gd : gd + 512] == bytes(data[gd : gd + 512])


async def test_hostile_shared_grain_table(vmdk_templates: dict[str, Image],
                                          tmp_path: Path) -> None:
    image = _copy(vmdk_templates["gd-holes"], tmp_path)
    gd, _ = _gd_offsets(image.path)
    with open(image.path, "r+b") as f:
        f.seek(gd)
        first = f.read(4)
        f.seek(gd + 8)
        f.write(first)  # tables 0 and 2 are now one table
    with pytest.raises(FormatError, match="same grain table"):
        await _open_rw(image.path)
    node = await open_image(str(image.path))  # reading is still possible
    await node.aclose()


async def test_hostile_file_shared_by_sparse_and_flat_extents(tmp_path: Path) -> None:
    """A flat extent over a sparse extent's file would write guest bytes over its tables."""
    make_vmdk(tmp_path / "s.vmdk", MiB, io=("write -P 1 0 64k",))
    write_descriptor(tmp_path / "d.vmdk", create_type="twoGbMaxExtentSparse", extents=[
        f'RW {MiB // 512} SPARSE "s.vmdk"', 'RW 8 FLAT "s.vmdk" 0'])
    with pytest.raises(FormatError, match="named by another extent"):
        await _open_rw(tmp_path / "d.vmdk")
    node = await open_image(str(tmp_path / "d.vmdk"))
    await node.aclose()
