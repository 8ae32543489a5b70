"""Damaged and hostile VMDK images: every one fails with a VdiskError naming file and field.

No crash, no hang, no allocation sized by a hostile field, no silently wrong byte.
"""

from __future__ import annotations

import shutil
import struct
import zlib
from pathlib import Path

import pytest

from tests.support.hostile import assert_refused, read_everything
from tests.support.images import qemu_img, random_bytes
from tests.support.vmdk_images import (
    GD_AT_END,
    HEADER,
    build_stream_optimized,
    make_vmdk,
    patch_header,
    write_descriptor,
)
from vdiskfs.block.context import open_image
from vdiskfs.drivers.format.vmdk.descriptor import MAX_EXTENTS
from vdiskfs.errors import ChainError, FormatError, UnsupportedError, VdiskError

MiB = 1 << 20


@pytest.fixture(scope="module")
def sparse_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("vmdk-hostile") / "template.vmdk"
    return make_vmdk(path, 2 * MiB, io=("write -P 0x42 0 128k",))


@pytest.fixture
def sparse(tmp_path: Path, sparse_template: Path) -> Path:
    path = tmp_path / "disk.vmdk"
    shutil.copy(sparse_template, path)
    return path


def _header(path: Path) -> dict[str, int]:
    fields = HEADER.unpack(path.read_bytes()[: HEADER.size])
    return {"gd_offset": fields[9], "grain_offset": fields[10]}


# -- sparse header ------------------------------------------------------------------------------


async def test_bad_magic_is_not_vmdk(sparse: Path) -> None:
    with open(sparse, "r+b") as f:
        f.write(b"KDMX")
    node = await open_image(str(sparse))
    try:
        assert node.driver == "raw"  # not probed as vmdk any more
    finally:
        await node.aclose()
    await assert_refused(sparse, FormatError, "not a VMDK image", field="magic", format="vmdk")


async def test_cowd_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "old.vmdk"
    path.write_bytes(b"COWD" + bytes(2044))
    await assert_refused(path, UnsupportedError, "COWD", field="magic")


@pytest.mark.parametrize(
    ("fields", "error", "match", "field"),
    [
        ({"version": 4}, UnsupportedError, "version 4", "version"),
        ({"compression": 7}, UnsupportedError, "compression algorithm 7", "compressAlgorithm"),
        ({"gtes_per_gt": 0}, FormatError, "0 entries per grain table", "numGTEsPerGT"),
        ({"gtes_per_gt": 513}, FormatError, "513 entries", "numGTEsPerGT"),
        ({"gtes_per_gt": 0xFFFFFFFF}, FormatError, "entries per grain table", "numGTEsPerGT"),
        ({"grain_sectors": 0}, FormatError, "grain size of 0", "grainSize"),
        ({"grain_sectors": 1 << 40}, FormatError, "grain size", "grainSize"),
        ({"capacity": 1 << 62}, FormatError, "grain tables", "capacity"),
        ({"gd_offset": 1 << 50}, FormatError, "grain directory", "gdOffset"),
        ({"grain_offset": 1 << 40}, FormatError, "truncated", "overHead"),
        ({"desc_size": 1 << 40}, FormatError, "larger than", "descriptorSize"),
        ({"desc_offset": 1 << 40}, FormatError, "outside the file", "descriptor"),
    ],
)
async def test_header_fields_are_bounded(sparse: Path, fields: dict[str, int],
                                         error: type[VdiskError], match: str,
                                         field: str) -> None:
    patch_header(sparse, **fields)
    await assert_refused(sparse, error, match, field=field)


async def test_compressed_grain_size_is_bounded(sparse: Path) -> None:
    patch_header(sparse, compression=1, grain_sectors=0x100000)
    await assert_refused(sparse, UnsupportedError, "compressed grains", field="grainSize")


async def test_file_too_small(tmp_path: Path) -> None:
    path = tmp_path / "tiny.vmdk"
    path.write_bytes(b"KDMV" + bytes(100))
    await assert_refused(path, FormatError, "too small", field="header")
    path.write_bytes(b"KD")
    await assert_refused(path, FormatError, "too small", format="vmdk")


# -- grain directory and tables ---------------------------------------------------------------


async def test_grain_directory_entry_outside_file(sparse: Path) -> None:
    gd = _header(sparse)["gd_offset"] * 512
    with open(sparse, "r+b") as f:
        f.seek(gd)
        f.write(struct.pack("<I", 0x7FFFFFFF))
    exc = await assert_refused(sparse, FormatError, "lies outside the file",
                         field="grain directory entry")
    assert exc.offset == gd


