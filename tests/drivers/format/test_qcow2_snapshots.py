"""qcow2 internal snapshots opened read-only (``OpenOptions.snapshot``, ``open_snapshot``),
against QEMU's own view of each snapshot, and hostile snapshot tables."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.support.conformance import check_block_node
from tests.support.images import create, qemu_img, qemu_io
from tests.support.snapshots import (
    KINDS,
    NAMES,
    applied_reference,
    make_snapshot_image,
    rewrite_snapshot_table,
    snapshot_l1_tables,
    snapshot_reference,
)
from vdiskfs.block.context import OpenOptions, open_image
from vdiskfs.drivers.format.qcow2 import Qcow2Node
from vdiskfs.errors import FormatError, UnsupportedError, VdiskError

MiB = 1 << 20


@pytest.fixture(scope="module", params=KINDS)
def snapshot_image(request: pytest.FixtureRequest,
                   tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    directory = tmp_path_factory.mktemp(f"snap-{request.param}")
    return request.param, make_snapshot_image(directory, request.param)


async def _read_all(path: Path, **options: object) -> bytes:
    node = await open_image(str(path), OpenOptions(**options))  # type: ignore[arg-type]
    try:
        return bytes(await node.pread(0, node.size))
    finally:
        await node.aclose()


async def test_each_snapshot_reads_as_qemu_shows_it(snapshot_image: tuple[str, Path],
                                                    tmp_path: Path) -> None:
    kind, image = snapshot_image
    seen = set()
    for name in NAMES:
        ours = await _read_all(image, snapshot=name)
        qemu = snapshot_reference(image, name, tmp_path / f"{name}.raw").read_bytes()
        applied = applied_reference(image, name, tmp_path / f"{name}.applied").read_bytes()
        # qemu-img convert -l keeps the image's current size; the snapshot's own is applied's.
        assert ours == applied
        common = min(len(ours), len(qemu))
        assert ours[:common] == qemu[:common]
        assert qemu[common:] == bytes(len(qemu) - common)
        seen.add(ours)
    assert len(seen) == len(NAMES)  # the three states differ: each snapshot has its own L1
    if kind == "resized":
        sizes = [len(await _read_all(image, snapshot=name)) for name in NAMES]
        assert sizes == [4 * MiB, 6 * MiB, 6 * MiB]


async def test_snapshot_passes_the_conformance_battery(snapshot_image: tuple[str, Path],
                                                       tmp_path: Path) -> None:
    _, image = snapshot_image
    reference = applied_reference(image, "second", tmp_path / "second.raw").read_bytes()
    await check_block_node(
        lambda: open_image(str(image), OpenOptions(snapshot="second")), reference)


async def test_id_or_name_ids_first(tmp_path: Path) -> None:
    image = make_snapshot_image(tmp_path, "v3")
    by_id = await _read_all(image, snapshot="2")
    assert by_id == await _read_all(image, snapshot="second")


async def test_views_beside_a_writable_image(tmp_path: Path) -> None:
    """Views of every snapshot stay open while the current state is written over the
    clusters they share: their bytes never change, and the image stays consistent."""
    image = make_snapshot_image(tmp_path, "v3")
    before = {name: applied_reference(image, name, tmp_path / f"{name}.raw").read_bytes()
              for name in NAMES}
    listing = qemu_img("snapshot", "-l", image)
    node = await open_image(str(image), OpenOptions(read_only=False))
    assert isinstance(node, Qcow2Node)
    views = [await node.open_snapshot(index) for index in range(len(NAMES))]
    try:
        assert [s.name for s in node.internal_snapshots()] == list(NAMES)
        for view, name in zip(views, NAMES, strict=True):
            assert view.read_only and await view.pread(0, view.size) == before[name]
        for offset in range(0, node.size, 192 * 1024):
            length = min(100_000, node.size - offset)
            await node.pwrite(offset, bytes([offset >> 16 & 0xFF]) * length)
        await node.zero(MiB, MiB)
        await node.discard(3 * MiB, 256 * 1024)
        await node.flush()
        for view, name in zip(views, NAMES, strict=True):
            assert await view.pread(0, view.size) == before[name]
    finally:
        for view in views:
            await view.aclose()
        await node.aclose()
    qemu_img("check", image)
    assert qemu_img("snapshot", "-l", image) == listing
    for name in NAMES:
        assert snapshot_reference(image, name, tmp_path / "again.raw").read_bytes() == before[name]


async def test_unknown_snapshot_lists_the_ones_there_are(tmp_path: Path) -> None:
    image = make_snapshot_image(tmp_path, "v3")
    with pytest.raises(FormatError, match=r"no internal snapshot .*'nope'.*'1' 'first'.*'3'"):
        await _read_all(image, snapshot="nope")
    plain = create(tmp_path / "plain.qcow2", "1M")
    with pytest.raises(FormatError, match="has none"):
        await _read_all(plain, snapshot="first")


async def test_snapshot_opens_read_only_and_only_where_the_format_has_them(
        tmp_path: Path) -> None:
    image = make_snapshot_image(tmp_path, "v3")
    with pytest.raises(UnsupportedError, match="read-only"):
        await _read_all(image, snapshot="first", read_only=False)
    raw = tmp_path / "disk.raw"
    raw.write_bytes(bytes(MiB))
    with pytest.raises(UnsupportedError, match="raw images have no internal snapshots"):
        await _read_all(raw, snapshot="first", format="raw")


async def test_backing_file_is_the_images(tmp_path: Path) -> None:
    base = create(tmp_path / "base.qcow2", "2M")
    qemu_io(base, "write -P 0x77 0 2M")
    top = create(tmp_path / "top.qcow2", "2M", backing="base.qcow2", backing_fmt="qcow2")
    qemu_io(top, "write -P 0x01 0 64k")
    qemu_img("snapshot", "-c", "s", top)
    qemu_io(top, "write -P 0x02 0 1M")
    data = await _read_all(top, snapshot="s")
    assert data == snapshot_reference(top, "s", tmp_path / "s.raw").read_bytes()
    assert data[64 * 1024:] == b"\x77" * (2 * MiB - 64 * 1024)


# -- hostile tables ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[tuple[int, int]]]:
    """A v3 image with three snapshots, and the (L1 offset, L1 size) of each."""
    image = make_snapshot_image(tmp_path_factory.mktemp("pristine"), "v3")
    return image, snapshot_l1_tables(image)


def _copy(pristine: tuple[Path, list[tuple[int, int]]], tmp_path: Path) -> Path:
    return Path(shutil.copy(pristine[0], tmp_path / "bad.qcow2"))


async def test_hostile_names_still_read_by_id(pristine: tuple[Path, list[tuple[int, int]]],
                                              tmp_path: Path) -> None:
    image = _copy(pristine, tmp_path)
    (l1a, sa), (l1b, sb), (l1c, sc) = pristine[1]
    hostile = ["../../etc/passwd", "nul\0inside", "x" * 10_000]
    rewrite_snapshot_table(image, [("1", hostile[0], l1a, sa), ("2", hostile[1], l1b, sb),
                                   ("3", hostile[2], l1c, sc), ("4", "dup", l1a, sa),
                                   ("5", "dup", l1b, sb)])
    expected = [applied_reference(pristine[0], name, tmp_path / f"{name}.raw").read_bytes()
                for name in NAMES]
    for ident, want in zip(("1", "2", "3", "4", "5"), [*expected, expected[0], expected[1]],
                           strict=True):
        assert await _read_all(image, snapshot=ident) == want
    assert await _read_all(image, snapshot=hostile[2]) == expected[2]
    # A duplicated name opens the first, as QEMU does.
    assert await _read_all(image, snapshot="dup") == expected[0]
    with pytest.raises(FormatError) as caught:
        await _read_all(image, snapshot="missing")
    message = str(caught.value)
    assert "\0" not in message and len(message) < 2000 and "'nul\\x00inside'" in message


@pytest.mark.parametrize(("change", "match"), [
    ("l1-outside", "L1 table of snapshot '1'.*outside the file"),
    ("l1-unaligned", "L1 table of snapshot '1'.*not cluster aligned"),
    ("l1-huge", "L1 table of snapshot '1'.*too large"),
])
async def test_snapshot_l1_pointing_outside_is_refused(
        pristine: tuple[Path, list[tuple[int, int]]], tmp_path: Path, change: str,
        match: str) -> None:
    image = _copy(pristine, tmp_path)
    l1, size = pristine[1][0]
    l1, size = {
        "l1-outside": (1 << 40, size),
        "l1-unaligned": (l1 + 512, size),
        "l1-huge": (l1, 1 << 30),
    }[change]
    rewrite_snapshot_table(image, [("1", "first", l1, size)])
    with pytest.raises(FormatError, match=match) as caught:
        await _read_all(image, snapshot="first")
    assert str(image) in str(caught.value)
    # The image itself still opens: only the snapshot is refused.
    assert len(await _read_all(image)) == 4 * MiB


async def test_snapshot_table_pointing_outside_is_refused(
        pristine: tuple[Path, list[tuple[int, int]]], tmp_path: Path) -> None:
    image = _copy(pristine, tmp_path)
    l1, size = pristine[1][0]
    rewrite_snapshot_table(image, [("1", "first", l1, size)], table_offset=1 << 40)
    with pytest.raises(VdiskError, match="snapshot") as caught:
        await _read_all(image, snapshot="first")
    assert str(image) in str(caught.value)
