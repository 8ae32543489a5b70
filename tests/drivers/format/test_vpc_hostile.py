"""Damaged and hostile VHD images: every one fails with a VdiskError naming file and field."""

from __future__ import annotations

import shutil
import struct
import uuid
from pathlib import Path

import pytest

from tests.support.hostile import assert_refused, read_everything
from tests.support.images import random_bytes
from tests.support.vpc_images import (
    Block,
    Locator,
    VhdSpec,
    build_vhd,
    footer_checksum,
    make_vhd,
    patch_dynamic_header,
    patch_footer,
    read_footer,
)
from vdiskfs.block.context import open_image
from vdiskfs.errors import ChainError, FormatError, UnsupportedError

MiB = 1 << 20
BLOCK = 64 * 1024


@pytest.fixture(scope="module")
def dynamic_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("vpc-hostile") / "template.vhd"
    return make_vhd(path, 4 * MiB, "dynamic", io=("write -P 0x42 0 64k",))


@pytest.fixture
def dynamic(tmp_path: Path, dynamic_template: Path) -> Path:
    path = tmp_path / "disk.vhd"
    shutil.copy(dynamic_template, path)
    return path


def _dynamic_header_offset(path: Path) -> int:
    offset = read_footer(path.read_bytes()[:512])["data_offset"]
    assert isinstance(offset, int)
    return offset


# -- footer ----------------------------------------------------------------------------------------


async def test_footer_checksum(dynamic: Path) -> None:
    patch_footer(dynamic, fix_checksum=False, timestamp=12345)
    await assert_refused(dynamic, FormatError, "footer copy checksum .* is wrong",
                   field="footer copy.checksum", format="vpc")


async def test_fixed_footer_checksum(tmp_path: Path) -> None:
    path = make_vhd(tmp_path / "f.vhd", MiB, "fixed")
    patch_footer(path, fix_checksum=False, timestamp=1)
    # No longer probed as vpc (the probe checks the checksum); forced, it is refused.
    node = await open_image(str(path))
    try:
        assert node.driver == "raw"
    finally:
        await node.aclose()
    await assert_refused(path, FormatError, "footer checksum", field="footer.checksum",
                         format="vpc")


async def test_no_footer_at_all(tmp_path: Path) -> None:
    path = tmp_path / "noise.bin"
    path.write_bytes(random_bytes(4, 8192))
    await assert_refused(path, FormatError, "no VHD footer", field="footer.cookie", format="vpc")
    path.write_bytes(b"conec")
    await assert_refused(path, FormatError, "too small", field="footer", format="vpc")


async def test_unknown_disk_type(dynamic: Path) -> None:
    patch_footer(dynamic, disk_type=9)
    await assert_refused(dynamic, UnsupportedError, "disk type 9", field="footer copy.disk_type")


async def test_dynamic_footer_only_at_end(dynamic: Path) -> None:
    data = bytearray(dynamic.read_bytes())
    data[:8] = b"XXXXXXXX"
    dynamic.write_bytes(bytes(data))
    await assert_refused(dynamic, FormatError, "without the footer copy", field="footer copy",
                   format="vpc")


async def test_size_beyond_vhd_limit(dynamic: Path) -> None:
    patch_footer(dynamic, creator_app=b"win ", current_size=2041 << 30)
    await assert_refused(dynamic, UnsupportedError, "2040 GiB", field="footer.current_size")


async def test_fixed_size_larger_than_file(tmp_path: Path) -> None:
    path = make_vhd(tmp_path / "f.vhd", MiB, "fixed")
    patch_footer(path, creator_app=b"win ", current_size=1 << 40)
    await assert_refused(path, FormatError, "larger than the .* data bytes",
                   field="footer.current_size")


async def test_data_offset_outside_file(dynamic: Path) -> None:
    patch_footer(dynamic, data_offset=1 << 50)
    await assert_refused(dynamic, FormatError, "outside the file", field="dynamic_header")


# -- dynamic header and BAT ----------------------------------------------------------------------


async def test_dynamic_header_checksum(dynamic: Path) -> None:
    patch_dynamic_header(dynamic, fix_checksum=False, parent_timestamp=99)
    await assert_refused(dynamic, FormatError, "dynamic header checksum",
                   field="dynamic_header.checksum")


async def test_dynamic_header_cookie(dynamic: Path) -> None:
    patch_dynamic_header(dynamic, cookie=b"cxsparsX")
    await assert_refused(dynamic, FormatError, "cookie", field="dynamic_header.cookie")


