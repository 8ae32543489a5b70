"""Holes, discard and write-zeroes through a real mount (issue 11).

``lseek(SEEK_DATA/SEEK_HOLE)`` answers from the block status of the whole chain, so that sparse
copies skip what reads as zeros; ``fallocate`` punches holes (``fstrim`` through a loop device
frees qcow2 clusters of an overlay) and zeroes ranges; all-zero writes allocate nothing.
These need pyfuse3 with the project's patch (``scripts/pyfuse3/``), which set-up builds.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.support.holes import (
    assert_agrees_with_qemu,
    assert_holes_read_zero,
    assert_same_sparse_files,
)
from tests.support.images import create, qemu_img, qemu_io, reference_raw, sha256_file
from tests.support.mount import loop_mounted, mounted
from tests.support.partitioned import make_ext4
from tests.support.qcow2_images import Qcow2Images

pytestmark = pytest.mark.mount

MiB = 1 << 20
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10
FALLOC_FL_COLLAPSE_RANGE = 0x08

_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong)


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    if _libc.fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def seek_ranges(path: Path) -> list[tuple[int, int]]:
    """The data ranges of a file as `cp --sparse` finds them."""
    out = []
    with open(path, "rb") as f:
        fd = f.fileno()
        offset = 0
        while True:
            try:
                start = os.lseek(fd, offset, os.SEEK_DATA)
            except OSError as exc:
                assert exc.errno == errno.ENXIO
                return out
            end = os.lseek(fd, start, os.SEEK_HOLE)
            out.append((start, end))
            offset = end


def allocated_clusters(image: Path) -> int:
    proc = subprocess.run(["qemu-img", "check", "--output=json", str(image)],
                          capture_output=True, text=True)
    report = json.loads(proc.stdout)
    assert proc.returncode == 0, report
    assert not report.get("corruptions") and not report.get("leaks"), report
    return int(report["allocated-clusters"])


def test_seek_data_and_hole_follow_the_chain(tmp_path: Path) -> None:
    base = create(tmp_path / "base.qcow2", 8 * MiB)
    qemu_io(base, "write -P 1 0 1M", "write -P 2 4M 64k")
    top = create(tmp_path / "top.qcow2", 16 * MiB, backing="base.qcow2", backing_fmt="qcow2")
    qemu_io(top, "write -P 3 6M 128k", "write -z 0 64k", "write -P 4 15M 4k")
    with mounted(top, mountpoint=tmp_path / "mnt", options=("--no-partitions",)) as mnt:
        exported = mnt / "top.raw"
        found = seek_ranges(exported)
        st = exported.stat()
        with open(exported, "rb") as f:
            with pytest.raises(OSError) as past_end:
                os.lseek(f.fileno(), 16 * MiB, os.SEEK_DATA)
            # The 4 KiB written at 15 MiB allocated a whole 64 KiB cluster: data to its end.
            assert os.lseek(f.fileno(), 15 * MiB + 4096, os.SEEK_HOLE) == 15 * MiB + 65536
            assert os.lseek(f.fileno(), 100, os.SEEK_SET) == 100
        stats = mnt / "stats" / "top" / "0-qcow2"
        assert json.loads(stats.read_text())["block_status_operations"] > 0
    assert past_end.value.errno == errno.ENXIO
    assert found == [(64 * 1024, MiB), (4 * MiB, 4 * MiB + 64 * 1024),
                     (6 * MiB, 6 * MiB + 128 * 1024), (15 * MiB, 15 * MiB + 65536)]
    assert_agrees_with_qemu(found, top)
    # st_blocks is what the image takes on the host (as QSD shows it): below the size, so
    # that cp/tar look for the holes.
    assert st.st_blocks * 512 == os.stat(top).st_blocks * 512 < st.st_size


def test_partition_files_translate_offsets(tmp_path: Path) -> None:
    disk = tmp_path / "disk.raw"
    with open(disk, "wb") as f:
        f.truncate(8 * MiB)
    subprocess.run(["sfdisk", "-q", str(disk)], input="label: gpt\nstart=2048, size=8192\n",
                   text=True, check=True, capture_output=True)
    image = tmp_path / "disk.qcow2"
    qemu_img("convert", "-f", "raw", "-O", "qcow2", disk, image)
    qemu_io(image, "write -P 9 1152k 64k")  # 128 KiB into partition 1
    with mounted(image, mountpoint=tmp_path / "mnt") as mnt:
        assert seek_ranges(mnt / "disk-part1.raw") == [(128 * 1024, 192 * 1024)]


def test_sparse_copy_equals_qemu_img_convert(tmp_path: Path) -> None:
    image = create(tmp_path / "big.qcow2", "20G")
    qemu_io(image, *(f"write -P {i + 1} {i * 2}G 1M" for i in range(10)))
    with mounted(image, mountpoint=tmp_path / "mnt", options=("--no-partitions",)) as mnt:
        copy = tmp_path / "copy.raw"
        subprocess.run(["cp", "--sparse=auto", str(mnt / "big.raw"), str(copy)], check=True)
        stats = json.loads((mnt / "stats" / "big" / "0-qcow2").read_text())
    # Only the data was read, not 20 GiB of zeros.
    assert stats["rd_bytes"] < 64 * MiB
    assert os.stat(copy).st_blocks * 512 < 64 * MiB
    reference = tmp_path / "ref.raw"
    qemu_img("convert", "-O", "raw", image, reference)
    assert_same_sparse_files(copy, reference)


def test_fallocate_punch_zero_and_refusals(tmp_path: Path) -> None:
    image = create(tmp_path / "disk.qcow2", 8 * MiB)
    qemu_io(image, "write -P 5 0 8M")
    before = allocated_clusters(image)
    with mounted(image, mountpoint=tmp_path / "mnt", options=("--rw", "--no-partitions")) as mnt:
        fd = os.open(mnt / "disk.raw", os.O_RDWR)
        try:
            fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, MiB, 2 * MiB)
            fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 3 * MiB + 100, 1000)
            fallocate(fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, 4 * MiB, MiB)
            # Past the end: cut with KEEP_SIZE, refused without (a disk does not grow).
            fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 8 * MiB - 4096, MiB)
            with pytest.raises(OSError) as grow:
                fallocate(fd, 0, 8 * MiB - 4096, MiB)
            assert grow.value.errno == errno.ENOSPC
            with pytest.raises(OSError) as collapse:
                fallocate(fd, FALLOC_FL_COLLAPSE_RANGE, 0, MiB)
            assert collapse.value.errno == errno.EOPNOTSUPP
            fallocate(fd, 0, 0, MiB)  # plain allocation inside the disk: nothing to do
            # All-zero writes allocate nothing and free what they cover. (The buffer's pages
            # are touched first: the kernel splits a write from never-touched pages into
            # sub-page FUSE writes, which could only zero parts of clusters.)
            zeros = bytearray(MiB)
            zeros[::4096] = bytes(MiB // 4096)
            os.pwrite(fd, zeros, 6 * MiB)
            data = os.pread(fd, 8 * MiB, 0)
        finally:
            os.close(fd)
        counters = json.loads((mnt / "stats" / "disk" / "0-qcow2").read_text())
        file_counters = json.loads((mnt / "stats" / "disk" / "1-file").read_text())
    expected = bytearray(b"\5" * (8 * MiB))
    for start, length in ((MiB, 2 * MiB), (3 * MiB + 100, 1000), (4 * MiB, MiB),
                          (8 * MiB - 4096, 4096), (6 * MiB, MiB)):
        expected[start:start + length] = bytes(length)
    assert data == bytes(expected)
    assert counters["zero_operations"] >= 5 and counters["wr_operations"] == 0
    assert file_counters["unmap_operations"] > 0  # freed clusters were punched in the file
    after = allocated_clusters(image)
    assert after <= before - (3 * MiB) // 65536  # punched and zero-written ranges freed
    assert reference_raw(image, tmp_path / "after.raw").read_bytes() == bytes(expected)


def test_read_only_mount_refuses(tmp_path: Path) -> None:
    image = create(tmp_path / "disk.qcow2", 4 * MiB)
    with mounted(image, mountpoint=tmp_path / "mnt", options=("--no-partitions",)) as mnt:
        with pytest.raises(OSError) as opened:
            os.open(mnt / "disk.raw", os.O_RDWR)
        assert opened.value.errno == errno.EROFS
        fd = os.open(mnt / "disk.raw", os.O_RDONLY)
        try:
            with pytest.raises(OSError) as punched:
                fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 0, 4096)
            assert punched.value.errno == errno.EBADF  # the kernel's answer for a read-only fd
        finally:
            os.close(fd)


def _ext4_disk(directory: Path) -> Path:
    """A 128 MiB GPT disk whose one partition (1 MiB in, 120 MiB) holds an empty ext4."""
    disk = directory / "base.raw"
    with open(disk, "wb") as f:
        f.truncate(128 * MiB)
    subprocess.run(["sfdisk", "-q", str(disk)], input="label: gpt\nstart=2048, size=245760\n",
                   text=True, check=True, capture_output=True)
    fs = make_ext4(directory / "fs.ext4", 120 * MiB, {"hello.txt": b"hello\n"}, "trim")
    with open(disk, "r+b") as out, open(fs, "rb") as src:
        out.seek(MiB)
        shutil.copyfileobj(src, out)
    fs.unlink()
    base = directory / "base.qcow2"
    qemu_img("convert", "-f", "raw", "-O", "qcow2", disk, base)
    disk.unlink()
    return base


def test_fstrim_through_an_overlay_frees_clusters(tmp_path: Path) -> None:
    """The acceptance recipe: ext4 loop-mounted from a partition file of an --overlay mount;
    after deleting a 50 MiB file, fstrim frees >= 45 MiB of the overlay's clusters."""
    base = _ext4_disk(tmp_path)
    digest = sha256_file(base)
    overlay = tmp_path / "overlay.qcow2"
    with mounted(base, mountpoint=tmp_path / "mnt", options=("--overlay", str(overlay))) as mnt:
        with loop_mounted(mnt / "base-part1.raw", tmp_path / "fs", read_only=False) as fs:
            (fs / "big.bin").write_bytes(os.urandom(50 * MiB))
            os.sync()
            full = os.stat(overlay).st_blocks * 512
            (fs / "big.bin").unlink()
            os.sync()
            subprocess.run(["fstrim", str(fs)], check=True, capture_output=True)
        trimmed = os.stat(overlay).st_blocks * 512
        shown = sha256_file(mnt / "base.raw")
        stats = json.loads((mnt / "stats" / "base" / "0-qcow2").read_text())
    assert full - trimmed >= 45 * MiB, (full, trimmed)
    assert stats["zero_operations"] > 0
    assert allocated_clusters(overlay) * 65536 < 20 * MiB
    assert sha256_file(base) == digest
    # What the mount showed is what the overlay holds, by QEMU's reading.
    assert sha256_file(reference_raw(overlay, tmp_path / "after.raw")) == shown
    subprocess.run(["qemu-img", "compare", "-f", "qcow2", "-F", "raw", str(overlay),
                    str(tmp_path / "after.raw")], check=True, capture_output=True)


