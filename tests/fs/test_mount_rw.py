"""Writes through the real mount: --rw into the image, --overlay into a new qcow2.

Every test checks the result with the reference tools after unmounting: ``qemu-img check``
(no corruption, no leaks) and ``qemu-img compare`` against a raw model of what was written.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.support.images import create, info, qemu_img, qemu_io, reference_raw, sha256_file
from tests.support.mount import force_unmount, loop_mounted, mounted, vdiskfs, wait_gone
from tests.support.partitioned import make_gpt_disk
from vdiskfs.block.registry import get_driver
from vdiskfs.fs.mount import find_mount

pytestmark = pytest.mark.mount

MiB = 1 << 20
SIZE = 24 * MiB + 12345 // 512 * 512  # a partial last cluster for every cluster size


def _writable(fmt: str) -> None:
    if not getattr(get_driver(fmt), "supports_write", False):
        pytest.skip(f"{fmt} cannot be written yet")


def _image(kind: str, directory: Path) -> Path:
    """A pre-filled image of the named variant: data, zeros, compressed, backing data."""
    if kind == "raw":
        path = directory / "disk.img"
        path.write_bytes(random.Random(1).randbytes(SIZE))
        return path
    base = None
    if kind == "qcow2-chain":
        base = create(directory / "base.qcow2", SIZE, cluster_size=4096)
        qemu_io(base, "write -P 0x11 0 8M", "write -P 0x12 20M 2M")
    options: dict[str, object] = {
        "qcow2": {},
        "qcow2-v2": {"compat": "0.10"},
        "qcow2-512": {"cluster_size": 512, "refcount_bits": 1},
        "qcow2-2M": {"cluster_size": 2 * MiB, "refcount_bits": 64},
        "qcow2-l2ext": {"extended_l2": True, "cluster_size": 32768},
        "qcow2-chain": {"backing": "base.qcow2", "backing_fmt": "qcow2"},
        "qcow2-zstd": {"compression_type": "zstd"},
        # qemu-img takes a relative data file name against its working directory.
        "qcow2-datafile": {"data_file": str(directory / "disk.data"), "data_file_raw": True},
    }[kind]
    path = create(directory / "disk.qcow2", SIZE, **options)
    cmds = ["write -P 0x21 1M 3M", "write -z 6M 2M", "write -P 0x22 15M 100k"]
    if kind in ("qcow2", "qcow2-zstd"):
        cmds.append("write -c -P 0x23 10M 1M")
    qemu_io(path, *cmds)
    return path


def _workload(fd: int, model: bytearray, seed: int, count: int = 300,
              fsync_every: int = 40) -> None:
    """Unaligned, cross-cluster writes, whole zero buffers, and the partial last cluster."""
    rng = random.Random(seed)
    size = len(model)
    for i in range(count):
        choice = rng.random()
        if choice < 0.1:
            offset, length = size - rng.randrange(1, 70_000), None
        else:
            offset, length = rng.randrange(0, size), None
        length = min(rng.randrange(1, 300_000) if length is None else size - offset,
                     size - offset)
        data = bytes(length) if choice > 0.85 else rng.randbytes(length)
        assert os.pwrite(fd, data, offset) == length
        model[offset : offset + length] = data
        if i % fsync_every == fsync_every - 1:
            os.fsync(fd)


def _check_clean(image: Path, fmt: str) -> None:
    if fmt == "raw":
        return
    proc = subprocess.run(["qemu-img", "check", "--output=json", "-f", fmt, str(image)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(proc.stdout)
    assert report.get("corruptions", 0) == 0 and report.get("leaks", 0) == 0, report
    assert report.get("check-errors", 0) == 0, report


def _compare(image: Path, fmt: str, model: bytes, tmp_path: Path) -> None:
    expected = tmp_path / "expected.raw"
    expected.write_bytes(model)
    proc = subprocess.run(["qemu-img", "compare", "-f", fmt, "-F", "raw", str(image),
                           str(expected)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


KINDS = ["raw", "qcow2", "qcow2-v2", "qcow2-512", "qcow2-2M", "qcow2-l2ext", "qcow2-chain",
         "qcow2-zstd", "qcow2-datafile"]


@pytest.mark.parametrize("kind", KINDS)
def test_random_workload_lands_in_the_image(kind: str, tmp_path: Path) -> None:
    fmt = "raw" if kind == "raw" else "qcow2"
    _writable(fmt)
    image = _image(kind, tmp_path)
    model = bytearray(reference_raw(image, tmp_path / "before.raw", fmt=fmt).read_bytes())
    with mounted(image, mountpoint=tmp_path / "mnt", options=("--rw", "--format", fmt)) as mnt:
        exported = mnt / f"{image.stem}.raw"
        assert exported.stat().st_mode & 0o200
        fd = os.open(exported, os.O_RDWR)
        try:
            _workload(fd, model, seed=len(kind))
            assert os.pread(fd, SIZE, 0) == bytes(model)  # reads see the writes at once
        finally:
            os.close(fd)
    _check_clean(image, fmt)
    _compare(image, fmt, bytes(model), tmp_path)
    if fmt == "qcow2":
        assert info(image)["dirty-flag"] is False


def test_disk_end_and_read_only(tmp_path: Path) -> None:
    image = _image("raw", tmp_path)
    with mounted(image, mountpoint=tmp_path / "mnt", options=("--rw", "--format", "raw")) as mnt:
        fd = os.open(mnt / "disk.raw", os.O_RDWR)
        try:
            with pytest.raises(OSError) as exc:
                os.pwrite(fd, b"x", SIZE)
            assert exc.value.errno == errno.ENOSPC
            assert os.pwrite(fd, b"abcdef", SIZE - 2) == 2  # like a block device: short write
            with pytest.raises(OSError) as exc:
                os.truncate(mnt / "disk.raw", 10)
            assert exc.value.errno == errno.EPERM
        finally:
            os.close(fd)
    assert image.read_bytes()[-2:] == b"ab"


def test_fsync_reaches_the_file(tmp_path: Path) -> None:
    image = _image("raw", tmp_path)
    with mounted(image, mountpoint=tmp_path / "mnt", options=("--rw", "--format", "raw")) as mnt:
        stats = mnt / "stats" / "disk" / "1-file"
        before = json.loads(stats.read_text())["sync_calls"]
        with open(mnt / "disk.raw", "r+b", buffering=0) as f:
            f.write(b"durable")
            os.fsync(f.fileno())
            assert json.loads(stats.read_text())["sync_calls"] > before
        with open(image, "rb") as raw:
            assert raw.read(7) == b"durable"


def test_second_writer_is_refused(tmp_path: Path) -> None:
    image = _image("raw", tmp_path)
    with mounted(image, mountpoint=tmp_path / "a", options=("--rw", "--format", "raw")):
        (tmp_path / "b").mkdir()
        proc = vdiskfs("mount", "--rw", "--format", "raw", image, tmp_path / "b", check=False)
        assert proc.returncode == 1 and "lock" in proc.stderr
        proc = subprocess.run(["qemu-io", "-f", "raw", "-c", "write 0 512", str(image)],
                              capture_output=True, text=True)
        assert proc.returncode != 0 and "lock" in proc.stderr
        # A reader is warned, not refused.
        proc = vdiskfs("info", "--format", "raw", image)
        assert "another process" in proc.stdout


def test_ext4_inside_a_partition_is_writable(tmp_path: Path) -> None:
    _writable("qcow2")
    disk = make_gpt_disk(tmp_path)
    image = tmp_path / "gpt.qcow2"
    qemu_img("convert", "-f", "raw", "-O", "qcow2", disk.path, image)
    with (
        mounted(image, mountpoint=tmp_path / "mnt", options=("--rw",)) as mnt,
        loop_mounted(mnt / "gpt-part1.raw", tmp_path / "root", read_only=False) as root,
    ):
        (root / "written-by-test.txt").write_text("through vdiskfs\n")
        os.sync()
    _check_clean(image, "qcow2")
    flat = reference_raw(image, tmp_path / "after.raw")
    part = tmp_path / "part1.ext4"
    start = 2048 * 512
    with open(flat, "rb") as src, open(part, "wb") as dst:
        src.seek(start)
        dst.write(src.read(24576 * 512))
    out = subprocess.run(["debugfs", "-R", "cat /written-by-test.txt", str(part)],
                         capture_output=True, text=True, check=True).stdout
    assert out == "through vdiskfs\n"
    subprocess.run(["e2fsck", "-fn", str(part)], check=True, capture_output=True)


def test_overlay_leaves_the_base_untouched(tmp_path: Path) -> None:
    _writable("qcow2")
    base = _image("qcow2", tmp_path)
    digest = sha256_file(base)
    overlay = tmp_path / "overlays" / "new.qcow2"
    overlay.parent.mkdir()
    model = bytearray(reference_raw(base, tmp_path / "before.raw").read_bytes())
    for round_ in range(2):  # the second round continues the existing overlay
        with mounted(base, mountpoint=tmp_path / "mnt",
                     options=("--overlay", str(overlay))) as mnt:
            assert sorted(os.listdir(mnt / "stats" / "disk"))[:3] == ["0-qcow2", "1-file",
                                                                       "2-qcow2"]
            fd = os.open(mnt / "disk.raw", os.O_RDWR)
            try:
                _workload(fd, model, seed=100 + round_, count=80)
            finally:
                os.close(fd)
        assert sha256_file(base) == digest
    details = info(overlay)
    assert details["backing-filename"] == "../disk.qcow2"
    assert details["backing-filename-format"] == "qcow2"
    _check_clean(overlay, "qcow2")
    _compare(overlay, "qcow2", bytes(model), tmp_path)
    other = create(tmp_path / "other.qcow2", SIZE)
    (tmp_path / "mnt2").mkdir()
    proc = vdiskfs("mount", "--overlay", overlay, other, tmp_path / "mnt2", check=False)
    assert proc.returncode == 1 and "not an overlay of" in proc.stderr


def test_fio_verify(tmp_path: Path) -> None:
    _writable("qcow2")
    image = create(tmp_path / "fio.qcow2", "64M")
    with mounted(image, mountpoint=tmp_path / "mnt", options=("--rw",)) as mnt:
        subprocess.run(
            ["fio", "--name=verify", f"--filename={mnt / 'fio.raw'}", "--rw=randwrite",
             "--bsrange=4k-64k", "--numjobs=4", "--size=12M", "--offset_increment=16M",
             "--verify=crc32c", "--verify_fatal=1", "--do_verify=1", "--ioengine=psync",
             "--randseed=3", "--group_reporting", "--verify_state_save=0"],
            check=True, capture_output=True, text=True, cwd=tmp_path,
        )
    _check_clean(image, "qcow2")


def _kill_during_storm(image: Path, fmt: str, tmp_path: Path,
                       after_mount: Callable[[Path], None] | None = None) -> None:
    """Write, fsync, write more without fsync, then kill -9 the daemon mid-storm."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    vdiskfs("mount", "--rw", "--format", fmt, image, mnt)
    pid = find_mount(str(mnt)).daemon_pid  # type: ignore[union-attr]
    synced = random.Random(9).randbytes(5 * MiB)
    try:
        fd = os.open(mnt / f"{image.stem}.raw", os.O_RDWR)
        try:
            os.pwrite(fd, synced, 2 * MiB)
            os.fsync(fd)
            storm = subprocess.Popen(
                ["fio", "--name=storm", f"--filename={mnt / (image.stem + '.raw')}",
                 "--rw=randwrite", "--bs=4k-128k", "--offset=8M", "--size=12M",
                 "--ioengine=psync", "--numjobs=2", "--time_based", "--runtime=30"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tmp_path,
            )
            time.sleep(1.5)
            os.kill(pid, signal.SIGKILL)  # type: ignore[arg-type]
            storm.wait(timeout=60)
        finally:
            with contextlib.suppress(OSError):  # ENOTCONN: the daemon is gone
                os.close(fd)
    finally:
        subprocess.run(["fusermount3", "-u", "-z", str(mnt)], capture_output=True)
        assert wait_gone(pid)  # type: ignore[arg-type]
        force_unmount(mnt)
    # No corruption (leaks allowed), and what was fsynced is there.
    if fmt == "qcow2":
        proc = subprocess.run(["qemu-img", "check", "--output=json", str(image)],
                              capture_output=True, text=True)
        report = json.loads(proc.stdout)
        assert report.get("corruptions", 0) == 0, report
        assert report.get("check-errors", 0) == 0, report
    flat = reference_raw(image, tmp_path / "after-crash.raw", fmt=fmt).read_bytes()
    assert flat[2 * MiB : 7 * MiB] == synced


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_kill_9_during_a_write_storm(fmt: str, tmp_path: Path) -> None:
    _writable(fmt)
    image = _image("raw" if fmt == "raw" else "qcow2", tmp_path)
    _kill_during_storm(image, fmt, tmp_path)


def test_host_out_of_space(tmp_path: Path) -> None:
    _writable("qcow2")
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6M", "tmpfs", str(small)], check=True)
    try:
        image = create(small / "full.qcow2", "64M")
        with mounted(image, mountpoint=tmp_path / "mnt", options=("--rw",)) as mnt:
            fd = os.open(mnt / "full.raw", os.O_RDWR)
            try:
                with pytest.raises(OSError) as exc:
                    for offset in range(0, 64 * MiB, MiB):
                        os.pwrite(fd, random.Random(offset).randbytes(MiB), offset)
                    os.fsync(fd)
                assert exc.value.errno in (errno.ENOSPC, errno.EIO)
            finally:
                os.close(fd)
        proc = subprocess.run(["qemu-img", "check", "--output=json", str(image)],
                              capture_output=True, text=True)
        report = json.loads(proc.stdout)
        assert report.get("corruptions", 0) == 0 and report.get("check-errors", 0) == 0, report
    finally:
        subprocess.run(["umount", "-l", str(small)], capture_output=True)