@pytest.mark.parametrize("block_size", [0, 256, 3 * 65536, 0xFFFFFFFF])
async def test_block_size_must_be_a_power_of_two(dynamic: Path, block_size: int) -> None:
    patch_dynamic_header(dynamic, block_size=block_size)
    await assert_refused(dynamic, FormatError, "power of two", field="dynamic_header.block_size")


async def test_bat_too_small(dynamic: Path) -> None:
    patch_dynamic_header(dynamic, max_table_entries=1)
    await assert_refused(dynamic, FormatError, "maps less than the virtual size",
                   field="dynamic_header.max_table_entries")


async def test_bat_entry_count_is_bounded(dynamic: Path) -> None:
    """512-byte blocks over 2040 GiB would need 4 Gi entries: refused before reading."""
    patch_footer(dynamic, creator_app=b"win ", current_size=2040 << 30)
    patch_dynamic_header(dynamic, block_size=512, max_table_entries=0xFFFFFFFF)
    await assert_refused(dynamic, UnsupportedError, "blocks of 512 bytes",
                   field="dynamic_header.block_size")


async def test_bat_outside_file(dynamic: Path) -> None:
    patch_dynamic_header(dynamic, table_offset=1 << 40)
    await assert_refused(dynamic, FormatError, "outside the file", field="BAT")


async def test_bat_entry_outside_file(dynamic: Path) -> None:
    data = dynamic.read_bytes()
    header = _dynamic_header_offset(dynamic)
    (table,) = struct.unpack_from(">Q", data, header + 16)
    with open(dynamic, "r+b") as f:
        f.seek(table + 4)
        f.write(struct.pack(">I", 0x7FFFFFFF))
    exc = await assert_refused(dynamic, FormatError, "BAT entry 1 .* outside the file", field="BAT")
    assert exc.offset == table + 4


# -- differencing disks and their parents --------------------------------------------------------


def _child(path: Path, parent_uuid: uuid.UUID, locators: list[Locator],
           parent_name: str = "") -> Path:
    spec = VhdSpec(size=MiB, block_size=BLOCK, disk_type=4, parent_uuid=parent_uuid,
                   parent_name=parent_name, locators=locators)
    return build_vhd(path, spec, {0: Block(random_bytes(1, BLOCK), sectors={0})})


def _parent(path: Path) -> uuid.UUID:
    disk_uuid = uuid.uuid4()
    build_vhd(path, VhdSpec(size=MiB, block_size=BLOCK, disk_uuid=disk_uuid),
              {1: Block(b"p" * BLOCK)})
    return disk_uuid


def _w2ru(reference: str) -> Locator:
    return Locator(b"W2ru", reference.encode("utf-16-le"))


async def test_parent_missing_lists_what_was_tried(tmp_path: Path) -> None:
    child = _child(tmp_path / "c.vhd", uuid.uuid4(),
                   [_w2ru(".\\gone.vhd"), Locator(b"W2ku", "C:\\x\\away.vhd".encode("utf-16-le"))])
    exc = await assert_refused(child, FormatError, "not found; tried './gone.vhd', 'away.vhd'",
                         field="parent_locator")
    assert "c.vhd" in str(exc)


async def test_parent_uuid_mismatch(tmp_path: Path) -> None:
    _parent(tmp_path / "p.vhd")
    wrong = uuid.UUID(int=5)
    child = _child(tmp_path / "c.vhd", wrong, [_w2ru("p.vhd")])
    exc = await assert_refused(child, FormatError, str(wrong), field="dynamic_header.parent_uuid")
    assert "p.vhd" in str(exc)


async def test_no_parent_named(tmp_path: Path) -> None:
    child = _child(tmp_path / "c.vhd", uuid.uuid4(), [Locator(b"Mac ", b"\x00\x01alias")])
    await assert_refused(child, FormatError, "names no parent", field="parent_locator")


async def test_locator_data_is_bounded(tmp_path: Path) -> None:
    parent_uuid = _parent(tmp_path / "p.vhd")
    child = _child(tmp_path / "c.vhd", parent_uuid, [_w2ru("p.vhd")])
    _patch_locator(child, ">I", 1 << 30)  # data length
    await assert_refused(child, FormatError, "parent locator of", field="parent_locator[0]")
    _patch_locator(child, ">IIQ", 20, 0, 1 << 40)  # data length, reserved, data offset
    await assert_refused(child, FormatError, "outside the file", field="parent_locator[0]")


