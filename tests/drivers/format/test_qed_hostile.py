"""qed on hostile input: every bad field is a VdiskError naming the file and the field."""

from __future__ import annotations

import struct
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.support.hostile import assert_refused, patch
from tests.support.images import create, qemu_io
from vdiskfs.block.context import open_image
from vdiskfs.errors import FormatError, UnsupportedError, VdiskError

MIB = 1 << 20
# Header field offsets.
MAGIC, CLUSTER, TABLE, HEADER_SIZE, FEATURES = 0, 4, 8, 12, 16
L1_OFFSET, IMAGE_SIZE, BACKING_OFFSET, BACKING_SIZE = 40, 48, 56, 60


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = create(tmp_path / "disk.qed", 4 * MIB, "qed")
    qemu_io(path, "write -P 0x5a 0 128k", fmt="qed")
    return path


def with_backing(offset: int, size: int) -> Callable[[Path], None]:
    def mutate(path: Path) -> None:
        patch(path, FEATURES, "<Q", 0x01)
        patch(path, BACKING_OFFSET, "<I", offset)
        patch(path, BACKING_SIZE, "<I", size)
    return mutate


CASES: list[tuple[str, Callable[[Path], None], type[VdiskError], str]] = [
    ("magic", lambda p: patch(p, MAGIC, "<I", 0x12345678), FormatError, "magic"),
    ("unknown feature", lambda p: patch(p, FEATURES, "<Q", 0x100), UnsupportedError,
     "features"),
    ("cluster not power of two", lambda p: patch(p, CLUSTER, "<I", 65536 + 512), FormatError,
     "cluster_size"),
    ("cluster too big", lambda p: patch(p, CLUSTER, "<I", 1 << 30), FormatError,
     "cluster_size"),
    ("cluster too small", lambda p: patch(p, CLUSTER, "<I", 512), FormatError, "cluster_size"),
    ("table size 3", lambda p: patch(p, TABLE, "<I", 3), FormatError, "table_size"),
    ("table size 32", lambda p: patch(p, TABLE, "<I", 32), FormatError, "table_size"),
    ("image size odd", lambda p: patch(p, IMAGE_SIZE, "<Q", 4 * MIB + 1), FormatError,
     "image_size"),
    ("image size absurd", lambda p: patch(p, IMAGE_SIZE, "<Q", 1 << 62), FormatError,
     "image_size"),
    ("header size zero", lambda p: patch(p, HEADER_SIZE, "<I", 0), FormatError, "header_size"),
    ("header size absurd", lambda p: patch(p, HEADER_SIZE, "<I", 0xFFFFFFFF), FormatError,
     "header_size"),
    ("l1 unaligned", lambda p: patch(p, L1_OFFSET, "<Q", 65536 + 8), FormatError,
     "l1_table_offset"),
    ("l1 past end", lambda p: patch(p, L1_OFFSET, "<Q", 1 << 40), FormatError,
     "l1_table_offset"),
    ("l1 in header", lambda p: patch(p, L1_OFFSET, "<Q", 0), FormatError, "l1_table_offset"),
    ("backing name outside header", with_backing(65000, 1000), FormatError,
     "backing_filename_offset"),
    ("backing name empty", with_backing(64, 0), FormatError, "backing_filename_size"),
]


@pytest.mark.parametrize(("name", "mutate", "error", "field"), CASES,
                         ids=[case[0] for case in CASES])
async def test_bad_header_field(image: Path, name: str, mutate: Callable[[Path], None],
                                error: type[VdiskError], field: str) -> None:
    mutate(image)
    await assert_refused(image, error, field=field, format="qed")


def _l1_l2(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    l1 = struct.unpack_from("<Q", data, L1_OFFSET)[0]
    return l1, struct.unpack_from("<Q", data, l1)[0]


@pytest.mark.parametrize("entry", [1 << 50, 12345, 32768, (1 << 64) - 65536])
async def test_bad_l1_entry(image: Path, entry: int) -> None:
    l1, _ = _l1_l2(image)
    patch(image, l1, "<Q", entry)
    node = await open_image(str(image))
    try:
        with pytest.raises(FormatError) as info:
            await node.pread(0, 512)
        assert info.value.field == "l1_table[0]"
        assert info.value.path == str(image)
    finally:
        await node.aclose()


@pytest.mark.parametrize("entry", [1 << 50, 12345, 2, 4096])
async def test_bad_l2_entry(image: Path, entry: int) -> None:
    _, l2 = _l1_l2(image)
    patch(image, l2 + 8, "<Q", entry)
    node = await open_image(str(image))
    try:
        assert len(await node.pread(0, 4096)) == 4096  # cluster 0 is intact
        with pytest.raises(FormatError) as info:
            await node.pread(65536, 512)
        assert info.value.field == "l2_table[0][1]"
    finally:
        await node.aclose()


async def test_truncated_l2_table(image: Path) -> None:
    _, l2 = _l1_l2(image)
    with open(image, "r+b") as f:
        f.truncate(l2 + 4096)
    node = await open_image(str(image))
    try:
        with pytest.raises(FormatError) as info:
            await node.pread(0, 512)
        assert info.value.field == "l1_table[0]"
    finally:
        await node.aclose()
