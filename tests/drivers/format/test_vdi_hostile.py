"""vdi on hostile input: every bad field is a VdiskError naming the file and the field."""

from __future__ import annotations

import struct
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.support.hostile import assert_refused, patch, read_everything
from tests.support.images import create, qemu_io
from vdiskfs.block.context import open_image
from vdiskfs.errors import FormatError, UnsupportedError, VdiskError

MIB = 1 << 20
# Field offsets in the 512-byte header.
SIGNATURE, VERSION, HEADER_SIZE, IMAGE_TYPE = 0x40, 0x44, 0x48, 0x4C
OFFSET_BMAP, OFFSET_DATA, SECTOR_SIZE = 0x154, 0x158, 0x168
DISK_SIZE, BLOCK_SIZE, BLOCK_EXTRA, BLOCKS = 0x170, 0x178, 0x17C, 0x180
UUID_LINK, UUID_PARENT = 0x1A8, 0x1B8


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = create(tmp_path / "disk.vdi", 4 * MIB, "vdi")
    qemu_io(path, "write -P 0x5a 0 2M", fmt="vdi")
    return path


CASES: list[tuple[str, Callable[[Path], None], type[VdiskError], str]] = [
    ("signature", lambda p: patch(p, SIGNATURE, "<I", 0x12345678), FormatError, "signature"),
    ("version", lambda p: patch(p, VERSION, "<I", 0x00010000), UnsupportedError, "version"),
    ("header size", lambda p: patch(p, HEADER_SIZE, "<I", 16), FormatError, "header_size"),
    ("image type", lambda p: patch(p, IMAGE_TYPE, "<I", 4), UnsupportedError, "image_type"),
    ("bmap alignment", lambda p: patch(p, OFFSET_BMAP, "<I", 0x201), UnsupportedError,
     "offset_bmap"),
    ("bmap in header", lambda p: patch(p, OFFSET_BMAP, "<I", 0), FormatError, "offset_bmap"),
    ("data alignment", lambda p: patch(p, OFFSET_DATA, "<I", 0x401), UnsupportedError,
     "offset_data"),
    ("data past end", lambda p: patch(p, OFFSET_DATA, "<I", 0x7FFFFE00), FormatError,
     "offset_data"),
    ("sector size", lambda p: patch(p, SECTOR_SIZE, "<I", 4096), UnsupportedError,
     "sector_size"),
    ("block size", lambda p: patch(p, BLOCK_SIZE, "<I", 2 * MIB), UnsupportedError,
     "block_size"),
    ("block extra", lambda p: patch(p, BLOCK_EXTRA, "<I", 512), UnsupportedError,
     "block_extra"),
    ("disk size vs blocks", lambda p: patch(p, DISK_SIZE, "<Q", 5 * MIB), FormatError,
     "disk_size"),
    ("absurd disk size", lambda p: patch(p, DISK_SIZE, "<Q", 1 << 62), UnsupportedError,
     "disk_size"),
    ("absurd block count", lambda p: patch(p, BLOCKS, "<I", 0xFFFFFFF0), UnsupportedError,
     "blocks_in_image"),
    ("parent uuid", lambda p: patch(p, UUID_PARENT, "16s", uuid.uuid4().bytes),
     UnsupportedError, "uuid_parent"),
    ("link uuid", lambda p: patch(p, UUID_LINK, "16s", uuid.uuid4().bytes), UnsupportedError,
     "uuid_link"),
    ("bmap over data", lambda p: patch(p, OFFSET_BMAP, "<I", 0x200 * 9), FormatError,
     "offset_data"),
]


@pytest.mark.parametrize(("name", "mutate", "error", "field"), CASES,
                         ids=[case[0] for case in CASES])
async def test_bad_header_field(image: Path, name: str, mutate: Callable[[Path], None],
                                error: type[VdiskError], field: str) -> None:
    mutate(image)
    await assert_refused(image, error, field=field, format="vdi")


async def test_block_map_entry_outside_file(image: Path) -> None:
    with open(image, "rb") as f:
        offset_bmap = struct.unpack_from("<I", f.read(512), OFFSET_BMAP)[0]
    patch(image, offset_bmap + 4, "<I", 1000)
    node = await open_image(str(image))
    try:
        assert len(await node.pread(0, 4096)) == 4096  # block 0 is fine
        with pytest.raises(FormatError, match="past the end of the file") as info:
            await node.pread(MIB, 4096)
        assert info.value.field == "block_map[1]"
    finally:
        await node.aclose()


async def test_truncated_file(tmp_path: Path) -> None:
    path = tmp_path / "short.vdi"
    path.write_bytes(b"<<< x >>>".ljust(64, b"\0") + struct.pack("<I", 0xBEDA107F))
    with pytest.raises(FormatError, match="outside the file") as info:
        await read_everything(path, format="vdi")
    assert info.value.field == "header"
