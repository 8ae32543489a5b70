"""vhdx on hostile input: bad signatures and checksums, absurd counts and sizes, BAT entries
pointing anywhere, parent locators that lie. Each is a VdiskError naming file and field."""

from __future__ import annotations

import struct
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.support import vhdx_build as vb
from tests.support.hostile import assert_refused
from tests.support.images import create, qemu_io
from vdiskfs.block.context import OpenOptions, open_image
from vdiskfs.drivers.format.vhdx.metadata import parse_parent_locator
from vdiskfs.errors import FormatError, UnsupportedError, VdiskError

MIB = 1 << 20


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = create(tmp_path / "disk.vhdx", 8 * MIB, "vhdx", block_size="1M")
    qemu_io(path, "write -P 0x5a 0 2M", fmt="vhdx")
    return path


def region_table(mutate: Callable[[bytearray], None]) -> Callable[[Path], None]:
    """Change both region table copies and re-checksum them."""
    def apply(path: Path) -> None:
        for offset in vb.REGION_OFFSETS:
            table = bytearray(path.read_bytes()[offset : offset + 64 * 1024])
            mutate(table)
            vb.write_at(path, offset, bytes(vb.seal(table, 64 * 1024)))
    return apply


def metadata_table(mutate: Callable[[bytearray], None]) -> Callable[[Path], None]:
    def apply(path: Path) -> None:
        layout = vb.read_layout(path)
        table = bytearray(path.read_bytes()[layout.metadata_offset :
                                            layout.metadata_offset + 64 * 1024])
        mutate(table)
        vb.write_at(path, layout.metadata_offset, bytes(table))
    return apply


def item(guid: uuid.UUID, value: bytes) -> Callable[[Path], None]:
    return lambda path: vb.set_metadata_item(path, vb.read_layout(path), guid, value)


def bat_entry(index: int, value: int) -> Callable[[Path], None]:
    return lambda path: vb.write_at(path, vb.read_layout(path).bat_offset + 8 * index,
                                    struct.pack("<Q", value))


def _pack(fmt: str, offset: int, *values: object) -> Callable[[bytearray], None]:
    return lambda table: struct.pack_into(fmt, table, offset, *values)


def _unknown_required_region(table: bytearray) -> None:
    count = struct.unpack_from("<I", table, 8)[0]
    struct.pack_into("<16sQII", table, 16 + 32 * count, uuid.uuid4().bytes_le, 64 * MIB, MIB, 1)
    struct.pack_into("<I", table, 8, count + 1)


def _overlapping_regions(table: bytearray) -> None:
    bat_offset = struct.unpack_from("<Q", table, 16 + 16)[0]
    struct.pack_into("<Q", table, 48 + 16, bat_offset)


def _unknown_required_item(table: bytearray) -> None:
    count = struct.unpack_from("<H", table, 10)[0]
    struct.pack_into("<16sIII", table, 32 + 32 * count, uuid.uuid4().bytes_le, 0, 0, 0x4)
    struct.pack_into("<H", table, 10, count + 1)