def _patch_locator(path: Path, layout: str, *values: int) -> None:
    """Rewrite locator 0 from its data length on, and the header checksum."""
    header = _dynamic_header_offset(path)
    with open(path, "r+b") as f:
        f.seek(header)
        raw = bytearray(f.read(1024))
        struct.pack_into(layout, raw, 576 + 8, *values)
        struct.pack_into(">I", raw, 36, footer_checksum(bytes(raw), 36))
        f.seek(header)
        f.write(raw)


async def test_parent_outside_directory(tmp_path: Path) -> None:
    parent_uuid = _parent(tmp_path / "p.vhd")
    inner = tmp_path / "a" / "b"
    inner.mkdir(parents=True)
    child = _child(inner / "c.vhd", parent_uuid, [_w2ru("..\\..\\p.vhd")])
    await read_everything(child)  # followed by default, like QEMU follows backing files
    await assert_refused(child, ChainError, "leads outside", field="parent_locator",
                   follow_outside=False)


async def test_parent_loop(tmp_path: Path) -> None:
    """A differencing disk naming itself (its UUID its parent's) is a loop, not a hang."""
    disk_uuid = uuid.uuid4()
    spec = VhdSpec(size=MiB, block_size=BLOCK, disk_type=4, disk_uuid=disk_uuid,
                   parent_uuid=disk_uuid, locators=[_w2ru(".\\self.vhd")])
    path = build_vhd(tmp_path / "self.vhd", spec, {})
    await assert_refused(path, ChainError, "loops", field="parent_locator")


async def test_parent_of_another_format_is_refused(tmp_path: Path) -> None:
    (tmp_path / "p.raw").write_bytes(bytes(MiB))
    child = _child(tmp_path / "c.vhd", uuid.uuid4(), [_w2ru("p.raw")])
    await assert_refused(child, FormatError, "no VHD footer", where=tmp_path / "p.raw")


# -- parent locators that do not decode (issue 10) ----------------------------------------------


@pytest.mark.parametrize("code", [b"W2ku", b"W2ru"])
async def test_utf16_locator_of_odd_length(tmp_path: Path, code: bytes) -> None:
    """The issue's recipe: a W2ku/W2ru locator with an odd data_length raised a
    UnicodeDecodeError out of locator_reference."""
    data = "p.vhd".encode("utf-16-le") + b"\x00"
    child = _child(tmp_path / "c.vhd", uuid.uuid4(), [Locator(code, data)])
    await assert_refused(child, FormatError, f"{code.decode()} locator of 11 bytes",
                         field="parent_locator[0]")


@pytest.mark.parametrize("data", [
    "\ud800".encode("utf-16-le", "surrogatepass"),  # a lone high surrogate
    "p".encode("utf-16-le") + "\udc00".encode("utf-16-le", "surrogatepass"),
], ids=["lone-high", "lone-low"])
async def test_utf16_locator_with_a_lone_surrogate(tmp_path: Path, data: bytes) -> None:
    child = _child(tmp_path / "c.vhd", uuid.uuid4(), [Locator(b"W2ru", data)])
    await assert_refused(child, FormatError, "W2ru locator is not valid UTF-16",
                         field="parent_locator[0]")


async def test_macx_locator_that_is_no_url(tmp_path: Path) -> None:
    child = _child(tmp_path / "c.vhd", uuid.uuid4(), [Locator(b"MacX", b"file://[::1/p.vhd")])
    await assert_refused(child, FormatError, "MacX locator is not a file URL",
                         field="parent_locator[0]")


@pytest.mark.parametrize("code", [b"Wi2r", b"Wi2k", b"MacX"])
async def test_byte_locators_with_any_bytes_are_names(tmp_path: Path, code: bytes) -> None:
    """Single-byte locators decode whatever their bytes (invalid UTF-8 included): a name the
    file system may hold, looked for like any other, never a traceback."""
    child = _child(tmp_path / "c.vhd", uuid.uuid4(), [Locator(code, b"\xff\xfe\x00junk")])
    await assert_refused(child, FormatError, "not found", field="parent_locator")


async def test_utf16_locator_with_nul_padding_is_fine(tmp_path: Path) -> None:
    disk_uuid = _parent(tmp_path / "p.vhd")
    child = _child(tmp_path / "c.vhd", disk_uuid,
                   [Locator(b"W2ru", "p.vhd\0\0\0".encode("utf-16-le"))])
    await read_everything(child)