async def test_grain_table_entry_outside_file(sparse: Path) -> None:
    gd = _header(sparse)["gd_offset"] * 512
    data = sparse.read_bytes()
    (gt_sector,) = struct.unpack_from("<I", data, gd)
    with open(sparse, "r+b") as f:
        f.seek(gt_sector * 512 + 4)  # grain 1 (64k..128k), which holds data
        f.write(struct.pack("<I", 0xFFFFFF00))
    exc = await assert_refused(sparse, FormatError, "grain table entry 1 .* points outside",
                         field="grain table entry")
    assert exc.offset == gt_sector * 512 + 4


# -- stream-optimized ---------------------------------------------------------------------------


@pytest.fixture
def stream(tmp_path: Path) -> Path:
    return build_stream_optimized(tmp_path / "s.vmdk", random_bytes(5, 256 * 1024))


def _first_grain_marker(path: Path) -> int:
    """File offset of the first grain's marker (grains follow the header and descriptor)."""
    fields = HEADER.unpack(path.read_bytes()[: HEADER.size])
    return fields[10] * 512


async def test_stream_footer_damaged(stream: Path) -> None:
    with open(stream, "r+b") as f:
        f.seek(-512, 2)
        f.write(b"\x01" * 16)  # the end-of-stream marker
    await assert_refused(stream, FormatError, "invalid stream-optimized footer", field="footer")


async def test_stream_footer_still_gd_at_end(stream: Path) -> None:
    size = stream.stat().st_size
    patch_header(stream, offset=size - 1024, gd_offset=GD_AT_END)
    await assert_refused(stream, FormatError, "GD_AT_END", field="gdOffset")


@pytest.mark.parametrize("claimed", [0, 0x7FFFFFFF])
async def test_grain_marker_size_is_bounded(stream: Path, claimed: int) -> None:
    with open(stream, "r+b") as f:
        f.seek(_first_grain_marker(stream) + 8)
        f.write(struct.pack("<I", claimed))
    await assert_refused(stream, FormatError, "compressed bytes", field="grain marker")


async def test_corrupt_deflate(stream: Path) -> None:
    with open(stream, "r+b") as f:
        f.seek(_first_grain_marker(stream) + 12)
        f.write(b"\xff" * 64)
    await assert_refused(stream, FormatError, "does not inflate", field="grain")