CASES: list[tuple[str, Callable[[Path], None], type[VdiskError], str]] = [
    ("file signature", lambda p: vb.write_at(p, 0, b"vhdxfilf"), FormatError, "file_identifier"),
    ("both headers", lambda p: [vb.write_at(p, o + 200, b"\x01") for o in vb.HEADER_OFFSETS],
     FormatError, "header"),
    ("both region tables", lambda p: [vb.write_at(p, o + 999, b"\x01")
                                      for o in vb.REGION_OFFSETS], FormatError, "region_table"),
    ("region count", region_table(_pack("<I", 8, 5000)), FormatError,
     "region_table.entry_count"),
    ("required region", region_table(_unknown_required_region), UnsupportedError,
     "region_table[2]"),
    ("missing BAT", region_table(_pack("<I", 8, 0)), FormatError, "region_table"),
    ("overlapping regions", region_table(_overlapping_regions), FormatError, "region_table[1]"),
    ("unaligned region", region_table(_pack("<Q", 32, 3 * MIB + 4096)), FormatError,
     "region_table[0]"),
    ("metadata signature", metadata_table(_pack("<8s", 0, b"metadatX")), FormatError,
     "metadata_table"),
    ("metadata count", metadata_table(_pack("<H", 10, 4000)), FormatError,
     "metadata_table.entry_count"),
    ("required item", metadata_table(_unknown_required_item), UnsupportedError,
     "metadata_table[5]"),
    ("item outside region", metadata_table(_pack("<I", 32 + 16, 0xFFFFFF00)), FormatError,
     "metadata_table[0]"),
    ("block size", item(vb.FILE_PARAMETERS, struct.pack("<I", 3 * MIB)), FormatError,
     "file_parameters.block_size"),
    ("block size huge", item(vb.FILE_PARAMETERS, struct.pack("<I", 1 << 31)), FormatError,
     "file_parameters.block_size"),
    ("logical sector", item(vb.LOGICAL_SECTOR, struct.pack("<I", 1000)), FormatError,
     "logical_sector_size"),
    ("virtual size", item(vb.VIRTUAL_DISK_SIZE, struct.pack("<Q", 1 << 60)), FormatError,
     "virtual_disk_size"),
    ("BAT too small", item(vb.VIRTUAL_DISK_SIZE, struct.pack("<Q", 1 << 40)), FormatError,
     "region_table.bat.length"),
    ("parent without locator", item(vb.FILE_PARAMETERS, struct.pack("<II", MIB, 2)),
     FormatError, "parent_locator"),
    ("log offset", lambda p: _header_field(p, 72, "<Q", 12345), FormatError,
     "header.log_offset"),
    ("log version", lambda p: _header_field(p, 64, "<H", 3), UnsupportedError,
     "header.log_version"),
    ("huge log to replay", lambda p: _header_field(p, 68, "<I", 1 << 31, log=True),
     UnsupportedError, "header.log_length"),
]


def _header_field(path: Path, offset: int, fmt: str, value: int, log: bool = False) -> None:
    layout = vb.read_layout(path)
    for header in layout.headers:
        struct.pack_into(fmt, header, offset, value)
        if log:
            header[48:64] = uuid.uuid4().bytes_le
    vb.rewrite_headers(path, layout)


@pytest.mark.parametrize(("name", "mutate", "error", "field"), CASES,
                         ids=[case[0] for case in CASES])
async def test_bad_structure(image: Path, name: str, mutate: Callable[[Path], None],
                             error: type[VdiskError], field: str) -> None:
    mutate(image)
    with pytest.raises(error) as info:
        node = await open_image(str(image), OpenOptions(format="vhdx"))
        await node.aclose()
    assert info.value.field == field
    assert info.value.path == str(image)


@pytest.mark.parametrize(("entry", "message"), [
    ((1 << 40) | vb.FULLY_PRESENT, "outside the file"),
    (vb.FULLY_PRESENT, "outside the file"),  # offset 0: the header section
    ((3 * MIB) | vb.FULLY_PRESENT, "overlaps"),  # qemu-img puts the BAT here... or metadata
    (4, "reserved state"),
    (vb.PARTIALLY_PRESENT, "without a parent"),
])
async def test_bad_bat_entry(image: Path, entry: int, message: str) -> None:
    layout = vb.read_layout(image)
    if "overlaps" in message:
        entry = layout.bat_offset | vb.FULLY_PRESENT
    bat_entry(1, entry)(image)
    node = await open_image(str(image))
    try:
        assert len(await node.pread(0, 4096)) == 4096
        with pytest.raises(FormatError, match=message) as info:
            await node.pread(MIB, 4096)
        assert info.value.field == "bat[1]"
    finally:
        await node.aclose()


