"""Internal snapshots through the real mount: ``<stem>@<name>.raw``, their partitions and stats,
``--snapshots``/``--no-snapshots``, and ``--rw`` writes that never change what they show."""

from __future__ import annotations

import errno
import json
import os
import random
from pathlib import Path

import pytest

from tests.support.images import qemu_img, qemu_io, sha256_file
from tests.support.mount import loop_mounted, mounted, vdiskfs
from tests.support.partitioned import make_gpt_disk
from tests.support.snapshots import (
    NAMES,
    applied_reference,
    make_snapshot_image,
    rewrite_snapshot_table,
    snapshot_l1_tables,
)
from vdiskfs.block.format import SnapshotEntry
from vdiskfs.fs.tree import snapshot_file_names

MiB = 1 << 20


def _files(mnt: Path) -> list[str]:
    return sorted(p.name for p in mnt.iterdir() if p.is_file())


# -- names, without FUSE -------------------------------------------------------------------------


def test_safe_names_else_ids() -> None:
    snapshots = [
        SnapshotEntry("1", "before upgrade", 1), SnapshotEntry("2", "a/b", 1),
        SnapshotEntry("3", "nul\0", 1), SnapshotEntry("4", "..", 1), SnapshotEntry("5", ".", 1),
        SnapshotEntry("6", "", 1), SnapshotEntry("7", "x" * 10_000, 1),
        SnapshotEntry("8", "esc\x1b[2J", 1), SnapshotEntry("9", "dup", 1),
        SnapshotEntry("10", "dup", 1), SnapshotEntry("11", "other", 1),
        SnapshotEntry("12", "v1.0", 1), SnapshotEntry("13", "é", 1),
        SnapshotEntry("14", "12-part1", 1), SnapshotEntry("15", "part1", 1),
    ]
    assert snapshot_file_names("disk", snapshots, {"disk@other"}) == [
        "disk@before upgrade", "disk@2", "disk@3", "disk@4", "disk@5", "disk@6", "disk@7",
        "disk@8", "disk@9", "disk@10", "disk@11", "disk@v1.0", "disk@é", "disk@14",
        "disk@part1",
    ]


def test_hostile_ids_and_collisions_fall_back_to_positions() -> None:
    snapshots = [SnapshotEntry("../x", "a/b", 1), SnapshotEntry("2", "snapshot3", 1),
                 SnapshotEntry("2", "/", 1)]
    names = snapshot_file_names("d", snapshots)
    assert names == ["d@snapshot1", "d@snapshot3", "d@snapshot6"]
    assert len(set(names)) == len(names)


# -- through the mount ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("snapmount")
    image = make_snapshot_image(directory, "resized")
    for name in NAMES:
        applied_reference(image, name, directory / f"{name}.ref")
    return directory


def test_read_only_mount_shows_every_snapshot(image_dir: Path, tmp_path: Path) -> None:
    image = image_dir / "disk.qcow2"
    with mounted(image, mountpoint=tmp_path / "mnt") as mnt:
        assert _files(mnt) == ["disk.raw", "disk@first.raw", "disk@second.raw",
                               "disk@third.raw"]
        for name in NAMES:
            path = mnt / f"disk@{name}.raw"
            assert path.stat().st_mode & 0o777 == 0o444
            assert path.read_bytes() == (image_dir / f"{name}.ref").read_bytes()
            with pytest.raises(OSError) as caught:
                os.open(path, os.O_WRONLY)
            assert caught.value.errno in (errno.EROFS, errno.EACCES)
            stats = mnt / "stats" / f"disk@{name}"
            assert "0-qcow2" in os.listdir(stats)
            assert json.loads((stats / "0-qcow2").read_text())["size"] == path.stat().st_size
        assert (mnt / "disk@first.raw").stat().st_size == 4 * MiB
        assert (mnt / "disk.raw").stat().st_size == 6 * MiB


@pytest.mark.parametrize(("options", "shown"), [
    (("--no-snapshots",), False),
    (("--rw",), False),
    (("--rw", "--snapshots"), True),
])
def test_snapshots_flags(image_dir: Path, tmp_path: Path, options: tuple[str, ...],
                         shown: bool) -> None:
    image = Path(tmp_path / "disk.qcow2")
    image.write_bytes((image_dir / "disk.qcow2").read_bytes())
    with mounted(image, mountpoint=tmp_path / "mnt", options=options) as mnt:
        assert ("disk@first.raw" in _files(mnt)) is shown


def test_overlay_shows_the_images_snapshots_on_request(image_dir: Path, tmp_path: Path) -> None:
    image = image_dir / "disk.qcow2"
    before = sha256_file(image)
    overlay = tmp_path / "new.qcow2"
    with mounted(image, mountpoint=tmp_path / "mnt",
                 options=("--overlay", str(overlay), "--snapshots")) as mnt:
        assert (mnt / "disk@second.raw").read_bytes() == (image_dir / "second.ref").read_bytes()
        with open(mnt / "disk.raw", "r+b") as f:
            f.write(b"overlay")
        assert (mnt / "disk@first.raw").read_bytes() == (image_dir / "first.ref").read_bytes()
    assert sha256_file(image) == before


