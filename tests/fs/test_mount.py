"""The FUSE mount through the real command line, on raw images (qcow2 in test_mount_qcow2)."""

from __future__ import annotations

import errno
import json
import os
import random
import signal
import subprocess
import threading
from pathlib import Path

import pytest

from tests.support.images import sha256_file, write_pattern_file
from tests.support.mount import force_unmount, mounted, vdiskfs, wait_gone
from vdiskfs.fs.mount import find_mount

pytestmark = pytest.mark.mount

SIZE = 8 * 1024 * 1024 + 4096


@pytest.fixture
def raw_disk(tmp_path: Path) -> Path:
    return write_pattern_file(tmp_path / "disk.img", seed=3, length=SIZE)


def test_raw_file_reads_exactly_the_image(raw_disk: Path, tmp_path: Path) -> None:
    reference = raw_disk.read_bytes()
    before = (sha256_file(raw_disk), raw_disk.stat().st_mtime_ns)
    with mounted(raw_disk, mountpoint=tmp_path / "mnt", options=("--format", "raw")) as mnt:
        exported = mnt / "disk.raw"
        assert exported.stat().st_size == SIZE
        assert sha256_file(exported) == before[0]
        rng = random.Random(5)
        fd = os.open(exported, os.O_RDONLY)
        try:
            for _ in range(300):
                offset = rng.randrange(0, SIZE)
                length = rng.randrange(1, 200_000)
                assert os.pread(fd, length, offset) == reference[offset : offset + length]
            assert os.pread(fd, 100, SIZE) == b""
        finally:
            os.close(fd)
    assert (sha256_file(raw_disk), raw_disk.stat().st_mtime_ns) == before


def test_read_only_refuses_writes(raw_disk: Path, tmp_path: Path) -> None:
    with mounted(raw_disk, mountpoint=tmp_path / "mnt", options=("--format", "raw")) as mnt:
        with pytest.raises(OSError) as exc:
            os.open(mnt / "disk.raw", os.O_RDWR)
        assert exc.value.errno == errno.EROFS
        with pytest.raises(OSError) as exc:
            (mnt / "new").write_bytes(b"x")
        assert exc.value.errno == errno.EROFS