@pytest.fixture(scope="module")
def qcow2_images(tmp_path_factory: pytest.TempPathFactory) -> Qcow2Images:
    return Qcow2Images(tmp_path_factory.mktemp("qcow2-mount-holes"))


#: Corpus images that take every path of the hole search through the mount: a chain, a shorter
#: backing file, a raw base, extended L2 over a backing file, compressed clusters, an external
#: data file, preallocation, v2 (tests/block/test_holes.py covers every recipe).
_MOUNT_RECIPES = ["backing_shorter", "chain_3", "chain_raw_base", "data_file",
                  "extended_l2_backing", "preallocated", "v2", "zstd_write"]


@pytest.mark.parametrize("name", _MOUNT_RECIPES)
def test_lseek_on_the_qcow2_corpus(qcow2_images: Qcow2Images, name: str,
                                   tmp_path: Path) -> None:
    """Through the mount, for images of the read corpus: what SEEK_DATA/SEEK_HOLE find
    agrees with qemu-img map, and the holes read as zeros."""
    image = qcow2_images.get(name)
    with mounted(image.path, mountpoint=tmp_path / "mnt", options=("--no-partitions",)) as mnt:
        found = seek_ranges(mnt / f"{image.path.stem}.raw")
    assert_holes_read_zero(found, image.reference)
    assert_agrees_with_qemu(found, image.path)
