"""Hostile and broken qcow2 images: every one is refused with a VdiskError naming the file and
the field at fault -- at open when the header is wrong, on the read that reaches a bad table
entry otherwise -- and never hangs, allocates without bound or returns wrong bytes."""

from __future__ import annotations

import contextlib
import random
import shutil
import struct
from pathlib import Path

import pytest
import trio

from tests.support.hostile import patch, read_field
from tests.support.images import create, qemu_img, qemu_io
from tests.support.qcow2_images import KiB, MiB
from vdiskfs.block.context import OpenOptions, open_image
from vdiskfs.block.node import BlockNode
from vdiskfs.drivers.format.qcow2 import snapshots
from vdiskfs.drivers.format.qcow2.mapping import OFLAG_COMPRESSED, OFLAG_COPIED, OFLAG_ZERO
from vdiskfs.drivers.format.qcow2.snapshots import NeedMoreData, parse_snapshot_table
from vdiskfs.errors import ChainError, FormatError, UnsupportedError, VdiskError

# Header field offsets (docs/interop/qcow2.txt).
VERSION, BACKING_OFFSET, BACKING_SIZE, CLUSTER_BITS, SIZE = 4, 8, 16, 20, 24
CRYPT_METHOD, L1_SIZE, L1_OFFSET, REFTABLE_CLUSTERS = 32, 36, 40, 56
NB_SNAPSHOTS, SNAPSHOTS_OFFSET, INCOMPATIBLE, AUTOCLEAR = 60, 64, 72, 88
REFCOUNT_ORDER, HEADER_LENGTH = 96, 100
CLUSTER = 64 * KiB


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small valid v3 image: data in clusters 0-3, a compressed cluster at 512 KiB, a zero
    cluster at 768 KiB."""
    image = create(tmp_path_factory.mktemp("pristine") / "disk.qcow2", 1 * MiB)
    qemu_io(image, "write -q -P 0x5a 0 256k", "write -q -c -P 0x33 512k 64k",
            "write -q -z 768k 64k")
    return image


@pytest.fixture
def bad(pristine: Path, tmp_path: Path) -> Path:
    """A private copy of the pristine image to break."""
    return Path(shutil.copy(pristine, tmp_path / "bad.qcow2"))


def l2_table_offset(path: Path, l1_index: int = 0) -> int:
    l1_entry = read_field(path, read_field(path, L1_OFFSET, ">Q") + 8 * l1_index, ">Q")
    return l1_entry & 0x00FFFFFFFFFFFE00


async def open_fails(path: Path, error: type[VdiskError], match: str, **options: object) -> None:
    with pytest.raises(error, match=match):
        node = await open_image(str(path), OpenOptions(**options))  # type: ignore[arg-type]
        await node.aclose()


async def read_fails(path: Path, offset: int, error: type[VdiskError], match: str) -> None:
    node: BlockNode = await open_image(str(path))
    try:
        with pytest.raises(error, match=match):
            await node.pread(offset, 4096)
        # The failure is local: the rest of the disk still reads.
        assert len(await node.pread(256 * KiB, 4096)) == 4096
    finally:
        await node.aclose()


# -- the header ----------------------------------------------------------------------------------


async def test_truncated_header(bad: Path) -> None:
    data = bad.read_bytes()
    bad.write_bytes(data[:50])
    await open_fails(bad, FormatError, r"bad\.qcow2: field header: offset 0x0: file too short")
    bad.write_bytes(data[:90])
    await open_fails(bad, FormatError, r"bad\.qcow2: field header: .*too short for a version 3")


async def test_bad_magic(bad: Path) -> None:
    patch(bad, 0, ">4s", b"QFI\xfa")  # type: ignore[arg-type]
    await open_fails(bad, FormatError, r"bad\.qcow2: field magic: offset 0x0: bad magic",
                     format="qcow2")


@pytest.mark.parametrize("version", [1, 4, 0xFFFFFFFF])
async def test_bad_version(bad: Path, version: int) -> None:
    patch(bad, VERSION, ">I", version)
    await open_fails(bad, UnsupportedError,
                     rf"bad\.qcow2: field version: offset 0x4: qcow2 version {version} is not",
                     format="qcow2")


@pytest.mark.parametrize("bits", [0, 8, 22, 63, 0xFFFFFFFF])
async def test_absurd_cluster_bits(bad: Path, bits: int) -> None:
    patch(bad, CLUSTER_BITS, ">I", bits)
    await open_fails(bad, FormatError, rf"bad\.qcow2: field cluster_bits: .*{bits} out of range")


@pytest.mark.parametrize("size", [1 << 62, (1 << 64) - 1])
async def test_absurd_size(bad: Path, size: int) -> None:
    patch(bad, SIZE, ">Q", size)
    await open_fails(bad, FormatError, r"bad\.qcow2: field size: offset 0x18: virtual size")


async def test_size_beyond_l1(bad: Path) -> None:
    patch(bad, SIZE, ">Q", 1 << 40)
    await open_fails(bad, FormatError, r"bad\.qcow2: field l1_size: .*too small")


async def test_absurd_l1_size(bad: Path) -> None:
    patch(bad, L1_SIZE, ">I", 1 << 30)
    await open_fails(bad, FormatError, r"bad\.qcow2: field l1_size: .*too large")


async def test_l1_beyond_eof(bad: Path) -> None:
    patch(bad, L1_OFFSET, ">Q", 1 << 40)
    await open_fails(bad, FormatError,
                     r"bad\.qcow2: field l1_table_offset: .*lies outside the file")


async def test_l1_cut_off_by_truncation(bad: Path) -> None:
    l1 = read_field(bad, L1_OFFSET, ">Q")
    with open(bad, "r+b") as f:
        f.truncate(l1 + 4)
    await open_fails(bad, FormatError,
                     r"bad\.qcow2: field l1_table_offset: .*lies outside the file")


async def test_unaligned_l1(bad: Path) -> None:
    patch(bad, L1_OFFSET, ">Q", read_field(bad, L1_OFFSET, ">Q") + 512)
    await open_fails(bad, FormatError, r"bad\.qcow2: field l1_table_offset: .*not cluster aligned")


@pytest.mark.parametrize("length", [8, 103, 1 << 20, 0xFFFFFFFF])
async def test_absurd_header_length(bad: Path, length: int) -> None:
    patch(bad, HEADER_LENGTH, ">I", length)
    await open_fails(bad, FormatError, r"bad\.qcow2: field header_length: offset 0x64: ")


async def test_absurd_extension_length(bad: Path) -> None:
    header_length = read_field(bad, HEADER_LENGTH, ">I")
    assert read_field(bad, header_length, ">I") != 0  # QEMU writes extensions
    patch(bad, header_length + 4, ">I", 0xFFFFFFF0)
    await open_fails(bad, FormatError,
                     r"bad\.qcow2: field header extension length: .*overruns the header area")


async def test_absurd_snapshot_count(bad: Path) -> None:
    patch(bad, NB_SNAPSHOTS, ">I", 1 << 20)
    patch(bad, SNAPSHOTS_OFFSET, ">Q", CLUSTER)
    await open_fails(bad, FormatError, r"bad\.qcow2: field nb_snapshots: .*too many")
    patch(bad, NB_SNAPSHOTS, ">I", 65536)  # within QEMU's limit, but not within the file
    await open_fails(bad, FormatError, r"bad\.qcow2: field snapshots_offset: .*outside the file")


async def test_no_refcount_table(bad: Path) -> None:
    patch(bad, REFTABLE_CLUSTERS, ">I", 0)
    await open_fails(bad, FormatError, r"bad\.qcow2: field refcount_table_clusters: ")


async def test_refcount_order_too_large(bad: Path) -> None:
    patch(bad, REFCOUNT_ORDER, ">I", 7)
    await open_fails(bad, FormatError, r"bad\.qcow2: field refcount_order: .*too large")


# -- refused features ----------------------------------------------------------------------------


async def test_unknown_incompatible_bit(bad: Path) -> None:
    patch(bad, INCOMPATIBLE, ">Q", 1 << 7 | 1 << 40)
    await open_fails(bad, UnsupportedError,
                     r"bad\.qcow2: field incompatible_features: offset 0x48: "
                     r"unknown incompatible feature bit 7, bit 40")


async def test_unknown_incompatible_bit_named_by_feature_table(bad: Path) -> None:
    data = bad.read_bytes()
    table = data.index(struct.pack(">I", 0x6803F857))
    entry = table + 8  # first entry: incompatible bit 0, "dirty bit"
    assert data[entry : entry + 2] == b"\0\0"
    patch(bad, entry + 1, ">B", 9)
    patch(bad, entry + 2, ">9s", b"frobnicat")  # type: ignore[arg-type]
    patch(bad, INCOMPATIBLE, ">Q", 1 << 9)
    await open_fails(bad, UnsupportedError, r"bad\.qcow2: .*bit 9 \(frobnicat")


def _feature_table(path: Path) -> int:
    return path.read_bytes().index(struct.pack(">I", 0x6803F857))


async def test_feature_table_of_partial_entries(bad: Path) -> None:
    table = _feature_table(bad)
    length = read_field(bad, table + 4, ">I")
    patch(bad, table + 4, ">I", length - 8)
    await open_fails(bad, FormatError,
                     r"bad\.qcow2: field feature name table: .*not a whole number of 48-byte")


@pytest.mark.parametrize("name", [b"\x1b[31mred", b"caf\xc3\xa9", b"a\0b"],
                         ids=["escape", "utf-8", "nul-inside"])
async def test_feature_name_not_printable_ascii(bad: Path, name: bytes) -> None:
    """Feature names reach the terminal inside error messages: printable ASCII only."""
    patch(bad, _feature_table(bad) + 8 + 2, f">{len(name)}s", name)  # type: ignore[arg-type]
    await open_fails(bad, FormatError, r"bad\.qcow2: field feature name table: .*name b'")


async def _backing_format_named(tmp_path: Path, name: bytes) -> Path:
    create(tmp_path / "base.raw", 1 * MiB, "raw")
    top = create(tmp_path / "top.qcow2", 1 * MiB, backing="base.raw", backing_fmt="raw")
    at = top.read_bytes().index(struct.pack(">I", 0xE2792ACA))
    patch(top, at + 4, ">I", len(name))
    patch(top, at + 8, f">{len(name)}s", name)  # type: ignore[arg-type]
    return top


@pytest.mark.parametrize(("name", "problem"), [
    (b"", "is empty"), (b"\0\0\0", "is empty"), (b"r\xffw", "not printable ASCII"),
    (b"ra\0w", "NUL byte inside"),
])
async def test_backing_format_name_not_a_name(tmp_path: Path, name: bytes,
                                              problem: str) -> None:
    top = await _backing_format_named(tmp_path, name)
    await open_fails(top, FormatError,
                     rf"top\.qcow2: field backing format extension: .*{problem}")


async def test_backing_format_of_length_one(tmp_path: Path) -> None:
    """The issue's case: a backing-format extension of length 1 read as "r", reported as
    `unknown format 'r'`, naming neither the image nor the field."""
    top = await _backing_format_named(tmp_path, b"r")
    await open_fails(top, UnsupportedError,
                     r"top\.qcow2: field backing format extension: backing file 'base\.raw': "
                     r"unknown format 'r'")


async def test_backing_format_padded_with_nul_is_read_as_qemu_does(tmp_path: Path) -> None:
    top = await _backing_format_named(tmp_path, b"raw\0\0")
    node = await open_image(str(top))
    await node.aclose()


async def test_corrupt_bit(bad: Path) -> None:
    patch(bad, INCOMPATIBLE, ">Q", 1 << 1)
    await open_fails(bad, UnsupportedError,
                     r"bad\.qcow2: field incompatible_features: .*marked corrupt")


@pytest.mark.parametrize(("method", "name"), [(1, "AES"), (2, "LUKS"), (9, "unknown")])
async def test_encryption(bad: Path, method: int, name: str) -> None:
    patch(bad, CRYPT_METHOD, ">I", method)
    await open_fails(bad, UnsupportedError,
                     rf"bad\.qcow2: field crypt_method: offset 0x20: encrypted .*{name}")


async def test_compression_type_without_its_bit(bad: Path) -> None:
    patch(bad, INCOMPATIBLE, ">Q", 1 << 3)  # compression bit, but the type byte says zlib
    await open_fails(bad, FormatError, r"bad\.qcow2: field compression_type: .*does not match")


async def test_data_file_bit_without_a_name(bad: Path) -> None:
    patch(bad, INCOMPATIBLE, ">Q", 1 << 2)
    await open_fails(bad, FormatError, r"bad\.qcow2: field data file extension: .*does not name")


async def test_data_file_raw_without_a_data_file(bad: Path) -> None:
    patch(bad, AUTOCLEAR, ">Q", 1 << 1)
    await open_fails(bad, FormatError, r"bad\.qcow2: field autoclear_features: .*no external")


# -- backing files -------------------------------------------------------------------------------


async def test_backing_name_too_long(tmp_path: Path) -> None:
    create(tmp_path / "base.qcow2", 1 * MiB)
    top = create(tmp_path / "top.qcow2", 1 * MiB, backing="base.qcow2", backing_fmt="qcow2")
    patch(top, BACKING_SIZE, ">I", 2000)
    await open_fails(top, FormatError, r"top\.qcow2: field backing_file_size: .*too long")
    patch(top, BACKING_SIZE, ">I", 10)
    patch(top, BACKING_OFFSET, ">Q", 1 << 40)
    await open_fails(top, FormatError, r"top\.qcow2: field backing_file_offset: ")


async def test_backing_format_name_too_long(tmp_path: Path) -> None:
    create(tmp_path / "base.qcow2", 1 * MiB)
    top = create(tmp_path / "top.qcow2", 1 * MiB, backing="base.qcow2", backing_fmt="qcow2")
    at = top.read_bytes().index(struct.pack(">I", 0xE2792ACA))
    patch(top, at + 4, ">I", 16)
    await open_fails(top, FormatError, r"top\.qcow2: field backing format extension: .*too long")


async def test_missing_backing_file(tmp_path: Path) -> None:
    base = create(tmp_path / "base.qcow2", 1 * MiB)
    top = create(tmp_path / "top.qcow2", 1 * MiB, backing="base.qcow2", backing_fmt="qcow2")
    base.unlink()
    await open_fails(top, FormatError,
                     r"top\.qcow2: field backing_file: backing file 'base\.qcow2' not found")


async def test_backing_loop(tmp_path: Path) -> None:
    a = create(tmp_path / "a.qcow2", 1 * MiB)
    create(tmp_path / "b.qcow2", 1 * MiB, backing="a.qcow2", backing_fmt="qcow2")
    qemu_img("rebase", "-u", "-b", "b.qcow2", "-F", "qcow2", a)
    await open_fails(a, ChainError, r"b\.qcow2: field backing_file: backing chain loops")


async def test_backing_self_loop(tmp_path: Path) -> None:
    a = create(tmp_path / "a.qcow2", 1 * MiB)
    qemu_img("rebase", "-u", "-b", "a.qcow2", "-F", "qcow2", a)
    await open_fails(a, ChainError, r"a\.qcow2: field backing_file: backing chain loops")


async def test_chain_too_deep(tmp_path: Path) -> None:
    below = create(tmp_path / "0.qcow2", 1 * MiB)
    for depth in range(1, 6):
        below = create(tmp_path / f"{depth}.qcow2", 1 * MiB, backing=below.name,
                       backing_fmt="qcow2")
    await open_fails(below, ChainError, r"field backing_file: backing chain deeper than 3",
                     max_chain_depth=3)
    node = await open_image(str(below), OpenOptions(max_chain_depth=6))
    await node.aclose()


async def test_missing_data_file(tmp_path: Path) -> None:
    image = tmp_path / "disk.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", f"data_file={tmp_path / 'disk.data'}", image,
             "1M")
    (tmp_path / "disk.data").unlink()
    await open_fails(image, FormatError,
                     r"disk\.qcow2: field data_file: data-file file .*not found")


# -- tables reached by reads ---------------------------------------------------------------------


async def test_l2_entry_outside_the_file(bad: Path) -> None:
    patch(bad, l2_table_offset(bad), ">Q", OFLAG_COPIED | 1 << 40)
    await read_fails(bad, 0, FormatError,
                     r"bad\.qcow2: field L2 entry: offset 0x10000000000: data cluster .*past "
                     r"the end of the file")


async def test_l2_entry_unaligned(bad: Path) -> None:
    l2 = l2_table_offset(bad)
    patch(bad, l2, ">Q", read_field(bad, l2, ">Q") + 512)
    await read_fails(bad, 0, FormatError, r"bad\.qcow2: field L2 entry: .*not cluster aligned")


async def test_l2_table_outside_the_file(bad: Path) -> None:
    patch(bad, read_field(bad, L1_OFFSET, ">Q"), ">Q", OFLAG_COPIED | 1 << 40)
    node = await open_image(str(bad))
    try:
        with pytest.raises(FormatError, match=r"bad\.qcow2: field L2 table: .*outside the file"):
            await node.pread(0, 4096)
        with pytest.raises(FormatError, match=r"field L2 table"):
            await node.block_status(0, 4096)
    finally:
        await node.aclose()


async def test_l2_table_unaligned(bad: Path) -> None:
    l1 = read_field(bad, L1_OFFSET, ">Q")
    patch(bad, l1, ">Q", read_field(bad, l1, ">Q") + 512)
    node = await open_image(str(bad))
    try:
        with pytest.raises(FormatError,
                           match=r"bad\.qcow2: field L1 entry 0: .*not cluster aligned"):
            await node.pread(0, 4096)
    finally:
        await node.aclose()


async def test_data_cut_off_by_truncation(bad: Path) -> None:
    # QEMU lays out header, refcount table and block, L1, L2, then data: cut the data.
    first_data = read_field(bad, l2_table_offset(bad), ">Q") & 0x00FFFFFFFFFFFE00
    with open(bad, "r+b") as f:
        f.truncate(first_data + 1000)
    node = await open_image(str(bad))
    try:
        assert len(await node.pread(0, 1000)) == 1000
        with pytest.raises(FormatError, match=r"bad\.qcow2: field L2 entry: .*past the end"):
            await node.pread(0, 4096)
    finally:
        await node.aclose()


async def test_compressed_cluster_garbage(bad: Path) -> None:
    entry = read_field(bad, l2_table_offset(bad) + 8 * 8, ">Q")
    assert entry & OFLAG_COMPRESSED
    host = entry & ((1 << 54) - 1)  # 64 KiB clusters: x = 62 - 8 = 54
    patch(bad, host, ">16s", b"\xff" * 16)  # type: ignore[arg-type]
    await read_fails(bad, 512 * KiB, FormatError,
                     r"bad\.qcow2: field compressed cluster: .*zlib")


async def test_compressed_cluster_outside_the_file(bad: Path) -> None:
    l2 = l2_table_offset(bad)
    patch(bad, l2 + 8 * 8, ">Q", OFLAG_COMPRESSED | 1 << 40)
    await read_fails(bad, 512 * KiB, FormatError,
                     r"bad\.qcow2: field L2 entry: .*compressed cluster at 0x10000000000 lies")


async def test_zero_flag_in_a_v2_image(tmp_path: Path) -> None:
    image = create(tmp_path / "v2.qcow2", 1 * MiB, compat="0.10")
    qemu_io(image, "write -q -P 1 0 64k")
    patch(image, l2_table_offset(image), ">Q", read_field(image, l2_table_offset(image), ">Q")
          | OFLAG_ZERO)
    node = await open_image(str(image))
    try:
        with pytest.raises(FormatError, match=r"v2\.qcow2: field L2 entry: zero cluster in a "
                                              r"version 2 image \(guest offset 0x0\)"):
            await node.pread(0, 512)
    finally:
        await node.aclose()


async def test_extended_l2_invalid_bitmap(tmp_path: Path) -> None:
    image = create(tmp_path / "ext.qcow2", 1 * MiB, extended_l2=True)
    qemu_io(image, "write -q -P 1 0 4k")
    patch(image, l2_table_offset(image) + 8, ">Q", 0x00000003_00000003)
    node = await open_image(str(image))
    try:
        with pytest.raises(FormatError, match=r"ext\.qcow2: field L2 entry: subclusters both"):
            await node.pread(0, 512)
    finally:
        await node.aclose()


async def test_data_file_offset_must_match_guest_offset(tmp_path: Path) -> None:
    image = tmp_path / "disk.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", f"data_file={tmp_path / 'disk.data'}", image,
             "1M")
    qemu_io(image, "write -q -P 1 0 128k")
    patch(image, l2_table_offset(image) + 8, ">Q", OFLAG_COPIED | 5 * CLUSTER)
    node = await open_image(str(image))
    try:
        assert await node.pread(0, 512) == b"\1" * 512
        with pytest.raises(FormatError, match=r"disk\.qcow2: field L2 entry: external data file "
                                              r"cluster offset 0x50000 differs"):
            await node.pread(CLUSTER, 512)
    finally:
        await node.aclose()


# -- the snapshot table --------------------------------------------------------------------------


@pytest.fixture
def with_snapshot(tmp_path: Path) -> Path:
    image = create(tmp_path / "snap.qcow2", 1 * MiB)
    qemu_io(image, "write -q -P 1 0 64k")
    qemu_img("snapshot", "-c", "one", image)
    return image


async def test_snapshot_extra_data_too_large(with_snapshot: Path) -> None:
    table = read_field(with_snapshot, SNAPSHOTS_OFFSET, ">Q")
    patch(with_snapshot, table + 36, ">I", 4096)
    await open_fails(with_snapshot, FormatError,
                     r"snap\.qcow2: field snapshot extra_data_size: .*extra data")


async def test_snapshot_table_past_the_end_of_the_file(with_snapshot: Path) -> None:
    table = read_field(with_snapshot, SNAPSHOTS_OFFSET, ">Q")
    if table < read_field(with_snapshot, L1_OFFSET, ">Q"):
        pytest.skip("QEMU placed the snapshot table before the active L1 table")
    with open(with_snapshot, "r+b") as f:
        f.truncate(table + 200)
    patch(with_snapshot, table + 12, ">HH", 0xFFFF, 0xFFFF)
    await open_fails(with_snapshot, FormatError,
                     r"snap\.qcow2: field snapshot table: .*runs past the end of the file")


def test_snapshot_parser_asks_for_more_and_stops_at_the_limit(
        monkeypatch: pytest.MonkeyPatch) -> None:
    entry = struct.pack(">QIHHIIQII", 0x30000, 16, 1, 3, 7, 8, 9, 0, 0) + b"1abc"
    with pytest.raises(NeedMoreData) as more:
        parse_snapshot_table(entry[:30], 1, 0x50000, "x.qcow2")
    assert more.value.needed == 40
    with pytest.raises(NeedMoreData) as more:
        parse_snapshot_table(entry + bytes(4), 2, 0x50000, "x.qcow2")
    assert more.value.needed == 48 + 40
    (snapshot,) = parse_snapshot_table(entry, 1, 0x50000, "x.qcow2")
    assert (snapshot.id, snapshot.name, snapshot.icount) == ("1", "abc", None)
    # QEMU's limit is 64 MiB; shrink it rather than build such a table.
    monkeypatch.setattr(snapshots, "MAX_TABLE_SIZE", 300_000)
    huge = struct.pack(">QIHHIIQII", 0, 0, 0xFFFF, 0xFFFF, 0, 0, 0, 0, 1024).ljust(132136, b"x")
    with pytest.raises(FormatError, match=r"x\.qcow2: field snapshot table: .*larger than"):
        parse_snapshot_table(huge * 3, 3, 0, "x.qcow2")


# -- random damage ---------------------------------------------------------------------------------


def _table_regions(path: Path) -> list[tuple[int, int]]:
    """Byte ranges worth damaging: the header, the L1 table, every L2 table, compressed data."""
    data = path.read_bytes()
    l1, l1_size = read_field(path, L1_OFFSET, ">Q"), read_field(path, L1_SIZE, ">I")
    regions = [(0, 512), (l1, l1 + 8 * l1_size)]
    for index in range(l1_size):
        l2 = l2_table_offset(path, index)
        if not l2:
            continue
        regions.append((l2, l2 + CLUSTER))
        for at in range(l2, l2 + CLUSTER, 8):
            entry = struct.unpack_from(">Q", data, at)[0]
            if entry & OFLAG_COMPRESSED:
                host = entry & ((1 << 54) - 1)
                regions.append((host, min(host + 256, len(data))))
    return regions


async def test_random_damage_fails_cleanly(pristine: Path, tmp_path: Path) -> None:
    """Seeded byte damage in the header and tables: every outcome is data or a VdiskError,
    within a time limit."""
    original = pristine.read_bytes()
    regions = _table_regions(pristine)
    rng = random.Random(20240601)
    damaged = tmp_path / "damaged.qcow2"
    for _ in range(300):
        data = bytearray(original)
        for _ in range(rng.choice((1, 2, 4, 8))):
            start, end = rng.choice(regions)
            data[rng.randrange(start, end)] = rng.choice((0, 0xFF, 0x80, rng.randrange(256)))
        damaged.write_bytes(data)
        with trio.fail_after(5):
            try:
                node = await open_image(str(damaged), OpenOptions(format="qcow2"))
            except VdiskError:
                continue
            try:
                for offset in range(0, node.size, 192 * KiB):
                    with contextlib.suppress(VdiskError):
                        await node.pread(offset, min(200 * KiB, node.size - offset))
                with contextlib.suppress(VdiskError):
                    offset = 0
                    while offset < node.size:
                        _status, run = await node.block_status(offset, node.size - offset)
                        offset += run
                node.info()
            finally:
                await node.aclose()