def test_concurrent_readers(raw_disk: Path, tmp_path: Path) -> None:
    reference = raw_disk.read_bytes()
    errors: list[str] = []
    with mounted(raw_disk, mountpoint=tmp_path / "mnt", options=("--format", "raw")) as mnt:

        def reader(seed: int) -> None:
            rng = random.Random(seed)
            with open(mnt / "disk.raw", "rb", buffering=0) as f:
                for _ in range(100):
                    offset = rng.randrange(0, SIZE)
                    length = rng.randrange(1, 65536)
                    if os.pread(f.fileno(), length, offset) != reference[offset:offset + length]:
                        errors.append(f"{seed}: mismatch at {offset}+{length}")

        threads = [threading.Thread(target=reader, args=(i,)) for i in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert errors == []


def test_stats_files_are_live_and_add_up(raw_disk: Path, tmp_path: Path) -> None:
    with mounted(raw_disk, mountpoint=tmp_path / "mnt", options=("--format", "raw")) as mnt:
        stats = mnt / "stats" / "disk"
        assert sorted(os.listdir(stats)) == ["0-raw", "1-file", "tree"]
        assert "1-file  (file)" in (stats / "tree").read_text()
        top0 = json.loads((stats / "0-raw").read_text())
        assert top0["driver"] == "raw" and top0["children"] == ["1-file"]
        with open(mnt / "disk.raw", "rb", buffering=0) as f:
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
            f.read(1 << 20)
        top = json.loads((stats / "0-raw").read_text())
        file = json.loads((stats / "1-file").read_text())
        assert top["rd_bytes"] >= top0["rd_bytes"] + (1 << 20)
        # A raw node reads exactly what it passes to its file; the file counts its syscalls.
        assert file["rd_bytes"] == top["rd_bytes"]
        assert file["rd_operations"] == top["rd_operations"]
        assert file["pread_calls"] >= file["rd_operations"]
        assert file["parent"] == "0-raw" and file["role"] == "file"
        for key in ("rd_total_time_ns", "failed_rd_operations", "invalid_wr_operations",
                    "flush_operations", "unmap_bytes", "rd_latency_histogram"):
            assert key in top


def test_errors_are_reported_before_mounting(raw_disk: Path, tmp_path: Path) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    missing = tmp_path / "missing.qcow2"
    proc = vdiskfs("mount", missing, mnt, check=False)
    assert proc.returncode == 1
    assert str(missing) in proc.stderr and "No such file" in proc.stderr
    assert "Traceback" not in proc.stderr
    other = tmp_path / "sub"
    other.mkdir()
    twin = write_pattern_file(other / "disk.qcow2", seed=1, length=4096)
    proc = vdiskfs("mount", raw_disk, twin, mnt, check=False)
    assert proc.returncode == 1 and "disk.raw" in proc.stderr
    assert find_mount(str(mnt)) is None


def test_probed_raw_is_announced(raw_disk: Path, tmp_path: Path) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    proc = vdiskfs("mount", raw_disk, mnt)
    try:
        assert "probing guessed raw" in proc.stderr
    finally:
        vdiskfs("unmount", mnt)


@pytest.mark.parametrize("how", ["fusermount", "sigterm", "sigint"])
def test_every_way_of_unmounting_ends_the_daemon(raw_disk: Path, tmp_path: Path,
                                                 how: str) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    vdiskfs("mount", "--format", "raw", raw_disk, mnt)
    info = find_mount(str(mnt))
    try:
        assert info is not None and info.daemon_pid is not None
        if how == "fusermount":
            subprocess.run(["fusermount3", "-u", str(mnt)], check=True)
        else:
            os.kill(info.daemon_pid, signal.SIGTERM if how == "sigterm" else signal.SIGINT)
        assert wait_gone(info.daemon_pid)
        assert find_mount(str(mnt)) is None or find_mount(str(mnt)).fstype != "fuse.vdiskfs"
    finally:
        force_unmount(mnt)


def test_foreground_mode_logs_and_stays_attached(raw_disk: Path, tmp_path: Path) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    import sys
    import time

    proc = subprocess.Popen(
        [sys.executable, "-m", "vdiskfs", "mount", "--foreground", "--format", "raw",
         str(raw_disk), str(mnt)],
        stderr=subprocess.PIPE, text=True,
    )
    try:
        deadline = time.monotonic() + 30
        while find_mount(str(mnt)) is None:
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert (mnt / "disk.raw").stat().st_size == SIZE
        vdiskfs("unmount", mnt)
        assert proc.wait(timeout=30) == 0
        assert "mounted" in (proc.stderr.read() if proc.stderr else "")
    finally:
        if proc.poll() is None:
            proc.kill()
        force_unmount(mnt)


def test_deep_queues_reach_the_daemon(raw_disk: Path, tmp_path: Path) -> None:
    # max_background as many as the daemon's workers, the congestion threshold at 3/4.
    from vdiskfs.fs.mount import FUSECTL, MAX_TASKS

    with mounted(raw_disk, mountpoint=tmp_path / "mnt", options=("--format", "raw")) as mnt:
        info = find_mount(str(mnt))
        assert info is not None and info.device is not None
        connection = Path(FUSECTL) / info.device.partition(":")[2]
        if not connection.is_dir():  # set at INIT, vdiskfs had no need to mount fusectl
            subprocess.run(["mount", "-t", "fusectl", "fusectl", FUSECTL], check=True)
        assert int((connection / "max_background").read_text()) == MAX_TASKS
        assert int((connection / "congestion_threshold").read_text()) == MAX_TASKS * 3 // 4


def test_sequential_readers_get_a_large_readahead(raw_disk: Path, tmp_path: Path) -> None:
    from vdiskfs.fs.mount import READAHEAD_KB

    with mounted(raw_disk, mountpoint=tmp_path / "mnt", options=("--format", "raw")) as mnt:
        info = find_mount(str(mnt))
        assert info is not None and info.device is not None
        bdi = Path("/sys/class/bdi") / info.device / "read_ahead_kb"
        assert int(bdi.read_text()) == READAHEAD_KB