async def test_missing_sector_bitmap(tmp_path: Path) -> None:
    spec = vb.DiffSpec(virtual_size=2 * MIB, states={0: vb.PARTIALLY_PRESENT},
                       blocks={0: bytes(MIB)}, sectors={0: {1}},
                       locator={"parent_linkage": "{01234567-89ab-cdef-0123-456789abcdef}",
                                "relative_path": "p.raw"})
    child = tmp_path / "child.vhdx"
    vb.build_differencing(child, spec)
    (tmp_path / "p.raw").write_bytes(bytes(2 * MIB))
    layout = vb.read_layout(child)
    vb.write_at(child, layout.bat_offset + 8 * layout.chunk_ratio, struct.pack("<Q", 0))
    node = await open_image(str(child))
    try:
        with pytest.raises(FormatError, match="sector bitmap entry") as info:
            await node.pread(0, 4096)
        assert info.value.field == f"bat[{layout.chunk_ratio}]"
    finally:
        await node.aclose()


# -- the parent locator parser, on bytes --

GOOD = {"parent_linkage": "{01234567-89ab-cdef-0123-456789abcdef}", "relative_path": "..\\p.vhdx"}


def test_parent_locator_parses() -> None:
    locator = parse_parent_locator(vb._locator_item(GOOD), label="x")
    assert locator.parent_linkage == uuid.UUID("01234567-89ab-cdef-0123-456789abcdef")
    assert locator.paths() == [("relative_path", "../p.vhdx")]


def _broken(mutate: Callable[[bytearray], None]) -> bytes:
    data = bytearray(vb._locator_item(GOOD))
    mutate(data)
    return bytes(data)


@pytest.mark.parametrize(("data", "error", "field"), [
    (b"short", FormatError, "parent_locator"),
    (_broken(lambda d: struct.pack_into("<H", d, 18, 60000)), FormatError,
     "parent_locator.key_value_count"),
    (_broken(lambda d: struct.pack_into("<16s", d, 0, uuid.uuid4().bytes_le)), UnsupportedError,
     "parent_locator.locator_type"),
    (_broken(lambda d: struct.pack_into("<I", d, 20, 1 << 30)), FormatError,
     "parent_locator.entry[0].key"),
    (_broken(lambda d: struct.pack_into("<H", d, 28, 3)), FormatError,
     "parent_locator.entry[0].key"),
    (_broken(lambda d: struct.pack_into("<H", d, 30, 0)), FormatError,
     "parent_locator.entry[0].value"),
    (vb._locator_item({"relative_path": "p.vhdx"}), FormatError, "parent_locator.parent_linkage"),
    (vb._locator_item({**GOOD, "parent_linkage": "nope"}), FormatError,
     "parent_locator.parent_linkage"),
    (vb._locator_item({"parent_linkage": GOOD["parent_linkage"]}), FormatError,
     "parent_locator"),
    # A lone high surrogate at the end of the last value: not UTF-16.
    (_broken(lambda d: d.__setitem__(slice(len(d) - 2, len(d)), b"\x00\xd8")), FormatError,
     "parent_locator.entry[1].value"),
])
def test_parent_locator_hostile(data: bytes, error: type[VdiskError], field: str) -> None:
    with pytest.raises(error) as info:
        parse_parent_locator(data, label="child.vhdx")
    assert info.value.field == field
    assert info.value.path == "child.vhdx"


async def test_parent_path_with_a_nul(tmp_path: Path) -> None:
    """A locator string that decodes (UTF-16 allows U+0000) but is no file name."""
    spec = vb.DiffSpec(virtual_size=1 << 20, locator={**GOOD, "relative_path": "p\0.vhdx"})
    vb.build_differencing(tmp_path / "child.vhdx", spec)
    await assert_refused(tmp_path / "child.vhdx", FormatError, "NUL byte",
                         field="parent_locator.relative_path")