async def test_deflate_bomb_stops_at_one_grain(stream: Path) -> None:
    """A grain that inflates to 16 MiB is refused after inflating one grain's worth."""
    bomb = zlib.compress(bytes(16 * MiB), 9)
    marker = _first_grain_marker(stream)
    data = bytearray(stream.read_bytes())
    # Put the bomb at the end, before the footer, and point the marker's size at it.
    tail = data[-1536:]
    bomb_at = len(data) - 1536
    data[bomb_at:] = struct.pack("<QI", 0, len(bomb)) + bomb
    data += bytes(-len(data) % 512) + tail
    struct.pack_into("<QI", data, marker, 0, 0)  # old marker unused now
    stream.write_bytes(bytes(data))
    # Retarget the first grain table entry at the bomb.
    size = stream.stat().st_size
    footer = HEADER.unpack(stream.read_bytes()[size - 1024 : size - 1024 + HEADER.size])
    gd = footer[9] * 512
    (gt,) = struct.unpack_from("<I", stream.read_bytes(), gd)
    with open(stream, "r+b") as f:
        f.seek(gt * 512)
        f.write(struct.pack("<I", bomb_at // 512))
    # A 16 MiB bomb is ~16 KiB compressed: within 2 grains, so the marker check passes.
    await assert_refused(stream, FormatError, "inflates to more than 65536", field="grain")


async def test_short_grain_is_an_error(tmp_path: Path) -> None:
    """A compressed grain that inflates to fewer bytes than the guest range needs."""
    path = build_stream_optimized(tmp_path / "s.vmdk", random_bytes(6, 128 * 1024))
    marker = _first_grain_marker(path)
    short = zlib.compress(b"\x01" * 1000)
    with open(path, "r+b") as f:
        f.seek(marker + 8)
        f.write(struct.pack("<I", len(short)) + short)
    await assert_refused(path, FormatError, "inflates to 1000 bytes", field="grain")


# -- descriptors ----------------------------------------------------------------------------------


async def test_missing_extent_is_named(tmp_path: Path) -> None:
    write_descriptor(tmp_path / "d.vmdk", create_type="monolithicFlat",
                     extents=['RW 2048 FLAT "gone-flat.vmdk" 0'])
    exc = await assert_refused(tmp_path / "d.vmdk", FormatError, "gone-flat.vmdk.*not found")
    assert exc.field is not None and exc.field.startswith("extent 1")


@pytest.mark.parametrize(
    ("extents", "error", "match"),
    [
        (['RW 2048 FLAT "f.bin"'], FormatError, "FLAT extent without an offset"),
        (['RW 2048 SPARSE "f.bin" 3'], FormatError, "only FLAT extents take an offset"),
        (['RW -5 FLAT "f.bin" 0'], FormatError, "must be positive"),
        (['RW lots FLAT "f.bin" 0'], FormatError, "not a number"),
        # int() would take these; QEMU's sscanf does not.
        (['RW 2_048 FLAT "f.bin" 0'], FormatError, "not a number"),
        (['RW \u0662\u0660\u0664\u0668 FLAT "f.bin" 0'], FormatError, "not a number"),
        (['RW 8 FLAT "f.bin" \uff10'], FormatError, "offset is not a number"),
        (['RW 8 FLAT "f.bin" -1'], FormatError, "invalid extent line|negative"),
        (['RW 8 FLAT f.bin 0'], FormatError, "invalid extent line"),
        (['RW 8 WEIRD "f.bin"'], UnsupportedError, "unknown extent type"),
        (['RW 8 SESPARSE "f.bin"'], UnsupportedError, "seSparse"),
        (['RW 8 VMFSRDM "f.bin"'], UnsupportedError, "raw device"),
        (['NOACCESS 8 FLAT "f.bin" 0'], UnsupportedError, "NOACCESS"),
        (['RW 8 ZERO "f.bin"'], FormatError, "ZERO extent has no file"),
        (['RW 4096 FLAT "f.bin" 0'], FormatError, "runs past the end"),
        (['RW 8 FLAT "f.bin" 8'], FormatError, "runs past the end"),
        (['RW 8 SPARSE "f.bin"'], FormatError, "bad magic"),
        ([], FormatError, "lists no extent"),
    ],
)
async def test_bad_extent_lines(tmp_path: Path, extents: list[str], error: type[VdiskError],
                                match: str) -> None:
    (tmp_path / "f.bin").write_bytes(random_bytes(1, 4096))
    write_descriptor(tmp_path / "d.vmdk", create_type="monolithicFlat", extents=extents)
    exc = await assert_refused(tmp_path / "d.vmdk", error, match, where=None if "magic" not in match
                         else tmp_path / "f.bin")
    assert exc.field is not None


async def test_create_type_missing_or_unknown(tmp_path: Path) -> None:
    (tmp_path / "d.vmdk").write_text('version=1\nCID=1\nRW 8 ZERO\n')
    await assert_refused(tmp_path / "d.vmdk", FormatError, "no createType", field="createType")
    write_descriptor(tmp_path / "d.vmdk", create_type="fancyNewType", extents=["RW 8 ZERO"])
    await assert_refused(tmp_path / "d.vmdk", UnsupportedError, "fancyNewType", field="createType")


@pytest.mark.parametrize("cid", ["xyz", "1_2", " 12", "\u0661"])
async def test_bad_cid(tmp_path: Path, cid: str) -> None:
    (tmp_path / "d.vmdk").write_text(f'version=1\nCID="{cid}"\ncreateType="monolithicFlat"\n')
    await assert_refused(tmp_path / "d.vmdk", FormatError, "not a hexadecimal", field="CID")


async def test_descriptor_bytes_that_are_not_utf8(tmp_path: Path) -> None:
    """Invalid UTF-8 in a descriptor is a file name like any other (as the file system takes
    bytes), reported by name, never a UnicodeDecodeError."""
    text = b'version=1\nCID=1\ncreateType="monolithicFlat"\nRW 8 FLAT "\xff\xfe.bin" 0\n'
    (tmp_path / "d.vmdk").write_bytes(text)
    exc = await assert_refused(tmp_path / "d.vmdk", FormatError, "not found",
                               field="extent 1 (line 4)")
    assert "\\udcff" in str(exc)


async def test_too_many_extents(tmp_path: Path) -> None:
    write_descriptor(tmp_path / "d.vmdk", create_type="monolithicFlat",
                     extents=["RW 1 ZERO"] * (MAX_EXTENTS + 1))
    await assert_refused(tmp_path / "d.vmdk", FormatError, f"more than {MAX_EXTENTS} extents",
                   field="extent")


async def test_descriptor_size_is_bounded(tmp_path: Path) -> None:
    write_descriptor(tmp_path / "d.vmdk", create_type="monolithicFlat", extents=["RW 1 ZERO"],
                     extra="#" * (1 << 20))
    await assert_refused(tmp_path / "d.vmdk", FormatError, "larger than", field="descriptor")


async def test_binary_file_forced_as_vmdk(tmp_path: Path) -> None:
    path = tmp_path / "noise.bin"
    path.write_bytes(random_bytes(9, 8192))
    await assert_refused(path, FormatError, "not a VMDK image", field="magic", format="vmdk")


# -- paths and parents ---------------------------------------------------------------------------


@pytest.fixture
def outside_layout(tmp_path: Path) -> Path:
    """``tmp/secret.bin`` and ``tmp/a/b/d.vmdk`` whose extent is ``../../secret.bin``."""
    (tmp_path / "secret.bin").write_bytes(b"s" * 4096)
    inner = tmp_path / "a" / "b"
    inner.mkdir(parents=True)
    write_descriptor(inner / "d.vmdk", create_type="monolithicFlat",
                     extents=['RW 8 FLAT "../../secret.bin" 0'])
    return inner / "d.vmdk"


async def test_extent_outside_followed_by_default(outside_layout: Path) -> None:
    node = await open_image(str(outside_layout))
    try:
        assert bytes(await node.pread(0, 4096)) == b"s" * 4096
    finally:
        await node.aclose()


async def test_extent_outside_refused_by_policy(outside_layout: Path) -> None:
    exc = await assert_refused(outside_layout, ChainError, "leads outside",
                         follow_outside=False)
    assert exc.field is not None and exc.field.startswith("extent 1")


async def test_parent_outside_refused_by_policy(tmp_path: Path) -> None:
    base = make_vmdk(tmp_path / "base.vmdk", MiB)
    inner = tmp_path / "x"
    inner.mkdir()
    qemu_img("create", "-q", "-f", "vmdk", "-b", "../base.vmdk", "-F", "vmdk",
             inner / "child.vmdk")
    assert base.exists()
    await read_everything(inner / "child.vmdk")  # followed by default, as QEMU does
    await assert_refused(inner / "child.vmdk", ChainError, "leads outside",
                   field="parentFileNameHint", follow_outside=False)


async def test_parent_loop(tmp_path: Path) -> None:
    a = make_vmdk(tmp_path / "a.vmdk", MiB)
    b = tmp_path / "b.vmdk"
    qemu_img("create", "-q", "-f", "vmdk", "-b", "a.vmdk", "-F", "vmdk", b)
    # Make a's parent b: a -> b -> a. The descriptor is embedded at sector 1 of a.
    data = bytearray(a.read_bytes())
    end = data.index(b"\0", 512)  # the text ends where its sectors' NUL padding starts
    hint = b'parentFileNameHint="b.vmdk"\n'
    data[end : end + len(hint)] = hint
    a.write_bytes(bytes(data))
    await assert_refused(b, ChainError, "loops", field="parentFileNameHint", where=a)


async def test_parent_is_itself(tmp_path: Path) -> None:
    (tmp_path / "f.bin").write_bytes(bytes(4096))
    write_descriptor(tmp_path / "d.vmdk", create_type="monolithicFlat",
                     extents=['RW 8 FLAT "f.bin" 0'], parent_hint="d.vmdk", parent_cid=0x1234)
    await assert_refused(tmp_path / "d.vmdk", ChainError, "loops", field="parentFileNameHint")


async def test_cid_mismatch_names_both(tmp_path: Path) -> None:
    (tmp_path / "f.bin").write_bytes(bytes(4096))
    write_descriptor(tmp_path / "base.vmdk", create_type="monolithicFlat",
                     extents=['RW 8 FLAT "f.bin" 0'], cid=0xAAAA0001)
    write_descriptor(tmp_path / "child.vmdk", create_type="monolithicFlat",
                     extents=['RW 8 FLAT "f.bin" 0'], parent_hint="base.vmdk",
                     parent_cid=0xBBBB0002)
    exc = await assert_refused(tmp_path / "child.vmdk", FormatError, "bbbb0002.*aaaa0001",
                         field="parentCID")
    assert "base.vmdk" in str(exc)


async def test_parent_changed_after_delta(tmp_path: Path) -> None:
    """Writing to a base after the delta was made changes its CID: QEMU and we refuse."""
    base = make_vmdk(tmp_path / "base.vmdk", MiB, io=("write -P 1 0 4k",))
    child = tmp_path / "child.vmdk"
    qemu_img("create", "-q", "-f", "vmdk", "-b", "base.vmdk", "-F", "vmdk", child)
    from tests.support.images import QEMU_IMG, qemu_io, run

    qemu_io(base, "write -P 2 0 4k", fmt="vmdk")
    assert run(QEMU_IMG, "convert", "-O", "raw", child, tmp_path / "out.raw",
               check=False).returncode != 0
    await assert_refused(child, FormatError, "does not match CID", field="parentCID")


async def test_total_size_is_bounded(tmp_path: Path) -> None:
    write_descriptor(tmp_path / "d.vmdk", create_type="monolithicFlat",
                     extents=[f"RW {1 << 54} ZERO", f"RW {1 << 54} ZERO"])
    await assert_refused(tmp_path / "d.vmdk", FormatError, "virtual size", field="capacity")