def test_rw_writes_never_change_a_snapshot(image_dir: Path, tmp_path: Path) -> None:
    image = Path(tmp_path / "disk.qcow2")
    image.write_bytes((image_dir / "disk.qcow2").read_bytes())
    listing = qemu_img("snapshot", "-l", image)
    expected = {name: sha256_file(image_dir / f"{name}.ref") for name in NAMES}
    rng = random.Random(7)
    with mounted(image, mountpoint=tmp_path / "mnt", options=("--rw", "--snapshots")) as mnt:
        snapshot_files = {name: mnt / f"disk@{name}.raw" for name in NAMES}
        # Snapshot files open (and their pages cached) while the current state is written.
        held = {name: open(path, "rb") for name, path in snapshot_files.items()}  # noqa: SIM115
        try:
            for f in held.values():
                f.read()
            with pytest.raises(OSError) as caught:
                os.open(snapshot_files["first"], os.O_RDWR)
            assert caught.value.errno in (errno.EROFS, errno.EACCES)
            fd = os.open(mnt / "disk.raw", os.O_RDWR)
            try:
                size = os.fstat(fd).st_size
                # Over every cluster the snapshots share, unaligned, then synced.
                for offset in range(0, size, 96 * 1024):
                    os.pwrite(fd, rng.randbytes(min(50_000, size - offset)), offset)
                os.fsync(fd)
            finally:
                os.close(fd)
            for name, f in held.items():
                f.seek(0)
                assert sha256_file(snapshot_files[name]) == expected[name], name
        finally:
            for f in held.values():
                f.close()
    qemu_img("check", image)
    assert qemu_img("snapshot", "-l", image) == listing
    for name in NAMES:
        out = applied_reference(image, name, tmp_path / f"{name}.after")
        assert sha256_file(out) == expected[name]


def test_partitions_of_a_snapshot_loop_mount(tmp_path: Path) -> None:
    disk = make_gpt_disk(tmp_path)
    image = tmp_path / "gpt.qcow2"
    qemu_img("convert", "-O", "qcow2", disk.path, image)
    qemu_img("snapshot", "-c", "installed", image)
    # The current state loses its partition table and file systems.
    qemu_io(image, "write -z 0 32M")
    with mounted(image, mountpoint=tmp_path / "mnt") as mnt:
        files = _files(mnt)
        assert "gpt-part1.raw" not in files
        assert {"gpt@installed-part1.raw", "gpt@installed-part2.raw",
                "gpt@installed-part3.raw"} <= set(files)
        assert (mnt / "stats" / "gpt@installed-part1").is_dir()
        with loop_mounted(mnt / "gpt@installed-part1.raw", tmp_path / "fs") as fs:
            for name, data in disk.contents[1].files.items():
                assert (fs / name).read_bytes() == data, name


def test_hostile_names_appear_by_id_and_info_maps_them(image_dir: Path, tmp_path: Path) -> None:
    image = Path(tmp_path / "disk.qcow2")
    image.write_bytes((image_dir / "disk.qcow2").read_bytes())

    # The real L1 tables under hostile names.
    tables = snapshot_l1_tables(image)
    rewrite_snapshot_table(image, [("1", "../../etc/passwd", *tables[0]),
                                   ("2", "nul\0x", *tables[1]),
                                   ("3", "y" * 10_000, *tables[2]),
                                   ("4", "fine", *tables[2]), ("5", "fine", *tables[1])])
    info = json.loads(vdiskfs("info", "--json", image).stdout)
    assert [s["mount-file"] for s in info["snapshots"]] == [
        "disk@1.raw", "disk@2.raw", "disk@3.raw", "disk@4.raw", "disk@5.raw"]
    text = vdiskfs("info", image).stdout
    assert "disk@3.raw" in text and "\0" not in text and len(text) < 5000
    with mounted(image, mountpoint=tmp_path / "mnt") as mnt:
        assert _files(mnt) == ["disk.raw", *(f"disk@{n}.raw" for n in "12345")]
        assert (mnt / "disk@4.raw").read_bytes() == (image_dir / "third.ref").read_bytes()
        # The rewritten entries record the current 6 MiB as their disk size.
        first = (image_dir / "first.ref").read_bytes()
        assert (mnt / "disk@1.raw").read_bytes() == first + bytes(2 * MiB)


def test_bad_snapshot_l1_fails_the_mount_clearly(image_dir: Path, tmp_path: Path) -> None:
    image = Path(tmp_path / "disk.qcow2")
    image.write_bytes((image_dir / "disk.qcow2").read_bytes())
    rewrite_snapshot_table(image, [("1", "first", 1 << 40, 1)])
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    proc = vdiskfs("mount", image, mnt, check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert str(image) in proc.stderr and "L1 table of snapshot '1'" in proc.stderr
    # Without the snapshots the image still mounts.
    with mounted(image, mountpoint=mnt, options=("--no-snapshots",)) as mounted_at:
        assert _files(mounted_at) == ["disk.raw"]
